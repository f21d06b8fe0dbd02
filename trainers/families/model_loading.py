"""Load an SD1.x or SDXL model, offline, from a single-file checkpoint or a diffusers folder.

Single files are read without code execution (safetensors, or torch.load with weights_only),
their configs are inferred from the weights (so pruned layouts like BK-SDM load too), and the
weights are loaded strictly: a key that does not fit is an error, never silently skipped.
Nothing here touches the network.

This module picks the loader; the parts live beside it: checkpoint_file.py (reading tensors),
config_inference.py (family check, configs from weights), single_file.py, diffusers_folder.py,
clip_tokenizer.py and model_hashes.py.
"""
from __future__ import annotations

import os

import torch

from ..core import heap
from .checkpoint_file import read_state_dict
from .components import SDComponents
from .diffusers_folder import load_diffusers_folder
from .ldm_keys import SDXL_TEXT_PREFIXES, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from .load_errors import SUPPORTED, ModelLoadError
# file_sha256 is re-exported: the tests import it from here.
from .model_hashes import file_sha256  # noqa: F401
from .config_inference import check_family
from .sdxl_single_file import load_sdxl_single_file
from .single_file import load_single_file


def load_sd_components(path: str, *, tokenizer_dir: str | None = None, dtype: torch.dtype = torch.float32,
                       text_first: bool = False) -> SDComponents:
    """UNet, VAE, text encoder(s) and tokenizer(s) of an SD1.x or SDXL model, as diffusers/transformers modules.

    text_first: only the text encoders are read now (the whole layout is still checked); the UNet and VAE are read
    when first used (SDComponents.load_rest). A trainer that caches captions first then frees the encoders before
    the rest of the model takes memory (SDXL's encoders: 3.3 GB in fp32)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        comps = load_diffusers_folder(path, tokenizer_dir, dtype, text_first)
    elif not os.path.isfile(path):
        raise ModelLoadError(f"Model '{path}' does not exist. {SUPPORTED}")
    else:
        comps = _load_file(path, tokenizer_dir, dtype, keep=_is_text_key if text_first else None)
        if text_first:
            comps.load_rest = lambda: _unet_vae(_load_file(path, tokenizer_dir, dtype, keep=_is_unet_or_vae_key))
    if comps.load_rest is not None:
        comps.load_rest = _trimmed(comps.load_rest)
    return comps


def _trimmed(load):
    def load_and_trim():
        models = load()
        heap.trim()  # the file's tensors, converted and dropped one by one, leave their blocks in the heap
        return models
    return load_and_trim


def _load_file(path: str, tokenizer_dir, dtype, keep=None) -> SDComponents:
    """The models of a single file; with `keep`, only those whose tensors it selects (the rest is checked from
    the tensors' shapes, and left None)."""
    state_dict, metadata = read_state_dict(path, keep=keep, dtype=dtype, rest_as_meta=keep is not None)
    if check_family(state_dict, path) == "sdxl":
        return load_sdxl_single_file(path, state_dict, metadata, tokenizer_dir, dtype)
    return load_single_file(path, state_dict, metadata, tokenizer_dir, dtype)


def _is_text_key(key: str) -> bool:
    return key.startswith((TEXT_PREFIX, *SDXL_TEXT_PREFIXES.values()))


def _is_unet_or_vae_key(key: str) -> bool:
    return key.startswith((UNET_PREFIX, VAE_PREFIX))


def _unet_vae(comps: SDComponents) -> tuple:
    return comps.unet, comps.vae
