"""Building the UNet, VAE and text encoder of an SD1.x single-file checkpoint from its LDM-layout weights (SDXL:
sdxl_single_file.py, on the same helpers)."""
from __future__ import annotations

import os

from . import ldm_keys
from .clip_tokenizer import load_tokenizer
from .components import SDComponents
from .config_inference import infer_text_config, infer_unet_config, infer_vae_config, read_hints
from .load_errors import SUPPORTED, ModelLoadError
from .model_hashes import file_sha256, legacy_hash
from .sdxl_text_keys import match_text_layout


def load_single_file(path, state_dict, metadata, tokenizer_dir, dtype) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    hints = read_hints(metadata, path)
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
    state_dict.clear()  # `parts` holds the tensors now; each part is released as its model takes it
    del unet_sd, vae_sd
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


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _instantiate(build, state_dict: dict, dtype, what: str, path: str):
    """Build a model without allocating random weights, then take the file's tensors, strictly. `state_dict` is
    handed over: it is emptied as its tensors are converted, so a file's fp16 tensors and their fp32 copies are
    never all held at once (the caller keeps no other reference to them).

    Tensors read as shapes only (meta, see read_state_dict) are checked just as strictly, and then no model is
    returned (None): a text-first load (model_loading) checks the UNet and VAE it reads later."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):  # buffers stay real: some are not in files
            model = build()
    except (ValueError, TypeError) as e:  # e.g. a width that does not split into the heads
        raise ModelLoadError(f"'{path}': no {what} can be built from the inferred config: {e}") from e
    expected = set(model.state_dict())
    matched = match_text_layout(state_dict, expected)  # CLIP names with or without text_model. (transformers)
    state_dict.clear()
    missing, unknown = sorted(expected - set(matched)), sorted(set(matched) - expected)
    if missing or unknown:
        raise ModelLoadError(f"'{path}': {ldm_keys.mismatch_message(what, missing, unknown)}")
    shapes_only = any(value.is_meta for value in matched.values())
    # No copy where the dtype is already right: checkpoint_file reads each tensor into its own fresh, aligned
    # memory (a tensor left in a mapped file could sit at an unaligned address, which changes results in the
    # last bits). Each source tensor is dropped as soon as it is converted.
    tensors = {}
    for key in list(matched):
        value = matched.pop(key)
        value = value.to(dtype) if value.is_floating_point() else value
        if value.untyped_storage().nbytes() > value.nbytes:  # a view into a fused tensor (OpenCLIP's q, k, v)
            value = value.clone()
        tensors[key] = value
        del value
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"'{path}': the {what} weights do not fit the inferred model: {e}") from e
    if shapes_only:
        return None
    for buffer in model.buffers():  # (model.to() would make diffusers warn about fp32 modules)
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return model.eval()


def _reason(e: Exception) -> str:
    return f"missing key {e}" if isinstance(e, KeyError) else str(e)
