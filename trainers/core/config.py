"""One run configuration for every entry point: the node, the command line and `accelerate launch`."""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

METHODS = ("lora",)  # DreamBooth and DreamBooth+LoRA use the same loop; they land with their issue.
PRESETS = ("attn", "kohya", "locon")
NETWORKS = ("lora", "loha", "lokr")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "no", "fp16", "bf16")
CROPS = ("center", "random")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")


class ConfigError(ValueError):
    pass


_EXPECTED = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string",
             dict: "a JSON object"}


def _fits(value, kind) -> bool:
    """isinstance, except that a bool is no number here and an int is a fine float."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


@dataclass
class TrainConfig:
    # What to train, on what, into what.
    base_model: str = ""  # a name in models/checkpoints (or models/diffusers), or a full path
    dataset: str = ""  # folder of images with optional .txt captions (or a built dataset folder)
    output_name: str = "my_lora"  # models/loras/<output_name>.safetensors, never overwritten
    trigger_word: str = ""
    method: str = "lora"

    # The network.
    network: str = "lora"  # lora (LoCon with the locon preset), loha or lokr (LyCORIS)
    preset: str = "attn"  # attn: to_q/k/v/out.0; kohya: + proj_in/out and feed-forward; locon: + convs
    rank: int = 16
    alpha: float = 16.0
    lokr_factor: int = -1  # LoKr: the Kronecker factor's size (-1: as balanced as possible, as LyCORIS)
    train_text_encoder: bool = False
    save_precision: str = "fp16"  # dtype of the saved file: fp16 (the ecosystem's default), bf16 or fp32

    # Optimisation.
    steps: int = 800
    batch_size: int = 1
    grad_accum: int = 1
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    lr_scheduler: str = "cosine"
    warmup_steps: int = 40
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    min_snr_gamma: float = 5.0  # 0 turns it off
    noise_offset: float = 0.0
    seed: int = 42

    # Data.
    resolution: int = 512
    crop: str = "center"
    flip: bool = False
    caption_dropout: float = 0.0

    # Bookkeeping.
    run_name: str = ""  # defaults to output_name
    save_every: int = 200  # resumable checkpoint every N steps (0: only at the end and on Cancel)
    keep_checkpoints: int = 3  # older checkpoints of the run are deleted
    validation_prompt: str = ""
    validation_every: int = 200  # 0: only at the end
    validation_steps: int = 20  # sampler steps per validation image
    validation_seed: int = 1234
    resume: bool = True  # continue the latest unfinished run of this name, if made from the same dataset and base
    log_every: int = 1
    extra: dict = field(default_factory=dict)  # metadata passed through to the saved file

    def check_types(self) -> "TrainConfig":
        """Every field has its annotated type and floats are finite (JSON and --set can give anything)."""
        defaults = type(self)()
        for name, kind in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if not _fits(value, kind) or (kind is float and not math.isfinite(value)):
                raise ConfigError(f"{name}={value!r} is not valid: {name} must be {_EXPECTED[kind]}, "
                                  f"e.g. {getattr(defaults, name)!r}.")
            if kind is float:
                setattr(self, name, float(value))  # JSON's 1 for 1.0
        return self

    def validate(self) -> "TrainConfig":
        self.check_types()

        def choice(name, options):
            if getattr(self, name) not in options:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(options)}.")

        choice("method", METHODS)
        choice("network", NETWORKS)
        choice("preset", PRESETS)
        choice("optimizer", OPTIMIZERS)
        choice("lr_scheduler", SCHEDULERS)
        choice("mixed_precision", PRECISIONS)
        choice("crop", CROPS)
        choice("save_precision", SAVE_PRECISIONS)
        if not self.base_model:
            raise ConfigError("base_model is empty: pick a checkpoint from models/checkpoints.")
        if not self.dataset:
            raise ConfigError("dataset is empty: give the folder holding your training images.")
        if self.resolution % 8 or self.resolution < 64:
            lo = max(64, self.resolution // 8 * 8)
            raise ConfigError(f"resolution {self.resolution} must be a multiple of 8 and at least 64: "
                              f"use {lo} or {lo + 8}.")
        for name in ("rank", "steps", "batch_size", "grad_accum", "validation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        for name in ("unet_lr", "text_encoder_lr", "weight_decay", "max_grad_norm", "min_snr_gamma", "noise_offset",
                     "warmup_steps", "save_every", "validation_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (got {getattr(self, name)}).")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"lokr_factor must be -1 (automatic) or at least 1 (got {self.lokr_factor}).")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be positive (got {self.alpha}); alpha = rank means scale 1.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1) (got {self.caption_dropout}).")
        return self

    @property
    def name(self) -> str:
        return self.run_name or self.output_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"A run config must be a JSON object of settings, got {type(data).__name__}.")
        data = {k: v for k, v in data.items() if k != "resolved"}  # what a run folder's config.json adds
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data).check_types()

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
