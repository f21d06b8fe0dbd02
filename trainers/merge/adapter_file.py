"""An adapter file in any of the common key formats, as per-module deltas under kohya stems (module_map.py).

Formats read:
  kohya and LyCORIS: `lora_unet_...`, `lora_te_...`, `lora_te1_...`, `lora_te2_...` (SD1.x UNet modules also by
    their LDM names, as ComfyUI accepts them); `lycoris_` + a diffusers UNet name
  ComfyUI ("Extract and Save Lora"): `diffusion_model.<LDM module>`, `text_encoders.clip_l|clip_g.transformer.<...>`
  diffusers / peft: `unet.<diffusers module>.lora_A.weight` / `lora_B.weight` (or `.lora.down/up.weight`),
    `text_encoder.`, `text_encoder_2.`; without an `alpha` their scale is 1 (diffusers scales by lora_alpha / r,
    which its scripts set to the rank)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..families import ldm_keys
from .module_delta import ModuleDelta, group_by_module, split_key
from .module_map import ModuleMap

# peft and older diffusers suffixes -> kohya's
_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
             "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
             "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight"}
_TEXT_PREFIXES = {"sd1": {"text_encoder.": "lora_te_", "text_encoders.clip_l.transformer.": "lora_te_"},
                  "sdxl": {"text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_",
                           "text_encoders.clip_l.transformer.": "lora_te1_",
                           "text_encoders.clip_g.transformer.": "lora_te2_"}}


class AdapterError(ValueError):
    """An adapter file that cannot be used with this base model; the message names the file and the fix."""


@dataclass
class Adapter:
    path: str
    modules: dict  # kohya stem -> ModuleDelta
    metadata: dict = field(default_factory=dict)


def read_adapter(path: str, modules: ModuleMap) -> Adapter:
    """The file's modules under kohya stems of this base model. A key no module of the base takes is an error
    (the file was made for another model), as is a key of no known format."""
    from ..core import safetensors_file

    try:
        tensors, metadata = safetensors_file.read(path)
    except (OSError, ValueError) as e:
        raise AdapterError(f"'{path}' is not a readable safetensors file ({e}).") from e
    renamed = {}
    for key, tensor in tensors.items():
        renamed[_kohya_key(key, modules)] = tensor
    grouped, unknown = group_by_module(renamed)
    if unknown:
        raise AdapterError(f"'{path}': {len(unknown)} keys of no adapter format this pack reads "
                           f"({', '.join(unknown[:3])}).")
    out, foreign = {}, []
    for stem, parts in grouped.items():
        canonical = modules.aliases.get(stem, stem)
        if canonical not in modules.targets:
            foreign.append(stem)
            continue
        try:
            out[canonical] = ModuleDelta.from_tensors(canonical, parts)
        except ValueError as e:
            raise AdapterError(f"'{path}': {e}") from e
    if foreign:
        family = "SDXL" if modules.family == "sdxl" else "SD1.x"
        raise AdapterError(f"'{path}' changes {len(foreign)} modules this {family} base does not have "
                           f"({', '.join(sorted(foreign)[:3])}): it was made for another model.")
    if not out:
        raise AdapterError(f"'{path}' holds no adapter modules.")
    return Adapter(path, out, metadata)


def _kohya_key(key: str, modules: ModuleMap) -> str:
    """One file key in kohya's naming (unchanged when it is kohya's, or unknown)."""
    for old, new in _SUFFIXES.items():
        if key.endswith("." + old):
            key = key[:-len(old)] + new
            break
    if key.startswith("base_model.model."):  # peft's wrapper
        key = key[len("base_model.model."):]
    stem, dot, suffix = _split(key)
    if stem.startswith("diffusion_model."):  # ComfyUI: the LDM module name
        stem = "lora_unet_" + stem[len("diffusion_model."):].replace(".", "_")
    elif stem.startswith("lycoris_"):  # LyCORIS's own prefix for diffusers UNet names
        stem = "lora_unet_" + stem[len("lycoris_"):]
    elif stem.startswith("unet."):  # diffusers / peft: the diffusers module name
        stem = "lora_unet_" + stem[len("unet."):].replace(".", "_")
    else:
        for prefix, kohya in _TEXT_PREFIXES[modules.family].items():
            if stem.startswith(prefix):
                module = ldm_keys.text_diffusers_key(stem[len(prefix):])
                stem = kohya + "text_model_" + module.replace(".", "_")
                break
    return stem + dot + suffix


def _split(key: str) -> tuple[str, str, str]:
    """(stem, ".", suffix) by the delta module's known suffixes; (key, "", "") when none fits."""
    parts = split_key(key)
    return (parts[0], ".", parts[1]) if parts else (key, "", "")
