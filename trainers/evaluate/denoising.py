"""Quick, deterministic measures of a trained model (the DreamBench metrics come with their issue)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def denoising_loss(comps, latents: torch.Tensor, texts: list[str], *, seed: int = 0,
                   timesteps=(100, 300, 500, 700, 900)) -> float:
    """Mean epsilon-prediction error of `comps.unet` on these latents and captions, with fixed noise
    and timesteps, so two models (base vs trained) are compared on identical draws."""
    from ..families.registry import get_family
    from ..methods.base import Batch

    family = get_family(comps.family)
    scheduler = comps.noise_scheduler()
    device = next(comps.unet.parameters()).device
    cond = family.encode(comps, texts).to(device)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=gen)
        tt = torch.full((latents.shape[0],), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, tt)
        batch = Batch(latents=noisy, texts=texts, items=[None] * len(texts))  # no source geometry: uncropped
        pred = comps.unet(noisy.to(device), tt.to(device), **family.unet_kwargs(cond, batch)).sample
        total += F.mse_loss(pred.float().cpu(), noise).item()
    return total / len(timesteps)
