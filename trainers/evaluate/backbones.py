"""The image and text encoders the metrics score with, loaded offline and kept between runs.

Folders live in ComfyUI's `models/metrics/<name>` in Hugging Face layout (config.json, weights, processor files):
CLIP (the papers use openai/clip-vit-base-patch32) for CLIP-I and CLIP-T, DINO (facebook/dino-vits16) for DINO
and PRES, and an LPIPS folder (evaluate/lpips.py) for DIV. A typed hub id is used only as the hub policy allows
(core/model_source.py). Each loaded encoder stays cached until `unload()`; inside ComfyUI its memory manager may
move it off the GPU when other models need room (host.ManagedModule), as for BLIP.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from ..core import host, model_source
from .errors import BackboneError

log = logging.getLogger("personalize")

METRICS_FOLDER = "metrics"
DEFAULTS = {"clip": "clip-vit-base-patch32", "dino": "dino-vits16", "lpips": "lpips-alex"}
HUB_IDS = {"clip": "openai/clip-vit-base-patch32", "dino": "facebook/dino-vits16"}  # the papers' choices
KINDS = {
    "clip": model_source.FolderModel(METRICS_FOLDER, "CLIP model", "config.json, the weights, "
                                     "preprocessor_config.json and the tokenizer files",
                                     HUB_IDS["clip"], BackboneError),
    "dino": model_source.FolderModel(METRICS_FOLDER, "DINO model", "config.json, the weights and "
                                     "preprocessor_config.json", HUB_IDS["dino"], BackboneError),
    "lpips": model_source.FolderModel(METRICS_FOLDER, "LPIPS model", "alexnet.safetensors or torchvision's "
                                      "alexnet-owt-7be5be79.pth renamed alexnet.pth, and the lpips package's "
                                      "weights/v0.1/alex.pth", "(none: LPIPS is not on the hub)", BackboneError),
}
BATCH = 16


@dataclass
class Backbone:
    kind: str  # "clip", "dino" or "lpips"
    name: str  # what the scores are labelled with: the folder name or hub id
    model: object
    processor: object
    device: torch.device
    managed: host.ManagedModule = field(repr=False, default=None)

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        """Unit-length embeddings [N, D] of PIL images: CLIP's projected image features, or DINO's class token."""
        model = self.managed.use()
        out = []
        for start in range(0, len(images), BATCH):
            pixels = self.processor(images=images[start:start + BATCH], return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, next(model.parameters()).dtype)
            if self.kind == "clip":
                features = _pooled(model.get_image_features(pixel_values=pixels))
            else:  # the class token of the last layer, as the DreamBooth paper's DINO score uses
                features = model(pixel_values=pixels).last_hidden_state[:, 0]
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings [N, D]."""
        model = self.managed.use()
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        features = _pooled(model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                   attention_mask=tokens["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns an output object whose pooler_output is the projected feature; 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


_cache: dict[tuple, Backbone] = {}


def list_metric_models() -> list[str]:
    """Folders under models/metrics: transformers folders (config.json) and LPIPS folders (lin weights)."""
    host.register_model_folder(METRICS_FOLDER)
    return host.list_models(METRICS_FOLDER, extensions=(), include_dirs=True,
                            dir_markers=("config.json", "lin.safetensors", "alex.pth"))


def load_backbone(kind: str, name_or_path: str = "", device=None) -> Backbone:
    """The `kind` encoder named in a dropdown, a folder path or a typed hub id; loaded once and kept."""
    host.register_model_folder(METRICS_FOLDER)
    spec = KINDS[kind]
    markers = ("config.json",) if kind != "lpips" else ()
    source, local = model_source.resolve(spec, name_or_path or DEFAULTS[kind], markers=markers)
    device = torch.device(device or host.torch_device())
    key = (kind, source, str(device))
    if key not in _cache:
        _cache[key] = _load(kind, spec, source, local, device)
    return _cache[key]


def _load(kind, spec, source: str, local: bool, device) -> Backbone:
    name = os.path.basename(source.rstrip("/\\")) if local else source
    if kind == "lpips":
        from .lpips import load_lpips

        model = load_lpips(source)
        return Backbone(kind, name, model, None, device, host.ManagedModule(model, device))
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        raise BackboneError(f"Could not read the {spec.what} config in '{source}': {e}. "
                            f"{spec.where_to_put_it()}.") from e
    expected = {"clip": ("clip",), "dino": ("vit", "dinov2", "dinov3_vit")}[kind]
    if config.model_type not in expected:
        raise BackboneError(f"'{source}' is a '{config.model_type}' model, not a {spec.what}. "
                            f"{spec.where_to_put_it()}.")
    try:
        if kind == "clip":
            model = CLIPModel.from_pretrained(source, local_files_only=local)
            processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        else:
            extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}  # the pooler is unused
            model = AutoModel.from_pretrained(source, local_files_only=local, **extra)
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, TypeError) as e:
        raise BackboneError(f"Could not load the {spec.what} from '{source}': {e}. The folder needs {spec.needs}."
                            f" {spec.where_to_put_it()}.") from e
    model.eval().requires_grad_(False)
    log.info("loaded %s model %s on %s", kind, name, device)
    return Backbone(kind, name, model, processor, device, host.ManagedModule(model, device))


def unload() -> bool:
    """Free every cached encoder (the Unload Metric Models node); True if any was loaded."""
    return host.release_cached(_cache)
