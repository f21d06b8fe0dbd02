"""The SVD step of re-rank, mix and extract: a dense delta -> kohya LoRA / LoCon factors, checked against the
delta as loaders rebuild it from the file tensors and against singular values computed here."""
import pytest
import torch

from trainers.merge import lowrank
from trainers.merge.lowrank import factorize

SHAPES = {"linear": (24, 40), "conv1x1": (24, 16, 1, 1), "conv3x3": (24, 16, 3, 3)}


def low_rank_delta(shape, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, int(torch.tensor(shape[1:]).prod()),
                                                                   generator=g)
    return flat.reshape(shape)


def decaying_delta(rows, cols, decay=0.8, seed=0):
    """Singular values decay**i: a spectrum with a meaningful energy cut, like trained deltas have."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rows, generator=g)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g)).Q
    n = min(rows, cols)
    return (u[:, :n] * decay ** torch.arange(n, dtype=torch.float32)) @ v[:, :n].T


def file_delta(t, stem, shape):
    """What ComfyUI / kohya loaders apply: (alpha / rank) * up @ down, from the file tensors alone."""
    up, down, alpha = t[f"{stem}.lora_up.weight"], t[f"{stem}.lora_down.weight"], float(t[f"{stem}.alpha"])
    return ((up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])).reshape(shape)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", SHAPES)
def test_known_low_rank_delta_is_recovered_in_kohya_shapes(kind):
    shape = SHAPES[kind]
    delta = low_rank_delta(shape, 3)
    out, inner = shape[0], shape[1]
    for rank in (3, 5, min(out, delta.flatten(1).shape[1])):
        lr = factorize(delta, rank=rank)
        assert lr.rank == rank and lr.alpha == rank
        assert lr.rel_error < 1e-5 and rel(lr.approximation(), delta) < 1e-5

        t = lr.tensors("lora_unet_block", torch.float32)
        assert set(t) == {"lora_unet_block.lora_down.weight", "lora_unet_block.lora_up.weight", "lora_unet_block.alpha"}
        down, up = t["lora_unet_block.lora_down.weight"], t["lora_unet_block.lora_up.weight"]
        if kind == "linear":
            assert down.shape == (rank, inner) and up.shape == (out, rank)
        else:
            assert down.shape == (rank, inner, *shape[2:]) and up.shape == (out, rank, 1, 1)
        assert t["lora_unet_block.alpha"].ndim == 0 and float(t["lora_unet_block.alpha"]) == rank
        assert rel(file_delta(t, "lora_unet_block", shape), delta) < 1e-5

    lr = factorize(delta, rank=4, alpha=1.0)
    t = lr.tensors("s", torch.float32)
    assert float(t["s.alpha"]) == 1.0
    assert rel(file_delta(t, "s", shape), delta) < 1e-5 and rel(lr.approximation(), delta) < 1e-5


def test_error_falls_with_rank_as_truncated_svd():
    delta = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svd(delta.double()).S
    total = float(s.square().sum())
    results = [factorize(delta, rank=r) for r in range(1, 21)]
    for r, lr in enumerate(results, start=1):
        optimal = (float(s[r:].square().sum()) / total) ** 0.5  # Eckart-Young: nothing does better
        assert lr.rel_error == pytest.approx(optimal, abs=1e-5)
        assert lr.kept_energy == pytest.approx(float(s[:r].square().sum()) / total, abs=1e-5)
        assert lr.rel_error ** 2 + lr.kept_energy == pytest.approx(1.0, abs=1e-5)
    errors, kept = [lr.rel_error for lr in results], [lr.kept_energy for lr in results]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])) and errors[0] > 0.5
    assert all(b >= a - 1e-6 for a, b in zip(kept, kept[1:]))
    assert errors[-1] < 1e-5 and kept[-1] == pytest.approx(1.0, abs=1e-6)
    assert factorize(delta, rank=64).rank == 20  # capped by min(out, in)
    # sqrt(s) on each side: neither factor carries the whole scale (fp16 files)
    half = torch.sqrt(s[:6]).float()
    lr = results[5]
    assert torch.allclose(lr.down.norm(dim=1), half, rtol=1e-4) and torch.allclose(lr.up.norm(dim=0), half, rtol=1e-4)
    scaled = factorize(delta, rank=6, alpha=3.0)  # scale 1/2: up doubles, down stays
    assert torch.allclose(scaled.down, lr.down) and torch.allclose(scaled.up, lr.up * 2)


def test_energy_picks_smallest_rank_reaching_the_share():
    delta = decaying_delta(32, 48)
    s = torch.linalg.svd(delta.double()).S
    share = s.square().cumsum(0) / s.square().sum()
    expected = int((share >= 0.9).nonzero()[0]) + 1
    assert 3 < expected < 20  # a cut in the middle, not at an end

    lr = factorize(delta, energy=0.9)
    assert lr.rank == expected and lr.alpha == expected
    assert lr.kept_energy >= 0.9 > float(share[expected - 2])
    assert lr.rel_error ** 2 + lr.kept_energy == pytest.approx(1.0, abs=1e-5)

    capped = factorize(delta, energy=0.9, max_rank=expected - 2)
    assert capped.rank == expected - 2 and capped.kept_energy < 0.9
    conv = factorize(delta.reshape(32, 48, 1, 1), energy=0.9)
    assert conv.rank == expected and conv.down.shape == (expected, 48, 1, 1)
    # energy 1 keeps the numerical rank of a rank-3 delta, not float32 noise directions
    assert factorize(low_rank_delta((24, 40), 3), energy=1.0).rank == 3


def test_fp16_input_zero_delta_and_bad_arguments():
    delta = low_rank_delta((16, 8, 3, 3), 2).half()
    assert factorize(delta, rank=16).rel_error < 1e-5  # full rank: exact
    lr = factorize(delta, rank=2)  # fp16 rounding is the rest of the spectrum
    assert lr.down.dtype == torch.float32 and lr.rel_error < 1e-3
    assert rel(lr.approximation(), delta.float()) == pytest.approx(lr.rel_error)
    t = lr.tensors("s")  # default file dtype fp16
    assert t["s.lora_down.weight"].dtype == torch.float16 and t["s.alpha"].dtype == torch.float32
    assert rel(file_delta({k: v.float() for k, v in t.items()}, "s", delta.shape), delta.float()) < 1e-2

    zero = factorize(torch.zeros(16, 8, 3, 3), energy=0.5)
    assert zero.rank == 1 and zero.rel_error == 0.0 and zero.kept_energy == 1.0
    assert zero.down.shape == (1, 8, 3, 3) and zero.up.shape == (16, 1, 1, 1)
    assert not zero.down.any() and not zero.up.any() and not zero.approximation().any()

    good = torch.randn(4, 6)
    for kwargs, message in [({"rank": 2, "energy": 0.5}, "exactly one"), ({}, "exactly one"),
                            ({"rank": 0}, "rank"), ({"rank": 1.5}, "rank"), ({"energy": 0.0}, "energy"),
                            ({"energy": 1.5}, "energy"), ({"rank": 2, "max_rank": 0}, "max_rank"),
                            ({"rank": 2, "alpha": 0.0}, "alpha"), ({"rank": 2, "clamp_quantile": 0.0}, "clamp")]:
        with pytest.raises(ValueError, match=message):
            factorize(good, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        factorize(torch.randn(4), rank=1)
    with pytest.raises(ValueError, match="NaN"):
        factorize(torch.full((4, 6), float("nan")), rank=1)


def test_clamp_quantile_limits_factor_magnitudes():
    delta = torch.randn(32, 48, generator=torch.Generator().manual_seed(2))
    delta[3, 5] = 40.0  # one outlier: a few huge factor entries
    free = factorize(delta, rank=8)
    clamped = factorize(delta, rank=8, clamp_quantile=0.9)
    for a, b in ((free.up, clamped.up), (free.down, clamped.down)):
        limit = torch.quantile(a.abs().flatten(), 0.9, interpolation="lower")
        assert float(b.abs().max()) == pytest.approx(float(limit)) and float(limit) < float(a.abs().max())
        inside = a.abs() <= limit
        assert torch.equal(b[inside], a[inside])  # entries under the limit are untouched
    assert clamped.rel_error > free.rel_error  # the error figure is of the clamped factors
    assert rel(clamped.approximation(), delta) == pytest.approx(clamped.rel_error)
    assert torch.equal(factorize(delta, rank=8, clamp_quantile=1.0).up, free.up)


def test_randomized_svd_path_is_exact_deterministic_and_near_optimal(monkeypatch):
    monkeypatch.setattr(lowrank, "RANDOMIZED_MIN_DIM", 8)
    calls = []
    real = lowrank._randomized_svd
    monkeypatch.setattr(lowrank, "_randomized_svd", lambda m, w: calls.append(w) or real(m, w))

    known = low_rank_delta((60, 16, 3, 3), 3)
    lr = factorize(known, rank=5)
    assert calls == [15] and lr.rel_error < 1e-5 and lr.down.shape == (5, 16, 3, 3)

    delta = decaying_delta(60, 90, decay=0.9)
    s = torch.linalg.svd(delta.double()).S
    state = torch.get_rng_state()
    first, second = factorize(delta, rank=4), factorize(delta, rank=4)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator
    assert torch.equal(first.up, second.up) and torch.equal(first.down, second.down)
    optimal = float(s[4:].square().sum() / s.square().sum()) ** 0.5
    assert optimal <= first.rel_error < optimal * 1.001
    assert first.rel_error ** 2 + first.kept_energy == pytest.approx(1.0, abs=1e-5)

    picked = factorize(delta, energy=0.5, max_rank=5)  # a known top rank: randomized too
    assert len(calls) == 4 and picked.rank <= 5
    factorize(delta, energy=0.5)  # the whole spectrum: full SVD
    factorize(delta, rank=40)  # near the smaller side: full SVD, where randomized saves nothing
    assert len(calls) == 4
