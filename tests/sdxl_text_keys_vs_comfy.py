"""Does trainers/families/sdxl_text_keys.py convert SDXL text encoders exactly as ComfyUI does?

Not collected by pytest. Run with ComfyUI's interpreter (it has torch and transformers):

    /work/comfyui/venv/bin/python tests/sdxl_text_keys_vs_comfy.py [--comfyui $COMFYUI_DIR]

On random tensors (tiny sizes, float32 and bfloat16) it compares, key by key and bit for bit:
1. ComfyUI's `comfy.utils.clip_text_transformers_convert` with our `clip_g_to_hf`;
2. ComfyUI's `comfy.diffusers_convert.convert_text_enc_state_dict_v20` (its saver) with our `hf_to_clip_g`;
3. ComfyUI's SDXL `process_clip_state_dict` / `process_clip_state_dict_for_saving` on a whole file with our
   `split_sdxl_text` / `sdxl_text_to_ldm`, listing the keys only one side has;
4. numerically, ComfyUI's own CLIP text model (comfy.clip_model) loaded the ComfyUI way against a transformers
   `CLIPTextModelWithProjection` loaded our way: pooled projection and penultimate hidden state.
It prints one line `COMPARISON {json}` and exits 1 when anything differs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, LAYERS, MLP, CTX = 64, 2, 256, 77  # ComfyUI: square projection (PROJ == WIDTH)
VOCAB = 49408  # ComfyUI's CLIP embeddings have a fixed vocabulary
HEADS = 2


def _ours():
    """Our module by file path: no package __init__, only torch needed."""
    path = os.path.join(REPO, "trainers", "families", "sdxl_text_keys.py")
    spec = importlib.util.spec_from_file_location("sdxl_text_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _open_clip(torch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    sd = {"token_embedding.weight": rnd(VOCAB, WIDTH, scale=0.5), "positional_embedding": rnd(CTX, WIDTH, scale=0.1),
          "ln_final.weight": rnd(WIDTH, shift=1.0), "ln_final.bias": rnd(WIDTH),
          "text_projection": rnd(WIDTH, WIDTH, scale=WIDTH ** -0.5), "logit_scale": torch.tensor(4.6052).to(dtype)}
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        shapes = {"ln_1.weight": (WIDTH,), "ln_1.bias": (WIDTH,), "ln_2.weight": (WIDTH,), "ln_2.bias": (WIDTH,),
                  "attn.in_proj_weight": (3 * WIDTH, WIDTH), "attn.in_proj_bias": (3 * WIDTH,),
                  "attn.out_proj.weight": (WIDTH, WIDTH), "attn.out_proj.bias": (WIDTH,),
                  "mlp.c_fc.weight": (MLP, WIDTH), "mlp.c_fc.bias": (MLP,),
                  "mlp.c_proj.weight": (WIDTH, MLP), "mlp.c_proj.bias": (WIDTH,)}
        for k, s in shapes.items():
            sd[b + k] = rnd(*s, shift=1.0 if k.startswith("ln_") and k.endswith("weight") else 0.0,
                            scale=0.2 if len(s) == 1 else s[1] ** -0.5)
    return sd


def _clip_l(torch, dtype, seed=1):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                            num_attention_heads=2, max_position_embeddings=CTX)
    torch.manual_seed(seed)
    state = CLIPTextModel(config).state_dict()
    return {"text_model." + k.removeprefix("text_model."): v.to(dtype) for k, v in state.items()}


def _diff(ours: dict, theirs: dict, torch) -> dict:
    """Keys only on one side, and shared keys whose tensors differ (shape, dtype or any bit)."""
    differ = [k for k in set(ours) & set(theirs)
              if ours[k].shape != theirs[k].shape or ours[k].dtype != theirs[k].dtype
              or not torch.equal(ours[k], theirs[k])]
    return {"only_ours": sorted(set(ours) - set(theirs)), "only_comfy": sorted(set(theirs) - set(ours)),
            "differ": sorted(differ), "compared": len(set(ours) & set(theirs))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", "/work/comfyui"))
    args = parser.parse_args(argv)
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its CLI flags at import: no GPU probing
    sys.path.insert(0, args.comfyui)
    import torch

    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.clip_model
    import comfy.diffusers_convert
    import comfy.ops
    import comfy.supported_models
    import comfy.utils
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sk = _ours()
    report, ok = {}, True
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        g = _open_clip(torch, dtype)

        # 1. open_clip -> transformers
        comfy_hf = comfy.utils.clip_text_transformers_convert({"clip_g." + k: v for k, v in g.items()},
                                                              "clip_g.", "clip_g.transformer.")
        comfy_hf = {k.removeprefix("clip_g.transformer."): v for k, v in comfy_hf.items()}
        r1 = _diff(sk.clip_g_to_hf(g), comfy_hf, torch)
        ok &= not r1["differ"] and not r1["only_ours"] and r1["only_comfy"] == ["clip_g.logit_scale"]

        # 2. transformers -> open_clip (ComfyUI's saver)
        ours_hf = sk.clip_g_to_hf(g)
        comfy_g = comfy.diffusers_convert.convert_text_enc_state_dict_v20(
            {"clip_g.transformer." + k: v for k, v in ours_hf.items()}, "clip_g")
        comfy_g = {k.removeprefix("clip_g."): v for k, v in comfy_g.items()}
        r2 = _diff(sk.hf_to_clip_g(ours_hf), comfy_g, torch)
        ok &= not (r2["differ"] or r2["only_ours"] or r2["only_comfy"])

        # 3. whole files through ComfyUI's SDXL model class
        sdxl = comfy.supported_models.SDXL(comfy.supported_models.SDXL.unet_config)
        file_sd = {"model.diffusion_model.out.2.weight": torch.ones(4, 4).to(dtype),
                   "first_stage_model.decoder.conv_in.weight": torch.ones(4, 4).to(dtype),
                   sk.CLIP_L_PREFIX + "text_model.embeddings.position_ids": torch.arange(CTX).expand(1, -1)}
        file_sd.update({sk.CLIP_L_PREFIX + k: v for k, v in _clip_l(torch, dtype).items()})
        file_sd.update({sk.CLIP_G_PREFIX + k: v for k, v in g.items()})
        comfy_read = sdxl.process_clip_state_dict(dict(file_sd))
        ours_l, ours_g = sk.split_sdxl_text(file_sd)
        ours_read = {"clip_l.transformer." + k: v for k, v in ours_l.items()}
        ours_read.update({"clip_g.transformer." + k: v for k, v in ours_g.items()})
        r3 = _diff(ours_read, comfy_read, torch)
        ok &= not (r3["differ"] or r3["only_ours"])
        # ComfyUI's saver works on its own model's state dict, i.e. what it read plus what its model adds.
        comfy_model_sd = dict(comfy_read)
        comfy_model_sd.setdefault("clip_l.logit_scale", torch.tensor(4.6055))
        comfy_model_sd.setdefault("clip_l.transformer.text_projection.weight", torch.eye(32))
        comfy_model_sd.setdefault("clip_g.logit_scale", torch.tensor(4.6055))
        comfy_model_sd = {k: v for k, v in comfy_model_sd.items() if "position_ids" not in k}
        comfy_write = sdxl.process_clip_state_dict_for_saving(comfy_model_sd)
        r4 = _diff(sk.sdxl_text_to_ldm(ours_l, ours_g), comfy_write, torch)
        ok &= not (r4["differ"] or r4["only_ours"])

        # 4. numerics: ComfyUI's CLIP text model vs transformers, each loaded its own way
        config = sk.clip_g_config(g, heads=HEADS)
        comfy_model = comfy.clip_model.CLIPTextModel(dict(config), torch.float32, "cpu", comfy.ops.disable_weight_init)
        comfy_sd = {k.removeprefix("clip_g.transformer."): v.float() for k, v in comfy_read.items()
                    if k.startswith("clip_g.transformer.")}
        missing, unexpected = comfy_model.load_state_dict(comfy_sd, strict=False)
        hf = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
        hf.load_state_dict(sk.match_text_layout({k: v.float() for k, v in ours_g.items()}, hf.state_dict().keys()),
                           strict=True)
        ids = torch.randint(0, VOCAB - 2, (3, CTX), generator=torch.Generator().manual_seed(3))
        for row, end in enumerate((5, CTX - 1, 17)):
            ids[row, end:] = VOCAB - 1
        with torch.no_grad():
            _, comfy_penult, comfy_pooled, _ = comfy_model(ids, intermediate_output=-2,
                                                           final_layer_norm_intermediate=False)
            out = hf(ids, output_hidden_states=True)
        r5 = {"comfy_missing": list(missing), "comfy_unexpected": list(unexpected),
              "pooled_max_abs": float((out.text_embeds - comfy_pooled).abs().max()),
              "penultimate_max_abs": float((out.hidden_states[-2] - comfy_penult).abs().max())}
        ok &= not missing and not unexpected and max(r5["pooled_max_abs"], r5["penultimate_max_abs"]) < 1e-5
        report[name] = {"open_clip_to_hf": r1, "hf_to_open_clip": r2, "file_read": r3, "file_write": r4,
                        "forward": r5}
    print("COMPARISON " + json.dumps({"ok": bool(ok), **report}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
