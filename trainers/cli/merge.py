"""`python -m trainers merge bake|mix|rerank|extract ...`: the merge nodes' operations from the command line.

    python -m trainers merge bake --base base.safetensors --lora subject.safetensors:0.8:1.0 --name baked
    python -m trainers merge mix --base base.safetensors --lora a.safetensors:0.7 --lora b.safetensors:0.5 \
        [--rank 32 | --energy 0.95] --name mixed
    python -m trainers merge rerank --base base.safetensors --lora big.safetensors --rank 8 --name small
    python -m trainers merge extract --base base.safetensors --tuned dreambooth.safetensors --rank 32 --name subject

Files are names inside <models>/checkpoints and <models>/loras, or full paths; results go to those folders.
"""
from __future__ import annotations

import argparse

from ..core import host
from .progress import until_cancelled


def add_merge_command(subparsers) -> argparse.ArgumentParser:
    """`merge`: bake adapters into a checkpoint, mix or re-rank adapters, extract a LoRA from a fine-tune."""
    p = subparsers.add_parser("merge", help="bake, mix, re-rank or extract adapters", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="operation", required=True)
    for name, help_text in (("bake", "adapters into a new checkpoint"), ("mix", "adapters into one LoRA"),
                            ("rerank", "one adapter to a lower rank"), ("extract", "a LoRA from a fine-tune")):
        op = ops.add_parser(name, help=help_text)
        op.add_argument("--base", required=True, help="the base checkpoint (.safetensors)")
        op.add_argument("--name", required=True, help="name of the new file")
        op.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
        if name != "bake":
            op.add_argument("--report", help="also write every module's rank, kept energy and error to this CSV")
        if name == "extract":
            op.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
            op.add_argument("--conv-rank", type=int, default=0, help="rank of 3x3 convs (0: left out)")
        else:
            op.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT[:TEXT_WEIGHT]]",
                            help="an adapter and its weight (bake: UNet strength, then text-encoder strength); "
                                 "repeat it")
        if name != "bake":
            op.add_argument("--rank", type=int, default=32 if name == "extract" else None)
            op.add_argument("--energy", type=float, default=None,
                            help="keep each module's smallest rank reaching this share of its energy (0..1]")
        op.set_defaults(func=run_merge_command)
    return p


def _adapters(specs: list[str], strengths: int) -> list[tuple]:
    """FILE[:W[:W2]] -> (path, w, w2...): a missing weight is the one before it, or 1."""
    out = []
    for spec in specs:
        parts, values = spec.split(":"), []
        while len(parts) > 1 and len(values) < strengths and _number(parts[-1]):  # C:\... keeps its colon
            values.insert(0, float(parts.pop()))
        name = ":".join(parts)
        values += [values[0] if values else 1.0] * (strengths - len(values))
        out.append((host.resolve_model("loras", name, allow_absolute=True), *values))
    return out


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def run_merge_command(args) -> int:
    from ..merge import bake, combine, extract

    base = host.resolve_model("checkpoints", args.base, allow_absolute=True)
    op = args.operation
    if op == "bake":
        work = lambda: bake.bake(base, _adapters(args.lora, 2), args.name, device=args.device)  # noqa: E731
    elif op == "mix":
        work = lambda: combine.mix(base, _adapters(args.lora, 1), args.name, rank=args.rank,  # noqa: E731
                                   energy=args.energy, device=args.device)
    elif op == "rerank":
        (adapter, _), = _adapters(args.lora[:1], 1)
        work = lambda: combine.rerank(base, adapter, args.name, rank=args.rank, energy=args.energy,  # noqa: E731
                                      device=args.device)
    else:
        tuned = host.resolve_model("checkpoints", args.tuned, allow_absolute=True)
        work = lambda: extract.extract(base, tuned, args.name, rank=args.rank, energy=args.energy,  # noqa: E731
                                       conv_rank=args.conv_rank, device=args.device)
    result, cancelled = until_cancelled(work, "nothing was written")
    if cancelled:
        return cancelled
    print(result.summary())
    if getattr(args, "report", None):
        result.write_csv(args.report)
        print(f"per-module report: {args.report}")
    return 0
