"""Does a LoRA applied by ComfyUI change the model exactly as our engine's peft model does?

Run with ComfyUI's interpreter, from the ComfyUI checkout (the integration tests do):

    cd $COMFYUI_DIR && venv/bin/python <repo>/tests/comfy_lora_equivalence.py \
        --ckpt model.safetensors --lora lora.safetensors --work /tmp/scratch

It computes, for one fixed latent, timestep and conditioning (and one prompt's tokens):
ComfyUI's UNet and CLIP outputs without and with the LoRA (comfy.sd.load_lora_for_models,
strength 1, weights patched by comfy.model_management.load_models_gpu), then the same with
our engine (load_sd_components, the file's network type (LoRA, LoHa, LoKr, from its ss_network_* metadata):
attach + load). Everything runs in fp32.
It prints one line `EQUIVALENCE {json}` with the relative errors and the patch counts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(a, b) -> float:
    """|a - b| / |b| (Frobenius norms)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def script_args(doc: str, file_option: str, argv=None, **more) -> argparse.Namespace:
    """--ckpt, the file under test, --work and --comfy-dir, plus `more` ({option: default})."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument(file_option, required=True)
    p.add_argument("--work", required=True, help="scratch folder for ComfyUI's temp/output")
    p.add_argument("--comfy-dir", default=os.getcwd())
    for option, default in more.items():
        p.add_argument(option, type=type(default), default=default)
    return p.parse_args(argv)


def start_comfy(args) -> str:
    """Import ComfyUI from its checkout for CPU and fp32 work, its temp and output in args.work; returns its dir."""
    comfy_dir = os.path.abspath(args.comfy_dir)
    sys.path[:0] = [comfy_dir, REPO]

    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True
    comfy_args.fp32_text_enc = True  # on a CPU ComfyUI keeps CLIP in fp16 by default; compare in fp32

    import folder_paths
    os.makedirs(args.work, exist_ok=True)
    folder_paths.set_temp_directory(args.work)  # our loader's hash cache lands here, not in the checkout
    folder_paths.set_output_directory(args.work)
    return comfy_dir


def probe(model, clip, args):
    """One fixed latent, timestep and conditioning (SDXL: pooled text and size ids too) and one prompt's tokens,
    with `unet(patcher)` and `text(clip)`: ComfyUI's outputs for them, in fp32."""
    from types import SimpleNamespace

    import torch
    import comfy.model_management as mm

    sdxl = type(model.model).__name__ == "SDXL"
    torch.manual_seed(0)
    p = SimpleNamespace(sdxl=sdxl, x=torch.randn(1, 4, args.latent, args.latent), t=torch.tensor([args.timestep]),
                        cond=torch.randn(1, 77, 2048 if sdxl else 768),
                        pooled=torch.randn(1, 1280) if sdxl else None, size=args.latent * 8,
                        tokens=clip.tokenize(args.prompt))
    # SDXL's size ids: this size, uncropped, on both sides
    y = model.model.encode_adm(pooled_output=p.pooled, width=p.size, height=p.size) if sdxl else None

    def unet(patcher):
        mm.load_models_gpu([patcher], force_full_load=True)  # applies the patches (if any) to the weights
        with torch.no_grad():
            return patcher.model.diffusion_model(p.x, timesteps=p.t, context=p.cond, y=y).float()

    def text(c):
        with torch.no_grad():  # SDXL: both encoders' states side by side, and the pooled projection
            states, pooled_out = c.encode_from_tokens(p.tokens, return_pooled=True)
            return torch.cat([states.float().flatten(), pooled_out.float().flatten()]) if sdxl else states.float()

    p.unet, p.text = unet, text
    return p


def main(argv=None) -> dict:
    # --latent: the latent side (pixels / 8)
    args = script_args(__doc__, "--lora", argv, **{"--prompt": "a photo of sks ball on the beach",
                                                    "--timestep": 500.0, "--latent": 8})
    comfy_dir = start_comfy(args)

    import torch
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    collect = _Collect()
    logging.getLogger().addHandler(collect)
    # --- ComfyUI ------------------------------------------------------------
    model, clip = comfy.sd.load_checkpoint_guess_config(args.ckpt, output_vae=False, output_clip=True)[:2]
    p = probe(model, clip, args)
    sdxl, x, t, cond, pooled, size, tokens = p.sdxl, p.x, p.t, p.cond, p.pooled, p.size, p.tokens
    comfy_unet, comfy_clip = p.unet, p.text
    lora = comfy.utils.load_torch_file(args.lora, safe_load=True)
    ids = torch.tensor([[tok[0] for tok in tokens["l"][0]]])

    results = {"unet_dtype": str(model.model_dtype())}
    comfy_base_unet, comfy_base_te = comfy_unet(model), comfy_clip(clip)
    model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    comfy_lora_unet, comfy_lora_te = comfy_unet(model_lora), comfy_clip(clip_lora)
    results["comfy_unet_patches"] = len(model_lora.patches)
    results["comfy_clip_patches"] = len(clip_lora.patcher.patches)
    results["keys_not_loaded"] = [line for line in collect.lines if "lora key not loaded" in line]
    del model, clip, model_lora, clip_lora
    mm.unload_all_models()

    # --- our engine -----------------------------------------------------------
    from safetensors import safe_open

    from trainers.families.model_loading import load_sd_components
    from trainers.networks import registry
    from trainers.networks import targets as keys

    with safe_open(args.lora, "pt") as f:
        meta = f.metadata() or {}
    net_args = json.loads(meta.get("ss_network_args") or "{}")
    network = registry.get(net_args.get("algo", "lora"))
    rank, factor = int(meta["ss_network_dim"]), int(net_args.get("factor", -1))
    conv_rank = int(net_args.get("conv_dim", rank))  # the 3x3 convs' rank (kohya's conv_dim)
    results["network"] = network.name

    from trainers.families.ldm_keys import KeyMapError
    from trainers.families.registry import get_family

    comps = load_sd_components(args.ckpt, tokenizer_dir=os.path.join(comfy_dir, "comfy", "sd1_tokenizer"))
    family = get_family(comps.family)
    for encoder in (comps.unet, *comps.text_encoders):
        encoder.eval()
    added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0, 0, size, size]],
                                                                                  dtype=torch.float32)}} if sdxl else {}

    def ours_unet():
        with torch.no_grad():
            return comps.unet(x, t, cond, **added).sample.float()

    def ours_te():
        with torch.no_grad():
            if sdxl:
                out = family.encode(comps, [args.prompt])
                return torch.cat([out.states.float().flatten(), out.pooled.float().flatten()])
            return comps.text_encoder(ids)[0].float()

    def unet_stem(name):
        try:
            return keys.kohya_stem(family.lora_unet_name(comps.unet, name), keys.UNET_PREFIX)
        except KeyMapError:  # modules without weights (time_proj) have no name in the LDM layout
            return None

    ours_base_unet, ours_base_te = ours_unet(), ours_te()
    stems = {k.split(".")[0] for k in lora}
    locon = {unet_stem(n) for n in keys.unet_targets(comps.unet, "locon")}
    file_unet = {s for s in stems if s.startswith(keys.UNET_PREFIX)}
    results["locon_stems_missing_from_file"] = sorted(locon - file_unet)
    results["file_stems_outside_locon"] = sorted(file_unet - locon)
    attached = {"unet": 0, "te": 0}
    models = [(comps.unet, unet_stem, "unet")] + [
        (encoder, lambda name, prefix=prefix: keys.kohya_stem(name, prefix), "te")
        for encoder, prefix in zip(comps.text_encoders, keys.te_prefixes(len(comps.text_encoders)))]
    for model_, stem, key in models:
        targets = [name for name, _ in model_.named_modules() if name and stem(name) in stems]
        attached[key] += len(targets)
        if targets:
            network.attach(model_, targets, rank, float(rank), factor, conv_rank)  # load sets the file's alpha
    results["unused_stems"] = network.load(lora, comps.unet, comps.text_encoders,
                                           unet_name=lambda name: family.lora_unet_name(comps.unet, name))
    ours_lora_unet, ours_lora_te = ours_unet(), ours_te()
    results["file_unet_stems"] = sum(s.startswith(keys.UNET_PREFIX) for s in stems)
    results["file_te_stems"] = sum(s.startswith("lora_te") for s in stems)
    results["ours_unet_modules"], results["ours_te_modules"] = attached["unet"], attached["te"]

    # --- comparison -------------------------------------------------------------
    for part, cb, cl, ob, ol in (("unet", comfy_base_unet, comfy_lora_unet, ours_base_unet, ours_lora_unet),
                                 ("te", comfy_base_te, comfy_lora_te, ours_base_te, ours_lora_te)):
        ours_delta, comfy_delta = ol - ob, cl - cb
        results[f"{part}_base_rel_err"] = rel(cb, ob)  # control: the same base model on both sides
        results[f"{part}_delta_size"] = rel(ol, ob)  # how much the LoRA changes the output
        results[f"{part}_delta_rel_err"] = rel(comfy_delta, ours_delta)
        results[f"{part}_lora_rel_err"] = rel(cl, ol)
    print("EQUIVALENCE " + json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
