"""A base model's family from its file header or folder index alone, without reading weights: what the canvas
shows when a checkpoint is picked, before any run (nodes/routes.py)."""
from __future__ import annotations

import json
import os

from .config_inference import check_family
from .load_errors import ModelLoadError


def family_of(path: str) -> str:
    """"sd1" or "sdxl"; ModelLoadError (the loader's own message) for a file that is neither; "" when only loading
    can tell (a pickled .ckpt, whose tensor list is not readable without unpickling it)."""
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError):
            return ""
        return "sdxl" if "text_encoder_2" in index else "sd1"
    if not path.lower().endswith(".safetensors"):
        return ""
    from ..core.safetensors_file import read_header

    try:
        with open(path, "rb") as f:
            entries, _, _ = read_header(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"'{path}' is not a readable safetensors file ({e}).") from e
    return check_family(header_shapes(entries), path)


def header_shapes(entries: dict) -> dict:
    """A safetensors header's entries as meta tensors: what check_family and the config inference read of a
    tensor, without reading it."""
    from ..core.safetensors_file import meta_tensor

    return {k: meta_tensor(e) for k, e in entries.items()}
