"""DreamBooth and DreamBooth+LoRA on the tiny SD1.x model: prior preservation, class images, the checkpoint file."""
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_train_lora import cfg_for, env, fresh, interrupt_at, lora_files  # noqa: F401 (fixtures)
from test_training_contract import assert_same_tensors
from trainers.core import host
from trainers.families.model_loading import load_sd_components
from trainers.methods import class_images
from trainers.training import objective, validation
from trainers.training.loop import train

CLASS = "a photo of a ball"


def db_cfg(env, **kw):
    settings = dict(method="dreambooth", unet_lr=1e-4, class_prompt=CLASS, num_class_images=3,
                    class_sample_steps=2, output_name="db", save_precision="fp32")
    settings.update(kw)
    return cfg_for(env, **settings)


def class_folders(env):
    root = env["root"] / "output" / "personalize" / "class_images"
    return sorted(root.iterdir()) if root.exists() else []


@pytest.fixture
def sampled(monkeypatch):
    """Counts the class images the base model generates."""
    calls, real = [], validation.sample_images

    def spy(comps, unet, prompts, seeds, **kw):
        calls.append(list(seeds))
        return real(comps, unet, prompts, seeds, **kw)

    monkeypatch.setattr(validation, "sample_images", spy)
    return calls


def test_prior_loss_is_the_weighted_class_half_of_the_batch(env, fresh, monkeypatch, sampled):
    seen = []
    real = objective.diffusion_loss

    def spy(cfg, unet, family, scheduler, alphas, latents, cond, batch, gen, device):
        per_sample = real(cfg, unet, family, scheduler, alphas, latents, cond, batch, gen, device)
        seen.append((list(batch.texts), batch.weights.tolist(), per_sample.detach()))
        return per_sample

    monkeypatch.setattr(objective, "diffusion_loss", spy)
    result = train(db_cfg(env, steps=3, batch_size=2, prior_loss_weight=0.5), components=fresh())
    assert len(seen) == 3
    for (texts, weights, per_sample), record in zip(seen, result.log):
        assert [t.startswith("sks") for t in texts] == [True, True, False, False]
        assert texts[2:] == [CLASS, CLASS] and weights == [1.0, 1.0, 0.5, 0.5]
        instance, prior = per_sample[:2].mean().item(), per_sample[2:].mean().item()
        assert record["instance_loss"] == pytest.approx(instance, rel=1e-6)
        assert record["prior_loss"] == pytest.approx(prior, rel=1e-6)
        assert record["loss"] == pytest.approx(instance + 0.5 * prior, rel=1e-5)
    assert sum(len(s) for s in sampled) == 3  # the three class images, generated once


def test_class_images_are_cached_reused_and_a_partial_set_resumes(env, fresh, sampled):
    # fp32 throughout: an image is the same whatever batch makes it (half precision may differ in the last bits)
    train(db_cfg(env, class_precision="fp32", steps=1), components=fresh())
    (folder,) = class_folders(env)
    images = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    assert images == ["000000.png", "000001.png", "000002.png"] and sampled == [[42, 43, 44]]
    first = (folder / "000001.png").read_bytes()

    train(db_cfg(env, class_precision="fp32", steps=1, output_name="db_again", resume=False), components=fresh())
    assert sampled == [[42, 43, 44]]  # the same settings reuse the set

    os.remove(folder / "000001.png")  # as if stopped part-way
    train(db_cfg(env, class_precision="fp32", steps=1, output_name="db_third", num_class_images=4), components=fresh())
    assert sampled[1:] == [[43, 45]]  # only the missing ones, each from its own seed
    assert (folder / "000001.png").read_bytes() == first
    assert class_folders(env) == [folder]

    train(db_cfg(env, class_precision="fp32", steps=1, output_name="db_other", class_prompt="a photo of a cup"),
          components=fresh())
    assert len(class_folders(env)) == 2  # another prompt, another set


def test_cancel_while_generating_keeps_the_finished_images(env, fresh, monkeypatch, sampled):
    real = host.check_interrupt
    calls = {"n": 0}

    def cancel_after_two():
        calls["n"] += 1
        if calls["n"] == 2:
            host.request_interrupt()
        real()

    monkeypatch.setattr(host, "check_interrupt", cancel_after_two)
    with pytest.raises(host.Interrupted):
        train(db_cfg(env, steps=2, class_sample_batch=1), components=fresh())
    (folder,) = class_folders(env)
    assert sorted(p for p in os.listdir(folder) if p.endswith(".png")) == ["000000.png", "000001.png"]
    assert not [p for p in os.listdir(folder) if p.endswith(".part")]
    assert not (env["root"] / "output" / "personalize" / "runs" / "db").exists()  # no empty run folder is left
    monkeypatch.setattr(host, "check_interrupt", real)
    result = train(db_cfg(env, steps=2, class_sample_batch=1), components=fresh())
    assert sampled == [[42], [43], [44]]
    assert os.path.basename(result.run_dir) == "db"  # queued again: the same name


def test_class_images_sample_in_the_chosen_precision(env, fresh, monkeypatch):
    from PIL import Image

    seen = []

    def spy(comps, unet, prompts, seeds, **kw):
        seen.append((kw["dtype"], next(unet.parameters()).dtype))
        return [Image.new("RGB", (32, 32))] * len(prompts)

    monkeypatch.setattr(validation, "sample_images", spy)
    train(db_cfg(env, steps=1, class_precision="bf16"), components=fresh())
    assert seen == [(torch.bfloat16, torch.float32)]  # autocast: the weights stay fp32


def test_sampling_dtype_follows_the_device():
    from trainers.core import dtypes

    assert dtypes.sampling_dtype("auto", "cuda") == torch.float16
    assert dtypes.sampling_dtype("auto", "cuda", "bf16") == torch.bfloat16
    assert dtypes.sampling_dtype("fp16", "cpu") == torch.float32  # emulated on a CPU: fp32 instead
    assert dtypes.sampling_dtype("fp32", "cuda") == torch.float32
    assert dtypes.sampling_dtype("auto", "cpu") == (torch.bfloat16 if dtypes._native_cpu_bf16() else torch.float32)


@pytest.fixture(scope="module")
def fp16_checkpoint(toy_sd1, tmp_path_factory):
    """The toy model as an fp16 file, as most SD1.5 downloads are (so a copied tensor and a converted one differ)."""
    from trainers.testing.toy_models import save_single_file

    return save_single_file(toy_sd1, str(tmp_path_factory.mktemp("fp16") / "toy_fp16.safetensors"),
                            dtype=torch.float16)


@pytest.mark.parametrize("with_te", [False, True])
def test_checkpoint_keeps_untrained_tensors_bit_exact_and_reloads(env, fp16_checkpoint, toy_tokenizer_dir, with_te):
    comps = load_sd_components(fp16_checkpoint, tokenizer_dir=toy_tokenizer_dir)
    base_te = {k: v.clone() for k, v in comps.text_encoder.state_dict().items()}
    result = train(db_cfg(env, steps=2, train_text_encoder=with_te, text_encoder_lr=1e-3), components=comps)
    assert result.artifact.kind == "checkpoint"
    assert result.artifact.path == str(env["root"] / "models" / "checkpoints" / "db.safetensors")
    changed = any(not torch.equal(v, base_te[k]) for k, v in comps.text_encoder.state_dict().items())
    assert changed == with_te  # the text encoder changes only when it is trained

    saved, base = load_file(result.artifact.path), load_file(fp16_checkpoint)
    for key, tensor in base.items():
        trained = key.startswith("model.diffusion_model.") or (with_te and key.startswith("cond_stage_model."))
        if not trained:
            assert torch.equal(saved[key], tensor) and saved[key].dtype == tensor.dtype, key
    unet_keys = [k for k in base if k.startswith("model.diffusion_model.")]
    assert all(saved[k].dtype == torch.float32 for k in unet_keys)  # trained: in save_precision
    assert any(not torch.equal(saved[k].half(), base[k]) for k in unet_keys)
    with safe_open(result.artifact.path, "pt") as f:
        meta = f.metadata()
    assert meta["personalize.method"] == "dreambooth" and meta["personalize.class_prompt"] == CLASS
    assert meta["personalize.base_model_sha256"] == comps.info["sha256"]

    reloaded = load_sd_components(result.artifact.path, tokenizer_dir=toy_tokenizer_dir)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 2, 3] + [0] * 74])
    with torch.no_grad():
        outs = [c.unet.eval()(x, torch.tensor([500]), c.text_encoder(ids)[0]).sample for c in (comps, reloaded)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_ema_of_the_weights_is_saved_and_resumes(env, toy_checkpoint, toy_tokenizer_dir):
    load = lambda: load_sd_components(toy_checkpoint, tokenizer_dir=toy_tokenizer_dir)  # noqa: E731
    comps, decay = load(), 0.6
    ema = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    seen = []

    def after_each_step(step, total, loss):  # the weights after each optimizer step
        seen.append({k: v.detach().clone() for k, v in comps.unet.state_dict().items()})

    cfg = dict(class_prompt="", steps=4, unet_lr=1e-3, ema_decay=decay)
    straight = train(db_cfg(env, output_name="ema", **cfg), components=comps, progress=after_each_step)
    for weights in seen:
        ema = {k: e + (1 - decay) * (weights[k] - e) for k, e in ema.items()}
    saved = load_sd_components(straight.artifact.path, tokenizer_dir=toy_tokenizer_dir).unet.state_dict()
    for k, expected in ema.items():
        torch.testing.assert_close(saved[k], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(saved[k], seen[-1][k]) for k in saved)  # the EMA, not the last weights

    cut = db_cfg(env, output_name="ema_cut", **cfg)
    with pytest.raises(host.Interrupted):
        train(cut, components=load(), progress=interrupt_at(2))
    resumed = train(cut, components=load())
    assert_same_tensors(load_file(resumed.artifact.path), load_file(straight.artifact.path))


def test_dreambooth_lora_saves_a_lora_and_logs_both_losses(env, fresh, sampled):
    result = train(db_cfg(env, method="dreambooth_lora", unet_lr=1e-3, steps=2, output_name="dbl"), components=fresh())
    assert result.artifact.kind == "lora" and lora_files(env) == ["dbl.safetensors"]
    assert all({"instance_loss", "prior_loss"} <= set(r) for r in result.log)
    assert sum(len(s) for s in sampled) == 3


def test_loss_curve_shows_the_instance_and_prior_loss(env, fresh):
    import numpy as np

    from trainers.training.plots import _SERIES_COLOURS

    def has(image, colour):
        return bool((np.asarray(image) == np.array(colour)).all(axis=-1).any())

    split = train(db_cfg(env, steps=4), components=fresh()).loss_image()
    plain = train(db_cfg(env, class_prompt="", steps=4, output_name="plain"), components=fresh()).loss_image()
    assert all(has(split, c) for c in _SERIES_COLOURS[:2]) and not any(has(plain, c) for c in _SERIES_COLOURS[:2])


def test_a_bucketed_dataset_joins_class_latents_of_each_batchs_size(env, fresh, sampled, tmp_path, monkeypatch):
    from test_dataset_build import _bucket_folder, build

    dataset = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    seen = []
    real = objective.diffusion_loss

    def spy(cfg, unet, family, scheduler, alphas, latents, cond, batch, gen, device):
        seen.append((tuple(latents.shape), [it.path for it in batch.items[len(batch.items) // 2:]]))
        return real(cfg, unet, family, scheduler, alphas, latents, cond, batch, gen, device)

    monkeypatch.setattr(objective, "diffusion_loss", spy)
    result = train(db_cfg(env, dataset=dataset.path, trigger_word="", resolution=64, steps=8, batch_size=1),
                   components=fresh())
    assert sampled == [[42, 43, 44]]  # made once, square; each is also fitted to the other buckets
    (folder,) = class_folders(env)
    shapes = {shape[-2:] for shape, _ in seen}
    assert shapes >= {(10, 6), (6, 10)}, shapes  # 80x48 and 48x80 batches...
    for shape, class_paths in seen:  # ...each with its class half at its own size, from the generated set
        assert shape[0] == 2 and all(os.path.dirname(p) == str(folder) for p in class_paths)
    assert all(math.isfinite(r["prior_loss"]) for r in result.log)


def test_without_a_class_prompt_dreambooth_is_plain_fine_tuning(env, fresh, sampled):
    result = train(db_cfg(env, class_prompt="", steps=2), components=fresh())
    assert sampled == [] and class_folders(env) == []
    assert "prior_loss" not in result.log[0]
