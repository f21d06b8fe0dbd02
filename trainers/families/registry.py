"""The model-family seam: what differs between SD1.x and (later) SDXL, behind one interface.

A family encodes captions into a Conditioning, turns a Conditioning and a batch into the UNet's keyword
arguments, and builds the inference pipeline for validation images. Code outside the family iterates
`comps.text_encoders` and never assumes how many there are.
"""
from __future__ import annotations

from .conditioning import Conditioning


class SD1:
    name = "sd1"
    base_model_version = "sd_v1"  # kohya's ss_base_model_version
    architecture = "stable-diffusion-v1"  # modelspec.architecture prefix
    embedding_keys = ("emb_params",)  # an embedding file's tensor per text encoder, as A1111 and ComfyUI read it

    def encode(self, comps, texts: list[str], text_encoders=None) -> Conditioning:
        """The UNet's conditioning for these captions: CLIP's last hidden state, padded to 77 tokens.

        text_encoders: the training wrappers (DDP) when they are trained, so their gradients are synchronised."""
        encoder = (text_encoders or comps.text_encoders)[0]
        length = comps.text_encoder.config.max_position_embeddings  # 77 for CLIP
        ids = comps.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids
        return Conditioning(encoder(ids.to(comps.text_encoder.device))[0])

    def unet_kwargs(self, cond: Conditioning, batch=None) -> dict:
        """The UNet's conditioning arguments; `batch` (its items' original size and crop box) is for SDXL."""
        return {"encoder_hidden_states": cond.states}

    def pipeline(self, comps, unet, scheduler):
        """An inference pipeline over these components (validation images)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


FAMILIES = {"sd1": SD1()}


def get_family(name: str):
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family '{name}' is not supported yet (supported: {', '.join(FAMILIES)})") from None
