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

from .checkpoint_file import read_state_dict
from .components import SDComponents
from .diffusers_folder import load_diffusers_folder
from .load_errors import SUPPORTED, ModelLoadError
# file_sha256 is re-exported: the tests import it from here.
from .model_hashes import file_sha256  # noqa: F401
from .config_inference import check_family
from .sdxl_single_file import load_sdxl_single_file
from .single_file import load_single_file


def load_sd_components(path: str, *, tokenizer_dir: str | None = None,
                       dtype: torch.dtype = torch.float32) -> SDComponents:
    """UNet, VAE, text encoder(s) and tokenizer(s) of an SD1.x or SDXL model, as diffusers/transformers modules."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_diffusers_folder(path, tokenizer_dir, dtype)
    if not os.path.isfile(path):
        raise ModelLoadError(f"Model '{path}' does not exist. {SUPPORTED}")
    state_dict, metadata = read_state_dict(path, dtype=dtype)
    if check_family(state_dict, path) == "sdxl":
        return load_sdxl_single_file(path, state_dict, metadata, tokenizer_dir, dtype)
    return load_single_file(path, state_dict, metadata, tokenizer_dir, dtype)
