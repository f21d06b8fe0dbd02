"""Names of the SDXL text encoders in the SGM/LDM single-file layout and in Hugging Face transformers.

An SDXL single file (Stability's release, A1111 and ComfyUI saves) holds two text encoders:

- CLIP-L under `conditioner.embedders.0.transformer.`, already in transformers names
  (`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...): only the prefix changes.
- OpenCLIP ViT-bigG under `conditioner.embedders.1.model.`, in open_clip names: q, k and v packed
  into one `attn.in_proj_*`, `text_projection` stored as (width, projection), the transpose of the
  `nn.Linear` weight transformers uses, and usually `logit_scale`, the contrastive temperature, which
  has no place in a text model.

transformers >= 5.6 dropped `text_model.` from `CLIPTextModel` names but still uses it in
`CLIPTextModelWithProjection`, and older releases use it in both. Everything here returns text-model
keys with `text_model.` (as the files have them) and accepts both spellings; `match_text_layout`
fits a state dict to the names a given model expects.

Follows ComfyUI (`comfy.utils.clip_text_transformers_convert`, SDXL `process_clip_state_dict[_for_saving]`)
and diffusers (`convert_open_clip_checkpoint`): equal-thirds split of `in_proj` in q, k, v order,
`text_projection` transposed, `logit_scale` and `position_ids` dropped.
"""
from __future__ import annotations

import re

import torch

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
TEXT_MODEL = "text_model."
PROJECTION = "text_projection.weight"  # top level in CLIPTextModelWithProjection, never under text_model.

# open_clip name -> transformers name (without text_model.), outside the blocks.
_G_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# open_clip module -> transformers module inside block N (`transformer.resblocks.N.` / `encoder.layers.N.`).
_G_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
            "attn.out_proj": "self_attn.out_proj"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # the order nn.MultiheadAttention packs
_G_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)")

_HF_TOP = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
           "final_layer_norm.weight", "final_layer_norm.bias")
_HF_BLOCK = tuple(f"{m}.{p}" for m in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", "self_attn.out_proj", *_QKV)
                  for p in ("weight", "bias"))

# Keys files carry that no transformers text model needs. `position_ids` is a non-persistent buffer in
# current transformers (ComfyUI writes arange(77) for CLIP-L; some merges hold it as drifted floats).
# ComfyUI's own CLIP models carry `logit_scale` and an identity CLIP-L `text_projection`, and it pops both
# from CLIP-L on saving but writes CLIP-G's `logit_scale`.
_POSITION_IDS = "embeddings.position_ids"
_L_DROPPED = (_POSITION_IDS, PROJECTION, "logit_scale")
_G_DROPPED = ("logit_scale",)


class SDXLKeyError(ValueError):
    """A state dict that does not fit the SDXL text-encoder layout (names the missing and unknown keys)."""


def _mismatch(what: str, missing, unknown, prefix: str = "") -> SDXLKeyError:
    def listed(keys):
        keys = sorted(k if prefix == TEXT_MODEL and k == PROJECTION else prefix + k for k in keys)
        shown = ", ".join(f"'{k}'" for k in keys[:8])
        return shown + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {listed(missing)}")
    if unknown:
        parts.append(f"unknown {len(unknown)}: {listed(unknown)}")
    return SDXLKeyError(f"{what} does not fit the SDXL layout; " + "; ".join(parts) + ".")


def _layer_count(keys, pattern: re.Pattern) -> int:
    found = [int(m.group(1)) for k in keys if (m := pattern.fullmatch(k))]
    return max(found) + 1 if found else 1  # gaps (or no layer at all) show up as missing keys


def _check(what: str, present, expected, prefix: str = "") -> None:
    """Raise naming the keys (as `prefix` + key, i.e. as the caller's dict spells them) that do not match."""
    missing, unknown = set(expected) - set(present), set(present) - set(expected)
    if missing or unknown:
        raise _mismatch(what, missing, unknown, prefix)


def _hf_text_keys(layers: int) -> set[str]:
    return set(_HF_TOP) | {f"encoder.layers.{i}.{name}" for i in range(layers) for name in _HF_BLOCK}


def _strip_text_model(state_dict: dict, what: str, dropped=()) -> dict:
    """Text-model keys without `text_model.` (either spelling accepted), `dropped` keys left out."""
    out = {}
    for key, value in state_dict.items():
        bare = key[len(TEXT_MODEL):] if key.startswith(TEXT_MODEL) else key
        if bare in dropped or key in dropped:
            continue
        if bare in out:
            raise SDXLKeyError(f"{what} holds '{bare}' both with and without '{TEXT_MODEL}'.")
        out[bare] = value
    return out


def match_text_layout(state_dict: dict, model_keys) -> dict:
    """Add or remove `text_model.` so the keys fit a model's `state_dict()` keys (transformers 4 vs 5 names)."""
    prefixed = any(k.startswith(TEXT_MODEL) for k in model_keys)
    out = {}
    for key, value in state_dict.items():
        bare = key[len(TEXT_MODEL):] if key.startswith(TEXT_MODEL) else key
        out[TEXT_MODEL + bare if prefixed and bare != PROJECTION else bare] = value
    return out


# ---------------------------------------------------------------- CLIP-G (OpenCLIP bigG)
def _check_clip_g(state_dict: dict, prefix: str = "") -> int:
    """Layer count of open_clip-named CLIP-G tensors (`logit_scale` allowed); raises on any other mismatch."""
    keys = set(state_dict) - set(_G_DROPPED)
    layers = _layer_count(keys, _G_BLOCK_RE)
    projection = {"text_projection.weight"} if "text_projection.weight" in keys else {"text_projection"}
    block = [f"{m}.{p}" for m in _G_BLOCK for p in ("weight", "bias")] + ["attn.in_proj_weight", "attn.in_proj_bias"]
    expected = set(_G_TOP) | projection | {f"transformer.resblocks.{i}.{b}" for i in range(layers) for b in block}
    _check("CLIP-G (open_clip names)", keys, expected, prefix)
    return layers


def clip_g_to_hf(state_dict: dict) -> dict:
    """open_clip CLIP-G tensors (prefix stripped) -> a `CLIPTextModelWithProjection` state dict.

    Text-model keys come with `text_model.`, the projection as top-level `text_projection.weight`.
    `logit_scale` is dropped. The input dict is not changed; split q/k/v are copies, so the result
    can be saved with safetensors (which refuses tensors sharing memory).
    """
    return _clip_g_to_hf(state_dict, "")


def _clip_g_to_hf(state_dict: dict, prefix: str, copy: bool = True) -> dict:
    layers = _check_clip_g(state_dict, prefix)
    hidden = state_dict["token_embedding.weight"].shape[1]
    out = {TEXT_MODEL + hf: state_dict[g] for g, hf in _G_TOP.items()}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"{TEXT_MODEL}encoder.layers.{i}."
        for g, hf in _G_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}{hf}.{p}"] = state_dict[f"{src}{g}.{p}"]
        for p in ("weight", "bias"):
            packed = state_dict[f"{src}attn.in_proj_{p}"]
            if packed.shape[0] != 3 * hidden:
                raise SDXLKeyError(f"CLIP-G '{prefix}{src}attn.in_proj_{p}' has {packed.shape[0]} rows; "
                                   f"q, k and v of width {hidden} need {3 * hidden}.")
            for j, name in enumerate(_QKV):  # equal thirds, q then k then v
                third = packed[j * hidden:(j + 1) * hidden]
                out[f"{dst}{name}.{p}"] = third.clone() if copy else third
    if "text_projection.weight" in state_dict:  # already a Linear weight (ComfyUI reads it untransposed)
        out[PROJECTION] = state_dict["text_projection.weight"]
    else:  # open_clip computes x @ text_projection: (width, projection) -> Linear's (projection, width)
        out[PROJECTION] = state_dict["text_projection"].t().contiguous()
    return out


def hf_to_clip_g(state_dict: dict) -> dict:
    """A `CLIPTextModelWithProjection` state dict (with or without `text_model.`) -> open_clip names.

    The exact inverse of `clip_g_to_hf` (round trips are bit-identical); no prefix is added and no
    `logit_scale` is written. A `position_ids` buffer (older transformers save it) is dropped.
    """
    bare = _strip_text_model(state_dict, "CLIP-G (transformers names)", dropped=(_POSITION_IDS,))
    layers = _layer_count(bare, _HF_BLOCK_RE)
    _check("CLIP-G (transformers names)", bare, _hf_text_keys(layers) | {PROJECTION}, TEXT_MODEL)
    out = {g: bare[hf] for g, hf in _G_TOP.items()}
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for g, hf in _G_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}{g}.{p}"] = bare[f"{src}{hf}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([bare[f"{src}{name}.{p}"] for name in _QKV])
    out["text_projection"] = bare[PROJECTION].t().contiguous()
    return out


def clip_g_config(state_dict: dict, heads: int | None = None, eos_token_id: int | None = None) -> dict:
    """`CLIPTextConfig` kwargs for open_clip-named CLIP-G tensors, shapes read from the weights.

    Heads are not in the weights: SDXL's bigG uses 64 channels per head (1280 -> 20); pass `heads`
    for models that do not. The EOS id defaults to the last vocabulary id (49407 for CLIP's
    tokenizer): transformers then pools at the first EOS as ComfyUI does, which equals open_clip's
    argmax-of-ids pooling unless a prompt holds ids above the EOS (added embeddings).
    """
    layers = _check_clip_g(state_dict)
    vocab, hidden = state_dict["token_embedding.weight"].shape
    if "text_projection.weight" in state_dict:
        projection = state_dict["text_projection.weight"].shape[0]
    else:
        projection = state_dict["text_projection"].shape[1]
    heads = int(heads) if heads is not None else max(hidden // 64, 1)
    if hidden % heads:
        raise SDXLKeyError(f"CLIP-G width {hidden} does not split into {heads} attention heads.")
    eos = vocab - 1 if eos_token_id is None else int(eos_token_id)
    return {
        "vocab_size": int(vocab), "hidden_size": int(hidden),
        "intermediate_size": int(state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "max_position_embeddings": int(state_dict["positional_embedding"].shape[0]),
        "projection_dim": int(projection), "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": max(eos - 1, 0), "eos_token_id": eos,
    }


# ---------------------------------------------------------------- CLIP-L and the whole file
def _clip_l_bare(state_dict: dict, prefix: str) -> dict:
    bare = _strip_text_model(state_dict, "CLIP-L", dropped=_L_DROPPED)
    _check("CLIP-L", bare, _hf_text_keys(_layer_count(bare, _HF_BLOCK_RE)), prefix + TEXT_MODEL)
    return bare


def split_sdxl_text(state_dict: dict, copy: bool = True) -> tuple[dict, dict]:
    """A whole SDXL single-file state dict -> (CLIP-L, CLIP-G) state dicts in transformers names.

    CLIP-L fits `CLIPTextModel`, CLIP-G `CLIPTextModelWithProjection`, both with `text_model.` keys
    (see `match_text_layout`). Keys outside the two prefixes (UNet, VAE, ...) are ignored; inside
    them, anything that does not fit raises SDXLKeyError. copy=False leaves OpenCLIP's q, k and v as views
    of the fused in_proj tensors (a loader that copies each as it takes it never holds the fused and the
    split ones at once); the default copies them, as safetensors refuses tensors that share memory.
    """
    clip_l = {k[len(CLIP_L_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CLIP_L_PREFIX)}
    clip_g = {k[len(CLIP_G_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CLIP_G_PREFIX)}
    if not clip_l or not clip_g:
        absent = [p for p, part in ((CLIP_L_PREFIX, clip_l), (CLIP_G_PREFIX, clip_g)) if not part]
        hint = (" (an SDXL refiner, which holds only CLIP-G under 'conditioner.embedders.0.model.', is not supported)"
                if any(k.startswith("conditioner.embedders.0.model.") for k in state_dict) else "")
        raise SDXLKeyError(f"No SDXL text-encoder keys under {', '.join(repr(p) for p in absent)}{hint}.")
    bare = _clip_l_bare(clip_l, CLIP_L_PREFIX)
    return {TEXT_MODEL + k: v for k, v in bare.items()}, _clip_g_to_hf(clip_g, CLIP_G_PREFIX, copy)


def sdxl_text_to_ldm(clip_l_state: dict, clip_g_state: dict) -> dict:
    """(CLIP-L, CLIP-G) transformers state dicts -> single-file keys with their prefixes.

    CLIP-L keys are written with `text_model.` as SDXL files have them; no `position_ids`, no
    CLIP-L `text_projection` and no `logit_scale` are written.
    """
    return {**clip_l_to_ldm(clip_l_state), **clip_g_to_ldm(clip_g_state)}


def clip_l_to_ldm(clip_l_state: dict) -> dict:
    """CLIP-L alone, as in sdxl_text_to_ldm."""
    return {f"{CLIP_L_PREFIX}{TEXT_MODEL}{k}": v for k, v in _clip_l_bare(clip_l_state, "").items()}


def clip_g_to_ldm(clip_g_state: dict) -> dict:
    """CLIP-G alone, as in sdxl_text_to_ldm."""
    return {CLIP_G_PREFIX + k: v for k, v in hf_to_clip_g(clip_g_state).items()}
