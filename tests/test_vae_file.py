"""A VAE from models/vae in place of the checkpoint's own: LDM or diffusers names, checked, used for the latents."""
import copy
from types import SimpleNamespace

import pytest
import torch

from test_train_lora import cfg_for, checkpoint_in_models, env, fresh  # noqa: F401 (fixtures)
from trainers.core.safetensors_file import write
from trainers.data import caches
from trainers.families.ldm_keys import VAE_PREFIX, diffusers_to_ldm
from trainers.families.load_errors import ModelLoadError
from trainers.families.vae_file import load_vae_file
from trainers.training.loop import train


def other_vae(toy_sd1):
    vae = copy.deepcopy(toy_sd1.vae)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01)
    return vae


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("layout", ["ldm", "ldm_prefixed", "diffusers"])
def test_a_vae_file_loads_in_either_naming(toy_sd1, tmp_path, layout):
    vae = other_vae(toy_sd1)
    ldm = diffusers_to_ldm(SimpleNamespace(vae=vae), parts=("vae",))
    tensors = {"ldm": {k[len(VAE_PREFIX):]: v for k, v in ldm.items()}, "ldm_prefixed": ldm,
               "diffusers": vae.state_dict()}[layout]
    path = str(tmp_path / "vae.safetensors")
    write(path, tensors)
    loaded = load_vae_file(path, toy_sd1.vae)
    assert same(loaded, vae) and loaded.config.scaling_factor == toy_sd1.vae.config.scaling_factor


def test_a_file_that_is_not_a_vae_is_refused(toy_sd1, tmp_path):
    path = str(tmp_path / "lora.safetensors")
    write(path, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelLoadError, match="not a VAE.*models/vae"):
        load_vae_file(path, toy_sd1.vae)


@pytest.mark.parametrize("base", ["in_memory", "file"])
def test_training_encodes_with_the_chosen_vae(env, fresh, toy_sd1, toy_checkpoint, toy_tokenizer_dir, monkeypatch,
                                              base):
    """Also when the run loads its base text-first: the chosen VAE replaces the base's once that is read."""
    vae = other_vae(toy_sd1)
    (env["root"] / "models" / "vae").mkdir(parents=True)
    write(str(env["root"] / "models" / "vae" / "fixed.safetensors"), vae.state_dict())
    used = []
    real = caches.LatentCache.build

    def spy(items, vae_model, *args, **kwargs):
        used.append(same(vae_model, vae))  # (a run that loaded its base frees the VAE after this)
        return real(items, vae_model, *args, **kwargs)

    monkeypatch.setattr(caches.LatentCache, "build", spy)
    model = checkpoint_in_models(env, toy_checkpoint, toy_tokenizer_dir) if base == "file" else "toy"

    def run(**kw):
        return train(cfg_for(env, steps=1, base_model=model, **kw), components=None if base == "file" else fresh())

    run(vae="fixed.safetensors")
    assert used == [True]
    monkeypatch.setattr(caches.CaptionCache, "build", lambda *a, **kw: pytest.fail("captions encoded"))
    with pytest.raises(FileNotFoundError, match="models.vae"):  # named before anything is encoded
        run(vae="missing.safetensors", output_name="no_vae")
