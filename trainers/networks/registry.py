"""Network types by their config name (`TrainConfig.network`)."""
from __future__ import annotations

from . import loha, lokr, lora

NETWORKS = {net.name: net for net in (lora.NETWORK, loha.NETWORK, lokr.NETWORK)}


def get(name: str):
    return NETWORKS[name]
