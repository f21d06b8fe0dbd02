"""Captions per second: our BLIP engine against the plain transformers pipeline, same model, same images.

    python bench/bench_caption.py                 # 50 photos of 2000 px, random BLIP-base weights
    python bench/bench_caption.py --images 8      # quicker
    python bench/bench_caption.py --model /path/to/blip-image-captioning-base
    python bench/bench_caption.py --memory        # peak memory: 4 photos of 8000x6000, reduced decoding on/off

Without --model it builds BLIP with the blip-image-captioning-base layout (BlipConfig
defaults, 224 M parameters) and random weights, so nothing is downloaded. Random weights
never emit the end token, so every caption runs to max length on both sides: the same work.

Ours: `caption_folder` (open, batch, generate, write name.txt), the model loaded once.
Theirs: `pipeline("image-text-to-text")` (transformers 5; "image-to-text" in 4.x) called
once per image file, as a typical script does. Both get the same generation settings. The
two are timed in alternating chunks of images, so load from other processes on the machine
falls on both alike; wall time and this process's CPU time are reported.

--memory captions big JPEGs with `caption_folder` twice, each in a fresh process: with the
engine's reduced decoding (each photo opened at twice the processor's input) and with it off
(captioning.blip.REDUCED_DECODE = False: full-size photos in the batch, as before). It reports
how far the process's peak resident memory rose above its level after loading the model.
Without --model it uses a small random BLIP with the real 384-px processor, so the figures
are about the images, not the weights.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter


from engine import engine  # noqa: E402

captioning, caption_files = engine("captioning.blip"), engine("captioning.folders")


def make_photos(folder: str, count: int, size: int, chunk: int, seed: int = 0) -> list[list[str]]:
    """Photo-like JPEGs (gradient sky, shapes, blur, grain) in chunk sub-folders."""
    rng = np.random.default_rng(seed)
    w, h = size, size * 3 // 4
    chunks = []
    for i in range(count):
        if i % chunk == 0:
            chunks.append([])
            os.makedirs(os.path.join(folder, f"chunk{len(chunks):02d}"), exist_ok=True)
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        base = (top * (1 - t) + bottom * t).repeat(w, axis=1).astype(np.uint8)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            x1, y1 = x0 + rng.integers(50, w // 2), y0 + rng.integers(50, h // 2)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img = img.filter(ImageFilter.GaussianBlur(3))
        grain = rng.normal(0, 8, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))
        path = os.path.join(folder, f"chunk{len(chunks):02d}", f"photo_{i:03d}.jpg")
        img.save(path, quality=90)
        chunks[-1].append(path)
    return chunks


def save_random_blip_base(folder: str, small: bool = False) -> str:
    """blip-image-captioning-base's layout with random weights and a made-up 30522-word vocabulary.

    small: 2 layers of width 64 on both sides, same 384-px processor and vocabulary (fast, light).
    """
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    try:
        from transformers import BlipImageProcessorPil as image_processor_class
    except ImportError:
        from transformers import BlipImageProcessor as image_processor_class

    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(30522)}
    try:
        tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")  # transformers 5
    except TypeError:
        path = os.path.join(folder, "vocab.txt")
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer(vocab_file=path, bos_token="[DEC]")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # id 30522, as in the real repository
    vision = {"initializer_range": 0.02}  # the default 1e-10 ignores the image
    text = {}
    if small:
        width = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        vision.update(width)
        text.update(width, encoder_hidden_size=64)
    config = BlipConfig(vision_config=vision, text_config=text, projection_dim=64 if small else 512)
    assert config.text_config.bos_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=image_processor_class(), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_pipeline(model_path: str):
    """The plain transformers pipeline and how to call it on one image file."""
    from transformers import pipeline
    from transformers.pipelines import SUPPORTED_TASKS

    if "image-text-to-text" in SUPPORTED_TASKS and "image-to-text" not in SUPPORTED_TASKS:  # transformers 5
        pipe = pipeline("image-text-to-text", model=model_path, device="cpu")
        return lambda path, kw: pipe(images=path, text="", generate_kwargs=kw)[0]["generated_text"]
    pipe = pipeline("image-to-text", model=model_path, device="cpu")
    return lambda path, kw: pipe(path, generate_kwargs=kw)[0]["generated_text"]


class Clock:
    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", action="store_true", help="measure peak memory with reduced decoding on and off")
    ap.add_argument("--memory-child", choices=["on", "off"], help=argparse.SUPPRESS)  # one measured run
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--images", type=int, help="photos (default: 50; 4 with --memory)")
    ap.add_argument("--size", type=int, help="width of the photos in pixels, 4:3 (default: 2000; 8000 with --memory)")
    ap.add_argument("--model", help="a BLIP folder (default: random weights, base layout)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--min-length", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=30)
    ap.add_argument("--json", help="write the figures to this file too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary photos and model")
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    args.images = args.images or (4 if args.memory else 50)
    args.size = args.size or (8000 if args.memory else 2000)

    work = tempfile.mkdtemp(prefix="bench_caption_")
    try:
        return memory(args, work) if args.memory else run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: str) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; work dir {work}")
    t = time.perf_counter()
    chunks = make_photos(os.path.join(work, "photos"), args.images, args.size, args.batch_size)
    print(f"made {args.images} photos of {args.size} px in {time.perf_counter() - t:.1f} s")
    model_path = args.model
    if not model_path:
        t = time.perf_counter()
        model_path = save_random_blip_base(os.path.join(work, "models", "blip", "random-blip-base"))
        print(f"built a random blip-image-captioning-base in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    captioner = captioning.load_blip(os.path.abspath(model_path), device="cpu", dtype="fp32")
    ours_load = time.perf_counter() - t
    t = time.perf_counter()
    pipe = make_pipeline(model_path)
    theirs_load = time.perf_counter() - t
    print(f"loaded: ours {ours_load:.1f} s, pipeline {theirs_load:.1f} s")

    settings = dict(num_beams=args.beams, min_length=args.min_length, max_length=args.max_length)
    pipe_kwargs = dict(num_beams=args.beams, min_new_tokens=args.min_length, max_new_tokens=args.max_length)
    warm = chunks[0][0]  # one untimed call each: first-call allocations and lazy imports
    captioning.caption_images(captioner, [Image.open(warm)], **settings)
    pipe(warm, pipe_kwargs)

    ours, theirs = Clock(), Clock()
    same = done = 0
    ratios = []  # per chunk: a burst of load from elsewhere skews one chunk, not the median
    for chunk in chunks:
        before = (ours.wall, theirs.wall)
        with ours:
            report = caption_files.caption_folder(captioner, os.path.dirname(chunk[0]), policy="overwrite",
                                                  batch_size=args.batch_size, **settings)
        with theirs:
            piped = [pipe(path, pipe_kwargs) for path in chunk]
        ratios.append((theirs.wall - before[1]) / (ours.wall - before[0]))
        same += sum(captioning.clean_caption(p) == report.captions[path] for p, path in zip(piped, chunk))
        done += len(chunk)
        print(f"  {done}/{args.images}: ours {ours.wall:.1f} s, pipeline {theirs.wall:.1f} s", flush=True)

    n = args.images
    figures = {
        "images": n, "size_px": args.size, "model": args.model or "random blip-image-captioning-base layout",
        "batch_size": args.batch_size, **settings,
        "ours_captions_per_s": n / ours.wall, "pipeline_captions_per_s": n / theirs.wall,
        "speedup_wall": theirs.wall / ours.wall, "speedup_cpu_time": theirs.cpu / ours.cpu,
        "speedup_median_chunk": float(np.median(ratios)), "speedup_per_chunk": ratios,
        "ours_wall_s": ours.wall, "pipeline_wall_s": theirs.wall, "ours_cpu_s": ours.cpu,
        "pipeline_cpu_s": theirs.cpu, "identical_captions": same, "load_avg": os.getloadavg(),
    }
    print(f"\nours:     {figures['ours_captions_per_s']:.3f} captions/s ({ours.wall:.1f} s wall, {ours.cpu:.1f} s CPU)")
    print(f"pipeline: {figures['pipeline_captions_per_s']:.3f} captions/s ({theirs.wall:.1f} s wall, "
          f"{theirs.cpu:.1f} s CPU)")
    print(f"speed-up: {figures['speedup_wall']:.2f}x wall, {figures['speedup_cpu_time']:.2f}x CPU time, "
          f"{figures['speedup_median_chunk']:.2f}x median of {len(ratios)} chunks; "
          f"identical captions: {same}/{n}; load average {figures['load_avg'][0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


# ---- peak memory ----------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))
    except (OSError, AttributeError):
        return None


def _reset_peak() -> bool:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: the peak since the process started
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kb / 1024


def make_big_photos(folder: str, count: int, size: int) -> None:
    """Photo-like JPEGs of `size` px width: make_photos' pictures upscaled (the memory, not the detail, matters)."""
    small = make_photos(os.path.join(folder, "small"), count, 1000, count)[0]
    for i, path in enumerate(small):
        with Image.open(path) as img:
            img.resize((size, size * 3 // 4), Image.Resampling.BICUBIC).save(
                os.path.join(folder, f"big_{i:02d}.jpg"), quality=90)
    shutil.rmtree(os.path.join(folder, "small"))


def memory(args, work: str) -> int:
    folder = os.path.join(work, "big")
    t = time.perf_counter()
    make_big_photos(folder, args.images, args.size)
    print(f"made {args.images} JPEGs of {args.size}x{args.size * 3 // 4} in {time.perf_counter() - t:.1f} s")
    model_path = args.model or save_random_blip_base(os.path.join(work, "blip-small"), small=True)
    figures = {"images": args.images, "size": [args.size, args.size * 3 // 4], "batch_size": args.batch_size,
               "model": args.model or "small random BLIP, 384-px processor"}
    for mode in ("off", "on"):  # each in a fresh process: a peak cannot be measured twice in one
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", mode, "--folder", folder,
               "--model", model_path, "--batch-size", str(args.batch_size), "--beams", str(args.beams),
               "--min-length", str(args.min_length), "--max-length", str(args.max_length)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        figures[f"reduced_decode_{mode}"] = run_figures = json.loads(out.strip().splitlines()[-1])
        print(f"reduced decoding {mode:>3}: peak +{run_figures['peak_above_loaded_mb']:.0f} MB above the loaded "
              f"model ({run_figures['loaded_mb']:.0f} MB), {run_figures['wall_s']:.1f} s")
    off, on = figures["reduced_decode_off"], figures["reduced_decode_on"]
    print(f"peak memory for captioning: {off['peak_above_loaded_mb']:.0f} MB -> {on['peak_above_loaded_mb']:.0f} MB; "
          f"time {off['wall_s']:.1f} s -> {on['wall_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def memory_child(args) -> int:
    """One measured caption_folder run; prints its figures as a JSON line."""
    captioning.REDUCED_DECODE = args.memory_child == "on"
    captioner = captioning.load_blip(os.path.abspath(args.model), device="cpu", dtype="fp32")
    settings = dict(num_beams=args.beams, min_length=args.min_length, max_length=args.max_length)
    captioning.caption_images(captioner, [Image.new("RGB", (384, 384))], **settings)  # first-call allocations
    gc.collect()
    loaded = _status_kb("VmRSS")
    exact = _reset_peak()
    t = time.perf_counter()
    report = caption_files.caption_folder(captioner, args.folder, policy="overwrite", batch_size=args.batch_size,
                                          **settings)
    wall, peak = time.perf_counter() - t, _peak_mb()
    loaded_mb = (loaded or 0) / 1024  # 0 where /proc is missing: the figure is then the whole peak
    print(json.dumps({"captions": len(report.written), "wall_s": wall, "loaded_mb": loaded_mb, "peak_mb": peak,
                      "peak_above_loaded_mb": peak - loaded_mb, "peak_is_since_start": not exact}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
