"""Is trainers.merge.module_delta's weight change of a module the one ComfyUI applies?

Run with ComfyUI's interpreter (no model needed, CPU, a second or two):

    /work/comfyui/venv/bin/python tests/comfy_module_delta_equivalence.py [--comfy-dir /work/comfyui]

For every variant in `cases()` (LoRA plain, conv, LoCon Tucker `lora_mid`, no alpha, fp16/bf16; LoHa plain,
conv, CP `hada_t1/t2`; LoKr with each mix of full and factored w1/w2, conv, `lokr_t2`; `diff` + `diff_b`) it
loads the tensors with comfy.lora.load_lora, patches a zero weight (and bias) at strength 1 with
comfy.lora.calculate_weight, and compares with ModuleDelta.weight() / bias(). Prints one line per case and
`MODULE_DELTA_EQUIVALENCE {json}` with the worst relative error; exits 1 above 1e-6 or on any ComfyUI warning.

A case ComfyUI fails on as shipped (it logs `ERROR` and skips the module: today `lokr_t2`, see contiguous_kron)
is listed under `comfy_failed_as_shipped` and compared again with that one torch call fixed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "m"  # the model key the stems map to: m.weight, m.bias


def cases(seed: int = 0) -> list:
    """(name, {suffix: tensor}, weight shape) of every variant a file can hold, random and small."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    a = lambda v: torch.tensor(float(v))  # noqa: E731
    return [
        ("lora linear", {"lora_down.weight": r(3, 6), "lora_up.weight": r(8, 3), "alpha": a(5)}, (8, 6)),
        ("lora conv3x3", {"lora_down.weight": r(3, 6, 3, 3), "lora_up.weight": r(8, 3, 1, 1), "alpha": a(2)},
         (8, 6, 3, 3)),
        ("lora conv1x1", {"lora_down.weight": r(2, 6, 1, 1), "lora_up.weight": r(8, 2, 1, 1), "alpha": a(7)},
         (8, 6, 1, 1)),
        ("lora mid (tucker)", {"lora_down.weight": r(3, 6, 1, 1), "lora_mid.weight": r(3, 3, 3, 3),
                               "lora_up.weight": r(8, 3, 1, 1), "alpha": a(1.5)}, (8, 6, 3, 3)),
        ("lora no alpha", {"lora_down.weight": r(4, 6), "lora_up.weight": r(8, 4)}, (8, 6)),
        ("lora fp16", {"lora_down.weight": r(3, 6, dtype=torch.float16),
                       "lora_up.weight": r(8, 3, dtype=torch.float16), "alpha": a(5).half()}, (8, 6)),
        ("lora bf16 + diff_b", {"lora_down.weight": r(3, 6, dtype=torch.bfloat16),
                                "lora_up.weight": r(8, 3, dtype=torch.bfloat16), "alpha": a(3).bfloat16(),
                                "diff_b": r(8, dtype=torch.bfloat16)}, (8, 6)),
        ("loha linear", {"hada_w1_a": r(8, 3), "hada_w1_b": r(3, 6), "hada_w2_a": r(8, 3), "hada_w2_b": r(3, 6),
                         "alpha": a(2)}, (8, 6)),
        ("loha conv3x3", {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 54), "hada_w2_a": r(8, 2),
                          "hada_w2_b": r(2, 54), "alpha": a(5)}, (8, 6, 3, 3)),
        ("loha cp (t1/t2)", {"hada_w1_a": r(3, 8), "hada_w1_b": r(3, 6), "hada_t1": r(3, 3, 3, 3),
                             "hada_w2_a": r(3, 8), "hada_w2_b": r(3, 6), "hada_t2": r(3, 3, 3, 3), "alpha": a(4)},
         (8, 6, 3, 3)),
        ("loha no alpha", {"hada_w1_a": r(8, 3), "hada_w1_b": r(3, 6), "hada_w2_a": r(8, 3), "hada_w2_b": r(3, 6)},
         (8, 6)),
        ("lokr w1 + w2 full (alpha ignored)", {"lokr_w1": r(2, 2), "lokr_w2": r(4, 3), "alpha": a(9)}, (8, 6)),
        ("lokr w1 + w2_a/b", {"lokr_w1": r(2, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 3), "alpha": a(3)},
         (8, 6)),
        ("lokr w1_a/b + w2 full", {"lokr_w1_a": r(2, 1), "lokr_w1_b": r(1, 2), "lokr_w2": r(4, 3), "alpha": a(3)},
         (8, 6)),
        ("lokr w1_a/b + w2_a/b (w2_b's rank)", {"lokr_w1_a": r(4, 1), "lokr_w1_b": r(1, 2), "lokr_w2_a": r(4, 3),
                                                "lokr_w2_b": r(3, 4), "alpha": a(5)}, (16, 8)),
        ("lokr conv w2 full 4-D", {"lokr_w1": r(2, 2), "lokr_w2": r(4, 3, 3, 3), "alpha": a(6)}, (8, 6, 3, 3)),
        ("lokr conv w2_a/b flat", {"lokr_w1": r(2, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 27), "alpha": a(3)},
         (8, 6, 3, 3)),
        ("lokr conv t2", {"lokr_w1": r(2, 2), "lokr_w2_a": r(2, 4), "lokr_w2_b": r(2, 3), "lokr_t2": r(2, 2, 3, 3),
                          "alpha": a(3)}, (8, 6, 3, 3)),
        ("lokr fp16", {"lokr_w1": r(2, 2, dtype=torch.float16), "lokr_w2_a": r(4, 2, dtype=torch.float16),
                       "lokr_w2_b": r(2, 3, dtype=torch.float16), "alpha": a(3).half()}, (8, 6)),
        ("diff + diff_b", {"diff": r(8, 6, 3, 3), "diff_b": r(8)}, (8, 6, 3, 3)),
        ("diff_b only", {"diff_b": r(8)}, (8, 6)),
    ]


def rel(a, b) -> float:
    """|a - b| / |b| (Frobenius norms); the absolute norm when b is zero."""
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def comfy_patch(tensors: dict, shape) -> tuple:
    """(weight change, bias change or None) that ComfyUI applies to a zero weight / bias at strength 1."""
    import torch
    import comfy.lora

    stem = "lora_unet_m"
    patches = comfy.lora.load_lora({f"{stem}.{k}": v for k, v in tensors.items()}, {stem: f"{MODULE}.weight"})
    out = []
    for key, zero in ((f"{MODULE}.weight", torch.zeros(shape)), (f"{MODULE}.bias", torch.zeros(shape[0]))):
        patch = patches.get(key)
        out.append(None if patch is None else
                   comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], zero, key))
    return tuple(out)


def contiguous_kron():
    """torch.kron given contiguous inputs, as peft and LyCORIS call it. ComfyUI's LoKr passes the strided view its
    `lokr_t2` einsum returns, which torch.kron refuses (`view size is not compatible`): ComfyUI then logs an ERROR
    and leaves that module unpatched. Comparing under this patch checks the rest of ComfyUI's math for that case."""
    import torch

    kron = torch.kron
    torch.kron = lambda a, b: kron(a.contiguous(), b.contiguous())
    return lambda: setattr(torch, "kron", kron)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfy-dir", default="/work/comfyui")
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1] + ["--cpu"]  # ComfyUI parses the command line when its options are on
    sys.path[:0] = [os.path.abspath(args.comfy_dir), REPO]
    import comfy.options
    comfy.options.enable_args_parsing()

    from comfy_lora_equivalence import _Collect  # beside this file
    from trainers.merge.module_delta import ModuleDelta

    collect = _Collect()
    logging.getLogger().addHandler(collect)
    worst, comfy_failed, warnings = 0.0, {}, []
    for name, tensors, shape in cases():
        delta = ModuleDelta.from_tensors("lora_unet_m", tensors)
        collect.lines = []
        comfy_w, comfy_b = comfy_patch(tensors, shape)
        if any(line.startswith("ERROR") for line in collect.lines):
            comfy_failed[name] = collect.lines
            restore = contiguous_kron()
            collect.lines = []
            comfy_w, comfy_b = comfy_patch(tensors, shape)
            restore()
        warnings += collect.lines
        err = rel(delta.weight(shape), comfy_w) if comfy_w is not None else float(delta.weight(shape).norm())
        ours_b = delta.bias()
        if (ours_b is None) != (comfy_b is None):
            err = float("inf")
        elif ours_b is not None:
            err = max(err, rel(ours_b, comfy_b))
        worst = max(worst, err)
        note = "  (ComfyUI as shipped failed; compared with contiguous kron)" if name in comfy_failed else ""
        print(f"{name:36s} kind={delta.kind:5s} rank={delta.rank} scale={delta.scale:.4g} rel_err={err:.2e}{note}")
    summary = {"cases": len(cases()), "worst_rel_err": worst, "comfy_failed_as_shipped": comfy_failed,
               "comfy_warnings": warnings}
    print("MODULE_DELTA_EQUIVALENCE " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    s = main()
    sys.exit(0 if s["worst_rel_err"] <= 1e-6 and not s["comfy_warnings"] else 1)
