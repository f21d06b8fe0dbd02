"""The loaded pieces of a Stable Diffusion model, whatever file they came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# SD1.x training noise schedule (the LDM config); built in code so nothing is fetched.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
}


@dataclass(repr=False, eq=False)  # (a generated repr or == would read a text-first load's UNet)
class SDComponents:
    family: str  # "sd1" or "sdxl"
    unet: object  # diffusers UNet2DConditionModel
    vae: object  # diffusers AutoencoderKL
    text_encoder: object  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    prediction_type: str = "epsilon"
    source: str = ""  # the file or folder it was loaded from
    info: dict = field(default_factory=dict)  # name, hashes, anything for metadata
    text_encoder_2: object = None  # SDXL: OpenCLIP ViT-bigG (transformers CLIPTextModelWithProjection)
    tokenizer_2: object = None  # SDXL: CLIP's BPE, padded with "!" as OpenCLIP does
    load_rest: Callable | None = None  # a text-first load (model_loading): () -> (unet, vae), run on first use

    def swap_vae(self, make) -> None:
        """Use `make(base_vae)` as the VAE: now, or once a text-first load reads the base VAE (so swapping does
        not read the UNet early)."""
        if self.load_rest is None:
            self.vae = make(self.vae)
            return
        rest = self.load_rest

        def load_and_swap():
            unet, vae = rest()
            return unet, make(vae)
        self.load_rest = load_and_swap

    @property
    def text_encoders(self) -> list:
        """Every text encoder, in the family's order (SDXL: CLIP-L, then OpenCLIP-G)."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    def named_models(self) -> list[tuple[str, object]]:
        """The denoiser and text encoders by the names checkpoints use for their parameters."""
        second = [("text_encoder_2", self.text_encoder_2)] if self.text_encoder_2 is not None else []
        return [("unet", self.unet), ("text_encoder", self.text_encoder), *second]

    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(prediction_type=self.prediction_type, **SD_SCHEDULER_CONFIG)


def _read_on_first_use(name: str) -> property:
    """`unet` and `vae` of a text-first load come from the file when something first asks for either: the frozen
    text encoders run (and may be freed) before the rest of the model takes memory."""
    slot = "_" + name

    def get(comps):
        if comps.load_rest is not None:
            load, comps.load_rest = comps.load_rest, None
            comps.unet, comps.vae = load()
        return comps.__dict__[slot]

    def put(comps, value):
        comps.__dict__[slot] = value
    return property(get, put)


# Set after the class is made, so the dataclass keeps `unet` and `vae` as plain constructor arguments.
SDComponents.unet = _read_on_first_use("unet")
SDComponents.vae = _read_on_first_use("vae")
