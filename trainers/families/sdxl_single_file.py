"""Building an SDXL base model (UNet, VAE, CLIP-L, OpenCLIP-G) from a single-file checkpoint in the SGM layout:
the UNet and VAE keys are SD1.x's plus `label_emb` (ldm_keys), the text encoders live under `conditioner.`
(sdxl_text_keys). Configs come from the weights, so distilled layouts (SSD-1B, Vega) load as the full model does.
"""
from __future__ import annotations

import os

from . import ldm_keys, sdxl_text_keys
from .clip_tokenizer import load_tokenizer
from .components import SDComponents
from .config_inference import infer_sdxl_unet_config, infer_text_config, infer_vae_config, read_hints
from .load_errors import SUPPORTED, ModelLoadError
from .model_hashes import file_sha256, legacy_hash
from .single_file import _instantiate, _reason, _strip


def load_sdxl_single_file(path, state_dict, metadata, tokenizer_dir, dtype) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hints = read_hints(metadata, path)
    tokenizer = load_tokenizer(tokenizer_dir, path)
    tokenizer_2 = load_tokenizer(tokenizer_dir, path, pad_token="!")  # OpenCLIP pads with "!" (id 0)
    open_clip = _strip(state_dict, sdxl_text_keys.CLIP_G_PREFIX)
    try:
        g_config = sdxl_text_keys.clip_g_config(open_clip, heads=hints.get("text_encoder_2", {}).get(
            "num_attention_heads"), eos_token_id=tokenizer_2.eos_token_id)
        del open_clip  # no reference may outlive the hand-over to _instantiate (it frees tensors as it converts)
        clip_l, clip_g = sdxl_text_keys.split_sdxl_text(state_dict, copy=False)  # _instantiate copies each
        unet_config = infer_sdxl_unet_config(_strip(state_dict, ldm_keys.UNET_PREFIX), hints.get("unet", {}),
                                             g_config["projection_dim"])
        vae_config = infer_vae_config(_strip(state_dict, ldm_keys.VAE_PREFIX), hints.get("vae", {}))
        parts = ldm_keys.ldm_to_diffusers(state_dict, unet_config, vae_config)
    except (ldm_keys.KeyMapError, sdxl_text_keys.SDXLKeyError, KeyError, IndexError) as e:
        raise ModelLoadError(f"'{path}' does not have the SDXL checkpoint layout: {_reason(e)}") from e
    state_dict.clear()  # `parts`, clip_l and clip_g hold the tensors now
    l_bare = {k[len(ldm_keys.TEXT_MODEL):] if k.startswith(ldm_keys.TEXT_MODEL) else k: v for k, v in clip_l.items()}
    l_config = infer_text_config(l_bare, hints.get("text_encoder", {}), tokenizer, path)
    del l_bare
    g_config.update(pad_token_id=tokenizer_2.pad_token_id, **_g_hints(hints))
    if l_config["hidden_size"] + g_config["hidden_size"] != unet_config["cross_attention_dim"]:
        raise ModelLoadError(f"'{path}': the text encoders' widths {l_config['hidden_size']} + "
                             f"{g_config['hidden_size']} do not add up to the UNet's cross-attention width "
                             f"{unet_config['cross_attention_dim']}. {SUPPORTED}")

    unet = _instantiate(lambda: UNet2DConditionModel.from_config(unet_config), parts.pop("unet"), dtype, "UNet", path)
    vae = _instantiate(lambda: AutoencoderKL.from_config(vae_config), parts.pop("vae"), dtype, "VAE", path)
    text_encoder = _instantiate(lambda: CLIPTextModel(CLIPTextConfig(**l_config)), clip_l, dtype,
                                "CLIP-L text encoder", path)
    text_encoder_2 = _instantiate(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**g_config)), clip_g, dtype,
                                  "OpenCLIP-G text encoder", path)
    return SDComponents(family="sdxl", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, prediction_type="epsilon",
                        source=path,
                        info={"name": os.path.splitext(os.path.basename(path))[0], "format": "single_file",
                              "legacy_hash": legacy_hash(path), "sha256": file_sha256(path)})


def _g_hints(hints: dict) -> dict:
    """What this pack's own files record of CLIP-G beyond its weights (tiny test models differ from bigG)."""
    saved = hints.get("text_encoder_2", {})
    return {k: saved[k] for k in ("hidden_act", "layer_norm_eps") if k in saved}
