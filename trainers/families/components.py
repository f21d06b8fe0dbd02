"""The loaded pieces of a Stable Diffusion model, whatever file they came from."""
from __future__ import annotations

from dataclasses import dataclass, field

# SD1.x training noise schedule (the LDM config); built in code so nothing is fetched.
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
}


@dataclass
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
