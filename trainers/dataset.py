"""What the training loop consumes: image/caption pairs, cached VAE latents and text embeddings.

Images are encoded by the VAE once, before training; each step then draws a latent
from the stored distribution (mean + std * noise), as kohya and diffusers do.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import path_policy
from .host import check_interrupt
from .images import ImageError, check_image, list_images, open_rgb

log = logging.getLogger("personalize")

MANIFEST_NAME = "manifest.json"
CROP_MODES = ("center", "random")


class DatasetError(ValueError):
    """A training folder, caption or setting that cannot be used; says how to fix it."""


@dataclass
class TrainItem:
    path: str
    caption: str
    bucket: tuple[int, int] | None = None  # (width, height) of a prepared image from the dataset builder
    repeats: int = 1  # times the item appears in each epoch


# ---- captions --------------------------------------------------------------------------

def read_caption(path: str) -> str:
    """A caption file's lines, stripped and joined with ", "."""
    if not path_policy.readable(path):
        raise DatasetError(f"Caption file '{path}' is a link to a file outside ComfyUI's input, output, temp "
                           f"and model folders; replace the link with the caption text.")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except UnicodeDecodeError as e:
        raise DatasetError(f"Caption file '{path}' is not UTF-8 text ({e.reason}). "
                           f"Re-save it as UTF-8.") from e
    return ", ".join(line for line in lines if line)


def with_trigger(caption: str, trigger_word: str) -> str:
    """'trigger, caption', unless the caption already has the trigger as a word."""
    trigger = (trigger_word or "").strip()
    caption = (caption or "").strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if re.search(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}"


# ---- scanning a folder -----------------------------------------------------------------

def _manifest_entries(folder: str, manifest: str) -> tuple[list[tuple[str, str, dict]], list[tuple[str, str]]]:
    """(image path, caption, {"bucket", "repeats"}) from a dataset builder's manifest.json, and the skipped ones."""
    try:
        with open(manifest, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["items"]
        if not isinstance(entries, list):
            raise TypeError("'items' is not a list")
        if data.get("incomplete"):
            raise ValueError("its build was stopped before the end; build the dataset again")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"Dataset manifest '{manifest}' cannot be read ({e}). It must be JSON like "
                           f'{{"items": [{{"image": "a.png", "caption": "..."}}]}}; fix or delete it.') from e
    pairs, skipped = [], []
    for n, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image:
            skipped.append((f"{manifest} item {n}", "no 'image' path"))
            continue
        path = os.path.normpath(os.path.join(folder, image))
        if not path_policy.is_inside(path, [os.path.realpath(folder)]):  # absolute, '../' or a link out
            skipped.append((f"{manifest} item {n}", "its image is not inside the dataset folder"))
            continue
        if not os.path.isfile(path):
            skipped.append((path, "listed in manifest.json but the file is missing"))
            continue
        try:
            extra = {"bucket": _bucket(entry.get("bucket")), "repeats": int(entry.get("repeats") or 1)}
            if extra["repeats"] < 1:
                raise ValueError("repeats must be at least 1")
        except (TypeError, ValueError) as e:
            skipped.append((path, f"bad bucket or repeats in manifest.json ({e})"))
            continue
        pairs.append((path, str(entry.get("caption") or ""), extra))
    return pairs, skipped


def _bucket(value) -> tuple[int, int] | None:
    if value is None:
        return None
    w, h = (int(v) for v in value)
    if w < 8 or h < 8 or w % 8 or h % 8:
        raise ValueError(f"bucket {w}x{h} is not a multiple of 8")
    return w, h


def _folder_entries(folder: str, caption_ext: str) -> tuple[list[tuple[str, str | None, dict]], list[tuple[str, str]]]:
    paths, skipped = list_images(folder)
    pairs = []
    for path in paths:
        caption_path = os.path.splitext(path)[0] + caption_ext
        pairs.append((path, read_caption(caption_path) if os.path.isfile(caption_path) else None, {}))
    return pairs, skipped


def scan_folder(folder, trigger_word: str = "", caption_ext: str = ".txt") -> list[TrainItem]:
    """Image/caption pairs of a training folder (or of its manifest.json), corrupt images skipped.

    Items of a built dataset (manifest.json) carry their bucket and repeats.
    """
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder or "")))
    if not os.path.isdir(folder):
        raise DatasetError(f"Dataset folder '{folder}' does not exist. Give the full path of a folder "
                           f"holding your training images (and optional same-name .txt captions).")
    caption_ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
    manifest = os.path.join(folder, MANIFEST_NAME)
    if os.path.isfile(manifest):
        pairs, skipped = _manifest_entries(folder, manifest)
    else:
        pairs, skipped = _folder_entries(folder, caption_ext)

    items, uncaptioned = [], 0
    for path, caption, extra in pairs:
        try:
            check_image(path)
        except ImageError as e:
            skipped.append((path, e.reason))
            continue
        if caption is None:
            caption = ""
            uncaptioned += 1
        items.append(TrainItem(path, with_trigger(caption, trigger_word), **extra))

    for path, reason in skipped:
        log.warning("Skipping %s: %s", path, reason)
    if not items:
        detail = f" Skipped: {'; '.join(f'{os.path.basename(p)} ({r})' for p, r in skipped[:5])}." if skipped else ""
        raise DatasetError(f"Dataset folder '{folder}' has no usable image.{detail} Put .jpg/.png/.webp "
                           f"images directly in that folder (not in sub-folders).")
    if uncaptioned and not (trigger_word or "").strip():
        log.warning("%d of %d images in %s have no %s caption file and no trigger word was given: "
                    "they train with an empty caption.", uncaptioned, len(items), folder, caption_ext)
    return items


# ---- pixels ----------------------------------------------------------------------------

def check_resolution(resolution) -> int:
    """The training resolution as an int: a multiple of 8, at least 64."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float, np.integer)) \
            or int(resolution) != resolution:
        raise DatasetError(f"Resolution must be a whole number of pixels, got {resolution!r}.")
    value = int(resolution)
    if value < 64:
        raise DatasetError(f"Resolution {value} is too small: the smallest valid value is 64.")
    if value % 8:
        low, high = value - value % 8, value - value % 8 + 8
        low_text = f"{low} or " if low >= 64 else ""
        raise DatasetError(f"Resolution {value} is not a multiple of 8: use {low_text}{high}.")
    return value


def prepare_pixels(img: Image.Image, resolution: int, crop: str = "center") -> torch.Tensor:
    """Resize the short side to `resolution`, crop, and return a [3,H,W] tensor in [-1, 1].

    crop="center": a resolution x resolution centre square. crop="random": the whole
    image, longer side cut down to a multiple of 8 (the random crop is done on latents).
    """
    resolution = check_resolution(resolution)
    if crop not in CROP_MODES:
        raise DatasetError(f"Crop must be one of {', '.join(CROP_MODES)}, got {crop!r}.")
    img = img if img.mode == "RGB" else img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), resample)
    if crop == "center":
        out_w = out_h = resolution
    else:
        out_w, out_h = new_w - new_w % 8, new_h - new_h % 8
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    if (out_w, out_h) != (new_w, new_h):
        img = img.crop((left, top, left + out_w, top + out_h))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def bucket_pixels(img: Image.Image, bucket, path: str = "<image>", rescaled: bool = False) -> torch.Tensor:
    """A prepared image as a [3,H,W] tensor in [-1, 1] at its bucket size (resized only if it was edited).

    rescaled: the bucket was scaled to another training resolution on purpose; resize without a warning.
    """
    w, h = bucket
    img = img if img.mode == "RGB" else img.convert("RGB")
    if img.size != (w, h) and not rescaled:  # the builder wrote it at this size; someone changed the file since
        log.warning("%s is %dx%d, not its bucket %dx%d: resized; rebuild the dataset.", path, *img.size, w, h)
    if img.size != (w, h):
        scale = max(w / img.width, h / img.height)
        bw, bh = w / scale, h / scale
        left, top = (img.width - bw) / 2, (img.height - bh) / 2
        img = img.resize((w, h), Image.Resampling.LANCZOS, box=(left, top, left + bw, top + bh))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ---- latent cache ----------------------------------------------------------------------

def _report(progress, done: int, total: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):
        progress.update(done)  # host.Progress
    else:
        progress(done, total)


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
              dtype=torch.float32, batch_size: int = 4, progress=None, rescaled: bool = False) -> "LatentCache":
        """Encode `items` (TrainItems or paths) with `vae`, which must already sit on `device` in `dtype`.

        Latents are scaled by vae.config.scaling_factor (and shifted by shift_factor if the
        VAE has one). progress: a host.Progress or a callable(done, total).

        Items with a bucket (prepared by the dataset builder) are encoded at their bucket size
        as they are, never cropped: their samples are the whole latent, and a batch must hold
        items of one bucket (see bucket_batch_indices). `resolution` and `crop` apply to the others.
        rescaled: the buckets were scaled to another resolution on purpose (no "file changed" warning).
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
            for v in range(views):
                batch.append((i, v, px.flip(-1) if v else px))  # flip pixels, not latents
                if len(batch) >= batch_size:
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

    def sample_batch(self, indices, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [B, C, r/f, r/f] for the given items."""
        return torch.stack([self.sample(i, generator) for i in indices])


# ---- caption cache ---------------------------------------------------------------------

class CaptionCache:
    """Text-encoder outputs per unique caption; only valid while the text encoder is frozen."""

    def __init__(self, table: dict):
        self.table = table

    @classmethod
    @torch.no_grad()
    def build(cls, captions, encode_fn, batch_size: int = 16) -> "CaptionCache":
        """encode_fn(list[str]) -> [N, 77, D]; called once per unique caption, "" included."""
        unique = list(dict.fromkeys(["", *captions]))
        table = {}
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            out = encode_fn(chunk)
            if out.shape[0] != len(chunk):
                raise ValueError(f"encode_fn returned {out.shape[0]} embeddings for {len(chunk)} captions.")
            table.update(zip(chunk, out.detach()))
        return cls(table)

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, caption: str) -> bool:
        return caption in self.table

    def get(self, captions) -> torch.Tensor:
        try:
            return torch.stack([self.table[c] for c in captions])
        except KeyError as e:
            raise DatasetError(f"Caption {e.args[0]!r} was not cached; build the CaptionCache "
                               f"from every caption used in training.") from None


# ---- batch order -----------------------------------------------------------------------

def epoch_order(n_items: int, epoch: int, seed: int) -> np.ndarray:
    """The item order of one epoch; the same for the same (seed, epoch) on any run."""
    rng = np.random.default_rng([int(seed) & (2**64 - 1), int(epoch)])
    return rng.permutation(n_items)


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of training step `step` (0-based), walking one shuffled order per epoch.

    A function of its arguments only, so a run resumed at step s sees exactly the
    batches an uninterrupted run would have seen.
    """
    if n_items < 1 or batch_size < 1 or step < 0:
        raise ValueError(f"batch_indices needs n_items >= 1, batch_size >= 1, step >= 0 "
                         f"(got {n_items}, {batch_size}, {step}).")
    orders, out = {}, []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(position, n_items)
        if epoch not in orders:
            orders[epoch] = epoch_order(n_items, epoch, seed)
        out.append(int(orders[epoch][k]))
    return out


def uses_bucket_batches(items) -> bool:
    """True when items carry buckets or repeats: batches then come from bucket_batch_indices."""
    return any(getattr(it, "bucket", None) is not None or getattr(it, "repeats", 1) != 1 for it in items)


def bucket_batch_indices(buckets, repeats, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of training step `step` when every batch must come from one bucket.

    buckets: per item, a hashable bucket (None counts as one bucket of its own); repeats:
    per item, how often it appears per epoch. Each epoch shuffles every bucket's items
    (repeats included), cuts them into batches of `batch_size`, fills a bucket's last,
    short batch from the start of that bucket's order (so every batch is full and stacks),
    and shuffles the batches. Like batch_indices, a function of its arguments only:
    a resumed run sees exactly the batches of an uninterrupted one.
    """
    buckets, repeats = tuple(buckets), tuple(int(r) for r in repeats)
    if not buckets or len(buckets) != len(repeats) or batch_size < 1 or step < 0 or min(repeats) < 1:
        raise ValueError(f"bucket_batch_indices needs items, one repeats value >= 1 per item, batch_size >= 1 "
                         f"and step >= 0 (got {len(buckets)} items, {len(repeats)} repeats, {batch_size}, {step}).")
    counts: dict = {}
    for b, r in zip(buckets, repeats):
        counts[b] = counts.get(b, 0) + r
    per_epoch = sum(-(-n // batch_size) for n in counts.values())
    epoch, k = divmod(step, per_epoch)
    return list(_bucket_epoch(buckets, repeats, batch_size, epoch, int(seed))[k])


@functools.lru_cache(maxsize=4)
def _bucket_epoch(buckets: tuple, repeats: tuple, batch_size: int, epoch: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng([seed & (2**64 - 1), epoch, 1])  # its own stream: not batch_indices' order
    groups: dict = {}
    for i, b in enumerate(buckets):  # buckets in order of first appearance: deterministic
        groups.setdefault(b, []).extend([i] * repeats[i])
    batches = []
    for members in groups.values():
        order = rng.permutation(np.asarray(members))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if len(chunk) < batch_size:
                chunk = np.concatenate([chunk, np.resize(order, batch_size - len(chunk))])
            batches.append(tuple(int(i) for i in chunk))
    return [batches[j] for j in rng.permutation(len(batches))]


# ---- what was trained ------------------------------------------------------------------

def built_resolution(folder) -> int | None:
    """The resolution a built dataset's images were prepared at (its manifest settings); None for a plain folder."""
    manifest = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(folder or ""))), MANIFEST_NAME)
    try:
        with open(manifest, encoding="utf-8") as f:
            value = json.load(f)["settings"]["resolution"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def dataset_fingerprint(items, folder) -> str:
    """sha256 over the training items as trained, in sorted order: path relative to `folder`, the image
    file's content sha256, the caption (trigger word included), bucket and repeats.

    Equal fingerprints mean the same training data, wherever the folder was moved.
    """
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder or "")))
    records = []
    for it in items:
        with open(it.path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
        relative = os.path.relpath(it.path, folder).replace(os.sep, "/")
        records.append(json.dumps([relative, content, it.caption, list(it.bucket) if it.bucket else None,
                                   it.repeats]))
    return hashlib.sha256("\n".join(sorted(records)).encode("utf-8")).hexdigest()
