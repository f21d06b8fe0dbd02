"""Train LoRA: a thin node over trainers/training/loop.py (all model work happens there)."""
from __future__ import annotations

from ..trainers.core.config import widgets
from .training_run import DATASET_INPUT, TrainerNode, base_inputs, run_training, vae_input


class TrainLoRA(TrainerNode):
    DESCRIPTION = ("Train a LoRA of your subject or style on an SD1.5 checkpoint. The result is saved to "
                   "models/loras in kohya format, so LoraLoader and A1111 use it directly. Cancel stops at the "
                   "next step and keeps a resumable checkpoint; queue again with 'resume' on to continue.")
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora_name", "loss_curve", "validation_image")
    OUTPUT_TOOLTIPS = ("File name of the trained LoRA inside models/loras.", "Loss per step (orange: smoothed).",
                       "The last validation image (black when no validation prompt was given).")

    @classmethod
    def INPUT_TYPES(cls):
        # Widgets come from the run config's declarations (trainers/core/config.py); this order is the order
        # of saved workflows' widget values, so new widgets go at the end.
        return {
            "required": {
                **base_inputs(),
                **widgets("trigger_word", "output_name", "preset", "rank", "alpha", "steps", "unet_lr", "batch_size",
                          "resolution", "seed", trigger_word={"default": "sks"}),
            },
            "optional": {
                **widgets("train_text_encoder", "text_encoder_lr", "grad_accum", "optimizer", "lr_scheduler",
                          "warmup_steps", "mixed_precision", "gradient_checkpointing", "crop", "flip", "min_snr_gamma",
                          "noise_offset", "caption_dropout", "save_every", "validation_prompt", "validation_every",
                          "resume", "network", "lokr_factor", "conv_rank", "conv_alpha"),
                "dataset": DATASET_INPUT,
                **vae_input(),
                **widgets("which_text_encoders"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, ckpt_name, dataset_folder, output_name, dataset=None, unique_id=None, **settings):
        name, ui, loss_curve, validation = run_training(ckpt_name, dataset_folder, dataset, method="lora",
                                                        output_name=output_name, **settings)
        return {"ui": ui, "result": (name, loss_curve, validation)}


NODE_CLASS_MAPPINGS = {"PersonalizeTrainLoRA": TrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeTrainLoRA": "Train LoRA (Personalize)"}
