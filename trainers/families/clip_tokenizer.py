"""The CLIP tokenizer, from a local folder; never from the network."""
from __future__ import annotations

import os

from ..core import host
from .load_errors import ModelLoadError

CLIP_CONTEXT = 77


def load_tokenizer(tokenizer_dir: str | None, model_path: str = "", pad_token: str | None = None):
    """The CLIP tokenizer from a local folder (ComfyUI ships one); never from the network. SDXL's second encoder
    (OpenCLIP-G) uses the same vocabulary padded with "!" (`pad_token`)."""
    from transformers import CLIPTokenizer

    tokenizer_dir = tokenizer_dir or host.tokenizer_dir("sd1")
    if not tokenizer_dir or not any(os.path.isfile(os.path.join(tokenizer_dir, f))
                                    for f in ("vocab.json", "tokenizer.json")):
        raise ModelLoadError(
            f"No CLIP tokenizer found{f' for {model_path!r}' if model_path else ''}"
            f"{f' in {tokenizer_dir!r}' if tokenizer_dir else ''}. Single-file checkpoints do not contain one: "
            f"ComfyUI ships it as comfy/sd1_tokenizer (set COMFYUI_DIR outside ComfyUI), or put vocab.json and "
            f"merges.txt in models/clip/tokenizer, or load a diffusers folder, which has its own.")
    try:
        extra = {"pad_token": pad_token} if pad_token else {}
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, **extra)
    except Exception as e:
        raise ModelLoadError(f"The CLIP tokenizer in '{tokenizer_dir}' could not be loaded: {e}") from e
    # CLIP's context is 77 tokens; ComfyUI's tokenizer config says 8192 (it chunks prompts itself),
    # which would make diffusers pipelines pad past the position embeddings.
    tokenizer.model_max_length = min(tokenizer.model_max_length, CLIP_CONTEXT)
    return tokenizer
