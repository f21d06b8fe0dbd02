"""Apply Trained LoRA: ComfyUI's own LoRA code, exactly as LoraLoader, with a link slot for Train LoRA."""
from __future__ import annotations

from ..trainers.core import host


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
        # Only lora_name is ours to check: with trained_lora linked it is not used (and a freshly shared
        # workflow may name a file this server lacks); otherwise it must be in models/loras, as LoraLoader
        # demands. Naming input_types makes ComfyUI leave the link types to us, so they are checked here.
        try:
            from comfy_execution.validation import validate_node_input  # type: ignore
        except ImportError:  # an older ComfyUI
            def validate_node_input(received, expected):
                return received in (expected, "*")
        spec = cls.INPUT_TYPES()  # lists models/loras once
        declared = {**spec["required"], **spec["optional"]}
        for name, received in input_types.items():
            expected = declared.get(name, (None,))[0]
            if isinstance(expected, str) and not validate_node_input(received, expected):
                return f"{name} takes {expected}, not {received}"
        if "trained_lora" in input_types or lora_name in declared["lora_name"][0]:
            return True
        return f"LoRA '{lora_name}' is not in models/loras; pick one from the list or link Train LoRA's lora_name"

    def apply(self, model, clip, lora_name, strength_model, strength_clip, trained_lora=None):
        # Names resolve inside models/loras as in LoraLoader: a linked '../x' or absolute path cannot leave it.
        path = host.resolve_model("loras", trained_lora or lora_name)
        import comfy.sd  # type: ignore
        import comfy.utils  # type: ignore

        lora = comfy.utils.load_torch_file(path, safe_load=True)
        return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


NODE_CLASS_MAPPINGS = {"PersonalizeApplyTrainedLoRA": ApplyTrainedLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeApplyTrainedLoRA": "Apply Trained LoRA (Personalize)"}
