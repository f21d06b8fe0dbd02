"""Settings that depend on the base model's family: resolution 0 (auto) becomes the family's own size, and the
note a node shows about what the run chose for this base (also on the canvas, before a run: nodes/routes.py)."""
from __future__ import annotations

import dataclasses

from ..core.config import TrainConfig

# Peak GPU memory of an SDXL rank-8 LoRA step at 1024 px, batch 1, bf16 (bench/memory_estimate.py).
SDXL_LORA_GIB = {True: 5.7, False: 12.2}  # by gradient checkpointing


def apply(cfg: TrainConfig, family) -> tuple[TrainConfig, list[str]]:
    """`cfg` with resolution 0 replaced by the family's native size, and the note that says what was chosen."""
    trained = cfg.which_text_encoders if cfg.train_text_encoder else ""
    note = advice(family, cfg.resolution, trained, cfg.gradient_checkpointing, cfg.method)
    if not cfg.resolution:
        cfg = dataclasses.replace(cfg, resolution=family.native_resolution)
    return cfg, [note] if note else []


def advice(family, resolution: int, trained_encoders: str, gradient_checkpointing: bool, method: str = "lora") -> str:
    """What a node says about these settings on this family's base ("" when there is nothing to say).
    trained_encoders: "" (frozen), or which_text_encoders when train_text_encoder is on."""
    if family.name != "sdxl":
        return ""  # SD1.x: 512 px, frozen encoders and cached outputs have long been the defaults
    native = family.native_resolution
    if resolution and resolution < native * 3 // 4:
        size = (f"resolution {resolution} px as set, but {family.label} was trained at {native} px and loses detail "
                f"below {native * 3 // 4}: 0 picks {native}")
    elif resolution > native * 3 // 2:
        size = f"resolution {resolution} px as set; {family.label} was trained at {native} px (0 picks it)"
    else:
        size = f"training at {resolution} px" if resolution else f"training at {native} px, its own size (resolution 0)"
    parts = [f"{family.label} base: {size}."]
    if method == "textual_inversion":
        pass  # the new word's vectors train through both encoders: nothing to cache
    elif trained_encoders:
        which = {"all": "Both text encoders train", "clip_l": "CLIP-L trains (OpenCLIP-G frozen)",
                 "clip_g": "OpenCLIP-G trains (CLIP-L frozen)"}[trained_encoders]
        parts.append(f"{which}, which costs memory; with train_text_encoder off they are frozen and their outputs "
                     f"cached once.")
    else:
        parts.append("Text encoders frozen, their outputs cached once.")
    if method in ("lora", "dreambooth_lora"):
        gib = SDXL_LORA_GIB[gradient_checkpointing]
        parts.append(f"A rank-8 LoRA step at 1024 px takes about {gib:g} GB of GPU memory"
                     + ("." if gradient_checkpointing else
                        f" ({SDXL_LORA_GIB[True]:g} GB with gradient_checkpointing on)."))
    return " ".join(parts)
