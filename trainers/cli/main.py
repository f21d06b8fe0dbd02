"""Command line: the same run config as the node, outside ComfyUI and under `accelerate launch`.

    python -m trainers train --config run.json [--set steps=200 --set rank=8]
    accelerate launch --num_processes 2 -m trainers train --config run.json
    python -m trainers demo
    python -m trainers build-dataset photos/ --name my_dog --mode buckets
    python -m trainers compare --model base=out/base --model lora=out/lora --photos photos/ --prompts p.txt \
        --class-noun dog
    python -m trainers merge extract --base base.safetensors --tuned dreambooth.safetensors --rank 32 --name subject
    python -m trainers run-workflow workflows/api/train_lora_sd15.json --server http://127.0.0.1:8188 --upload photos/
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..core import host
from ..core.config import ConfigError
from .build_dataset import add_build_command
from .caption import add_caption_command
from .compare import add_compare_command
from .demo import add_demo_command
from .merge import add_merge_command
from .run_workflow import add_run_workflow_command
from .train import add_train_command

COMMANDS = (add_train_command, add_demo_command, add_caption_command, add_build_command, add_compare_command,
            add_merge_command, add_run_workflow_command)  # one module each


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", help="models root (checkpoints/, loras/ ...); default: $COMFYUI_DIR/models or ./models")
    parser.add_argument("--output-dir", help="output root for run folders; default: $COMFYUI_DIR/output or ./output")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    host.configure(models_dir=args.models_dir, output_dir=args.output_dir)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
