"""Train LoRA: a thin node over trainers/training/loop.py (all model work happens there)."""
from __future__ import annotations

import os

from ..trainers.core import host
from ..trainers.core.config import CROPS, NETWORKS, OPTIMIZERS, PRECISIONS, PRESETS, SCHEDULERS, TrainConfig
from .convert import blank_image, pil_to_image
from .paths import node_dataset, node_folder

_D = TrainConfig()  # the engine's defaults are the node's defaults


class TrainLoRA:
    DESCRIPTION = ("Train a LoRA of your subject or style on an SD1.5 checkpoint. The result is saved to "
                   "models/loras in kohya format, so LoraLoader and A1111 use it directly. Cancel stops at the "
                   "next step and keeps a resumable checkpoint; queue again with 'resume' on to continue.")
    CATEGORY = "Personalize/train"
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora_name", "loss_curve", "validation_image")
    OUTPUT_TOOLTIPS = ("File name of the trained LoRA inside models/loras.", "Loss per step (orange: smoothed).",
                       "The last validation image (black when no validation prompt was given).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (host.list_models("checkpoints"), {"tooltip": "SD1.x base checkpoint from models/checkpoints."}),
                "dataset_folder": ("STRING", {"default": "", "tooltip": "Folder of training photos; a `name.txt` beside an image is its caption. Relative paths are inside ComfyUI's input folder."}),
                "trigger_word": ("STRING", {"default": "sks", "tooltip": "A rare word that will stand for your subject; it is put in front of every caption."}),
                "output_name": ("STRING", {"default": _D.output_name, "tooltip": "Name of the LoRA file; an existing file is never overwritten (a _2 suffix is added)."}),
                "preset": (list(PRESETS), {"default": _D.preset, "tooltip": "attn: UNet attention only (small, safe). kohya: + projections and feed-forward (kohya's default coverage). locon: + conv layers (styles)."}),
                "rank": ("INT", {"default": _D.rank, "min": 1, "max": 256, "tooltip": "LoRA rank (network dim): capacity and file size. 8-32 suits a subject."}),
                "alpha": ("FLOAT", {"default": _D.alpha, "min": 0.01, "max": 256.0, "step": 0.5, "tooltip": "Scale = alpha / rank. alpha = rank means scale 1; lower alpha trains more gently."}),
                "steps": ("INT", {"default": _D.steps, "min": 1, "max": 100000, "tooltip": "Optimizer steps. About 80-100 per photo for 5-20 photos at batch 1."}),
                "unet_lr": ("FLOAT", {"default": _D.unet_lr, "min": 0.0, "max": 10.0, "step": 0.00001, "round": False, "tooltip": "UNet learning rate (1e-4 is a safe start; ~1.0 with Prodigy)."}),
                "batch_size": ("INT", {"default": _D.batch_size, "min": 1, "max": 64, "tooltip": "Images per step (per GPU)."}),
                "resolution": ("INT", {"default": _D.resolution, "min": 64, "max": 2048, "step": 8, "tooltip": "Training resolution in pixels (multiple of 8). 512 for SD1.5."}),
                "seed": ("INT", {"default": _D.seed, "min": 0, "max": 2**31 - 1, "tooltip": "Seed for noise, timesteps and data order: the same seed repeats the same run."}),
            },
            "optional": {
                "train_text_encoder": ("BOOLEAN", {"default": _D.train_text_encoder, "tooltip": "Also train a LoRA on the CLIP text encoder (stronger likeness, more overfitting risk)."}),
                "text_encoder_lr": ("FLOAT", {"default": _D.text_encoder_lr, "min": 0.0, "max": 10.0, "step": 0.00001, "round": False, "tooltip": "Text-encoder learning rate, when it is trained."}),
                "grad_accum": ("INT", {"default": _D.grad_accum, "min": 1, "max": 128, "tooltip": "Gradient accumulation: effective batch = batch_size x grad_accum."}),
                "optimizer": (list(OPTIMIZERS), {"default": _D.optimizer, "tooltip": "adamw; adamw8bit saves memory on CUDA (bitsandbytes); prodigy sets its own step size (use lr 1.0)."}),
                "lr_scheduler": (list(SCHEDULERS), {"default": _D.lr_scheduler, "tooltip": "Learning-rate schedule after warmup."}),
                "warmup_steps": ("INT", {"default": _D.warmup_steps, "min": 0, "max": 10000, "tooltip": "Steps of linear warmup."}),
                "mixed_precision": (list(PRECISIONS), {"default": _D.mixed_precision, "tooltip": "auto: bf16 (or fp16) on a GPU, fp32 on CPU. Trainable weights always stay fp32."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": _D.gradient_checkpointing, "tooltip": "Trade ~30% speed for much less VRAM."}),
                "crop": (list(CROPS), {"default": _D.crop, "tooltip": "center: a fixed square crop; random: a new square window each step (non-square photos)."}),
                "flip": ("BOOLEAN", {"default": _D.flip, "tooltip": "Random horizontal flips. Off for faces/text that are not symmetric."}),
                "min_snr_gamma": ("FLOAT", {"default": _D.min_snr_gamma, "min": 0.0, "max": 20.0, "step": 0.5, "tooltip": "Min-SNR loss weighting (5 is standard; 0 turns it off)."}),
                "noise_offset": ("FLOAT", {"default": _D.noise_offset, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Helps very dark/bright images; 0.05-0.1 when wanted."}),
                "caption_dropout": ("FLOAT", {"default": _D.caption_dropout, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": "Share of steps trained with an empty caption."}),
                "save_every": ("INT", {"default": _D.save_every, "min": 0, "max": 100000, "tooltip": "Write a resumable checkpoint every N steps (0: only at the end or on Cancel)."}),
                "validation_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Optional prompt rendered during training to watch progress, e.g. 'a photo of sks dog on the beach'."}),
                "validation_every": ("INT", {"default": _D.validation_every, "min": 0, "max": 100000, "tooltip": "Render the validation prompt every N steps (0: only at the end)."}),
                "resume": ("BOOLEAN", {"default": _D.resume, "tooltip": "Continue the latest unfinished (cancelled) run of this output name, if it used the same dataset and base model; otherwise a new run starts and the node says why."}),
                "network": (list(NETWORKS), {"default": _D.network, "tooltip": "lora: classic LoRA (LoCon with the locon preset). loha: LyCORIS LoHa, a Hadamard product of two low-rank pairs (more expressive at the same rank). lokr: LyCORIS LoKr, a Kronecker product (very small files). All load with LoraLoader."}),
                "lokr_factor": ("INT", {"default": _D.lokr_factor, "min": -1, "max": 1024, "tooltip": "LoKr only: size of the small Kronecker factor (e.g. 4, 8, 16); -1 picks the most balanced split, as LyCORIS does. 0 is not allowed."}),
                "dataset": ("DATASET", {"tooltip": "A dataset from 'Build Dataset'; overrides dataset_folder."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, ckpt_name, dataset_folder, output_name, dataset=None, unique_id=None, **knobs):
        import torch

        from ..trainers.training.loop import train

        folder = node_dataset(dataset) if dataset is not None else node_folder(dataset_folder, "Dataset folder")
        cfg = TrainConfig(base_model=ckpt_name, dataset=folder, output_name=output_name, **knobs)
        # ComfyUI runs every node under torch.inference_mode(): training needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            result = train(cfg)
        loss_img = result.loss_image()
        lora_name = os.path.relpath(result.lora_path, host.model_dirs("loras")[0]).replace(os.sep, "/")
        valid = pil_to_image(result.validation_image) if result.validation_image is not None else blank_image()
        text = "\n".join([f"{lora_name}: {result.steps} steps, run folder {result.run_dir}", *result.notes])
        return {"ui": {"text": [text]},
                "result": (lora_name, pil_to_image(loss_img), valid)}


NODE_CLASS_MAPPINGS = {"PersonalizeTrainLoRA": TrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeTrainLoRA": "Train LoRA (Personalize)"}
