"""LoHa and LoKr (LyCORIS) next to LoRA: trainable parameters, training, file keys, the weight change as
ComfyUI computes it from the file, round trip and metadata, on the tiny SD1.x model."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.core.config import ConfigError, TrainConfig, choices
from trainers.networks.peft_network import is_spatial_conv

NETWORKS = choices("network")
from trainers.networks import registry, targets
from trainers.training.loop import train

from test_train_lora import cfg_for, env, fresh  # noqa: F401  (fixtures)

SUFFIXES = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
            "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
            "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}
LYCORIS = ("loha", "lokr")


def comfy_delta(kind, t, stem, shape):
    """The weight change ComfyUI's comfy/weight_adapter (lora.py, loha.py, lokr.py) applies at strength 1,
    written from its formulas, not from our code."""
    g = lambda s: t.get(f"{stem}.{s}")  # noqa: E731
    alpha = float(g("alpha"))
    if kind == "lora":
        up, down = g("lora_up.weight"), g("lora_down.weight")
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * (alpha / down.shape[0])
    if kind == "loha":
        diff = (g("hada_w1_a") @ g("hada_w1_b")) * (g("hada_w2_a") @ g("hada_w2_b"))
        return diff.reshape(shape) * (alpha / g("hada_w1_b").shape[0])
    dim, w1, w2 = None, g("lokr_w1"), g("lokr_w2")
    if w1 is None:
        dim, w1 = g("lokr_w1_b").shape[0], g("lokr_w1_a") @ g("lokr_w1_b")
    if w2 is None:
        dim, w2 = g("lokr_w2_b").shape[0], g("lokr_w2_a") @ g("lokr_w2_b")
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * (alpha / dim if dim is not None else 1.0)


def test_registry_has_every_configurable_network():
    assert set(registry.NETWORKS) == set(NETWORKS)


@pytest.mark.parametrize("kind", LYCORIS)
def test_trainable_parameters_are_exactly_the_adapters(fresh, kind):
    comps = fresh()
    net = registry.get(kind)
    params = net.attach(comps.unet, targets.unet_targets(comps.unet, "locon"), 4, 2.0)
    assert params
    trainable = {n for n, p in comps.unet.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in comps.unet.parameters() if p.requires_grad}
    assert all(any(f".{t}." in n for t in net.tensors) for n in trainable), trainable
    assert len(list(net.layers(comps.unet))) == len(targets.unet_targets(fresh().unet, "locon"))


@pytest.mark.parametrize("kind", LYCORIS)
def test_training_changes_the_unet_and_the_file_round_trips_exactly(env, fresh, kind):
    comps = fresh()
    result = train(cfg_for(env, network=kind, steps=3, preset="locon", rank=4, alpha=2, train_text_encoder=True,
                           save_precision="fp32"), components=comps)
    net = registry.get(kind)
    loaded = fresh()
    net.attach(loaded.unet, targets.unet_targets(loaded.unet, "locon"), 4, 4.0)
    net.attach(loaded.text_encoder, targets.text_encoder_targets(loaded.text_encoder), 4, 4.0)
    assert net.load(load_file(result.lora_path), loaded.unet, loaded.text_encoder) == []
    ids = torch.tensor([[1, 2, 3] + [0] * 74])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    with torch.no_grad():
        for c in (comps, loaded, fresh()):
            c.unet.eval()
            outs.append(c.unet(x, torch.tensor([500]), c.text_encoder(ids)[0]).sample)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


@pytest.mark.parametrize("kind", LYCORIS)
def test_every_saved_key_is_lycoris_and_names_an_adapted_module(env, fresh, toy_sd1, kind):
    result = train(cfg_for(env, network=kind, steps=1, preset="locon", train_text_encoder=True), components=fresh())
    keys = load_file(result.lora_path).keys()
    modules = {targets.kohya_stem(n, targets.UNET_PREFIX) for n in targets.unet_targets(toy_sd1.unet, "locon")}
    modules |= {targets.kohya_stem(n, targets.TE_PREFIX) for n in targets.text_encoder_targets(toy_sd1.text_encoder)}
    stems = {k.split(".")[0] for k in keys}
    assert stems == modules
    assert {k.split(".", 1)[1] for k in keys} <= SUFFIXES[kind]
    for stem in stems:  # each module carries one complete weight change
        mine = {k.split(".", 1)[1] for k in keys if k.split(".")[0] == stem}
        assert mine in ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                        {"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}), (stem, mine)


@pytest.mark.parametrize("conv", [(0, 0.0), (2, 1.0)], ids=["conv_as_rank", "conv_rank_2"])
@pytest.mark.parametrize("kind", NETWORKS)
def test_weight_change_from_the_file_is_comfyuis(fresh, kind, conv):
    """Random adapters (alpha != rank, and a conv rank of its own): ComfyUI's formula on the saved tensors = our
    delta = peft's merge."""
    comps = fresh()
    net = registry.get(kind)
    net.attach(comps.unet, targets.unet_targets(comps.unet, "locon"), 4, 2.0, -1, *conv)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in comps.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    tensors = net.state_dict(comps.unet, dtype=torch.float32)
    seen = set()
    for name, layer in net.layers(comps.unet):
        stem = targets.kohya_stem(name, targets.UNET_PREFIX)
        base = layer.get_base_layer().weight.detach().clone()
        expected = comfy_delta(kind, tensors, stem, base.shape)
        ours = net.delta_weight(layer)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        merged = copy.deepcopy(layer)
        merged.merge()
        torch.testing.assert_close(merged.get_base_layer().weight - base, expected, rtol=1e-4, atol=1e-5)
        seen.add(f"{stem}.lokr_w2" in tensors)
    if kind == "lokr":
        assert seen == {True, False}  # both full and factored w2 were checked


@pytest.mark.parametrize("kind", NETWORKS)
def test_conv_rank_and_alpha_apply_to_the_3x3_convs_only(env, fresh, kind):
    result = train(cfg_for(env, network=kind, steps=1, preset="locon", rank=4, alpha=4, conv_rank=2, conv_alpha=1),
                   components=fresh())
    tensors = load_file(result.lora_path)
    unet = fresh().unet
    spatial = {targets.kohya_stem(n, targets.UNET_PREFIX) for n in targets.unet_targets(unet, "locon")
               if is_spatial_conv(unet.get_submodule(n))}
    stems = {k.split(".")[0] for k in tensors}
    assert spatial and spatial < stems
    rank_of = {"lora": lambda s: tensors[f"{s}.lora_down.weight"].shape[0],
               "loha": lambda s: tensors[f"{s}.hada_w1_b"].shape[0]}.get(kind)
    for stem in stems:
        conv = stem in spatial
        assert float(tensors[f"{stem}.alpha"]) == (1.0 if conv else 4.0), stem
        if rank_of:
            assert rank_of(stem) == (2 if conv else 4), stem
    with safe_open(result.lora_path, "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert args["conv_dim"] == "2" and float(args["conv_alpha"]) == 1.0


@pytest.mark.parametrize("kind", LYCORIS)
def test_metadata_names_the_lycoris_algorithm(env, fresh, kind):
    result = train(cfg_for(env, network=kind, steps=1, preset="locon", rank=4, alpha=2, lokr_factor=4),
                   components=fresh())
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == kind and args["conv_dim"] == "4" and float(args["conv_alpha"]) == 2.0
    assert args.get("factor") == ("4" if kind == "lokr" else None)


def test_lokr_factor_shapes_the_kronecker_factors(fresh):
    comps = fresh()
    net = registry.get("lokr")
    net.attach(comps.unet, targets.unet_targets(comps.unet, "attn"), 4, 4.0, factor=4)
    assert {tuple(layer.lokr_w1["default"].shape) for _, layer in net.layers(comps.unet)} == {(4, 4)}


def test_network_config_is_checked_and_old_configs_load():
    assert TrainConfig.from_dict({"rank": 8}).network == "lora"
    base = dict(base_model="b", dataset="d")
    with pytest.raises(ConfigError, match="network='lycoris' is not one of lora, loha, lokr"):
        TrainConfig(network="lycoris", **base).validate()
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="lokr_factor"):
            TrainConfig(lokr_factor=bad, **base).validate()
    TrainConfig(network="lokr", lokr_factor=8, **base).validate()
