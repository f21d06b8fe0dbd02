"""Perceptual hash (pHash): near-identical pictures get hashes a few bits apart.

The image is reduced to 32x32 grey, transformed with a 2-D DCT, and the 8x8 lowest
frequencies are compared with their median. Re-encoding, resizing or mild colour
changes move a few bits; a different picture differs in about half of the 64.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_N = 32
_K = 8
_n = np.arange(_N)
_DCT = np.cos(np.pi * (2 * _n[None, :] + 1) * _n[:, None] / (2 * _N))  # rows: frequencies


def phash(img: Image.Image) -> str:
    """64-bit perceptual hash of `img` as 16 hex digits."""
    grey = img.convert("L").resize((_N, _N), Image.Resampling.BOX)  # box: an area average, no aliasing
    pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:_K, :_K].ravel()
    bits = low > np.median(low[1:])  # the DC term (overall brightness) would skew the median
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def distance(a: str, b: str) -> int:
    """Number of differing bits between two hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class HashIndex:
    """Hashes seen so far; `nearest` compares one hash with all of them at once (big datasets stay fast)."""

    def __init__(self):
        self._bytes = np.zeros((64, 8), dtype=np.uint8)  # grows by doubling
        self.labels: list = []

    def add(self, hash_hex: str, label) -> None:
        n = len(self.labels)
        if n == len(self._bytes):
            self._bytes = np.concatenate([self._bytes, np.zeros_like(self._bytes)])
        self._bytes[n] = np.frombuffer(bytes.fromhex(hash_hex), dtype=np.uint8)
        self.labels.append(label)

    def nearest(self, hash_hex: str):
        """(label, distance) of the closest hash, or None when empty; ties go to the earliest."""
        if not self.labels:
            return None
        query = np.frombuffer(bytes.fromhex(hash_hex), dtype=np.uint8)
        distances = _POPCOUNT[self._bytes[:len(self.labels)] ^ query].sum(axis=1, dtype=np.int64)
        k = int(np.argmin(distances))
        return self.labels[k], int(distances[k])
