"""The kohya LoRA file contract, checked without ComfyUI: which modules each preset trains, the key names
ComfyUI's LoraLoader maps, the tensor shapes it multiplies, and the metadata A1111 and Civitai read.

The expected module sets are built here from the model itself (module classes, as kohya's sd-scripts picks
them), not from trainers/networks/lora.py's patterns."""
import copy
import datetime
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.core import host
from trainers.networks import lora as lora_network
from trainers.core.config import TrainConfig
from trainers.testing.demo import make_photos
from trainers.training.loop import train

RANK, ALPHA = 4, 2
PRESETS = ("attn", "kohya", "locon")
# ComfyUI's comfy/lora.py LORA_CLIP_MAP: the CLIP modules it maps for lora_te_text_model_encoder_layers_N_*.
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}
# kohya's sd-scripts: LoRA on every Linear/Conv2d inside these UNet blocks (LoCon adds the conv blocks).
PRESET_BLOCKS = {"attn": ("Attention",), "kohya": ("Transformer2DModel",),
                 "locon": ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, toy_sd1):
    """One LoRA file per preset, UNet and text encoder, trained a step on two photos."""
    root = tmp_path_factory.mktemp("contract")
    before = dict(host._local)
    host.configure(models_dir=str(root / "models"), output_dir=str(root / "output"))
    try:
        photos = make_photos(str(root / "photos"), count=2, size=64)
        files = {}
        for preset in PRESETS:
            cfg = TrainConfig(base_model="toy", dataset=photos, output_name=f"contract_{preset}", trigger_word="sks",
                              preset=preset, rank=RANK, alpha=ALPHA, steps=1, resolution=64, unet_lr=1e-3,
                              train_text_encoder=True, lr_scheduler="constant", warmup_steps=0, save_every=0,
                              validation_every=0, resume=False)
            files[preset] = train(cfg, components=copy.deepcopy(toy_sd1)).lora_path
    finally:
        host._local.clear()
        host._local.update(before)
    return {"files": files, "photos": photos}


def stems(path) -> set[str]:
    return {k.split(".", 1)[0] for k in load_file(path)}


def clip_layers(text_encoder) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in text_encoder.named_modules() if type(m).__name__ == "CLIPEncoderLayer"]


def preset_modules(unet, preset) -> dict[str, torch.nn.Module]:
    """Full name -> module of every Linear / Conv2d inside the preset's blocks."""
    out = {}
    for block_name, block in unet.named_modules():
        if type(block).__name__ in PRESET_BLOCKS[preset]:
            for sub, module in block.named_modules():
                if sub and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    out[f"{block_name}.{sub}"] = module
    return out


def kohya_modules(toy_sd1) -> dict[str, torch.nn.Module]:
    """Every key stem ComfyUI's key map would accept, to its module: UNet by diffusers name, CLIP by layer."""
    unet = {"lora_unet_" + n.replace(".", "_"): m for n, m in toy_sd1.unet.named_modules() if n}
    te = {f"lora_te_text_model_encoder_layers_{i}_{short}": layer.get_submodule(name)
          for i, (_, layer) in enumerate(clip_layers(toy_sd1.text_encoder)) for name, short in COMFY_CLIP_MAP.items()}
    return {**unet, **te}


# ---- the text encoder ------------------------------------------------------------------

def test_text_encoder_targets_are_every_linear_of_every_clip_layer(toy_sd1):
    te = toy_sd1.text_encoder
    layers = clip_layers(te)
    assert len(layers) == te.config.num_hidden_layers >= 2
    expected = set()
    for name, layer in layers:
        linears = {sub for sub, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears == set(COMFY_CLIP_MAP)  # attention q/k/v/out and the MLP's fc1/fc2
        expected |= {f"{name}.{sub}" for sub in linears}
    targets = lora_network.text_encoder_targets(te)
    assert sorted(targets) == sorted(expected) and len(targets) == len(set(targets))


@pytest.mark.parametrize("preset", PRESETS)
def test_saved_text_encoder_keys_are_comfyuis_clip_keys(saved, toy_sd1, preset):
    layers = toy_sd1.text_encoder.config.num_hidden_layers
    te = {s for s in stems(saved["files"][preset]) if s.startswith("lora_te_")}
    for n in range(layers):
        assert {f"lora_te_text_model_encoder_layers_{n}_mlp_fc1", f"lora_te_text_model_encoder_layers_{n}_mlp_fc2"} <= te
    assert te == {f"lora_te_text_model_encoder_layers_{n}_{short}"
                  for n in range(layers) for short in COMFY_CLIP_MAP.values()}


# ---- the UNet, per preset --------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_trains_every_layer_of_its_blocks(saved, toy_sd1, preset):
    expected = preset_modules(toy_sd1.unet, preset)
    assert expected, preset
    assert sorted(lora_network.unet_targets(toy_sd1.unet, preset)) == sorted(expected)
    unet = {s for s in stems(saved["files"][preset]) if s.startswith("lora_unet_")}
    assert unet == {"lora_unet_" + n.replace(".", "_") for n in expected}


def test_presets_grow_attn_then_kohya_then_locon(saved):
    attn, kohya, locon = (stems(saved["files"][p]) for p in PRESETS)
    assert attn < kohya < locon
    assert any(s.endswith("_ff_net_2") for s in kohya - attn) and any(s.endswith("_conv1") for s in locon - kohya)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_key_is_a_down_up_alpha_triple_comfyui_can_apply(saved, toy_sd1, preset):
    tensors = load_file(saved["files"][preset])
    modules = kohya_modules(toy_sd1)
    for stem in stems(saved["files"][preset]):
        assert {k for k in tensors if k.split(".", 1)[0] == stem} == {
            f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"}
        assert stem in modules, stem  # a module ComfyUI's key map knows (else: "lora key not loaded")
        weight = modules[stem].weight
        down, up, alpha = (tensors[f"{stem}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == up.shape[1] == RANK and alpha.numel() == 1 and float(alpha) == ALPHA
        assert up.shape[0] == weight.shape[0] and down.shape[1:] == weight.shape[1:]
        # What ComfyUI computes: up.flatten(1) @ down.flatten(1), reshaped to the weight.
        assert (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape).shape == weight.shape


# ---- metadata ----------------------------------------------------------------------------

def addnet_hash(path) -> str:
    """sha256 of a safetensors file past its header: what A1111 and kohya store as sshs_model_hash."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("preset", PRESETS)
def test_metadata_a1111_and_civitai_read(saved, preset):
    path = saved["files"][preset]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert int(meta["ss_network_dim"]) == RANK and float(meta["ss_network_alpha"]) == ALPHA
    args = json.loads(meta["ss_network_args"])
    if preset == "locon":  # conv layers: their rank and alpha, as kohya's LoCon writes them
        assert int(args["conv_dim"]) == RANK and float(args["conv_alpha"]) == ALPHA
    else:
        assert "conv_dim" not in args
    assert meta["ss_network_train_unet_only"] == "False" and float(meta["ss_text_encoder_lr"]) > 0
    assert meta["ss_base_model_version"].startswith("sd_v1") and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == f"contract_{preset}" and meta["ss_num_train_images"] == "2"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_steps"] == "1"
    freq = json.loads(meta["ss_tag_frequency"])
    assert list(freq) == [os.path.basename(saved["photos"])] and freq[os.path.basename(saved["photos"])]["sks"] == 2
    assert meta["sshs_model_hash"] == addnet_hash(path)
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == f"contract_{preset}" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.trigger_phrase"] == "sks" and meta["modelspec.implementation"].startswith("https://")
    assert abs(datetime.datetime.fromisoformat(meta["modelspec.date"]) - datetime.datetime.now()) < \
        datetime.timedelta(hours=1)


def test_legacy_hash_covers_the_header_with_training_metadata_as_kohya():
    """kohya hashes the file as saved with its ss_* metadata: 64 KiB at 1 MiB (so the header shifts
    what is hashed) for sshs_legacy_hash, the bytes past the header for sshs_model_hash."""
    from safetensors.torch import save

    from trainers.networks.lora_metadata import tensor_hashes

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(1 << 20, dtype=torch.float32).reshape(1024, 1024)}
    meta = {"ss_network_dim": "4", "ss_output_name": "x" * 300, "modelspec.title": "ignored by the hashes"}
    data = save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    full, legacy = tensor_hashes(tensors, meta)
    assert full == hashlib.sha256(data[8 + header:]).hexdigest()
    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert legacy != tensor_hashes(tensors, {})[1]  # the metadata moves the window: it must be included
