"""The dataset folder: claiming it, its manifest.json, writing each image's files and removing stale ones."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from dataclasses import asdict

from ..core import host, safe_io
from ..data.items import MANIFEST_NAME
from .reuse import detector_name
from .settings import BuildSettings
from .sources import NO_CAPTION, Source

FORMAT = "personalize-dataset"
VERSION = 1
IMAGES_DIR = "images"
_OUTPUT_NAME = re.compile(r".+_[0-9a-f]{10}\.(png|txt)$")


def claim_folder(root: str, name: str, source: dict) -> tuple[str, bool]:
    """(<root>/<name>, or name_2, name_3...: the first that is free or was built from the same
    source; whether this call created it)."""
    stem = safe_io.sanitize_name(name, default="dataset")
    for n in itertools.count(1):
        path = os.path.join(root, stem if n == 1 else f"{stem}_{n}")
        if not os.path.exists(path):
            os.makedirs(path)
            # Claim it at once: a cancelled first build still marks the folder as ours.
            safe_io.write_json(os.path.join(path, MANIFEST_NAME),
                               {"format": FORMAT, "version": VERSION, "source": source, "items": [],
                                "incomplete": True})
            return path, True
        own = read_own_manifest(path)
        if own is not None and own.get("source") == source:
            return path, False
    raise AssertionError("unreachable")


def read_own_manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def make_manifest(out, source, settings, buckets, detector, key, classes, items, skips, dupes, incomplete=False) -> dict:
    manifest = {
        "format": FORMAT, "version": VERSION, "name": os.path.basename(out), "source": source,
        "settings": {**asdict(settings), "buckets": [list(b) for b in buckets] if buckets else None,
                     "face_detector": detector_name(detector) if settings.face_crop else None,
                     "pixels_key": key},
        "class_images": classes[0], "class_images_count": classes[1],
        "items": items, "skipped": skips, "duplicates": dupes,
    }
    return {**manifest, "incomplete": True} if incomplete else manifest


@contextlib.contextmanager
def kept_on_cancel(out: str, manifest, previous: dict, items: list):
    """On Cancel, record what is done (an incomplete manifest the trainers refuse) so the next build
    reuses it; the previous build's items not reached yet are kept too, their files are still there."""
    try:
        yield
    except BaseException as e:
        if host.is_interrupt(e):
            done = {it["source_sha256"] for it in items}
            earlier = [it for it in previous.get("items") or [] if it.get("source_sha256") not in done]
            safe_io.write_json(os.path.join(out, MANIFEST_NAME), manifest(items + earlier, [], [], incomplete=True))
        raise


def write_item(out: str, src: Source, rec: dict, settings: BuildSettings, names: set) -> dict:
    """Write the image (unless reused) and its caption file; the manifest entry."""
    stem = rec["output_name"]
    image_rel, caption_rel = f"{IMAGES_DIR}/{stem}.png", f"{IMAGES_DIR}/{stem}.txt"
    if "png" in rec:
        safe_io.write_bytes(os.path.join(out, image_rel), rec["png"])
    caption = src.caption or ""
    write_if_changed(os.path.join(out, caption_rel), caption + "\n")
    names.update({os.path.basename(image_rel), os.path.basename(caption_rel)})
    w, h = rec["bucket"] or [settings.resolution, settings.resolution]
    return {
        "image": image_rel, "caption": caption, "caption_file": caption_rel, "output_name": stem,
        "output_size": [w, h], "output_sha256": rec["output_sha256"],
        "source": src.label, "source_sha256": rec["source_sha256"], "source_bytes": rec["source_bytes"],
        "source_size": rec["source_size"], "crop_box": rec["crop_box"], "pad_box": rec["pad_box"],
        "face_box": rec["face_box"], "bucket": rec["bucket"], "repeats": settings.repeats, "phash": rec["phash"],
        "warnings": src.warnings + rec["warnings"] + ([] if src.caption is not None else [NO_CAPTION]),
    }


def write_if_changed(path: str, text: str) -> None:
    """Atomic write, skipped when the file already holds `text` (a rebuild leaves files untouched)."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    safe_io.write_text(path, text)


def remove_stale(out: str, keep: set) -> None:
    """Delete outputs of earlier builds that this build no longer lists (only files named like ours)."""
    folder = os.path.join(out, IMAGES_DIR)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name not in keep and _OUTPUT_NAME.match(name):
            os.remove(os.path.join(folder, name))
