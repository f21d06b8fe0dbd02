"""Data hardening: odd file names never stop a build, image batches get their own folder,
failed builds clean up, and BLIP decodes big photos at reduced size."""
import errno
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from test_captioning import _photo, _words_ok, blip, blip_host, models_dir  # noqa: F401 (fixtures)
from test_dataset_build import build, output_root, photo  # noqa: F401 (autouse fixture)
from trainers.captioning import blip as blip_mod, folders
from trainers.core import host, safe_io
from trainers.data import images
from trainers.dataset_build import builder as dataset_build
from trainers.data.errors import DatasetError
from trainers.data.items import scan_folder
from trainers.dataset_build.builder import BuildSettings, DatasetBuildError, build_from_images


def datasets_dir():
    return os.path.join(host.output_dir(), "personalize", "datasets")


# ---- names -----------------------------------------------------------------------------

def test_emoji_name_is_cut_by_bytes_and_builds(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    name = "😀" * 62  # 248 bytes: a legal name, but 62 characters kept whole overflow 255 bytes with the hash
    photo(0).save(src / f"{name}.png")
    photo(1).save(src / "plain.png")
    result = build(src)
    outputs = {os.path.basename(it["source"]): it["output_name"] for it in result.items}
    assert set(outputs) == {f"{name}.png", "plain.png"}
    stem = outputs[f"{name}.png"]
    assert len(stem.encode()) <= 80 + 11 and stem.startswith("😀" * 20)  # 80 bytes of whole emoji, "_" + hash
    assert os.path.isfile(os.path.join(result.path, "images", stem + ".png"))


def test_undecodable_name_is_kept_under_a_clean_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    raw = os.fsencode(str(src))
    photo(0).save(os.path.join(raw, b"\xff\xfe.png"))  # Latin-1 bytes, not UTF-8: os.listdir gives surrogates
    with open(os.path.join(raw, b"\xff\xfe.txt"), "wb") as f:
        f.write(b"a caption")
    with open(os.path.join(raw, b"caf\xe9.md"), "wb") as f:
        f.write(b"notes")
    photo(1).save(src / "plain.png")
    result = build(src)
    item = by_name(result)["\\xff\\xfe.png"]  # the bytes shown as \xNN in the label
    assert item["caption"] == "a caption" and item["output_name"].isascii()
    with open(result.manifest_path, encoding="utf-8") as f:  # strict UTF-8: it was written whole
        manifest = json.load(f)
    assert [os.path.basename(s["source"]) for s in manifest["skipped"]] == ["caf\\xe9.md"]
    assert sorted(i.caption for i in scan_folder(result.path)) == ["", "a caption"]


def by_name(result) -> dict:
    return {os.path.basename(it["source"]): it for it in result.items}


def test_an_item_that_cannot_be_written_is_skipped_and_retried(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    photo(0).save(src / "a.png")
    photo(1).save(src / "b.png")
    real = safe_io.write_bytes

    def refuse_b(path, data):
        if os.path.basename(path).startswith("b_"):
            raise OSError(errno.ENAMETOOLONG, "File name too long", path)
        return real(path, data)

    monkeypatch.setattr(safe_io, "write_bytes", refuse_b)
    result = build(src)
    assert list(by_name(result)) == ["a.png"]
    [skip] = result.manifest["skipped"]
    assert os.path.basename(skip["source"]) == "b.png" and "File name too long" in skip["reason"]
    assert sorted(os.listdir(os.path.join(result.path, "images"))) == sorted(
        [result.items[0]["output_name"] + ext for ext in (".png", ".txt")])  # no half-written outputs
    monkeypatch.setattr(safe_io, "write_bytes", real)
    assert list(by_name(build(src))) == ["a.png", "b.png"]  # not remembered as unreadable


# ---- image batches ---------------------------------------------------------------------

def test_image_batches_under_one_name_never_replace_each_other():
    settings = BuildSettings(resolution=64)
    first = build_from_images([photo(0), photo(1)], ["x", "y"], "batch", settings)
    other = build_from_images([photo(2), photo(3)], ["x", "y"], "batch", settings)
    assert os.path.basename(first.path) == "batch" and os.path.basename(other.path) == "batch_2"
    again = build_from_images([photo(0), photo(1)], ["new x", "new y"], "batch", settings)
    assert again.path == first.path and again.processed == 0
    assert [i.caption for i in scan_folder(first.path)] == ["new x", "new y"]
    assert [i.caption for i in scan_folder(other.path)] == ["x", "y"]  # untouched
    reordered = build_from_images([photo(1), photo(0)], ["y", "x"], "batch", settings)
    assert os.path.basename(reordered.path) == "batch_3"  # the order is part of the identity


# ---- failed and cancelled builds -------------------------------------------------------

def test_a_failed_first_build_leaves_no_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.md").write_text("no images here")
    with pytest.raises(DatasetBuildError, match="No usable image"):
        build(src)
    assert not os.path.exists(os.path.join(datasets_dir(), "src"))

    photo(0).save(src / "a.png")

    def broken_progress(done, total):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        build(src, progress=broken_progress)
    assert not os.path.exists(os.path.join(datasets_dir(), "src"))


def test_a_failed_rebuild_keeps_the_existing_dataset(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo(0).save(src / "a.png")
    first = build(src)
    (src / "a.png").write_text("now broken")
    with pytest.raises(DatasetBuildError):
        build(src)
    assert os.path.isfile(first.manifest_path)  # it was not this build's folder to remove


def test_a_cancelled_build_keeps_its_folder_to_resume(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        photo(i).save(src / f"{i}.png")

    def cancel(done, total):
        host.request_interrupt()

    with pytest.raises(host.Interrupted):
        build(src, progress=cancel, workers=1)
    folder = os.path.join(datasets_dir(), "src")
    assert os.path.isdir(folder) and os.listdir(os.path.join(folder, "images"))  # the first image's outputs
    with pytest.raises(DatasetError, match="stopped before the end"):  # the trainers refuse a cut-short build
        scan_folder(folder)
    again = build(src)
    assert again.path == folder and len(scan_folder(folder)) == 3
    assert (again.reused, again.processed) == (1, 2)  # the image done before Cancel is not prepared again


# ---- BLIP reduced decoding -------------------------------------------------------------

def _spy_batches(monkeypatch) -> list:
    seen = []
    real = blip_mod._generate

    def spy(captioner, batch, prompt, kwargs):
        seen.extend(img.copy() for img in batch)
        return real(captioner, batch, prompt, kwargs)

    monkeypatch.setattr(blip_mod, "_generate", spy)
    return seen


def _spy_decodes(monkeypatch) -> list:
    sizes = []
    real = images._open_loaded

    def spy(path, draft_size=None):
        img = real(path, draft_size)
        sizes.append(img.size)
        return img

    monkeypatch.setattr(images, "_open_loaded", spy)
    return sizes


def test_decode_side_follows_the_processor(blip):
    assert blip_mod.decode_side(blip) == 64  # the tiny processor takes 32 px
    stub = blip_mod.BlipCaptioner(None, type("P", (), {"image_processor": type("I", (), {
        "size": {"shortest_edge": 224}})()})(), "blip-2", "x", None, None)
    assert blip_mod.decode_side(stub) == 448
    stub.processor = object()
    assert blip_mod.decode_side(stub) == 2 * blip_mod.DEFAULT_INPUT_SIDE


def test_folder_big_jpeg_is_decoded_small_before_batching(blip, tmp_path, monkeypatch):
    _photo(0, (1600, 1200)).save(tmp_path / "big.jpg", quality=90)
    batches, decodes = _spy_batches(monkeypatch), _spy_decodes(monkeypatch)
    report = folders.caption_folder(blip, str(tmp_path), max_length=4)
    assert decodes == [(200, 150)]  # libjpeg's 1/8 scale: the 1600x1200 pixels never exist
    assert [img.size for img in batches] == [(85, 64)]  # shorter side at twice the 32-px input
    assert _words_ok(report.captions[str(tmp_path / "big.jpg")])

    monkeypatch.setattr(blip_mod, "REDUCED_DECODE", False)  # the switch the bench compares against
    batches.clear(), decodes.clear()
    folders.caption_folder(blip, str(tmp_path), policy="overwrite", max_length=4)
    assert decodes == [(1600, 1200)] and [img.size for img in batches] == [(1600, 1200)]


def test_pil_images_are_shrunk_and_small_ones_left_alone(blip, monkeypatch):
    big, small = _photo(1, (300, 200)), _photo(2, (48, 40))
    batches = _spy_batches(monkeypatch)
    reduced = blip_mod.caption_images(blip, [big, small], max_length=5)
    assert [img.size for img in batches] == [(96, 64), (48, 40)]
    assert np.array_equal(np.asarray(batches[1]), np.asarray(small))  # below the bound: the same pixels

    monkeypatch.setattr(blip_mod, "REDUCED_DECODE", False)
    full = blip_mod.caption_images(blip, [big, small], max_length=5)
    assert reduced[1] == full[1]  # the small image's caption is unchanged


def test_small_folder_images_caption_as_before(blip, tmp_path, monkeypatch):
    for i in range(3):
        _photo(10 + i, (64, 48)).save(tmp_path / f"{i}.png")
    before = dict(folders.caption_folder(blip, str(tmp_path), max_length=6).captions)
    monkeypatch.setattr(blip_mod, "REDUCED_DECODE", False)
    after = folders.caption_folder(blip, str(tmp_path), policy="overwrite", max_length=6).captions
    assert after == before


def test_caption_nodes_batch_size_is_capped():
    from pack_loader import load_pack

    nodes = sys.modules[f"{load_pack().__name__}.nodes.caption"]
    assert nodes._generation_inputs()["batch_size"][1]["max"] == 32
