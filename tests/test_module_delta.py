"""The weight change of one adapter-file module (trainers.merge.module_delta): equal to what our trained peft
layers do for every network we write, equal to ComfyUI's formulas for the variants we only read, and refusing
incomplete, mixed and DoRA modules by name. (tests/comfy_module_delta_equivalence.py checks the same variants
against ComfyUI's own code, run in its venv.)"""
import pytest
import torch
import torch.nn.functional as F

from comfy_module_delta_equivalence import cases
from trainers.merge.module_delta import ModuleDelta, group_by_module, module_deltas
from trainers.networks import registry
from trainers.networks.targets import UNET_PREFIX, kohya_stem

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 2, 5.0, 4, 3.0  # alpha != rank: a wrong scale shows


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)  # spatial: conv_rank / conv_alpha
        self.proj = torch.nn.Conv2d(16, 32, 1)  # 1x1: rank / alpha
        self.inputs = {"fc": (3, 32), "conv": (2, 8, 5, 5), "proj": (2, 16, 5, 5)}


def forward_with(base, weight, x):
    """The base layer's forward with another weight."""
    if isinstance(base, torch.nn.Linear):
        return F.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_our_files_give_the_change_the_trained_layer_makes(kind):
    g = torch.Generator().manual_seed(0)
    model = Tiny()
    net = registry.get(kind)
    params = net.attach(model, ["fc", "conv", "proj"], RANK, ALPHA, -1, CONV_RANK, CONV_ALPHA)
    with torch.no_grad():
        for p in params:  # peft zeroes one factor: the change would be 0 whatever the math
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    deltas, unknown = module_deltas(net.state_dict(model, None, dtype=torch.float32))
    assert unknown == []
    layers = dict(net.layers(model))
    assert set(deltas) == {kohya_stem(name, UNET_PREFIX) for name in layers}
    with torch.no_grad():
        for name, layer in layers.items():
            delta, base = deltas[kohya_stem(name, UNET_PREFIX)], layer.get_base_layer()
            assert delta.kind == kind
            assert delta.alpha == (CONV_ALPHA if name == "conv" else ALPHA)
            ours = delta.weight(base.weight.shape)
            assert ours.shape == base.weight.shape and ours.dtype == torch.float32
            x = torch.randn(model.inputs[name], generator=g)
            plain = base(x)
            change = layer(x) - plain  # the adapter's effect on the output, as trained
            assert change.norm() > 0
            assert rel(forward_with(base, base.weight + ours, x) - plain, change) < 1e-5, name
            assert rel(ours, net.delta_weight(layer)) < 1e-5, name
    if kind == "lokr":  # both of peft's LoKr layouts came through: w2 full (scale 1, alpha ignored) and factored
        suffixes = {s for d in deltas.values() for s in d.tensors}
        assert {"lokr_w2", "lokr_w2_a", "lokr_w2_b"} <= suffixes
        assert deltas["lora_unet_conv"].scale == 1.0 and deltas["lora_unet_fc"].scale == ALPHA / RANK


def comfy_formula(t: dict, shape):
    """(weight change, bias change) ComfyUI applies at strength 1, following comfy/weight_adapter/lora.py, loha.py,
    lokr.py and comfy/lora.py line by line (its own reshapes, not ours)."""
    f = {k: v.float() for k, v in t.items()}
    alpha = float(t["alpha"]) if "alpha" in t else None
    bias = f.get("diff_b")
    if "lora_up.weight" in f:
        mat1, mat2 = f["lora_up.weight"], f["lora_down.weight"]
        scale = alpha / mat2.shape[0] if alpha is not None else 1.0
        if "lora_mid.weight" in f:
            mat3 = f["lora_mid.weight"]
            final_shape = [mat2.shape[1], mat2.shape[0], mat3.shape[2], mat3.shape[3]]
            mat2 = torch.mm(mat2.transpose(0, 1).flatten(start_dim=1),
                            mat3.transpose(0, 1).flatten(start_dim=1)).reshape(final_shape).transpose(0, 1)
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(shape)
        return scale * diff, bias
    if "hada_w1_a" in f:
        scale = alpha / f["hada_w1_b"].shape[0] if alpha is not None else 1.0
        if "hada_t1" in f:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
        else:
            m1, m2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
        return scale * (m1 * m2).reshape(shape), bias
    if any(k.startswith("lokr_") for k in f):
        dim, w1, w2 = None, f.get("lokr_w1"), f.get("lokr_w2")
        if w1 is None:
            dim, w1 = f["lokr_w1_b"].shape[0], f["lokr_w1_a"] @ f["lokr_w1_b"]
        if w2 is None:
            dim = f["lokr_w2_b"].shape[0]
            if "lokr_t2" in f:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
            else:
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        # contiguous: ComfyUI as shipped fails here for lokr_t2 (see the module docstring)
        return scale * torch.kron(w1, w2.contiguous()).reshape(shape), bias
    return f.get("diff", torch.zeros(shape)), bias


@pytest.mark.parametrize("name,tensors,shape", cases(), ids=[c[0] for c in cases()])
def test_every_variant_matches_comfy_formulas(name, tensors, shape):
    delta = ModuleDelta.from_tensors("lora_unet_m", tensors)
    assert delta.kind == {"diff": "full", "diff_b": "full"}.get(name.split()[0], name.split()[0])
    weight, bias = comfy_formula(tensors, shape)
    ours = delta.weight(shape)
    assert ours.dtype == torch.float32 and ours.shape == torch.Size(shape)
    assert float((ours - weight).norm()) <= 1e-6 * max(float(weight.norm()), 1e-30)
    assert (delta.bias() is None) == (bias is None)
    if bias is not None:
        assert torch.equal(delta.bias(), bias)


def test_scale_rules():
    c = {name: ModuleDelta.from_tensors("s", t) for name, t, _ in cases()}
    assert c["lora no alpha"].scale == 1.0 and c["lora no alpha"].alpha is None
    assert c["lora mid (tucker)"].rank == 3  # lora_down's rows, not the mid's kernel
    assert c["lokr w1 + w2 full (alpha ignored)"].rank is None
    assert c["lokr w1 + w2 full (alpha ignored)"].scale == 1.0
    assert c["lokr w1_a/b + w2 full"].rank == 1  # w1_b's rank when only w1 is factored
    assert c["lokr w1_a/b + w2_a/b (w2_b's rank)"].rank == 3  # w2_b's wins over w1_b's (1)
    assert c["loha cp (t1/t2)"].scale == 4 / 3
    assert c["diff + diff_b"].rank is None and c["diff + diff_b"].scale == 1.0


def test_half_precision_inputs_are_computed_in_float32():
    # 300 * 300 = 90000 overflows fp16 (max 65504); times alpha / rank = 0.25 it fits again
    t = {"lora_down.weight": torch.full((1, 2), 300.0, dtype=torch.float16),
         "lora_up.weight": torch.full((3, 1), 300.0, dtype=torch.float16), "alpha": torch.tensor(0.25).half()}
    delta = ModuleDelta.from_tensors("s", t)
    assert torch.equal(delta.weight((3, 2)), torch.full((3, 2), 22500.0))
    assert torch.equal(delta.weight((3, 2), dtype=torch.float16), torch.full((3, 2), 22500.0).half())


def test_results_stay_on_the_tensors_device():
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    alpha = torch.tensor(2.0)
    for t, shape in (({"lora_down.weight": meta(2, 6), "lora_up.weight": meta(8, 2), "alpha": alpha}, (8, 6)),
                     ({"hada_w1_a": meta(8, 2), "hada_w1_b": meta(2, 6), "hada_w2_a": meta(8, 2),
                       "hada_w2_b": meta(2, 6), "alpha": alpha}, (8, 6)),
                     ({"lokr_w1": meta(2, 2), "lokr_w2_a": meta(4, 2), "lokr_w2_b": meta(2, 3), "alpha": alpha},
                      (8, 6)),
                     ({"diff_b": meta(8)}, (8, 6))):
        delta = ModuleDelta.from_tensors("s", t)
        assert delta.weight(shape).device.type == "meta", delta.kind


def test_full_diff_and_bias_are_copies():
    t = {"diff": torch.ones(2, 3), "diff_b": torch.ones(2)}
    delta = ModuleDelta.from_tensors("s", t)
    delta.weight((2, 3)).add_(1)
    delta.bias().add_(1)
    assert torch.equal(t["diff"], torch.ones(2, 3)) and torch.equal(t["diff_b"], torch.ones(2))
    assert ModuleDelta.from_tensors("s", {"lora_down.weight": torch.ones(1, 3),
                                          "lora_up.weight": torch.ones(2, 1)}).bias() is None
    only_bias = ModuleDelta.from_tensors("s", {"diff_b": torch.ones(2)})
    assert only_bias.kind == "full" and torch.equal(only_bias.weight((2, 3)), torch.zeros(2, 3))


def test_group_by_module_splits_on_the_known_suffix():
    sd = {"lora_unet_a.lora_down.weight": 1, "lora_unet_a.lora_up.weight": 2, "lora_unet_a.alpha": 3,
          "lora_te_b.diff": 4, "lora_te_b.diff_b": 5, "unet.mid.attn.hada_w1_a": 6, "lora_unet_c.dora_scale": 7,
          "lora_unet_d.w_norm": 8, "lora_unet_e.lora_A.weight": 9, "alpha": 10}
    modules, unknown = group_by_module(sd)
    assert modules == {"lora_unet_a": {"lora_down.weight": 1, "lora_up.weight": 2, "alpha": 3},
                       "lora_te_b": {"diff": 4, "diff_b": 5}, "unet.mid.attn": {"hada_w1_a": 6},
                       "lora_unet_c": {"dora_scale": 7}}
    assert unknown == ["lora_unet_d.w_norm", "lora_unet_e.lora_A.weight", "alpha"]


T = torch.zeros
BAD = {
    "only lora_down": ({"lora_down.weight": T(2, 4), "alpha": T(())}, "missing ['lora_up.weight']"),
    "dora": ({"lora_down.weight": T(2, 4), "lora_up.weight": T(4, 2), "dora_scale": T(4, 1)}, "DoRA"),
    "mixed": ({"lora_down.weight": T(2, 4), "lora_up.weight": T(4, 2), "hada_w1_a": T(4, 2)}, "mixes"),
    "diff with lora": ({"lora_down.weight": T(2, 4), "lora_up.weight": T(4, 2), "diff": T(4, 4)}, "mixes"),
    "alpha only": ({"alpha": T(())}, "no weight tensors"),
    "loha t1 alone": ({"hada_w1_a": T(2, 4), "hada_w1_b": T(2, 4), "hada_w2_a": T(2, 4), "hada_w2_b": T(2, 4),
                       "hada_t1": T(2, 2, 3, 3)}, "hada_t1 and hada_t2"),
    "loha half": ({"hada_w1_a": T(4, 2), "hada_w1_b": T(2, 4)}, "missing ['hada_w2_a', 'hada_w2_b']"),
    "lokr no w2": ({"lokr_w1": T(2, 2)}, "needs lokr_w2 or lokr_w2_a + lokr_w2_b"),
    "lokr w1 twice": ({"lokr_w1": T(2, 2), "lokr_w1_a": T(2, 1), "lokr_w2": T(2, 2)}, "both lokr_w1"),
    "lokr t2 with full w2": ({"lokr_w1": T(2, 2), "lokr_w2": T(2, 2), "lokr_t2": T(1, 1, 3, 3)}, "lokr_t2"),
    "unknown suffix": ({"lora_down.weight": T(2, 4), "lora_up.weight": T(4, 2), "lora_A.weight": T(2, 4)},
                       "unknown"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_modules_are_refused_by_name(case):
    tensors, why = BAD[case]
    with pytest.raises(ValueError) as e:
        ModuleDelta.from_tensors("lora_unet_x_y", tensors)
    assert "lora_unet_x_y" in str(e.value) and why in str(e.value)
    assert all(k in str(e.value) for k in tensors)  # the keys it had


def test_module_deltas_refuses_a_bad_module_of_a_file():
    sd = {"lora_unet_ok.lora_down.weight": T(2, 4), "lora_unet_ok.lora_up.weight": T(4, 2),
          "lora_unet_bad.lora_up.weight": T(4, 2)}
    with pytest.raises(ValueError, match="lora_unet_bad"):
        module_deltas(sd)


def test_a_change_that_does_not_fit_the_weight_is_refused_by_name():
    lora = ModuleDelta.from_tensors("lora_unet_z", {"lora_down.weight": T(2, 4), "lora_up.weight": T(4, 2)})
    assert lora.weight((4, 4)).shape == (4, 4) and lora.weight((4, 1, 2, 2)).shape == (4, 1, 2, 2)
    with pytest.raises(ValueError, match="lora_unet_z"):
        lora.weight((4, 5))
    diff = ModuleDelta.from_tensors("lora_unet_z", {"diff": T(4, 4)})
    with pytest.raises(ValueError, match="lora_unet_z"):
        diff.weight((4, 4, 1, 1))  # ComfyUI does not reshape a diff: it skips it
    bad_rank = ModuleDelta.from_tensors("lora_unet_z", {"lora_down.weight": T(3, 4), "lora_up.weight": T(4, 2)})
    with pytest.raises(ValueError, match="lora_unet_z"):
        bad_rank.weight((4, 4))
