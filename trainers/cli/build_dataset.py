"""`python -m trainers build-dataset FOLDER`: prepare images and captions into a training dataset."""
from __future__ import annotations

import argparse
import io
import json
import sys

from ..core import host, path_policy, safe_io
from ..dataset_build.builder import MODES, BuildSettings, build_from_folder
from .progress import print_images_done, until_cancelled


def add_build_command(subparsers) -> argparse.ArgumentParser:
    """`build-dataset FOLDER`: prepare a folder of images (+ .txt captions) into a training dataset."""
    d = BuildSettings()
    p = subparsers.add_parser("build-dataset", help="prepare images and captions into a dataset folder",
                              description=add_build_command.__doc__)
    p.add_argument("folder", help="folder of images; a same-name .txt beside an image is its caption")
    p.add_argument("--name", default="", help="dataset name (default: the folder's name)")
    p.add_argument("--out", help="parent folder of the dataset, inside the output folder (default: <output>/personalize/datasets)")
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--face-crop", action="store_true", help="centre crops on the largest face (needs OpenCV)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="times each image appears per epoch")
    p.add_argument("--bucket-step", type=int, default=d.bucket_step)
    p.add_argument("--min-ratio", type=float, default=d.min_ratio, help="narrowest bucket (width/height)")
    p.add_argument("--max-ratio", type=float, default=d.max_ratio, help="widest bucket (width/height)")
    p.add_argument("--no-dedupe", action="store_true", help="keep near-duplicate images")
    p.add_argument("--dedupe-threshold", type=int, default=d.dedupe_threshold)
    p.add_argument("--class-images", default="", help="DreamBooth class-images folder to record with the dataset")
    p.add_argument("--preview", help="also write a preview grid PNG here (inside the output folder)")
    p.add_argument("--workers", type=int, default=0, help="threads (default: up to 4)")
    p.set_defaults(func=run_build_command)
    return p


def run_build_command(args) -> int:
    settings = BuildSettings(resolution=args.resolution, mode=args.mode, face_crop=args.face_crop,
                             repeats=args.repeats, bucket_step=args.bucket_step, min_ratio=args.min_ratio,
                             max_ratio=args.max_ratio, dedupe=not args.no_dedupe,
                             dedupe_threshold=args.dedupe_threshold)

    # A local tool reads anywhere but writes only inside its output and model folders.
    for option, path in (("--out", args.out), ("--preview", args.preview)):
        if path and not path_policy.is_inside(path, host.writable_roots()):
            print(f"error: {option} {path} is outside the output folder {host.output_dir()}; give a path inside "
                  f"it, or choose the output folder with --output-dir.", file=sys.stderr)
            return 2
    result, stopped = until_cancelled(lambda: build_from_folder(
        args.folder, args.name, settings, root=args.out, class_images=args.class_images,
        workers=args.workers or None, progress=print_images_done),
        "run the same command again to finish (done images are reused)")
    if stopped:
        return stopped
    if args.preview:
        from ..dataset_build.preview_grid import dataset_preview

        buf = io.BytesIO()
        dataset_preview(result.path).save(buf, "PNG")
        safe_io.write_bytes(args.preview, buf.getvalue())
    print(result.summary(), file=sys.stderr)
    print(json.dumps({k: v for k, v in result.dataset_value().items() if k != "summary"}, ensure_ascii=False))
    return 0
