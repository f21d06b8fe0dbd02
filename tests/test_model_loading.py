"""SD1.x loading from single files and diffusers folders, and the LDM <-> diffusers key maps."""
import dataclasses
import hashlib
import json
import os

import pytest
import torch

from trainers.families import ldm_keys
from trainers.families.model_loading import ModelLoadError, file_sha256, load_sd_components, read_state_dict
from trainers.testing.toy_models import save_single_file

ATOL = 1e-5  # weights read from files can sit at unaligned addresses: last-bit differences


def _ldm(components):
    return ldm_keys.diffusers_to_ldm(components)


def _assert_same_outputs(a, b):
    """UNet prediction, VAE encode/decode and text-encoder states agree."""
    torch.manual_seed(1)
    sample = torch.randn(2, a.unet.config.in_channels, 16, 16)
    context = torch.randn(2, 7, a.unet.config.cross_attention_dim)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    ids = a.tokenizer(["a photo of sks dog"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(a.unet(sample, 500, context).sample, b.unet(sample, 500, context).sample,
                                   atol=ATOL, rtol=0)
        latents = a.vae.encode(pixels).latent_dist.mean
        torch.testing.assert_close(latents, b.vae.encode(pixels).latent_dist.mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.vae.decode(latents).sample, b.vae.decode(latents).sample, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.text_encoder(ids).last_hidden_state, b.text_encoder(ids).last_hidden_state,
                                   atol=ATOL, rtol=0)


# ---------------------------------------------------------------- round trips
def test_single_file_round_trip(toy_sd1, toy_checkpoint, toy_tokenizer_dir):
    loaded = load_sd_components(toy_checkpoint, tokenizer_dir=toy_tokenizer_dir)
    assert (loaded.family, loaded.prediction_type, loaded.source) == ("sd1", "epsilon", toy_checkpoint)
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for part in ("unet", "vae"):
        original, back = getattr(toy_sd1, part).config, getattr(loaded, part).config
        for field in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                      "norm_num_groups", "cross_attention_dim", "attention_head_dim", "latent_channels"):
            if field in original:
                assert plain(original[field]) == plain(back[field]), (part, field)
    assert loaded.text_encoder.config.num_attention_heads == toy_sd1.text_encoder.config.num_attention_heads
    _assert_same_outputs(toy_sd1, loaded)

    data = open(toy_checkpoint, "rb").read()
    assert loaded.info["name"] == "toy_sd1"
    assert loaded.info["sha256"] == hashlib.sha256(data).hexdigest()
    assert loaded.info["legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_half_precision_load(toy_checkpoint, toy_tokenizer_dir):
    loaded = load_sd_components(toy_checkpoint, tokenizer_dir=toy_tokenizer_dir, dtype=torch.float16)
    for model in (loaded.unet, loaded.vae, loaded.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_diffusers_folder(toy_sd1, toy_diffusers_dir):
    loaded = load_sd_components(toy_diffusers_dir)
    assert loaded.info["format"] == "diffusers" and loaded.prediction_type == "epsilon"
    assert len(loaded.info["sha256"]) == 64
    assert loaded.tokenizer("a dog").input_ids == toy_sd1.tokenizer("a dog").input_ids
    _assert_same_outputs(toy_sd1, loaded)


def test_pruned_and_inpainting_layouts_round_trip(toy_sd1, toy_tokenizer_dir, tmp_path):
    """Per-level res block counts, no mid block, deeper transformers, 9 input channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=9, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=[1, 2, 1],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
        transformer_layers_per_block=2, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    pruned = dataclasses.replace(toy_sd1, unet=unet)
    path = save_single_file(pruned, str(tmp_path / "pruned.safetensors"))

    loaded = load_sd_components(path, tokenizer_dir=toy_tokenizer_dir)
    config = loaded.unet.config
    assert list(config.layers_per_block) == [1, 2, 1] and config.mid_block_type is None
    assert config.in_channels == 9 and config.transformer_layers_per_block == 2
    assert list(config.down_block_types) == list(unet.config.down_block_types)
    assert list(config.up_block_types) == list(unet.config.up_block_types)
    _assert_same_outputs(pruned, loaded)


def test_ckpt_is_loaded_with_weights_only(toy_sd1, toy_tokenizer_dir, tmp_path):
    path = str(tmp_path / "toy.ckpt")
    torch.save({"state_dict": _ldm(toy_sd1), "global_step": 12}, path)
    loaded = load_sd_components(path, tokenizer_dir=toy_tokenizer_dir)
    for part in ("unet", "vae", "text_encoder"):
        original, back = getattr(toy_sd1, part).state_dict(), getattr(loaded, part).state_dict()
        assert original.keys() == back.keys()
        assert all(torch.equal(original[k], back[k]) for k in original), part


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_pickle_with_objects_is_refused(toy_sd1, toy_tokenizer_dir, tmp_path):
    path, marker = str(tmp_path / "evil.ckpt"), str(tmp_path / "code_ran")
    torch.save({"state_dict": _ldm(toy_sd1), "hook": _RunsCode(marker)}, path)
    with pytest.raises(ModelLoadError, match="refused") as info:
        load_sd_components(path, tokenizer_dir=toy_tokenizer_dir)
    assert "evil.ckpt" in str(info.value) and "safetensors" in str(info.value)
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- bad files
@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "garbage_ckpt", "unknown_extension"])
def test_unreadable_files_name_the_file(kind, toy_checkpoint, toy_tokenizer_dir, tmp_path):
    name = {"garbage_ckpt": "bad.ckpt", "unknown_extension": "model.gguf"}.get(kind, "bad.safetensors")
    path = tmp_path / name
    data = open(toy_checkpoint, "rb").read()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2]}.get(kind, os.urandom(4096)))
    with pytest.raises(ModelLoadError) as info:
        load_sd_components(str(path), tokenizer_dir=toy_tokenizer_dir)
    assert name in str(info.value)


def _save(tmp_path, name, tensors) -> str:
    from safetensors.torch import save_file

    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_other_families_are_refused(toy_sd1, toy_tokenizer_dir, tmp_path):
    sd = _ldm(toy_sd1)
    sdxl = dict(sd, **{"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4)})
    sd2 = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.model."): v for k, v in sd.items()}
    wide = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 1024)}
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    for name, tensors, says in (("xl.safetensors", sdxl, "SDXL"), ("sd2.safetensors", sd2, "SD2"),
                                ("wide.safetensors", wide, "SD2"), ("lora.safetensors", lora, "LoRA")):
        with pytest.raises(ModelLoadError, match=says) as info:
            load_sd_components(_save(tmp_path, name, tensors), tokenizer_dir=toy_tokenizer_dir)
        assert name in str(info.value) and "Stable Diffusion 1.x" in str(info.value)


def test_missing_or_unexpected_keys_are_errors(toy_sd1, toy_tokenizer_dir, tmp_path):
    sd = _ldm(toy_sd1)
    missing = dict(sd)
    del missing["model.diffusion_model.input_blocks.1.1.proj_out.weight"]
    extra = dict(sd, **{"model.diffusion_model.input_blocks.1.1.extra.weight": torch.zeros(2)})
    no_te = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    for name, tensors, says in (("missing.safetensors", missing, "missing"), ("extra.safetensors", extra, "unexpected"),
                                ("no_te.safetensors", no_te, "text encoder")):
        with pytest.raises(ModelLoadError, match=says) as info:
            load_sd_components(_save(tmp_path, name, tensors), tokenizer_dir=toy_tokenizer_dir)
        assert name in str(info.value)


def test_old_checkpoint_quirks_are_accepted(toy_sd1, toy_tokenizer_dir, tmp_path):
    """No `text_model.` in text-encoder keys, a position_ids buffer, linear VAE attention, EMA/schedule extras."""
    sd = {}
    for k, v in _ldm(toy_sd1).items():
        k = k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
        sd[k] = v.flatten(1) if k.startswith("first_stage_model.") and ".mid.attn_1.q." in k and v.ndim == 4 else v
    sd["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77).float()[None]
    sd["alphas_cumprod"] = torch.ones(1000)
    sd["model_ema.decay"] = torch.tensor(0.999)
    loaded = load_sd_components(_save(tmp_path, "old.safetensors", sd), tokenizer_dir=toy_tokenizer_dir)
    assert torch.equal(loaded.text_encoder.state_dict()["encoder.layers.0.mlp.fc1.weight"],
                       toy_sd1.text_encoder.state_dict()["encoder.layers.0.mlp.fc1.weight"])


def test_missing_tokenizer_says_where_to_get_one(toy_checkpoint, tmp_path, monkeypatch):
    from trainers.core import host

    monkeypatch.setattr(host, "tokenizer_dir", lambda family="sd1": None)
    with pytest.raises(ModelLoadError, match="sd1_tokenizer"):
        load_sd_components(toy_checkpoint)


def test_sha256_is_cached_by_path_size_and_mtime(tmp_path):
    from trainers.core import host

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * 1000)
    assert file_sha256(str(path)) == hashlib.sha256(b"x" * 1000).hexdigest()
    cache_file = os.path.join(host.temp_dir(), "personalize_sha256_cache.json")
    cache = json.load(open(cache_file))
    key = next(k for k in cache if k.startswith(str(path)))
    cache[key] = "from-cache"
    json.dump(cache, open(cache_file, "w"))
    assert file_sha256(str(path)) == "from-cache"
    os.utime(path, ns=(1, 1))  # a changed file is hashed again
    assert file_sha256(str(path)) == hashlib.sha256(b"x" * 1000).hexdigest()


# ---------------------------------------------------------------- key maps
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def _meta(cls, **config):
    with torch.device("meta"):
        return cls(**config)


def test_sd15_maps_cover_every_parameter_once():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet, vae = _meta(UNet2DConditionModel, **SD15_UNET), _meta(AutoencoderKL, **SD15_VAE)
    unet_map, vae_map = ldm_keys.unet_diffusers_to_ldm(unet.config), ldm_keys.vae_diffusers_to_ldm(vae.config)
    assert set(unet_map) == set(unet.state_dict()) and len(set(unet_map.values())) == len(unet_map) == 686
    assert set(vae_map) == set(vae.state_dict()) and len(set(vae_map.values())) == len(vae_map) == 248
    # Names as they are in the SD1.5 release checkpoint.
    for name in ("input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                 "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                 "input_blocks.11.0.emb_layers.1.bias", "middle_block.1.proj_in.weight", "middle_block.2.out_layers.3.weight",
                 "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.bias",
                 "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "time_embed.2.weight", "out.2.bias"):
        assert name in unet_map.values(), name
    for name in ("encoder.down.0.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight", "encoder.norm_out.bias",
                 "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
                 "decoder.up.3.block.2.conv2.weight", "decoder.mid.block_2.norm1.weight", "post_quant_conv.weight"):
        assert name in vae_map.values(), name
    assert unet_map["up_blocks.3.resnets.2.time_emb_proj.weight"] == "output_blocks.11.0.emb_layers.1.weight"
    assert vae_map["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "decoder.up.3.upsample.conv.weight"


def test_ldm_module_names():
    from diffusers import UNet2DConditionModel

    sd15 = _meta(UNet2DConditionModel, **SD15_UNET).config
    for diffusers_name, ldm in (
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
            ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
            ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
            ("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "middle_block.1.transformer_blocks.0.attn2.to_out.0"),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
            ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.5.1.transformer_blocks.0.ff.net.2"),
            ("up_blocks.3.resnets.1.conv1", "output_blocks.10.0.in_layers.2")):
        assert ldm_keys.ldm_module_name(sd15, diffusers_name) == ldm
    # BK-SDM: one res block per level, no mid block.
    bk = dict(sd15, layers_per_block=1, mid_block_type=None)
    assert ldm_keys.ldm_module_name(bk, "down_blocks.1.attentions.0.proj_out") == "input_blocks.3.1.proj_out"
    assert ldm_keys.ldm_module_name(bk, "up_blocks.1.upsamplers.0.conv") == "output_blocks.3.2.conv"
    assert ldm_keys.ldm_module_name(bk, "up_blocks.3.attentions.1.proj_in") == "output_blocks.7.1.proj_in"
    with pytest.raises(ldm_keys.KeyMapError):
        ldm_keys.ldm_module_name(bk, "mid_block.attentions.0.proj_in")


def test_full_single_file_map(toy_sd1, toy_checkpoint):
    sd = _ldm(toy_sd1)
    te_keys = [k for k in toy_sd1.text_encoder.state_dict() if not k.endswith("position_ids")]
    assert len(sd) == len(toy_sd1.unet.state_dict()) + len(toy_sd1.vae.state_dict()) + len(te_keys)
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in sd if k.startswith("cond_"))
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as LDM stores it
    parts = ldm_keys.ldm_to_diffusers(read_state_dict(toy_checkpoint)[0], toy_sd1.unet.config, toy_sd1.vae.config)
    for part in ("unet", "vae", "text_encoder"):
        original = getattr(toy_sd1, part).state_dict()
        assert set(parts[part]) == set(original) - {"embeddings.position_ids"}
        assert all(torch.equal(parts[part][k], original[k]) for k in parts[part]), part
