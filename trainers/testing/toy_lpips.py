"""Random LPIPS weight files in the layout `load_lpips` reads, for tests: no download, no torchvision."""
from __future__ import annotations

import math
import os

import torch
from safetensors.torch import save_file

from ..evaluate.lpips import LPIPS


def toy_lpips_tensors(seed: int = 0) -> tuple[dict, dict]:
    """(AlexNet `features.*` tensors, lpips `lin{i}.model.1.weight` tensors), random but well scaled: conv weights
    ~ N(0, 2/fan_in) so activations neither vanish nor blow up through five layers; lin weights >= 0 with
    lpips' mean (~0.1)."""
    gen = torch.Generator().manual_seed(seed)
    backbone, lin = {}, {}
    for key, ref in LPIPS().state_dict().items():
        if key.startswith("net."):
            std = math.sqrt(2 / ref[0].numel()) if key.endswith(".weight") else 0.01
            backbone[key[len("net."):]] = torch.randn(ref.shape, generator=gen) * std
        else:
            lin[key] = torch.rand(ref.shape, generator=gen) * 0.2
    return backbone, lin


def save_toy_lpips(folder: str, seed: int = 0) -> str:
    """Write random `alexnet.safetensors` and `lin.safetensors` into `folder`; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    backbone, lin = toy_lpips_tensors(seed)
    save_file(backbone, os.path.join(folder, "alexnet.safetensors"))
    save_file(lin, os.path.join(folder, "lin.safetensors"))
    return folder
