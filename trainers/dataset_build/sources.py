"""The input images of a build: a folder's images with their caption files, or in-memory pictures."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..core import safe_io
from ..data.captions import read_caption
from ..data.errors import DatasetError
from ..data.images import ImageError, list_images
from .settings import DatasetBuildError

NO_CAPTION, BAD_CAPTION = "no caption", "caption not used"  # notes about the caption, re-made every build


@dataclass
class Source:
    """One input image: a file, or a picture already in memory (a ComfyUI IMAGE)."""

    label: str  # what the manifest and messages call it: the file path, or "image 3"
    stem: str  # start of the output file names
    caption: str | None = None
    path: str | None = None
    image: Image.Image | None = field(default=None, repr=False)
    warnings: list = field(default_factory=list)

    def read(self) -> bytes:
        """The bytes whose hash identifies this source (file bytes, or the raw pixels)."""
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ImageError(self.path, f"cannot read the file ({e.strerror or e})") from e
        arr = np.asarray(self.image.convert("RGB"))
        return f"{arr.shape}".encode() + arr.tobytes()


def folder_sources(folder: str, caption_ext: str = ".txt") -> tuple[list[Source], list[tuple[str, str]]]:
    """The images directly in `folder` with their captions, and (path, reason) for the non-images."""
    paths, skipped = list_images(folder)
    sources = []
    for path in paths:
        src = Source(label=shown(path), stem=_stem(os.path.basename(path)), path=path)
        caption_path = os.path.splitext(path)[0] + caption_ext
        if os.path.isfile(caption_path):
            try:
                src.caption = read_caption(caption_path)
            except DatasetError as e:
                src.warnings.append(shown(f"{BAD_CAPTION}: {e}"))
        sources.append(src)
    return sources, [(shown(path), shown(reason)) for path, reason in skipped]


def image_sources(images, captions) -> list[Source]:
    """Sources for in-memory PIL images; captions: one per image (None or a shorter list: no caption)."""
    captions = list(captions or [])
    if len(captions) > len(images):
        raise DatasetBuildError(f"{len(captions)} captions for {len(images)} images: give one caption per image.")
    captions += [None] * (len(images) - len(captions))
    width = max(4, len(str(len(images))))
    return [Source(label=f"image {i}", stem=f"image_{i:0{width}d}", caption=c, image=img)
            for i, (img, c) in enumerate(zip(images, captions))]


def _stem(name: str) -> str:
    # Bytes, not characters: 80 emoji are 320 bytes, and most file systems allow 255 per name.
    return safe_io.sanitize_name(os.path.splitext(name)[0], default="image", max_bytes=80)


def shown(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name (lone surrogates from os.listdir) as \\xNN:
    a label that UTF-8 files, JSON and logs accept."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates no file name decodes to
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")
