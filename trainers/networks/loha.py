"""LoHa (LyCORIS): W' = W + (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two
low-rank products, saved as `.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b/.alpha`."""
from __future__ import annotations

from .peft_network import LycorisNetwork


class LohaNetwork(LycorisNetwork):
    name = "loha"
    tensors = {"hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b"}

    def peft_config(self, targets, rank, alpha, factor, rank_pattern, alpha_pattern):
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=True, rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern)


NETWORK = LohaNetwork()
