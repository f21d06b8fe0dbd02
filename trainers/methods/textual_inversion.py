"""Textual inversion: a new word whose embedding vectors are the only thing trained, saved where ComfyUI and A1111
load embeddings (models/embeddings, `embedding:<name>` in a prompt).

The new vectors live in a small trainable tensor spliced into the text encoder's token embedding, instead of
training the whole (vocab x dim) table and restoring its other rows after each step: every other row cannot
change, and the optimizer state and checkpoints hold n x dim numbers, not 49408 x dim.
"""
from __future__ import annotations

import re

import torch

from ..core.modelspec import modelspec
from .base import Artifact, Batch, TrainingMethod, save_model_file


class SplicedEmbedding(torch.nn.Module):
    """A frozen token embedding whose ids from `first_new` on read from `vectors`, the trained rows."""

    def __init__(self, base: torch.nn.Embedding, first_new: int, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new = first_new
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float())

    @property
    def weight(self):  # what callers of get_input_embeddings().weight expect: the frozen table
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        known = self.base(ids.clamp(max=self.base.num_embeddings - 1))
        new = ids >= self.first_new
        if not new.any():
            return known
        spliced = self.vectors[(ids - self.first_new).clamp(0, len(self.vectors) - 1)].to(known.dtype)
        return torch.where(new[..., None], spliced, known)


class TextualInversionMethod(TrainingMethod):
    """The trigger word becomes `num_vectors` new tokens, initialised from `init_word`; only they train."""

    name = "textual_inversion"

    def trained_text_encoders(self, comps) -> list:
        return list(comps.text_encoders)  # their outputs depend on the trained vectors: they run every step

    def tokens(self) -> list[str]:
        """The placeholder tokens the trigger word stands for: <sks>, <sks>_1, ... (one per vector)."""
        word = self.cfg.trigger_word.strip()
        return [f"<{word}>"] + [f"<{word}>_{i}" for i in range(1, self.cfg.num_vectors)]

    def prompt(self, text: str) -> str:
        """The trigger word, wherever it stands as a word, becomes the placeholder tokens."""
        word = re.escape(self.cfg.trigger_word.strip())
        return re.sub(rf"(?<![\w<]){word}(?![\w>])", " ".join(self.tokens()), text)

    def setup(self, comps) -> list[dict]:
        cfg = self.cfg
        for model in (comps.unet, comps.vae, *comps.text_encoders):
            model.requires_grad_(False)
        tokens = self.tokens()
        self.spliced = []
        # Every text encoder gets its own vectors for the new tokens (SDXL: CLIP-L and OpenCLIP-G, saved as
        # clip_l and clip_g), each started from its own embedding of the init word.
        for encoder, tokenizer in zip(comps.text_encoders, comps.tokenizers):
            if tokenizer.add_tokens(tokens) != len(tokens):
                raise ValueError(f"The tokenizer already knows {', '.join(tokens)}; pick another trigger word.")
            ids = tokenizer.convert_tokens_to_ids(tokens)
            spliced = SplicedEmbedding(encoder.get_input_embeddings(), first_new=min(ids),
                                       vectors=self.initial_vectors(encoder, tokenizer))
            encoder.set_input_embeddings(spliced)
            self.spliced.append(spliced)
        return [{"params": [s.vectors for s in self.spliced], "lr": cfg.embedding_lr}]

    def initial_vectors(self, encoder, tokenizer) -> torch.Tensor:
        """Vector i starts as the init word's token i (cycled), as A1111 does: [num_vectors, dim]."""
        init = tokenizer(self.cfg.init_word, add_special_tokens=False).input_ids
        if not init:
            raise ValueError(f"init_word {self.cfg.init_word!r} gives no token; use a plain word such as dog.")
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            return torch.stack([table[init[i % len(init)]] for i in range(self.cfg.num_vectors)]).float()

    def batch(self, step, micro, gen, data) -> Batch:
        batch = super().batch(step, micro, gen, data)
        batch.texts = [self.prompt(text) for text in batch.texts]
        return batch

    def export(self, comps, family, *, captions, dataset_dir, steps, started) -> Artifact:
        cfg = self.cfg
        vectors = [s.vectors.detach().float().cpu() for s in self.spliced]
        tensors = dict(zip(family.embedding_keys, vectors))
        info = comps.info
        meta = {
            **modelspec(f"{family.architecture}/textual-inversion", cfg.output_name, started,
                        trigger_phrase=f"embedding:{cfg.output_name}"),
            "personalize.token": cfg.trigger_word,
            "personalize.init_word": cfg.init_word,
            "personalize.vectors": str(len(vectors[0])),
            "personalize.steps": str(steps),
            "personalize.images": str(len(captions)),
            "personalize.base_model": info.get("name", ""),
            "personalize.base_model_sha256": info.get("sha256", ""),
            # what A1111 writes in its own embedding files
            "step": str(steps), "sd_checkpoint": info.get("legacy_hash", ""), "sd_checkpoint_name": info.get("name", ""),
        }
        return Artifact("embedding", save_model_file("embeddings", cfg, "embedding", tensors, meta))
