"""A short LoRA run pinned to numbers recorded on 2026-11-25 (torch 2.13 CPU): the engine's reshaping must
keep the same loss curve and the same weights for the same seed. Tolerances allow another CPU's float
rounding (about 1e-6 relative), not another noise draw, batch order or loss (changes of 1e-2 and more)."""
import pytest
import torch
from safetensors.torch import load_file

from test_train_lora import cfg_for, env, fresh  # noqa: F401 (fixtures)
from trainers.training.loop import train

PINNED_LOSSES = [1.1631472, 1.2684146, 1.066144, 0.7257657, 1.0514386, 1.1085771]
PINNED_ABS_SUM = 1053.2607159372697  # sum of |w| over every tensor of the saved fp32 LoRA


def test_a_short_lora_run_keeps_its_pinned_curve_and_weights(env, fresh):
    cfg = cfg_for(env, output_name="pinned", preset="kohya", train_text_encoder=True, lr_scheduler="cosine",
                  warmup_steps=1, noise_offset=0.05, flip=True, caption_dropout=0.2, save_precision="fp32")
    result = train(cfg, components=fresh())
    assert [r["loss"] for r in result.log] == pytest.approx(PINNED_LOSSES, rel=1e-4)
    tensors = load_file(result.lora_path)
    assert float(sum(v.double().abs().sum() for v in tensors.values())) == pytest.approx(PINNED_ABS_SUM, rel=1e-5)
    assert all(v.dtype == torch.float32 for v in tensors.values())
