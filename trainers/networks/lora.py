"""LoRA: W' = W + (alpha / rank) * up @ down, saved as kohya's `.lora_down.weight/.lora_up.weight/.alpha`.

LoCon is this network on the `locon` preset's conv targets.
"""
from __future__ import annotations

import torch

from .peft_network import ADAPTER, PeftNetwork
from .targets import TE_PREFIX, UNET_PREFIX, kohya_stem, text_encoder_targets, unet_targets  # noqa: F401


class LoraNetwork(PeftNetwork):
    name = "lora"
    module = "networks.lora"
    tensors = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}

    def peft_config(self, targets, rank, alpha, factor, rank_pattern, alpha_pattern):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    def alpha(self, layer):
        return layer.lora_alpha[ADAPTER]


NETWORK = LoraNetwork()


def attach(model, targets: list[str], rank: int, alpha: float):
    return NETWORK.attach(model, targets, rank, alpha)


def lora_layers(model):
    return NETWORK.layers(model)


def kohya_state_dict(unet, text_encoder=None, dtype=torch.float16) -> dict:
    return NETWORK.state_dict(unet, text_encoder, dtype)


def load_kohya(state_dict: dict, unet, text_encoder=None) -> list[str]:
    return NETWORK.load(state_dict, unet, text_encoder)
