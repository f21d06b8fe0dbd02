"""Training speed and memory on the CPU (LoRA, LoHa, LoKr, textual inversion), for the issue's reference setting.

Mini SD1.5 (UNet with SD1.5 widths on two levels, full CLIP-L text encoder, SD VAE; random
weights built in code), 6 photos at 128 px, rank 4, batch 1, 30 steps, fp32. Prints
time to first step, steady-state s/step and peak RSS. Reference figures measured on the
same 2-core machine: diffusers train_dreambooth_lora.py 0.50 s/step, ComfyUI TrainLoraNode 0.97 s/step.

--family sdxl trains the mini SDXL instead (--size comfy: the Segmind-Vega layout, UNet 320/320/320, full
CLIP-L and OpenCLIP-bigG, which ComfyUI takes as SDXL; saved fp16, ~1.9 GB) at 256 px, UNet-only LoRA with the
text encoders frozen and their outputs cached. Side by side with bench/compare_diffusers_sdxl_lora.py: run both
with the same Python (that script needs torchvision, e.g. /work/comfyui/venv/bin/python).

    python bench/bench_lora.py [--steps 30] [--resolution 128] [--size mini] [--network lora|loha|lokr]
    python bench/bench_lora.py --family sdxl [--size comfy|tiny] [--resolution 256]
    python bench/bench_lora.py --method textual_inversion   # 1 vector from "dog"; --network does not apply
    python bench/bench_lora.py --method dreambooth [--class-images 6]   # prior preservation; also times the
    python bench/bench_lora.py --method dreambooth_lora                 # class images the base generates
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from engine import engine


# Per family: the sizes, the default size and the default resolution.
FAMILIES = {"sd1": (("tiny", "mini"), "mini", 128), "sdxl": (("tiny", "comfy"), "comfy", 256)}


def build(family: str, size: str, work: str):
    toy = engine("testing.toy_models")
    builder = toy.build_sdxl if family == "sdxl" else toy.build_sd1
    return builder(size, tokenizer_dir=os.path.join(work, "models", "clip", "tokenizer"))


def make_checkpoint(family: str, size: str, work: str) -> None:
    import torch

    # SDXL in fp16 keeps the comfy size's file at ~1.9 GB; the loader reads it back as fp32.
    engine("testing.toy_models").save_single_file(build(family, size, work), os.path.join(
        work, "models", "checkpoints", "bench.safetensors"), dtype=torch.float16 if family == "sdxl" else None)


def main():
    if sys.argv[1:2] == ["--make-checkpoint"]:
        return make_checkpoint(*sys.argv[2:5])
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sd1", choices=list(FAMILIES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, help="default: 128 for sd1, 256 for sdxl")
    ap.add_argument("--size", help="sd1: tiny|mini (default mini); sdxl: tiny|comfy (default comfy)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--network", default="lora", choices=["lora", "loha", "lokr"])
    ap.add_argument("--method", default="lora", choices=["lora", "textual_inversion", "dreambooth", "dreambooth_lora"])
    ap.add_argument("--class-images", type=int, default=6, help="DreamBooth: class images generated (25 steps)")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--in-memory", action="store_true",
                    help="hand the built model to the trainer instead of loading it from a checkpoint file")
    args = ap.parse_args()
    sizes, size, resolution = FAMILIES[args.family]
    args.size, args.resolution = args.size or size, args.resolution or resolution
    if args.size not in sizes:
        ap.error(f"--size for {args.family}: one of {', '.join(sizes)}")

    import torch

    host = engine("core.host")
    TrainConfig = engine("core.config").TrainConfig
    make_photos = engine("testing.demo").make_photos
    train = engine("training.loop").train

    work = tempfile.mkdtemp(prefix="bench_lora_")
    host.configure(models_dir=os.path.join(work, "models"), output_dir=os.path.join(work, "output"))
    data = make_photos(os.path.join(work, "photos"), count=args.images, size=args.resolution * 2)
    if args.in_memory:
        comps = build(args.family, args.size, work)
    else:  # the checkpoint is made in a child process, so peak RSS below is the trainer's alone
        subprocess.run([sys.executable, os.path.abspath(__file__), "--make-checkpoint", args.family, args.size, work],
                       check=True)
        comps = None
    cfg = TrainConfig(base_model="bench.safetensors", dataset=data, output_name="bench", trigger_word="sks", rank=args.rank,
                      network=args.network, alpha=args.rank, steps=args.steps, batch_size=1, resolution=args.resolution,
                      mixed_precision="no", lr_scheduler="constant", warmup_steps=0, save_every=0,
                      validation_every=0, resume=False, method=args.method, init_word="dog")
    if args.method.startswith("dreambooth"):
        cfg.class_prompt, cfg.num_class_images = "a photo of a dog", args.class_images
        if args.method == "dreambooth":
            cfg.unet_lr = 5e-6
    class_images = engine("methods.class_images")
    generate, generation = class_images.generate, []

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        made = generate(*a, **kw)
        generation.append((made, time.perf_counter() - t))
        return made

    class_images.generate = timed_generate
    marks = []
    t0 = time.perf_counter()
    result = train(cfg, components=comps, progress=lambda step, total, loss: marks.append(time.perf_counter()))
    first = marks[0] - t0
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    steady = statistics.median(per_step[len(per_step) // 4:]) if per_step else float("nan")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trained = {"lora": f"{args.network} rank {args.rank}", "dreambooth_lora": f"{args.network} rank {args.rank} "
               f"with prior preservation", "dreambooth": "the whole UNet with prior preservation",
               "textual_inversion": "textual inversion, 1 vector"}[args.method]
    print(f"model: {args.size} {'SDXL' if args.family == 'sdxl' else 'SD1.x'}; "
          f"{args.images} images at {args.resolution}px, {trained}, batch 1, fp32, {torch.get_num_threads()} threads")
    print(f"time to first step: {first:.2f} s ({'model built in memory' if args.in_memory else 'loading the checkpoint file'}"
          ", latent and caption caching included)")
    print(f"steady-state: {steady:.3f} s/step (median of steps {len(per_step)//4 + 2}..{args.steps})")
    print(f"total: {marks[-1] - t0:.1f} s for {result.steps} steps; final loss {result.log[-1]['loss']:.4f}")
    print(f"peak RSS: {rss_mb:.0f} MB")
    for made, seconds in generation:
        print(f"class images: {made} generated at {args.resolution}px, {cfg.class_sample_steps} steps, in {seconds:.1f} s "
              f"({seconds / max(made, 1):.2f} s each)")


if __name__ == "__main__":
    main()
