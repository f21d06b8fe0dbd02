"""DreamBooth (the whole UNet, optionally the text encoder, saved as a checkpoint) and DreamBooth+LoRA (a network,
saved like a LoRA), both with class-prior preservation: each batch joins the instance images with as many class
images, and the loss is instance MSE + prior_loss_weight x class MSE (diffusers' train_dreambooth.py)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..core.modelspec import modelspec
from ..core.dtypes import DTYPES
from ..training.resume import trainable_params
from . import class_images
from .base import Artifact, Batch, TrainingMethod, chosen_text_encoders, save_model_file
from .lora import LoraMethod


class PriorPreservation:
    """The class stream, the joined batch and the split loss; a no-op when `class_prompt` is empty."""

    @property
    def preserves_prior(self) -> bool:
        return bool(self.cfg.class_prompt.strip())

    def streams(self, items, comps, accelerator, device) -> dict:
        """The class images, made (or read) square at the training resolution. A bucketed dataset's batches hold
        one bucket each, so every class image is also prepared at each bucket size (cropped to its aspect,
        scaled to fill it): a batch then joins class latents of its own size."""
        if not self.preserves_prior:
            return {}
        square = (self.cfg.resolution, self.cfg.resolution)
        sizes = sorted({tuple(it.bucket) for it in items if it.bucket and tuple(it.bucket) != square})
        class_items = class_images.class_items(self.cfg, comps, accelerator, device)
        return {"class": class_items + [replace(it, bucket=size) for size in sizes for it in class_items]}

    def batch(self, step, micro, gen, data) -> Batch:
        batch = super().batch(step, micro, gen, data)
        if micro == 0:
            self._parts = {}
        if not self.preserves_prior:
            return batch
        items, latents = data.streams["class"]
        same_size = latents.indices_by_size()[tuple(batch.latents.shape[-2:])]
        n = len(batch.texts)
        # As many class images as instance ones, of the batch's size, drawn from this step's generator (so a
        # resume repeats them).
        picks = [same_size[i] for i in torch.randint(len(same_size), (n,), generator=gen).tolist()]
        class_latents = torch.stack([latents.sample(i, gen) for i in picks])
        weights = torch.tensor([1.0] * n + [self.cfg.prior_loss_weight] * n)
        return Batch(latents=torch.cat([batch.latents, class_latents]),
                     texts=batch.texts + [items[i].caption for i in picks], weights=weights,
                     items=batch.items + [items[i] for i in picks])

    def loss(self, per_sample, batch) -> torch.Tensor:
        """instance mean + prior_loss_weight x class mean (the class part is the batch's second half)."""
        if not self.preserves_prior:
            return super().loss(per_sample, batch)
        n = len(per_sample) // 2
        instance, prior = per_sample[:n].mean(), per_sample[n:].mean()
        for name, value in (("instance_loss", instance), ("prior_loss", prior)):
            self._parts[name] = self._parts.get(name, 0.0) + value.item() / self.cfg.grad_accum
        return instance + self.cfg.prior_loss_weight * prior

    def metrics(self) -> dict:
        """The instance and prior losses of the last step (this process's share, mean over its micro-steps)."""
        return dict(getattr(self, "_parts", {}))


class DreamBoothMethod(PriorPreservation, TrainingMethod):
    """The whole UNet (and the text encoder when asked) trains; saved as a checkpoint in models/checkpoints."""

    name = "dreambooth"

    def trained_text_encoders(self, comps) -> list:
        return chosen_text_encoders(self.cfg, comps)

    def setup(self, comps) -> list[dict]:
        comps.vae.requires_grad_(False)
        comps.unet.requires_grad_(True)
        groups = [{"params": list(comps.unet.parameters()), "lr": self.cfg.unet_lr}]
        trained = chosen_text_encoders(self.cfg, comps)
        for encoder in comps.text_encoders:
            encoder.requires_grad_(any(encoder is t for t in trained))
        for encoder in trained:
            groups.append({"params": list(encoder.parameters()), "lr": self.cfg.text_encoder_lr})
        # The EMA starts from the base weights, as diffusers' EMAModel does; it follows them to their device.
        self._ema = {k: p.detach().clone().float() for k, p in trainable_params(comps).items()} \
            if self.cfg.ema_decay else None
        return groups

    def after_step(self, comps) -> None:
        if self._ema is None:
            return
        live = trainable_params(comps)
        for name, p in live.items():
            if self._ema[name].device != p.device:
                self._ema[name] = self._ema[name].to(p.device)
        with torch.no_grad():
            torch._foreach_lerp_([self._ema[k] for k in live], [p.detach() for p in live.values()],
                                 1.0 - self.cfg.ema_decay)

    def trainable_state(self, comps) -> dict:
        """The trained weights, and their EMA (restored in place on resume like the weights)."""
        ema = {f"ema.{k}": v for k, v in (self._ema or {}).items()}
        return {**super().trainable_state(comps), **ema}

    def export(self, comps, family, *, captions, dataset_dir, steps, started) -> Artifact:
        from ..families.checkpoint_save import checkpoint_tensors
        from ..families.ldm_keys import config_hints

        cfg = self.cfg
        if self._ema is not None:  # the EMA is what is saved
            with torch.no_grad():
                for name, p in trainable_params(comps).items():
                    p.copy_(self._ema[name])
        trained = tuple(name for name, model in comps.named_models()  # the UNet and the encoders that trained
                        if any(p.requires_grad for p in model.parameters()))
        tensors = checkpoint_tensors(comps, trained, DTYPES[cfg.save_precision])
        meta = {
            **config_hints(comps),
            **modelspec(family.architecture, cfg.output_name, started, resolution=f"{cfg.resolution}x{cfg.resolution}"),
            "personalize.method": self.name,
            "personalize.trained": ",".join(trained),
            "personalize.trigger_word": cfg.trigger_word,
            "personalize.instance_prompt": cfg.instance_prompt,
            "personalize.class_prompt": cfg.class_prompt,
            "personalize.prior_loss_weight": str(cfg.prior_loss_weight),
            "personalize.ema_decay": str(cfg.ema_decay),
            "personalize.steps": str(steps),
            "personalize.images": str(len(captions)),
            "personalize.base_model": comps.info.get("name", ""),
            "personalize.base_model_sha256": comps.info.get("sha256", ""),
        }
        if cfg.trigger_word:
            meta["modelspec.trigger_phrase"] = cfg.trigger_word
        return Artifact("checkpoint", save_model_file("checkpoints", cfg, "dreambooth", tensors, meta))


class DreamBoothLoraMethod(PriorPreservation, LoraMethod):
    """A network (LoRA, LoHa, LoKr) trained with prior preservation; saved like the LoRA method's file."""

    name = "dreambooth_lora"
