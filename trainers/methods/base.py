"""The method seam: the hooks the training loop calls, and their defaults.

The loop is one loop for every method. It calls only these: `trained_text_encoders`, `streams` (image streams
besides the dataset), `setup` (what is trained), `prompt` (a validation prompt as the method's model reads it),
`metrics` (values logged beside the loss), `batch` (what a micro-step trains on, with per-sample loss weights), `loss` (the per-sample
diffusion loss reduced to the scalar that is backpropagated), `after_step` (work after each optimizer
step), `trainable_state` (what a checkpoint holds) and `export` (the artifact the run produces).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import host, safe_io
from ..training import batches as batch_selection
from ..training.resume import trainable_params


@dataclass
class Batch:
    """What one micro-step trains on: latents (on the CPU, fp32), their captions, per-sample loss weights."""
    latents: torch.Tensor
    texts: list
    weights: torch.Tensor | None = None  # None: every sample weighs 1 (a plain mean)
    items: list | None = None  # the TrainItem of each sample (original size and crop box, for SDXL)


@dataclass
class TrainData:
    """What `batch` draws from: the dataset items, their latent cache and the accelerator (for this process's share),
    and the other streams the method asked for (`streams`), by name: (items, latent cache)."""
    items: list
    latents: object
    accelerator: object
    streams: dict = field(default_factory=dict)


@dataclass
class Artifact:
    """What a run produces: `kind` ("lora", an embedding, a checkpoint...) and the file it wrote."""
    kind: str
    path: str


class TrainingMethod:
    """Base class of the methods; the defaults are plain fine-tuning of the parameters `setup` returns."""

    name = ""
    # Whether export() reads the frozen models (VAE, untrained text encoders): a checkpoint does, an adapter does
    # not, so a run without validation images may free them once their outputs are cached.
    export_reads_frozen_models = True

    def __init__(self, cfg):
        self.cfg = cfg

    def trained_text_encoders(self, comps) -> list:
        """The text encoders whose outputs change in training: they run every step (no caption cache) and are
        wrapped for gradient sync. None by default."""
        return []

    def setup(self, comps) -> list[dict]:
        """Make the trained parameters trainable; returns optimizer parameter groups with their learning rates."""
        raise NotImplementedError

    def prompt(self, text: str) -> str:
        """A prompt as this method's model reads it (textual inversion puts its new tokens in); validation uses it."""
        return text

    def streams(self, items, comps, accelerator, device) -> dict:
        """Image streams besides the dataset `items` (e.g. DreamBooth's class images): {name: [TrainItem]}. The loop
        caches their latents and captions like the dataset's and hands them to `batch` in TrainData.streams."""
        return {}

    def metrics(self) -> dict:
        """Values the loop logs with each step besides the loss (e.g. instance and prior loss); {} by default."""
        return {}

    def batch(self, step: int, micro: int, gen: torch.Generator, data: TrainData) -> Batch:
        """This process's items of micro-step `micro` of `step`: a latent per item, its caption or "" (caption
        dropout). Every random draw comes from `gen`, in this order, so a resumed run repeats the same curve."""
        cfg = self.cfg
        indices = batch_selection.process_batch(data.items, cfg, step * cfg.grad_accum + micro, data.accelerator)
        latents = torch.stack([data.latents.sample(i, gen) for i in indices])
        texts = [data.items[i].caption if torch.rand(1, generator=gen).item() >= cfg.caption_dropout else ""
                 for i in indices]
        return Batch(latents=latents, texts=texts, items=[data.items[i] for i in indices])

    def loss(self, per_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The scalar loss of a micro-batch: the mean of the per-sample losses, weighted by `batch.weights`."""
        if batch.weights is None:
            return per_sample.mean()
        weights = batch.weights.to(per_sample)
        return (per_sample * weights).sum() / weights.sum()

    def after_step(self, comps) -> None:
        """After each optimizer step (e.g. update an EMA of the weights); nothing by default."""

    def trainable_state(self, comps) -> dict:
        """What a checkpoint holds besides the optimizer: live tensors by name, saved as they are and restored into
        in place on resume. By default every trainable parameter (kept in fp32)."""
        return trainable_params(comps)

    def export(self, comps, family, *, captions, dataset_dir, steps, started) -> Artifact:
        """Write what the run produces (main process only); returns it as an Artifact."""
        raise NotImplementedError


def chosen_text_encoders(cfg, comps) -> list:
    """The text encoders `train_text_encoder` trains: every one, or SDXL's CLIP-L or OpenCLIP-G alone
    (cfg.which_text_encoders)."""
    if not cfg.train_text_encoder:
        return []
    encoders = comps.text_encoders
    if cfg.which_text_encoders == "all":
        return list(encoders)
    index = {"clip_l": 0, "clip_g": 1}[cfg.which_text_encoders]
    if index >= len(encoders):
        from ..core.config import ConfigError

        raise ConfigError(f"which_text_encoders={cfg.which_text_encoders}: this base model has one text encoder, "
                          f"CLIP-L (clip_g is SDXL's second); choose all or clip_l.")
    return [encoders[index]]


def save_model_file(folder: str, cfg, default: str, tensors: dict, metadata: dict) -> str:
    """models/<folder>/<output_name>.safetensors, or name_2...: the name is taken at the moment of writing, so an
    export running beside this one keeps its file. Returns the path written."""
    return safe_io.save_new(host.model_dirs(folder)[0], safe_io.sanitize_name(cfg.output_name, default),
                            ".safetensors", safe_io.safetensors_writer(tensors, metadata), roots=host.writable_roots())
