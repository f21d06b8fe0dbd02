"""Paths typed in (or linked into) node widgets: the one door every node uses (trainers/core/path_policy.py)."""
from __future__ import annotations

import hashlib
import os

from ..trainers.core import path_policy


def node_folder(folder: str, what: str = "Folder", write: bool = False) -> str:
    """The real path of a folder input; relative paths are inside ComfyUI's input folder. Raises
    path_policy.PathNotAllowed for a folder outside ComfyUI's folders (before looking at it)."""
    return path_policy.node_path(folder, what, write=write)


def node_dataset(dataset, what: str = "DATASET") -> str:
    """The folder of a DATASET value. ComfyUI does not type-check custom types, so a posted graph can
    put any dict here: only its path is used, under the same rules as a typed folder."""
    if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str) or not dataset["path"]:
        raise ValueError(f"{what} is not a dataset from Build Dataset (expected a value with a 'path').")
    return node_folder(dataset["path"], what)


def folder_fingerprint(*folders, extensions: tuple[str, ...] | None = None, write: bool = False) -> str:
    """Names, sizes and times of the files in the folders (only `extensions` when given): a node's
    IS_CHANGED value, so it runs again when the photos or captions change and stays cached otherwise.
    A folder the node may not use is not looked at (the node itself then reports the error)."""
    digest = hashlib.sha256()
    for folder in folders:
        try:
            path = node_folder(folder, write=write)
        except path_policy.PathNotAllowed:
            digest.update(b"not allowed")
            continue
        if not path or not os.path.isdir(path):
            digest.update(f"missing:{folder}".encode())
            continue
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_file() and (extensions is None or entry.name.lower().endswith(extensions)):
                st = entry.stat()
                digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
