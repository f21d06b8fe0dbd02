"""Textual inversion on the tiny SD1.x model: only the new vectors train, the file ComfyUI and A1111 load, resume."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_train_lora import cfg_for, env, fresh, interrupt_at  # noqa: F401 (fixtures)
from trainers.core import host
from trainers.core.config import ConfigError, TrainConfig
from trainers.evaluate.denoising import denoising_loss
from trainers.families.registry import get_family
from trainers.methods.textual_inversion import TextualInversionMethod
from trainers.training.loop import train
from test_train_lora import fixed_latents


def ti_cfg(env, **kw):
    settings = dict(method="textual_inversion", init_word="dog", num_vectors=2, embedding_lr=0.05,
                    output_name="subject_emb")
    settings.update(kw)
    return cfg_for(env, **settings)


def embeddings_dir(env):
    return env["root"] / "models" / "embeddings"


def reference_conditioning(base, vectors: torch.Tensor, text: str) -> torch.Tensor:
    """The conditioning of `text` with the file's vectors in place of the trigger word, computed the common
    way (diffusers' load_textual_inversion): new rows appended to the base's token table, nothing of ours."""
    tokens = [f"<ref{i}>" for i in range(len(vectors))]
    base.tokenizer.add_tokens(tokens)
    base.text_encoder.resize_token_embeddings(len(base.tokenizer))
    with torch.no_grad():
        base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids(tokens)] = vectors
        return get_family("sd1").encode(base, [text.replace("sks", " ".join(tokens))]).states


def test_only_the_new_vectors_train_and_every_other_weight_stays_exactly(env, fresh):
    comps, base = fresh(), fresh()
    result = train(ti_cfg(env, steps=6), components=comps)
    # Every weight of the base models, the whole token table included, is bit-identical after training.
    for name, model in (("unet", comps.unet), ("vae", comps.vae)):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                       getattr(base, name).state_dict().values())), name
    trained_te = {k: v for k, v in comps.text_encoder.state_dict().items() if not k.endswith(".vectors")}
    assert {k.replace(".base.", ".") for k in trained_te} == set(base.text_encoder.state_dict())
    for key, value in trained_te.items():
        assert torch.equal(value, base.text_encoder.state_dict()[key.replace(".base.", ".")]), key
    # ... and the vectors moved away from their start (the init word's token embeddings).
    start = TextualInversionMethod(ti_cfg(env)).initial_vectors(base.text_encoder, base.tokenizer)
    saved = load_file(result.artifact.path)["emb_params"]
    assert saved.shape == start.shape == (2, base.text_encoder.config.hidden_size)
    assert not torch.allclose(saved, start)
    assert [r["step"] for r in result.log] == list(range(1, 7))


def test_vectors_start_from_the_init_word(fresh, env):
    comps = fresh()
    method = TextualInversionMethod(ti_cfg(env, init_word="do", num_vectors=3))
    method.setup(comps)
    table = comps.text_encoder.get_input_embeddings().weight
    d, o = comps.tokenizer("do", add_special_tokens=False).input_ids
    (spliced,) = method.spliced  # one per text encoder
    assert torch.equal(spliced.vectors.detach(), torch.stack([table[d], table[o], table[d]]))
    assert [p for p in comps.text_encoder.parameters() if p.requires_grad] == [spliced.vectors]


def test_the_trigger_word_becomes_the_new_tokens_in_captions_and_prompts(env):
    method = TextualInversionMethod(ti_cfg(env, num_vectors=3))
    assert method.prompt("sks, a photo of sks dog") == "<sks> <sks>_1 <sks>_2, a photo of <sks> <sks>_1 <sks>_2 dog"
    assert method.prompt("asks skss") == "asks skss"  # only the word itself


def test_embedding_file_is_what_comfyui_and_a1111_load(env, fresh):
    comps = fresh()
    result = train(ti_cfg(env, steps=4), components=comps)
    assert result.artifact.kind == "embedding"
    assert result.artifact.path == str(embeddings_dir(env) / "subject_emb.safetensors")
    with safe_open(result.artifact.path, "pt") as f:
        assert list(f.keys()) == ["emb_params"]  # one tensor: A1111 takes the only one, ComfyUI the first
        meta = f.metadata()
        vectors = f.get_tensor("emb_params")
    assert vectors.dtype == torch.float32
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["personalize.token"] == "sks" and meta["personalize.init_word"] == "dog"
    assert meta["personalize.vectors"] == "2" and meta["personalize.steps"] == meta["step"] == "4"
    assert meta["modelspec.trigger_phrase"] == "embedding:subject_emb"
    # The file's vectors, put in a prompt by a loader that knows nothing of ours, give our trained conditioning.
    family = get_family("sd1")
    method_prompt = TextualInversionMethod(ti_cfg(env)).prompt("a photo of sks dog")
    with torch.no_grad():
        ours = family.encode(comps, [method_prompt]).states
    reference = reference_conditioning(fresh(), vectors, "a photo of sks dog")
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # A second run never overwrites the first file.
    again = train(ti_cfg(env, steps=2, resume=False), components=fresh())
    assert os.path.basename(again.artifact.path) == "subject_emb_2.safetensors"


def test_embedding_lowers_denoising_loss_on_its_images(env, fresh):
    comps = fresh()
    latents, texts = fixed_latents(comps, env["photos"])
    method = TextualInversionMethod(ti_cfg(env))
    method.setup(comps)
    prompts = [method.prompt(t) for t in texts]
    before = denoising_loss(comps, latents, prompts)
    trained = fresh()
    train(ti_cfg(env, steps=60, embedding_lr=0.1, batch_size=2, min_snr_gamma=0), components=trained)
    after = denoising_loss(trained, latents, prompts)
    assert after < before, (before, after)


def test_cancelled_run_resumes_onto_the_same_curve(env, fresh):
    straight = train(ti_cfg(env, steps=6, output_name="straight"), components=fresh())
    cut = ti_cfg(env, steps=6, output_name="cut")
    with pytest.raises(host.Interrupted):
        train(cut, components=fresh(), progress=interrupt_at(3))
    resumed = train(cut, components=fresh())
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in straight.log]
    assert torch.equal(load_file(resumed.artifact.path)["emb_params"], load_file(straight.artifact.path)["emb_params"])
    ckpt = os.path.join(resumed.run_dir, "checkpoints")
    assert os.listdir(ckpt)  # the checkpoint holds the vectors only, not the whole token table
    sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ckpt) for f in files]
    assert max(sizes) < 64 * 1024


@pytest.mark.parametrize("settings,message", [
    (dict(trigger_word=""), "trigger_word is empty"),
    (dict(init_word=" "), "textual_inversion.init_word is empty"),
    (dict(num_vectors=0), "num_vectors must be at least 1"),
])
def test_textual_inversion_settings_are_checked(env, settings, message):
    with pytest.raises(ConfigError, match=message):
        ti_cfg(env, **settings).validate()


def test_nested_config_groups_load_and_flat_configs_still_do(tmp_path):
    nested = {"base_model": "m", "dataset": "d", "method": "textual_inversion", "trigger_word": "sks",
              "textual_inversion": {"init_word": "dog", "num_vectors": 3}, "lora": {"rank": 8}}
    cfg = TrainConfig.from_dict(nested).validate()
    assert (cfg.init_word, cfg.num_vectors, cfg.rank) == ("dog", 3, 8)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the JSON form round-trips
    assert cfg.to_dict()["lora"]["rank"] == 8 and "rank" not in cfg.to_dict()
    assert TrainConfig.from_dict({"rank": 8, "num_vectors": 2}).rank == 8  # an old flat config
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_json(str(tmp_path / "run.json")) == cfg
    with pytest.raises(ConfigError, match="lora.init_word is not a setting of lora"):
        TrainConfig.from_dict({"lora": {"init_word": "dog"}})
    with pytest.raises(ConfigError, match="rank is given twice"):
        TrainConfig.from_dict({"rank": 4, "lora": {"rank": 8}})
    with pytest.raises(ConfigError, match="textual_inversion.num_vectors=.x. is not valid"):
        TrainConfig.from_dict({"textual_inversion": {"num_vectors": "x"}})
