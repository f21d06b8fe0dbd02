"""Does a checkpoint with a LoRA baked in compute what ComfyUI computes with that LoRA applied to the base?

Run with ComfyUI's interpreter, from the ComfyUI checkout (the integration tests do):

    cd $COMFYUI_DIR && venv/bin/python <repo>/tests/comfy_bake_equivalence.py --ckpt base.safetensors \
        --lora lora.safetensors --baked baked.safetensors --strength-model 0.8 --strength-clip 0.6 --work /tmp/scratch

It computes, in fp32 on the CPU, for one fixed latent, timestep and conditioning (and one prompt's tokens), the UNet
and CLIP outputs of
  (a) the base loaded by ComfyUI with the LoRA applied by comfy.sd.load_lora_for_models at those strengths (weights
      patched by comfy.model_management.load_models_gpu),
  (b) the baked checkpoint loaded by ComfyUI (comfy.sd.load_checkpoint_guess_config), no LoRA,
  (c) the base alone (a control: the LoRA must really change the outputs).
  (d) a control for the file's dtype: (a)'s patched weights rounded to the dtype the baked file stores (a bake
      writes base + delta in the base's dtype, fp16 for an fp16 base), put into (b)'s modules.
(b) == (a) up to that rounding, and (b) == (d) up to float noise, is a bake that is what ComfyUI applies.
It also compares the weights themselves, (b)'s against (a)'s patched ones and against (d)'s.
It prints one line `EQUIVALENCE {json}`.
"""
from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_lora_equivalence import _Collect, probe, rel, script_args, start_comfy  # noqa: E402


def main(argv=None) -> dict:
    args = script_args(__doc__, "--lora", argv, **{"--baked": "", "--strength-model": 1.0, "--strength-clip": 1.0,
                                                    "--prompt": "a photo of sks ball on the beach",
                                                    "--timestep": 500.0, "--latent": 8})
    if not args.baked:
        raise SystemExit("--baked is required")
    start_comfy(args)

    import torch
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from safetensors import safe_open

    collect = _Collect()
    logging.getLogger().addHandler(collect)

    def load(path):
        return comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)[:2]

    model, clip = load(args.ckpt)
    p = probe(model, clip, args)
    unet_out, clip_out = p.unet, p.text

    # Tensors ComfyUI's CLIP has whether or not the checkpoint does (comfy/sd.py lets them be missing): an SD1 file
    # has no text projection, so that weight is whatever memory it got, different in every load. No LoRA patches them.
    placeholders = (".transformer.text_projection.weight", ".logit_scale")

    def weights(module):
        return {k: v.detach().float().clone() for k, v in module.state_dict().items() if not k.endswith(placeholders)}

    def describe(m, c):
        return {"model_class": type(m.model).__name__, "clip_class": type(c.cond_stage_model).__name__,
                "unet_dtype": str(m.model_dtype())}

    results = {"strength_model": args.strength_model, "strength_clip": args.strength_clip}
    base_info = describe(model, clip)
    # (c) the base alone
    base_unet, base_te = unet_out(model), clip_out(clip)
    base_unet_w, base_te_w = weights(model.model.diffusion_model), weights(clip.cond_stage_model)
    # (a) the base with the LoRA applied by ComfyUI
    lora = comfy.utils.load_torch_file(args.lora, safe_load=True)
    model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, args.strength_model, args.strength_clip)
    lora_unet = unet_out(model_lora)
    lora_unet_w = weights(model_lora.model.diffusion_model)
    lora_te = clip_out(clip_lora)
    lora_te_w = weights(clip_lora.cond_stage_model)
    results["comfy_unet_patches"] = len(model_lora.patches)
    results["comfy_clip_patches"] = len(clip_lora.patcher.patches)
    del model, clip, model_lora, clip_lora, lora
    mm.unload_all_models()
    mm.soft_empty_cache()

    # (b) the baked checkpoint, no LoRA
    baked_model, baked_clip = load(args.baked)
    baked_info = describe(baked_model, baked_clip)
    baked_unet, baked_te = unet_out(baked_model), clip_out(baked_clip)
    baked_unet_w, baked_te_w = weights(baked_model.model.diffusion_model), weights(baked_clip.cond_stage_model)

    with safe_open(args.baked, "pt") as f:  # the dtype the bake stored its tensors in
        key = next(k for k in f.keys() if k.startswith("model.diffusion_model."))
        stored = f.get_slice(key).get_dtype()
    stored_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(stored, torch.float32)
    results["baked_file_dtype"] = str(stored_dtype)

    # (d) a control: (a)'s patched weights rounded to the baked file's dtype, in (b)'s modules (no patches there,
    # so nothing puts other weights back): what storing base + delta in that dtype alone does to the outputs.
    def rounded(w):
        return {k: v.to(stored_dtype).float() if v.is_floating_point() else v for k, v in w.items()}

    baked_model.model.diffusion_model.load_state_dict(rounded(lora_unet_w), strict=True)
    missing, unexpected = baked_clip.cond_stage_model.load_state_dict(rounded(lora_te_w), strict=False)
    assert not unexpected and all(k.endswith(placeholders) for k in missing), (missing, unexpected)
    rounded_unet, rounded_te = unet_out(baked_model), clip_out(baked_clip)
    del baked_model, baked_clip
    mm.unload_all_models()
    results["keys_not_loaded"] = [line for line in collect.lines if "lora key not loaded" in line]

    results["base"], results["baked"] = base_info, baked_info
    results["same_model_class"] = base_info["model_class"] == baked_info["model_class"]
    results["same_clip_class"] = base_info["clip_class"] == baked_info["clip_class"]

    # --- outputs --------------------------------------------------------------------------------
    for part, base_o, lora_o, baked_o, rounded_o in (("unet", base_unet, lora_unet, baked_unet, rounded_unet),
                                                     ("te", base_te, lora_te, baked_te, rounded_te)):
        results[f"{part}_rel_err"] = rel(baked_o, lora_o)  # baked vs LoRA-applied
        results[f"{part}_rounding_rel_err"] = rel(rounded_o, lora_o)  # (d) vs (a): the storage dtype's own error
        results[f"{part}_rel_err_vs_rounded"] = rel(baked_o, rounded_o)  # baked vs (d): 0 when the bake is exact
        results[f"{part}_delta_size"] = rel(lora_o, base_o)  # how much the LoRA changes the output
        results[f"{part}_baked_vs_base"] = rel(baked_o, base_o)
        # the part of the LoRA's change the baked model misses: |baked - lora| / |lora - base|
        results[f"{part}_delta_rel_err"] = float((baked_o - lora_o).norm() / (lora_o - base_o).norm().clamp_min(1e-30))

    # --- weights --------------------------------------------------------------------------------
    for part, base_w, lora_w, baked_w in (("unet", base_unet_w, lora_unet_w, baked_unet_w),
                                          ("te", base_te_w, lora_te_w, baked_te_w)):
        missing = sorted(set(lora_w) ^ set(baked_w))
        changed = [k for k in lora_w if k in baked_w and not torch.equal(lora_w[k], base_w[k])]
        baked_changed = [k for k in baked_w if k in base_w and not torch.equal(baked_w[k], base_w[k])]
        worst = max((rel(baked_w[k], lora_w[k]) for k in changed), default=0.0)
        rounded = max((rel(baked_w[k], lora_w[k].to(stored_dtype).float()) for k in changed), default=0.0)
        # the error the storage dtype alone makes: the LoRA-applied weights rounded to it
        rounding = max((rel(lora_w[k].to(stored_dtype).float(), lora_w[k]) for k in changed), default=0.0)
        results[f"{part}_weight_keys_differ"] = missing[:5]
        results[f"{part}_weights_changed_by_lora"] = len(changed)
        results[f"{part}_weights_changed_by_bake"] = len(baked_changed)
        results[f"{part}_weights_changed_by_bake_only"] = sorted(set(baked_changed) - set(changed))[:5]
        results[f"{part}_weight_rel_err"] = worst  # max over tensors: baked vs LoRA-applied
        results[f"{part}_weight_rel_err_after_rounding"] = rounded  # baked vs LoRA-applied rounded to the file dtype
        results[f"{part}_weight_rounding_rel_err"] = rounding
    print("EQUIVALENCE " + json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
