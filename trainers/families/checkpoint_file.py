"""Reading a checkpoint file's tensors without running code from it (.safetensors, or torch.load(weights_only=True))."""
from __future__ import annotations

import os

import torch

from .load_errors import SUPPORTED, ModelLoadError

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str, keep=None, dtype=None, rest_as_meta: bool = False) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of a checkpoint file; never runs code from the file. `keep(key)`, when
    given, selects the tensors to read (a safetensors file then reads only those); with `rest_as_meta` the others
    come back as meta tensors (shape only), so a model's layout can be checked without its weights; `dtype`,
    floating-point tensors come back in it (a safetensors file converts each as it is read)."""
    keep = keep or (lambda key: True)
    if os.path.getsize(path) == 0:
        raise ModelLoadError(f"'{path}' is empty (0 bytes): the download or copy did not finish.")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        from ..core import safetensors_file

        try:  # each tensor read into fresh memory, without mapping the whole file (see safetensors_file)
            return safetensors_file.read(path, keep, dtype, rest_as_meta)
        except ValueError as e:
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
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        return {k: v if keep(k) else v.to("meta") for k, v in tensors.items() if rest_as_meta or keep(k)}, {}
    raise ModelLoadError(f"'{path}' is not a checkpoint file. {SUPPORTED}")
