"""The training objective: the noise, timesteps and targets of a step, and the (min-SNR weighted) per-sample loss.

Every random draw of a step comes from one generator seeded by `step_seed`, so a resumed run repeats the same curve.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    """Every random draw of a step comes from this seed, so a resumed run repeats the same curve."""
    return (seed * 1_000_003 + step * 1009 + micro * 31 + process) % (2**63)


def diffusion_loss(cfg, unet, family, noise_scheduler, alphas_cumprod, latents, cond, batch, gen, device):
    """The loss of each sample (shape [batch]); the method reduces it (methods.base.TrainingMethod.loss)."""
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(noise)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, **family.unet_kwargs(cond, batch)).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.min_snr_gamma:
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        if noise_scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)
        loss = loss * weight
    return loss
