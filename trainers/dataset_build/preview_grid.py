"""A contact sheet of a dataset: each prepared image as a thumbnail with its caption written under it."""
from __future__ import annotations

import functools
import json
import os

from PIL import Image, ImageDraw, ImageFont

from ..core import path_policy
from ..data.items import MANIFEST_NAME

BACKGROUND = (30, 30, 30)
TEXT = (235, 235, 235)
DETAIL = (150, 150, 150)
PAD = 6


# Common system fonts with accented Latin, Greek and Cyrillic; Pillow's own font has basic Latin only.
_FONTS = ("DejaVuSans.ttf", "Arial.ttf", "arial.ttf", "Helvetica.ttc", "segoeui.ttf", "NotoSans-Regular.ttf")


@functools.lru_cache(maxsize=8)
def _font(size: int):
    for name in _FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last line ends in '...' when text is left over."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    words = []
    for word in text.split():
        while len(word) > 1 and measure(word, font=font) > width:  # wider than the cell: break it
            cut = len(word) - 1
            while cut > 1 and measure(word[:cut], font=font) > width:
                cut -= 1
            words.append(word[:cut])
            word = word[cut:]
        words.append(word)
    lines, line = [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if line and measure(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and measure(last + "...", font=font) > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def caption_grid(images, captions, details=None, columns: int = 4, cell: int = 192,
                 max_lines: int = 4, font_size: int = 13) -> Image.Image:
    """Thumbnails (aspect kept, fitted to cell x cell) in a grid; under each: a grey detail line, then the caption."""
    font = _font(font_size)
    line_h = font_size + 4
    details = details or [""] * len(images)
    n = max(1, len(images))
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    wrapped = [wrap(c or "(no caption)", font, cell, max_lines) for c in captions[:len(images)]]
    text_h = line_h * (1 + max((len(w) for w in wrapped), default=1)) + 4
    cell_w, cell_h = cell + 2 * PAD, cell + text_h + 2 * PAD
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if not images:
        draw.text((PAD, PAD), "(no images)", fill=TEXT, font=font)
    for k, (img, lines, detail) in enumerate(zip(images, wrapped, details)):
        x, y = (k % columns) * cell_w + PAD, (k // columns) * cell_h + PAD
        scale = cell / max(img.size)  # fit the cell, small images enlarged so captions stay legible
        thumb = img.convert("RGB").resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                          Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        ty = y + cell + 2
        if detail:
            draw.text((x, ty), detail, fill=DETAIL, font=font)
        for i, line in enumerate(lines):
            draw.text((x, ty + line_h * (i + 1)), line, fill=TEXT, font=font)
    return sheet


def dataset_preview(dataset_dir: str, max_images: int = 16, columns: int = 4, cell: int = 192) -> Image.Image:
    """The grid of a built dataset's first `max_images` items (size, bucket and repeats in the detail line)."""
    with open(os.path.join(dataset_dir, MANIFEST_NAME), encoding="utf-8") as f:
        items = json.load(f).get("items") or []
    images, captions, details = [], [], []
    for item in items[:max(1, max_images)]:
        path = os.path.join(dataset_dir, str(item.get("image") or ""))
        if not path_policy.is_inside(path, [os.path.realpath(dataset_dir)]):  # never show a file from elsewhere
            raise ValueError(f"Dataset manifest '{os.path.join(dataset_dir, MANIFEST_NAME)}' lists an image "
                             f"outside its folder ({item.get('image')!r}); build the dataset again.")
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
        captions.append(item.get("caption") or "")
        w, h = item.get("output_size") or images[-1].size
        repeats = item.get("repeats") or 1
        details.append(f"{w}x{h}" + (f"  x{repeats}" if repeats > 1 else ""))
    return caption_grid(images, captions, details, columns=columns, cell=cell)
