"""Which modules a preset trains, and the kohya key stem each one is saved under (shared by every network type).

Saved names follow kohya's sd-scripts (`lora_unet_<diffusers module>` and `lora_te_text_model_<CLIP module>`,
dots as underscores), which ComfyUI's LoraLoader, A1111 and Civitai all read, for LoRA and LyCORIS alike.
"""
from __future__ import annotations

import re

import torch

# kohya's coverage: every Linear / 1x1 conv inside the transformer blocks; LoCon adds the resnets.
_ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TRANSFORMER = re.compile(r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$")
_CONV = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(downsamplers|upsamplers)\.0\.conv)$")
_TEXT = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"


def unet_targets(unet, preset: str) -> list[str]:
    """Full module names of the UNet layers a preset trains."""
    patterns = {"attn": [_ATTN], "kohya": [_TRANSFORMER], "locon": [_TRANSFORMER, _CONV]}[preset]
    return [name for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(p.search(name) for p in patterns)]


def text_encoder_targets(text_encoder) -> list[str]:
    return [name for name, module in text_encoder.named_modules()
            if isinstance(module, torch.nn.Linear) and _TEXT.search(name)]


def te_prefixes(count: int) -> list[str]:
    """kohya's prefix of each text encoder: `lora_te_` for one (SD1), `lora_te1_`, `lora_te2_` for SDXL's two."""
    return [TE_PREFIX] if count == 1 else [f"lora_te{i + 1}_" for i in range(count)]


def kohya_stem(module_name: str, prefix: str) -> str:
    if prefix.startswith("lora_te") and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name  # transformers 5 drops it; ComfyUI needs it
    return prefix + module_name.replace(".", "_")
