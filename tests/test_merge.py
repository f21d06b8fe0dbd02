"""Merging adapters (trainers/merge): bake, mix, re-rank and extract on tiny SD1.x and SDXL models, every
result checked against an independent computation (peft's own merge, the sum of the deltas, a known
low-rank change)."""
import copy

import pytest
import torch

from test_train_lora import cfg_for, env  # noqa: F401 (fixtures)
from trainers.core.safetensors_file import read, write
from trainers.families.ldm_keys import diffusers_to_ldm
from trainers.merge.adapter_file import AdapterError, read_adapter
from trainers.merge.bake import bake
from trainers.merge.combine import mix, rerank
from trainers.merge.extract import extract
from trainers.merge.outputs import MergeError, open_checkpoint
from trainers.networks import registry
from trainers.testing.toy_models import build_sdxl, save_single_file
from trainers.training.loop import train


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def toy_xl(toy_tokenizer_dir):
    return build_sdxl("tiny", tokenizer_dir=toy_tokenizer_dir)


@pytest.fixture
def bases(env, toy_sd1, toy_xl):
    """fp32 single files of both toy families in the test's models/checkpoints."""
    folder = env["root"] / "models" / "checkpoints"
    return {"sd1": save_single_file(toy_sd1, str(folder / "sd1.safetensors")),
            "sdxl": save_single_file(toy_xl, str(folder / "xl.safetensors"))}


def trained(env, comps, name, network="lora", seed=42, **kw):
    """A LoRA-type file trained on a copy of `comps` (locon preset, text encoders too); returns (path, model)."""
    model = copy.deepcopy(comps)
    result = train(cfg_for(env, steps=2, preset="locon", network=network, train_text_encoder=True, unet_lr=2e-2,
                           text_encoder_lr=2e-2, rank=4, alpha=2, conv_rank=2, conv_alpha=1, output_name=name,
                           seed=seed, save_precision="fp32", **kw), components=model)
    return result.lora_path, model


def merged_by_peft(model, network, unet_strength, text_strength):
    """The model with its adapters merged by peft itself at these strengths, as an LDM state dict."""
    net = registry.get(network)
    for part, strength in ((model.unet, unet_strength), *((e, text_strength) for e in model.text_encoders)):
        for name, layer in list(net.layers(part)):
            layer.scaling["default"] *= strength
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(part.get_submodule(parent) if parent else part, child, layer.get_base_layer())
    return diffusers_to_ldm(model)


@pytest.mark.parametrize("family,network", [("sd1", "lora"), ("sd1", "loha"), ("sdxl", "lokr"), ("sdxl", "lora")])
def test_bake_equals_peft_merging_the_adapter(env, bases, toy_sd1, toy_xl, family, network):
    comps = toy_sd1 if family == "sd1" else toy_xl
    path, model = trained(env, comps, f"bake_{family}_{network}", network)
    result = bake(bases[family], [(path, 0.7, 0.5)], f"baked_{family}_{network}")
    baked, meta = read(result.path)
    base, _ = read(bases[family])
    expected = merged_by_peft(model, network, 0.7, 0.5)
    assert set(baked) == set(base) == set(expected)
    changed = [k for k in base if not torch.equal(baked[k], base[k])]
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    assert any(k.startswith(("cond_stage_model.", "conditioner.embedders.1.")) for k in changed)
    for key in base:
        if key.startswith("first_stage_model."):
            assert torch.equal(baked[key], base[key]), key  # untouched: bit-exact
        else:
            assert torch.allclose(baked[key], expected[key], rtol=1e-5, atol=1e-6), (key, rel(baked[key], expected[key]))
    assert '"method": "bake"' in meta["personalize.merge"] and meta["modelspec.title"] == f"baked_{family}_{network}"


def test_exact_mix_is_the_weighted_sum_of_the_deltas_and_rank_truncation_errs_less_with_rank(env, bases, toy_sd1):
    a, _ = trained(env, toy_sd1, "mix_a", seed=1)
    b, _ = trained(env, toy_sd1, "mix_b", network="loha", seed=2)
    c, _ = trained(env, toy_sd1, "mix_c", seed=3)
    modules = open_checkpoint(bases["sd1"]).modules
    exact = mix(bases["sd1"], [(a, 0.6), (b, -0.4)], "mixed", save_dtype=torch.float32)
    assert exact.total_rel_error < 1e-4 and exact.kept_energy > 0.9999
    mixed, da, db = (read_adapter(p, modules).modules for p in (exact.path, a, b))
    assert set(mixed) == set(da) | set(db)
    for stem, delta in mixed.items():
        shape = modules.targets[stem].shape
        want = 0.6 * da[stem].weight(shape) - 0.4 * db[stem].weight(shape)
        assert rel(delta.weight(shape), want) < 1e-4, stem
    # Two plain LoRAs stack their factors: the ranks add up, nothing is approximated.
    stacked = mix(bases["sd1"], [(a, 1.0), (c, 0.5)], "stacked", save_dtype=torch.float32)
    assert {m.rank for m in stacked.modules} <= {4, 8} and 8 in {m.rank for m in stacked.modules}
    dc = read_adapter(c, modules).modules
    for stem, delta in read_adapter(stacked.path, modules).modules.items():
        shape = modules.targets[stem].shape
        assert rel(delta.weight(shape), da[stem].weight(shape) + 0.5 * dc[stem].weight(shape)) < 1e-5, stem
    errors = [rerank(bases["sd1"], stacked.path, f"r{r}", rank=r, save_dtype=torch.float32).total_rel_error
              for r in (1, 2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 1e-3 and errors[3] < 1e-4, errors


def test_rerank_by_energy_keeps_that_share_per_module(env, bases, toy_sd1):
    path, _ = trained(env, toy_sd1, "energy")
    result = rerank(bases["sd1"], path, "energy_90", energy=0.9)
    assert all(m.kept_energy >= 0.9 - 1e-6 for m in result.modules)
    assert min(m.rank for m in result.modules) < 4  # some modules need fewer directions than were trained


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_extract_recovers_a_known_low_rank_change(env, bases, family, tmp_path):
    base, meta = read(bases[family])
    modules = open_checkpoint(bases[family]).modules
    gen = torch.Generator().manual_seed(0)
    wanted = {}
    stems = [s for s in modules.extractable(conv=True) if "attn2_to_k" in s][:2] + \
        [s for s in modules.extractable(conv=True) if s.startswith(("lora_te_", "lora_te2_")) and "q_proj" in s][:1] + \
        [s for s in modules.extractable(conv=True) if modules.targets[s].spatial][:1]
    tuned = dict(base)
    for stem in stems:
        target = modules.targets[stem]
        out, rest = target.shape[0], target.shape[1:]
        change = (torch.randn(out, 2, generator=gen) @ torch.randn(2, int(torch.tensor(rest).prod()), generator=gen))
        change = change.reshape(target.shape) * 0.1
        wanted[stem] = change
        tensor = tuned[target.key].clone()
        (tensor[target.rows[0]:target.rows[1]] if target.rows else tensor).add_(change)
        tuned[target.key] = tensor
    tuned_path = str(tmp_path / "tuned.safetensors")
    write(tuned_path, tuned, meta)
    result = extract(bases[family], tuned_path, f"extracted_{family}", rank=4, conv_rank=4, save_dtype=torch.float32)
    got = read_adapter(result.path, modules).modules
    assert set(got) == set(wanted)  # every unchanged module left out
    for stem, change in wanted.items():
        assert rel(got[stem].weight(change.shape), change) < 1e-5, stem
    assert result.total_rel_error < 1e-5 and result.notes and "unchanged" in result.notes[0]
    by_energy = extract(bases[family], tuned_path, f"energy_{family}", rank=4, conv_rank=4, energy=0.999)
    assert {m.rank for m in by_energy.modules} == {2}  # the two directions the change has


def test_extract_refuses_checkpoints_of_different_architectures(bases):
    with pytest.raises(MergeError, match="is SDXL and .* is SD1.x"):
        extract(bases["sd1"], bases["sdxl"], "nope")


def test_adapters_in_peft_and_comfyui_key_formats_read_as_the_kohya_file(env, bases, toy_sd1, tmp_path):
    from trainers.networks.targets import kohya_stem

    path, model = trained(env, toy_sd1, "formats")
    modules = open_checkpoint(bases["sd1"]).modules
    kohya, _ = read(path)
    net = registry.get("lora")
    names = {kohya_stem(n, "lora_unet_"): ("unet." + n, modules.targets[kohya_stem(n, "lora_unet_")].key)
             for n, _ in net.layers(model.unet)}
    names |= {kohya_stem(n, "lora_te_"): ("text_encoder." + n, None) for n, _ in net.layers(model.text_encoder)}
    peft, comfy = {}, {}
    for key, tensor in kohya.items():
        stem, suffix = key.split(".", 1)
        diffusers, ldm = names[stem]
        if suffix == "alpha":  # peft files carry no alpha: their scale is 1, so fold alpha / rank into B
            continue
        scale = float(kohya[f"{stem}.alpha"]) / kohya[f"{stem}.lora_down.weight"].shape[0]
        peft[f"{diffusers}.{'lora_A' if 'down' in suffix else 'lora_B'}.weight"] = \
            tensor * (scale if "up" in suffix else 1.0)
        comfy_stem = ("diffusion_model." + ldm[len("model.diffusion_model."):-len(".weight")] if ldm else
                      "text_encoders.clip_l.transformer." + diffusers[len("text_encoder."):])
        comfy[f"{comfy_stem}.{suffix}"] = tensor
        comfy[f"{comfy_stem}.alpha"] = kohya[f"{stem}.alpha"]
    ours = read_adapter(path, modules).modules
    for layout, tensors in (("peft", peft), ("comfy", comfy)):
        other = str(tmp_path / f"{layout}.safetensors")
        write(other, tensors)
        theirs = read_adapter(other, modules).modules
        assert set(theirs) == set(ours), layout
        for stem, delta in ours.items():
            shape = modules.targets[stem].shape
            assert rel(theirs[stem].weight(shape), delta.weight(shape)) < 1e-6, (layout, stem)


def test_an_adapter_for_another_model_is_refused_with_what_it_is(env, bases, toy_xl):
    path, _ = trained(env, toy_xl, "xl_for_sd1")
    with pytest.raises(AdapterError, match="made for another model"):
        bake(bases["sd1"], [(path, 1.0, 1.0)], "wrong")


def test_the_command_line_extracts_and_bakes_and_names_a_wrong_pair(env, bases, toy_sd1, capsys):
    from trainers.cli.main import main

    models = str(env["root"] / "models")
    path, _ = trained(env, toy_sd1, "cli_lora")
    assert main(["--models-dir", models, "merge", "bake", "--base", "sd1.safetensors", "--lora",
                 "cli_lora.safetensors:0.5:0", "--name", "cli_baked"]) == 0
    assert (env["root"] / "models" / "checkpoints" / "cli_baked.safetensors").is_file()
    report = env["root"] / "report.csv"
    assert main(["--models-dir", models, "merge", "extract", "--base", "sd1.safetensors", "--tuned",
                 "cli_baked.safetensors", "--rank", "4", "--name", "cli_extracted", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "cli_extracted.safetensors (lora)" in out and "kept energy" in out
    rows = report.read_text().splitlines()
    assert rows[0] == "module,rank,kept_energy,rel_error" and len(rows) > 10
    assert main(["--models-dir", models, "merge", "extract", "--base", "sd1.safetensors", "--tuned",
                 "xl.safetensors", "--name", "nope"]) == 2
    assert "a LoRA can only be extracted between two checkpoints of one architecture" in capsys.readouterr().err


def test_the_merge_nodes_write_where_the_loaders_look_and_say_what_they_did(env, bases, toy_sd1):
    import sys

    from pack_loader import load_pack

    pack = load_pack()
    sys.modules[f"{pack.__name__}.trainers.core.host"].configure(models_dir=str(env["root"] / "models"))
    nodes = pack.NODE_CLASS_MAPPINGS
    a, _ = trained(env, toy_sd1, "node_a", seed=1)
    b, _ = trained(env, toy_sd1, "node_b", seed=2)
    baked = nodes["PersonalizeBakeLoRA"]().run("sd1.safetensors", "node_a.safetensors", 1.0, 1.0, "node_baked",
                                               lora_2="node_b.safetensors", strength_model_2=0.5,
                                               strength_clip_2=0.0, lora_3="(none)", device="cpu")
    assert baked["result"] == ("node_baked.safetensors",) and "node_baked.safetensors (checkpoint)" in \
        baked["ui"]["text"][0]
    extracted = nodes["PersonalizeExtractLoRA"]().run("sd1.safetensors", "nope.safetensors", 8, 2, 0.0,
                                                      "node_extracted", trained_checkpoint="node_baked.safetensors",
                                                      device="cpu")
    assert extracted["result"] == ("node_extracted.safetensors",)
    mixed = nodes["PersonalizeMixLoRAs"]().run("sd1.safetensors", "node_a.safetensors", 1.0, "node_b.safetensors",
                                               0.5, "rank", 4, 0.95, "node_mixed", device="cpu")
    assert mixed["result"] == ("node_mixed.safetensors",) and "rank 4;" in mixed["ui"]["text"][0]
    reranked = nodes["PersonalizeRerankLoRA"]().run("sd1.safetensors", "x", "energy", 4, 0.9, "node_small",
                                                    trained_lora="node_mixed.safetensors", device="cpu")
    assert reranked["result"] == ("node_small.safetensors",)
    again = nodes["PersonalizeRerankLoRA"]().run("sd1.safetensors", "node_mixed.safetensors", "rank", 2, 0.9,
                                                 "node_small", device="cpu")
    assert again["result"] == ("node_small_2.safetensors",)  # never overwritten


def test_cancel_during_a_bake_leaves_no_file(env, bases, toy_sd1, monkeypatch):
    import os

    from trainers.core import host

    path, _ = trained(env, toy_sd1, "cancel_lora")
    calls = []

    def cancel_at_third(done, total):
        calls.append(done)
        if done == 3:
            host.request_interrupt()  # the next tensor's check raises, as ComfyUI's Cancel does

    with pytest.raises(host.Interrupted):
        bake(bases["sd1"], [(path, 1.0, 1.0)], "cancelled", progress=cancel_at_third)
    folder = env["root"] / "models" / "checkpoints"
    assert calls == [1, 2, 3] and sorted(os.listdir(folder)) == ["sd1.safetensors", "xl.safetensors"]
