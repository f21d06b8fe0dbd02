"""Training methods: what becomes trainable and what gets saved. The loop is shared; a method is one registry line."""
from __future__ import annotations

from .dreambooth import DreamBoothLoraMethod, DreamBoothMethod
from .lora import LoraMethod
from .textual_inversion import TextualInversionMethod

METHODS = {"lora": LoraMethod, "dreambooth": DreamBoothMethod, "dreambooth_lora": DreamBoothLoraMethod,
           "textual_inversion": TextualInversionMethod}


def get_method(cfg):
    return METHODS[cfg.method](cfg)
