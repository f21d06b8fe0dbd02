"""Train Textual Inversion: a thin node over trainers/training/loop.py with the textual-inversion method.

A node of its own rather than a method choice on Train LoRA: its widgets (init word, vectors, embedding learning
rate) and its output (an embedding name for `embedding:<name>` in a prompt, not a LoRA for LoraLoader) differ.
"""
from __future__ import annotations

from ..trainers.core.config import widgets
from .training_run import DATASET_INPUT, TrainerNode, base_inputs, run_training, vae_input


class TrainTextualInversion(TrainerNode):
    DESCRIPTION = ("Teach an SD1.5 checkpoint a new word for your subject or style: only the new word's embedding "
                   "trains (a few KB). The result is saved to models/embeddings; write embedding:<name> in any "
                   "CLIPTextEncode prompt (A1111: the file name) to use it. Cancel stops at the next step and keeps a "
                   "resumable checkpoint; queue again with 'resume' on to continue.")
    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("embedding_name", "prompt_token", "loss_curve", "validation_image")
    OUTPUT_TOOLTIPS = ("File name of the trained embedding inside models/embeddings.",
                       "'embedding:<name>': put it in a prompt where the subject goes.",
                       "Loss per step (orange: smoothed).",
                       "The last validation image (black when no validation prompt was given).")

    @classmethod
    def INPUT_TYPES(cls):
        # Widgets come from the run config's declarations (trainers/core/config.py); new ones go at the end,
        # since saved workflows list widget values in this order.
        return {
            "required": {
                **base_inputs(),
                **widgets("trigger_word", "output_name", "init_word", "num_vectors", "steps", "embedding_lr",
                          "batch_size", "resolution", "seed",
                          trigger_word={"default": "sks", "tooltip": "The word the embedding learns: write it in "
                                        "your captions and validation prompt; it is put in front of every caption."},
                          output_name={"default": "my_embedding"}, init_word={"default": "person"},
                          steps={"default": 1500}),
            },
            "optional": {
                **widgets("grad_accum", "optimizer", "lr_scheduler", "warmup_steps", "mixed_precision",
                          "gradient_checkpointing", "crop", "flip", "min_snr_gamma", "noise_offset", "caption_dropout",
                          "save_every", "validation_prompt", "validation_every", "resume",
                          lr_scheduler={"default": "constant"}, warmup_steps={"default": 0}),
                "dataset": DATASET_INPUT,
                **vae_input(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, ckpt_name, dataset_folder, output_name, dataset=None, unique_id=None, **settings):
        name, ui, loss_curve, validation = run_training(ckpt_name, dataset_folder, dataset,
                                                        method="textual_inversion", output_name=output_name,
                                                        **settings)
        token = "embedding:" + name.removesuffix(".safetensors")
        return {"ui": ui, "result": (name, token, loss_curve, validation)}


NODE_CLASS_MAPPINGS = {"PersonalizeTrainTextualInversion": TrainTextualInversion}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeTrainTextualInversion": "Train Textual Inversion (Personalize)"}
