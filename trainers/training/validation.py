"""Images from the model being trained: validation images, and the class images of prior preservation."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_images(comps, unet, prompts: list[str], seeds: list[int], *, resolution: int, steps: int, device,
                  guidance_scale: float = 7.5, negative_prompt: str = "", dtype=None) -> list:
    """One image per prompt with the current weights (a LoRA active), each from its own seed, as PIL images.
    DPM-Solver++, so 20-25 steps suffice. `dtype`: compute under autocast in it (default: the UNet's dtype)."""
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
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        dtype = dtype or next(unet.parameters()).dtype
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe(prompts, negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                           height=resolution, width=resolution, num_inference_steps=steps, output_type="latent",
                           guidance_scale=guidance_scale, generator=generators).images
        # Decoded in fp32, outside autocast: SDXL's VAE overflows to NaN (black images) in fp16.
        vae = comps.vae
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        images = vae.decode(latents + shift if shift else latents).sample
        return pipe.image_processor.postprocess(images, output_type="pil")
    finally:
        for model, where in zip(moved, devices):
            model.to(where)


def sample_image(comps, unet, prompt: str, *, seed: int, **settings):
    """One image for `prompt` (see sample_images)."""
    return sample_images(comps, unet, [prompt], [seed], **settings)[0]
