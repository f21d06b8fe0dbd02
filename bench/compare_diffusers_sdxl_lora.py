"""diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py on the mini SDXL bench, for side-by-side figures
with `bench_lora.py --family sdxl` (same model: build_sdxl("comfy"), seed 0; same photos; 256 px, rank 4, batch 1,
lr 1e-4 constant, fp32, UNet-only LoRA, frozen text encoders).

The diffusers script imports torchvision, which the pack's own venv lacks: run this with a Python that has the
pack's requirements and torchvision, and measure `bench_lora.py --family sdxl` with the same Python, so both use
the same torch build (here: /work/comfyui/venv/bin/python). The script comes from the diffusers repository:

    git -C diffusers show HEAD:examples/dreambooth/train_dreambooth_lora_sdxl.py > train_dreambooth_lora_sdxl.py
    python bench/compare_diffusers_sdxl_lora.py --script train_dreambooth_lora_sdxl.py [--steps 30]
    python bench/bench_lora.py --family sdxl [--steps 30]

Prints its training s/step (its progress bar, last rate shown) and the peak RSS of its process, also as it was
when the last step finished: after training the script loads the whole pipeline again for inference (even with
no validation prompt; memory-mapped, so that adds only ~0.1 GB here).
Unlike our trainer it runs the VAE encoder on every step (no latent cache), and keeps the text encoders in
memory after encoding the prompt once.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile

from engine import engine, images_only


def vm_hwm_mb(pid: int) -> float:
    """The process's peak RSS so far (Linux); nan elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def run(cmd: list[str], steps: int) -> tuple[str, float]:
    """Its output, and its peak RSS when its progress bar reached the last step."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}  # everything is local
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out, at_last_step, tail = [], None, b""
    last = re.compile(rb"Steps: 100%%.*?\| *%d/%d " % (steps, steps))
    while chunk := proc.stdout.read1(65536):
        out.append(chunk)
        tail = (tail + chunk)[-4096:]
        if at_last_step is None and last.search(tail):
            at_last_step = vm_hwm_mb(proc.pid)  # tqdm writes each update at once: read before the reload
    log = b"".join(out).decode(errors="replace")
    if proc.wait():
        sys.exit(f"the diffusers script failed:\n{log[-4000:]}")
    return log, float("nan") if at_last_step is None else at_last_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", required=True,
                    help="path of diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--images", type=int, default=6)
    args = ap.parse_args()

    toy = engine("testing.toy_models")
    work = tempfile.mkdtemp(prefix="bench_diffusers_sdxl_")
    comps = toy.build_sdxl("comfy", seed=0, tokenizer_dir=os.path.join(work, "tokenizer"))
    model = toy.save_diffusers_folder(comps, os.path.join(work, "model"))  # fp32, as the script loads it
    del comps  # ~5 GB: not held while the script runs
    gc.collect()
    photos = images_only(work, args.images, args.resolution * 2)
    # No --validation_prompt (no sampling), no --push_to_hub; --report_to stays tensorboard, which accelerate skips
    # where it is not installed (no wandb).
    cmd = [sys.executable, args.script, "--pretrained_model_name_or_path", model, "--instance_data_dir", photos,
           "--instance_prompt", "a photo of sks dog", "--output_dir", os.path.join(work, "out"),
           "--resolution", str(args.resolution), "--train_batch_size", "1", "--rank", "4",
           "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--mixed_precision", "no", "--checkpointing_steps", "100000", "--seed", "42",
           "--max_train_steps", str(args.steps)]
    log, at_last_step = run(cmd, args.steps)
    bar = [part for part in re.split(r"[\r\n]", log) if part.startswith("Steps:")]  # not the pipeline-loading bars
    rates = re.findall(r"(\d+(?:\.\d+)?)(s/it|it/s)", bar[-1] if bar else "")
    per_step = float("nan")
    if rates:
        value, unit = float(rates[-1][0]), rates[-1][1]
        per_step = value if unit == "s/it" else 1 / value
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    shutil.rmtree(work, ignore_errors=True)  # the fp32 model folder is ~5 GB
    print(f"diffusers train_dreambooth_lora_sdxl.py, comfy SDXL, {args.images} images at {args.resolution}px, "
          f"UNet lora rank 4, batch 1, fp32")
    print(f"training: {per_step:.3f} s/step (its progress bar, last rate shown, {args.steps} steps)")
    print(f"peak RSS: {rss:.0f} MB ({at_last_step:.0f} MB when the last step finished, before it reloads the "
          f"pipeline for inference)")


if __name__ == "__main__":
    main()
