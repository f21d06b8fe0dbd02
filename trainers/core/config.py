"""One run configuration for every entry point: the node, the command line and `accelerate launch`.

Each field is declared once (`setting`): its type, default, range, choices, help and the option group it
belongs to. Validation, the nodes' widgets and tooltips (`widgets`) and the command line's help (`describe`)
are all built from these declarations.

In a JSON config the settings of a method or network sit in their group ({"lora": {"rank": 8}}); flat
configs (every key at the top, as older versions wrote them) load as well.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

# The option groups nested in a JSON config; a setting in no group sits at the top.
GROUPS = {"lora": "the adapter network (LoRA, LoHa, LoKr) of a LoRA or DreamBooth+LoRA run",
          "dreambooth": "the instance prompt and class-prior preservation of a DreamBooth or DreamBooth+LoRA run",
          "textual_inversion": "the embedding of a textual-inversion run"}


class ConfigError(ValueError):
    pass


def setting(default, help: str, *, choices: tuple = (), lo=None, hi=None, group: str = "", ui: dict | None = None):
    """Declare a config field: default, help (the tooltip and CLI help), allowed choices or range [lo, hi],
    its option group, and extra widget options for the node (step, multiline...)."""
    spec = {"help": help, "choices": tuple(choices), "lo": lo, "hi": hi, "group": group, "ui": ui or {}}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=spec)
    return field(default=default, metadata=spec)


_LR = {"step": 0.00001, "round": False}  # learning rates: fine steps, no rounding in the widget
_EXPECTED = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string",
             dict: "a JSON object"}


@dataclass
class TrainConfig:
    # What to train, on what, into what.
    base_model: str = setting("", "A checkpoint in models/checkpoints (or a diffusers folder in models/diffusers); "
                                  "the command line also takes a full path.")
    vae: str = setting("", "A VAE in models/vae to train with instead of the checkpoint's own (e.g. the fp16-fix "
                           "SDXL VAE); empty: the checkpoint's. A DreamBooth checkpoint keeps its base's VAE.")
    dataset: str = setting("", "Folder of training images with optional same-name .txt captions, or a folder "
                               "made by Build Dataset.")
    output_name: str = setting("my_lora", "Name of the file the run writes (models/loras or models/embeddings); "
                                          "an existing file is never overwritten (a _2 suffix is added).")
    trigger_word: str = setting("", "A rare word that will stand for your subject; it is put in front of every "
                                    "caption. Textual inversion learns this word.")
    method: str = setting("lora", "What is trained: lora (an adapter network), dreambooth (the whole UNet, saved as "
                                  "a checkpoint), dreambooth_lora (an adapter network with class-prior preservation) "
                                  "or textual_inversion (a new word's embedding).",
                          choices=("lora", "dreambooth", "dreambooth_lora", "textual_inversion"))
    train_text_encoder: bool = setting(False, "Also train the CLIP text encoder (its network, or the whole encoder "
                                              "in DreamBooth): stronger likeness for faces, more overfitting risk.")
    which_text_encoders: str = setting("all", "With train_text_encoder: which text encoders train. SDXL has two: clip_l "
                                              "(CLIP ViT-L, te1) and clip_g (OpenCLIP bigG, te2, the larger); the "
                                              "other stays frozen. SD1.x has one, CLIP-L.",
                                       choices=("all", "clip_l", "clip_g"))
    text_encoder_lr: float = setting(5e-5, "Text-encoder learning rate, when it is trained.", lo=0.0, hi=10.0, ui=_LR)

    # The adapter network of a LoRA run.
    network: str = setting("lora", "lora: classic LoRA (LoCon with the locon preset). loha: LyCORIS LoHa, a Hadamard "
                                   "product of two low-rank pairs (more expressive at the same rank). lokr: LyCORIS "
                                   "LoKr, a Kronecker product (very small files). All load with LoraLoader.",
                           choices=("lora", "loha", "lokr"), group="lora")
    preset: str = setting("attn", "attn: UNet attention only (small, safe). kohya: + projections and feed-forward "
                                  "(kohya's default coverage). locon: + conv layers (styles).",
                          choices=("attn", "kohya", "locon"), group="lora")
    rank: int = setting(16, "Network rank (dim): capacity and file size. 8-32 suits a subject.", lo=1, hi=256,
                        group="lora")
    alpha: float = setting(16.0, "Scale = alpha / rank. alpha = rank means scale 1; lower alpha trains more gently.",
                           lo=0.01, hi=1024.0, group="lora", ui={"step": 0.5})
    lokr_factor: int = setting(-1, "LoKr only: size of the small Kronecker factor (e.g. 4, 8, 16); -1 picks the most "
                                   "balanced split, as LyCORIS does. 0 is not allowed.", lo=-1, hi=1024, group="lora")
    conv_rank: int = setting(0, "locon preset: rank of the 3x3 conv layers (kohya's conv_dim); 0: the same as rank.",
                             lo=0, hi=256, group="lora")
    conv_alpha: float = setting(0.0, "locon preset: alpha of the 3x3 conv layers (kohya's conv_alpha); 0: the same "
                                     "as alpha.", lo=0.0, hi=1024.0, group="lora", ui={"step": 0.5})
    save_precision: str = setting("fp16", "dtype of the trained tensors in the saved file: fp16 (the ecosystem's "
                                          "default), bf16 or fp32.", choices=("fp16", "bf16", "fp32"))

    # DreamBooth: the instance prompt and class-prior preservation.
    class_prompt: str = setting("", "DreamBooth: the class the subject belongs to, e.g. 'a photo of a dog'. Images "
                                    "of it keep the model's idea of the class (prior preservation); empty turns it "
                                    "off.", group="dreambooth")
    class_images: str = setting("", "DreamBooth: a folder of class images to use; empty: the base model generates "
                                    "them from class_prompt (cached and reused by later runs).", group="dreambooth")
    num_class_images: int = setting(100, "DreamBooth: class images used for prior preservation.", lo=1, hi=10000,
                                    group="dreambooth")
    prior_loss_weight: float = setting(1.0, "DreamBooth: weight of the class images' loss against the instance "
                                            "loss.", lo=0.0, hi=10.0, group="dreambooth", ui={"step": 0.05})
    ema_decay: float = setting(0.0, "method dreambooth: keep an exponential moving average of the fine-tuned weights with "
                                     "this decay (e.g. 0.999) and save it instead of the last weights; 0: off. It "
                                     "holds one more copy of the trained weights.", lo=0.0, hi=0.99999,
                               group="dreambooth", ui={"step": 0.0001})
    class_sample_steps: int = setting(25, "DreamBooth: sampler steps (DPM-Solver++) per generated class image.",
                                      lo=1, hi=150, group="dreambooth")
    class_sample_batch: int = setting(4, "DreamBooth: class images generated per sampler call (more is faster on a "
                                         "GPU with memory to spare; Cancel is checked between calls).", lo=1, hi=64,
                                      group="dreambooth")
    class_precision: str = setting("auto", "DreamBooth: precision of class-image sampling (autocast: the weights stay "
                                           "fp32). auto: the run's half precision on a GPU (fp16 unless bf16 is "
                                           "chosen), bf16 on a CPU that computes it natively (AVX512-BF16, AMX), "
                                           "else fp32.", choices=("auto", "fp32", "bf16", "fp16"), group="dreambooth")

    # The embedding of a textual-inversion run.
    init_word: str = setting("", "Textual inversion: a word close to the subject (dog, woman, painting) that the new "
                                 "embedding starts from.", group="textual_inversion")
    num_vectors: int = setting(1, "Textual inversion: vectors (tokens) the embedding spans: more hold more detail but "
                                  "take more of the prompt's 75 tokens. 1-4 for a subject.", lo=1, hi=16,
                               group="textual_inversion")
    embedding_lr: float = setting(5e-3, "Textual inversion: the embedding's learning rate (A1111's default 0.005).",
                                  lo=0.0, hi=10.0, group="textual_inversion", ui=_LR)

    # Optimisation.
    steps: int = setting(800, "Optimizer steps. About 80-100 per photo for 5-20 photos at batch 1.", lo=1, hi=100000)
    batch_size: int = setting(1, "Images per step (per GPU).", lo=1, hi=64)
    grad_accum: int = setting(1, "Gradient accumulation: effective batch = batch_size x grad_accum.", lo=1, hi=128)
    unet_lr: float = setting(1e-4, "UNet learning rate (1e-4 is a safe start; ~1.0 with Prodigy).", lo=0.0, hi=10.0,
                             ui=_LR)
    optimizer: str = setting("adamw", "adamw; adamw8bit saves memory on CUDA (bitsandbytes); prodigy sets its own "
                                      "step size (use lr 1.0).", choices=("adamw", "adamw8bit", "prodigy"))
    weight_decay: float = setting(1e-2, "AdamW weight decay.", lo=0.0, hi=1.0, ui={"step": 0.001})
    lr_scheduler: str = setting("cosine", "Learning-rate schedule after warmup.",
                                choices=("constant", "cosine", "linear"))
    warmup_steps: int = setting(40, "Steps of linear warmup.", lo=0, hi=10000)
    max_grad_norm: float = setting(1.0, "Gradients are clipped to this norm (0 turns clipping off).", lo=0.0,
                                   hi=100.0, ui={"step": 0.1})
    mixed_precision: str = setting("auto", "auto: bf16 (or fp16) on a GPU, fp32 on CPU. Trainable weights always "
                                           "stay fp32.", choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: bool = setting(False, "Trade ~30% speed for much less VRAM.")
    min_snr_gamma: float = setting(5.0, "Min-SNR loss weighting (5 is standard; 0 turns it off).", lo=0.0, hi=20.0,
                                   ui={"step": 0.5})
    noise_offset: float = setting(0.0, "Helps very dark/bright images; 0.05-0.1 when wanted.", lo=0.0, hi=1.0,
                                  ui={"step": 0.01})
    seed: int = setting(42, "Seed for noise, timesteps and data order: the same seed repeats the same run.", lo=0,
                        hi=2**31 - 1)

    # Data.
    resolution: int = setting(0, "Training resolution in pixels (a multiple of 8). 0: the base model's own size, "
                                 "512 for SD1.x and 1024 for SDXL.", lo=0, hi=2048, ui={"step": 8})
    crop: str = setting("center", "center: a fixed square crop; random: a new square window each step (non-square "
                                  "photos).", choices=("center", "random"))
    flip: bool = setting(False, "Random horizontal flips. Off for faces/text that are not symmetric.")
    instance_prompt: str = setting("", "One prompt for every training image, e.g. 'a photo of sks dog', as "
                                       "DreamBooth trains (empty: each image's caption, with the trigger word).")
    caption_dropout: float = setting(0.0, "Share of steps trained with an empty caption.", lo=0.0, hi=0.99,
                                     ui={"step": 0.01})

    # Bookkeeping.
    run_name: str = setting("", "Name of the run folder (defaults to output_name).")
    save_every: int = setting(200, "Write a resumable checkpoint every N steps (0: only at the end or on Cancel).",
                              lo=0, hi=100000)
    keep_checkpoints: int = setting(3, "Older checkpoints of the run are deleted beyond this many.", lo=1, hi=1000)
    validation_prompt: str = setting("", "Optional prompt rendered during training to watch progress, e.g. 'a photo "
                                         "of sks dog on the beach'.", ui={"multiline": True})
    validation_every: int = setting(200, "Render the validation prompt every N steps (0: only at the end).", lo=0,
                                    hi=100000)
    validation_steps: int = setting(20, "Sampler steps per validation image.", lo=1, hi=200)
    validation_seed: int = setting(1234, "Seed of the validation image.", lo=0, hi=2**31 - 1)
    resume: bool = setting(True, "Continue the latest unfinished (cancelled) run of this output name, if it used the "
                                 "same dataset and base model; otherwise a new run starts and says why.")
    log_every: int = setting(1, "Log the loss every N steps.", lo=1, hi=100000)
    extra: dict = setting({}, "Metadata passed through to the saved file.")

    def check_types(self) -> "TrainConfig":
        """Every field has its declared type and floats are finite (JSON and --set can give anything)."""
        for name, kind in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if not _fits(value, kind) or (kind is float and not math.isfinite(value)):
                raise ConfigError(f"{_path(name)}={value!r} is not valid: {name} must be {_EXPECTED[kind]}, "
                                  f"e.g. {default_of(name)!r}.")
            if kind is float:
                setattr(self, name, float(value))  # JSON's 1 for 1.0
        return self

    def validate(self) -> "TrainConfig":
        """Types, then each field's declared choices and range, then the rules that tie fields together."""
        self.check_types()
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"{_path(f.name)}={value!r} is not one of {', '.join(meta['choices'])}.")
            if meta["lo"] is not None and value < meta["lo"]:
                bound = "must not be negative" if meta["lo"] == 0 else f"must be at least {meta['lo']}"
                raise ConfigError(f"{_path(f.name)} {bound} (got {value}).")
            if meta["hi"] is not None and value > meta["hi"]:
                raise ConfigError(f"{_path(f.name)} must be at most {meta['hi']} (got {value}).")
        if not self.base_model:
            raise ConfigError("base_model is empty: pick a checkpoint from models/checkpoints.")
        if not self.dataset:
            raise ConfigError("dataset is empty: give the folder holding your training images.")
        if self.resolution and (self.resolution % 8 or self.resolution < 64):
            lo = max(self.resolution // 8 * 8, 64)
            raise ConfigError(f"resolution {self.resolution} must be a multiple of 8 and at least 64 (or 0: the base "
                              f"model's own size): use {lo} or {lo + 8}.")
        if self.lokr_factor == 0:
            raise ConfigError(f"lokr_factor must be -1 (automatic) or at least 1 (got {self.lokr_factor}).")
        if self.method == "textual_inversion":
            if not self.trigger_word.strip():
                raise ConfigError("trigger_word is empty: textual inversion learns a new word, so give one "
                                  "(e.g. sks); write it in your prompts, or load the file as embedding:<name>.")
            if not self.init_word.strip():
                raise ConfigError("textual_inversion.init_word is empty: give a word close to the subject "
                                  "(dog, woman, painting); the embedding starts from it.")
        return self

    @property
    def name(self) -> str:
        return self.run_name or self.output_name

    def values(self) -> dict:
        """Every setting by name, flat."""
        return dataclasses.asdict(self)

    def to_dict(self) -> dict:
        """The JSON form: common settings at the top, method and network options in their groups."""
        values = self.values()
        out = {name: values[name] for name in fields_of("")}
        for group in GROUPS:
            out[group] = {name: values[name] for name in fields_of(group)}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """From the JSON form, nested or flat; unknown keys and settings in the wrong group are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"A run config must be a JSON object of settings, got {type(data).__name__}.")
        flat = {}
        for key, value in data.items():
            if key == "resolved":  # what a run folder's config.json adds
                continue
            if key in GROUPS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} must be a JSON object of {GROUPS[key]} settings, got {value!r}.")
                for name, inner in value.items():
                    if _group_of(name) != key:
                        raise ConfigError(f"{key}.{name} is not a setting of {key} (its settings: "
                                          f"{', '.join(fields_of(key))}).")
                    if name in flat:
                        raise ConfigError(f"{name} is given twice (at the top and in {key}); keep one.")
                    flat[name] = inner
            elif key in flat:
                raise ConfigError(f"{key} is given twice (at the top and in {_group_of(key)}); keep one.")
            else:
                flat[key] = value
        unknown = sorted(set(flat) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**flat).check_types()

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _fits(value, kind) -> bool:
    """isinstance, except that a bool is no number here and an int is a fine float."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def spec(name: str) -> dataclasses.Field:
    """The declaration of one field (its metadata holds help, choices, range, group, ui)."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}[name]


def default_of(name: str):
    f = spec(name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def choices(name: str) -> tuple:
    return spec(name).metadata["choices"]


def _group_of(name: str) -> str | None:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return fields[name].metadata["group"] if name in fields else None


def _path(name: str) -> str:
    """Where a setting sits in the JSON form: lora.rank, textual_inversion.num_vectors, steps."""
    group = _group_of(name)
    return f"{group}.{name}" if group else name


def fields_of(group: str) -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == group]


_WIDGET_TYPES = {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}


def widget(name: str, **override) -> tuple:
    """A ComfyUI input for this field: its type (or dropdown), default, range and tooltip from the declaration;
    `override` replaces any option (e.g. a node's own default); its "choices" narrows a dropdown to some of them."""
    f = spec(name)
    meta, kind = f.metadata, typing.get_type_hints(TrainConfig)[name]
    options = {"default": default_of(name), "tooltip": meta["help"], **meta["ui"]}
    if meta["lo"] is not None:
        options["min"] = meta["lo"]
    if meta["hi"] is not None:
        options["max"] = meta["hi"]
    options.update(override)
    shown = options.pop("choices", meta["choices"])
    assert set(shown) <= set(meta["choices"]), f"{name}: {shown} are not all declared choices"
    return (list(shown) if meta["choices"] else _WIDGET_TYPES[kind], options)


def widgets(*names: str, **overrides: dict) -> dict:
    """{name: widget(name)} for these fields, in this order; overrides={name: {option: value}}."""
    return {name: widget(name, **overrides.get(name, {})) for name in names}


def describe() -> str:
    """Every setting with its type, default, choices or range and help, by group: the command line's help."""
    hints = typing.get_type_hints(TrainConfig)
    lines = []
    for group in ("", *GROUPS):
        lines.append(f"\n{group or 'common'} settings" + (f" (JSON: {{\"{group}\": {{...}}}})" if group else "") + ":")
        for f in dataclasses.fields(TrainConfig):
            if f.metadata["group"] != group:
                continue
            meta = f.metadata
            default = default_of(f.name)
            allowed = (f" one of {', '.join(meta['choices'])}" if meta["choices"] else
                       f" in [{meta['lo']}, {meta['hi']}]" if meta["lo"] is not None else "")
            lines.append(f"  {f.name} ({hints[f.name].__name__}, default {json.dumps(default)}{allowed}): "
                         f"{meta['help']}")
    return "\n".join(lines)
