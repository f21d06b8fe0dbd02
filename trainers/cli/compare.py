"""`python -m trainers compare --model base=DIR --model lora=DIR --photos DIR --prompts FILE`: the Compare Models
report from folders of images (each model's images sorted by name, prompt after prompt)."""
from __future__ import annotations

import argparse
import sys

from ..data.images import list_images
from ..evaluate.backbones import DEFAULTS
from ..evaluate.errors import BackboneError


def add_compare_command(subparsers) -> argparse.ArgumentParser:
    """`compare`: score models' images with the DreamBench metrics (DINO, CLIP-I, CLIP-T, DIV, PRES)."""
    p = subparsers.add_parser("compare", help="score models' images with the DreamBench metrics",
                              description=__doc__)
    p.add_argument("--model", action="append", required=True, metavar="LABEL=FOLDER",
                   help="a model's images (sorted by file name: k per prompt, prompt after prompt); repeat it")
    p.add_argument("--photos", required=True, help="folder of the subject's real photos")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line, in the images' order")
    p.add_argument("--identifier", default="sks")
    p.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog")
    for kind in ("clip", "dino", "lpips"):
        p.add_argument(f"--{kind}", default=DEFAULTS[kind],
                       help=f"folder under <models>/metrics, a path or a hub id; 'none' skips it "
                            f"(default {DEFAULTS[kind]})")
    p.add_argument("--name", default="compare", help="report folder under <output>/personalize/compare/")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the best available)")
    p.set_defaults(func=run_compare_command)
    return p


def _images(folder: str) -> list:
    from PIL import Image

    paths, _ = list_images(folder)
    if not paths:
        raise ValueError(f"'{folder}' has no images.")
    return [Image.open(path).convert("RGB") for path in paths]


def run_compare_command(args) -> int:
    from ..evaluate import backbones, compare

    models = []
    for spec in args.model:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise ValueError(f"--model {spec!r}: write it as LABEL=FOLDER, e.g. base=out/base.")
        models.append(compare.ModelImages(label, _images(folder)))
    with open(args.prompts, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    try:
        loaded = {kind: backbones.load_backbone(kind, getattr(args, kind), device=args.device)
                  for kind in ("clip", "dino", "lpips") if getattr(args, kind).lower() != "none"}
    except BackboneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = compare.compare(models, prompts, _images(args.photos), identifier=args.identifier,
                             class_noun=args.class_noun, **loaded)
    folder, _, _ = compare.publish(report, models, args.name)
    print(report.markdown())
    print(f"\nreport written to {folder}")
    return 0
