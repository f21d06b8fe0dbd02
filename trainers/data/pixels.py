"""Pixels as the VAE takes them: the training resolution, centre/random crops and bucket sizes."""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .errors import DatasetError

log = logging.getLogger("personalize")

CROP_MODES = ("center", "random")


def check_resolution(resolution) -> int:
    """The training resolution as an int: a multiple of 8, at least 64."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float, np.integer)) \
            or int(resolution) != resolution:
        raise DatasetError(f"Resolution must be a whole number of pixels, got {resolution!r}.")
    value = int(resolution)
    if value < 64:
        raise DatasetError(f"Resolution {value} is too small: the smallest valid value is 64.")
    if value % 8:
        low, high = value - value % 8, value - value % 8 + 8
        low_text = f"{low} or " if low >= 64 else ""
        raise DatasetError(f"Resolution {value} is not a multiple of 8: use {low_text}{high}.")
    return value


def prepare_pixels(img: Image.Image, resolution: int, crop: str = "center") -> torch.Tensor:
    """Resize the short side to `resolution`, crop, and return a [3,H,W] tensor in [-1, 1].

    crop="center": a resolution x resolution centre square. crop="random": the whole
    image, longer side cut down to a multiple of 8 (the random crop is done on latents).
    """
    resolution = check_resolution(resolution)
    if crop not in CROP_MODES:
        raise DatasetError(f"Crop must be one of {', '.join(CROP_MODES)}, got {crop!r}.")
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), resample)
    if crop == "center":
        out_w = out_h = resolution
    else:
        out_w, out_h = new_w - new_w % 8, new_h - new_h % 8
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    if (out_w, out_h) != (new_w, new_h):
        img = img.crop((left, top, left + out_w, top + out_h))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def bucket_pixels(img: Image.Image, bucket, path: str = "<image>", rescaled: bool = False) -> torch.Tensor:
    """A prepared image as a [3,H,W] tensor in [-1, 1] at its bucket size (resized only if it was edited).

    rescaled: the bucket was scaled to another training resolution on purpose; resize without a warning.
    """
    w, h = bucket
    img = img if img.mode == "RGB" else img.convert("RGB")
    if img.size != (w, h) and not rescaled:  # the builder wrote it at this size; someone changed the file since
        log.warning("%s is %dx%d, not its bucket %dx%d: resized; rebuild the dataset.", path, *img.size, w, h)
    if img.size != (w, h):
        scale = max(w / img.width, h / img.height)
        bw, bh = w / scale, h / scale
        left, top = (img.width - bw) / 2, (img.height - bh) / 2
        img = img.resize((w, h), Image.Resampling.LANCZOS, box=(left, top, left + bw, top + bh))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
