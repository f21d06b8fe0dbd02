"""The dataset builder: image edge cases, duplicates, buckets, the manifest, rebuilds, nodes, CLI and training on it."""
import copy
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from pack_loader import load_pack
from trainers.core import host
from trainers.data import order
from trainers.dataset_build import builder as dataset_build, face_crop
from trainers.dataset_build.buckets import BucketError, make_buckets, nearest_bucket
from trainers.data.caches import LatentCache
from trainers.data.errors import DatasetError
from trainers.data.items import scan_folder
from trainers.data.order import bucket_batch_indices
from trainers.dataset_build.builder import BuildSettings, DatasetBuildError, build_from_folder, build_from_images
from trainers.dataset_build.phash import HashIndex, distance, phash
from trainers.dataset_build.preview_grid import caption_grid, dataset_preview

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED, WHITE = (255, 0, 0), (255, 255, 255)


@pytest.fixture(autouse=True)
def output_root(tmp_path):
    previous = host._local["output"]
    host.configure(output_dir=str(tmp_path / "output"))
    yield tmp_path / "output"
    host._local["output"] = previous


def photo(seed: int, w: int = 160, h: int = 120) -> Image.Image:
    """A smooth, photo-like colour field: every seed a different picture."""
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def build(folder, **kw):
    settings = BuildSettings(**{"resolution": 64, **kw.pop("settings", {})})
    return build_from_folder(folder, settings=settings, workers=kw.pop("workers", 2), **kw)


def out_pixels(result, item) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(result.path, item["image"])).convert("RGB")).astype(int)


def by_source(result) -> dict:
    return {os.path.basename(it["source"]): it for it in result.items}


# ---- image edge cases ------------------------------------------------------------------

def test_exif_rotation_is_applied_before_cropping(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    stored = Image.new("RGB", (80, 40), WHITE)  # landscape as stored, red in the stored top-left corner
    ImageDraw.Draw(stored).rectangle([0, 0, 19, 19], fill=RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the red corner ends up top-right
    stored.save(src / "phone.jpg", quality=95, exif=exif)
    result = build(src, settings={"mode": "pad"})
    item = result.items[0]
    assert item["source_size"] == [40, 80]  # upright: portrait
    assert item["crop_box"] == [0, 0, 40, 80] and item["pad_box"] == [16, 0, 48, 64]
    px = out_pixels(result, item)
    assert np.abs(px[8, 40] - RED).max() < 40  # top-right of the picture: red
    assert np.abs(px[8, 22] - WHITE).max() < 40  # top-left: white (it would be red without the rotation)
    assert np.abs(px[56, 22] - WHITE).max() < 40


def test_colour_modes_come_out_as_rgb(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(src / "cmyk.jpg", quality=95)  # red in print colours
    Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16)).save(src / "grey16.png")  # 16-bit mid grey
    Image.new("L", (64, 64), 60).save(src / "grey8.png")
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 255))
    ImageDraw.Draw(rgba).rectangle([0, 0, 63, 31], fill=(0, 0, 0, 0))  # top half transparent
    rgba.save(src / "logo.png")
    Image.new("RGB", (64, 64), (0, 160, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "palette.gif")
    result = build(src, settings={"dedupe": False})
    items = by_source(result)

    def centre(name):
        img = Image.open(os.path.join(result.path, items[name]["image"]))
        assert img.mode == "RGB" and img.size == (64, 64)
        return np.asarray(img).astype(int)

    assert np.abs(centre("cmyk.jpg")[32, 32] - RED).max() < 20
    assert np.abs(centre("grey16.png")[32, 32] - 128).max() <= 2  # scaled, not clipped to white
    assert np.abs(centre("grey8.png")[32, 32] - 60).max() <= 1
    logo = centre("logo.png")
    assert np.abs(logo[8, 32] - WHITE).max() <= 2 and np.abs(logo[56, 32] - (0, 0, 255)).max() <= 2
    assert np.abs(centre("palette.gif")[32, 32] - (0, 160, 0)).max() <= 2


def test_broken_and_non_image_files_are_skipped_with_reasons(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    photo(0).save(src / "good.jpg", quality=90)
    buf = io.BytesIO()
    photo(1, 400, 300).save(buf, "JPEG", quality=90)
    (src / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "fake.png").write_text("this is text, not a PNG")
    (src / "notes.md").write_text("# notes")
    (src / "good.txt").write_text("a caption")  # a caption: not reported
    with caplog.at_level("WARNING", logger="personalize"):
        result = build(src)
    assert [os.path.basename(it["source"]) for it in result.items] == ["good.jpg"]
    reasons = {os.path.basename(s["source"]): s["reason"] for s in result.manifest["skipped"]}
    assert set(reasons) == {"truncated.jpg", "empty.png", "fake.png", "notes.md"}
    assert "damaged or incomplete" in reasons["truncated.jpg"]
    assert "empty" in reasons["empty.png"]
    assert "not an image" in reasons["fake.png"] and "not an image file" in reasons["notes.md"]
    assert "truncated.jpg" in caplog.text and "skipped fake.png" in result.summary()


def test_nothing_usable_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "fake.jpg").write_text("no")
    with pytest.raises(DatasetBuildError, match=r"No usable image.*fake\.jpg"):
        build(src)
    with pytest.raises(DatasetBuildError, match="does not exist"):
        build(tmp_path / "missing")
    with pytest.raises(DatasetBuildError, match="multiple of 8"):
        build(src, settings={"resolution": 100})
    with pytest.raises(DatasetBuildError, match="mode"):
        build(src, settings={"mode": "stretch"})


def test_unicode_names_and_captions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo(0).save(src / "café 日本.jpg")
    (src / "café 日本.txt").write_text("ünïcödé, 犬\n", encoding="utf-8")
    result = build(src)
    item = result.items[0]
    assert item["caption"] == "ünïcödé, 犬" and os.path.basename(item["source"]) == "café 日本.jpg"
    assert item["image"].startswith("images/café 日本_") and os.path.isfile(os.path.join(result.path, item["image"]))
    with open(os.path.join(result.path, item["caption_file"]), encoding="utf-8") as f:
        assert f.read() == "ünïcödé, 犬\n"
    assert scan_folder(result.path)[0].caption == "ünïcödé, 犬"


def test_huge_images_are_downscaled_with_a_filter(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    checker = (np.indices((1600, 2400)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    Image.fromarray(checker).save(src / "checker.png")
    result = build(src)
    px = out_pixels(result, result.items[0])
    # Averaged to grey; point sampling would give black, white or stripes.
    assert abs(px.mean() - 127.5) < 3 and px.std() < 3


def test_big_jpeg_reduced_decode_matches_a_full_decode(tmp_path):
    """JPEGs decode at 1/8 scale when that leaves enough pixels; the crop must match a full-size one."""
    src = tmp_path / "src"
    src.mkdir()
    big = photo(3, 2000, 1500)
    ImageDraw.Draw(big).ellipse([1200, 300, 1500, 600], fill=(250, 250, 20))
    big.save(src / "big.jpg", quality=95)
    result = build(src, settings={"resolution": 128})
    item = result.items[0]
    assert item["source_size"] == [2000, 1500] and item["crop_box"] == [250, 0, 1750, 1500]
    reference = Image.open(src / "big.jpg").convert("RGB").resize((128, 128), Image.Resampling.LANCZOS,
                                                                  box=(250, 0, 1750, 1500))
    assert np.abs(out_pixels(result, item) - np.asarray(reference).astype(int)).mean() < 3


def test_tiny_images_are_upscaled_with_a_warning(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo(0, 40, 30).save(src / "tiny.png")
    photo(1, 200, 150).save(src / "fine.png")
    items = by_source(build(src))
    assert any("smaller than the training size" in w for w in items["tiny.png"]["warnings"])
    assert items["tiny.png"]["output_size"] == [64, 64]
    assert not any("smaller" in w for w in items["fine.png"]["warnings"])


# ---- duplicates ------------------------------------------------------------------------

def test_duplicates_by_content_and_by_look(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = photo(0)
    a.save(src / "a.png")
    a.save(src / "b_exact_copy.png")
    a.resize((128, 96), Image.Resampling.LANCZOS).save(src / "c_smaller.jpg", quality=75)
    a.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "d_mirrored.png")  # a different view: kept
    photo(1).save(src / "e_other.png")
    result = build(src)
    assert [os.path.basename(it["source"]) for it in result.items] == ["a.png", "d_mirrored.png", "e_other.png"]
    dupes = {os.path.basename(d["source"]): (os.path.basename(d["duplicate_of"]), d["distance"])
             for d in result.manifest["duplicates"]}
    assert dupes["b_exact_copy.png"] == ("a.png", 0)
    assert dupes["c_smaller.jpg"][0] == "a.png" and dupes["c_smaller.jpg"][1] <= 6
    assert len(os.listdir(os.path.join(result.path, "images"))) == 2 * 3  # no files for duplicates
    kept_all = build(src, settings={"dedupe": False})
    assert len(kept_all.items) == 5 and kept_all.manifest["duplicates"] == []


def test_phash_is_stable_under_resizing_and_recompression():
    a = photo(5, 300, 200)
    buf = io.BytesIO()
    a.resize((150, 100), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=70)
    assert distance(phash(a), phash(Image.open(buf))) <= 4
    assert min(distance(phash(a), phash(photo(s, 300, 200))) for s in range(6, 12)) > 12
    index, hashes = HashIndex(), [phash(photo(s)) for s in range(100)]
    for n, h in enumerate(hashes[:99]):
        index.add(h, n)
    label, d = index.nearest(hashes[99])
    assert d == min(distance(hashes[99], h) for h in hashes[:99]) == distance(hashes[99], hashes[label])
    assert index.nearest(hashes[5]) == (5, 0)


# ---- buckets ---------------------------------------------------------------------------

def test_bucket_set_follows_the_kohya_rules():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 0.5 <= w / h <= 2.0
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    wide = make_buckets(1024, min_ratio=0.25, max_ratio=4.0)
    assert (2048, 512) in wide and (512, 2048) in wide
    assert nearest_bucket(1200, 600, buckets) == (640, 384)
    assert nearest_bucket(600, 1200, buckets) == (384, 640)
    assert nearest_bucket(1000, 1010, buckets) == (512, 512)
    assert make_buckets(64, step=16) == [(48, 80), (64, 64), (80, 48)]
    with pytest.raises(BucketError, match="multiple of 8"):
        make_buckets(512, step=60)


def _bucket_folder(folder):
    folder.mkdir()
    photo(0, 192, 96).save(folder / "wide1.png")  # 2:1 -> 80x48
    photo(1, 200, 110).save(folder / "wide2.png")
    photo(2, 96, 192).save(folder / "tall.png")  # 1:2 -> 48x80
    photo(3, 120, 120).save(folder / "square.png")
    for name in ("wide1", "wide2", "tall", "square"):
        (folder / f"{name}.txt").write_text(f"a {name} photo")
    return folder


def test_bucket_mode_crops_each_image_to_its_bucket(tmp_path):
    result = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    items = by_source(result)
    assert result.manifest["settings"]["buckets"] == [[48, 80], [64, 64], [80, 48]]
    assert items["wide1.png"]["bucket"] == [80, 48] and items["tall.png"]["bucket"] == [48, 80]
    assert items["square.png"]["bucket"] == [64, 64]
    for item in result.items:
        assert Image.open(os.path.join(result.path, item["image"])).size == tuple(item["bucket"])
        left, top, right, bottom = item["crop_box"]
        assert abs((right - left) / (bottom - top) - item["bucket"][0] / item["bucket"][1]) < 0.03
    assert items["wide1.png"]["crop_box"] == [16, 0, 176, 96]  # the full height, centred width
    assert result.bucket_counts() == {"48x80": 1, "64x64": 1, "80x48": 2}
    assert result.dataset_value()["buckets"] == [(48, 80), (64, 64), (80, 48)]


def test_bucket_batches_stay_in_one_bucket_count_repeats_and_resume():
    buckets = [(80, 48), (80, 48), (48, 80), (64, 64), (80, 48)]
    repeats = [1, 1, 3, 1, 2]
    run = [bucket_batch_indices(buckets, repeats, 2, step, seed=7) for step in range(40)]
    assert all(len({buckets[i] for i in batch}) == 1 and len(batch) == 2 for batch in run)
    per_epoch = 2 + 2 + 1  # 80x48: 4 slots -> 2 batches; 48x80: 3 -> 2; 64x64: 1 -> 1 (filled)
    first = [i for batch in run[:per_epoch] for i in batch]
    for i, r in enumerate(repeats):  # every slot of the epoch is served (fills may add a few extra)
        assert first.count(i) >= r
    assert run[:per_epoch] != run[per_epoch:2 * per_epoch]  # reshuffled per epoch
    order._bucket_epoch.cache_clear()  # a resumed run is a new process: no cached epoch to agree with
    assert [bucket_batch_indices(buckets, repeats, 2, s, seed=7) for s in range(23, 40)] == run[23:]
    assert [bucket_batch_indices(buckets, repeats, 2, s, seed=8) for s in range(10)] != run[:10]
    # Two processes split a global batch of 4: both halves from the same bucket.
    for step in range(12):
        batch = bucket_batch_indices(buckets, repeats, 4, step, seed=1)
        assert len({buckets[i] for i in batch}) == 1
    with pytest.raises(ValueError):
        bucket_batch_indices(buckets, repeats[:2], 2, 0, 0)
    # No buckets (a centre-crop dataset), repeats only: exactly r appearances per epoch.
    plain = [i for step in range(5) for i in bucket_batch_indices([None] * 3, [1, 3, 1], 1, step, seed=0)]
    assert sorted(plain) == [0, 1, 1, 1, 2]


# ---- manifest, trainers ----------------------------------------------------------------

def test_manifest_round_trips_into_the_trainer(tmp_path):
    result = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16, "repeats": 3},
                   class_images=str(_bucket_folder(tmp_path / "class")))
    with open(result.manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest == json.loads(json.dumps(result.manifest))
    assert manifest["version"] == 1 and manifest["settings"]["resolution"] == 64
    assert manifest["class_images"] == str(tmp_path / "class") and manifest["class_images_count"] == 4
    item = manifest["items"][0]
    for key in ("source", "source_sha256", "source_size", "image", "output_size", "crop_box", "caption", "bucket",
                "repeats", "phash", "warnings"):
        assert key in item, key
    items = scan_folder(result.path, trigger_word="sks")
    assert [(os.path.basename(i.path), i.caption, i.bucket, i.repeats) for i in items] == [
        (os.path.basename(m["image"]), f"sks, {m['caption']}", tuple(m["bucket"]), 3) for m in manifest["items"]]
    assert all(os.path.dirname(i.path) == os.path.join(result.path, "images") for i in items)
    with pytest.raises(DatasetBuildError, match="Class-images folder"):
        build(tmp_path / "src", class_images=str(tmp_path / "nope"))


def test_latent_cache_encodes_bucketed_images_whole(tmp_path, toy_sd1):
    result = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    items = scan_folder(result.path)
    cache = LatentCache.build(items, toy_sd1.vae, 64, crop="random", flip=True)
    gen = torch.Generator().manual_seed(0)
    for i, item in enumerate(items):
        w, h = item.bucket
        assert cache.means[i].shape == (2, 4, h // 8, w // 8)
        assert cache.sample(i, gen).shape == (4, h // 8, w // 8)  # no crop window on bucketed latents
    wide = [i for i, it in enumerate(items) if it.bucket == (80, 48)]
    assert cache.sample_batch(wide, gen).shape == (2, 4, 6, 10)
    # An output edited after the build (here: resized) is brought back to its bucket, with a warning.
    photo(4, 100, 100).save(items[wide[0]].path)
    edited = LatentCache.build([items[wide[0]]], toy_sd1.vae, 64)
    assert edited.means[0].shape == (1, 4, 6, 10)


def test_training_runs_on_a_bucketed_dataset(tmp_path, toy_sd1, monkeypatch):
    from trainers.core.config import TrainConfig
    from trainers.training.loop import train

    host.configure(models_dir=str(tmp_path / "models"))
    result = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    seen = []
    real = order.bucket_batch_indices

    def spy(buckets, repeats, batch_size, step, seed):
        out = real(buckets, repeats, batch_size, step, seed)
        seen.append({buckets[i] for i in out})
        return out

    monkeypatch.setattr(order, "bucket_batch_indices", spy)
    cfg = TrainConfig(base_model="toy", dataset=result.path, output_name="bucketed", trigger_word="sks", steps=2,
                      batch_size=2, resolution=64, rank=4, alpha=4, unet_lr=1e-3, lr_scheduler="constant",
                      warmup_steps=0, save_every=0, validation_every=0, flip=True)
    trained = train(cfg, components=copy.deepcopy(toy_sd1))
    assert trained.steps == 2 and os.path.isfile(trained.lora_path)
    assert len(seen) == 2 and all(len(b) == 1 for b in seen)  # each batch from one bucket
    assert all(np.isfinite(r["loss"]) for r in trained.log)


# ---- rebuilds and folders --------------------------------------------------------------

def test_rebuild_reuses_everything_and_is_byte_identical(tmp_path, monkeypatch):
    src = _bucket_folder(tmp_path / "src")
    photo(9).save(src / "dup.png")
    photo(9).save(src / "dup_copy.png")
    (src / "bad.jpg").write_text("not a jpeg")
    settings = {"mode": "buckets", "bucket_step": 16, "face_crop": True}
    first = build(src, settings=settings)
    assert first.processed == 5 and first.reused == 0 and len(first.manifest["duplicates"]) == 1

    def snapshot():
        return {name: (open(os.path.join(root, name), "rb").read(), os.stat(os.path.join(root, name)).st_mtime_ns)
                for root, _, names in os.walk(first.path) for name in names}

    before = snapshot()
    calls = []
    real = dataset_build.process_source
    monkeypatch.setattr(dataset_build, "process_source", lambda *a: calls.append(a[0].label) or real(*a))
    again = build(src, settings=settings)
    assert calls == [] and again.processed == 0 and again.reused == 5
    assert snapshot() == before  # same bytes, and not even rewritten
    assert [it["output_sha256"] for it in again.items] == [it["output_sha256"] for it in first.items]

    # A new photo and a changed caption: only the new photo is prepared, the caption file follows.
    photo(10).save(src / "new.png")
    (src / "tall.txt").write_text("a tall photo, edited")
    third = build(src, settings=settings)
    assert [os.path.basename(c) for c in calls] == ["new.png"] and third.reused == 5
    tall = by_source(third)["tall.png"]
    assert tall["caption"] == "a tall photo, edited" and tall["image"] == by_source(first)["tall.png"]["image"]
    assert "a tall photo, edited" in [i.caption for i in scan_folder(third.path)]

    # New pixel settings: everything is prepared again and the old outputs are removed.
    calls.clear()
    fourth = build(src, settings={**settings, "resolution": 80})
    assert len(calls) == 8 and fourth.path == first.path  # 7 images and the unreadable one
    names = set(os.listdir(os.path.join(fourth.path, "images")))
    assert names == {os.path.basename(it["image"]) for it in fourth.items} | \
        {os.path.basename(it["caption_file"]) for it in fourth.items}


def test_different_datasets_never_overwrite_each_other(tmp_path, output_root):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    photo(0).save(a / "x.png")
    photo(1).save(b / "y.png")
    stranger = output_root / "personalize" / "datasets" / "mine"
    stranger.mkdir(parents=True)
    (stranger / "keep.txt").write_text("not a dataset")
    first = build(a, name="mine")
    second = build(b, name="mine")
    assert os.path.basename(first.path) == "mine_2" and os.path.basename(second.path) == "mine_3"
    assert (stranger / "keep.txt").read_text() == "not a dataset" and os.listdir(stranger) == ["keep.txt"]
    assert build(a, name="mine").path == first.path  # the same source finds its own folder again
    assert build(a, name="../../escape").path.startswith(str(output_root))


def test_cancel_then_rebuild(tmp_path):
    src = _bucket_folder(tmp_path / "src")

    def cancel_after_first(done, total):
        if done == 1:
            host.request_interrupt()

    with pytest.raises(host.Interrupted):
        build(src, progress=cancel_after_first, workers=1)
    folder = os.path.join(host.output_dir(), "personalize", "datasets", "src")
    with pytest.raises(DatasetError, match="stopped before the end"):
        scan_folder(folder)  # an unfinished first build is not trained on
    result = build(src)
    assert result.path == folder and len(scan_folder(folder)) == 4


# ---- face crop -------------------------------------------------------------------------

def drawn_face(size=200, width=600, height=400, cx=420, cy=180) -> Image.Image:
    """A cartoon face OpenCV's frontal-face cascade detects, right of the image centre."""
    img = Image.new("L", (width, height), 90)
    d = ImageDraw.Draw(img)
    s = size
    d.ellipse([cx - s * .45, cy - s * .6, cx + s * .45, cy + s * .6], fill=200)
    for side in (-1, 1):
        ex = cx + side * s * .2
        d.rectangle([ex - s * .12, cy - s * .25, ex + s * .12, cy - s * .2], fill=60)
        d.ellipse([ex - s * .09, cy - s * .15, ex + s * .09, cy - s * .05], fill=40)
    d.rectangle([cx - s * .04, cy - s * .05, cx + s * .04, cy + s * .18], fill=220)
    d.ellipse([cx - s * .1, cy + s * .15, cx + s * .1, cy + s * .22], fill=150)
    d.ellipse([cx - s * .18, cy + s * .3, cx + s * .18, cy + s * .38], fill=70)
    return img.filter(ImageFilter.GaussianBlur(s / 60)).convert("RGB")


def test_crop_box_follows_a_detected_face(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo(0, 600, 400).save(src / "portrait.png")
    calls = []

    def fake_detector(img):
        calls.append(img.size)
        return [(10, 10, 20, 20), (480, 100, 80, 80)]  # the larger face wins

    items = build(src, settings={"face_crop": True}, detector=fake_detector).items
    assert calls == [(600, 400)]
    assert items[0]["face_box"] == [480, 100, 80, 80]
    assert items[0]["crop_box"] == [200, 0, 600, 400]  # centred on x=520, held inside the image
    assert face_crop.crop_box(600, 400, 400, 400, (100, 50)) == (0, 0, 400, 400)
    assert face_crop.crop_box(1000, 600, 300, 300, (500, 300)) == (350, 150, 650, 450)

    centred = build(src, settings={"face_crop": True}, detector=lambda img: []).items[0]
    assert centred["crop_box"] == [100, 0, 500, 400] and "no face found: centred instead" in centred["warnings"]
    without = build(src, settings={"face_crop": True}, detector=None).items[0]
    assert without["crop_box"] == [100, 0, 500, 400]
    assert any("needs OpenCV" in w for w in without["warnings"])


@pytest.mark.skipif(not face_crop.haar_available(), reason="opencv-python-headless is not installed")
def test_opencv_finds_a_drawn_face_and_centres_on_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    drawn_face().save(src / "face.png")
    item = build(src, settings={"face_crop": True, "resolution": 128}).items[0]  # the real Haar detector
    x, y, w, h = item["face_box"]
    assert abs(x + w / 2 - 420) < 30 and abs(y + h / 2 - 180) < 40
    assert item["crop_box"] == [200, 0, 600, 400]  # a plain centre crop would be [100, 0, 500, 400]
    assert face_crop.haar_faces(photo(1, 600, 400)) == []


# ---- preview, nodes, command line ------------------------------------------------------

def test_preview_grid_draws_captions_under_thumbnails(tmp_path):
    result = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    grid = dataset_preview(result.path, columns=2, cell=96)
    assert grid.width == 2 * (96 + 12) and grid.height > 2 * (96 + 12)
    arr = np.asarray(grid).astype(int)
    caption_band = arr[96 + 6 + 20:108 + 40, :96]  # under the first thumbnail
    assert (caption_band.max(axis=2) > 200).sum() > 20  # light text on the dark background
    blank = caption_grid([Image.new("RGB", (50, 50))], [""], cell=64)
    assert np.asarray(blank)[64 + 10:, :].max() > 100  # "(no caption)" is written


@pytest.fixture
def nodes(output_root):
    name = load_pack().__name__
    pack_host = sys.modules[f"{name}.trainers.core.host"]
    previous = pack_host._local["output"]
    pack_host.configure(output_dir=str(output_root))
    yield sys.modules[f"{name}.nodes.dataset"]
    pack_host._local["output"] = previous


NODE_WIDGETS = dict(name="", resolution=64, mode="buckets", face_crop=False, repeats=2, dedupe=True)


def test_build_dataset_node_outputs_a_dataset_preview_and_summary(tmp_path, nodes):
    src = _bucket_folder(tmp_path / "src")
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    out = nodes.BuildDataset().build(str(src), **{**NODE_WIDGETS, "name": "pets"}, bucket_step=16)
    value, grid, summary = out["result"]
    assert value["path"].endswith(os.path.join("personalize", "datasets", "pets")) and value["count"] == 4
    assert value["buckets"] == [(48, 80), (64, 64), (80, 48)] and value["class_images"] is None
    assert os.path.isfile(value["manifest"]) and summary == value["summary"] == out["ui"]["text"][0]
    assert grid.dim() == 4 and grid.shape[0] == 1 and grid.shape[3] == 3 and 0 <= grid.min() and grid.max() <= 1
    assert [i.repeats for i in scan_folder(value["path"])] == [2] * 4

    before = nodes.BuildDataset.IS_CHANGED(folder=str(src), class_images_folder="")
    assert nodes.BuildDataset.IS_CHANGED(folder=str(src), class_images_folder="") == before
    photo(7).save(src / "more.png")
    assert nodes.BuildDataset.IS_CHANGED(folder=str(src), class_images_folder="") != before
    assert nodes.BuildDataset.IS_CHANGED(class_images_folder="") == ""  # folder linked from another node


def test_build_from_images_node_takes_a_batch_and_caption_lines(nodes):
    batch = torch.stack([torch.from_numpy(np.asarray(photo(s, 96, 64), dtype=np.float32) / 255) for s in range(3)])
    widgets = {k: [v] for k, v in {**NODE_WIDGETS, "mode": "center crop", "name": "batch"}.items()}
    out = nodes.BuildDatasetFromImages().build([batch], captions=["one\ntwo\nthree"], **widgets)
    value = out["result"][0]
    assert [i.caption for i in scan_folder(value["path"])] == ["one", "two", "three"]
    out = nodes.BuildDatasetFromImages().build([batch[:2], batch[2:]], captions=["a", "b", "c"], **widgets)
    assert [i.caption for i in scan_folder(out["result"][0]["path"])] == ["a", "b", "c"]
    assert out["result"][0]["path"] == value["path"]  # an IMAGE batch rebuilds its own named dataset
    preview = nodes.PreviewDataset().preview(value, max_images=2, columns=2, cell=64)[0]
    assert preview.shape[0] == 1 and preview.shape[2] == 2 * (64 + 12)
    with pytest.raises(ValueError, match="4 captions for 3 images"):  # the pack's own DatasetBuildError
        nodes.BuildDatasetFromImages().build([batch], captions=["a", "b", "c", "d"], **widgets)


def test_build_from_images_engine_hashes_pixels(tmp_path):
    images = [photo(0), photo(1), photo(0)]
    result = build_from_images(images, ["x", "y"], "mem", BuildSettings(resolution=64))
    assert [it["source"] for it in result.items] == ["image 0", "image 1"]
    assert result.manifest["duplicates"][0]["source"] == "image 2" and result.items[1]["warnings"] == []
    again = build_from_images(images, ["x", "y"], "mem", BuildSettings(resolution=64))
    assert again.processed == 0 and again.path == result.path


def test_command_line_builds_and_writes_a_preview(tmp_path, capsys):
    from trainers.cli.main import main

    src = _bucket_folder(tmp_path / "src")
    code = main(["--output-dir", str(tmp_path / "cli_out"), "build-dataset", str(src), "--name", "cli",
                 "--mode", "buckets", "--resolution", "64", "--bucket-step", "16", "--repeats", "2",
                 "--preview", str(tmp_path / "cli_out" / "grid.png")])
    assert code == 0
    value = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert value["path"] == str(tmp_path / "cli_out" / "personalize" / "datasets" / "cli") and value["count"] == 4
    assert Image.open(tmp_path / "cli_out" / "grid.png").size[0] > 0
    assert main(["--output-dir", str(tmp_path / "cli_out"), "build-dataset", str(src), "--preview",
                 str(tmp_path / "elsewhere.png")]) == 2  # writes stay inside the output folder
    assert not (tmp_path / "elsewhere.png").exists()
    assert main(["build-dataset", str(tmp_path / "missing")]) == 2


def test_shipped_workflow_builds_from_the_caption_folder_output(tmp_path, nodes):
    from trainers.graph.api_format import ui_to_api
    from test_workflows import object_info

    with open(os.path.join(ROOT, "workflows", "caption_and_build_dataset.json"), encoding="utf-8") as f:
        prompt = ui_to_api(json.load(f), object_info())
    ids = {node["class_type"]: node_id for node_id, node in prompt.items()}
    build_inputs = dict(prompt[ids["PersonalizeBuildDataset"]]["inputs"])
    assert build_inputs.pop("folder") == [ids["PersonalizeBlipCaptionFolder"], 1]  # BLIP's folder output
    assert prompt[ids["PreviewImage"]]["inputs"]["images"] == [ids["PersonalizeBuildDataset"], 1]
    assert build_inputs["mode"] == "buckets" and build_inputs["resolution"] == 512
    # What the caption node hands on: the folder, now with captions. The build runs as shipped.
    out = nodes.BuildDataset().build(str(_bucket_folder(tmp_path / "src")), **build_inputs)
    value, grid, _ = out["result"]
    assert value["count"] == 4 and os.path.basename(value["path"]) == "my_subject" and grid.shape[-1] == 3
