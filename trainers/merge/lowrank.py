"""One module's dense weight delta -> kohya LoRA / LoCon factors by truncated SVD, with what the truncation lost.

Re-rank, compressed mixing and extraction all end here. A linear delta [out, in] gives `lora_down` [r, in] and
`lora_up` [out, r]; a conv delta [out, in, kh, kw] is factorised flattened to [out, in*kh*kw] and gives kohya's
LoCon shapes, `lora_down` [r, in, kh, kw] and `lora_up` [out, r, 1, 1]. Loaders rebuild
(alpha / rank) * up @ down, so that product is what `approximation()` returns and what the error figures measure.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Full SVD costs about out * in * min(out, in): 22 s for SDXL's 1280x(1280*3*3) convs on two CPU cores, against
# under 1 s for a randomized SVD of rank 128. The randomized one is used only where its result is as good: a
# known top rank (rank, or max_rank with energy) well under the smaller side of a large matrix. Smaller
# matrices, and energy without max_rank (which needs the whole spectrum), take the exact full SVD.
RANDOMIZED_MIN_DIM = 1024
OVERSAMPLE = 10  # extra random directions: the top `rank` ones are found accurately
POWER_ITERATIONS = 4  # sharpen the basis where singular values decay slowly
ENERGY_TOLERANCE = 1e-6  # float32 SVD rounding: energy=1.0 keeps the numerical rank, not every noise direction


@dataclass
class LowRank:
    down: torch.Tensor  # float32, [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # float32, [out, r] or [out, r, 1, 1]
    alpha: float
    rank: int
    kept_energy: float  # share of the delta's squared Frobenius norm in the kept singular values, 0..1
    rel_error: float  # ||approximation - delta|| / ||delta|| (Frobenius), of the factors as returned
    shape: tuple  # the delta's shape

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def approximation(self) -> torch.Tensor:
        """The dense delta these factors stand for, as loaders rebuild it: (alpha / rank) * up @ down."""
        return ((self.up.flatten(1) @ self.down.flatten(1)) * self.scale).reshape(self.shape)

    def tensors(self, stem: str, dtype=torch.float16) -> dict:
        """The kohya file tensors; alpha a 0-dim float32 tensor, as the trained files write it."""
        return {f"{stem}.lora_down.weight": self.down.detach().to("cpu", dtype).contiguous(),
                f"{stem}.lora_up.weight": self.up.detach().to("cpu", dtype).contiguous(),
                f"{stem}.alpha": torch.tensor(float(self.alpha))}


def factorize(delta: torch.Tensor, rank: int | None = None, energy: float | None = None,
              max_rank: int | None = None, alpha: float | None = None,
              clamp_quantile: float | None = None) -> LowRank:
    """Factorise `delta` at `rank`, or at the smallest rank whose squared singular values reach `energy` (a share
    of the total, e.g. 0.9); either capped by `max_rank` and by min(out, in*kh*kw). `alpha` defaults to the rank
    (scale 1); another alpha rescales `up` so the rebuilt delta is the same. `clamp_quantile` (kohya's extract
    script, e.g. 0.99) clips each factor to +- that quantile of its absolute values. Computed in float32 on
    delta's device. A zero delta gives rank 1 with zero factors, kept_energy 1 and rel_error 0."""
    _check(delta, rank, energy, max_rank, alpha, clamp_quantile)
    shape = tuple(delta.shape)
    matrix = delta.detach().float().flatten(1)
    total = float(matrix.double().square().sum())
    cap = min(min(matrix.shape), max_rank or min(matrix.shape))
    if total == 0.0:
        down, up = matrix.new_zeros(1, matrix.shape[1]), matrix.new_zeros(matrix.shape[0], 1)
        return _result(down, up, alpha or 1.0, 1.0, matrix, shape)

    top = min(rank, cap) if rank else (cap if max_rank else None)  # None: energy needs the whole spectrum
    u, s, vh = _svd(matrix, top)
    squares = s.double().square()
    if rank:
        r = min(rank, cap)
    else:
        reached = (squares.cumsum(0) / total >= energy - ENERGY_TOLERANCE).nonzero()
        r = min(int(reached[0]) + 1 if len(reached) else len(s), cap)
    alpha = float(alpha or r)

    root = s[:r].sqrt()  # split evenly between the factors, so neither is huge in fp16
    up = u[:, :r] * root / (alpha / r)
    down = root[:, None] * vh[:r]
    if clamp_quantile is not None:
        up, down = _clamp(up, clamp_quantile), _clamp(down, clamp_quantile)
    kept = min(float(squares[:r].sum()) / total, 1.0)
    return _result(down, up, alpha, kept, matrix, shape)


def _check(delta, rank, energy, max_rank, alpha, clamp_quantile):
    if delta.ndim not in (2, 4) or delta.numel() == 0:
        raise ValueError(f"delta must be a non-empty linear [out, in] or conv [out, in, kh, kw] weight, "
                         f"got shape {tuple(delta.shape)}")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    if alpha is not None and not 0.0 < alpha < float("inf"):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise ValueError(f"clamp_quantile must be in (0, 1], got {clamp_quantile!r}")
    if not torch.isfinite(delta).all():
        raise ValueError("delta has NaN or infinite values")


def _svd(matrix: torch.Tensor, top: int | None):
    """u, s, vh with s descending: at least the `top` leading triplets (all of them when top is None)."""
    smaller = min(matrix.shape)
    if top is not None and smaller >= RANDOMIZED_MIN_DIM and 4 * (top + OVERSAMPLE) <= smaller:
        return _randomized_svd(matrix, top + OVERSAMPLE)
    return torch.linalg.svd(matrix, full_matrices=False)


def _randomized_svd(matrix: torch.Tensor, width: int):
    """Halko et al.'s range finder with power iterations. Its own seeded generator: the same delta always
    gives the same file, and the caller's random state is left alone. The result is an orthogonal projection
    of `matrix`, so kept_energy and rel_error keep their meaning."""
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(matrix.shape[1], width, generator=generator, device=matrix.device)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u, s, vh


def _clamp(factor: torch.Tensor, quantile: float) -> torch.Tensor:
    # torch.quantile(interpolation="lower") by kthvalue: quantile refuses tensors over 2**24 values
    magnitudes = factor.abs().flatten()
    limit = magnitudes.kthvalue(int(quantile * (magnitudes.numel() - 1)) + 1).values
    return factor.clamp(-limit, limit)


def _result(down, up, alpha, kept, matrix, shape) -> LowRank:
    """Factors in kohya's shapes, with the error of what they rebuild, measured rather than inferred."""
    r = down.shape[0]
    if len(shape) == 4:
        down, up = down.reshape(r, *shape[1:]), up.reshape(shape[0], r, 1, 1)
    result = LowRank(down=down, up=up, alpha=float(alpha), rank=r, kept_energy=kept, rel_error=0.0, shape=shape)
    norm = float(matrix.norm())
    if norm > 0:
        result.rel_error = float((result.approximation().flatten(1) - matrix).norm()) / norm
    return result
