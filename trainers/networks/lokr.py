"""LoKr (LyCORIS): W' = W + scale * kron(w1, w2), w2 either full or factored as w2_a @ w2_b (rank `rank`),
saved as `.lokr_w1` and `.lokr_w2` or `.lokr_w2_a/.lokr_w2_b`, with `.alpha`.

The scale is what LyCORIS trains and ComfyUI / A1111 apply: alpha / rank when a factor is low-rank, 1 when
both are full (the loaders then ignore alpha)."""
from __future__ import annotations

from .peft_network import ADAPTER, LycorisNetwork


class LokrNetwork(LycorisNetwork):
    name = "lokr"
    tensors = {"lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
               "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b"}

    def peft_config(self, targets, rank, alpha, factor, rank_pattern, alpha_pattern):
        from peft import LoKrConfig

        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=factor, init_weights=True,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    def scale(self, layer, alpha: float) -> float:
        factored = ADAPTER in layer.lokr_w1_a or ADAPTER in layer.lokr_w2_a
        return alpha / layer.r[ADAPTER] if factored else 1.0

    def network_args(self, cfg) -> dict:
        return {**super().network_args(cfg), "factor": str(cfg.lokr_factor)}


NETWORK = LokrNetwork()
