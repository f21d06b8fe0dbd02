"""Validation images during training, from the model being trained."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_image(comps, unet, prompt: str, *, resolution: int, steps: int, seed: int, device,
                 guidance_scale: float = 7.5, negative_prompt: str = ""):
    """One image for `prompt` with the current weights (LoRA active), as a PIL image."""
    from diffusers import DPMSolverMultistepScheduler

    from ..families.components import SD_SCHEDULER_CONFIG
    from ..families.registry import get_family

    scheduler = DPMSolverMultistepScheduler(prediction_type=comps.prediction_type,
                                            **{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"})
    moved = [comps.vae, *comps.text_encoders]
    devices = [m.device for m in moved]
    for model in moved:
        model.to(device)
    try:
        pipe = get_family(comps.family).pipeline(comps, unet, scheduler)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(seed)
        dtype = next(unet.parameters()).dtype
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            image = pipe(prompt, negative_prompt=negative_prompt or None, height=resolution, width=resolution,
                         num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]
    finally:
        for model, where in zip(moved, devices):
            model.to(where)
    return image
