"""What the training loop consumes: cached VAE latents and text embeddings.

Images are encoded by the VAE once, before training; each step then draws a latent
from the stored distribution (mean + std * noise), as kohya and diffusers do.
"""
from __future__ import annotations

import torch

from ..core import heap
from ..core.host import check_interrupt
from ..families.conditioning import Conditioning
from .errors import DatasetError
from .images import open_rgb
from .pixels import CROP_MODES, bucket_pixels, check_resolution, prepare_pixels


def _report(progress, done: int, total: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):
        progress.update(done)  # host.Progress
    else:
        progress(done, total)


BATCH_PIXELS = 256 * 256  # pixels the VAE encodes at once (SD VAE activations: ~0.2 GB per 256x256 in fp32)

class LatentCache:
    """Every training image encoded once; `sample` draws a fresh latent from its distribution."""

    def __init__(self, means, stds, resolution: int, crop: str, flip: bool, factor: int, items=None, whole=None):
        self.means = means  # per image: [V, C, h, w] float32 on CPU, V = 2 with flip (plain, flipped)
        self.stds = stds
        self.resolution = resolution
        self.crop = crop
        self.flip = flip
        self.factor = factor  # pixels per latent cell (8 for SD)
        self.size = resolution // factor  # side of every sampled latent
        self.items = items
        self.whole = whole or [False] * len(means)  # per image: sample the whole latent (bucketed images)

    def __len__(self) -> int:
        return len(self.means)

    @classmethod
    @torch.no_grad()
    def build(cls, items, vae, resolution: int, crop: str = "center", flip: bool = False, device="cpu",
              dtype=torch.float32, batch_size: int = 4, progress=None, rescaled: bool = False,
              batch_pixels: int = BATCH_PIXELS) -> "LatentCache":
        """Encode `items` (TrainItems or paths) with `vae`, which must already sit on `device` in `dtype`.

        Latents are scaled by vae.config.scaling_factor (and shifted by shift_factor if the
        VAE has one). progress: a host.Progress or a callable(done, total).

        Items with a bucket (prepared by the dataset builder) are encoded at their bucket size
        as they are, never cropped: their samples are the whole latent, and a batch must hold
        items of one bucket (see bucket_batch_indices). `resolution` and `crop` apply to the others.
        rescaled: the buckets were scaled to another resolution on purpose (no "file changed" warning).
        A batch holds at most `batch_size` images and `batch_pixels` pixels (at least one image): the VAE
        encoder's activations grow with the pixels, and at SDXL's 1024 px one image's take gigabytes.
        """
        resolution = check_resolution(resolution)
        if crop not in CROP_MODES:
            raise DatasetError(f"Crop must be one of {', '.join(CROP_MODES)}, got {crop!r}.")
        items = list(items)
        if not items:
            raise DatasetError("No images to encode: the dataset is empty.")
        paths = [getattr(item, "path", item) for item in items]
        buckets = [getattr(item, "bucket", None) for item in items]
        scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        views = 2 if flip else 1

        means, stds = [[None] * views for _ in paths], [[None] * views for _ in paths]
        factor, done = None, 0
        batch_size = max(1, int(batch_size))

        def encode(batch):  # batch: [(index, view, pixels)], all of one shape
            nonlocal factor, done
            x = torch.stack([px for _, _, px in batch]).to(device=device, dtype=dtype)
            dist = vae.encode(x).latent_dist
            mean = ((dist.mean - shift) * scale).float().cpu()
            std = (dist.std * scale).float().cpu()
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise DatasetError(f"The VAE produced NaN/inf latents in {dtype} (image: {paths[batch[0][0]]}). "
                                   f"Encode in float32, or use a VAE that is safe in half precision.")
            factor = factor or x.shape[-1] // mean.shape[-1]
            heap.trim()  # the encoder's activations: freed blocks the C heap would otherwise keep (core/heap.py)
            for k, (i, v, _) in enumerate(batch):
                means[i][v], stds[i][v] = mean[k], std[k]
                done += v == views - 1
            _report(progress, done, len(paths))

        # Images are decoded one at a time and batched by shape (random crop keeps aspect
        # ratios), so memory holds at most one pending batch per shape.
        pending: dict[tuple, list] = {}
        for i, path in enumerate(paths):
            check_interrupt()
            img = open_rgb(path)
            px = bucket_pixels(img, buckets[i], path, rescaled) if buckets[i] else prepare_pixels(img, resolution, crop)
            batch = pending.setdefault(tuple(px.shape), [])
            limit = max(1, min(batch_size, batch_pixels // (px.shape[-2] * px.shape[-1])))
            for v in range(views):
                batch.append((i, v, px.flip(-1) if v else px))  # flip pixels, not latents
                if len(batch) >= limit:
                    encode(batch)
                    batch.clear()
        for batch in pending.values():
            if batch:
                encode(batch)
        return cls([torch.stack(m) for m in means], [torch.stack(s) for s in stds],
                   resolution, crop, flip, factor, items, whole=[b is not None for b in buckets])

    def sample(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One latent [C, r/f, r/f] (a bucketed item: [C, h/f, w/f]): random flip (p=0.5 if flip), crop
        window, then mean + std * noise."""
        mean, std = self.means[index], self.stds[index]
        view = int(torch.randint(0, 2, (1,), generator=generator)) if self.flip else 0
        h, w = mean.shape[-2:]
        size = self.size
        if self.whole[index]:  # a bucketed image: already cropped by the builder
            top, left, height, width = 0, 0, h, w
        elif self.crop == "random":
            top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
            height = width = size
        else:
            top, left, height, width = (h - size) // 2, (w - size) // 2, size, size
        window = (view, slice(None), slice(top, top + height), slice(left, left + width))
        mean, std = mean[window], std[window]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + std * noise

    def indices_by_size(self) -> dict[tuple[int, int], list[int]]:
        """Item indices by the (height, width) of the latents `sample` gives them."""
        groups = {}
        for i, mean in enumerate(self.means):
            size = tuple(mean.shape[-2:]) if self.whole[i] else (self.size, self.size)
            groups.setdefault(size, []).append(i)
        return groups

    def sample_batch(self, indices, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [B, C, r/f, r/f] for the given items."""
        return torch.stack([self.sample(i, generator) for i in indices])


# ---- caption cache ---------------------------------------------------------------------

class CaptionCache:
    """The family's Conditioning per unique caption; only valid while the text encoders are frozen."""

    def __init__(self, table: dict):
        self.table = table

    @classmethod
    @torch.no_grad()
    def build(cls, captions, encode_fn, batch_size: int = 16) -> "CaptionCache":
        """encode_fn(list[str]) -> Conditioning of N rows; called once per unique caption, "" included."""
        unique = list(dict.fromkeys(["", *captions]))
        table = {}
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            rows = encode_fn(chunk).rows()
            if len(rows) != len(chunk):
                raise ValueError(f"encode_fn returned {len(rows)} embeddings for {len(chunk)} captions.")
            table.update(zip(chunk, rows))
        return cls(table)

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, caption: str) -> bool:
        return caption in self.table

    def get(self, captions):
        """The Conditioning of these captions, stacked in their order."""
        try:
            return Conditioning.stack([self.table[c] for c in captions])
        except KeyError as e:
            raise DatasetError(f"Caption {e.args[0]!r} was not cached; build the CaptionCache "
                               f"from every caption used in training.") from None
