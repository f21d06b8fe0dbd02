"""Load an SD1.x model, offline, from a single-file checkpoint or a diffusers folder.

Single files are read without code execution (safetensors, or torch.load with weights_only),
their configs are inferred from the weights (so pruned layouts like BK-SDM load too), and the
weights are loaded strictly: a key that does not fit is an error, never silently skipped.
Nothing here touches the network.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch

from ..core import host
from ..core.safe_io import write_json
from . import ldm_keys
from .components import SDComponents

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = ("Supported are Stable Diffusion 1.x models: a single-file checkpoint (.safetensors, or "
             ".ckpt/.pt holding only tensors) or a diffusers folder with model_index.json.")
_HASH_CACHE = "personalize_sha256_cache.json"
CLIP_CONTEXT = 77


class ModelLoadError(ValueError):
    """A model file or folder that cannot be loaded; the message names it and says what to do."""


def load_sd_components(path: str, *, tokenizer_dir: str | None = None,
                       dtype: torch.dtype = torch.float32) -> SDComponents:
    """UNet, VAE, text encoder and tokenizer of an SD1.x model, as diffusers/transformers modules."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_diffusers_folder(path, tokenizer_dir, dtype)
    if not os.path.isfile(path):
        raise ModelLoadError(f"Model '{path}' does not exist. {SUPPORTED}")
    state_dict, metadata = read_state_dict(path)
    return _load_single_file(path, state_dict, metadata, tokenizer_dir, dtype)


# ---------------------------------------------------------------- reading files safely
def read_state_dict(path: str) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of a checkpoint file; never runs code from the file."""
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"'{path}' is empty (0 bytes): the download or copy did not finish.")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:  # the library raises its own error type for bad headers
            raise ModelLoadError(f"'{path}' is not a readable safetensors file ({e}). It is corrupt or "
                                 f"incomplete: download it again.") from e
    if lower.endswith(PICKLE_EXTENSIONS):
        import pickle

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ModelLoadError(
                f"'{path}' holds Python objects besides tensors, and loading those could run code, so it "
                f"was refused. Use a .safetensors version of the model, or convert this one with a tool "
                f"you trust.") from e
        except Exception as e:
            raise ModelLoadError(f"'{path}' could not be read as a PyTorch checkpoint ({e}). It is corrupt or "
                                 f"incomplete: download it again.") from e
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise ModelLoadError(f"'{path}' does not hold a state dict. {SUPPORTED}")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}
    raise ModelLoadError(f"'{path}' is not a checkpoint file. {SUPPORTED}")


# ---------------------------------------------------------------- single files
def _load_single_file(path, state_dict, metadata, tokenizer_dir, dtype) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _check_family(state_dict, path)
    hints = _read_hints(metadata, path)
    unet_sd = _strip(state_dict, ldm_keys.UNET_PREFIX)
    vae_sd = _strip(state_dict, ldm_keys.VAE_PREFIX)
    if not vae_sd:
        raise ModelLoadError(f"'{path}' has no VAE (first_stage_model.*): it is not a full checkpoint. {SUPPORTED}")
    try:
        unet_config = infer_unet_config(unet_sd, hints.get("unet", {}))
        vae_config = infer_vae_config(vae_sd, hints.get("vae", {}))
        parts = ldm_keys.ldm_to_diffusers(state_dict, unet_config, vae_config)
    except (ldm_keys.KeyMapError, KeyError, IndexError) as e:
        raise ModelLoadError(f"'{path}' does not have the SD1.x checkpoint layout: {_reason(e)}") from e
    state_dict.clear()  # `parts` holds the tensors now; each part is released once its model owns a copy
    if not parts["text_encoder"]:
        raise ModelLoadError(f"'{path}' has no CLIP text encoder (cond_stage_model.transformer.*). {SUPPORTED}")

    tokenizer = load_tokenizer(tokenizer_dir, path)
    text_config = infer_text_config(parts["text_encoder"], hints.get("text_encoder", {}), tokenizer, path)
    if text_config["hidden_size"] != unet_config["cross_attention_dim"]:
        raise ModelLoadError(f"'{path}': the text encoder width {text_config['hidden_size']} does not match the "
                             f"UNet's cross-attention width {unet_config['cross_attention_dim']}.")

    unet = _instantiate(lambda: UNet2DConditionModel.from_config(unet_config), parts.pop("unet"), dtype, "UNet", path)
    vae = _instantiate(lambda: AutoencoderKL.from_config(vae_config), parts.pop("vae"), dtype, "VAE", path)
    text_encoder = _instantiate(lambda: CLIPTextModel(CLIPTextConfig(**text_config)),
                                parts.pop("text_encoder"), dtype, "text encoder", path)
    return SDComponents(family="sd1", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        prediction_type="epsilon", source=path,
                        info={"name": os.path.splitext(os.path.basename(path))[0], "format": "single_file",
                              "legacy_hash": legacy_hash(path), "sha256": file_sha256(path)})


def _check_family(sd: dict, path: str) -> None:
    """Refuse what is not SD1.x with a message that says what the file is."""
    def has(prefix):
        return any(k.startswith(prefix) for k in sd)

    unet = ldm_keys.UNET_PREFIX
    if has("conditioner.") or has(unet + "label_emb."):
        kind = "an SDXL (or SD2 unCLIP) checkpoint"
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
            return
    raise ModelLoadError(f"'{path}' is {kind}. {SUPPORTED}")


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


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


def _read_hints(metadata: dict, path: str) -> dict:
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


def _instantiate(build, state_dict: dict, dtype, what: str, path: str):
    """Build a model without allocating random weights, then take the file's tensors, strictly."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):  # buffers stay real: some are not in files
            model = build()
    except (ValueError, TypeError) as e:  # e.g. a width that does not split into the heads
        raise ModelLoadError(f"'{path}': no {what} can be built from the inferred config: {e}") from e
    expected = set(model.state_dict())
    if any(k.startswith(ldm_keys.TEXT_MODEL) for k in expected):  # transformers < 5 names
        state_dict = {ldm_keys.TEXT_MODEL + k: v for k, v in state_dict.items()}
    missing, unknown = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unknown:
        raise ModelLoadError(f"'{path}': {ldm_keys.mismatch_message(what, missing, unknown)}")
    # Fresh copies: tensors read from a file can sit at unaligned addresses, which changes results
    # in the last bits and slows some kernels.
    tensors = {k: v.to(dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in state_dict.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"'{path}': the {what} weights do not fit the inferred model: {e}") from e
    for buffer in model.buffers():  # (model.to() would make diffusers warn about fp32 modules)
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return model.eval()


def _reason(e: Exception) -> str:
    return f"missing key {e}" if isinstance(e, KeyError) else str(e)


# ---------------------------------------------------------------- diffusers folders
def _load_diffusers_folder(path, tokenizer_dir, dtype) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ModelLoadError(f"'{path}' is a folder without model_index.json, so not a diffusers model. {SUPPORTED}")
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"'{index_file}' is not valid JSON ({e}).") from e
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise ModelLoadError(f"'{path}' is an SDXL diffusers folder. {SUPPORTED}")
    for part in ("unet", "vae", "text_encoder"):
        if not os.path.isdir(os.path.join(path, part)):
            raise ModelLoadError(f"'{path}' has no '{part}' subfolder: the diffusers folder is incomplete.")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, torch_dtype=dtype,
                                                    variant=_variant(os.path.join(path, "unet")))
        if unet.config.cross_attention_dim in (1024, 2048):
            raise ModelLoadError(f"'{path}' is an SD2.x/SDXL-type model (cross-attention width "
                                 f"{unet.config.cross_attention_dim}). {SUPPORTED}")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype,
                                            variant=_variant(os.path.join(path, "vae")))
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as e:  # missing or corrupt weight files, bad configs
        raise ModelLoadError(f"'{path}' could not be loaded as a diffusers SD1.x folder: {e}") from e
    own_tokenizer = os.path.join(path, "tokenizer")
    tokenizer = load_tokenizer(own_tokenizer if os.path.isdir(own_tokenizer) and tokenizer_dir is None
                               else tokenizer_dir, path)
    weights = _weights_file(os.path.join(path, "unet"))
    return SDComponents(family="sd1", unet=unet.eval(), vae=vae.eval(),
                        text_encoder=text_encoder.to(dtype).eval(), tokenizer=tokenizer,
                        prediction_type=_prediction_type(path), source=path,
                        info={"name": os.path.basename(os.path.normpath(path)), "format": "diffusers",
                              "legacy_hash": legacy_hash(weights) if weights else "",
                              "sha256": file_sha256(weights) if weights else ""})


def _weights_file(folder: str) -> str | None:
    names = sorted(f for f in os.listdir(folder) if f.startswith("diffusion_pytorch_model")
                   and f.endswith((".safetensors", ".bin")))
    names.sort(key=lambda f: (not f.endswith(".safetensors"), ".fp16." in f))  # the full-precision file first
    return os.path.join(folder, names[0]) if names else None


def _variant(folder: str) -> str | None:
    """'fp16' when a folder has only the fp16 weight variant."""
    weights = _weights_file(folder)
    return "fp16" if weights and ".fp16." in os.path.basename(weights) else None


def _prediction_type(path: str) -> str:
    try:
        with open(os.path.join(path, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
            return json.load(f).get("prediction_type") or "epsilon"
    except (OSError, ValueError):
        return "epsilon"


# ---------------------------------------------------------------- tokenizer
def load_tokenizer(tokenizer_dir: str | None, model_path: str = ""):
    """The CLIP tokenizer from a local folder (ComfyUI ships one); never from the network."""
    from transformers import CLIPTokenizer

    tokenizer_dir = tokenizer_dir or host.tokenizer_dir("sd1")
    if not tokenizer_dir or not any(os.path.isfile(os.path.join(tokenizer_dir, f))
                                    for f in ("vocab.json", "tokenizer.json")):
        raise ModelLoadError(
            f"No CLIP tokenizer found{f' for {model_path!r}' if model_path else ''}"
            f"{f' in {tokenizer_dir!r}' if tokenizer_dir else ''}. Single-file checkpoints do not contain one: "
            f"ComfyUI ships it as comfy/sd1_tokenizer (set COMFYUI_DIR outside ComfyUI), or put vocab.json and "
            f"merges.txt in models/clip/tokenizer, or load a diffusers folder, which has its own.")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"The CLIP tokenizer in '{tokenizer_dir}' could not be loaded: {e}") from e
    # CLIP's context is 77 tokens; ComfyUI's tokenizer config says 8192 (it chunks prompts itself),
    # which would make diffusers pipelines pad past the position embeddings.
    tokenizer.model_max_length = min(tokenizer.model_max_length, CLIP_CONTEXT)
    return tokenizer


# ---------------------------------------------------------------- hashes
def legacy_hash(path: str) -> str:
    """A1111's old model hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def file_sha256(path: str) -> str:
    """Full sha256, cached by path, size and mtime so a 2 GB checkpoint is hashed once."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = os.path.join(host.cache_dir(), _HASH_CACHE)
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    try:
        write_json(cache_file, cache)
    except OSError:
        pass  # a read-only temp folder only costs a re-hash next time
    return cache[key]
