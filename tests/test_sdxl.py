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


@pytest.mark.parametrize("network", ["lora", "loha", "lokr"])
def test_lora_on_both_encoders_trains_and_every_key_names_an_sgm_module(env, fresh_xl, network):
    result = train(cfg_for(env, steps=3, train_text_encoder=True, preset="kohya", text_encoder_lr=1e-3,
                           network=network, output_name=f"xl_{network}"), components=fresh_xl())
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


def test_a_lora_on_one_sdxl_encoder_trains_and_saves_that_encoder_alone(env, fresh_xl, toy_sd1):
    from trainers.core.config import ConfigError

    comps = fresh_xl()
    before = copy.deepcopy(comps.text_encoder.state_dict())
    result = train(cfg_for(env, steps=2, train_text_encoder=True, which_text_encoders="clip_g", text_encoder_lr=1e-3,
                           output_name="xl_te2"), components=comps)
    with safe_open(result.lora_path, "pt") as f:
        prefixes = {k.split("_")[1] for k in f.keys()}
    assert prefixes == {"unet", "te2"}  # OpenCLIP-G's adapters only, still named te2
    assert all(torch.equal(v, comps.text_encoder.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="one text encoder, CLIP-L"):
        train(cfg_for(env, steps=1, train_text_encoder=True, which_text_encoders="clip_g", output_name="sd1_te2"),
              components=copy.deepcopy(toy_sd1))


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


def _same_model(a, b):
    texts = ["a photo of sks dog"]
    ca, cb = SDXL.encode(a, texts), SDXL.encode(b, texts)
    assert torch.equal(ca.states, cb.states) and torch.equal(ca.pooled, cb.pooled)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10])
    batch = FakeBatch(x, [None])
    outputs = [m.unet(x, t, **SDXL.unet_kwargs(c, batch)).sample for m, c in ((a, ca), (b, cb))]
    assert torch.equal(*outputs)
    assert all(torch.equal(p, q) for p, q in zip(a.vae.parameters(), b.vae.parameters()))


def test_a_single_file_in_the_sgm_layout_reloads_as_the_same_model(toy_sdxl, toy_tokenizer_dir, tmp_path):
    from trainers.families.model_loading import load_sd_components
    from trainers.testing.toy_models import save_single_file

    path = save_single_file(toy_sdxl, str(tmp_path / "xl.safetensors"))
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    loaded = load_sd_components(path, tokenizer_dir=toy_tokenizer_dir)
    assert loaded.family == "sdxl" and loaded.tokenizer_2.pad_token == "!"
    _same_model(toy_sdxl, loaded)


def test_a_load_holds_each_weight_once(toy_sdxl, toy_tokenizer_dir, tmp_path, monkeypatch):
    """Peak memory of a load is the models, not the models plus the file: an fp16 file is converted as it is
    read, and each tensor handed to a model is either the parameter itself or gone once the model is built
    (OpenCLIP's q, k, v are copied out of the fused tensor one at a time, the fused one then freed)."""
    import gc
    import weakref

    from trainers.families import sdxl_single_file
    from trainers.families.model_loading import load_sd_components
    from trainers.testing.toy_models import save_single_file

    path = save_single_file(toy_sdxl, str(tmp_path / "xl16.safetensors"), dtype=torch.float16)
    seen, real = [], sdxl_single_file._instantiate

    def watched(build, state_dict, dtype, what, path):
        handed = [(weakref.ref(t), t.data_ptr()) for t in state_dict.values()]
        assert all(t.dtype == torch.float32 for t in state_dict.values())  # converted while reading
        model = real(build, state_dict, dtype, what, path)
        gc.collect()
        params = {t.data_ptr() for t in model.state_dict().values()}
        seen.append((what, len(handed), sum(ref() is not None and ptr not in params for ref, ptr in handed)))
        return model

    monkeypatch.setattr(sdxl_single_file, "_instantiate", watched)
    load_sd_components(path, tokenizer_dir=toy_tokenizer_dir)
    assert [what for what, _, _ in seen] == ["UNet", "VAE", "CLIP-L text encoder", "OpenCLIP-G text encoder"]
    assert all(handed > 0 and duplicates == 0 for _, handed, duplicates in seen), seen


@pytest.mark.parametrize("form", ["single_file", "diffusers"])
def test_a_text_first_load_reads_the_unet_and_vae_on_first_use_as_the_same_model(
        toy_sdxl, toy_tokenizer_dir, tmp_path, monkeypatch, form):
    """A trainer loads text-first (training/loop.py): the text encoders now, the UNet and VAE when first asked for,
    so the encoders can cache captions and be freed before the rest takes memory. A VAE swap waits for them."""
    from trainers.families import model_loading
    from trainers.testing.toy_models import save_diffusers_folder, save_single_file

    path = save_single_file(toy_sdxl, str(tmp_path / "xl.safetensors")) if form == "single_file" \
        else save_diffusers_folder(toy_sdxl, str(tmp_path / "xl"))
    reads, real_read = [], model_loading.read_state_dict

    def watched(*args, **kwargs):
        tensors, metadata = real_read(*args, **kwargs)
        reads.append({k for k, v in tensors.items() if not v.is_meta})
        return tensors, metadata

    monkeypatch.setattr(model_loading, "read_state_dict", watched)
    loaded = model_loading.load_sd_components(path, tokenizer_dir=toy_tokenizer_dir, text_first=True)
    assert loaded.__dict__["_unet"] is None and loaded.__dict__["_vae"] is None
    assert loaded.text_encoder is not None and loaded.text_encoder_2 is not None
    swapped = []
    loaded.swap_vae(lambda vae: swapped.append(vae) or vae)
    assert swapped == [] and loaded.__dict__["_vae"] is None
    if form == "single_file":
        assert len(reads) == 1 and reads[0] and all(k.startswith("conditioner.") for k in reads[0])
    unet = loaded.unet  # reads the rest
    assert swapped == [loaded.vae] and unet is loaded.unet
    if form == "single_file":
        assert len(reads) == 2 and reads[1] and all(k.startswith(("model.", "first_stage_model.")) for k in reads[1])
    _same_model(toy_sdxl, loaded)


def test_a_text_first_load_checks_the_unet_layout_before_reading_it(toy_sdxl, toy_tokenizer_dir, tmp_path):
    """A file whose UNet does not fit fails at once, not after the captions were encoded: the shapes are checked."""
    from trainers.core.safetensors_file import write
    from trainers.families.ldm_keys import diffusers_to_ldm
    from trainers.families.load_errors import ModelLoadError
    from trainers.families.model_loading import load_sd_components

    sd = diffusers_to_ldm(toy_sdxl)
    key = next(k for k in sd if k.startswith("model.diffusion_model.") and k.endswith("emb_layers.1.bias"))
    sd[key] = torch.zeros(sd[key].shape[0] + 1)
    path = str(tmp_path / "bad.safetensors")
    write(path, sd)
    with pytest.raises(ModelLoadError, match="UNet") as full:
        load_sd_components(path, tokenizer_dir=toy_tokenizer_dir)
    with pytest.raises(ModelLoadError) as text_first:
        load_sd_components(path, tokenizer_dir=toy_tokenizer_dir, text_first=True)
    assert str(text_first.value) == str(full.value)


def test_a_diffusers_sdxl_folder_loads(toy_sdxl, tmp_path):
    from trainers.families.model_loading import load_sd_components
    from trainers.testing.toy_models import save_diffusers_folder

    loaded = load_sd_components(save_diffusers_folder(toy_sdxl, str(tmp_path / "xl")))
    assert loaded.family == "sdxl" and loaded.tokenizer_2.pad_token == "!"
    _same_model(toy_sdxl, loaded)


def test_a_refiner_is_refused_with_what_it_is(toy_sdxl, toy_tokenizer_dir, tmp_path):
    from trainers.core.safetensors_file import write
    from trainers.families.load_errors import ModelLoadError
    from trainers.families.model_loading import load_sd_components
    from trainers.families.ldm_keys import diffusers_to_ldm

    sd = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
          for k, v in diffusers_to_ldm(toy_sdxl).items() if not k.startswith("conditioner.embedders.0.")}
    path = str(tmp_path / "refiner.safetensors")
    write(path, sd)
    with pytest.raises(ModelLoadError, match="refiner"):
        load_sd_components(path, tokenizer_dir=toy_tokenizer_dir)


@pytest.mark.parametrize("which", ["", "all", "clip_g"])
def test_dreambooth_on_sdxl_saves_an_sgm_checkpoint_that_keeps_untrained_tensors_and_reloads(
        env, toy_sdxl, toy_tokenizer_dir, tmp_path, which):
    from trainers.core.safetensors_file import read
    from trainers.families.model_loading import load_sd_components
    from trainers.testing.toy_models import save_single_file

    base_path = save_single_file(toy_sdxl, str(tmp_path / "base_xl.safetensors"), dtype=torch.float16)
    comps = load_sd_components(base_path, tokenizer_dir=toy_tokenizer_dir)
    result = train(cfg_for(env, method="dreambooth", steps=2, unet_lr=1e-3, class_prompt="", output_name="db_xl",
                           save_precision="fp32", train_text_encoder=bool(which), which_text_encoders=which or "all",
                           text_encoder_lr=1e-3), components=comps)
    saved, _ = read(result.artifact.path)
    base, _ = read(base_path)
    assert set(saved) == set(base)
    encoders = {"": (), "all": ("conditioner.",), "clip_g": ("conditioner.embedders.1.",)}[which]
    trained = ("model.diffusion_model.", *encoders)
    for key, tensor in base.items():
        if key.startswith(trained):
            assert saved[key].dtype == torch.float32, key
        else:  # VAE, and untrained text encoders, bit-exact in the base's own fp16
            assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    changed = {k.split(".")[2] for k in base if k.startswith("conditioner.") and not torch.equal(saved[k].half(),
                                                                                                  base[k])}
    assert changed == {"": set(), "all": {"0", "1"}, "clip_g": {"1"}}[which]  # conditioner.embedders.<i>
    reloaded = load_sd_components(result.artifact.path, tokenizer_dir=toy_tokenizer_dir)
    assert reloaded.family == "sdxl"
    assert torch.equal(reloaded.unet.state_dict()["conv_in.weight"], comps.unet.state_dict()["conv_in.weight"])


def test_validation_images_and_class_images_sample_through_the_sdxl_pipeline(env, fresh_xl):
    result = train(cfg_for(env, method="dreambooth_lora", steps=2, class_prompt="a photo of a ball",
                           num_class_images=2, class_sample_steps=2, validation_prompt="a photo of sks ball",
                           validation_steps=2, output_name="dbl_xl"), components=fresh_xl())
    assert result.validation_image is not None and result.validation_image.size == (64, 64)
    assert all("prior_loss" in r for r in result.log)


def test_textual_inversion_trains_a_vector_set_per_encoder_saved_as_clip_l_and_clip_g(env, fresh_xl):
    from safetensors.torch import load_file

    comps = fresh_xl()
    base = fresh_xl()
    result = train(cfg_for(env, method="textual_inversion", init_word="dog", num_vectors=2, steps=3,
                           embedding_lr=5e-2, output_name="ti_xl"), components=comps)
    saved = load_file(result.artifact.path)
    assert set(saved) == {"clip_l", "clip_g"}
    assert saved["clip_l"].shape == (2, 32) and saved["clip_g"].shape == (2, 32)
    for encoder, tokenizer, key in zip(base.text_encoders, base.tokenizers, ("clip_l", "clip_g")):
        ids = tokenizer("dog", add_special_tokens=False).input_ids
        start = encoder.get_input_embeddings().weight[[ids[i % len(ids)] for i in range(2)]]
        assert not torch.allclose(saved[key], start), key  # each set trained away from its start


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sampled_images_are_the_pipelines_own_decode_in_fp32(family, toy_sd1, toy_sdxl):
    """Our fp32 decode outside autocast gives, in fp32, exactly the pipeline's own images."""
    from diffusers import DPMSolverMultistepScheduler

    from trainers.families.components import SD_SCHEDULER_CONFIG
    from trainers.training.validation import sample_images

    comps = toy_sd1 if family == "sd1" else toy_sdxl
    ours = sample_images(comps, comps.unet, ["a photo of sks dog"], [7], resolution=64, steps=2,
                         device=torch.device("cpu"))
    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"})
    pipe = get_family(family).pipeline(comps, comps.unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["a photo of sks dog"], height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                  generator=[torch.Generator("cpu").manual_seed(7)]).images
    assert list(ours[0].getdata()) == list(theirs[0].getdata())


def test_bucketed_batches_carry_each_images_size_ids(env, fresh_xl, tmp_path, monkeypatch):
    from test_dataset_build import _bucket_folder, build
    from trainers.families import registry

    dataset = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    sources = {it["caption"]: it for it in dataset.items}
    seen = []
    real = registry.SDXL.unet_kwargs

    def spy(self, cond, batch=None):
        kwargs = real(self, cond, batch)
        seen.append((kwargs["added_cond_kwargs"]["time_ids"].tolist(), [it.caption for it in batch.items]))
        return kwargs

    monkeypatch.setattr(registry.SDXL, "unet_kwargs", spy)
    train(cfg_for(env, dataset=dataset.path, trigger_word="", steps=8, resolution=64, batch_size=2),
          components=fresh_xl())
    assert len(seen) == 8
    for time_ids, captions in seen:
        for ids, caption in zip(time_ids, captions):
            item = sources[caption]
            (source_w, source_h), (left, top, right, _), (bucket_w, bucket_h) = \
                item["source_size"], item["crop_box"], item["bucket"]
            scale = bucket_w / (right - left)
            assert ids == [source_h, source_w, round(top * scale), round(left * scale), bucket_h, bucket_w]
    assert {tuple(ids[4:]) for time_ids, _ in seen for ids in time_ids} >= {(48, 80), (80, 48)}


# ---- SDXL defaults on the nodes: resolution 0 is the base's own size, and the node says what it chose -------------

def test_resolution_0_trains_at_the_families_own_size_and_the_run_says_so(env, fresh_xl, monkeypatch):
    import json

    from trainers.families import registry

    monkeypatch.setattr(registry.SDXL, "native_resolution", 64)  # a tiny model's "own size", to keep this fast
    result = train(cfg_for(env, steps=1, resolution=0, output_name="auto_xl"), components=fresh_xl())
    with open(os.path.join(result.run_dir, "config.json")) as f:
        assert json.load(f)["resolution"] == 64  # the run folder records the size it trained at
    assert result.notes[0].startswith("SDXL base: training at 64 px, its own size (resolution 0).")
    assert "Text encoders frozen, their outputs cached once." in result.notes[0]


def test_the_sdxl_note_names_a_typed_size_below_1024_and_the_memory_setting():
    from trainers.families.defaults import advice

    note = advice(SDXL, 512, "", False)
    assert note.startswith("SDXL base: resolution 512 px as set, but SDXL was trained at 1024 px") and "0 picks 1024" \
        in note
    assert "about 12.2 GB" in note and "5.7 GB with gradient_checkpointing on" in note
    assert advice(SDXL, 1024, "all", True).startswith("SDXL base: training at 1024 px. Both text encoders train,")
    assert "OpenCLIP-G trains (CLIP-L frozen)" in advice(SDXL, 1024, "clip_g", True)
    assert advice(get_family("sd1"), 0, "", False) == ""  # SD1.x: 512 px has always been the default


def test_a_files_family_is_read_from_its_header_alone(toy_sdxl, toy_sd1, tmp_path, toy_checkpoint):
    from trainers.families.detect import family_of
    from trainers.families.load_errors import ModelLoadError
    from trainers.testing.toy_models import save_diffusers_folder, save_single_file

    assert family_of(save_single_file(toy_sdxl, str(tmp_path / "xl.safetensors"))) == "sdxl"
    assert family_of(toy_checkpoint) == "sd1"
    assert family_of(save_diffusers_folder(toy_sdxl, str(tmp_path / "xl_folder"))) == "sdxl"
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    assert family_of(str(tmp_path / "old.ckpt")) == ""  # only unpickling could tell: the run will
    from trainers.core.safetensors_file import write

    write(str(tmp_path / "lora.safetensors"), {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelLoadError, match="a LoRA"):
        family_of(str(tmp_path / "lora.safetensors"))


def test_the_canvas_route_reads_only_checkpoints_and_returns_the_note(env, toy_sdxl):
    import sys

    from pack_loader import load_pack
    from trainers.testing.toy_models import save_single_file

    pack = load_pack().__name__  # the pack as ComfyUI imports it, with its own copy of the host adapter
    routes = sys.modules[f"{pack}.nodes.routes"]
    sys.modules[f"{pack}.trainers.core.host"].configure(models_dir=str(env["root"] / "models"))
    folder = env["root"] / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    save_single_file(toy_sdxl, str(folder / "xl.safetensors"))
    status, body = routes.base_model_info({"name": "xl.safetensors", "resolution": "512",
                                           "gradient_checkpointing": "true", "method": "lora"})
    assert status == 200 and body["family"] == "sdxl" and body["native_resolution"] == 1024
    assert "0 picks 1024" in body["note"] and "about 5.7 GB" in body["note"]
    status, body = routes.base_model_info({"name": "../../photos/0.png"})
    assert status == 404 and "checkpoints" in body["error"]
