"""Loading a diffusers SD1.x or SDXL folder (model_index.json with unet/, vae/, text_encoder/ and, for SDXL,
text_encoder_2/) from local files."""
from __future__ import annotations

import json
import os

from .clip_tokenizer import load_tokenizer
from .components import SDComponents
from .load_errors import SUPPORTED, ModelLoadError
from .model_hashes import file_sha256, legacy_hash


def load_diffusers_folder(path, tokenizer_dir, dtype, text_first: bool = False) -> SDComponents:
    """text_first: the UNet and VAE are read on first use (see model_loading.load_sd_components)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ModelLoadError(f"'{path}' is a folder without model_index.json, so not a diffusers model. {SUPPORTED}")
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"'{index_file}' is not valid JSON ({e}).") from e
    sdxl = "text_encoder_2" in index
    if "XL" in str(index.get("_class_name", "")) and not sdxl:
        raise ModelLoadError(f"'{path}' is an SDXL refiner (one text encoder, OpenCLIP-G): it refines images and "
                             f"is not trained here. {SUPPORTED}")
    for part in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if sdxl else ()):
        if not os.path.isdir(os.path.join(path, part)):
            raise ModelLoadError(f"'{path}' has no '{part}' subfolder: the diffusers folder is incomplete.")
    try:
        width = UNet2DConditionModel.load_config(path, subfolder="unet", local_files_only=True)["cross_attention_dim"]
        if not sdxl and width in (1024, 2048):
            raise ModelLoadError(f"'{path}' is an SD2.x-type model (cross-attention width {width}). {SUPPORTED}")
        unet, vae = (None, None) if text_first else _load_unet_vae(path, dtype, sdxl)
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), local_files_only=True)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            os.path.join(path, "text_encoder_2"), local_files_only=True).to(dtype).eval() if sdxl else None
    except ModelLoadError:
        raise
    except Exception as e:  # missing or corrupt weight files, bad configs
        raise _unreadable(path, sdxl, e) from e
    tokenizer = load_tokenizer(_own(path, "tokenizer", tokenizer_dir), path)
    tokenizer_2 = load_tokenizer(_own(path, "tokenizer_2", tokenizer_dir), path, pad_token="!") if sdxl else None
    weights = _weights_file(os.path.join(path, "unet"))
    return SDComponents(family="sdxl" if sdxl else "sd1", unet=unet, vae=vae,
                        text_encoder=text_encoder.to(dtype).eval(), tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        prediction_type=_prediction_type(path), source=path,
                        load_rest=(lambda: _load_unet_vae(path, dtype, sdxl)) if text_first else None,
                        info={"name": os.path.basename(os.path.normpath(path)), "format": "diffusers",
                              "legacy_hash": legacy_hash(weights) if weights else "",
                              "sha256": file_sha256(weights) if weights else ""})


def _load_unet_vae(path: str, dtype, sdxl: bool) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, torch_dtype=dtype,
                                                    variant=_variant(os.path.join(path, "unet")))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype,
                                            variant=_variant(os.path.join(path, "vae")))
    except Exception as e:
        raise _unreadable(path, sdxl, e) from e
    return unet.eval(), vae.eval()


def _unreadable(path: str, sdxl: bool, e: Exception) -> ModelLoadError:
    return ModelLoadError(f"'{path}' could not be loaded as a diffusers {'SDXL' if sdxl else 'SD1.x'} folder: {e}")


def _own(path: str, name: str, tokenizer_dir: str | None) -> str | None:
    """The folder's own tokenizer, unless the caller names one."""
    own = os.path.join(path, name)
    return own if os.path.isdir(own) and tokenizer_dir is None else tokenizer_dir


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
