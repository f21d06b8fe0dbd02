"""The LoRA method: adapters on the UNet (and optionally the text encoder), saved as a kohya-format LoRA file."""
from __future__ import annotations

from ..core.dtypes import DTYPES
from ..networks import registry, targets
from ..networks.lora_metadata import lora_metadata
from .base import Artifact, TrainingMethod, chosen_text_encoders, save_model_file


class LoraMethod(TrainingMethod):
    """A network (cfg.network: LoRA, LoHa, LoKr) on the UNet and optionally the text encoder, saved as a
    kohya / LyCORIS file in models/loras."""

    name = "lora"
    export_reads_frozen_models = False  # the adapter file holds only what trained

    def __init__(self, cfg):
        super().__init__(cfg)
        self.network = registry.get(cfg.network)

    def trained_text_encoders(self, comps) -> list:
        return chosen_text_encoders(self.cfg, comps)

    def setup(self, comps) -> list[dict]:
        """Attach the adapters; returns optimizer parameter groups with their learning rates."""
        cfg = self.cfg
        for encoder in comps.text_encoders:
            encoder.requires_grad_(False)
        comps.vae.requires_grad_(False)
        net = self.network
        unet_targets = targets.unet_targets(comps.unet, cfg.preset)
        groups = [{"params": net.attach(comps.unet, unet_targets, cfg.rank, cfg.alpha, cfg.lokr_factor,
                                        cfg.conv_rank, cfg.conv_alpha), "lr": cfg.unet_lr}]
        for encoder in chosen_text_encoders(cfg, comps):
            te_targets = targets.text_encoder_targets(encoder)
            groups.append({"params": net.attach(encoder, te_targets, cfg.rank, cfg.alpha, cfg.lokr_factor),
                           "lr": cfg.text_encoder_lr})
        return groups

    def export(self, comps, family, *, captions, dataset_dir, steps, started) -> Artifact:
        cfg = self.cfg
        dtype = DTYPES[cfg.save_precision]
        tensors = self.network.state_dict(comps.unet, comps.text_encoders if cfg.train_text_encoder else None,
                                          dtype=dtype, unet_name=lambda name: family.lora_unet_name(comps.unet, name))
        meta = lora_metadata(cfg, family, comps.info, captions, dataset_dir, steps, started, tensors,
                             self.network.metadata(cfg))
        return Artifact("lora", save_model_file("loras", cfg, "lora", tensors, meta))
