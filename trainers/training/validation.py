"""Validation images during training, from the model being trained."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_image(comps, unet, prompt: str, *, resolution: int, steps: int, seed: int, device,
                 guidance_scale: float = 7.5, negative_prompt: str = ""):
    """One image for `prompt` with the current weights (LoRA active), as a PIL image."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ..families.components import SD_SCHEDULER_CONFIG

    scheduler = DPMSolverMultistepScheduler(prediction_type=comps.prediction_type,
                                            **{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"})
    vae_device = comps.vae.device
    te_device = comps.text_encoder.device
    comps.vae.to(device)
    comps.text_encoder.to(device)
    try:
        pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(seed)
        dtype = next(unet.parameters()).dtype
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            image = pipe(prompt, negative_prompt=negative_prompt or None, height=resolution, width=resolution,
                         num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]
    finally:
        comps.vae.to(vae_device)
        comps.text_encoder.to(te_device)
    return image
