"""Does ComfyUI's `embedding:<name>` give the conditioning our engine trained with?

Run with ComfyUI's interpreter, from the ComfyUI checkout (the integration tests do):

    cd $COMFYUI_DIR && venv/bin/python <repo>/tests/comfy_embedding_equivalence.py \
        --ckpt model.safetensors --embedding models/embeddings/name.safetensors --work /tmp/scratch

ComfyUI: the checkpoint's CLIP with the embedding's folder, encoding "a photo of embedding:<name> on the beach".
Ours: load_sd_components, the textual-inversion method set up from the file's metadata with the file's vectors
(SDXL: one set per encoder, clip_l and clip_g; the conditioning compared is both encoders' states side by side),
encoding the same prompt with the trigger word. A control prompt without the embedding is encoded by both too.
Everything runs in fp32. It prints one line `EQUIVALENCE {json}`.
"""
from __future__ import annotations

import json
import logging
import os

from comfy_lora_equivalence import _Collect, rel, script_args, start_comfy

PROMPT = "a photo of {} on the beach"


def main(argv=None) -> dict:
    args = script_args(__doc__, "--embedding", argv)
    comfy_dir = start_comfy(args)

    import torch
    import comfy.sd
    from safetensors import safe_open

    collect = _Collect()
    logging.getLogger().addHandler(collect)
    with safe_open(args.embedding, "pt") as f:
        meta = f.metadata() or {}
        vectors = {key: f.get_tensor(key).float() for key in f.keys()}  # SD1: emb_params; SDXL: clip_l, clip_g
    name = os.path.splitext(os.path.basename(args.embedding))[0]
    control = PROMPT.format(meta["personalize.init_word"])

    # --- ComfyUI ------------------------------------------------------------
    clip = comfy.sd.load_checkpoint_guess_config(args.ckpt, output_vae=False, output_clip=True, output_model=False,
                                                 embedding_directory=[os.path.dirname(args.embedding)])[1]

    def comfy_encode(text):
        tokens = clip.tokenize(text)
        with torch.no_grad():
            return clip.encode_from_tokens(tokens).float(), tokens["l"][0]

    comfy_emb, tokens = comfy_encode(PROMPT.format(f"embedding:{name}"))
    comfy_control, _ = comfy_encode(control)
    results = {"comfy_embedding_vectors": sum(not isinstance(t[0], int) for t in tokens),
               "missing_warnings": [line for line in collect.lines if "does not exist" in line]}

    # --- our engine -----------------------------------------------------------
    from trainers.core.config import TrainConfig
    from trainers.families.model_loading import load_sd_components
    from trainers.families.registry import get_family
    from trainers.methods.textual_inversion import TextualInversionMethod

    comps = load_sd_components(args.ckpt, tokenizer_dir=os.path.join(comfy_dir, "comfy", "sd1_tokenizer"))
    for encoder in comps.text_encoders:
        encoder.eval()
    family = get_family(comps.family)
    count = len(next(iter(vectors.values())))
    with torch.no_grad():
        ours_control = family.encode(comps, [control]).states.float()
    method = TextualInversionMethod(TrainConfig(method="textual_inversion", trigger_word=meta["personalize.token"],
                                                init_word=meta["personalize.init_word"], num_vectors=count))
    method.setup(comps)
    with torch.no_grad():
        for spliced, key in zip(method.spliced, family.embedding_keys):
            spliced.vectors.copy_(vectors[key])
        ours_emb = family.encode(comps, [method.prompt(PROMPT.format(meta["personalize.token"]))]).states.float()

    results["control_rel_err"] = rel(comfy_control, ours_control)  # the same base CLIP on both sides
    results["embedding_rel_err"] = rel(comfy_emb, ours_emb)
    results["embedding_effect"] = rel(ours_emb, ours_control)  # the embedding is not the init word
    results["file_vectors"] = count
    results["file_keys"] = sorted(vectors)
    print("EQUIVALENCE " + json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
