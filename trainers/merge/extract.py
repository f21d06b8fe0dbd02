"""Extract a LoRA from a fine-tuned checkpoint: per module, the difference from its base, truncated by SVD to a
rank (or the smallest rank keeping an energy share). Module by module in fp32 on the chosen device, so memory
holds two tensors and one SVD, never the checkpoints."""
from __future__ import annotations

import time

import torch

from ..core import host, safetensors_file
from .lowrank import factorize
from .outputs import (MergeError, MergeResult, ModuleReport, lora_metadata, open_checkpoint, save_new,
                      source_record)

UNCHANGED = 1e-6  # a module whose difference is below this share of its weight did not train (kohya skips it too)


def extract(base: str, tuned: str, output_name: str, rank: int = 32, energy: float | None = None,
            conv_rank: int = 0, device="cpu", save_dtype=torch.float16, progress=None) -> MergeResult:
    """A kohya LoRA of `tuned` - `base` in models/loras. `energy` (0..1]: each module keeps the smallest rank
    reaching that share of its difference's energy, at most `rank`. conv_rank > 0 also extracts 3x3 convs."""
    started = time.time()
    old, new = open_checkpoint(base), open_checkpoint(tuned)
    _check_same_architecture(old, new)
    targets = old.modules.extractable(conv=conv_rank > 0)
    before, after = safetensors_file.pending(base), safetensors_file.pending(tuned)
    tensors, reports, skipped = {}, [], 0
    loaded = {}  # the last checkpoint key read (OpenCLIP's q, k, v share one)
    for done, (stem, target) in enumerate(targets.items(), 1):
        host.check_interrupt()
        if target.key not in loaded:
            loaded = {target.key: (before[target.key].load(), after[target.key].load())}
        w0, w1 = loaded[target.key]
        if target.rows:
            w0, w1 = w0[target.rows[0]:target.rows[1]], w1[target.rows[0]:target.rows[1]]
        diff = w1.to(device, torch.float32) - w0.to(device, torch.float32)
        norm = float(diff.norm())
        if norm <= UNCHANGED * float(w0.float().norm()):
            skipped += 1
        else:
            limit = conv_rank if target.spatial else rank
            low = factorize(diff, energy=energy, max_rank=limit) if energy else factorize(diff, rank=limit)
            tensors.update(low.tensors(stem, save_dtype))
            reports.append(ModuleReport(stem, low.rank, low.kept_energy, low.rel_error, norm))
        if progress is not None:
            progress(done, len(targets))
    if not tensors:
        raise MergeError(f"'{tuned}' does not differ from '{base}' in any module a LoRA covers: nothing to "
                         f"extract (is it the same model?).")
    method = {"method": "extract", "base": source_record(base), "tuned": source_record(tuned), "rank": rank,
              "energy": energy, "conv_rank": conv_rank}
    metadata = lora_metadata(old.modules.family, output_name, method, tensors, rank, conv_rank)
    path = save_new("loras", output_name, "extracted", tensors, metadata)
    notes = [f"{skipped} modules unchanged, left out."] if skipped else []
    return MergeResult(path=path, kind="lora", modules=reports, seconds=time.time() - started, notes=notes)


def _check_same_architecture(old, new) -> None:
    """Two checkpoints of one family and layout; otherwise a message that says how they differ."""
    names = {"sd1": "SD1.x", "sdxl": "SDXL"}
    if old.modules.family != new.modules.family:
        raise MergeError(f"'{new.path}' is {names[new.modules.family]} and '{old.path}' is "
                         f"{names[old.modules.family]}: a LoRA can only be extracted between two checkpoints of "
                         f"one architecture. Pick the base the fine-tune was trained from.")
    a, b = old.modules.targets, new.modules.targets
    differ = sorted(set(a) ^ set(b)) or sorted(s for s in a if a[s].shape != b[s].shape)
    if differ:
        raise MergeError(f"'{new.path}' and '{old.path}' have different layouts ({len(differ)} modules differ, "
                         f"e.g. {differ[0]}): pick the base the fine-tune was trained from.")
