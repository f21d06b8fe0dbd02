"""`python -m trainers caption FOLDER --model NAME`: BLIP captions beside a folder's images."""
from __future__ import annotations

import argparse
import sys

from ..captioning.blip import CaptionError, load_blip
from ..captioning.folders import POLICIES, caption_folder
from ..core import host
from ..core.dtypes import DTYPES
from .progress import print_images_done, until_cancelled


def add_caption_command(subparsers) -> argparse.ArgumentParser:
    """`caption FOLDER --model NAME`: write BLIP captions beside the images of a folder."""
    p = subparsers.add_parser("caption", help="write BLIP captions (name.txt) beside the images of a folder",
                              description=add_caption_command.__doc__)
    p.add_argument("folder", help="folder of images; captions are written beside them")
    p.add_argument("--model", required=True,
                   help="a folder under <models>/blip, a full path to a BLIP folder, or a hub id (org/name)")
    # SUPPRESS: a main parser's own --models-dir (given before 'caption') is not reset to None.
    p.add_argument("--models-dir", default=argparse.SUPPRESS,
                   help="the models root holding blip/ (default: $COMFYUI_DIR/models or ./models)")
    p.add_argument("--policy", choices=POLICIES, default="keep", help="what to do with existing captions")
    p.add_argument("--prompt", default="", help='conditional start, e.g. "a photo of" (not repeated in the file)')
    p.add_argument("--prefix", default="", help='text put before each caption, e.g. "a photo of sks person"')
    p.add_argument("--suffix", default="", help="text put after each caption")
    p.add_argument("--beams", type=int, default=3, help="beam search width (1: greedy)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--min-length", type=int, default=5, help="minimum caption length in tokens")
    p.add_argument("--max-length", type=int, default=30, help="maximum caption length in tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: fp16 on CUDA, else fp32")
    p.set_defaults(func=run_caption_command)
    return p


def run_caption_command(args) -> int:
    if getattr(args, "models_dir", None):
        host.configure(models_dir=args.models_dir)
    try:
        captioner = load_blip(args.model, device=args.device, dtype=args.dtype)
    except CaptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        report, stopped = until_cancelled(lambda: caption_folder(
            captioner, args.folder, policy=args.policy, prefix=args.prefix, suffix=args.suffix,
            prefix_prompt=args.prompt, batch_size=args.batch_size, progress=print_images_done,
            num_beams=args.beams, do_sample=args.sample, seed=args.seed,
            min_length=args.min_length, max_length=args.max_length),
            "the captions written so far are complete")
    except CaptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stopped:
        return stopped
    print(report.summary())
    return 0
