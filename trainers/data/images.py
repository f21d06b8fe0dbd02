"""Opening user images robustly: any common format and mode comes out as 8-bit RGB.

Photos from phones carry an EXIF rotation, scans are 16-bit or CMYK, logos have
transparency. Pillow's plain `convert("RGB")` gets several of these wrong (16-bit
greys clip to white, transparent pixels turn black), so each case is handled here.
"""
from __future__ import annotations

import os
import unicodedata

import numpy as np
from PIL import Image, ImageOps

from ..core import path_policy

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Files that commonly sit beside images and are not worth a "skipped" line.
_SIDECAR_EXTENSIONS = (".txt", ".caption", ".json", ".npz", ".safetensors")
_JUNK_NAMES = ("thumbs.db", "desktop.ini")


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"Cannot use image '{path}': {reason}")


def _open_loaded(path: str, draft_size=None) -> Image.Image:
    """Open and fully decode (so a truncated file fails here, not mid-training)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageError(path, f"cannot read the file ({e.strerror or e})") from e
    if size == 0:
        raise ImageError(path, "the file is empty (0 bytes)")
    try:
        img = Image.open(path)
    except Image.UnidentifiedImageError as e:
        raise ImageError(path, "not an image Pillow can read (wrong extension or corrupt file)") from e
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageError(path, str(e)) from e
    try:
        if draft_size is not None and img.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEGs from cameras
            img.draft("RGB", draft_size)  # decode at 1/2..1/8 scale, no side below draft_size's; truncation still shows
        img.load()
    except Exception as e:  # truncated data, decoder errors, bombs
        img.close()
        raise ImageError(path, f"the image data is damaged or incomplete ({e})") from e
    return img


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greys to 8-bit L by scaling, never by clipping."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float32) / 257.0
    elif img.mode == "I":
        arr = arr.astype(np.float32)
        # 32-bit containers usually hold 16-bit data; plain 8-bit data stays as it is.
        if arr.size and arr.max() > 255:
            arr = arr / 257.0
    else:  # "F": 0..1 floats are the common convention
        arr = arr.astype(np.float32)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image, path: str = "<image>") -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_8bit(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        return _on_white(img)
    try:
        return img.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr
    except (ValueError, OSError) as e:
        raise ImageError(path, f"unsupported colour mode '{mode}' ({e})") from e


def open_rgb(path, max_short_side: int | None = None) -> Image.Image:
    """The image at `path` as an upright, fully decoded 8-bit RGB image.

    max_short_side: the caller needs no more than this many pixels across the shorter side,
    so a big JPEG is decoded at a reduced scale and the result shrunk to it (see `shrink`).
    """
    path = os.fspath(path)
    draft = (max_short_side, max_short_side) if max_short_side else None
    with _open_loaded(path, draft_size=draft) as img:
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception:  # a malformed EXIF block: keep the pixels as stored
            upright = img
        rgb = to_rgb(upright, path)
    return shrink(rgb, max_short_side) if max_short_side else rgb


def shrink(img: Image.Image, max_short_side: int) -> Image.Image:
    """`img` resized (Lanczos) so its shorter side is at most `max_short_side`; itself when it already is."""
    scale = max_short_side / min(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def check_image(path) -> None:
    """Raise ImageError if `path` cannot be decoded; cheaper than open_rgb for big JPEGs."""
    with _open_loaded(path, draft_size=(64, 64)):
        pass


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder, check: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files directly in `folder`, sorted; and (path, reason) for what was left out.

    Hidden files are ignored; caption and manifest files beside the images are not
    reported. check=True also decodes each image and skips the unreadable ones.
    """
    folder = os.fspath(folder)
    paths, skipped = [], []
    readable = path_policy.readable_check()
    names = sorted(os.listdir(folder), key=lambda n: unicodedata.normalize("NFC", n))
    for name in names:
        path = os.path.join(folder, name)
        if name.startswith(".") or name.lower() in _JUNK_NAMES or not os.path.isfile(path):
            continue
        if not readable(path):  # a link out of the folders a graph may read
            skipped.append((path, "a link to a file outside ComfyUI's input, output, temp and model folders"))
            continue
        if not is_image_name(name):
            if not name.lower().endswith(_SIDECAR_EXTENSIONS):
                ext = os.path.splitext(name)[1] or "no extension"
                skipped.append((path, f"not an image file ({ext}); images must be {', '.join(IMAGE_EXTENSIONS)}"))
            continue
        if check:
            try:
                check_image(path)
            except ImageError as e:
                skipped.append((path, e.reason))
                continue
        paths.append(path)
    return paths, skipped
