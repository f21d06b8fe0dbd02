"""LoRA training end to end on the tiny SD1.x model: learning, files, resume, cancel, failures."""
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.core import host
from trainers.networks import lora as lora_network
from trainers.training import objective
from trainers.core.config import ConfigError, TrainConfig
from trainers.data.caches import LatentCache
from trainers.data.errors import DatasetError
from trainers.data.items import scan_folder
from trainers.testing.demo import make_photos
from trainers.evaluate.denoising import denoising_loss
from trainers.training.loop import TrainingError, train


@pytest.fixture
def env(tmp_path):
    host.configure(models_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "output"))
    photos = make_photos(str(tmp_path / "photos"), count=2, size=64)
    return {"root": tmp_path, "photos": photos, "loras": tmp_path / "models" / "loras"}


@pytest.fixture
def fresh(toy_sd1):
    """A private copy of the tiny model: training attaches adapters to it."""
    return lambda: copy.deepcopy(toy_sd1)


def cfg_for(env, **kw):
    base = dict(base_model="toy", dataset=env["photos"], output_name="subject", trigger_word="sks", steps=6,
                resolution=64, rank=4, alpha=4, unet_lr=1e-3, lr_scheduler="constant", warmup_steps=0,
                save_every=0, validation_every=0, resume=True)
    base.update(kw)
    return TrainConfig(**base)


def checkpoint_in_models(env, checkpoint, tokenizer_dir) -> str:
    """The toy checkpoint in models/checkpoints, with a tokenizer in models/clip, as a user has them: a run then
    loads its base itself. Returns the name to train on."""
    import shutil

    models = env["root"] / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, models / "checkpoints" / "toy.safetensors")
    shutil.copytree(tokenizer_dir, models / "clip" / "tokenizer")
    return "toy.safetensors"


def fixed_latents(comps, photos):
    items = scan_folder(photos, trigger_word="sks")
    cache = LatentCache.build(items, comps.vae, 64)
    gen = torch.Generator().manual_seed(0)
    return torch.stack([cache.sample(i, gen) for i in range(len(items))]), [it.caption for it in items]


def lora_files(env):
    return sorted(os.listdir(env["loras"])) if env["loras"].exists() else []


def test_lora_lowers_denoising_loss_on_its_images(env, fresh):
    """Trained on two images, the LoRA predicts their noise at least 30% better than the base."""
    comps = fresh()
    latents, texts = fixed_latents(comps, env["photos"])
    before = denoising_loss(comps, latents, texts)
    result = train(cfg_for(env, steps=80, preset="locon", rank=8, alpha=8, unet_lr=3e-3, batch_size=2,
                           min_snr_gamma=0), components=comps)
    # The saved file, loaded into a fresh base, gives the improvement (not just the live model).
    base = fresh()
    lora_network.attach(base.unet, lora_network.unet_targets(base.unet, "locon"), 8, 8)
    assert lora_network.load_kohya(load_file(result.lora_path), base.unet) == []
    after = denoising_loss(base, latents, texts)
    assert after < 0.7 * before, (before, after)
    losses = [r["loss"] for r in result.log]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


@pytest.mark.parametrize("preset,te", [("attn", False), ("kohya", True), ("locon", True)])
def test_saved_file_round_trips_to_identical_forward(env, fresh, preset, te):
    comps = fresh()
    result = train(cfg_for(env, steps=3, preset=preset, train_text_encoder=te, save_precision="fp32"),
                   components=comps)
    trained = comps
    loaded = fresh()
    lora_network.attach(loaded.unet, lora_network.unet_targets(loaded.unet, preset), 4, 4)
    if te:
        lora_network.attach(loaded.text_encoder, lora_network.text_encoder_targets(loaded.text_encoder), 4, 4)
    unused = lora_network.load_kohya(load_file(result.lora_path), loaded.unet, loaded.text_encoder if te else None)
    assert unused == []
    ids = torch.tensor([[1, 2, 3] + [0] * 74])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = []
        for c in (trained, loaded):
            c.unet.eval()
            cond = c.text_encoder(ids)[0]
            outs.append((cond, c.unet(x, torch.tensor([500]), cond).sample))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    # And the LoRA really changes the model: the untouched base differs.
    base = fresh()
    with torch.no_grad():
        plain = base.unet(x, torch.tensor([500]), base.text_encoder(ids)[0]).sample
    assert not torch.allclose(plain, outs[0][1])


def test_every_saved_key_is_a_kohya_key_of_an_ldm_module(env, fresh, toy_sd1):
    from trainers.families.ldm_keys import diffusers_to_ldm, ldm_module_name

    comps = fresh()
    result = train(cfg_for(env, steps=1, preset="locon", train_text_encoder=True), components=comps)
    ldm = diffusers_to_ldm(toy_sd1)
    unet_modules = {lora_network.kohya_stem(n, "lora_unet_"): n for n, _ in toy_sd1.unet.named_modules() if n}
    te_modules = {lora_network.kohya_stem(n, "lora_te_"): n for n, _ in toy_sd1.text_encoder.named_modules() if n}
    keys = load_file(result.lora_path).keys()
    stems = {k.split(".")[0] for k in keys}
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert len(keys) == 3 * len(stems)
    for stem in stems:
        if stem.startswith("lora_unet_"):
            ldm_name = "model.diffusion_model." + ldm_module_name(toy_sd1.unet.config, unet_modules[stem])
        else:
            assert stem.startswith("lora_te_text_model_encoder_layers_")
            name = te_modules[stem]
            ldm_name = "cond_stage_model.transformer." + ("" if name.startswith("text_model.") else "text_model.") + name
        assert ldm_name + ".weight" in ldm, stem


def test_metadata_is_kohya_style_and_alpha_is_honoured(env, fresh):
    result = train(cfg_for(env, steps=2, rank=4, alpha=2), components=fresh())
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith(".weight")}
    assert alphas == {2.0} and dtypes == {torch.float16}
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "sks"
    freq = json.loads(meta["ss_tag_frequency"])["photos"]
    assert freq["sks"] == 2
    assert len(meta["sshs_model_hash"]) == 64


def test_run_folder_has_config_log_checkpoints_and_samples(env, fresh):
    result = train(cfg_for(env, steps=4, save_every=2, validation_prompt="a photo of sks ball",
                           validation_every=2, validation_steps=2), components=fresh())
    run = result.run_dir
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["steps"] == 4 and config["trigger_word"] == "sks"
    assert config["resolved"]["images"] == 2 and config["resolved"]["processes"] == 1
    assert TrainConfig.from_dict(config).steps == 4  # the run folder's config is a valid run config
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("loss" in r and "lr" in r for r in log)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000002", "step_000004"]
    assert sorted(os.listdir(os.path.join(run, "samples"))) == ["step_000002.png", "step_000004.png"]
    assert result.validation_image.size == (64, 64)
    assert result.loss_image().size == (512, 256)


def test_same_name_never_overwrites(env, fresh):
    a = train(cfg_for(env, steps=1), components=fresh())
    b = train(cfg_for(env, steps=1), components=fresh())
    assert os.path.basename(a.lora_path) == "subject.safetensors"
    assert os.path.basename(b.lora_path) == "subject_2.safetensors"
    assert a.run_dir != b.run_dir and os.path.isdir(a.run_dir)


def interrupt_at(step_to_stop):
    def progress(step, total, loss):
        if step == step_to_stop:
            host.request_interrupt()
    return progress


def test_cancel_saves_a_checkpoint_and_resume_continues_the_same_curve(env, fresh):
    settings = dict(steps=6, batch_size=2, flip=True, caption_dropout=0.3, save_precision="fp32")
    straight = train(cfg_for(env, output_name="straight", **settings), components=fresh())
    cfg = cfg_for(env, output_name="cut", **settings)
    with pytest.raises(host.Interrupted):
        train(cfg, components=fresh(), progress=interrupt_at(3))
    assert lora_files(env) == ["straight.safetensors"]  # nothing half-written in models/loras
    runs = env["root"] / "output" / "personalize" / "runs"
    assert os.listdir(runs / "cut" / "checkpoints") == ["step_000003"]
    assert not [p for p in runs.rglob("*") if p.name.endswith(".part")]

    resumed = train(cfg, components=fresh())
    assert resumed.run_dir == str(runs / "cut")
    assert [r["step"] for r in resumed.log] == [1, 2, 3, 4, 5, 6]
    # The same draws from the same restored state: the same curve and the same fp32 weights, bit for bit
    # (a tolerance would let a 5-step and a 6-step LoRA pass as equal).
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in straight.log]
    sa, sb = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(env, fresh, monkeypatch):
    real = objective.diffusion_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(objective, "diffusion_loss", flaky)
    with pytest.raises(TrainingError, match="step 4.*step_000002"):
        train(cfg_for(env, steps=6, save_every=2), components=fresh())
    ckpts = env["root"] / "output" / "personalize" / "runs" / "subject" / "checkpoints"
    assert os.listdir(ckpts) == ["step_000002"]
    assert lora_files(env) == []


def test_failure_while_saving_leaves_no_partial_file_and_can_be_resumed(env, fresh, monkeypatch):
    from trainers.core import safetensors_file

    real_write = safetensors_file.write

    def broken(path, tensors, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    cfg = cfg_for(env, steps=2)
    monkeypatch.setattr(safetensors_file, "write", lambda p, t, metadata=None: broken(p, t) if "loras" in str(p)
                        else real_write(p, t, metadata=metadata))
    with pytest.raises(OSError, match="No space"):
        train(cfg, components=fresh())
    assert not env["loras"].exists() or os.listdir(env["loras"]) == []
    monkeypatch.setattr(safetensors_file, "write", real_write)
    result = train(cfg, components=fresh())  # resumes at step 2 and only exports
    assert [r["step"] for r in result.log] == [1, 2]
    assert lora_files(env) == ["subject.safetensors"]


def test_bad_inputs_give_clear_errors(env, fresh, tmp_path):
    with pytest.raises(DatasetError, match="does not exist|not found|No such"):
        train(cfg_for(env, dataset=str(tmp_path / "nope")), components=fresh())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("hello")
    with pytest.raises(DatasetError, match="empty"):
        train(cfg_for(env, dataset=str(tmp_path / "empty")), components=fresh())
    with pytest.raises(ConfigError, match="multiple of 8.*use 96 or 104"):
        train(cfg_for(env, resolution=100), components=fresh())
    with pytest.raises(ConfigError, match="optimizer"):
        train(cfg_for(env, optimizer="sgd"), components=fresh())
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        train(cfg_for(env, base_model="missing.safetensors"))
    assert lora_files(env) == []


def test_corrupt_and_odd_images_are_skipped_or_handled(env, fresh):
    photos = env["root"] / "photos"
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "readme.txt").write_text("not an image caption")
    from PIL import Image
    Image.new("LA", (70, 64), (128, 200)).save(photos / "grey_alpha.png")
    result = train(cfg_for(env, steps=1), components=fresh())
    meta = safe_open(result.lora_path, "pt").metadata()
    assert meta["ss_num_train_images"] == "3"  # two photos + the grey one; the broken file is skipped


def test_optimizer_fallbacks_and_schedules(env, fresh, caplog):
    result = train(cfg_for(env, steps=3, optimizer="adamw8bit", lr_scheduler="cosine", warmup_steps=1),
                   components=fresh())
    assert "AdamW8bit needs a CUDA GPU" in caplog.text
    lrs = [r["lr"] for r in result.log]
    assert lrs == pytest.approx([0.5e-3, 1e-3, 0.5e-3])  # one warmup step, then cosine decay
    pytest.importorskip("prodigyopt")
    result = train(cfg_for(env, steps=2, optimizer="prodigy", unet_lr=1.0), components=fresh())
    assert len(result.log) == 2


def test_a_run_loads_its_base_text_first_and_reads_the_unet_after_the_captions(
        env, toy_checkpoint, toy_tokenizer_dir, monkeypatch):
    """A run that loads its own base reads the text encoders, caches the captions (then frees the encoders), and
    only then reads the UNet and VAE: the encoders and the UNet are never in memory together. Same LoRA as a run
    handed the fully loaded model."""
    from trainers.data import caches
    from trainers.families import model_loading

    base = checkpoint_in_models(env, toy_checkpoint, toy_tokenizer_dir)
    events, real_load, real_captions = [], model_loading._load_file, caches.CaptionCache.build

    def watched_load(path, tokenizer_dir, dtype, keep=None):
        comps = real_load(path, tokenizer_dir, dtype, keep)
        events.append("read " + "+".join(name for name in ("text_encoder", "unet", "vae")
                                         if getattr(comps, name) is not None))
        return comps

    monkeypatch.setattr(model_loading, "_load_file", watched_load)
    monkeypatch.setattr(caches.CaptionCache, "build", lambda *a, **kw: events.append("captions") or real_captions(
        *a, **kw))
    train(cfg_for(env, base_model=base, steps=2, output_name="text_first"))
    assert events == ["read text_encoder", "captions", "read unet+vae"]

    full = model_loading.load_sd_components(str(env["root"] / "models" / "checkpoints" / base))
    train(cfg_for(env, steps=2, output_name="full"), components=full)
    text_first, whole = (load_file(str(env["loras"] / f"{n}.safetensors")) for n in ("text_first", "full"))
    assert text_first.keys() == whole.keys() and all(torch.equal(text_first[k], whole[k]) for k in whole)


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_a_run_that_loaded_its_base_frees_the_frozen_models_once_cached(env, fresh, monkeypatch, method):
    """Without validation images, a LoRA run frees the VAE and the frozen text encoders after caching their outputs
    (the same LoRA comes out); a DreamBooth run keeps them, since its checkpoint holds them."""
    from trainers.training import loop

    loaded = []

    def load(cfg):
        loaded.append(fresh())
        return loaded[-1]

    monkeypatch.setattr(loop, "_load_base", load)
    extra = dict(class_prompt="a photo of a ball", num_class_images=1, class_sample_steps=1) \
        if method == "dreambooth" else {}
    train(cfg_for(env, method=method, steps=2, output_name="freed", **extra))
    comps = loaded[0]
    freed = [m for m in (comps.vae, *comps.text_encoders) if next(m.parameters()).is_meta]
    assert (len(freed) == 1 + len(comps.text_encoders)) if method == "lora" else freed == []
    assert not next(comps.unet.parameters()).is_meta
    if method == "lora":  # the same adapter as a run that keeps them (components passed in are never freed)
        train(cfg_for(env, steps=2, output_name="kept"), components=fresh())
        freed_file, kept_file = load_file(str(env["loras"] / "freed.safetensors")), \
            load_file(str(env["loras"] / "kept.safetensors"))
        assert freed_file.keys() == kept_file.keys()
        assert all(torch.equal(freed_file[k], kept_file[k]) for k in freed_file)
