"""What a training folder holds: image/caption pairs (or a built dataset's manifest.json), and its fingerprint."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

from ..core import path_policy
from .captions import read_caption, with_trigger
from .errors import DatasetError
from .images import ImageError, check_image, list_images

log = logging.getLogger("personalize")

MANIFEST_NAME = "manifest.json"


@dataclass
class TrainItem:
    path: str
    caption: str
    bucket: tuple[int, int] | None = None  # (width, height) of a prepared image from the dataset builder
    repeats: int = 1  # times the item appears in each epoch
    # From a built dataset: the source photo's (width, height) and the box (left, top, right, bottom) of it
    # that was kept. SDXL conditions on them; None for a plain folder (the image is its own original).
    original_size: tuple[int, int] | None = None
    crop_box: tuple[int, int, int, int] | None = None


def _manifest_entries(folder: str, manifest: str) -> tuple[list[tuple[str, str, dict]], list[tuple[str, str]]]:
    """(image path, caption, {"bucket", "repeats"}) from a dataset builder's manifest.json, and the skipped ones."""
    try:
        with open(manifest, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["items"]
        if not isinstance(entries, list):
            raise TypeError("'items' is not a list")
        if data.get("incomplete"):
            raise ValueError("its build was stopped before the end; build the dataset again")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"Dataset manifest '{manifest}' cannot be read ({e}). It must be JSON like "
                           f'{{"items": [{{"image": "a.png", "caption": "..."}}]}}; fix or delete it.') from e
    pairs, skipped = [], []
    for n, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image:
            skipped.append((f"{manifest} item {n}", "no 'image' path"))
            continue
        path = os.path.normpath(os.path.join(folder, image))
        if not path_policy.is_inside(path, [os.path.realpath(folder)]):  # absolute, '../' or a link out
            skipped.append((f"{manifest} item {n}", "its image is not inside the dataset folder"))
            continue
        if not os.path.isfile(path):
            skipped.append((path, "listed in manifest.json but the file is missing"))
            continue
        try:
            extra = {"bucket": _bucket(entry.get("bucket")), "repeats": int(entry.get("repeats") or 1),
                     "original_size": _ints(entry.get("source_size"), 2),
                     "crop_box": _ints(entry.get("crop_box"), 4)}
            if extra["repeats"] < 1:
                raise ValueError("repeats must be at least 1")
        except (TypeError, ValueError) as e:
            skipped.append((path, f"bad bucket, repeats, source_size or crop_box in manifest.json ({e})"))
            continue
        pairs.append((path, str(entry.get("caption") or ""), extra))
    return pairs, skipped


def _bucket(value) -> tuple[int, int] | None:
    if value is None:
        return None
    w, h = (int(v) for v in value)
    if w < 8 or h < 8 or w % 8 or h % 8:
        raise ValueError(f"bucket {w}x{h} is not a multiple of 8")
    return w, h


def _ints(value, count: int) -> tuple | None:
    """A manifest's [w, h] or [l, t, r, b] as a tuple of ints; None when absent."""
    if value is None:
        return None
    numbers = tuple(int(v) for v in value)
    if len(numbers) != count:
        raise ValueError(f"{list(value)} should have {count} numbers")
    return numbers


def _folder_entries(folder: str, caption_ext: str) -> tuple[list[tuple[str, str | None, dict]], list[tuple[str, str]]]:
    paths, skipped = list_images(folder)
    pairs = []
    for path in paths:
        caption_path = os.path.splitext(path)[0] + caption_ext
        pairs.append((path, read_caption(caption_path) if os.path.isfile(caption_path) else None, {}))
    return pairs, skipped


def scan_folder(folder, trigger_word: str = "", caption_ext: str = ".txt", caption: str = "") -> list[TrainItem]:
    """Image/caption pairs of a training folder (or of its manifest.json), corrupt images skipped.

    Items of a built dataset (manifest.json) carry their bucket and repeats. `caption`, when given, is every
    image's caption (DreamBooth's instance prompt), in place of their own.
    """
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder or "")))
    if not os.path.isdir(folder):
        raise DatasetError(f"Dataset folder '{folder}' does not exist. Give the full path of a folder "
                           f"holding your training images (and optional same-name .txt captions).")
    caption_ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
    manifest = os.path.join(folder, MANIFEST_NAME)
    if os.path.isfile(manifest):
        pairs, skipped = _manifest_entries(folder, manifest)
    else:
        pairs, skipped = _folder_entries(folder, caption_ext)

    items, uncaptioned = [], 0
    for path, own, extra in pairs:
        try:
            check_image(path)
        except ImageError as e:
            skipped.append((path, e.reason))
            continue
        if caption:
            text = caption
        elif own is None:
            text = ""
            uncaptioned += 1
        else:
            text = own
        items.append(TrainItem(path, with_trigger(text, trigger_word), **extra))

    for path, reason in skipped:
        log.warning("Skipping %s: %s", path, reason)
    if not items:
        detail = f" Skipped: {'; '.join(f'{os.path.basename(p)} ({r})' for p, r in skipped[:5])}." if skipped else ""
        raise DatasetError(f"Dataset folder '{folder}' has no usable image.{detail} Put .jpg/.png/.webp "
                           f"images directly in that folder (not in sub-folders).")
    if uncaptioned and not (trigger_word or "").strip():
        log.warning("%d of %d images in %s have no %s caption file and no trigger word was given: "
                    "they train with an empty caption.", uncaptioned, len(items), folder, caption_ext)
    return items


def built_resolution(folder) -> int | None:
    """The resolution a built dataset's images were prepared at (its manifest settings); None for a plain folder."""
    manifest = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(folder or ""))), MANIFEST_NAME)
    try:
        with open(manifest, encoding="utf-8") as f:
            value = json.load(f)["settings"]["resolution"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def dataset_fingerprint(items, folder) -> str:
    """sha256 over the training items as trained, in sorted order: path relative to `folder`, the image
    file's content sha256, the caption (trigger word included), bucket and repeats.

    Equal fingerprints mean the same training data, wherever the folder was moved.
    """
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder or "")))
    records = []
    for it in items:
        with open(it.path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
        relative = os.path.relpath(it.path, folder).replace(os.sep, "/")
        records.append(json.dumps([relative, content, it.caption, list(it.bucket) if it.bucket else None,
                                   it.repeats]))
    return hashlib.sha256("\n".join(sorted(records)).encode("utf-8")).hexdigest()
