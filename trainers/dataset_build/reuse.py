"""What a rebuild may keep: the key of the pixel settings, and the last build's results by source hash."""
from __future__ import annotations

import json
import os

from .prepare import sha256
from .settings import BuildSettings
from .sources import BAD_CAPTION, NO_CAPTION

PIXELS_VERSION = 1  # bump when the same settings would give different pixels: outputs are then rebuilt


def settings_key(settings: BuildSettings, buckets, detector) -> str:
    """Hash of everything that decides an output's pixels (not captions, repeats or dedupe)."""
    pixels = {"v": PIXELS_VERSION, "resolution": settings.resolution, "mode": settings.mode,
              "buckets": buckets, "face": detector_name(detector) if settings.face_crop else None}
    return sha256(json.dumps(pixels, sort_keys=True).encode())[:16]


def detector_name(detector) -> str:
    if detector is None:
        return "none"
    return getattr(detector, "__name__", type(detector).__name__)


def reuse_index(previous: dict, key: str) -> dict[str, dict]:
    """Source hash -> what the last build knew about it, when it used the same pixel settings."""
    if (previous.get("settings") or {}).get("pixels_key") != key:
        return {}
    index = {}
    for k in previous.get("skipped") or []:
        if k.get("source_sha256") and k.get("reason"):
            index[k["source_sha256"]] = {"reason": k["reason"]}
    for d in previous.get("duplicates") or []:
        if d.get("source_sha256") and d.get("phash"):
            index[d["source_sha256"]] = {"source_sha256": d["source_sha256"], "phash": d["phash"], "image": None}
    for item in previous.get("items") or []:
        if item.get("source_sha256") and item.get("image"):
            index[item["source_sha256"]] = {k: item.get(k) for k in (
                "image", "output_name", "output_sha256", "source_sha256", "source_bytes", "source_size",
                "crop_box", "pad_box", "face_box", "bucket", "phash")}
            index[item["source_sha256"]]["warnings"] = [w for w in item.get("warnings") or []
                                                         if not w.startswith((NO_CAPTION, BAD_CAPTION))]
    return index


def output_intact(out: str, old: dict) -> bool:
    if not old.get("image"):
        return False
    try:
        with open(os.path.join(out, old["image"]), "rb") as f:
            return sha256(f.read()) == old["output_sha256"]
    except OSError:
        return False
