"""The server's path rules: a posted graph reads and writes only inside ComfyUI's folders.

Outside ComfyUI the rules are off (the command line is the local user's tool), so these tests
switch them on with path_policy.force_confined(True) and point the host's folders at tmp dirs.
"""
import contextlib
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from pack_loader import load_pack
from trainers.captioning import blip as blip_mod
from trainers.core import host, path_policy
from trainers.data.captions import read_caption
from trainers.data.errors import DatasetError
from trainers.data.items import scan_folder
from trainers.data.images import list_images
from trainers.dataset_build.preview_grid import dataset_preview


def _photo(path, seed=0, size=32):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def comfy_dirs(tmp_path):
    """ComfyUI-like folders (input, output, temp, models) and, beside them, a private folder."""
    dirs = {k: tmp_path / k for k in ("input", "output", "temp", "models", "private")}
    for d in dirs.values():
        d.mkdir()
    (dirs["models"] / "loras").mkdir()
    _photo(dirs["private"] / "secret.png", seed=9)
    (dirs["private"] / "secret.txt").write_text("the private caption\n")
    return dirs


def _modules(which):
    if which == "engine":
        return {"host": host, "path_policy": path_policy}
    pack = load_pack().__name__
    return {k: sys.modules[f"{pack}.trainers.core.{k}"] for k in ("host", "path_policy")}


@contextlib.contextmanager
def _server_rules(which, comfy_dirs):
    """The host configured with comfy_dirs and the server's rules on, for the engine or for the
    pack as ComfyUI imports it (a separate copy of the modules)."""
    mods = _modules(which)
    saved = dict(mods["host"]._local)
    mods["host"].configure(models_dir=str(comfy_dirs["models"]), output_dir=str(comfy_dirs["output"]),
                           temp_dir=str(comfy_dirs["temp"]), input_dir=str(comfy_dirs["input"]))
    mods["path_policy"].force_confined(True)
    try:
        yield mods
    finally:
        mods["path_policy"].force_confined(None)
        mods["host"]._local.update(saved)


@pytest.fixture(params=["engine", "pack"])
def server(request, comfy_dirs):
    with _server_rules(request.param, comfy_dirs) as mods:
        yield mods


@pytest.fixture
def engine_server(comfy_dirs):
    with _server_rules("engine", comfy_dirs) as mods:
        yield mods


@pytest.fixture
def pack_server(comfy_dirs):
    with _server_rules("pack", comfy_dirs) as mods:
        yield mods


def test_node_paths_resolve_inside_comfyui_folders(engine_server, comfy_dirs, monkeypatch):
    (comfy_dirs["input"] / "photos").mkdir()
    assert path_policy.node_path("photos", "Folder") == os.path.realpath(comfy_dirs["input"] / "photos")
    assert path_policy.node_path(str(comfy_dirs["output"] / "x"), "Folder").endswith("x")
    assert path_policy.node_path(str(comfy_dirs["models"] / "loras"), "Folder")  # model folders may be read
    private = comfy_dirs["private"]
    for typed in (str(private), "../private", "photos/../../private", str(private / "missing")):
        with pytest.raises(path_policy.PathNotAllowed) as err:
            path_policy.node_path(typed, "Folder")
        # The same words whether or not the path exists: nothing to learn about the server's disk.
        assert str(err.value) == str(err.value).replace(typed, "{}").format(typed)
        assert "does not exist" not in str(err.value) and "input folder" in str(err.value)
    os.symlink(private, comfy_dirs["input"] / "link")
    with pytest.raises(path_policy.PathNotAllowed):
        path_policy.node_path("link", "Folder")  # links are followed before the check


def test_allow_any_path_lifts_reads_never_writes(engine_server, comfy_dirs, monkeypatch):
    private = str(comfy_dirs["private"])
    monkeypatch.setenv(path_policy.ALLOW_ANY_PATH_ENV, "1")
    assert path_policy.node_path(private, "Folder") == os.path.realpath(private)
    with pytest.raises(path_policy.PathNotAllowed, match="may write"):
        path_policy.node_path(private, "Caption folder", write=True)
    with pytest.raises(path_policy.PathNotAllowed, match="may write"):  # models are read, not written, here
        path_policy.node_path(str(comfy_dirs["models"]), "Caption folder", write=True)
    assert path_policy.node_path("photos", "Caption folder", write=True).startswith(str(comfy_dirs["input"]))


def test_files_linked_out_of_an_allowed_folder_are_not_read(engine_server, comfy_dirs):
    folder = comfy_dirs["input"] / "photos"
    folder.mkdir()
    _photo(folder / "own.png")
    os.symlink(comfy_dirs["private"] / "secret.png", folder / "stolen.png")
    os.symlink(comfy_dirs["private"] / "secret.txt", folder / "own.txt")
    paths, skipped = list_images(str(folder))
    assert [os.path.basename(p) for p in paths] == ["own.png"]
    assert "outside ComfyUI" in dict((os.path.basename(p), r) for p, r in skipped)["stolen.png"]
    with pytest.raises(DatasetError, match="own.txt"):  # the caption is a link out: an error, not its text
        scan_folder(str(folder))
    with pytest.raises(DatasetError, match="own.txt"):  # the one caption reader: captioning skips that image
        read_caption(str(folder / "own.txt"))
    path_policy.force_confined(False)  # the command line reads what its user links
    assert len(list_images(str(folder))[0]) == 2
    assert scan_folder(str(folder))[0].caption == "the private caption"


def _manifest(folder, images):
    folder.mkdir(exist_ok=True)
    items = [{"image": img, "caption": f"c{i}"} for i, img in enumerate(images)]
    (folder / "manifest.json").write_text(json.dumps({"items": items}))


def test_manifest_entries_stay_inside_their_dataset(tmp_path, comfy_dirs):
    """Whatever the rules: a manifest names files of its own folder only (absolute, ../ and links refused)."""
    ds = tmp_path / "ds"
    ds.mkdir()
    _photo(ds / "own.png")
    os.symlink(comfy_dirs["private"] / "secret.png", ds / "link.png")
    secret = str(comfy_dirs["private"] / "secret.png")
    _manifest(ds, ["own.png", secret, "../private/secret.png", "link.png"])
    items = scan_folder(str(ds))
    assert [os.path.basename(it.path) for it in items] == ["own.png"]
    with pytest.raises(ValueError, match="outside its folder"):
        dataset_preview(str(ds))
    _manifest(ds, ["own.png"])
    assert dataset_preview(str(ds)).size[0] > 0


def test_model_names_cannot_leave_their_folder(server, comfy_dirs):
    h = server["host"]
    lora = comfy_dirs["models"] / "loras" / "mine.safetensors"
    lora.write_bytes(b"x")
    (comfy_dirs["models"] / "outside.safetensors").write_bytes(b"x")
    assert h.resolve_model("loras", "mine.safetensors") == str(lora)
    assert h.resolve_model("loras", "sub/../mine.safetensors") == str(lora)
    for name in ("../outside.safetensors", "../loras/mine.safetensors", str(comfy_dirs["models"] / "outside.safetensors"), "..", ""):
        with pytest.raises(FileNotFoundError, match="'loras' folders"):
            h.resolve_model("loras", name)
    assert h.resolve_model("loras", str(lora.parent.parent / "outside.safetensors"), allow_absolute=True)


def test_hub_downloads_are_off_in_the_server(engine_server, comfy_dirs, monkeypatch):
    with pytest.raises(blip_mod.CaptionError, match=path_policy.ALLOW_HUB_ENV):
        blip_mod.resolve_source("Salesforce/blip-image-captioning-base")
    monkeypatch.setenv(path_policy.ALLOW_HUB_ENV, "1")
    assert blip_mod.resolve_source("Salesforce/blip-image-captioning-base") == (
        "Salesforce/blip-image-captioning-base", False)
    with pytest.raises(path_policy.PathNotAllowed):
        blip_mod.resolve_source(str(comfy_dirs["private"]))  # a typed folder obeys the path rules
    path_policy.force_confined(False)
    monkeypatch.delenv(path_policy.ALLOW_HUB_ENV)
    assert blip_mod.resolve_source("Salesforce/blip-image-captioning-base")[1] is False  # the CLI may


# ---- the nodes, as ComfyUI imports them -------------------------------------------------

def _pack_nodes(name):
    return sys.modules[f"{load_pack().__name__}.nodes.{name}"]


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_nodes_refuse_folders_outside_before_any_work(pack_server, comfy_dirs):
    dataset_nodes = _pack_nodes("dataset")
    caption_nodes = _pack_nodes("caption")
    train_nodes = _pack_nodes("train_lora")
    private = str(comfy_dirs["private"])
    before = _tree(comfy_dirs["private"])
    widgets = dict(name="x", resolution=64, mode="center crop", face_crop=False, repeats=1, dedupe=True)
    for folder in (private, "../private"):
        with pytest.raises(PermissionError):
            dataset_nodes.BuildDataset().build(folder, **widgets)
        with pytest.raises(PermissionError):
            caption_nodes.BlipCaptionFolder().caption(folder, "overwrite", model="none", hub_id="", prompt="",
                                                      prefix="x", suffix="")
    with pytest.raises(PermissionError):
        dataset_nodes.BuildDataset().build("", class_images_folder=private, **widgets)
    assert not os.path.exists(comfy_dirs["output"] / "personalize")  # no dataset folder was made
    assert _tree(comfy_dirs["private"]) == before  # no caption file was written
    smuggled = {"path": private, "manifest": os.path.join(private, "manifest.json")}
    with pytest.raises(PermissionError):
        dataset_nodes.PreviewDataset().preview(smuggled, max_images=4, columns=2, cell=64)
    with pytest.raises(PermissionError):
        train_nodes.TrainLoRA().train("x.safetensors", "", "out", dataset=smuggled)
    with pytest.raises(ValueError, match="not a dataset"):
        dataset_nodes.PreviewDataset().preview({"manifest": "x"}, max_images=4, columns=2, cell=64)
    # IS_CHANGED does not list a refused folder either: the same value whatever is in it.
    value = dataset_nodes.BuildDataset.IS_CHANGED(folder=private, class_images_folder="")
    _photo(comfy_dirs["private"] / "new.png")
    assert dataset_nodes.BuildDataset.IS_CHANGED(folder=private, class_images_folder="") == value


def test_preview_dataset_shows_only_the_datasets_own_images(pack_server, comfy_dirs):
    nodes = _pack_nodes("dataset")
    ds = comfy_dirs["input"] / "uploaded"
    ds.mkdir()
    _photo(ds / "own.png", seed=1)
    _manifest(ds, [str(comfy_dirs["private"] / "secret.png")])  # an uploaded manifest naming a private file
    with pytest.raises(ValueError, match="outside its folder"):
        nodes.PreviewDataset().preview({"path": "uploaded"}, max_images=4, columns=2, cell=64)
    _manifest(ds, ["own.png"])
    grid = nodes.PreviewDataset().preview({"path": "uploaded"}, max_images=4, columns=2, cell=64)[0]
    assert grid.shape[-1] == 3


def test_apply_trained_lora_keeps_comfyui_checks_for_its_other_inputs(pack_server, comfy_dirs):
    nodes = _pack_nodes("apply_lora")
    cls = nodes.ApplyTrainedLoRA
    (comfy_dirs["models"] / "loras" / "mine.safetensors").write_bytes(b"x")
    assert cls.VALIDATE_INPUTS(lora_name="mine.safetensors", input_types={"model": "MODEL", "clip": "CLIP"}) is True
    for name in ("missing.safetensors", "../outside.safetensors", str(comfy_dirs["private"] / "a.safetensors")):
        assert "not in models/loras" in cls.VALIDATE_INPUTS(lora_name=name, input_types={})
    linked = {"model": "MODEL", "clip": "CLIP", "trained_lora": "STRING"}
    assert cls.VALIDATE_INPUTS(lora_name="not-here-yet.safetensors", input_types=linked) is True
    assert "takes MODEL" in cls.VALIDATE_INPUTS(lora_name="mine.safetensors", input_types={"model": "IMAGE"})
    import inspect
    assert "kwargs" not in str(inspect.signature(cls.VALIDATE_INPUTS))  # no catch-all: ComfyUI checks the rest
    with pytest.raises(FileNotFoundError):  # a linked name cannot climb out of models/loras either
        cls().apply(None, None, "x", 1.0, 1.0, trained_lora="../../private/secret.png")


def test_hash_cache_is_kept_where_view_does_not_serve(server, comfy_dirs):
    h = server["host"]
    assert h.cache_dir() == h.temp_dir()  # outside ComfyUI: the scratch folder
    fake = type("fp", (), {"models_dir": str(comfy_dirs["models"])})
    saved = h._fp
    h._fp = fake
    try:
        assert h.cache_dir().startswith(str(comfy_dirs["models"]))  # inside ComfyUI: not input/output/temp
    finally:
        h._fp = saved


def test_caption_folder_node_writes_only_where_it_may(pack_server, comfy_dirs, monkeypatch):
    nodes = _pack_nodes("caption")
    monkeypatch.setenv("PERSONALIZE_ALLOW_ANY_PATH", "1")  # even then: no caption files outside
    with pytest.raises(PermissionError, match="may write"):
        nodes.BlipCaptionFolder().caption(str(comfy_dirs["private"]), "overwrite", model="none", hub_id="",
                                          prompt="", prefix="x", suffix="")
    assert not os.path.exists(comfy_dirs["private"] / "secret.txt.tmp")
    assert (comfy_dirs["private"] / "secret.txt").read_text() == "the private caption\n"


def test_is_changed_of_a_caption_folder_ignores_refused_paths(pack_server, comfy_dirs):
    nodes = _pack_nodes("caption")
    value = nodes.BlipCaptionFolder.IS_CHANGED(folder=str(comfy_dirs["private"]))
    _photo(comfy_dirs["private"] / "another.png", seed=3)
    assert nodes.BlipCaptionFolder.IS_CHANGED(folder=str(comfy_dirs["private"])) == value
