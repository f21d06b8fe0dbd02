"""Conversions between ComfyUI's IMAGE tensors and PIL images."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_image(images) -> torch.Tensor:
    """PIL image(s) -> ComfyUI IMAGE [B,H,W,C] float in 0..1."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def image_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B,H,W,C] (or one [H,W,C]) floats in 0..1 -> list of 8-bit PIL RGB images.

    Any float dtype (fp16, bf16); a 1-channel image becomes grey RGB, a 4th (alpha) channel is dropped.
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    arrays = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for a in arrays:
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        out.append(Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB"))
    return out


def blank_image(size: int = 64) -> torch.Tensor:
    return torch.zeros((1, size, size, 3), dtype=torch.float32)
