"""Tiny random CLIP and DINO (ViT) folders in Hugging Face layout, for the metric tests: the real model classes
and processors at a size that scores on a CPU in milliseconds. Nothing is downloaded."""
from __future__ import annotations

import tempfile

from .toy_models import write_toy_tokenizer

_IMAGE = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2)
_PROCESSING = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True)


def save_toy_clip(folder: str, seed: int = 0) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:  # the processor saves its own copy of the tokenizer files
        tokenizer = CLIPTokenizer.from_pretrained(write_toy_tokenizer(scratch))
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
                        vision_config=_IMAGE, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(**_PROCESSING), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_toy_dino(folder: str, seed: int = 0) -> str:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(**_IMAGE), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
