"""Recognising an SD1.x checkpoint, and inferring its diffusers configs from the weights and saved hints."""
from __future__ import annotations

import json
import re

from . import ldm_keys
from .load_errors import SUPPORTED, ModelLoadError


def check_family(sd: dict, path: str) -> str:
    """"sd1" or "sdxl" (a base model: UNet with label_emb, CLIP-L and OpenCLIP-G); anything else is refused with a
    message that says what the file is."""
    def has(prefix):
        return any(k.startswith(prefix) for k in sd)

    unet = ldm_keys.UNET_PREFIX
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer.") \
            and has(unet + "label_emb."):
        return "sdxl"
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        kind = "an SDXL refiner checkpoint (OpenCLIP-G only): it refines images and is not trained here"
    elif has("conditioner.") or has(unet + "label_emb."):
        kind = "an SDXL-type checkpoint without both text encoders (or an SD2 unCLIP checkpoint)"
    elif has("cond_stage_model.model."):
        kind = "an SD2.x checkpoint (OpenCLIP text encoder)"
    elif has(unet + "joint_blocks.") or has(unet + "double_blocks.") or has(unet + "transformer_blocks."):
        kind = "a transformer-based model (SD3, Flux or similar)"
    elif not has(unet + "input_blocks.0.0."):
        if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k for k in sd):
            kind = "a LoRA (load it with a LoRA loader)"
        else:
            kind = "not a Stable Diffusion checkpoint (no model.diffusion_model.* UNet)"
    else:
        context = [v.shape[1] for k, v in sd.items() if k.startswith(unet) and k.endswith("attn2.to_k.weight")]
        if context and context[0] in (1024, 2048):
            kind = f"an SD2.x/SDXL-type UNet (cross-attention width {context[0]})"
        else:
            return "sd1"
    raise ModelLoadError(f"'{path}' is {kind}. {SUPPORTED}")


def read_hints(metadata: dict, path: str) -> dict:
    """Config values saved by this pack in the file's metadata (see ldm_keys.config_hints)."""
    raw = metadata.get(ldm_keys.HINTS_KEY)
    if not raw:
        return {}
    try:
        hints = json.loads(raw)
        assert isinstance(hints, dict) and all(isinstance(v, dict) for v in hints.values())
        return hints
    except (ValueError, AssertionError) as e:
        raise ModelLoadError(f"'{path}' has unreadable '{ldm_keys.HINTS_KEY}' metadata.") from e


def infer_unet_config(u: dict, hints: dict | None = None) -> dict:
    """A diffusers UNet2DConditionModel config from LDM UNet weights (keys without the prefix)."""
    hints = hints or {}
    levels, level = [], None
    for n in _indices(u, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in u:  # a downsampler closes the level
            level = None
            continue
        if level is None:
            level = {"channels": [], "attn": [], "depth": []}
            levels.append(level)
        level["channels"].append(u[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0])
        depth = len(_indices(u, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\."))
        level["attn"].append(depth > 0)
        level["depth"].append(depth)
    if not levels:
        raise ldm_keys.KeyMapError("no res blocks in input_blocks")
    for i, lv in enumerate(levels):
        if len(set(lv["channels"])) > 1 or len(set(lv["attn"])) > 1 or len(set(lv["depth"])) > 1:
            raise ldm_keys.KeyMapError(f"level {i} mixes res blocks of different kinds")
    channels = [lv["channels"][0] for lv in levels]
    layers = [len(lv["channels"]) for lv in levels]
    attn_depths = {lv["depth"][0] for lv in levels if lv["attn"][0]}
    depths = [lv["depth"][0] or 1 for lv in levels]  # levels without attention: any value does
    attn_keys = sorted(k for k in u if k.endswith("attn2.to_k.weight"))
    if not attn_keys:
        raise ldm_keys.KeyMapError("no cross-attention layers")
    proj_in = next(v for k, v in u.items() if k.endswith(".proj_in.weight"))

    # Up levels mirror the down levels; whether they attend is read from the output blocks.
    up_types, m = [], 0
    for level_layers in reversed(layers):
        attends = f"output_blocks.{m}.1.transformer_blocks.0.attn2.to_k.weight" in u
        up_types.append("CrossAttnUpBlock2D" if attends else "UpBlock2D")
        m += level_layers + 1
    if "middle_block.0.in_layers.0.weight" in u:
        if "middle_block.1.proj_in.weight" not in u:
            raise ldm_keys.KeyMapError("a mid block without attention")
        mid = "UNetMidBlock2DCrossAttn"
    else:
        mid = None
    conv_in = u["input_blocks.0.0.weight"]
    if conv_in.shape[0] != channels[0] or u["time_embed.0.weight"].shape[0] != 4 * channels[0]:
        raise ldm_keys.KeyMapError("conv_in or time embedding widths do not follow the SD1.x UNet")
    return {
        "sample_size": hints.get("sample_size", 64),
        "in_channels": conv_in.shape[1],
        "out_channels": u["out.2.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attn"][0] else "DownBlock2D" for lv in levels],
        "up_block_types": up_types,
        "mid_block_type": mid,
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "transformer_layers_per_block": attn_depths.pop() if len(attn_depths) == 1 else depths,
        "cross_attention_dim": u[attn_keys[0]].shape[1],
        "attention_head_dim": hints.get("attention_head_dim", 8),  # SD1.x: 8 heads (diffusers' legacy name)
        "norm_num_groups": _groups(hints.get("norm_num_groups"), channels),
        "use_linear_projection": proj_in.ndim == 2,
    }


def infer_sdxl_unet_config(u: dict, hints: dict, pooled_dim: int) -> dict:
    """infer_unet_config plus what SDXL adds: heads of 64 channels per level, and the added embedding of the
    pooled text (`pooled_dim` wide) and six size ids (the rest of label_emb's input, split in six)."""
    config = infer_unet_config(u, hints)
    added = u["label_emb.0.0.weight"].shape[1]
    if (added - pooled_dim) % 6 or added <= pooled_dim:
        raise ldm_keys.KeyMapError(f"label_emb takes {added} inputs, which is not the pooled text ({pooled_dim}) "
                                   f"plus six size embeddings")
    config.update(addition_embed_type="text_time", addition_time_embed_dim=(added - pooled_dim) // 6,
                  projection_class_embeddings_input_dim=added, sample_size=hints.get("sample_size", 128),
                  attention_head_dim=hints.get("attention_head_dim",
                                               [max(c // 64, 1) for c in config["block_out_channels"]]))
    return config


def infer_vae_config(v: dict, hints: dict | None = None) -> dict:
    """A diffusers AutoencoderKL config from LDM VAE weights (keys without the prefix)."""
    hints = hints or {}
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    channels = [v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels]
    config = {
        "in_channels": v["encoder.conv_in.weight"].shape[1],
        "out_channels": v["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": v["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": _groups(hints.get("norm_num_groups"), channels),
        "sample_size": hints.get("sample_size", 512),
    }
    if "scaling_factor" in hints:
        config["scaling_factor"] = float(hints["scaling_factor"])
    return config


def infer_text_config(t: dict, hints: dict, tokenizer, path: str) -> dict:
    """A CLIPTextConfig (as a dict) from text-encoder weights (keys without `text_model.`)."""
    try:
        vocab, hidden = t["embeddings.token_embedding.weight"].shape
        config = {
            "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": t["encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_hidden_layers": len(_indices(t, r"encoder\.layers\.(\d+)\.")),
            "max_position_embeddings": t["embeddings.position_embedding.weight"].shape[0],
        }
    except KeyError as e:
        raise ModelLoadError(f"'{path}': the text encoder lacks {e}; it is not a CLIP text model.") from e
    heads = int(hints.get("num_attention_heads", max(hidden // 64, 1)))  # CLIP: 64 channels per head
    if hidden % heads:
        raise ModelLoadError(f"'{path}': text encoder width {hidden} does not split into {heads} heads.")
    if len(tokenizer) > vocab:
        raise ModelLoadError(f"'{path}': its text encoder knows {vocab} tokens but the tokenizer has "
                             f"{len(tokenizer)}: the tokenizer does not belong to this model.")
    config.update(num_attention_heads=heads, hidden_act=hints.get("hidden_act", "quick_gelu"),
                  layer_norm_eps=float(hints.get("layer_norm_eps", 1e-5)), projection_dim=hidden,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return config


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _groups(hint, channels) -> int:
    """GroupNorm groups are not stored in the weights: SD uses 32, smaller models what divides."""
    if hint is not None:
        return int(hint)
    groups = 32
    while groups > 1 and any(c % groups for c in channels):
        groups //= 2
    return groups
