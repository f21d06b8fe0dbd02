"""LoRA on the UNet and text encoder: which modules, attaching with peft, and kohya-format files.

Saved names follow kohya's sd-scripts (`lora_unet_<diffusers module>` and
`lora_te_text_model_<CLIP module>`, dots as underscores, `.lora_down/.lora_up/.alpha`),
which ComfyUI's LoraLoader, A1111 and Civitai all read.
"""
from __future__ import annotations

import re

import torch

ADAPTER = "default"

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


def attach(model, targets: list[str], rank: int, alpha: float):
    """Add a trainable LoRA adapter to `model` on exactly these modules; base weights stay frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_layers(model):
    """(module name, peft LoRA layer) for every adapted module of `model`."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            yield name, module


def kohya_stem(module_name: str, prefix: str) -> str:
    if prefix == TE_PREFIX and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name  # transformers 5 drops it; ComfyUI needs it
    return prefix + module_name.replace(".", "_")


def kohya_state_dict(unet, text_encoder=None, dtype=torch.float16) -> dict:
    """The adapters as kohya tensors: down = peft A, up = peft B, alpha as trained."""
    out = {}
    for model, prefix in ((unet, UNET_PREFIX), (text_encoder, TE_PREFIX)):
        if model is None:
            continue
        for name, layer in lora_layers(model):
            stem = kohya_stem(name, prefix)
            out[f"{stem}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype)
            out[f"{stem}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype)
            out[f"{stem}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]))
    return out


def load_kohya(state_dict: dict, unet, text_encoder=None) -> list[str]:
    """Copy kohya tensors into adapters already attached to the models; returns the stems it did not use."""
    layers = {}
    for model, prefix in ((unet, UNET_PREFIX), (text_encoder, TE_PREFIX)):
        if model is not None:
            layers.update({kohya_stem(name, prefix): layer for name, layer in lora_layers(model)})
    stems = {k.split(".")[0] for k in state_dict}
    for stem in stems & layers.keys():
        layer = layers[stem]
        down = layer.lora_A[ADAPTER].weight
        with torch.no_grad():
            down.copy_(state_dict[f"{stem}.lora_down.weight"].to(down.dtype))
            up = layer.lora_B[ADAPTER].weight
            up.copy_(state_dict[f"{stem}.lora_up.weight"].to(up.dtype))
        if f"{stem}.alpha" in state_dict:
            rank = down.shape[0]
            layer.scaling[ADAPTER] = float(state_dict[f"{stem}.alpha"]) / rank
    return sorted(stems - layers.keys())
