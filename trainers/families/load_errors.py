"""The error a model that cannot be loaded raises, and the sentence that says what can be loaded."""
from __future__ import annotations

SUPPORTED = ("Supported are Stable Diffusion 1.x and SDXL base models: a single-file checkpoint (.safetensors, or "
             ".ckpt/.pt holding only tensors) or a diffusers folder with model_index.json.")


class ModelLoadError(ValueError):
    """A model file or folder that cannot be loaded; the message names it and says what to do."""
