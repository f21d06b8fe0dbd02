"""The training dataset: folder scanning, captions, pixels, latent/caption caches, batch order."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.data.caches import CaptionCache, LatentCache
from trainers.families.conditioning import Conditioning
from trainers.data.captions import with_trigger
from trainers.data.errors import DatasetError
from trainers.data.items import TrainItem, scan_folder
from trainers.data.order import batch_indices
from trainers.data.pixels import check_resolution, prepare_pixels


def _image(path, size=(16, 16), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def _truncated_jpeg(path):
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---- scanning and captions -------------------------------------------------------------

def test_captions_and_trigger_word(tmp_path, caplog):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of a dog\n\n  on grass \n", encoding="utf-8")
    _image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("SKS dog sleeping", encoding="utf-8")
    _image(tmp_path / "c.png")  # no caption file
    _image(tmp_path / "ñandú 猫.png")
    (tmp_path / "ñandú 猫.txt").write_bytes("\ufeffun gato".encode("utf-8"))  # BOM from Windows editors

    items = scan_folder(tmp_path, trigger_word="sks")
    assert [os.path.basename(i.path) for i in items] == ["a.png", "b.png", "c.png", "ñandú 猫.png"]
    assert [i.caption for i in items] == ["sks, a photo of a dog, on grass", "SKS dog sleeping", "sks",
                                          "sks, un gato"]
    assert all(isinstance(i, TrainItem) and os.path.isabs(i.path) for i in items)

    with caplog.at_level(logging.WARNING, logger="personalize"):
        plain = scan_folder(tmp_path)
    assert [i.caption for i in plain] == ["a photo of a dog, on grass", "SKS dog sleeping", "", "un gato"]
    assert any("no .txt caption" in r.getMessage() and r.name == "personalize" for r in caplog.records)


def test_trigger_matches_whole_words_only():
    assert with_trigger("sksdog on a rug", "sks") == "sks, sksdog on a rug"
    assert with_trigger("a (sks) dog", "sks") == "a (sks) dog"
    assert with_trigger("photo of ohwx man", "ohwx man") == "photo of ohwx man"
    assert with_trigger("", "  sks ") == "sks"
    assert with_trigger(" a dog ", "") == "a dog"


def test_other_caption_extension(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from caption file")
    (tmp_path / "a.txt").write_text("from txt")
    assert scan_folder(tmp_path, caption_ext="caption")[0].caption == "from caption file"


def test_non_utf8_caption_is_a_clear_error(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"a\.txt.*UTF-8"):
        scan_folder(tmp_path)


def test_corrupt_images_are_skipped_with_a_logged_reason(tmp_path, caplog):
    _image(tmp_path / "good.png")
    _truncated_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "notes.md").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="personalize"):
        items = scan_folder(tmp_path, trigger_word="sks")
    assert [os.path.basename(i.path) for i in items] == ["good.png"]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("cut.jpg", "empty.png", "text.png", "notes.md"):
        assert name in messages
    assert "damaged" in messages and "empty" in messages


def test_missing_empty_and_all_corrupt_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as err:
        scan_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)

    with pytest.raises(DatasetError, match="no usable image") as err:
        scan_folder(tmp_path)
    assert str(tmp_path) in str(err.value)

    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(DatasetError, match=r"no usable image.*bad\.png"):
        scan_folder(tmp_path)


def test_manifest_from_the_dataset_builder(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "x.png")
    _image(tmp_path / "img" / "y.png")
    _image(tmp_path / "ignored.png")  # not in the manifest
    manifest = {"items": [{"image": "img/x.png", "caption": "a dog", "source": "x.jpg"},
                          {"image": "img/y.png", "caption": "sks dog"},
                          {"image": "img/gone.png", "caption": "missing"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="personalize"):
        items = scan_folder(tmp_path, trigger_word="sks")
    assert [(os.path.relpath(i.path, tmp_path), i.caption) for i in items] == [
        (os.path.join("img", "x.png"), "sks, a dog"), (os.path.join("img", "y.png"), "sks dog")]
    assert "gone.png" in caplog.text

    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json"):
        scan_folder(tmp_path)


# ---- resolution and pixels -------------------------------------------------------------

def test_check_resolution():
    assert check_resolution(512) == 512
    assert check_resolution(64) == 64
    assert check_resolution(768.0) == 768
    with pytest.raises(DatasetError, match="512 or 520"):
        check_resolution(513)
    with pytest.raises(DatasetError, match="64"):
        check_resolution(32)
    with pytest.raises(DatasetError, match="smallest valid value is 64"):
        check_resolution(60)
    for bad in ("512", 512.5, True, None):
        with pytest.raises(DatasetError):
            check_resolution(bad)


def test_prepare_pixels_center_and_random():
    img = Image.new("RGB", (300, 200), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 150, 200))  # left half black
    center = prepare_pixels(img, 64, "center")
    assert center.shape == (3, 64, 64) and center.dtype == torch.float32
    assert center.min() >= -1 and center.max() <= 1
    assert center[:, :, 2].mean() < -0.9 and center[:, :, -3].mean() > 0.9  # centre crop keeps both halves

    whole = prepare_pixels(img, 64, "random")
    assert whole.shape == (3, 64, 96)  # 300x200 -> 96x64, whole width kept
    odd = prepare_pixels(Image.new("RGB", (250, 200)), 64, "random")
    assert odd.shape == (3, 64, 80)  # 80 = 250*64/200 rounded down to a multiple of 8
    tall = prepare_pixels(Image.new("RGB", (20, 50), (255, 255, 255)), 64, "random")  # upscaled
    assert tall.shape == (3, 160, 64) and torch.allclose(tall, torch.ones_like(tall), atol=1e-2)
    with pytest.raises(DatasetError, match="Crop"):
        prepare_pixels(img, 64, "left")


# ---- latent cache ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from trainers.testing.toy_models import build_sd1

    vae = build_sd1("tiny", tokenizer_dir=str(tmp_path_factory.mktemp("tok"))).vae
    return vae.eval().requires_grad_(False)


@pytest.fixture
def counting(vae, monkeypatch):
    """Counts the images the VAE encodes."""
    seen = []
    original = vae.encode

    def encode(x, *args, **kwargs):
        seen.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", encode)
    return seen


def _noise_images(folder, sizes):
    rng = np.random.default_rng(1)
    paths = []
    for n, (w, h) in enumerate(sizes):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        paths.append(str(folder / f"{n}.png"))
        Image.fromarray(arr).save(paths[-1])
    return [TrainItem(p, f"caption {n}") for n, p in enumerate(paths)]


def test_latent_cache_center_crop_encodes_once(tmp_path, vae, counting):
    items = _noise_images(tmp_path, [(96, 64), (64, 96), (64, 64)])
    calls = []
    cache = LatentCache.build(items, vae, 64, crop="center", batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert sum(counting) == 3 and max(counting) <= 2  # each image encoded once, in batches of <= 2
    assert calls[-1] == (3, 3)
    assert len(cache) == 3 and cache.factor == 8  # the toy VAE has SD's four levels: 8x smaller latents
    gen = torch.Generator().manual_seed(0)
    batch = cache.sample_batch([0, 1, 2, 0], gen)
    assert batch.shape == (4, 4, 8, 8) and batch.dtype == torch.float32 and batch.device.type == "cpu"
    assert sum(counting) == 3  # sampling never runs the VAE

    # Stored latents are the VAE's distribution times scaling_factor.
    x = prepare_pixels(Image.open(items[2].path), 64, "center")[None]
    dist = vae.encode(x).latent_dist
    sf = vae.config.scaling_factor
    assert torch.allclose(cache.means[2][0], dist.mean[0] * sf, atol=1e-5)
    assert torch.allclose(cache.stds[2][0], dist.std[0] * sf, atol=1e-5)


def test_latent_cache_random_crop_keeps_aspect_and_samples_windows(tmp_path, vae, counting):
    items = _noise_images(tmp_path, [(128, 64), (64, 96), (64, 64)])
    cache = LatentCache.build(items, vae, 64, crop="random", batch_size=4)
    assert sum(counting) == 3 and len(counting) == 3  # three shapes, so three batches
    assert [tuple(m.shape) for m in cache.means] == [(1, 4, 8, 16), (1, 4, 12, 8), (1, 4, 8, 8)]
    gen = torch.Generator().manual_seed(0)
    samples = [cache.sample(0, gen) for _ in range(20)]
    assert all(s.shape == (4, 8, 8) for s in samples)
    # Different windows of the wide latent: their means differ from the left-most window's.
    windows = {int(torch.argmin(torch.stack([(s - cache.means[0][0, :, :, k:k + 8]).abs().mean()
                                               for k in range(9)]))) for s in samples}
    assert len(windows) > 3


def test_latent_cache_flip_encodes_the_flipped_image(tmp_path, vae, counting):
    items = _noise_images(tmp_path, [(64, 64), (96, 64)])
    cache = LatentCache.build(items, vae, 64, crop="center", flip=True)
    assert sum(counting) == 4  # each image twice: plain and mirrored pixels
    plain, mirrored = cache.means[0]
    assert not torch.allclose(plain, mirrored, atol=1e-3)
    assert not torch.allclose(plain.flip(-1), mirrored, atol=1e-5)  # not just a flipped latent
    x = prepare_pixels(Image.open(items[0].path), 64, "center").flip(-1)[None]
    assert torch.allclose(mirrored, vae.encode(x).latent_dist.mean[0] * vae.config.scaling_factor, atol=1e-5)

    gen = torch.Generator().manual_seed(3)
    # With std -> 0 a sample is exactly one of the two views; both must occur.
    cache.stds = [torch.zeros_like(s) for s in cache.stds]
    picked = {bool(torch.equal(cache.sample(0, gen), mirrored)) for _ in range(30)}
    assert picked == {True, False}


def test_latent_cache_sampling_is_seeded(tmp_path, vae):
    items = _noise_images(tmp_path, [(96, 64), (64, 64)])
    cache = LatentCache.build(items, vae, 64, crop="random", flip=True)
    a = cache.sample_batch([0, 1], torch.Generator().manual_seed(7))
    b = cache.sample_batch([0, 1], torch.Generator().manual_seed(7))
    c = cache.sample_batch([0, 1], torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_latent_cache_rejects_bad_settings(tmp_path, vae):
    items = _noise_images(tmp_path, [(64, 64)])
    with pytest.raises(DatasetError, match="multiple of 8"):
        LatentCache.build(items, vae, 100)
    with pytest.raises(DatasetError, match="Crop"):
        LatentCache.build(items, vae, 64, crop="middle")
    with pytest.raises(DatasetError, match="empty"):
        LatentCache.build([], vae, 64)


# ---- caption cache ---------------------------------------------------------------------

def test_caption_cache_encodes_each_unique_caption_once():
    seen = []

    def encode(captions):
        seen.extend(captions)
        lengths = torch.tensor([float(len(c)) for c in captions])
        return Conditioning(lengths[:, None, None].expand(-1, 77, 8), pooled=-lengths[:, None].expand(-1, 4))

    cache = CaptionCache.build(["sks dog", "sks dog", "sks, a cat", "sks dog"], encode)
    assert sorted(seen) == ["", "sks dog", "sks, a cat"]  # "" for caption dropout
    out = cache.get(["sks, a cat", "", "sks dog"])
    assert out.states.shape == (3, 77, 8) and out.pooled.shape == (3, 4)
    assert out.states[:, 0, 0].tolist() == [10.0, 0.0, 7.0]
    assert out.pooled[:, 0].tolist() == [-10.0, 0.0, -7.0]  # the pooled row stays with its caption
    with pytest.raises(DatasetError, match="not cached"):
        cache.get(["unknown"])


# ---- batch order -----------------------------------------------------------------------

def test_batch_indices_cover_each_epoch_and_resume_exactly():
    n, bs, seed = 7, 3, 1234
    run = [batch_indices(n, bs, step, seed) for step in range(30)]
    flat = [i for batch in run for i in batch]
    for epoch in range(len(flat) // n):
        assert sorted(flat[epoch * n:(epoch + 1) * n]) == list(range(n))  # every item once per epoch
    assert flat[:n] != flat[n:2 * n]  # reshuffled each epoch
    # Resuming at step 17 (fresh process state) gives exactly what the uninterrupted run had.
    assert [batch_indices(n, bs, step, seed) for step in range(17, 30)] == run[17:]
    assert batch_indices(n, bs, 0, seed + 1) != run[0] or batch_indices(n, bs, 1, seed + 1) != run[1]
    assert len(batch_indices(2, 5, 0, 0)) == 5  # batch larger than the dataset spans epochs
    with pytest.raises(ValueError):
        batch_indices(0, 1, 0, 0)
