"""Pictures of a comparison, drawn with PIL alone: a bar chart per metric and a labelled image grid."""
from __future__ import annotations

import math
import textwrap

from PIL import Image, ImageDraw

_BG, _FG, _DIM = (24, 24, 28), (230, 230, 230), (150, 150, 160)
_BARS = [(250, 180, 60), (110, 200, 120), (120, 170, 240), (220, 100, 160), (180, 140, 250), (120, 210, 210)]


def bar_chart(title: str, values: dict[str, float], note: str = "", width: int = 512, height: int = 256):
    """One bar per model (NaN or missing: no bar), the value written on it; the axis starts at 0 (or the lowest
    negative value) so bars compare by length."""
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    draw.text((12, 6), f"{title}  {note}".strip(), fill=_FG)
    shown = {k: v for k, v in values.items() if v is not None and not math.isnan(v)}
    if not shown:
        draw.text((12, height // 2), "no values", fill=_DIM)
        return img
    lo, hi = min(0.0, *shown.values()), max(0.0, *shown.values())
    span = (hi - lo) or 1.0
    left, top, right, bottom = 12, 28, width - 12, height - 34
    slot = (right - left) / len(values)
    zero = bottom - (0 - lo) / span * (bottom - top)
    draw.line([(left, zero), (right, zero)], fill=_DIM)
    for i, (label, value) in enumerate(values.items()):
        x0, x1 = left + i * slot + slot * 0.15, left + (i + 1) * slot - slot * 0.15
        if label in shown:
            y = bottom - (value - lo) / span * (bottom - top)
            draw.rectangle([x0, min(y, zero), x1, max(y, zero)], fill=_BARS[i % len(_BARS)])
            draw.text((x0, min(y, zero) - 12), f"{value:.3f}", fill=_FG)
        draw.text((x0, bottom + 6), textwrap.shorten(label, max(4, int(slot / 7)), placeholder=".."), fill=_FG)
    return img


def image_grid(columns: dict[str, list], prompts: list[str], cell: int = 192, label_width: int = 180):
    """Rows: prompts; columns: models (their first image for each prompt), each labelled."""
    head = 22
    img = Image.new("RGB", (label_width + cell * len(columns), head + cell * len(prompts)), _BG)
    draw = ImageDraw.Draw(img)
    for c, (label, per_prompt) in enumerate(columns.items()):
        draw.text((label_width + c * cell + 6, 5), textwrap.shorten(label, cell // 7, placeholder=".."), fill=_FG)
        for r, images in enumerate(per_prompt):
            if images:
                thumb = images[0].convert("RGB")
                thumb.thumbnail((cell - 4, cell - 4))
                img.paste(thumb, (label_width + c * cell + 2, head + r * cell + 2))
    for r, prompt in enumerate(prompts):
        for n, line in enumerate(textwrap.wrap(prompt, label_width // 7)[:cell // 14]):
            draw.text((6, head + r * cell + 6 + 14 * n), line, fill=_DIM)
    return img
