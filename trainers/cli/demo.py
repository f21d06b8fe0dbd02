"""`python -m trainers demo`: a tiny model and photos built locally, a LoRA trained on them, a report."""
from __future__ import annotations


def add_demo_command(subparsers):
    p = subparsers.add_parser("demo", help="build a tiny model and photos locally, train a LoRA, write a report")
    p.add_argument("--out", default="demo_out", help="folder for the demo's models, data and report")
    p.add_argument("--steps", type=int, default=120)
    p.set_defaults(func=run_demo_command)
    return p


def run_demo_command(args) -> int:
    from ..testing.demo import run_demo

    report = run_demo(args.out, steps=args.steps)
    print(report)
    return 0
