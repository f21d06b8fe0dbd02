"""Folder inputs typed in widgets: where relative paths point, and when their contents changed."""
from __future__ import annotations

import hashlib
import os

from ..trainers import host


def input_folder(folder: str) -> str:
    """A relative folder is taken from ComfyUI's input folder (the current folder outside ComfyUI)."""
    folder = os.path.expanduser((folder or "").strip())
    if folder and not os.path.isabs(folder) and host.in_comfyui():
        import folder_paths  # type: ignore

        folder = os.path.join(folder_paths.get_input_directory(), folder)
    return folder


def folder_fingerprint(*folders, extensions: tuple[str, ...] | None = None) -> str:
    """Names, sizes and times of the files in the folders (only `extensions` when given): a node's
    IS_CHANGED value, so it runs again when the photos or captions change and stays cached otherwise."""
    digest = hashlib.sha256()
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            digest.update(f"missing:{folder}".encode())
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and (extensions is None or entry.name.lower().endswith(extensions)):
                st = entry.stat()
                digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
