"""A loss-curve picture drawn with PIL alone (no matplotlib): for the node output and the progress preview."""
from __future__ import annotations

from PIL import Image, ImageDraw


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def log_curve(records: list[dict], width: int = 512, height: int = 256) -> Image.Image:
    """The curve of a run's step records ({"step", "loss", "lr", "time"} and whatever its method logs beside)."""
    names = [k for k in (records[0] if records else {}) if k not in ("step", "loss", "lr", "time")]
    return loss_curve([r["step"] for r in records], [r["loss"] for r in records], width, height,
                      extra={k: [r.get(k, float("nan")) for r in records] for k in names})


_SERIES_COLOURS = [(110, 200, 120), (220, 100, 160), (120, 200, 230)]


def loss_curve(steps: list[int], losses: list[float], width: int = 512, height: int = 256,
               title: str = "loss", extra: dict | None = None) -> Image.Image:
    """The loss (raw and smoothed) and, smoothed, any `extra` series ({name: values per step}, e.g. a method's
    instance and prior loss), each in its own colour with its name in the legend."""
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 48, 24, width - 12, height - 24
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 100))
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill=(200, 200, 200))
        return img
    extra = {k: v for k, v in (extra or {}).items() if len(v) == len(losses)}
    lo = min([*losses, *(x for v in extra.values() for x in v)])
    hi = max([*losses, *(x for v in extra.values() for x in v)])
    span = (hi - lo) or 1.0
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(s, v):
        return (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / span * (bottom - top))

    if len(losses) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(90, 110, 160), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth(losses))], fill=(250, 180, 60), width=2)
        for (name, values), colour in zip(extra.items(), _SERIES_COLOURS):
            draw.line([xy(s, v) for s, v in zip(steps, smooth(values))], fill=colour, width=1)
    for n, ((name, values), colour) in enumerate(zip(extra.items(), _SERIES_COLOURS)):
        draw.text((right - 150, top + 6 + 12 * n), f"{name} {values[-1]:.4f}", fill=colour)
    draw.text((left, 4), f"{title}  step {steps[-1]}  last {losses[-1]:.4f}", fill=(230, 230, 230))
    draw.text((4, top), f"{hi:.3g}", fill=(160, 160, 160))
    draw.text((4, bottom - 10), f"{lo:.3g}", fill=(160, 160, 160))
    draw.text((left, bottom + 6), str(s0), fill=(160, 160, 160))
    draw.text((right - 30, bottom + 6), str(s1), fill=(160, 160, 160))
    return img
