"""ComfyUI's native LoRA extraction, run standalone (no server) with ComfyUI's own Python: bench_merge.py's
--comfy side. It does what this workflow does: two CheckpointLoaderSimple -> ModelMergeSubtract (tuned - base,
multiplier 1) and CLIPSubtract (the same) -> "Extract and Save Lora" (LoraSave: rank, lora_type standard,
bias_diff true, both diffs wired), calling the nodes' own code (comfy_extras/nodes_model_merging.py,
comfy_extras/nodes_lora_extract.py). The VAEs are not loaded: the extraction does not use them.

    <ComfyUI>/venv/bin/python bench/comfy_extract_lora.py --comfy-dir <ComfyUI> --base base.safetensors \
        --tuned tuned.safetensors --out out_dir [--rank 32] [--unet-only]

Prints one line `RESULT {json}`: seconds per phase, the process's peak RSS, what was written.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfy-dir", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True)
    p.add_argument("--out", required=True, help="folder for the LoRA file (and ComfyUI's temp/output)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--unet-only", action="store_true", help="leave the text encoder diff unwired")
    args = p.parse_args()

    comfy_dir = os.path.abspath(args.comfy_dir)
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI as a user starts it on a machine without a GPU
    import comfy.options
    comfy.options.enable_args_parsing()

    import torch
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths
    os.makedirs(args.out, exist_ok=True)
    folder_paths.set_temp_directory(args.out)
    folder_paths.set_output_directory(args.out)
    from comfy_extras.nodes_lora_extract import LORA_TYPES, calc_lora_model
    from comfy_extras.nodes_model_merging import CLIPSubtract, ModelSubtract

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    phases = {}
    t0 = t = time.perf_counter()

    def mark(name):
        nonlocal t
        now = time.perf_counter()
        phases[name] = round(now - t, 3)
        t = now

    load = lambda path: comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)[:2]
    base_model, base_clip = load(args.base)
    tuned_model, tuned_clip = load(args.tuned)
    mark("load")
    # ModelMergeSubtract(model1=tuned, model2=base, multiplier=1): tuned's patcher with base's key patches at -1.
    model_diff = ModelSubtract().merge(tuned_model, base_model, 1.0)[0]
    clip_diff = None if args.unet_only else CLIPSubtract().merge(tuned_clip, base_clip, 1.0)[0]
    mark("subtract")
    # LoraSave.execute(filename_prefix, rank, "standard", bias_diff=True, model_diff, text_encoder_diff)
    lora_type, output_sd = LORA_TYPES["standard"], {}
    output_sd = calc_lora_model(model_diff, args.rank, "diffusion_model.", "diffusion_model.", output_sd, lora_type,
                                bias_diff=True)
    mark("extract_unet")
    if clip_diff is not None:
        output_sd = calc_lora_model(clip_diff.patcher, args.rank, "", "text_encoders.", output_sd, lora_type,
                                    bias_diff=True)
        mark("extract_text")
    path = os.path.join(args.out, "ComfyUI_extracted_lora_00001_.safetensors")
    comfy.utils.save_torch_file(output_sd, path, metadata=None)
    mark("save")
    total = time.perf_counter() - t0

    print("RESULT " + json.dumps({
        "seconds": round(total, 3), "phases": phases,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_imports_mb": rss_start,
        "path": path, "file_mb": os.path.getsize(path) / 2 ** 20,
        "lora_modules": sum(k.endswith(".lora_up.weight") for k in output_sd),
        "unet_lora_modules": sum(k.endswith(".lora_up.weight") and k.startswith("diffusion_model.") for k in output_sd),
        "diff_tensors": sum(k.endswith((".diff", ".diff_b")) for k in output_sd),
        "unet_dtype": str(base_model.model_dtype()), "text_dtype": str(next(base_clip.cond_stage_model.parameters()).dtype),
        "threads": torch.get_num_threads(), "text_encoder": not args.unet_only,
    }), flush=True)


if __name__ == "__main__":
    main()
