"""Dataset-build speed on the CPU: images per second for 50 photo-like JPEGs of 2000 px.

Prints the first build (decode, hash, dedupe, crop, resize, PNG) with the default
threads and with one, the idempotent rebuild (every image reused), and for reference
a plain single-threaded loop over the same files: full decode with open_rgb, centre
crop, Lanczos resize, PNG save at the same compression level.

    python bench/bench_dataset.py [--images 50] [--size 2000] [--resolution 512] [--mode buckets]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


from engine import engine  # noqa: E402

host = engine("core.host")
dataset_build, images = engine("dataset_build.builder"), engine("data.images")
MODES, BuildSettings, build_from_folder = dataset_build.MODES, dataset_build.BuildSettings, dataset_build.build_from_folder
list_images, open_rgb = images.list_images, images.open_rgb


def make_photos(folder: str, count: int, size: int, seed: int = 0) -> None:
    """Photo-like JPEGs (gradient, shapes, blur, grain): 4:3 landscape, 3:4 portrait and some 2:1, with captions."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        w, h = (size, size // 2) if i % 5 == 4 else [(size, size * 3 // 4), (size * 3 // 4, size)][i % 2]
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        img = Image.fromarray((top * (1 - t) + bottom * t).repeat(w, axis=1).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = [x0, y0, x0 + int(rng.integers(50, w // 2)), y0 + int(rng.integers(50, h // 2))]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img = img.filter(ImageFilter.GaussianBlur(3))
        img = Image.fromarray(np.clip(np.asarray(img) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))
        img.save(os.path.join(folder, f"photo_{i:03d}.jpg"), quality=90)
        with open(os.path.join(folder, f"photo_{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"a photo number {i}")


def plain_loop(folder: str, out: str, resolution: int) -> float:
    """Seconds for the straightforward way: full decode, centre square, Lanczos, PNG."""
    os.makedirs(out, exist_ok=True)
    paths, _ = list_images(folder)
    t = time.perf_counter()
    for path in paths:
        img = open_rgb(path)
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
        img.save(os.path.join(out, os.path.basename(path) + ".png"), compress_level=1)  # the builder's level
    return time.perf_counter() - t


def timed_build(folder, name, settings, workers):
    t = time.perf_counter()
    result = build_from_folder(folder, name, settings, workers=workers)
    return time.perf_counter() - t, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--size", type=int, default=2000, help="long side of the photos in pixels")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--mode", choices=MODES, default="buckets")
    ap.add_argument("--workers", type=int, default=0, help="threads for the main figure (default: up to 4)")
    ap.add_argument("--json", help="write the figures to this file too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary photos and datasets")
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench_dataset_")
    host.configure(output_dir=os.path.join(work, "output"))
    photos = os.path.join(work, "photos")
    t = time.perf_counter()
    make_photos(photos, args.images, args.size)
    megabytes = sum(os.path.getsize(os.path.join(photos, f)) for f in os.listdir(photos)) / 1e6
    print(f"{os.cpu_count()} CPUs; made {args.images} JPEGs of {args.size} px ({megabytes:.0f} MB) "
          f"in {time.perf_counter() - t:.1f} s; work dir {work}")

    settings = BuildSettings(resolution=args.resolution, mode=args.mode)
    workers = args.workers or None
    first, result = timed_build(photos, "bench", settings, workers)
    again, rebuilt = timed_build(photos, "bench", settings, workers)
    single, _ = timed_build(photos, "bench_1thread", settings, 1)
    plain = plain_loop(photos, os.path.join(work, "plain"), args.resolution)
    assert rebuilt.processed == 0 and rebuilt.reused == len(result.items) == args.images
    n = args.images
    figures = {"images": n, "size": args.size, "resolution": args.resolution, "mode": args.mode,
               "cpus": os.cpu_count(), "threads": workers or min(4, os.cpu_count() or 1),
               "first_build_images_per_s": n / first, "rebuild_images_per_s": n / again,
               "one_thread_images_per_s": n / single, "plain_loop_images_per_s": n / plain,
               "buckets": result.bucket_counts()}
    print(f"first build:  {figures['first_build_images_per_s']:6.1f} images/s ({first:.2f} s, "
          f"{figures['threads']} threads)")
    print(f"rebuild:      {figures['rebuild_images_per_s']:6.1f} images/s ({again:.2f} s, all {n} reused)")
    print(f"one thread:   {figures['one_thread_images_per_s']:6.1f} images/s ({single:.2f} s)")
    print(f"plain loop:   {figures['plain_loop_images_per_s']:6.1f} images/s ({plain:.2f} s: open_rgb, centre crop, "
          f"Lanczos, PNG; no hashing or dedupe)")
    print(f"buckets: {figures['buckets']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
