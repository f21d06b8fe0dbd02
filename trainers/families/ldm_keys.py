"""Names of SD1.x and SDXL UNet and VAE weights in diffusers and in the original LDM (CompVis / SGM) single-file
layout (SDXL's text encoders: sdxl_text_keys.py).

Single-file checkpoints (what ComfyUI's CheckpointLoaderSimple reads) keep the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.` and the CLIP text encoder under
`cond_stage_model.transformer.text_model.`. The UNet map is built from the UNet config (levels,
res blocks per level, which levels attend, mid block or not), so pruned layouts such as BK-SDM
(one res block per level, no mid block) map as well as SD1.5.

The parameter lists come from the diffusers model itself, built on the meta device (no memory,
no weights), so every parameter is covered and nothing is guessed.
"""
from __future__ import annotations

import functools
import json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # + "text_model." in the files we write
TEXT_MODEL = "text_model."

# Safetensors metadata that carries what the weights cannot tell (GroupNorm groups, head counts).
HINTS_KEY = "personalize.config_hints"

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# The VAE mid-block attention projections: 1x1 convs in LDM files, linear layers in diffusers.
_VAE_PROJECTIONS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)


class KeyMapError(ValueError):
    """A state dict or config that does not fit the SD1.x LDM layout."""


# ---------------------------------------------------------------- module prefix tables
def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * levels


def _unet_layout(config) -> tuple:
    """The part of a UNet config that decides its key names, as a hashable tuple."""
    down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    bad = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
    if bad or mid not in _MID_TYPES or len(down) != len(up):
        raise KeyMapError(f"UNet blocks {down} / {mid} / {up} are not an SD1.x layout: "
                          f"supported are {_DOWN_TYPES}, {_UP_TYPES} and mid {_MID_TYPES}.")
    for field in ("class_embed_type", "encoder_hid_dim_type"):
        if config.get(field) is not None:
            raise KeyMapError(f"UNet config has {field}={config[field]!r}; SD1.x and SDXL UNets have none.")
    addition = config.get("addition_embed_type")
    if addition not in (None, "text_time"):  # SDXL: pooled text and size ids, LDM's label_emb
        raise KeyMapError(f"UNet config has addition_embed_type={addition!r}; only SDXL's 'text_time' maps.")
    return down, up, mid, tuple(_per_level(config["layers_per_block"], len(down))), addition is not None


@functools.lru_cache(maxsize=32)
def _unet_prefixes(layout: tuple) -> dict[str, tuple[str, dict | None]]:
    """diffusers module -> (LDM module, renames of its children)."""
    down, up, mid, layers, label_emb = layout
    table = {"conv_in": ("input_blocks.0.0", None), "time_embedding.linear_1": ("time_embed.0", None),
             "time_embedding.linear_2": ("time_embed.2", None), "conv_norm_out": ("out.0", None),
             "conv_out": ("out.2", None)}
    if label_emb:
        table.update({"add_embedding.linear_1": ("label_emb.0.0", None),
                      "add_embedding.linear_2": ("label_emb.0.2", None)})
    n = 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(down):
        for j in range(layers[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", _UNET_RESNET)
            if kind.startswith("CrossAttn"):
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", None)
            n += 1
        if i < len(down) - 1:  # every level but the last ends in a downsampler block of its own
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", None)
            n += 1
    if mid is not None:
        table["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
        table["mid_block.attentions.0"] = ("middle_block.1", None)
        table["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET)
    m = 0
    for u, kind in enumerate(up):
        attends = kind.startswith("CrossAttn")
        count = layers[len(up) - 1 - u] + 1  # up blocks have one res block more than their level
        for j in range(count):
            table[f"up_blocks.{u}.resnets.{j}"] = (f"output_blocks.{m}.0", _UNET_RESNET)
            if attends:
                table[f"up_blocks.{u}.attentions.{j}"] = (f"output_blocks.{m}.1", None)
            if j == count - 1 and u < len(up) - 1:  # the upsampler follows the level's last block
                table[f"up_blocks.{u}.upsamplers.0.conv"] = (f"output_blocks.{m}.{2 if attends else 1}.conv", None)
            m += 1
    return table


@functools.lru_cache(maxsize=32)
def _vae_prefixes(levels: int, layers: int) -> dict[str, tuple[str, dict | None]]:
    table = {name: (name, None) for name in ("quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_in"] = (f"{side}.conv_in", None)
        table[f"{side}.conv_out"] = (f"{side}.conv_out", None)
        table[f"{side}.conv_norm_out"] = (f"{side}.norm_out", None)
        table[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", _VAE_RESNET)
        table[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", _VAE_RESNET)
        table[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTENTION)
    for i in range(levels):
        for j in range(layers):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)
        ldm = levels - 1 - i  # LDM numbers decoder levels from the lowest resolution up: reversed
        for j in range(layers + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{ldm}.block.{j}", _VAE_RESNET)
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{ldm}.upsample.conv", None)
    return table


def _translate(table: dict, name: str) -> str:
    """Map a diffusers module or parameter name through the longest matching prefix."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        entry = table.get(".".join(parts[:cut]))
        if entry is None:
            continue
        ldm, renames = entry
        rest = ".".join(parts[cut:])
        for src, dst in (renames or {}).items():
            if rest == src or rest.startswith(src + "."):
                rest = dst + rest[len(src):]
                break
        return f"{ldm}.{rest}" if rest else ldm
    raise KeyMapError(f"'{name}' has no place in the LDM layout of this model.")


# ---------------------------------------------------------------- parameter maps
def _config_key(config) -> str:
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=list)


@functools.lru_cache(maxsize=16)
def _meta_keys(kind: str, config_json: str) -> tuple[str, ...]:
    """The state-dict keys of a diffusers model with this config, built without memory."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if kind == "unet" else AutoencoderKL
    with torch.device("meta"):
        model = cls.from_config(json.loads(config_json))
    return tuple(model.state_dict().keys())


def unet_diffusers_to_ldm(config) -> dict[str, str]:
    """Every UNet parameter: diffusers key -> LDM key (without `model.diffusion_model.`)."""
    table = _unet_prefixes(_unet_layout(config))
    return {key: _translate(table, key) for key in _meta_keys("unet", _config_key(config))}


def vae_diffusers_to_ldm(config) -> dict[str, str]:
    """Every VAE parameter: diffusers key -> LDM key (without `first_stage_model.`)."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise KeyMapError(f"VAE layers_per_block {layers!r}: the LDM VAE has the same count on every level.")
    table = _vae_prefixes(len(config["block_out_channels"]), layers)
    return {key: _translate(table, key) for key in _meta_keys("vae", _config_key(config))}


def ldm_module_name(config, name: str) -> str:
    """The LDM name of a diffusers UNet module (or parameter), e.g. for LoRA key names.

    ldm_module_name(cfg, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    -> "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    """
    return _translate(_unet_prefixes(_unet_layout(config)), name)


def text_diffusers_key(ldm_key: str) -> str:
    """`cond_stage_model.transformer[.text_model].X` -> `X` (the transformers 5 CLIPTextModel key)."""
    key = ldm_key[len(TEXT_PREFIX):] if ldm_key.startswith(TEXT_PREFIX) else ldm_key
    return key[len(TEXT_MODEL):] if key.startswith(TEXT_MODEL) else key


def text_ldm_key(key: str) -> str:
    """A CLIPTextModel key (with or without `text_model.`) -> its single-file name."""
    key = key[len(TEXT_MODEL):] if key.startswith(TEXT_MODEL) else key
    return TEXT_PREFIX + TEXT_MODEL + key


def _is_vae_projection(diffusers_key: str) -> bool:
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith(_VAE_PROJECTIONS)


# ---------------------------------------------------------------- converters
def ldm_to_diffusers(state_dict: dict, unet_config, vae_config) -> dict[str, dict]:
    """Split an LDM single-file state dict into diffusers state dicts: {"unet", "vae", "text_encoder"}.

    UNet and VAE are checked strictly against the configs (missing or unknown keys raise
    KeyMapError); text-encoder keys come back without `text_model.` and are checked when loaded.
    Keys outside the three models (EMA copies, noise-schedule buffers) are ignored.
    """
    parts = {"unet": _part_to_diffusers(state_dict, "unet", UNET_PREFIX, unet_diffusers_to_ldm(unet_config)),
             "vae": vae_to_diffusers(state_dict, vae_config), "text_encoder": {}}
    for k, tensor in state_dict.items():
        if k.startswith(TEXT_PREFIX) and not _ignorable(k):
            parts["text_encoder"][text_diffusers_key(k)] = tensor
    return parts


def vae_to_diffusers(state_dict: dict, vae_config) -> dict:
    """The VAE's tensors (LDM names under first_stage_model.) by their diffusers names, checked strictly."""
    return _part_to_diffusers(state_dict, "vae", VAE_PREFIX, vae_diffusers_to_ldm(vae_config))


def _part_to_diffusers(state_dict: dict, part: str, prefix: str, mapping: dict) -> dict:
    wanted = {prefix + ldm: key for key, ldm in mapping.items()}
    present = {k for k in state_dict if k.startswith(prefix) and not _ignorable(k)}
    missing, unknown = sorted(set(wanted) - present), sorted(present - set(wanted))
    if missing or unknown:
        raise KeyMapError(mismatch_message(part, missing, unknown))
    out = {}
    for ldm_key, key in wanted.items():
        tensor = state_dict[ldm_key]
        if part == "vae" and _is_vae_projection(key) and tensor.ndim == 4:  # 1x1 convs in LDM, linear here
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[key] = tensor
    return out


PARTS = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}  # model -> its LDM key prefix
SDXL_TEXT_PREFIXES = {"text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}
ALL_PARTS = (*PARTS, "text_encoder_2")  # SDXL's second text encoder (OpenCLIP-G) is a part of its own


def part_prefix(components, part: str) -> str:
    """Where a part's keys live in this model's single file."""
    sdxl = getattr(components, "text_encoder_2", None) is not None
    return SDXL_TEXT_PREFIXES[part] if sdxl and part in SDXL_TEXT_PREFIXES else PARTS[part]


def diffusers_to_ldm(components, dtype=None, parts=ALL_PARTS) -> dict:
    """One LDM single-file state dict from diffusers components (anything with unet, vae, text_encoder), or
    only these `parts` of it (SDXL: "text_encoder" is CLIP-L, "text_encoder_2" OpenCLIP-G)."""
    out = {}
    for part in ("unet", "vae"):
        if part not in parts:
            continue
        model = getattr(components, part)
        sd = model.state_dict()
        mapping = (unet_diffusers_to_ldm if part == "unet" else vae_diffusers_to_ldm)(model.config)
        missing, unknown = sorted(set(mapping) - set(sd)), sorted(set(sd) - set(mapping))
        if missing or unknown:  # e.g. a LoRA still attached: merge or remove it first
            raise KeyMapError(mismatch_message(f"diffusers {part}", missing, unknown))
        for key, tensor in sd.items():
            if part == "vae" and _is_vae_projection(key) and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            out[PARTS[part] + mapping[key]] = tensor
    if getattr(components, "text_encoder_2", None) is not None:  # SDXL: CLIP-L, OpenCLIP-G
        from .sdxl_text_keys import clip_g_to_ldm, clip_l_to_ldm

        if "text_encoder" in parts:
            out.update(clip_l_to_ldm(components.text_encoder.state_dict()))
        if "text_encoder_2" in parts:
            out.update(clip_g_to_ldm(components.text_encoder_2.state_dict()))
    elif "text_encoder" in parts:
        for key, tensor in components.text_encoder.state_dict().items():
            if not key.endswith("position_ids"):  # a buffer rebuilt by every loader
                out[text_ldm_key(key)] = tensor
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def config_hints(components) -> dict[str, str]:
    """Safetensors metadata with the config values the weights do not show, for our own loader."""
    unet, vae, text = components.unet.config, components.vae.config, components.text_encoder.config
    hints = {
        "unet": {"norm_num_groups": unet["norm_num_groups"], "attention_head_dim": unet["attention_head_dim"],
                 "sample_size": unet["sample_size"]},
        "vae": {"norm_num_groups": vae["norm_num_groups"], "sample_size": vae["sample_size"],
                "scaling_factor": vae["scaling_factor"]},
        "text_encoder": {"num_attention_heads": text.num_attention_heads, "hidden_act": text.hidden_act,
                         "layer_norm_eps": text.layer_norm_eps},
    }
    if getattr(components, "text_encoder_2", None) is not None:  # SDXL's OpenCLIP-G
        second = components.text_encoder_2.config
        hints["text_encoder_2"] = {"num_attention_heads": second.num_attention_heads,
                                   "hidden_act": second.hidden_act, "layer_norm_eps": second.layer_norm_eps}
    return {HINTS_KEY: json.dumps(hints, sort_keys=True, default=list)}


def _ignorable(key: str) -> bool:
    return key.endswith("position_ids") or key.startswith(VAE_PREFIX + "loss.")


def mismatch_message(part: str, missing: list[str], unknown: list[str]) -> str:
    """'The unet weights do not match ...: 2 missing (a, b) 1 unexpected (c).', at most 5 names each."""
    def few(keys):
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    text = f"The {part} weights do not match the SD1.x layout:"
    if missing:
        text += f" {len(missing)} missing ({few(missing)})"
    if unknown:
        text += f" {len(unknown)} unexpected ({few(unknown)})"
    return text + "."
