"""Our LPIPS (trainers/evaluate/lpips.py) against the lpips package, on the same weights.

Random AlexNet weights are shared by both (the package gets them in place of torchvision's), and the linear
weights are the package's own trained lpips/weights/v0.1/alex.pth, read by both. Needs lpips and torchvision:

    /work/comfyui/venv/bin/python tests/lpips_equivalence.py

tests/test_lpips.py imports `reference_lpips` from here for the same check under pytest.
"""
import importlib.metadata
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def reference_lpips(backbone: dict, lin: dict):
    """lpips.LPIPS(net="alex") with `backbone` (torchvision `features.*` keys) in its trunk and `lin` in its
    linear layers."""
    import lpips

    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    # The package splits torchvision's `features` into slice1..5 keeping the indices: sliceK.N.* is features.N.*
    ref.net.load_state_dict({key: backbone["features." + key.split(".", 1)[1]] for key in ref.net.state_dict()})
    _, unexpected = ref.load_state_dict(lin, strict=False)
    assert not unexpected, unexpected
    return ref.eval()


def max_relative_difference(ours, ref, seed: int = 0) -> float:
    """Largest |ours - ref| / |ref| over pairs of random, noisy and identical-but-one images at several sizes."""
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in [(4, 3, 64, 64), (3, 3, 224, 224), (2, 3, 256, 192)]:
        x = torch.rand(shape, generator=gen) * 2 - 1
        for y in (torch.rand(shape, generator=gen) * 2 - 1, (x + 0.1 * torch.randn(shape, generator=gen)).clamp(-1, 1)):
            with torch.no_grad():
                a, b = ours(x, y), ref(x, y).flatten()
            worst = max(worst, float(((a - b).abs() / b.abs()).max()))
    return worst


def main() -> None:
    import lpips

    from trainers.evaluate.lpips import load_lpips
    from trainers.testing.toy_lpips import toy_lpips_tensors

    real_lin = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    backbone, _ = toy_lpips_tensors(seed=0)
    with tempfile.TemporaryDirectory() as folder:
        # The .pth layout: torchvision's state-dict file name scheme and the package's own alex.pth.
        torch.save(backbone, os.path.join(folder, "alexnet.pth"))
        with open(real_lin, "rb") as src, open(os.path.join(folder, "alex.pth"), "wb") as dst:
            dst.write(src.read())
        ours = load_lpips(folder)
    lin = torch.load(real_lin, map_location="cpu", weights_only=True)
    ref = reference_lpips(backbone, lin)
    print(f"torch {torch.__version__}, lpips {importlib.metadata.version('lpips')}")
    print(f"max relative difference, ours vs lpips.LPIPS(net='alex'): {max_relative_difference(ours, ref):.3e}")


if __name__ == "__main__":
    main()
