"""kohya-style `ss_*` and `modelspec.*` metadata that A1111, Civitai and kohya's tools read."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter

from ..core.modelspec import modelspec


def tag_frequency(captions: list[str]) -> dict:
    """Comma-separated tags counted as kohya does (ss_tag_frequency's inner dict)."""
    counts = Counter()
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] += 1
    return dict(counts)


def tensor_hashes(tensors: dict, metadata: dict | None = None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's addnet hashes: the file as saved with only its
    ss_* metadata (which never changes afterwards); the first hashes the tensor bytes, the legacy one
    64 KiB at 1 MiB into the file, header included."""
    from safetensors.torch import save

    training = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=training or None)
    header_len = int.from_bytes(data[:8], "little")
    full = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy = hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return full, legacy


def lora_metadata(cfg, family, base_info: dict, captions: list[str], dataset_dir: str,
                  steps: int, started: float, tensors: dict, network_meta: dict) -> dict:
    """`network_meta`: the network type's ss_network_module/dim/alpha/args."""
    meta = {
        **network_meta,
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_base_model_version": family.base_model_version,
        "ss_v2": "False",
        "ss_sd_model_name": base_info.get("name", ""),
        "ss_sd_model_hash": base_info.get("legacy_hash", ""),
        "ss_new_sd_model_hash": base_info.get("sha256", ""),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_max_train_steps": str(cfg.steps),
        "ss_steps": str(steps),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_learning_rate": str(cfg.unet_lr),
        "ss_unet_lr": str(cfg.unet_lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
        "ss_optimizer": cfg.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_flip_aug": str(cfg.flip),
        "ss_random_crop": str(cfg.crop == "random"),
        "ss_seed": str(cfg.seed),
        "ss_num_train_images": str(len(captions)),
        "ss_tag_frequency": json.dumps({os.path.basename(os.path.normpath(dataset_dir)): tag_frequency(captions)}),
        "ss_output_name": cfg.output_name,
        "ss_training_comment": f"trigger: {cfg.trigger_word}" if cfg.trigger_word else "",
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time()),
        **modelspec(f"{family.architecture}/lora", cfg.output_name, started,
                    implementation="https://github.com/Stability-AI/generative-models",
                    resolution=f"{cfg.resolution}x{cfg.resolution}"),
        "personalize.trigger_word": cfg.trigger_word,
    }
    if cfg.trigger_word:
        meta["modelspec.trigger_phrase"] = cfg.trigger_word
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = tensor_hashes(tensors, meta)
    return meta
