"""Apply Trained LoRA: ComfyUI's own LoRA code, exactly as LoraLoader, with a link slot for Train LoRA."""
from __future__ import annotations

from ..trainers import host


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
    def VALIDATE_INPUTS(cls, lora_name=None, trained_lora=None, **_):
        return True  # a just-trained file is not in the dropdown list cached at start-up

    def apply(self, model, clip, lora_name, strength_model, strength_clip, trained_lora=None):
        import comfy.sd  # type: ignore
        import comfy.utils  # type: ignore

        path = host.resolve_model("loras", trained_lora or lora_name)
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


NODE_CLASS_MAPPINGS = {"PersonalizeApplyTrainedLoRA": ApplyTrainedLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeApplyTrainedLoRA": "Apply Trained LoRA (Personalize)"}
