"""Bake adapters into a checkpoint: each tensor an adapter module changes becomes base + strength x delta
(computed in fp32, stored back in the base's dtype); every other tensor is copied bit-exact. The output is
streamed one tensor at a time, so memory holds the adapters and one tensor's work, never the checkpoint."""
from __future__ import annotations

import json
import time

import torch

from ..core import host, safetensors_file
from ..core.modelspec import modelspec
from ..core.safetensors_file import Pending
from ..families.checkpoint_save import STALE
from ..families.registry import get_family
from .adapter_file import read_adapter
from .outputs import MergeError, MergeResult, open_checkpoint, save_new, source_record


def bake(base: str, adapters: list[tuple[str, float, float]], output_name: str, device="cpu",
         progress=None) -> MergeResult:
    """`adapters`: (file, UNet strength, text-encoder strength). Writes models/checkpoints/<output_name>."""
    started = time.time()
    if not adapters:
        raise MergeError("No adapter to bake: give at least one LoRA, LoHa or LoKr file.")
    checkpoint = open_checkpoint(base)
    modules = checkpoint.modules
    patches = {}  # checkpoint key -> [(rows or None, change(shape) -> tensor, strength)]
    for path, unet_strength, text_strength in adapters:
        for stem, delta in read_adapter(path, modules).modules.items():
            target = modules.targets[stem]
            strength = unet_strength if target.part == "unet" else text_strength
            if not strength:
                continue
            patches.setdefault(target.key, []).append((target.rows, delta.weight, strength))
            if delta.bias() is not None:  # diff_b: the module's bias (rows of OpenCLIP's fused one)
                patches.setdefault(target.bias_key, []).append((target.rows, lambda _, d=delta: d.bias(), strength))
    source = safetensors_file.pending(base, keep=lambda key: not key.startswith(STALE))
    total, done = len(source), [0]

    def counted(pending: Pending) -> Pending:
        def load():
            host.check_interrupt()  # Cancel: the temp file is removed, nothing is published
            done[0] += 1
            if progress is not None:
                progress(done[0], total)
            return pending.load()
        return Pending(pending.shape, pending.dtype, load)

    tensors = {key: counted(_patched(key, p, patches[key], device) if key in patches else p)
               for key, p in source.items()}
    family = get_family(modules.family)
    method = {"method": "bake", "base": source_record(base),
              "adapters": [source_record(p, unet_strength=u, text_strength=t) for p, u, t in adapters]}
    kept = {k: v for k, v in checkpoint.metadata.items() if not k.startswith(("modelspec.", "personalize.merge"))}
    metadata = {**kept, **modelspec(family.architecture, output_name, started),
                "personalize.merge": json.dumps(method, sort_keys=True)}
    path = save_new("checkpoints", output_name, "baked", tensors, metadata)
    return MergeResult(path=path, kind="checkpoint", seconds=time.time() - started,
                       notes=[f"{len(patches)} tensors changed by {len(adapters)} adapter(s); the rest copied."])


def _patched(key: str, pending: Pending, patches: list, device) -> Pending:
    """The base tensor plus each patch (strength x the module's change, in its rows), in the base's dtype."""
    def load():
        weight = pending.load().to(device, torch.float32)
        for rows, change, strength in patches:
            view = weight[rows[0]:rows[1]] if rows else weight
            delta = change(view.shape).to(device) * strength
            if delta.shape != view.shape:
                raise MergeError(f"{key}: a change of shape {list(delta.shape)} for a tensor of {list(view.shape)}")
            view += delta
        return weight.to(pending.dtype).cpu()
    return Pending(pending.shape, pending.dtype, load)
