"""Seconds and peak RSS to extract a rank-32 LoRA from a fine-tuned mini SD1.5 and to bake a LoRA into its base.

The pair: the mini SD1.5 (trainers.testing.toy_models.build_sd1("mini"): SD1.5 widths on two UNet levels, the
full CLIP-L text encoder with its 49408-token embedding so ComfyUI loads it too, the SD VAE; random weights)
saved as an fp16 single file, as users' checkpoints are; the "fine-tune" is the same file with every UNet and
text-encoder tensor moved by a full-rank random perturbation, w + 0.01 * std(w) * randn (an exact LoRA
cannot represent it, so the SVD does its whole work). The VAE is left as it is.

Each operation runs in its own child process; its peak RSS is that process's ru_maxrss (from wait4), so it is
the operation's alone (the pair is built in another child), interpreter and imports included. "s" is the
operation's own time, measured inside the child after its imports (ours: after reading the base's header once,
which does the one-off lazy import of diffusers' configs); "process" is the child's wall time, start-up and
imports included (the only figure for kohya's script, which runs as-is). "after imports" is the child's RSS
before the operation starts.

  (a) ours: trainers.merge.extract.extract(base, tuned, rank=32) (linear and 1x1 layers of UNet and text
      encoder, as kohya's extract; 3x3 convs too with --conv-rank; fp16 output; the sha256 of both files for
      its metadata included, cold). Ours runs with the Python that runs this script.
  (b) ours: trainers.merge.bake.bake(base, [(LoRA from (a), 1.0, 1.0)]) into a new fp16 checkpoint.
  --comfy DIR: ComfyUI's native extraction (ModelMergeSubtract + CLIPSubtract -> "Extract and Save Lora",
      rank 32, standard, bias_diff on: it extracts every >= 2-D weight, 3x3 convs and the token embedding
      included), run by bench/comfy_extract_lora.py with DIR/venv/bin/python (--comfy-python to change), --cpu.
      Its text-encoder part does a full SVD of the 49408 x 768 token-embedding difference (a 49408^2 U,
      ~10 GB in fp32, minutes on a CPU); --comfy-unet-only leaves the text encoder diff unwired.
  --kohya DIR: kohya sd-scripts' networks/extract_lora_from_models.py --dim 32 --save_precision fp16
      --min_diff 0 (so the small text-encoder change is not dropped), with --kohya-python (default: the
      ComfyUI venv's python when --comfy is given, else this one; PYTHONPATH=DIR). Its loader builds the full
      four-level SD1.5 UNet, so it does not load the mini or the comfy size (state_dict missing/unexpected
      keys, sd-scripts 48d368f); the error is printed and it runs only on a full-size SD1.5 pair.

    python bench/bench_merge.py [--size mini|comfy|tiny] [--rank 32] [--conv-rank 0] [--comfy /path/to/ComfyUI [--comfy-unet-only]]
                                [--kohya /path/to/sd-scripts] [--keep]

--size tiny: seconds-long check of our side only (ComfyUI takes no model that small); --size comfy: the smallest
model ComfyUI accepts as SD1.5 (one UNet level), for a quick check of the --comfy side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from engine import engine

HERE = os.path.dirname(os.path.abspath(__file__))
UNET, TEXT = "model.diffusion_model.", "cond_stage_model."
CLIP_L_VOCAB = 49408


def paths(work: str) -> dict:
    ckpts = os.path.join(work, "models", "checkpoints")
    return {"base": os.path.join(ckpts, "bench_base.safetensors"), "tuned": os.path.join(ckpts, "bench_tuned.safetensors")}


def configure(work: str, op: str):
    """The pack's folders in the work dir; a temp (hash cache) folder per operation, so each hashes cold."""
    engine("core.host").configure(models_dir=os.path.join(work, "models"), output_dir=os.path.join(work, "output"),
                                  temp_dir=os.path.join(work, "temp_" + op))


def make_pair(size: str, work: str, scale: float) -> None:
    import torch

    toy = engine("testing.toy_models")
    ldm_keys, safe_io = engine("families.ldm_keys"), engine("core.safe_io")
    if size != "tiny":  # the real CLIP-L embedding: ComfyUI builds CLIP-L from its own config
        spec = toy.SIZES[size]
        toy.SIZES = {**toy.SIZES, size: {**spec, "text": {**spec["text"], "vocab_size": CLIP_L_VOCAB}}}
    comps = toy.build_sd1(size, tokenizer_dir=os.path.join(work, "tokenizer"))
    sd = ldm_keys.diffusers_to_ldm(comps, dtype=torch.float16)
    meta = ldm_keys.config_hints(comps)
    del comps
    out = paths(work)
    safe_io.save_safetensors(sd, out["base"], metadata=meta)
    gen = torch.Generator().manual_seed(1)
    for key, w in sd.items():
        if key.startswith((UNET, TEXT)) and w.is_floating_point():
            w32 = w.float()
            std = float(w32.std()) if w32.numel() > 1 else 0.0
            std = std or float(w32.abs().mean()) or 1e-2  # constant tensors (norm scales, zero biases)
            sd[key] = (w32 + scale * std * torch.randn(w32.shape, generator=gen)).to(w.dtype)
    safe_io.save_safetensors(sd, out["tuned"], metadata=meta)
    unet = sum(v.numel() for k, v in sd.items() if k.startswith(UNET))
    text = sum(v.numel() for k, v in sd.items() if k.startswith(TEXT))
    print("RESULT " + json.dumps({"unet_params": unet, "text_params": text, "tensors": len(sd)}), flush=True)


def warm_up(base: str) -> None:
    """Read the base's header once, untimed: the module map's first use imports diffusers' model configs
    (seconds), a one-off that inside ComfyUI is paid before any merge."""
    engine("merge.outputs").open_checkpoint(base)


def op_extract(work: str, rank: int, conv_rank: int) -> None:
    import resource

    import torch

    configure(work, "extract")
    extract = engine("merge.extract").extract
    p = paths(work)
    warm_up(p["base"])
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    result = extract(p["base"], p["tuned"], "bench_extracted", rank=rank, conv_rank=conv_rank)
    seconds = time.perf_counter() - t
    unet = sum(m.stem.startswith("lora_unet_") for m in result.modules)
    print("RESULT " + json.dumps({
        "seconds": seconds, "rss_after_imports_mb": rss_start, "path": result.path,
        "modules": len(result.modules), "unet_modules": unet, "text_modules": len(result.modules) - unet,
        "kept_energy": result.kept_energy, "rel_error": result.total_rel_error, "notes": result.notes,
        "threads": torch.get_num_threads()}), flush=True)


def op_bake(work: str, lora: str) -> None:
    import resource

    configure(work, "bake")
    bake = engine("merge.bake").bake
    warm_up(paths(work)["base"])
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    result = bake(paths(work)["base"], [(lora, 1.0, 1.0)], "bench_baked")
    seconds = time.perf_counter() - t
    print("RESULT " + json.dumps({"seconds": seconds, "rss_after_imports_mb": rss_start, "path": result.path,
                                  "notes": result.notes}), flush=True)


def run_child(cmd: list[str], env=None) -> tuple[dict | None, str, float, float]:
    """(the child's RESULT json or None, its output, wall seconds, peak RSS MB of that process alone)."""
    with tempfile.TemporaryFile() as out:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        text = out.read().decode(errors="replace")
    results = [line[len("RESULT "):] for line in text.splitlines() if line.startswith("RESULT ")]
    result = json.loads(results[-1]) if proc.returncode == 0 and results else None
    return result, text, wall, usage.ru_maxrss / 1024


def mb(path: str) -> str:
    size = os.path.getsize(path) / 2 ** 20
    return f"{size:.1f} MB" if size < 10 else f"{size:.0f} MB"


def failed(name: str, text: str) -> None:
    """The child's exception line and the two after it (the first reasons), else its last lines."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    raised = [i for i, line in enumerate(lines) if re.match(r"[\w.]*(Error|Exception)\b.*:", line)]
    shown = lines[raised[-1]:raised[-1] + 3] if raised else lines[-6:]
    print(f"{name}: FAILED\n    " + "\n    ".join(line.strip()[:160] + ("..." if len(line.strip()) > 160 else "")
                                               for line in shown))


def main():
    if sys.argv[1:2] == ["--make-pair"]:
        return make_pair(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    if sys.argv[1:2] == ["--extract"]:
        return op_extract(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    if sys.argv[1:2] == ["--bake"]:
        return op_bake(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="mini", choices=["mini", "comfy", "tiny"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--conv-rank", type=int, default=0, help="ours: also extract 3x3 convs at this rank "
                    "(ComfyUI's node always does, at --rank; kohya's script with --conv_dim)")
    ap.add_argument("--scale", type=float, default=0.01, help="the perturbation, in units of each tensor's std")
    ap.add_argument("--comfy", help="a ComfyUI checkout: also time its native extraction")
    ap.add_argument("--comfy-python", help="default: <comfy>/venv/bin/python")
    ap.add_argument("--comfy-unet-only", action="store_true", help="ComfyUI: UNet diff only (no CLIPSubtract)")
    ap.add_argument("--kohya", help="a kohya-ss/sd-scripts checkout: also time networks/extract_lora_from_models.py")
    ap.add_argument("--kohya-python", help="default: the ComfyUI venv's python with --comfy, else this one")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (checkpoints and LoRAs)")
    args = ap.parse_args()
    if args.comfy and args.size == "tiny":
        ap.error("ComfyUI does not load the tiny model as SD1.5: use --size comfy or mini")

    me = os.path.abspath(__file__)
    work = tempfile.mkdtemp(prefix="bench_merge_")
    try:
        t = time.perf_counter()
        made, text, _, _ = run_child([sys.executable, me, "--make-pair", args.size, work, str(args.scale)])
        if made is None:
            return failed("building the pair", text)
        p = paths(work)
        print(f"pair: {args.size} SD1.x, fp16 single files, base {mb(p['base'])}, tuned {mb(p['tuned'])} "
              f"(UNet {made['unet_params'] / 1e6:.1f}M + text encoder {made['text_params'] / 1e6:.1f}M parameters "
              f"moved by {args.scale} x std x randn; built in {time.perf_counter() - t:.0f} s)")

        ext, text, wall, rss = run_child([sys.executable, me, "--extract", work, str(args.rank), str(args.conv_rank)])
        if ext is None:
            return failed("ours, extract", text)
        convs = f", 3x3 convs rank {args.conv_rank}" if args.conv_rank else ""
        print(f"ours, extract rank {args.rank}{convs}: {ext['seconds']:.1f} s (process {wall:.1f} s), peak RSS {rss:.0f} MB "
              f"(after imports {ext['rss_after_imports_mb']:.0f}); {ext['modules']} modules (UNet {ext['unet_modules']}, "
              f"text {ext['text_modules']}), LoRA {mb(ext['path'])}; kept energy {ext['kept_energy']:.3f}, "
              f"rel. error {ext['rel_error']:.3f}; {ext['threads']} threads" + "".join(f"; {n}" for n in ext["notes"]))

        baked, text, wall, rss = run_child([sys.executable, me, "--bake", work, ext["path"]])
        if baked is None:
            failed("ours, bake", text)
        else:
            print(f"ours, bake that LoRA into the base: {baked['seconds']:.1f} s (process {wall:.1f} s), peak RSS "
                  f"{rss:.0f} MB (after imports {baked['rss_after_imports_mb']:.0f}); checkpoint {mb(baked['path'])}; "
                  + "; ".join(baked["notes"]))

        if args.comfy:
            python = args.comfy_python or os.path.join(args.comfy, "venv", "bin", "python")
            cmd = [python, os.path.join(HERE, "comfy_extract_lora.py"), "--comfy-dir", args.comfy, "--base", p["base"],
                   "--tuned", p["tuned"], "--out", os.path.join(work, "comfy"), "--rank", str(args.rank)]
            comfy, text, wall, rss = run_child(cmd + (["--unet-only"] if args.comfy_unet_only else []))
            if comfy is None:
                failed("ComfyUI, extract", text)
            else:
                phases = ", ".join(f"{k} {v:.1f}" for k, v in comfy["phases"].items())
                parts = "UNet + text encoder" if comfy["text_encoder"] else "UNet only"
                print(f"ComfyUI, extract rank {args.rank} ({parts}): {comfy['seconds']:.1f} s ({phases}; process "
                      f"{wall:.1f} s), peak RSS {rss:.0f} MB (after imports {comfy['rss_after_imports_mb']:.0f}); "
                      f"{comfy['lora_modules']} LoRA modules (UNet {comfy['unet_lora_modules']}) + "
                      f"{comfy['diff_tensors']} bias/1-D diffs, LoRA {comfy['file_mb']:.0f} MB; UNet "
                      f"{comfy['unet_dtype']}, CLIP {comfy['text_dtype']}; {comfy['threads']} threads")

        if args.kohya:
            script = os.path.join(args.kohya, "networks", "extract_lora_from_models.py")
            if not os.path.isfile(script):
                print(f"kohya, extract: not available ({script} not found)")
            else:
                python = args.kohya_python or (os.path.join(args.comfy, "venv", "bin", "python") if args.comfy
                                               else sys.executable)
                out = os.path.join(work, "kohya", "kohya_extracted.safetensors")
                env = {**os.environ, "PYTHONPATH": os.path.abspath(args.kohya)}  # its `library` package
                _, text, wall, rss = run_child([python, script, "--model_org", p["base"], "--model_tuned", p["tuned"],
                                                "--save_to", out, "--dim", str(args.rank), "--save_precision", "fp16",
                                                "--min_diff", "0"] + (["--conv_dim", str(args.conv_rank)]
                                                                      if args.conv_rank else []), env=env)
                if not os.path.isfile(out):
                    failed("kohya, extract (networks/extract_lora_from_models.py)", text)
                else:
                    from safetensors import safe_open

                    with safe_open(out, "pt") as f:
                        ups = [k for k in f.keys() if k.endswith(".lora_up.weight")]
                    print(f"kohya, extract rank {args.rank}: process {wall:.1f} s, peak RSS {rss:.0f} MB; {len(ups)} "
                          f"modules (UNet {sum(k.startswith('lora_unet_') for k in ups)}), LoRA {mb(out)}")
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
