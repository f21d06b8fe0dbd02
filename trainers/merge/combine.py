"""Mix several adapters into one LoRA, or re-rank one: per module the weighted sum of their changes, either
exactly (LoRA factors side by side: the ranks add up) or truncated by SVD to a rank or an energy share."""
from __future__ import annotations

import time

import torch

from ..core import host
from .adapter_file import read_adapter
from .lowrank import factorize
from .outputs import MergeError, MergeResult, ModuleReport, lora_metadata, open_checkpoint, save_new, source_record


def mix(base: str, adapters: list[tuple[str, float]], output_name: str, rank: int | None = None,
        energy: float | None = None, device="cpu", save_dtype=torch.float16, progress=None,
        method: str = "mix") -> MergeResult:
    """`adapters`: (file, weight). rank and energy None: exact; else each module's summed change is truncated
    (energy: the smallest rank keeping that share, at most `rank` when given). `base` names the model the
    adapters belong to: it gives the modules' shapes and checks every adapter fits it."""
    started = time.time()
    if not adapters:
        raise MergeError("No adapter given: pick at least one LoRA, LoHa or LoKr file.")
    modules = open_checkpoint(base).modules
    loaded = [(read_adapter(path, modules), weight) for path, weight in adapters]
    stems = sorted({stem for adapter, _ in loaded for stem in adapter.modules})
    tensors, reports = {}, []
    for done, stem in enumerate(stems, 1):
        host.check_interrupt()
        parts = [(adapter.modules[stem], weight) for adapter, weight in loaded if stem in adapter.modules]
        shape = modules.targets[stem].shape
        dense = sum(weight * delta.weight(shape).to(device) for delta, weight in parts)
        norm = float(dense.norm())
        if rank is None and energy is None and all(_plain_lora(delta) for delta, _ in parts):
            tensors.update(_concatenated(stem, parts, save_dtype))
            reports.append(ModuleReport(stem, sum(d.rank for d, _ in parts), 1.0, 0.0, norm))
        else:  # truncated; or exact at a rank the sum cannot exceed (LoHa, LoKr, Tucker have no factors to stack)
            exact = min(sum(_rank_bound(delta, shape) for delta, _ in parts), shape[0], dense[0].numel())
            low = (factorize(dense, energy=energy, max_rank=rank) if energy else
                   factorize(dense, rank=rank or exact))
            tensors.update(low.tensors(stem, save_dtype))
            reports.append(ModuleReport(stem, low.rank, low.kept_energy, low.rel_error, norm))
        if progress is not None:
            progress(done, len(stems))
    record = {"method": method, "base": source_record(base), "rank": rank, "energy": energy,
              "adapters": [source_record(path, weight=weight) for path, weight in adapters]}
    top = max(r.rank for r in reports)
    metadata = lora_metadata(modules.family, output_name, record, tensors, top, 0)
    path = save_new("loras", output_name, method, tensors, metadata)
    return MergeResult(path=path, kind="lora", modules=reports, seconds=time.time() - started)


def rerank(base: str, adapter: str, output_name: str, rank: int | None = None, energy: float | None = None,
           device="cpu", save_dtype=torch.float16, progress=None) -> MergeResult:
    """One adapter at a lower rank (or the smallest rank per module keeping `energy`), by SVD."""
    if rank is None and energy is None:
        raise MergeError("Re-rank needs a target rank or an energy share (e.g. rank 8, or energy 0.95).")
    return mix(base, [(adapter, 1.0)], output_name, rank=rank, energy=energy, device=device, save_dtype=save_dtype,
               progress=progress, method="rerank")


def _rank_bound(delta, shape) -> int:
    """The most directions a module's change can have: a LoRA's rank; a Hadamard product (LoHa) of ranks r1, r2:
    r1 * r2; a Kronecker product (LoKr): the product of its factors' ranks; a full diff: the weight's."""
    t = delta.tensors
    if delta.kind == "lora":
        return t["lora_down.weight"].shape[0]
    if delta.kind == "loha":
        return t["hada_w1_b"].shape[0] * t["hada_w2_b"].shape[0]
    if delta.kind == "lokr":
        sides = [t[f"lokr_{s}_b"].shape[0] if f"lokr_{s}_b" in t else min(t[f"lokr_{s}"][0].numel(),
                                                                          t[f"lokr_{s}"].shape[0])
                 for s in ("w1", "w2")]
        return sides[0] * sides[1]
    return min(shape[0], int(torch.Size(shape[1:]).numel()))


def _plain_lora(delta) -> bool:
    return delta.kind == "lora" and "lora_mid.weight" not in delta.tensors


def _concatenated(stem: str, parts: list, dtype) -> dict:
    """sum_i w_i * s_i * up_i @ down_i as one LoRA: downs stacked, ups side by side carrying w_i * s_i, and
    alpha = the total rank (scale 1)."""
    downs = [delta.tensors["lora_down.weight"].float() for delta, _ in parts]
    ups = [delta.tensors["lora_up.weight"].float() * (weight * delta.scale) for delta, weight in parts]
    total = sum(d.shape[0] for d in downs)
    return {f"{stem}.lora_down.weight": torch.cat(downs, 0).to(dtype).contiguous(),
            f"{stem}.lora_up.weight": torch.cat(ups, 1).to(dtype).contiguous(),
            f"{stem}.alpha": torch.tensor(float(total))}
