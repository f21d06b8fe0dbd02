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
    """ComfyUI IMAGE [B,H,W,C] -> list of PIL RGB images."""
    arr = (image.detach().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a[..., :3]) for a in arr]


def blank_image(size: int = 64) -> torch.Tensor:
    return torch.zeros((1, size, size, 3), dtype=torch.float32)
