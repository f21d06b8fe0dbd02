"""Captioning images with BLIP: one model load, batched generation (caption files: folders.py).

Models are transformers BLIP folders (the layout of Salesforce/blip-image-captioning-base
and -large: config.json, weights, processor and tokenizer files) in ComfyUI's
`models/blip`, or a hub id the user typed. BLIP-2 folders (Blip2ForConditionalGeneration)
load through the same code. The loaded model is kept between runs until `unload()`;
inside ComfyUI its memory manager may move it off the GPU when other models need room.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..core import host, model_source
from ..core.dtypes import DTYPES
from ..data.images import shrink

log = logging.getLogger(__name__)

BLIP_FOLDER = "blip"
_MODEL_MARKERS = ("config.json",)
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


BLIP = model_source.FolderModel(BLIP_FOLDER, "BLIP model", "config.json, model.safetensors and the "
                                 "processor/tokenizer files", "Salesforce/blip-image-captioning-base", CaptionError)


def _where_to_put_it() -> str:
    return BLIP.where_to_put_it()


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(folder path or hub id, is_local): a local folder first, a hub id only as typed (core/model_source.py)."""
    host.register_model_folder(BLIP_FOLDER)
    return model_source.resolve(BLIP, name_or_path)


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
        model = model_class.from_pretrained(source, local_files_only=local, **model_source.dtype_kwarg(dtype))
    except (OSError, ValueError) as e:
        raise failed("model", e) from e
    model.eval().requires_grad_(False)
    log.info("Loaded %s captioning model from %s on %s (%s)", kind, source, device, str(dtype).replace("torch.", ""))
    return BlipCaptioner(model, processor, kind, source, device, dtype, host.ManagedModule(model, device))


def unload() -> bool:
    """Free the cached model (the 'Unload BLIP' node); True if one was loaded."""
    return host.release_cached(_cache)


# ----------------------------------------------------------------------------- captioning

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
