"""Preparing one image: decode it upright, crop or pad it to its output size, resize and encode it as PNG."""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageOps

from ..data.images import ImageError, to_rgb
from . import face_crop, phash
from .buckets import nearest_bucket
from .settings import BuildSettings
from .sources import Source

_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def process_source(src: Source, data: bytes, sha: str, key: str, plan: CropPlan, detector) -> dict:
    """Decode (unless in memory), prepare and encode one source: the record the build keeps for it."""
    if src.image is not None:
        img = src.image.convert("RGB") if src.image.mode != "RGB" else src.image
        full = img.size
    else:
        img, full = _decode(data, src.label, plan.scale)
    prepared = prepare_image(img, full, plan, detector)
    png = _png(prepared.pop("image"))
    return {"status": "processed", "source_sha256": sha, "source_bytes": len(data) if src.path else None,
            "source_size": list(full), "phash": phash.phash(img), "png": png,
            "output_sha256": sha256(png), "output_name": f"{src.stem}_{sha256((sha + key).encode())[:10]}",
            **prepared}


def _upright_size(img: Image.Image) -> tuple[int, int]:
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in _TRANSPOSED else (w, h)


def _decode(data: bytes, label: str, scale_for) -> tuple[Image.Image, tuple[int, int]]:
    """(upright 8-bit RGB image, upright full size). JPEGs are decoded at 1/2, 1/4 or 1/8 scale
    when `scale_for(full_size)` (output pixels per source pixel) still leaves enough pixels."""
    if not data:
        raise ImageError(label, "the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:
        raise ImageError(label, "not an image Pillow can read (wrong extension or corrupt file)") from e
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageError(label, str(e)) from e
    full = _upright_size(img)
    if img.format in ("JPEG", "MPO"):
        reduce = next((r for r in (8, 4, 2) if r * scale_for(full) <= 1), 1)
        if reduce > 1:  # the DCT scaling of libjpeg: a fast, filtered downscale
            img.draft("RGB", (img.width // reduce, img.height // reduce))
    try:
        img.load()
    except Exception as e:  # truncated data, decoder errors
        raise ImageError(label, f"the image data is damaged or incomplete ({e})") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        pass
    return to_rgb(img, label), full


class CropPlan:
    """Output size and crop geometry of one image under the build settings."""

    def __init__(self, settings: BuildSettings, buckets):
        self.settings = settings
        self.buckets = buckets

    def target(self, size) -> tuple[int, int]:
        if self.buckets:
            return nearest_bucket(size[0], size[1], self.buckets)
        return self.settings.resolution, self.settings.resolution

    def scale(self, size) -> float:
        (w, h), (tw, th) = size, self.target(size)
        fit = min if self.settings.mode == "pad" else max
        return fit(tw / w, th / h)


def prepare_image(img: Image.Image, full_size, plan: CropPlan, detector=None) -> dict:
    """Crop/pad and resize `img` (upright; possibly decoded smaller than `full_size`).

    Returns the output image and its geometry in full-size source pixels:
    {"image", "crop_box", "pad_box", "bucket", "face_box", "warnings"}.
    """
    W, H = full_size
    tw, th = plan.target(full_size)
    s = plan.scale(full_size)
    fx, fy = img.width / W, img.height / H  # decoded pixels per source pixel
    warnings, face_box, pad_box = [], None, None
    if s > 1.0:
        warnings.append(f"smaller than the training size: {W}x{H} source for a {tw}x{th} output, upscaled "
                        f"{s:.2f}x (expect a softer image)")
    if plan.settings.mode == "pad":
        box = (0, 0, W, H)
        nw, nh = max(1, min(tw, round(W * s))), max(1, min(th, round(H * s)))
        inner = img.resize((nw, nh), Image.Resampling.LANCZOS)
        fill = tuple(int(round(c)) for c in np.asarray(inner, dtype=np.float64).reshape(-1, 3).mean(axis=0))
        out = Image.new("RGB", (tw, th), fill)  # the image's mean colour: the border adds no new colour
        left, top = (tw - nw) // 2, (th - nh) // 2
        out.paste(inner, (left, top))
        pad_box = (left, top, left + nw, top + nh)
    else:
        bw, bh = min(W, round(tw / s)), min(H, round(th / s))
        center = None
        if plan.settings.face_crop:
            face_box, note = _find_face(img, detector, fx, fy)
            if face_box is not None:
                center = (face_box[0] + face_box[2] / 2, face_box[1] + face_box[3] / 2)
            else:
                warnings.append(note)
        box = face_crop.crop_box(W, H, bw, bh, center)
        scaled = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        out = img.resize((tw, th), Image.Resampling.LANCZOS, box=scaled)
    return {"image": out, "crop_box": list(box), "pad_box": list(pad_box) if pad_box else None,
            "bucket": [tw, th] if plan.buckets else None, "face_box": list(face_box) if face_box else None,
            "warnings": warnings}


def _find_face(img, detector, fx, fy):
    """(largest face as (x, y, w, h) in source pixels, or None; the note when there is none)."""
    if detector is None:
        return None, "face crop needs OpenCV (pip install opencv-python-headless): centred instead"
    try:
        face = face_crop.largest_face(img, detector)
    except Exception as e:  # a broken OpenCV install must not stop the build
        return None, f"face detector failed ({e}): centred instead"
    if face is None:
        return None, "no face found: centred instead"
    x, y, w, h = face
    return (round(x / fx), round(y / fy), round(w / fx), round(h / fy)), None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)  # fast; no timestamps or text chunks: same pixels, same bytes
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
