"""diffusers' examples/dreambooth/train_dreambooth.py on the mini SD1.5 bench, for side-by-side figures with
`bench_lora.py --method dreambooth` (same model, photos, resolution, steps, prior preservation).

Run it with a Python that has the pack's requirements and torchvision (the diffusers script imports it), and give
the script's path:

    python bench/compare_diffusers_dreambooth.py --script diffusers/examples/dreambooth/train_dreambooth.py

Prints the seconds to make the class images (its sampler: 50 steps at the model's native size, 512 px for SD1.5;
`--native-size 128` makes it sample at the bench's training size instead), its training s/step (from its progress
bar) and its peak RSS.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

from engine import engine, images_only


def run(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the diffusers script failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - started, proc.stderr + proc.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", required=True, help="path of diffusers' examples/dreambooth/train_dreambooth.py")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--class-images", type=int, default=2)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--native-size", type=int, default=512,
                    help="the size the model declares as its own (unet sample_size x 8): 512 as SD1.5 does; the "
                         "script samples its class images at this size whatever --resolution is")
    args = ap.parse_args()

    toy = engine("testing.toy_models")
    work = tempfile.mkdtemp(prefix="bench_diffusers_db_")
    comps = toy.build_sd1("mini", tokenizer_dir=os.path.join(work, "tokenizer"))
    comps.unet.register_to_config(sample_size=args.native_size // 8)
    model = toy.save_diffusers_folder(comps, os.path.join(work, "model"))
    photos = images_only(work, args.images, args.resolution * 2)
    common = [sys.executable, args.script, "--pretrained_model_name_or_path", model, "--instance_data_dir", photos,
              "--instance_prompt", "a photo of sks dog", "--with_prior_preservation", "--class_prompt",
              "a photo of a dog", "--class_data_dir", os.path.join(work, "class"), "--num_class_images",
              str(args.class_images), "--resolution", str(args.resolution), "--train_batch_size", "1",
              "--learning_rate", "5e-6", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
              "--checkpointing_steps", "100000", "--seed", "42"]
    # 1: the class images and one step; 2: the class images exist, `steps` steps (its progress bar gives s/step).
    first, _ = run(common + ["--output_dir", os.path.join(work, "out1"), "--max_train_steps", "1"])
    second, log = run(common + ["--output_dir", os.path.join(work, "out2"), "--max_train_steps", str(args.steps)])
    rates = re.findall(r"(\d+\.\d+)s/it", log)
    per_step = float(rates[-1]) if rates else float("nan")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"diffusers train_dreambooth.py, mini SD1.x, {args.images} images at {args.resolution}px, batch 1, fp32")
    print(f"class images + 1 step: {first:.1f} s for {args.class_images} class images; "
          f"a run with them present: {second:.1f} s for {args.steps} steps")
    overhead = second - args.steps * per_step  # loading, saving: the same in both runs
    classes = first - overhead - per_step
    print(f"class images at {args.native_size}px: {classes:.1f} s for {args.class_images} "
          f"({classes / args.class_images:.1f} s each; the first "
          f"run's time less the second run's time outside its steps)")
    print(f"training: {per_step:.3f} s/step (its progress bar, last rate shown)")
    print(f"peak RSS: {rss:.0f} MB (the larger of its two runs)")


if __name__ == "__main__":
    main()
