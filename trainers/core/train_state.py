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
    safe_io.fsync_dir(os.path.dirname(os.path.abspath(directory)))  # the rename survives a power cut
    return directory


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file at fault."""


def _read(directory: str, name: str, reader):
    try:
        return reader(os.path.join(directory, name))
    except Exception as e:  # missing, empty, truncated or garbled: safetensors and json raise many kinds
        raise CheckpointError(f"{name} cannot be read ({type(e).__name__}: {e})") from e


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(directory: str) -> dict:
    """Everything in a checkpoint folder, read in full (nothing is applied here); CheckpointError if unreadable."""
    from safetensors.torch import load_file

    meta = _read(directory, "state.json", _read_json)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "optimizer" not in meta:
        raise CheckpointError("state.json lacks its step or optimizer entries")
    opt_tensors = _read(directory, "optimizer.safetensors", load_file)
    try:
        optimizer = _unflatten(meta["optimizer"], opt_tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"optimizer.safetensors does not match state.json ({e!r})") from e
    return {
        "step": meta["step"],
        "trainable": _read(directory, "trainable.safetensors", load_file),
        "optimizer": optimizer,
        "scheduler": meta.get("scheduler"),
    }


def load_checked(checkpoint: str, params: dict, optimizer, scheduler) -> dict:
    """A checkpoint read in full and checked against this model, optimizer and scheduler; CheckpointError if not."""
    saved = load(checkpoint)
    folder_step = int(os.path.basename(checkpoint).rsplit("_", 1)[1])
    if saved["step"] != folder_step:
        raise CheckpointError(f"state.json says step {saved['step']}, its folder says {folder_step}")
    tensors = saved["trainable"]
    if set(tensors) != set(params):
        odd = sorted(set(tensors) ^ set(params))
        raise CheckpointError(f"trainable.safetensors does not fit this model ({len(odd)} tensors differ, e.g. {odd[0]})")
    for k, v in tensors.items():
        if v.shape != params[k].shape:
            raise CheckpointError(f"trainable.safetensors has {k} of shape {tuple(v.shape)}, expected {tuple(params[k].shape)}")
    _check_optimizer_state(saved["optimizer"], optimizer)
    if not isinstance(saved["scheduler"], dict) or not set(scheduler.state_dict()) <= set(saved["scheduler"]):
        raise CheckpointError("state.json has no scheduler state for this schedule")
    return saved


def _check_optimizer_state(state, optimizer) -> None:
    """What Optimizer.load_state_dict would only find out half-way: group sizes and moment shapes."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(state.get("state"), dict) or \
            [len(g.get("params", [])) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("the optimizer state does not fit this model's parameter groups")
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    for index, moments in state["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):  # AdamW and Prodigy: one value per weight
            value = moments.get(key) if isinstance(moments, dict) else None
            if isinstance(value, torch.Tensor) and (not isinstance(index, int) or index >= len(flat)
                                                    or value.shape != flat[index].shape):
                raise CheckpointError(f"optimizer.safetensors has {key} of parameter {index} in the wrong shape")
