"""LPIPS (Zhang et al. 2018), the `lpips` package v0.1 with the AlexNet trunk, in plain torch, offline.

DreamBench's DIV metric is the mean pairwise LPIPS among images generated for one prompt. This module
computes exactly what `lpips.LPIPS(net="alex")` computes (same layers, constants and order of operations)
from two local weight files, so neither torchvision nor lpips is needed and nothing is downloaded.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .errors import BackboneError

# Channels of the five ReLU outputs LPIPS compares (after torchvision's features.0, 3, 6, 8, 10).
CHANNELS = (64, 192, 384, 256, 256)
_TAPS = (1, 4, 7, 9, 11)  # indices of those ReLUs in `features`
# torchvision's full AlexNet file also holds the classifier: accepted (shapes unchecked) since LPIPS never uses it.
_CLASSIFIER_KEYS = {f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")}

BACKBONE_FILES = ("alexnet.safetensors", "alexnet.pth")
LIN_FILES = ("lin.safetensors", "alex.pth")
_SOURCES = ("LPIPS needs alexnet.safetensors or alexnet.pth (torchvision's AlexNet ImageNet weights, "
            "alexnet-owt-7be5be79.pth, a state dict with features.* keys) and lin.safetensors or alex.pth "
            "(the lpips package's lpips/weights/v0.1/alex.pth, keys lin0..lin4.model.1.weight).")


class AlexNetFeatures(nn.Module):
    """torchvision's `alexnet().features` up to its last ReLU (the final max-pool is unused and has no weights),
    so the state-dict keys are torchvision's `features.N.*`."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of relu1..relu5."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        return taps


class _NetLin(nn.Module):
    """lpips' NetLinLayer: a 1x1 conv to one channel. Its index 0 is a Dropout in lpips (a no-op in eval), kept
    as an Identity so the weight key stays `model.1.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length along channels (lpips.normalize_tensor, eps added to the norm, not inside the sqrt)."""
    return feat / (torch.sqrt(torch.sum(feat ** 2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1, AlexNet trunk. Build with `load_lpips(folder)`; a bare `LPIPS()` has random weights.

    State-dict keys: `net.features.N.*` (torchvision) and `lin{i}.model.1.weight` (lpips)."""

    def __init__(self):
        super().__init__()
        # lpips' ScalingLayer: maps [-1, 1] images to roughly ImageNet-normalized inputs.
        # Constants, not weights: kept out of the state dict so it holds exactly the two files' keys.
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None], persistent=False)
        self.net = AlexNetFeatures()
        for i, channels in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _NetLin(channels))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances [B] between images x and y, both [B, 3, H, W] in [-1, 1] (lpips' `normalize=False`)."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"LPIPS takes two [B, 3, H, W] batches of the same shape, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        x, y = (t.to(self.shift.device, self.shift.dtype) for t in (x, y))
        feats_x = self.net((x - self.shift) / self.scale)
        feats_y = self.net((y - self.shift) / self.scale)
        total = 0
        for i, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            diff = (_normalize(fx) - _normalize(fy)) ** 2
            total = total + getattr(self, f"lin{i}")(diff).mean([2, 3], keepdim=True)  # spatial_average
        return total.flatten()

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances [B] between images in [0, 1] (lpips' `normalize=True`), without gradients: the metric's use."""
        return self(a * 2 - 1, b * 2 - 1)


def _read(folder: str, names: tuple[str, str]) -> tuple[str, dict]:
    """The tensors of the first of `names` (safetensors, then .pth) present in `folder`, and its path."""
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                tensors = load_file(path)
            else:
                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or pickled-code file: say which, not a pickle traceback
            raise BackboneError(f"Cannot read {path}: {e}. {_SOURCES}") from e
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise BackboneError(f"{path} is not a state dict of tensors. {_SOURCES}")
        return path, tensors
    raise BackboneError(f"Neither {' nor '.join(names)} is in {folder}. {_SOURCES}")


def _check(path: str, tensors: dict, expected: dict, allowed_extra=frozenset()) -> None:
    """Every expected key present with its shape, and no key that would be silently ignored."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - allowed_extra)
    if missing or extra:
        raise BackboneError(f"{path} does not fit LPIPS (missing keys {missing}, unexpected keys {extra}). "
                            f"{_SOURCES}")
    for key, ref in expected.items():
        if tensors[key].shape != ref.shape:
            raise BackboneError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected "
                                f"{tuple(ref.shape)}. {_SOURCES}")


def load_lpips(folder: str, device="cpu") -> LPIPS:
    """LPIPS with the AlexNet weights and the lpips v0.1 linear weights found in `folder` (see BACKBONE_FILES,
    LIN_FILES; a .safetensors file is preferred over the .pth beside it). Raises BackboneError if they do not fit."""
    model = LPIPS()
    expected = model.state_dict()
    path, backbone = _read(folder, BACKBONE_FILES)
    _check(path, backbone, {k[len("net."):]: v for k, v in expected.items() if k.startswith("net.")},
           _CLASSIFIER_KEYS)
    path, lin = _read(folder, LIN_FILES)
    _check(path, lin, {k: v for k, v in expected.items() if k.startswith("lin")})
    model.load_state_dict({**{k: backbone[k[len("net."):]] for k in expected if k.startswith("net.")}, **lin})
    return model.to(device)
