"""What a family's text encoders give the UNet: per-token states, and (SDXL) a pooled embedding."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    states: torch.Tensor  # [batch, tokens, dim]: the cross-attention context
    pooled: torch.Tensor | None = None  # [batch, dim]: SDXL's text_embeds; None for SD1

    def to(self, *args, **kwargs) -> "Conditioning":
        return Conditioning(self.states.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def rows(self) -> list["Conditioning"]:
        """One Conditioning per sample (what the caption cache keeps per caption)."""
        pooled = [None] * len(self.states) if self.pooled is None else list(self.pooled)
        return [Conditioning(s, p) for s, p in zip(self.states, pooled)]

    @staticmethod
    def stack(rows: list["Conditioning"]) -> "Conditioning":
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return Conditioning(torch.stack([r.states for r in rows]), pooled)
