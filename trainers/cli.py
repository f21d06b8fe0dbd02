"""Command line: the same run config as the node, outside ComfyUI and under `accelerate launch`.

    python -m trainers train --config run.json [--set steps=200 --set rank=8]
    accelerate launch --num_processes 2 -m trainers train --config run.json
    python -m trainers demo
    python -m trainers build-dataset photos/ --name my_dog --mode buckets
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import host
from .config import ConfigError, TrainConfig


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config_from_args(args) -> TrainConfig:
    data = {}
    if args.config:
        data.update(TrainConfig.from_json(args.config).to_dict())
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} needs the form KEY=VALUE, e.g. --set steps=200.")
        data[key.strip()] = _parse_value(value)
    return TrainConfig.from_dict(data)  # checks every value's type: --set rank=x names rank


def _train(args) -> int:
    from .train import train

    cfg = _config_from_args(args)
    result = train(cfg, progress=_print_progress if args.progress else None)
    if result.lora_path:
        print(json.dumps({"lora": result.lora_path, "run_dir": result.run_dir, "steps": result.steps,
                          "final_loss": result.log[-1]["loss"] if result.log else None}))
    return 0


def _print_progress(step, total, loss):
    print(f"step {step}/{total} loss {loss:.4f}", file=sys.stderr, flush=True)


def _demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, steps=args.steps)
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", help="models root (checkpoints/, loras/ ...); default: $COMFYUI_DIR/models or ./models")
    parser.add_argument("--output-dir", help="output root for run folders; default: $COMFYUI_DIR/output or ./output")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA from a JSON run config and/or --set key=value")
    p.add_argument("--config", help="run config JSON (the run folder's config.json works too)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field (JSON value)")
    p.add_argument("--progress", action="store_true", help="print every step")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="build a tiny model and photos locally, train a LoRA, write a report")
    p.add_argument("--out", default="demo_out", help="folder for the demo's models, data and report")
    p.add_argument("--steps", type=int, default=120)
    p.set_defaults(func=_demo)

    for extra in _extra_commands():
        extra(sub)
    return parser


def _extra_commands():
    """Subcommands that live with their engines (captioning, dataset building)."""
    from .captioning import add_caption_command
    from .dataset_build import add_build_command

    return [add_caption_command, add_build_command]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    host.configure(models_dir=args.models_dir, output_dir=args.output_dir)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
