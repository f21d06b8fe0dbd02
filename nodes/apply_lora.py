"""Apply Trained LoRA: ComfyUI's own LoRA code, exactly as LoraLoader, with a link slot for Train LoRA."""
from __future__ import annotations

from ..trainers.core import host
from .linked_model import validate_linked


class ApplyTrainedLoRA:
    DESCRIPTION = "Apply a trained LoRA to MODEL and CLIP through ComfyUI's own LoRA code (the same as LoraLoader)."
    CATEGORY = "Personalize/train"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The diffusion model with the LoRA.", "The text encoder with the LoRA.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA was trained on."}),
                "clip": ("CLIP", {"tooltip": "The matching CLIP text encoder."}),
                "lora_name": (host.list_models("loras"), {"tooltip": "A LoRA from models/loras."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly to change the diffusion model."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly to change the text encoder."}),
            },
            "optional": {
                "trained_lora": ("STRING", {"forceInput": True, "tooltip": "Link 'lora_name' from Train LoRA here to use the file it just wrote (overrides lora_name)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name, input_types):
        return validate_linked(cls, "lora_name", lora_name, "trained_lora", "loras", input_types)

    def apply(self, model, clip, lora_name, strength_model, strength_clip, trained_lora=None):
        # Names resolve inside models/loras as in LoraLoader: a linked '../x' or absolute path cannot leave it.
        path = host.resolve_model("loras", trained_lora or lora_name)
        import comfy.sd  # type: ignore
        import comfy.utils  # type: ignore

        lora = comfy.utils.load_torch_file(path, safe_load=True)
        return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


NODE_CLASS_MAPPINGS = {"PersonalizeApplyTrainedLoRA": ApplyTrainedLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeApplyTrainedLoRA": "Apply Trained LoRA (Personalize)"}
