"""Aspect-ratio buckets: training sizes of about the same area, so wide and tall photos keep their shape.

The set follows kohya's `make_bucket_resolutions`: sides are multiples of `step`, the area
stays within resolution², and each width gets the tallest height that fits. Every image goes
to the bucket whose aspect ratio is nearest its own; batches are then drawn from one bucket.
"""
from __future__ import annotations

import math


class BucketError(ValueError):
    """Bucket settings that cannot give a bucket set; the message says what to change."""


def make_buckets(resolution: int, step: int = 64, min_ratio: float = 0.5, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets for `resolution`, sorted from the tallest to the widest.

    Every bucket has w*h <= resolution², sides divisible by `step`, and w/h within
    [min_ratio, max_ratio]. The square (resolution rounded down to `step`) is always in.
    """
    if step < 8 or step % 8:
        raise BucketError(f"Bucket step {step} must be a multiple of 8 (64 for SD; 8 latent cells).")
    if resolution < step:
        raise BucketError(f"Resolution {resolution} is smaller than the bucket step {step}: lower the step.")
    if not 0 < min_ratio <= 1 <= max_ratio:
        raise BucketError(f"Aspect-ratio limits must satisfy 0 < min <= 1 <= max, got {min_ratio} and {max_ratio}.")
    area = resolution * resolution
    side = resolution // step * step
    buckets = {(side, side)}
    width = step
    while width <= area // step:
        height = area // width // step * step
        if height >= step and min_ratio <= width / height <= max_ratio:
            buckets.add((width, height))
        width += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (in log space, so 2:1 and 1:2 weigh the same)."""
    if width <= 0 or height <= 0:
        raise BucketError(f"Image size {width}x{height} has no aspect ratio.")
    ratio = math.log(width / height)
    # Ties go to the larger bucket (less upscaling), then the first in the sorted set.
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def scale_bucket(bucket, built_resolution: int, resolution: int) -> tuple[int, int]:
    """A bucket made for `built_resolution`, resized for training at `resolution` with its aspect ratio kept.

    Sides round to multiples of 64 from 512 px up, the builder's default step (whole latent cells at
    the UNet's deepest level), and to multiples of 8 below, where a 64 step would turn most buckets
    into squares (diffusers' UNet handles any multiple of 8); a side is never below one step.
    """
    step = 64 if resolution >= 512 else 8
    scale = resolution / built_resolution
    width, height = (max(step, round(side * scale / step) * step) for side in bucket)
    return width, height
