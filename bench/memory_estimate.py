"""Training memory of SD1.5 at 512 px and SDXL at 1024 px, per preset, estimated without a GPU.

The full-size SD1.5 UNet (859.5M parameters), SDXL UNet (2.57B) and CLIP-L text encoder are built from their real configs as fake
tensors (no memory, no arithmetic), and one training step after another runs as the trainer runs it: trained
weights fp32, frozen ones in the compute dtype, bf16 autocast, gradient checkpointing as chosen, fused AdamW,
latents and (frozen) text-encoder outputs cached so the VAE and text encoder sit in CPU memory, a batch of one
photo + one class image. Every tensor's storage is counted from its creation until it is freed, so the peak is
what the tensors need on the GPU at the worst moment of a step. Not counted: the CUDA context (about 0.3-0.5 GB),
the caching allocator's slack, cuBLAS/cuDNN workspaces. 8-bit AdamW (bitsandbytes) cannot run on fake tensors:
its row swaps AdamW's 8 bytes of state per trained parameter for 2 (+ one fp32 scale per 256 values), counted
from the AdamW run.

    python bench/memory_estimate.py
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2 ** 30
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive now, and the most alive at once since `peak` was last reset."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args, kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.count(item)
        return out


def estimate(method: str, *, train_te: bool = False, checkpointing: bool = True, rank: int = 8, batch: int = 2,
             resolution: int = 512, sdxl: bool = False) -> dict:
    """Peak GiB of one step (the second: the optimizer state exists by then) and the trained parameter count."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPTextConfig, CLIPTextModel

    with FakeTensorMode():
        unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET))
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L)) if train_te else None
        if method == "lora":
            from unittest import mock

            from peft import LoraConfig, inject_adapter_in_model

            unet.requires_grad_(False)
            # Everything is on the (fake) CPU in fp32 already; peft's moves to the base layer's device cannot
            # swap fake parameters, so they are skipped.
            with mock.patch.object(torch.nn.Module, "to", lambda self, *args, **kwargs: self):
                inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=[
                    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]), unet)
        trained = [p for m in (unet, te) if m is not None for p in m.parameters() if p.requires_grad]
        for m in (unet, te):  # frozen weights in the compute dtype, trained ones fp32 (as the trainer casts)
            for p in (m.parameters() if m is not None else ()):
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        if checkpointing:
            unet.enable_gradient_checkpointing()
            if te is not None:
                te.gradient_checkpointing_enable()
        meter = LiveBytes()
        for m in (unet, te):
            for t in (list(m.parameters()) + list(m.buffers()) if m is not None else ()):
                meter.count(t)
        optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True)
        latent = resolution // 8
        with meter:
            for _ in range(2):
                meter.peak = meter.now
                x = torch.randn(batch, 4, latent, latent)
                if te is not None:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        cond = te(torch.zeros(batch, 77, dtype=torch.long)).last_hidden_state
                else:  # the cached outputs (SDXL: both encoders' states, the pooled text, the size ids)
                    cond = torch.randn(batch, 77, 2048 if sdxl else 768, dtype=torch.bfloat16)
                extra = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280, dtype=torch.bfloat16),
                                               "time_ids": torch.zeros(batch, 6)}} if sdxl else {}
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    pred = unet(x, torch.full((batch,), 500), cond, **extra).sample
                torch.nn.functional.mse_loss(pred.float(), x).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        params = sum(p.numel() for p in trained)
        return {"peak": meter.peak / GIB, "adam_state": 8 * params / GIB, "params": params}


def main():
    torch.set_num_threads(1)
    rows = [("dreambooth, UNet", dict(method="full")),
            ("dreambooth, UNet + text encoder", dict(method="full", train_te=True)),
            ("dreambooth, UNet, no gradient checkpointing", dict(method="full", checkpointing=False)),
            ("dreambooth_lora rank 8, UNet attention", dict(method="lora"))]
    rows += [("SDXL 1024 px, LoRA rank 8, UNet only, batch 1",
              dict(method="lora", sdxl=True, batch=1, resolution=1024)),
             ("SDXL 1024 px, LoRA rank 8, no gradient checkpointing",
              dict(method="lora", sdxl=True, batch=1, resolution=1024, checkpointing=False)),
             ("SDXL 1024 px, dreambooth, UNet, batch 1 + 1", dict(method="full", sdxl=True, resolution=1024))]
    print("SD1.5 at 512 px, batch 1 photo + 1 class image (SDXL rows as labelled), bf16 autocast, fp32 trained "
          "weights, gradient checkpointing unless said; peak tensor memory of a step on the GPU (GiB)")
    print(f"{'preset':48s} {'trained params':>15s} {'AdamW':>8s} {'AdamW8bit':>10s}")
    for label, kw in rows:
        r = estimate(**kw)
        eight_bit = r["peak"] - r["adam_state"] + r["params"] * (2 + 4 / 256) / GIB
        print(f"{label:48s} {r['params'] / 1e6:13.1f} M {r['peak']:8.2f} {eight_bit:10.2f}")


if __name__ == "__main__":
    main()
