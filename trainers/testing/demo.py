"""A complete run without ComfyUI or downloads: a tiny model and photos made locally, a LoRA, a report.

    python -m trainers demo --out demo_out
"""
from __future__ import annotations

import os
import random
import time

from PIL import Image, ImageDraw

BACKGROUNDS = [("beach", (230, 210, 160)), ("forest", (40, 110, 50)), ("kitchen", (200, 200, 210)),
               ("street", (90, 90, 100)), ("snow", (245, 245, 250)), ("desk", (140, 100, 60))]


def make_photos(folder: str, count: int = 6, size: int = 256, seed: int = 0) -> str:
    """Photos of one 'subject' (a striped ball) in different places, each with a caption file."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        place, color = BACKGROUNDS[i % len(BACKGROUNDS)]
        img = Image.new("RGB", (size + rng.randint(0, size // 2), size), color)
        draw = ImageDraw.Draw(img)
        for _ in range(12):  # background clutter
            x, y = rng.randrange(img.width), rng.randrange(img.height)
            shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in color)
            draw.rectangle([x, y, x + rng.randint(4, size // 4), y + rng.randint(4, size // 4)], fill=shade)
        r = size // 4
        cx, cy = img.width // 2 + rng.randint(-r // 2, r // 2), size // 2 + rng.randint(-r // 2, r // 2)
        for k, stripe in enumerate((r, r * 3 // 4, r // 2, r // 4)):
            draw.ellipse([cx - stripe, cy - stripe, cx + stripe, cy + stripe],
                         fill=(220, 30, 30) if k % 2 == 0 else (250, 210, 40))
        img.save(os.path.join(folder, f"photo_{i:02d}.jpg"), quality=92)
        with open(os.path.join(folder, f"photo_{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"a photo of a ball on a {place}")
    return folder


def run_demo(out: str, steps: int = 120) -> str:
    import torch

    from ..core import host
    from ..core.config import TrainConfig
    from ..data import caches, items as data_items
    from ..evaluate.denoising import denoising_loss
    from ..families.model_loading import load_sd_components
    from ..networks import lora as lora_network
    from ..training.loop import train
    from .toy_models import build_sd1, save_single_file

    out = os.path.abspath(out)
    host.configure(models_dir=os.path.join(out, "models"), output_dir=os.path.join(out, "output"))
    t0 = time.time()
    ckpt = os.path.join(host.model_dirs("checkpoints")[0], "toy-sd1.safetensors")
    tok = os.path.join(host.model_dirs("clip")[0], "tokenizer")
    if not os.path.exists(ckpt):
        save_single_file(build_sd1("tiny", tokenizer_dir=tok), ckpt)
    photos = make_photos(os.path.join(out, "photos"))
    cfg = TrainConfig(base_model="toy-sd1.safetensors", dataset=photos, output_name="demo_ball", trigger_word="sks",
                      preset="kohya", rank=8, alpha=8, steps=steps, unet_lr=1e-3, resolution=64, batch_size=2,
                      lr_scheduler="constant", warmup_steps=0, save_every=max(1, steps // 2),
                      validation_prompt="a photo of sks ball on the moon", validation_every=0,
                      validation_steps=10, resume=False)
    result = train(cfg)

    # Base vs trained on the training photos, with the file as ComfyUI would load it.
    from safetensors.torch import load_file

    items = data_items.scan_folder(photos, trigger_word="sks")
    base = load_sd_components(ckpt)
    with torch.no_grad():
        lat = caches.LatentCache.build(items, base.vae, 64)
        latents = torch.stack([lat.sample(i, torch.Generator().manual_seed(0)) for i in range(len(items))])
    texts = [it.caption for it in items]
    before = denoising_loss(base, latents, texts)
    lora_network.attach(base.unet, lora_network.unet_targets(base.unet, cfg.preset), cfg.rank, cfg.alpha)
    unused = lora_network.load_kohya(load_file(result.lora_path), base.unet)
    after = denoising_loss(base, latents, texts)

    report_dir = result.run_dir
    result.loss_image().save(os.path.join(report_dir, "loss.png"))
    lines = [
        "# Personalize demo",
        f"- base model: {ckpt} (tiny random SD1.x built locally)",
        f"- photos: {len(items)} in {photos}",
        f"- LoRA: {result.lora_path} ({len(load_file(result.lora_path))} tensors, {len(unused)} unused keys)",
        f"- steps: {result.steps}; loss first {result.log[0]['loss']:.4f} -> last {result.log[-1]['loss']:.4f}",
        f"- denoising loss on the training photos: base {before:.4f} -> with LoRA {after:.4f} "
        f"({(1 - after / before) * 100:.1f}% lower)",
        f"- run folder: {report_dir} (config.json, log.jsonl, checkpoints/, samples/, loss.png)",
        f"- time: {time.time() - t0:.1f} s",
    ]
    report = "\n".join(lines)
    with open(os.path.join(report_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report + "\n")
    return report
