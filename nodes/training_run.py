"""What every trainer node shares: the dataset input, running the engine under autograd, and the outputs."""
from __future__ import annotations

import os

from ..trainers.core import host
from ..trainers.core.config import TrainConfig
from .convert import blank_image, pil_to_image
from .paths import node_dataset, node_folder

class TrainerNode:
    """What every trainer node shares on the canvas; each adds its widgets, outputs and `train`."""
    CATEGORY = "Personalize/train"
    FUNCTION = "train"
    OUTPUT_NODE = True


def base_inputs() -> dict:
    """The first two widgets of every trainer: the base checkpoint and the folder of photos."""
    return {
        "ckpt_name": (host.list_models("checkpoints"), {"tooltip": "SD1.x or SDXL base checkpoint from "
                                                                   "models/checkpoints."}),
        "dataset_folder": ("STRING", {"default": "", "tooltip": "Folder of training photos; a `name.txt` beside an "
                                      "image is its caption. Relative paths are inside ComfyUI's input folder."}),
    }


DATASET_INPUT = ("DATASET", {"tooltip": "A dataset from 'Build Dataset'; overrides dataset_folder."})
OWN_VAE = "(checkpoint's own)"


def vae_input() -> dict:
    """The last widget of every trainer: a VAE from models/vae instead of the checkpoint's own."""
    from ..trainers.core.config import widget

    tooltip = widget("vae")[1]["tooltip"]
    return {"vae_name": ([OWN_VAE] + host.list_models("vae"), {"default": OWN_VAE, "tooltip": tooltip})}


def run_training(ckpt_name: str, dataset_folder: str, dataset, **settings):
    """Train with these settings; returns (name of the file in its model folder, result, ComfyUI outputs)."""
    import torch

    from ..trainers.training.loop import train

    folder = node_dataset(dataset) if dataset is not None else node_folder(dataset_folder, "Dataset folder")
    vae = settings.pop("vae_name", OWN_VAE)
    settings["vae"] = "" if vae == OWN_VAE else vae
    cfg = TrainConfig(base_model=ckpt_name, dataset=folder, **settings)
    # ComfyUI runs every node under torch.inference_mode(): training needs autograd back.
    with torch.inference_mode(False), torch.enable_grad():
        result = train(cfg)
    kind = result.artifact.kind
    name = os.path.relpath(result.artifact.path, host.model_dirs(FOLDERS[kind])[0]).replace(os.sep, "/")
    valid = pil_to_image(result.validation_image) if result.validation_image is not None else blank_image()
    text = "\n".join([f"{name}: {result.steps} steps, run folder {result.run_dir}", *result.notes])
    # "run": the run folder's name, for the canvas's link to its files (web/live.js)
    return name, {"text": [text], "run": [os.path.basename(result.run_dir)]}, pil_to_image(result.loss_image()), valid


FOLDERS = {"lora": "loras", "embedding": "embeddings", "checkpoint": "checkpoints"}  # artifact kind -> the ComfyUI model folder it is in
