"""What every merge operation shares: opening a base checkpoint, the report, and writing the result (a new file
in its model folder, never overwriting, with metadata recording the sources, weights and method)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

from ..core import host, safe_io, safetensors_file
from ..core.modelspec import modelspec
from ..families.load_errors import ModelLoadError
from ..families.model_hashes import file_sha256
from ..families.registry import get_family
from .module_map import ModuleMap, module_map


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the file and the fix."""


@dataclass
class Checkpoint:
    path: str
    modules: ModuleMap
    metadata: dict


def open_checkpoint(path: str) -> Checkpoint:
    """A single-file base checkpoint's module map, from its header (.safetensors only: merging streams tensors)."""
    if not path.lower().endswith(".safetensors"):
        raise MergeError(f"'{path}' is not a .safetensors checkpoint: merging reads tensors one at a time from "
                         f"safetensors files. Load it with ComfyUI's Load Checkpoint and save it with Save "
                         f"Checkpoint first.")
    try:
        with open(path, "rb") as f:
            entries, metadata, _ = safetensors_file.read_header(f)
        return Checkpoint(path, module_map(entries, path), metadata)
    except (OSError, ValueError) as e:  # ModelLoadError is a ValueError: a LoRA, SD2, a refiner...
        raise MergeError(str(e) if isinstance(e, ModelLoadError) else f"'{path}' cannot be read ({e}).") from e


@dataclass
class ModuleReport:
    stem: str
    rank: int
    kept_energy: float  # share of the delta's squared norm kept (1 when exact)
    rel_error: float  # ||result - delta|| / ||delta||
    norm: float  # ||delta||: weights the total error


@dataclass
class MergeResult:
    path: str  # the file written
    kind: str  # "lora" or "checkpoint"
    modules: list = field(default_factory=list)  # ModuleReport per module (LoRA outputs)
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def total_rel_error(self) -> float:
        """The whole network's relative error: every module's error norm over every module's delta norm."""
        err = sum((m.rel_error * m.norm) ** 2 for m in self.modules)
        ref = sum(m.norm ** 2 for m in self.modules)
        return math.sqrt(err / ref) if ref else 0.0

    @property
    def kept_energy(self) -> float:
        ref = sum(m.norm ** 2 for m in self.modules)
        return sum(m.kept_energy * m.norm ** 2 for m in self.modules) / ref if ref else 1.0

    def summary(self, worst: int = 5) -> str:
        """What was written, the ranks, kept energy and error in total, and the `worst` modules by error."""
        lines = [f"{os.path.basename(self.path)} ({self.kind}) in {self.seconds:.1f} s"]
        if self.modules:
            ranks = sorted({m.rank for m in self.modules})
            rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            lines.append(f"{len(self.modules)} modules, rank {rank_text}; kept energy {self.kept_energy:.4f}, "
                         f"relative error {self.total_rel_error:.4f} in total")
            for m in sorted(self.modules, key=lambda m: -m.rel_error)[:worst]:
                if m.rel_error > 0:
                    lines.append(f"  {m.stem}: rank {m.rank}, kept energy {m.kept_energy:.4f}, "
                                 f"relative error {m.rel_error:.4f}")
        return "\n".join(lines + self.notes)

    def write_csv(self, path: str) -> None:
        """Every module's rank, kept energy and relative error."""
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["module", "rank", "kept_energy", "rel_error"])
            writer.writeheader()
            writer.writerows(self.report_rows())

    def report_rows(self) -> list[dict]:
        return [{"module": m.stem, "rank": m.rank, "kept_energy": round(m.kept_energy, 6),
                 "rel_error": round(m.rel_error, 6)} for m in self.modules]


def source_record(path: str, **fields) -> dict:
    """One input as the metadata records it: its file name, sha256 and the weights it was used with."""
    return {"name": os.path.basename(path), "sha256": file_sha256(path), **fields}


def lora_metadata(family_name: str, name: str, method: dict, tensors: dict, rank: int, conv_rank: int) -> dict:
    """kohya's ss_* keys that A1111, Civitai and kohya's tools read, modelspec, and the merge record."""
    from ..networks.lora_metadata import tensor_hashes

    family = get_family(family_name)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": family.base_model_version, "ss_v2": "False", "ss_output_name": name,
            **modelspec(f"{family.architecture}/lora", name, time.time()),
            "personalize.merge": json.dumps(method, sort_keys=True)}
    if conv_rank:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = tensor_hashes(tensors, meta)
    return meta


def save_new(folder: str, name: str, default: str, tensors: dict, metadata: dict) -> str:
    """models/<folder>/<name>.safetensors, or name_2...: written to a temp file and published without overwriting."""
    return safe_io.save_new(host.model_dirs(folder)[0], safe_io.sanitize_name(name, default), ".safetensors",
                            safe_io.safetensors_writer(tensors, metadata), roots=host.writable_roots())
