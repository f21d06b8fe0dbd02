"""A fine-tuned model as one single-file checkpoint in the original LDM layout (what CheckpointLoaderSimple,
A1111 and our own loader read)."""
from __future__ import annotations

import os

from ..core import safetensors_file
from ..core.safetensors_file import Pending
from .checkpoint_file import read_state_dict
from .ldm_keys import ALL_PARTS, diffusers_to_ldm, part_prefix

STALE = ("model_ema.",)  # an EMA copy of the base UNet no longer matches the fine-tuned one


def checkpoint_tensors(comps, trained: tuple[str, ...], dtype) -> dict:
    """The trained parts ("unet", "text_encoder", SDXL's "text_encoder_2") from the live models in `dtype`; every other tensor copied
    bit-exact from the base file (a diffusers-folder base is converted whole, in its own dtype). The entries are
    safetensors_file.Pending: each is converted or read from the base file only when it is written."""
    out = {k: Pending.cast(v, dtype) for k, v in diffusers_to_ldm(comps, parts=trained).items()}
    prefixes = tuple(part_prefix(comps, part) for part in trained) + STALE
    untrained = tuple(p for p in ALL_PARTS if p not in trained)
    if comps.source.lower().endswith(".safetensors") and os.path.isfile(comps.source):
        kept = safetensors_file.pending(comps.source, keep=lambda key: not key.startswith(prefixes))
    elif os.path.isfile(comps.source):
        kept, _ = read_state_dict(comps.source, keep=lambda key: not key.startswith(prefixes))
    else:
        kept = diffusers_to_ldm(comps, parts=untrained)
    return {**kept, **out}
