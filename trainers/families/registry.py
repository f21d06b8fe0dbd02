"""The model-family seam: what differs between SD1.x and SDXL, behind one interface.

A family encodes captions into a Conditioning, turns a Conditioning and a batch into the UNet's keyword
arguments, and builds the inference pipeline for validation images. Code outside the family iterates
`comps.text_encoders` and never assumes how many there are.
"""
from __future__ import annotations

import torch

from .conditioning import Conditioning


class SD1:
    name = "sd1"
    label = "SD1.x"
    native_resolution = 512  # the size the base was trained at: resolution 0 (auto) trains at it
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

    def lora_unet_name(self, unet, module: str) -> str:
        """A UNet module's name in LoRA files: kohya's SD1.x files use the diffusers name."""
        return module

    def pipeline(self, comps, unet, scheduler):
        """An inference pipeline over these components (validation images)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


class SDXL(SD1):
    name = "sdxl"
    label = "SDXL"
    native_resolution = 1024
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base"
    embedding_keys = ("clip_l", "clip_g")  # ComfyUI's and A1111's per-encoder keys of an SDXL embedding

    def encode(self, comps, texts: list[str], text_encoders=None) -> Conditioning:
        """Both encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide), and OpenCLIP-G's
        projected pooled embedding, as SDXL was trained."""
        encoders = text_encoders or comps.text_encoders
        states = []
        for encoder, model, tokenizer in zip(encoders, comps.text_encoders, comps.tokenizers):
            ids = tokenizer(texts, padding="max_length", max_length=model.config.max_position_embeddings,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(model.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return Conditioning(torch.cat(states, dim=-1), out[0])  # out: the last encoder's, with text_embeds

    def unet_kwargs(self, cond: Conditioning, batch=None) -> dict:
        """Cross-attention states, plus the pooled embedding and each sample's size ids (original size, crop
        top-left, target size) as `added_cond_kwargs`."""
        latents = batch.latents
        target = (latents.shape[-2] * 8, latents.shape[-1] * 8)
        ids = [size_ids(item, target) for item in (batch.items or [None] * len(latents))]
        time_ids = torch.tensor(ids, dtype=cond.states.dtype, device=cond.states.device)
        return {"encoder_hidden_states": cond.states,
                "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids}}

    def lora_unet_name(self, unet, module: str) -> str:
        """kohya's SDXL files name UNet modules as the SGM (LDM) checkpoint does: input_blocks.4.1..."""
        from .ldm_keys import ldm_module_name

        return ldm_module_name(unet.config, module)

    def pipeline(self, comps, unet, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoder,
                                         text_encoder_2=comps.text_encoder_2, tokenizer=comps.tokenizer,
                                         tokenizer_2=comps.tokenizer_2, unet=unet, scheduler=scheduler,
                                         add_watermarker=False)


def size_ids(item, target: tuple[int, int]) -> list[float]:
    """SDXL's six size numbers for one training image: (original height, width, crop top, left, target height,
    width). The crop is where the kept box starts once the photo is scaled to the target, as kohya and diffusers
    compute it; an image without a recorded source is its own original, uncropped."""
    height, width = target
    if item is None or getattr(item, "original_size", None) is None or getattr(item, "crop_box", None) is None:
        return [height, width, 0, 0, height, width]
    (source_w, source_h), (left, top, right, _) = item.original_size, item.crop_box
    scale = width / max(right - left, 1)
    return [source_h, source_w, round(top * scale), round(left * scale), height, width]


FAMILIES = {"sd1": SD1(), "sdxl": SDXL()}


def get_family(name: str):
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family '{name}' is not supported yet (supported: {', '.join(FAMILIES)})") from None
