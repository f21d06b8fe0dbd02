"""Which checkpoint tensor each adapter module changes, read from a single-file checkpoint's header alone.

Modules are named by their kohya stem, as our LoRA files and ComfyUI's LoraLoader name them:
  SD1.x UNet: `lora_unet_` + the diffusers module name (`lora_unet_down_blocks_0_attentions_0_proj_in`)
  SDXL UNet: `lora_unet_` + the SGM (LDM) module name (`lora_unet_input_blocks_4_1_proj_in`)
  text encoders: `lora_te_` (SD1.x), `lora_te1_` (SDXL CLIP-L), `lora_te2_` (SDXL OpenCLIP-G) + the transformers
  module name with `text_model_` (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`).
OpenCLIP-G keeps q, k and v in one fused `in_proj_weight`: each of them is a block of its rows.

Adapter files in other formats are renamed to these stems by `canonical_stem` (adapter_file.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..families import ldm_keys, sdxl_text_keys
from ..families.config_inference import check_family, infer_sdxl_unet_config, infer_unet_config
from ..families.detect import header_shapes

UNET = ldm_keys.UNET_PREFIX
SD1_TEXT = ldm_keys.TEXT_PREFIX
CLIP_L = sdxl_text_keys.CLIP_L_PREFIX  # conditioner.embedders.0.transformer.
CLIP_G = sdxl_text_keys.CLIP_G_PREFIX  # conditioner.embedders.1.model.
# OpenCLIP-G block parts -> transformers names (kohya's te2 stems use these)
_G_PARTS = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1",
            "mlp.c_proj.weight": "mlp_fc2"}
_QKV = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj")
# UNet layers no kohya network adapts: the time and size embeddings, the first and last convs.
_UNET_EDGES = ("time_embed.", "label_emb.", "input_blocks.0.0.", "out.")


@dataclass(frozen=True)
class Target:
    """Where one module's weight lives: `key` in the checkpoint, or rows [start, stop) of it."""
    key: str
    shape: tuple  # the module's weight shape
    rows: tuple | None = None
    part: str = "unet"  # "unet" or "text": the strength that applies to it when baking

    @property
    def bias_key(self) -> str:
        """The module's bias in the checkpoint (OpenCLIP's fused in_proj_bias for q, k and v)."""
        return self.key[:-len("weight")] + "bias"

    @property
    def spatial(self) -> bool:
        """A conv with a kernel larger than 1x1 (kohya trains these only with conv_dim)."""
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)


@dataclass
class ModuleMap:
    family: str  # "sd1" or "sdxl"
    targets: dict = field(default_factory=dict)  # kohya stem -> Target
    aliases: dict = field(default_factory=dict)  # other stems ComfyUI accepts for a module -> the kohya stem
    unet_config: dict = field(default_factory=dict)

    def extractable(self, conv: bool) -> dict:
        """The modules an extracted LoRA covers, as kohya's extract does: UNet attention, feed-forward,
        projections and resnet layers (3x3 convs with `conv`), and the text encoders' attention and MLP."""
        out = {}
        for stem, target in self.targets.items():
            if target.part == "unet" and target.key[len(UNET):].startswith(_UNET_EDGES):
                continue
            if target.spatial and not conv:
                continue
            out[stem] = target
        return out


def module_map(entries: dict, path: str) -> ModuleMap:
    """The module map of a checkpoint from its safetensors header entries ({key: {"shape": ...}})."""
    shapes = header_shapes(entries)
    family = check_family(shapes, path)
    unet = {k[len(UNET):]: v for k, v in shapes.items() if k.startswith(UNET)}
    if family == "sdxl":  # the added embedding takes OpenCLIP-G's pooled projection
        g = CLIP_G + "text_projection"  # (width, projection), or a Linear's (projection, width)
        pooled = shapes[g].shape[1] if g in shapes else shapes[g + ".weight"].shape[0]
        config = infer_sdxl_unet_config(unet, {}, pooled)
    else:
        config = infer_unet_config(unet, {})
    result = ModuleMap(family=family, unet_config=config)
    _add_unet(result, shapes, config)
    if family == "sdxl":
        _add_clip(result, shapes, CLIP_L, "lora_te1_")
        _add_clip_g(result, shapes)
    else:
        _add_clip(result, shapes, SD1_TEXT, "lora_te_")
    return result


def _add_unet(result: ModuleMap, shapes: dict, config: dict) -> None:
    to_diffusers = {ldm: key for key, ldm in ldm_keys.unet_diffusers_to_ldm(config).items()}
    for key, value in shapes.items():
        if not (key.startswith(UNET) and key.endswith(".weight") and value.ndim in (2, 4)):
            continue
        sgm = "lora_unet_" + key[len(UNET):-len(".weight")].replace(".", "_")
        diffusers = "lora_unet_" + to_diffusers[key[len(UNET):]][:-len(".weight")].replace(".", "_")
        # kohya's SDXL files name UNet modules the SGM way, its SD1.x files the diffusers way; ComfyUI takes both.
        stem, alias = (sgm, diffusers) if result.family == "sdxl" else (diffusers, sgm)
        result.targets[stem] = Target(key, value.shape)
        if alias != stem:
            result.aliases[alias] = stem


def _add_clip(result: ModuleMap, shapes: dict, prefix: str, stem_prefix: str) -> None:
    """CLIP-L in transformers names (with or without `text_model.` in the file)."""
    for key, value in shapes.items():
        if key.startswith(prefix) and key.endswith(".weight") and value.ndim == 2 and ".layers." in key:
            module = ldm_keys.text_diffusers_key(SD1_TEXT + key[len(prefix):])[:-len(".weight")]
            result.targets[stem_prefix + "text_model_" + module.replace(".", "_")] = \
                Target(key, value.shape, part="text")


def _add_clip_g(result: ModuleMap, shapes: dict) -> None:
    """OpenCLIP-G's blocks under their transformers names; q, k, v as row blocks of the fused projection."""
    block = CLIP_G + "transformer.resblocks."
    for key, value in shapes.items():
        if not key.startswith(block):
            continue
        index, rest = key[len(block):].split(".", 1)
        stem = f"lora_te2_text_model_encoder_layers_{index}_"
        if rest == "attn.in_proj_weight":
            width = value.shape[0] // 3
            for i, name in enumerate(_QKV):
                result.targets[stem + name] = Target(key, (width, value.shape[1]), (i * width, (i + 1) * width),
                                                     part="text")
        elif rest in _G_PARTS:
            result.targets[stem + _G_PARTS[rest]] = Target(key, value.shape, part="text")
