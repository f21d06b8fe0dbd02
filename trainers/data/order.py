"""Batch order: which items each training step sees, a function of (seed, step) only, so resumes repeat it."""
from __future__ import annotations

import functools

import numpy as np


def epoch_order(n_items: int, epoch: int, seed: int) -> np.ndarray:
    """The item order of one epoch; the same for the same (seed, epoch) on any run."""
    rng = np.random.default_rng([int(seed) & (2**64 - 1), int(epoch)])
    return rng.permutation(n_items)


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of training step `step` (0-based), walking one shuffled order per epoch.

    A function of its arguments only, so a run resumed at step s sees exactly the
    batches an uninterrupted run would have seen.
    """
    if n_items < 1 or batch_size < 1 or step < 0:
        raise ValueError(f"batch_indices needs n_items >= 1, batch_size >= 1, step >= 0 "
                         f"(got {n_items}, {batch_size}, {step}).")
    orders, out = {}, []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(position, n_items)
        if epoch not in orders:
            orders[epoch] = epoch_order(n_items, epoch, seed)
        out.append(int(orders[epoch][k]))
    return out


def uses_bucket_batches(items) -> bool:
    """True when items carry buckets or repeats: batches then come from bucket_batch_indices."""
    return any(getattr(it, "bucket", None) is not None or getattr(it, "repeats", 1) != 1 for it in items)


def bucket_batch_indices(buckets, repeats, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of training step `step` when every batch must come from one bucket.

    buckets: per item, a hashable bucket (None counts as one bucket of its own); repeats:
    per item, how often it appears per epoch. Each epoch shuffles every bucket's items
    (repeats included), cuts them into batches of `batch_size`, fills a bucket's last,
    short batch from the start of that bucket's order (so every batch is full and stacks),
    and shuffles the batches. Like batch_indices, a function of its arguments only:
    a resumed run sees exactly the batches of an uninterrupted one.
    """
    buckets, repeats = tuple(buckets), tuple(int(r) for r in repeats)
    if not buckets or len(buckets) != len(repeats) or batch_size < 1 or step < 0 or min(repeats) < 1:
        raise ValueError(f"bucket_batch_indices needs items, one repeats value >= 1 per item, batch_size >= 1 "
                         f"and step >= 0 (got {len(buckets)} items, {len(repeats)} repeats, {batch_size}, {step}).")
    counts: dict = {}
    for b, r in zip(buckets, repeats):
        counts[b] = counts.get(b, 0) + r
    per_epoch = sum(-(-n // batch_size) for n in counts.values())
    epoch, k = divmod(step, per_epoch)
    return list(_bucket_epoch(buckets, repeats, batch_size, epoch, int(seed))[k])


@functools.lru_cache(maxsize=4)
def _bucket_epoch(buckets: tuple, repeats: tuple, batch_size: int, epoch: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng([seed & (2**64 - 1), epoch, 1])  # its own stream: not batch_indices' order
    groups: dict = {}
    for i, b in enumerate(buckets):  # buckets in order of first appearance: deterministic
        groups.setdefault(b, []).extend([i] * repeats[i])
    batches = []
    for members in groups.values():
        order = rng.permutation(np.asarray(members))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if len(chunk) < batch_size:
                chunk = np.concatenate([chunk, np.resize(order, batch_size - len(chunk))])
            batches.append(tuple(int(i) for i in chunk))
    return [batches[j] for j in rng.permutation(len(batches))]
