"""Which items a step trains on: this process's share of the global batch, and buckets fitted to the resolution."""
from __future__ import annotations

import dataclasses
from collections import Counter

from ..core.config import TrainConfig
from ..data import order
from ..dataset_build.buckets import scale_bucket


def process_batch(items, cfg: TrainConfig, micro_step: int, accelerator) -> list[int]:
    """This process's share of the global batch; a bucketed dataset draws the whole global batch from one bucket."""
    per = cfg.batch_size
    total = per * accelerator.num_processes
    if order.uses_bucket_batches(items):
        indices = order.bucket_batch_indices([it.bucket for it in items], [it.repeats for it in items],
                                               total, micro_step, cfg.seed)
    else:
        indices = order.batch_indices(len(items), total, micro_step, cfg.seed)
    return indices[accelerator.process_index * per:(accelerator.process_index + 1) * per]


def fit_buckets(items, built_at: int | None, resolution: int) -> tuple[list, list[str]]:
    """Buckets of a dataset built at another resolution, scaled to `resolution` (aspect kept), and a note."""
    if not built_at or built_at == resolution or not any(it.bucket for it in items):
        return items, []
    items = [dataclasses.replace(it, bucket=scale_bucket(it.bucket, built_at, resolution)) if it.bucket else it
             for it in items]
    sizes = ", ".join(f"{size} x{n}" for size, n in train_sizes(items, resolution).items())
    return items, [f"Dataset built at {built_at} px, trained at {resolution} px: buckets scaled to {sizes}."]


def train_sizes(items, resolution: int) -> dict[str, int]:
    """Images per trained size "WxH": its bucket, or the square crop."""
    return dict(Counter(f"{w}x{h}" for w, h in sorted(it.bucket or (resolution, resolution) for it in items)))
