"""A fine-tuned model as one single-file checkpoint in the original LDM layout (what CheckpointLoaderSimple,
A1111 and our own loader read)."""
from __future__ import annotations

import os

from .checkpoint_file import read_state_dict
from .ldm_keys import PARTS, diffusers_to_ldm

STALE = ("model_ema.",)  # an EMA copy of the base UNet no longer matches the fine-tuned one


def checkpoint_tensors(comps, trained: tuple[str, ...], dtype) -> dict:
    """The trained parts ("unet", "text_encoder") converted from the live models in `dtype`; every other tensor
    copied bit-exact from the base file (a diffusers-folder base is converted whole, in its own dtype)."""
    out = diffusers_to_ldm(comps, dtype=dtype, parts=trained)
    prefixes = tuple(PARTS[part] for part in trained) + STALE
    if os.path.isfile(comps.source):
        kept, _ = read_state_dict(comps.source, keep=lambda key: not key.startswith(prefixes))
    else:
        kept = diffusers_to_ldm(comps, parts=tuple(p for p in PARTS if p not in trained))
    return {**kept, **out}

