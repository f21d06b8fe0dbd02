"""The weight change one module of an adapter file makes, computed as ComfyUI applies it at strength 1
(comfy/weight_adapter/lora.py, loha.py, lokr.py; `diff`/`diff_b` in comfy/lora.py).

A file holds `<stem>.<suffix>` tensors; a module's kind follows from its suffixes:
  lora: `lora_down.weight`, `lora_up.weight`, optional `lora_mid.weight` (LoCon's Tucker core)
  loha: `hada_w1_a/_b`, `hada_w2_a/_b`, optional `hada_t1` + `hada_t2` (CP cores)
  lokr: `lokr_w1` or `lokr_w1_a/_b`, `lokr_w2` or `lokr_w2_a/_b`, optional `lokr_t2` (with `lokr_w2_a/_b`)
  full: `diff` (the change itself)
Any kind may have `alpha` (its scale) and `diff_b` (a bias change, which ComfyUI applies beside any weight patch).
`dora_scale` is recognised only to be refused: DoRA's change depends on the base weight.

All math is float32 on the tensors' own device, as ComfyUI's patcher does it (its intermediate dtype).
One deliberate difference: ComfyUI's LoKr hands torch.kron the strided view its `lokr_t2` einsum returns, which
current torch refuses, so ComfyUI logs an error and leaves such a module unpatched; here w2 is made contiguous
first (as peft and LyCORIS do) and the module gets the change its trainer meant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff",),
}
SHARED = ("alpha", "diff_b", "dora_scale")
# Longest first: a key is split on the longest known suffix it ends with.
SUFFIXES = tuple(sorted({s for kind in KINDS.values() for s in kind} | set(SHARED), key=len, reverse=True))


def split_key(key: str) -> tuple[str, str] | None:
    """(stem, suffix) of a file key, or None when it ends with no known suffix."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[:-len(suffix) - 1], suffix
    return None


def group_by_module(state_dict: dict) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """({stem: {suffix: tensor}}, the keys with no known suffix). Unknown keys are handed back rather than raised
    on: ComfyUI skips them with a warning (`lora key not loaded`), so a caller can report them and go on."""
    modules, unknown = {}, []
    for key, tensor in state_dict.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
        else:
            modules.setdefault(split[0], {})[split[1]] = tensor
    return modules, unknown


@dataclass
class ModuleDelta:
    stem: str
    kind: str  # "lora", "loha", "lokr", "full"
    tensors: dict  # suffix -> tensor, as in the file (alpha included)

    @staticmethod
    def from_tensors(stem: str, tensors: dict) -> "ModuleDelta":
        """The module `stem` from its {suffix: tensor}; ValueError naming the stem and its keys when the set is
        incomplete, mixes kinds or is DoRA."""
        keys = sorted(tensors)
        if "dora_scale" in tensors:
            raise ValueError(f"{stem}: DoRA (dora_scale) is not supported; keys {keys}")
        unknown = [s for s in keys if s not in SUFFIXES]
        if unknown:
            raise ValueError(f"{stem}: unknown suffixes {unknown}; keys {keys}")
        kinds = [kind for kind, suffixes in KINDS.items() if any(s in tensors for s in suffixes)]
        if len(kinds) > 1:
            raise ValueError(f"{stem}: mixes network kinds {kinds}; keys {keys}")
        if not kinds and "diff_b" not in tensors:
            raise ValueError(f"{stem}: no weight tensors; keys {keys}")
        kind = kinds[0] if kinds else "full"  # a bias-only module is a full diff of the bias
        problem = _CHECKS[kind](tensors)
        if problem:
            raise ValueError(f"{stem}: incomplete or inconsistent {kind} module ({problem}); keys {keys}")
        return ModuleDelta(stem, kind, dict(tensors))

    @property
    def alpha(self) -> float | None:
        alpha = self.tensors.get("alpha")
        return None if alpha is None else float(alpha)  # ComfyUI: lora[alpha].item()

    @property
    def rank(self) -> int | None:
        """The rank ComfyUI divides alpha by: lora_down's rows, hada_w1_b's rows, for LoKr the rows of the last
        factored matrix (w2_b, else w1_b; None when both factors are full); None for a full diff."""
        t = self.tensors
        if self.kind == "lora":
            return t["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for name in ("lokr_w2_b", "lokr_w1_b"):
                if name in t:
                    return t[name].shape[0]
        return None

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without an alpha or without a rank (LoKr with both factors full ignores alpha)."""
        alpha, rank = self.alpha, self.rank
        return 1.0 if alpha is None or rank is None else alpha / rank

    def weight(self, shape, dtype=torch.float32) -> torch.Tensor:
        """The dense change of the module's weight (scale included) in the weight's `shape`
        (linear [out, in], conv [out, in, kh, kw])."""
        shape = torch.Size(shape)
        if self.kind == "full":
            diff = self.tensors.get("diff")
            if diff is None:  # bias only
                return torch.zeros(shape, dtype=dtype, device=self.tensors["diff_b"].device)
            if diff.shape != shape:  # ComfyUI does not reshape a diff: it skips it
                raise ValueError(f"{self.stem}: diff of shape {list(diff.shape)} for a weight of {list(shape)}")
            return diff.to(dtype, copy=True)  # a copy: callers may add to it in place
        try:
            delta = _PRODUCTS[self.kind](self.tensors)
            delta = delta.reshape(shape)
        except RuntimeError as e:
            raise ValueError(f"{self.stem}: {self.kind} tensors do not make a weight of {list(shape)}: {e}") from e
        return (delta * self.scale).to(dtype)

    def bias(self, dtype=torch.float32) -> torch.Tensor | None:
        """The change of the module's bias (`diff_b`), None when the file has none."""
        diff_b = self.tensors.get("diff_b")
        return None if diff_b is None else diff_b.to(dtype, copy=True)


def module_deltas(state_dict: dict) -> tuple[dict[str, ModuleDelta], list[str]]:
    """Every module of an adapter file ({stem: ModuleDelta}) and the keys with no known suffix."""
    modules, unknown = group_by_module(state_dict)
    return {stem: ModuleDelta.from_tensors(stem, t) for stem, t in modules.items()}, unknown


# --- completeness: what ComfyUI would need to compute the change (it logs and skips a module short of it) ---

def _missing(t: dict, names) -> list[str]:
    return [n for n in names if n not in t]


def _check_lora(t: dict) -> str:
    missing = _missing(t, ("lora_down.weight", "lora_up.weight"))
    return f"missing {missing}" if missing else ""


def _check_loha(t: dict) -> str:
    missing = _missing(t, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if missing:
        return f"missing {missing}"
    return "hada_t1 and hada_t2 go together" if ("hada_t1" in t) != ("hada_t2" in t) else ""


def _check_lokr(t: dict) -> str:
    for side in ("w1", "w2"):
        full, a, b = f"lokr_{side}", f"lokr_{side}_a", f"lokr_{side}_b"
        if full in t and (a in t or b in t):
            return f"both {full} and its factors"
        if full not in t and (a not in t or b not in t):
            return f"needs {full} or {a} + {b}"
    return "lokr_t2 needs lokr_w2_a + lokr_w2_b" if "lokr_t2" in t and "lokr_w2" in t else ""


def _check_full(t: dict) -> str:
    return ""


_CHECKS = {"lora": _check_lora, "loha": _check_loha, "lokr": _check_lokr, "full": _check_full}


# --- the unscaled products, one per kind, as comfy/weight_adapter computes them ---

def _f32(t: dict, name: str) -> torch.Tensor:
    return t[name].to(torch.float32)


def _lora(t: dict) -> torch.Tensor:
    up, down = _f32(t, "lora_up.weight").flatten(1), _f32(t, "lora_down.weight").flatten(1)
    if "lora_mid.weight" not in t:
        return up @ down  # conv: up [out, r, 1, 1], down [r, in, kh, kw] -> [out, in * kh * kw]
    # LoCon Tucker: down [r, in, 1, 1] -> mid [r, r, kh, kw] -> up [out, r, 1, 1] (base.tucker_weight_from_conv)
    return torch.einsum("m n ..., i m, n j -> i j ...", _f32(t, "lora_mid.weight"), up, down)


def _cp(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS's CP rebuild: core [r, r, kh, kw], a [r, out], b [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("i j ..., j r, i p -> p r ...", core, b, a)


def _loha(t: dict) -> torch.Tensor:
    if "hada_t1" in t:
        w1 = _cp(_f32(t, "hada_t1"), _f32(t, "hada_w1_a"), _f32(t, "hada_w1_b"))
        w2 = _cp(_f32(t, "hada_t2"), _f32(t, "hada_w2_a"), _f32(t, "hada_w2_b"))
    else:
        w1 = _f32(t, "hada_w1_a") @ _f32(t, "hada_w1_b")
        w2 = _f32(t, "hada_w2_a") @ _f32(t, "hada_w2_b")
    return w1 * w2


def _lokr(t: dict) -> torch.Tensor:
    w1 = _f32(t, "lokr_w1") if "lokr_w1" in t else _f32(t, "lokr_w1_a") @ _f32(t, "lokr_w1_b")
    if "lokr_w2" in t:
        w2 = _f32(t, "lokr_w2")
    elif "lokr_t2" in t:
        w2 = _cp(_f32(t, "lokr_t2"), _f32(t, "lokr_w2_a"), _f32(t, "lokr_w2_b"))
    else:
        w2 = _f32(t, "lokr_w2_a") @ _f32(t, "lokr_w2_b")
    if w2.dim() == 4:  # a conv's w2 keeps its kernel: w1 gets 1x1 one (ComfyUI does this for 4-D only)
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())  # kron refuses the strided view _cp returns (see the module docstring)


_PRODUCTS = {"lora": _lora, "loha": _loha, "lokr": _lokr}
