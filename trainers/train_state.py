"""Resumable training state in safetensors + JSON (no pickles): trainable weights, optimizer, step."""
from __future__ import annotations

import json
import os

import torch

from . import safe_io


def _flatten(obj, prefix, tensors):
    """Tensors go to `tensors` under dotted paths; everything else stays as JSON."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _key(k):
    return {"__int__": k} if isinstance(k, int) else k


def _unflatten(obj, tensors):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {(k["__int__"] if isinstance(k, dict) else k): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save(directory: str, *, trainable: dict, optimizer_state: dict, scheduler_state: dict, step: int) -> str:
    """Write a checkpoint folder; it only appears under its final name once complete."""
    tmp = directory + ".part"
    os.makedirs(tmp, exist_ok=True)
    opt_tensors = {}
    opt_json = _flatten(optimizer_state, "opt", opt_tensors)
    safe_io.save_safetensors(trainable, os.path.join(tmp, "trainable.safetensors"))
    safe_io.save_safetensors(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    safe_io.write_json(os.path.join(tmp, "state.json"), {
        "step": step, "optimizer": opt_json, "scheduler": scheduler_state})
    if os.path.exists(directory):
        raise FileExistsError(f"checkpoint {directory} already exists")
    os.replace(tmp, directory)
    return directory


def load(directory: str) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
        meta = json.load(f)
    opt_tensors = load_file(os.path.join(directory, "optimizer.safetensors"))
    return {
        "step": meta["step"],
        "trainable": load_file(os.path.join(directory, "trainable.safetensors")),
        "optimizer": _unflatten(meta["optimizer"], opt_tensors),
        "scheduler": meta["scheduler"],
    }
