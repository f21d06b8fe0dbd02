"""SDXL as a family (families/registry.py SDXL): two text encoders, pooled text and size ids, trained through the
same loop and methods as SD1.x, on a tiny random SDXL-layout model."""
import copy
import os

import pytest
import torch
from safetensors import safe_open

from test_train_lora import cfg_for, env  # noqa: F401 (fixtures)
from trainers.data.items import TrainItem
from trainers.families import ldm_keys
from trainers.families.registry import get_family, size_ids
from trainers.testing.toy_models import build_sdxl
from trainers.training.loop import train

SDXL = get_family("sdxl")


@pytest.fixture(scope="module")
def toy_sdxl(toy_tokenizer_dir):
    return build_sdxl("tiny", tokenizer_dir=toy_tokenizer_dir)


@pytest.fixture
def fresh_xl(toy_sdxl):
    return lambda: copy.deepcopy(toy_sdxl)


class FakeBatch:
    def __init__(self, latents, items):
        self.latents, self.items = latents, items


def test_conditioning_joins_both_encoders_penultimate_states_and_the_pooled_projection(toy_sdxl):
    texts = ["a photo of sks dog", "x"]
    cond = SDXL.encode(toy_sdxl, texts)
    assert cond.states.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    with torch.no_grad():
        parts = []
        for encoder, tokenizer in zip(toy_sdxl.text_encoders, toy_sdxl.tokenizers):
            ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            parts.append(out.hidden_states[-2])
        assert torch.equal(cond.states, torch.cat(parts, -1))
        assert torch.equal(cond.pooled, out.text_embeds)
    assert toy_sdxl.tokenizer_2.pad_token == "!" and toy_sdxl.tokenizer.pad_token != "!"


def test_size_ids_follow_each_images_source_and_crop():
    photo = TrainItem("a.png", "", original_size=(2000, 1500), crop_box=(250, 0, 1750, 1500))
    assert size_ids(photo, (512, 512)) == [1500, 2000, 0, 85, 512, 512]  # 250 px at the 512/1500 scale
    assert size_ids(TrainItem("b.png", ""), (640, 384)) == [640, 384, 0, 0, 640, 384]
    cond = SDXL.encode(build_sdxl("tiny"), ["a", "b"])
    kwargs = SDXL.unet_kwargs(cond, FakeBatch(torch.zeros(2, 4, 8, 12), [photo, TrainItem("b.png", "")]))
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[1500, 2000, 0, 16, 64, 96], [64, 96, 0, 0, 64, 96]]
    assert kwargs["added_cond_kwargs"]["text_embeds"] is cond.pooled


def test_lora_on_both_encoders_trains_and_every_key_names_an_sgm_module(env, fresh_xl):
    result = train(cfg_for(env, steps=3, train_text_encoder=True, preset="kohya", text_encoder_lr=1e-3),
                   components=fresh_xl())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log)
    with safe_open(result.lora_path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    toy = build_sdxl("tiny")
    sgm = {"lora_unet_" + name.replace(".", "_") for name in
           {v.rsplit(".", 1)[0] for v in ldm_keys.unet_diffusers_to_ldm(toy.unet.config).values()}}
    te1 = {"lora_te1_" + n.replace(".", "_") for n, _ in toy.text_encoder.named_modules()}
    te2 = {"lora_te2_" + n.replace(".", "_") for n, _ in toy.text_encoder_2.named_modules()}
    te1 |= {"lora_te1_text_model_" + n.replace(".", "_") for n, _ in toy.text_encoder.named_modules()}
    te2 |= {"lora_te2_text_model_" + n.replace(".", "_") for n, _ in toy.text_encoder_2.named_modules()}
    assert stems <= sgm | te1 | te2, sorted(stems - sgm - te1 - te2)[:5]
    assert {s.split("_")[1] for s in stems} == {"unet", "te1", "te2"}
    assert any("input_blocks_" in s and "transformer_blocks_1" in s for s in stems)  # the deeper level
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-xl-v1-base")


def test_a_few_lora_steps_lower_the_denoising_loss_on_the_images(env, fresh_xl):
    from trainers.data.caches import LatentCache
    from trainers.data.items import scan_folder
    from trainers.evaluate.denoising import denoising_loss

    comps = fresh_xl()
    items = scan_folder(env["photos"], trigger_word="sks")
    latents = LatentCache.build(items, comps.vae, 64).sample_batch(range(len(items)), torch.Generator().manual_seed(0))
    texts = [it.caption for it in items]
    before = denoising_loss(comps, latents, texts)
    train(cfg_for(env, steps=80, preset="locon", rank=8, alpha=8, unet_lr=3e-3, batch_size=2, min_snr_gamma=0),
          components=comps)
    after = denoising_loss(comps, latents, texts)
    assert after < 0.7 * before, (before, after)
