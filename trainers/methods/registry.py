"""Training methods: what becomes trainable and what gets saved. The loop is shared; a method is one registry line."""
from __future__ import annotations

from .lora import LoraMethod
from .textual_inversion import TextualInversionMethod

METHODS = {"lora": LoraMethod, "textual_inversion": TextualInversionMethod}


def get_method(cfg):
    return METHODS[cfg.method](cfg)
