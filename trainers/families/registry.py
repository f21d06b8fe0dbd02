"""The model-family seam: what differs between SD1.x and (later) SDXL, behind one interface."""
from __future__ import annotations

import torch


class SD1:
    name = "sd1"
    base_model_version = "sd_v1"  # kohya's ss_base_model_version
    architecture = "stable-diffusion-v1"  # modelspec.architecture prefix

    def tokenize(self, comps, captions: list[str]) -> torch.Tensor:
        length = comps.text_encoder.config.max_position_embeddings  # 77 for CLIP
        return comps.tokenizer(captions, padding="max_length", max_length=length,
                               truncation=True, return_tensors="pt").input_ids

    def encode(self, comps, input_ids: torch.Tensor, text_encoder=None) -> torch.Tensor:
        """Per-token conditioning for the UNet's cross-attention (the last hidden state).

        text_encoder: the training wrapper (DDP) when it is trained, so its gradients are synchronised."""
        encoder = text_encoder or comps.text_encoder
        return encoder(input_ids.to(comps.text_encoder.device))[0]

    def unet_kwargs(self, batch_size: int, device) -> dict:
        return {}  # SDXL adds its pooled text and size conditioning here


FAMILIES = {"sd1": SD1()}


def get_family(name: str):
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family '{name}' is not supported yet (supported: {', '.join(FAMILIES)})") from None
