"""The class images of prior preservation: a folder the user gives, or a set the frozen base model generates.

A generated set lives in output/personalize/class_images/<key>/, the key a hash of what decides its pictures
(base model sha256, class prompt, resolution, sampler steps, seed). Image i always comes from seed + i, so a set
stopped part-way (Cancel, a crash) resumes where it stopped, and a later run asking for more images keeps the
ones already made. Each image is written to a temp name and renamed: a listed file is always complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

from ..core import host
from ..data.errors import DatasetError
from ..data.images import list_images
from ..data.items import TrainItem

log = logging.getLogger("personalize")

def class_items(cfg, comps, accelerator, device) -> list[TrainItem]:
    """`cfg.num_class_images` class images, each with the class prompt as its caption."""
    if cfg.class_images:  # a node has already checked it against the server's folders
        paths = _folder_images(cfg.class_images, cfg.num_class_images)
    else:
        folder = generated_folder(cfg, comps)
        if accelerator.is_main_process:
            generate(cfg, comps, folder, device, accelerator.mixed_precision)
        accelerator.wait_for_everyone()  # the other processes read what the main one made
        paths = [_image_path(folder, i) for i in range(cfg.num_class_images)]
    return [TrainItem(path, cfg.class_prompt) for path in paths]


def _folder_images(folder: str, count: int) -> list[str]:
    paths, _ = list_images(folder)
    if not paths:
        raise DatasetError(f"Class images folder '{folder}' has no image. Put class images there (e.g. 100 "
                           f"photos of the class), or leave class_images empty to generate them.")
    if len(paths) < count:
        log.warning("Class images folder %s has %d images; num_class_images is %d: using the %d there.",
                    folder, len(paths), count, len(paths))
    return paths[:count]


def generated_folder(cfg, comps) -> str:
    """Where the generated set for these settings lives (the same for every run that would make the same images)."""
    recipe = {"base_model_sha256": comps.info.get("sha256", "") or comps.source, "prompt": cfg.class_prompt,
              "resolution": cfg.resolution, "steps": cfg.class_sample_steps, "seed": cfg.seed}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(host.output_dir(), "personalize", "class_images", key)
    os.makedirs(folder, exist_ok=True)
    recipe_path = os.path.join(folder, "recipe.json")
    if not os.path.exists(recipe_path):
        with open(recipe_path, "w", encoding="utf-8") as f:
            json.dump(recipe, f, indent=1)
    return folder


def _image_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def generate(cfg, comps, folder: str, device, mixed_precision: str = "no") -> int:
    """Make the missing images of the set with the frozen base, `cfg.class_sample_batch` per sampler call (bounded
    memory; Cancel is checked between calls); returns how many were made."""
    from ..core.dtypes import sampling_dtype
    from ..training.validation import sample_images

    missing = [i for i in range(cfg.num_class_images) if not os.path.isfile(_image_path(folder, i))]
    if not missing:
        return 0
    dtype = sampling_dtype(cfg.class_precision, device, mixed_precision)
    log.info("generating %d class images for '%s' in %s (%s)", len(missing), cfg.class_prompt, folder,
             str(dtype).removeprefix("torch."))
    bar = host.Progress(len(missing))
    unet_device = comps.unet.device
    comps.unet.to(device)
    try:
        for start in range(0, len(missing), cfg.class_sample_batch):
            chunk = missing[start:start + cfg.class_sample_batch]
            images = sample_images(comps, comps.unet, [cfg.class_prompt] * len(chunk), [cfg.seed + i for i in chunk],
                                   resolution=cfg.resolution, steps=cfg.class_sample_steps, device=device,
                                   dtype=dtype)
            for index, image in zip(chunk, images):
                path = _image_path(folder, index)
                image.save(path + ".part", format="PNG")
                os.replace(path + ".part", path)
            bar.update(start + len(chunk), text=f"class images {start + len(chunk)}/{len(missing)}")
            host.check_interrupt()
    finally:
        comps.unet.to(unet_device)
    return len(missing)
