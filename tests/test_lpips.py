"""LPIPS (trainers/evaluate/lpips.py) on random weights: metric properties, the two file layouts, strict loading,
and (when the lpips package is installed) equality with the package."""
import ast
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainers.evaluate.errors import BackboneError
from trainers.evaluate.lpips import LPIPS, load_lpips
from trainers.testing.toy_lpips import save_toy_lpips, toy_lpips_tensors


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_lpips(save_toy_lpips(str(tmp_path_factory.mktemp("lpips"))))


def _images(n=2, size=64, seed=0):
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identical_images_are_at_distance_zero(model):
    x = _images()
    assert torch.equal(model(x, x), torch.zeros(2))


def test_symmetric_and_positive(model):
    x, y = _images(seed=0), _images(seed=1)
    d = model(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, model(y, x), rtol=1e-6, atol=0)


def test_more_different_image_is_farther(model):
    x, other = _images(seed=0), _images(seed=1)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    assert (model(x, noisy) < model(x, other)).all()


def test_batch_equals_per_image(model):
    x, y = _images(3, seed=0), _images(3, seed=1)
    single = torch.cat([model(x[i:i + 1], y[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(model(x, y), single, rtol=1e-5, atol=0)


def test_distance_takes_0_1_images(model):
    a, b = (_images(seed=0) + 1) / 2, (_images(seed=1) + 1) / 2
    torch.testing.assert_close(model.distance(a, b), model(a * 2 - 1, b * 2 - 1), rtol=0, atol=0)


def test_frozen_eval_module(model):
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_rejects_mismatched_inputs(model):
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model(_images(size=64), _images(size=96))


def test_pth_layout_gives_the_same_module(tmp_path, model):
    backbone, lin = toy_lpips_tensors(seed=0)
    # torchvision's file also holds the classifier; LPIPS ignores exactly those keys (their shapes do not matter).
    torch.save({**backbone, "classifier.1.weight": torch.zeros(2, 2), "classifier.6.bias": torch.zeros(2)},
               tmp_path / "alexnet.pth")
    torch.save(lin, tmp_path / "alex.pth")
    from_pth = load_lpips(str(tmp_path))
    assert from_pth.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(from_pth.state_dict()[key], value), key
    x, y = _images(seed=0), _images(seed=1)
    assert torch.equal(from_pth(x, y), model(x, y))


def _broken(tmp_path, file, edit):
    """A toy folder with `edit` applied to the tensors of `file`."""
    folder = save_toy_lpips(str(tmp_path))
    path = os.path.join(folder, file)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return folder


def _assert_backbone_error(folder, match):
    with pytest.raises(BackboneError, match=match) as info:
        load_lpips(folder)
    message = str(info.value)
    assert folder in message, message
    assert "torchvision's AlexNet ImageNet weights" in message and "weights/v0.1/alex.pth" in message, message


@pytest.mark.parametrize("missing", ["alexnet.safetensors", "lin.safetensors"])
def test_missing_file(tmp_path, missing):
    folder = save_toy_lpips(str(tmp_path))
    os.remove(os.path.join(folder, missing))
    _assert_backbone_error(folder, "is in")


@pytest.mark.parametrize("file,edit,match", [
    ("alexnet.safetensors", lambda t: t.update({"features.3.weight": torch.zeros(192, 64, 3, 3)}), "shape"),
    ("lin.safetensors", lambda t: t.update({"lin2.model.1.weight": torch.zeros(1, 256, 1, 1)}), "shape"),
    ("alexnet.safetensors", lambda t: t.pop("features.10.bias"), "missing keys"),
    ("lin.safetensors", lambda t: t.pop("lin0.model.1.weight"), "missing keys"),
    ("alexnet.safetensors", lambda t: t.update({"features.12.weight": torch.zeros(1)}), "unexpected keys"),
    ("lin.safetensors", lambda t: t.update({"lin5.model.1.weight": torch.zeros(1, 512, 1, 1)}), "unexpected keys"),
])
def test_weights_that_do_not_fit(tmp_path, file, edit, match):
    _assert_backbone_error(_broken(tmp_path, file, edit), match)


def test_pth_that_is_not_a_state_dict(tmp_path):
    folder = save_toy_lpips(str(tmp_path))
    os.remove(os.path.join(folder, "lin.safetensors"))
    torch.save({"lin0.model.1.weight": "not a tensor"}, os.path.join(folder, "alex.pth"))
    _assert_backbone_error(folder, "not a state dict")


def test_module_imports_only_stdlib_and_torch():
    import trainers.evaluate.lpips as module

    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert top <= set(sys.stdlib_module_names) | {"torch"}, top


def test_matches_the_lpips_package(model):
    pytest.importorskip("lpips")
    from lpips_equivalence import max_relative_difference, reference_lpips

    backbone, lin = toy_lpips_tensors(seed=0)
    assert max_relative_difference(model, reference_lpips(backbone, lin)) < 1e-5
