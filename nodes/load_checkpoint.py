"""Load Trained Checkpoint: ComfyUI's own checkpoint loader (as CheckpointLoaderSimple) with a link slot for
Train DreamBooth, whose file does not exist yet when the graph is checked."""
from __future__ import annotations

from ..trainers.core import host
from .linked_model import validate_linked


class LoadTrainedCheckpoint:
    DESCRIPTION = ("Load a checkpoint through ComfyUI's own loader (the same as CheckpointLoaderSimple); link "
                   "Train DreamBooth's model_name to load the checkpoint it just wrote.")
    CATEGORY = "Personalize/train"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The diffusion model.", "The CLIP text encoder.", "The VAE.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (host.list_models("checkpoints"), {"tooltip": "A checkpoint from models/checkpoints."}),
            },
            "optional": {
                "trained_checkpoint": ("STRING", {"forceInput": True, "tooltip": "Link 'model_name' from Train DreamBooth (method dreambooth) here to load the checkpoint it just wrote (overrides ckpt_name)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name, input_types):
        return validate_linked(cls, "ckpt_name", ckpt_name, "trained_checkpoint", "checkpoints", input_types)

    def load(self, ckpt_name, trained_checkpoint=None):
        # Names resolve inside models/checkpoints as in CheckpointLoaderSimple: a link cannot leave the folder.
        path = host.resolve_model("checkpoints", trained_checkpoint or ckpt_name)
        import comfy.sd  # type: ignore
        import folder_paths  # type: ignore

        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                    embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return out[:3]


NODE_CLASS_MAPPINGS = {"PersonalizeLoadTrainedCheckpoint": LoadTrainedCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeLoadTrainedCheckpoint": "Load Trained Checkpoint (Personalize)"}
