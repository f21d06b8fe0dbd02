"""Captioning images with BLIP: one model load, batched generation, caption files beside images.

Models are transformers BLIP folders (the layout of Salesforce/blip-image-captioning-base
and -large: config.json, weights, processor and tokenizer files) in ComfyUI's
`models/blip`, or a hub id the user typed. BLIP-2 folders (Blip2ForConditionalGeneration)
load through the same code. The loaded model is kept between runs until `unload()`;
inside ComfyUI its memory manager may move it off the GPU when other models need room.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import host, path_policy, safe_io
from .images import ImageError, list_images, open_rgb, shrink

log = logging.getLogger(__name__)

BLIP_FOLDER = "blip"
POLICIES = ("keep", "overwrite", "append")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MODEL_MARKERS = ("config.json",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
SHARED_CROSS_CACHE = True  # see _beam_cache; False gives transformers' own beam-search cache
REDUCED_DECODE = True  # see decode_side; False hands BLIP full-size images (bench/bench_caption.py --memory)
DEFAULT_INPUT_SIDE = 384  # BLIP's processor input; BLIP-2's is 224


class CaptionError(ValueError):
    """A captioning model, folder or option that cannot be used; the message says what to do."""


@dataclass
class BlipCaptioner:
    """A loaded BLIP model with its processor; get one from `load_blip`."""

    model: object
    processor: object
    kind: str  # "blip" or "blip-2"
    source: str  # the folder, or the hub id
    device: torch.device
    dtype: torch.dtype
    managed: host.ManagedModule = field(repr=False, default=None)


_cache: dict[tuple, BlipCaptioner] = {}  # one slot: loading another model frees the previous one


# ----------------------------------------------------------------------------- models

def blip_dirs() -> list[str]:
    host.register_model_folder(BLIP_FOLDER)
    return host.model_dirs(BLIP_FOLDER)


def list_blip_models() -> list[str]:
    """Model folders (holding a config.json) under the BLIP model folders, as dropdown names."""
    host.register_model_folder(BLIP_FOLDER)
    return host.list_models(BLIP_FOLDER, extensions=(), include_dirs=True, dir_markers=_MODEL_MARKERS)


def _where_to_put_it() -> str:
    return (f"Download a BLIP model folder (for example Salesforce/blip-image-captioning-base: config.json, "
            f"model.safetensors and the processor/tokenizer files) into {' or '.join(blip_dirs())}")


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(folder path or hub id, is_local): a local folder first, a hub id only as typed.

    In the server a typed path must be inside ComfyUI's folders and a hub id is used only when
    the owner allowed downloads (path_policy); the command line may name any folder.
    """
    name = (name_or_path or "").strip()
    if not name:
        raise CaptionError(f"No BLIP model was chosen. {_where_to_put_it()}, or type a hub id.")
    name = os.path.expanduser(name)
    local_tool = not path_policy.server_rules()
    if os.path.isabs(name):
        path = name if local_tool else path_policy.node_path(name, "BLIP model folder")
    else:
        try:
            path = host.resolve_model(BLIP_FOLDER, name)
        except FileNotFoundError:
            if local_tool and os.path.isdir(name):  # a relative path typed on the command line
                path = os.path.abspath(name)
            elif _HUB_ID.match(name):
                if not path_policy.hub_allowed():
                    raise CaptionError(path_policy.hub_refusal(name)) from None
                return name, False
            else:
                raise CaptionError(f"BLIP model '{name}' was not found. {_where_to_put_it()}, "
                                   f"or type a hub id such as Salesforce/blip-image-captioning-base.") from None
    if not os.path.exists(path):
        raise CaptionError(f"BLIP model folder '{path}' does not exist. {_where_to_put_it()}.")
    if not os.path.isdir(path):
        raise CaptionError(f"'{path}' is not a model folder: BLIP needs the whole folder (config.json, weights, "
                           f"processor and tokenizer files). {_where_to_put_it()}.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CaptionError(f"'{path}' has no config.json, so it is not a transformers model folder. "
                           f"{_where_to_put_it()}.")
    return path, True


def resolve_device(device=None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device(host.torch_device())
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere unless asked; fp16 on the CPU is slow and partly unsupported."""
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CaptionError(f"Unknown dtype '{dtype}': use one of auto, {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and device.type == "cpu":
        log.warning("fp16 is not supported well on the CPU; captioning in fp32 instead.")
        return torch.float32
    return dtype


def load_blip(name_or_path: str, device=None, dtype=None) -> BlipCaptioner:
    """The BLIP model named in the dropdown, a folder path or a typed hub id, loaded once and kept."""
    source, local = resolve_source(name_or_path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    key = (source, str(device), str(dtype))
    if key in _cache:
        return _cache[key]
    unload()  # one captioning model in memory at a time
    captioner = _load(source, local, device, dtype)
    _cache[key] = captioner
    return captioner


def _load(source: str, local: bool, device: torch.device, dtype: torch.dtype) -> BlipCaptioner:
    import transformers
    from transformers import AutoConfig, AutoProcessor

    def failed(what, e):
        if local:
            return CaptionError(f"Could not load the BLIP {what} from '{source}': {e}. The folder needs config.json, "
                                f"the weights and the processor files ({', '.join(_PROCESSOR_FILES)}, tokenizer "
                                f"files) as in the model's hub repository.")
        return CaptionError(f"Could not get '{source}' from the Hugging Face hub ({e}). Without internet: "
                            f"{_where_to_put_it()}, then pick it in the dropdown.")

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        raise failed("config", e) from e
    kind = config.model_type
    if kind == "blip":
        from transformers import BlipForConditionalGeneration as model_class
    elif kind == "blip-2":
        from transformers import Blip2ForConditionalGeneration as model_class
    else:
        raise CaptionError(f"'{source}' is a '{kind}' model, not BLIP or BLIP-2. {_where_to_put_it()}.")
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        # Cast while loading, so modules a model keeps in fp32 (BLIP-2's Q-Former) stay so.
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = model_class.from_pretrained(source, local_files_only=local, **{dtype_arg: dtype})
    except (OSError, ValueError) as e:
        raise failed("model", e) from e
    model.eval().requires_grad_(False)
    log.info("Loaded %s captioning model from %s on %s (%s)", kind, source, device, str(dtype).replace("torch.", ""))
    return BlipCaptioner(model, processor, kind, source, device, dtype, host.ManagedModule(model, device))


def unload() -> bool:
    """Free the cached model (the 'Unload BLIP' node); True if one was loaded."""
    had = bool(_cache)
    for captioner in _cache.values():
        captioner.managed.release()
        captioner.model = None
    _cache.clear()
    return had


# ----------------------------------------------------------------------------- captioning

def images_from_tensor(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE batch ([B,H,W,C] floats in 0..1) to 8-bit RGB PIL images."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for a in arrays:
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        out.append(Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB"))
    return out


def clean_caption(text: str) -> str:
    """One line, single spaces, no space before punctuation ("a man , sitting" -> "a man, sitting")."""
    text = re.sub(r"\s+", " ", text or "").strip()
    return re.sub(r"\s+([,.!?;:])", r"\1", text)


def _has_part(text: str, affix: str) -> bool:
    """Whether `affix` is already one of the comma-separated parts of `text` (case-insensitive)."""
    pattern = r"(^|,)\s*" + r"\s+".join(map(re.escape, affix.split())) + r"\s*(,|$)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def apply_affixes(caption: str, prefix: str = "", suffix: str = "") -> str:
    """'prefix, caption, suffix'; an affix already present as a comma-separated part is not repeated."""
    text = clean_caption(caption).strip(" ,")
    prefix = clean_caption(prefix).strip(" ,")
    suffix = clean_caption(suffix).strip(" ,")
    if prefix and not _has_part(text, prefix):
        text = f"{prefix}, {text}" if text else prefix
    if suffix and not _has_part(text, suffix):
        text = f"{text}, {suffix}" if text else suffix
    return text


def _interrupt_criteria(check):
    """Checks for Cancel between generated tokens, so a slow batch stops within a step."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _CheckInterrupt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            check()  # raises when the user pressed Cancel
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_CheckInterrupt()])


def _beam_cache(model):
    """A BLIP beam-search cache that does not reorder the cross-attention keys and values.

    generate() repeats each image's encoder states once per beam, and a beam only ever
    continues a beam of the same image, so reordering the cross-attention cache is an identity;
    yet it copies every layer's keys and values over all 577 image tokens at each step, which
    is 40% of the CPU time at batch 8. The self-attention cache is reordered as usual.
    None where the cache layout is not the one checked here (transformers before 5).
    """
    import transformers
    if not SHARED_CROSS_CACHE or int(transformers.__version__.split(".")[0]) < 5:
        return None
    try:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        class BeamSharedCrossCache(EncoderDecoderCache):
            def reorder_cache(self, beam_idx):
                self.self_attention_cache.reorder_cache(beam_idx)

        config = model.config.text_config
        return BeamSharedCrossCache(DynamicCache(config=config), DynamicCache(config=config))
    except (ImportError, TypeError, AttributeError):
        return None


def decode_side(captioner: BlipCaptioner) -> int | None:
    """The shorter side images are reduced to before batching: twice the processor's input.

    The processor squashes every image to its input size anyway (384 px for BLIP), so more
    pixels only cost memory: a 48-MP photo is 144 MB decoded. At twice the input, the
    processor's own antialiased resize stays the last step. None: no reduction (REDUCED_DECODE off).
    """
    if not REDUCED_DECODE:
        return None
    size = getattr(getattr(captioner.processor, "image_processor", None), "size", None)
    if hasattr(size, "get"):  # a dict or transformers 5's SizeDict: {"height", "width"} or {"shortest_edge"}
        size = max(size.get(k) or 0 for k in ("height", "width", "shortest_edge"))
    return 2 * (size if isinstance(size, int) and size > 0 else DEFAULT_INPUT_SIDE)


def _generate(captioner: BlipCaptioner, batch: list[Image.Image], prompt: str, gen_kwargs: dict) -> list[str]:
    model, processor = captioner.model, captioner.processor
    if captioner.kind == "blip" and gen_kwargs["num_beams"] > 1:
        cache = _beam_cache(model)
        if cache is not None:
            gen_kwargs = {**gen_kwargs, "past_key_values": cache}
    if captioner.kind == "blip":
        text = [prompt] * len(batch) if prompt else None
    else:  # the BLIP-2 processor puts the image tokens in front of the (possibly empty) prompt
        text = [prompt] * len(batch)
    inputs = processor(images=batch, text=text, return_tensors="pt")
    inputs = {k: v.to(captioner.device) for k, v in inputs.items() if k != "token_type_ids"}
    inputs["pixel_values"] = inputs["pixel_values"].to(captioner.dtype)
    out = model.generate(**inputs, **gen_kwargs)
    # Drop the tokens the model echoes back: BLIP returns its prompt minus the final [SEP]
    # (or just the start token), decoder-only BLIP-2 returns its whole input.
    ids = inputs.get("input_ids")
    if captioner.kind == "blip":
        echo = ids.shape[1] - 1 if ids is not None else 1
    else:
        echo = ids.shape[1] if getattr(model.config, "use_decoder_only_language_model", True) else 0
    texts = processor.batch_decode(out[:, echo:], skip_special_tokens=True)
    return [clean_caption(t) for t in texts]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Sampling from a fixed seed without disturbing the caller's random state."""
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def caption_images(captioner: BlipCaptioner, images: list[Image.Image], prefix_prompt: str = "",
                   num_beams: int = 3, do_sample: bool = False, min_length: int = 5, max_length: int = 30,
                   batch_size: int = 8, progress=None, check_interrupt=None, seed: int | None = 0,
                   top_p: float = 0.9) -> list[str]:
    """Captions for PIL images, in order.

    `prefix_prompt` ("a photo of") conditions BLIP and is not repeated in the result. Lengths
    count caption tokens; max wins over min. Beam search unless `do_sample` (top-p, seeded).
    progress(done, total) follows each batch; check_interrupt() (default: the host's Cancel)
    is called before each batch and after each generated token. Big images are shrunk to
    `decode_side` first; smaller ones are used as they are.
    """
    check = check_interrupt or host.check_interrupt
    gen_kwargs = dict(num_beams=max(1, int(num_beams)), do_sample=bool(do_sample),
                      min_new_tokens=min(int(min_length), int(max_length)), max_new_tokens=int(max_length),
                      stopping_criteria=_interrupt_criteria(check))
    if do_sample:
        gen_kwargs["top_p"] = top_p
    prompt = clean_caption(prefix_prompt)
    batch_size = max(1, int(batch_size))
    captions: list[str] = []
    if captioner.managed.module is None:
        raise CaptionError(f"The BLIP model from '{captioner.source}' was unloaded; load it again.")
    captioner.managed.use()  # back on its device if ComfyUI offloaded it
    seeded = _seeded(seed, captioner.device) if do_sample and seed is not None else contextlib.nullcontext()
    side = decode_side(captioner)
    with torch.inference_mode(), seeded:
        for start in range(0, len(images), batch_size):
            check()
            batch = [img.convert("RGB") if img.mode != "RGB" else img for img in images[start:start + batch_size]]
            batch = [shrink(img, side) for img in batch] if side else batch
            captions += _generate(captioner, batch, prompt, gen_kwargs)
            if progress is not None:
                progress(len(captions), len(images))
    return captions


# ----------------------------------------------------------------------------- folders

@dataclass
class CaptionReport:
    folder: str
    written: list[str] = field(default_factory=list)  # caption files written
    kept: list[str] = field(default_factory=list)  # images whose existing caption was kept
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    captions: dict[str, str] = field(default_factory=dict)  # image path -> text now in its caption file

    def summary(self) -> str:
        lines = [f"Captioned {len(self.written)} image(s) in {self.folder}; kept {len(self.kept)} existing "
                 f"caption(s); skipped {len(self.skipped)}."]
        lines += [f"skipped {os.path.basename(p)}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def caption_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".txt"


def read_caption(path: str) -> str:
    """The caption in `path` ('' when missing); a BOM or stray line breaks do not matter."""
    if not os.path.isfile(path) or not path_policy.readable(path):  # a link out is not read (nor appended to)
        return ""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return clean_caption(f.read())


def caption_folder(captioner: BlipCaptioner, folder: str, policy: str = "keep", prefix: str = "",
                   suffix: str = "", prefix_prompt: str = "", batch_size: int = 8, progress=None,
                   check_interrupt=None, **generate) -> CaptionReport:
    """Write `name.txt` beside each image of `folder` (not its sub-folders).

    keep: images that already have a non-empty caption are left alone (the model never sees
    them); overwrite: replace it; append: add the new caption after the old one. Each file is
    written atomically once its batch is done, so a Cancel leaves only complete files.
    Unreadable images are skipped with the reason logged and reported. Each image is decoded
    at reduced size (`decode_side`) as it is opened, so a batch of big photos stays small.
    """
    if policy not in POLICIES:
        raise CaptionError(f"Unknown caption policy '{policy}': use one of {', '.join(POLICIES)}.")
    folder = os.path.abspath(os.path.expanduser(str(folder or "").strip()))
    if not os.path.isdir(folder):
        raise CaptionError(f"Image folder '{folder}' does not exist.")
    report = CaptionReport(folder)
    paths, report.skipped = list_images(folder)
    todo, owners = [], {}
    for path in paths:
        target = caption_path(path).lower()
        if target in owners:  # a.jpg and a.png would share a.txt
            report.skipped.append((path, f"its caption file would be the same as {os.path.basename(owners[target])}'s"))
            continue
        owners[target] = path
        existing = read_caption(caption_path(path))
        if policy == "keep" and existing:
            report.kept.append(path)
            report.captions[path] = existing
        else:
            todo.append(path)

    check = check_interrupt or host.check_interrupt
    batch_size = max(1, int(batch_size))
    side = decode_side(captioner)
    done = 0
    for start in range(0, len(todo), batch_size):
        check()
        batch_paths, images = [], []
        for path in todo[start:start + batch_size]:
            try:
                images.append(open_rgb(path, max_short_side=side))
                batch_paths.append(path)
            except ImageError as e:
                log.warning("Skipping %s: %s", path, e.reason)
                report.skipped.append((path, e.reason))
        if images:
            captions = caption_images(captioner, images, prefix_prompt=prefix_prompt, batch_size=batch_size,
                                      check_interrupt=check, **generate)
            for path, caption in zip(batch_paths, captions):
                text = caption
                if policy == "append":
                    old = read_caption(caption_path(path))
                    text = f"{old}, {caption}" if old else caption
                text = apply_affixes(text, prefix, suffix)
                safe_io.write_text(caption_path(path), text + "\n")
                report.written.append(caption_path(path))
                report.captions[path] = text
        done += len(todo[start:start + batch_size])
        if progress is not None:
            progress(done, len(todo))
    return report


# ----------------------------------------------------------------------------- command line

def add_caption_command(subparsers) -> argparse.ArgumentParser:
    """`caption FOLDER --model NAME`: write BLIP captions beside the images of a folder."""
    p = subparsers.add_parser("caption", help="write BLIP captions (name.txt) beside the images of a folder",
                              description=add_caption_command.__doc__)
    p.add_argument("folder", help="folder of images; captions are written beside them")
    p.add_argument("--model", required=True,
                   help="a folder under <models>/blip, a full path to a BLIP folder, or a hub id (org/name)")
    # SUPPRESS: a main parser's own --models-dir (given before 'caption') is not reset to None.
    p.add_argument("--models-dir", default=argparse.SUPPRESS,
                   help="the models root holding blip/ (default: $COMFYUI_DIR/models or ./models)")
    p.add_argument("--policy", choices=POLICIES, default="keep", help="what to do with existing captions")
    p.add_argument("--prompt", default="", help='conditional start, e.g. "a photo of" (not repeated in the file)')
    p.add_argument("--prefix", default="", help='text put before each caption, e.g. "a photo of sks person"')
    p.add_argument("--suffix", default="", help="text put after each caption")
    p.add_argument("--beams", type=int, default=3, help="beam search width (1: greedy)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--min-length", type=int, default=5, help="minimum caption length in tokens")
    p.add_argument("--max-length", type=int, default=30, help="maximum caption length in tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: fp16 on CUDA, else fp32")
    p.set_defaults(func=run_caption_command)
    return p


def run_caption_command(args) -> int:
    if getattr(args, "models_dir", None):
        host.configure(models_dir=args.models_dir)
    try:
        captioner = load_blip(args.model, device=args.device, dtype=args.dtype)
    except CaptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def progress(done, total):
        print(f"\r{done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        report = caption_folder(captioner, args.folder, policy=args.policy, prefix=args.prefix, suffix=args.suffix,
                                prefix_prompt=args.prompt, batch_size=args.batch_size, progress=progress,
                                num_beams=args.beams, do_sample=args.sample, seed=args.seed,
                                min_length=args.min_length, max_length=args.max_length)
    except CaptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        if host.is_interrupt(e):
            print("\nstopped; the captions written so far are complete", file=sys.stderr)
            return 130
        raise
    print(report.summary())
    return 0
