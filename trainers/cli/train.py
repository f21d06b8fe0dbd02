"""`python -m trainers train --config run.json [--set key=value]`: the node's run config on the command line."""
from __future__ import annotations

import json
import sys

from ..core.config import ConfigError, TrainConfig


def add_train_command(subparsers):
    import argparse

    from ..core.config import describe

    p = subparsers.add_parser("train", help="train a LoRA or an embedding from a JSON run config and/or --set "
                                            "key=value", epilog="settings (for --config JSON or --set):" + describe(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config JSON (the run folder's config.json works too)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field (JSON value)")
    p.add_argument("--progress", action="store_true", help="print every step")
    p.set_defaults(func=run_train_command)
    return p


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config_from_args(args) -> TrainConfig:
    data = {}
    if args.config:
        data.update(TrainConfig.from_json(args.config).values())
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} needs the form KEY=VALUE, e.g. --set steps=200.")
        data[key.strip()] = _parse_value(value)
    return TrainConfig.from_dict(data)  # checks every value's type: --set rank=x names rank


def run_train_command(args) -> int:
    from ..training.loop import train

    cfg = _config_from_args(args)
    result = train(cfg, progress=_print_progress if args.progress else None)
    if result.artifact:
        print(json.dumps({result.artifact.kind: result.artifact.path, "run_dir": result.run_dir, "steps": result.steps,
                          "final_loss": result.log[-1]["loss"] if result.log else None}))
    return 0


def _print_progress(step, total, loss):
    print(f"step {step}/{total} loss {loss:.4f}", file=sys.stderr, flush=True)
