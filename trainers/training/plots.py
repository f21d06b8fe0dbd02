"""A loss-curve picture drawn with PIL alone (no matplotlib): for the node output and the progress preview."""
from __future__ import annotations

from PIL import Image, ImageDraw


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def loss_curve(steps: list[int], losses: list[float], width: int = 512, height: int = 256,
               title: str = "loss") -> Image.Image:
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 48, 24, width - 12, height - 24
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill=(200, 200, 200))
        return img
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(s, v):
        return (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / span * (bottom - top))

    if len(losses) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(90, 110, 160), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth(losses))], fill=(250, 180, 60), width=2)
    draw.text((left, 4), f"{title}  step {steps[-1]}  last {losses[-1]:.4f}", fill=(230, 230, 230))
    draw.text((4, top), f"{hi:.3g}", fill=(160, 160, 160))
    draw.text((4, bottom - 10), f"{lo:.3g}", fill=(160, 160, 160))
    draw.text((left, bottom + 6), str(s0), fill=(160, 160, 160))
    draw.text((right - 30, bottom + 6), str(s1), fill=(160, 160, 160))
    return img
