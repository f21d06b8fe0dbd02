"""What the canvas is sent while a run trains (host.send_event, trainers/training/live.py) and the routes it
reads a run's curve and files from (nodes/routes.py). No ComfyUI: its PromptServer and executing context are
faked in sys.modules, as they are the only two things send_event touches."""
import copy
import json
import math
import os
import sys
import types
from collections import namedtuple

import pytest

from trainers.core import host
from trainers.core.config import TrainConfig
from trainers.testing.demo import make_photos
from trainers.training.live import live_events
from trainers.training.loop import train

Context = namedtuple("Context", "prompt_id node_id list_index")


class FakeServer:
    def __init__(self):
        self.client_id = "client-1"
        self.sent = []  # (event, data, sid)

    def send_sync(self, event, data, sid=None):
        json.dumps(data, allow_nan=False)  # what the page's JSON.parse accepts
        self.sent.append((event, data, sid))


@pytest.fixture
def comfy_server(monkeypatch):
    """ComfyUI's `server.PromptServer.instance` and `comfy_execution.utils.get_executing_context`, faked."""
    server = FakeServer()
    server_module = types.ModuleType("server")
    server_module.PromptServer = type("PromptServer", (), {"instance": server})
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: Context("prompt-1", "7", None)
    package = types.ModuleType("comfy_execution")
    package.utils = utils
    monkeypatch.setitem(sys.modules, "server", server_module)
    monkeypatch.setitem(sys.modules, "comfy_execution", package)
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    return server


@pytest.fixture
def photos(tmp_path):
    return make_photos(str(tmp_path / "photos"), count=2, size=64)


def cfg_for(photos, **kw):
    return TrainConfig(**{**dict(base_model="toy", dataset=photos, output_name="live", trigger_word="sks", steps=4,
                                 resolution=64, rank=4, alpha=4, unet_lr=1e-3, lr_scheduler="constant",
                                 warmup_steps=0, save_every=0, validation_every=0, resume=False), **kw})


def routes_module():
    from pack_loader import load_pack

    return sys.modules[f"{load_pack().__name__}.nodes.routes"]


def test_send_event_is_a_no_op_outside_comfyui(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert not host.live_events()
    host.send_event("train", {"step": 1})  # nothing to send to, nothing raised
    assert live_events(object(), 10, main_process=True) is None  # the loop builds no event sender at all


def test_send_event_names_the_executing_node_and_goes_to_the_queuing_page(comfy_server):
    assert host.live_events()
    host.send_event("train", {"step": 3})
    assert comfy_server.sent == [("personalize.train", {"step": 3, "node": "7", "prompt_id": "prompt-1"},
                                  "client-1")]


def test_a_run_sends_one_small_event_per_step_and_its_validation_images(comfy_server, photos, toy_sd1):
    result = train(cfg_for(photos, validation_prompt="a photo of sks ball", validation_every=2,
                           validation_steps=2), components=copy.deepcopy(toy_sd1))
    events = [data for event, data, sid in comfy_server.sent if event == "personalize.train" and sid == "client-1"]
    assert len(events) == len(comfy_server.sent)
    # One per step, then the final validation's image with the last step's figures again.
    assert [e["step"] for e in events] == [1, 2, 3, 4, 4]
    assert [e["loss"] for e in events[:4]] == [r["loss"] for r in result.log]
    assert all(math.isfinite(e["loss"]) and e["total"] == 4 and e["node"] == "7" for e in events)
    assert all(e["run"] == os.path.basename(result.run_dir) for e in events)
    assert all(e["sec_per_step"] > 0 for e in events) and events[3]["eta"] == 0 < events[0]["eta"]
    assert all(len(json.dumps(e)) < 600 for e in events)  # no history in the messages
    images = {e["step"]: e["image"] for e in events if "image" in e}
    assert [os.path.basename(p["filename"]) for p in images.values()] == ["step_000002.png", "step_000004.png"]
    for ref in images.values():  # what ComfyUI's /view serves: type, subfolder and file name in the output folder
        assert ref["type"] == "output" and ref["subfolder"] == f"personalize/runs/{events[0]['run']}/samples"
        assert os.path.isfile(os.path.join(host.output_dir(), ref["subfolder"], ref["filename"]))


def test_no_validation_image_reference_without_validation(comfy_server, photos, toy_sd1):
    train(cfg_for(photos, steps=2), components=copy.deepcopy(toy_sd1))
    assert [d["step"] for _, d, _ in comfy_server.sent] == [1, 2]
    assert not any("image" in d for _, d, _ in comfy_server.sent)


def test_the_run_log_route_gives_a_page_opened_mid_run_the_curve_so_far(photos, toy_sd1):
    result = train(cfg_for(photos, validation_prompt="a photo of sks ball", validation_every=2,
                           validation_steps=2), components=copy.deepcopy(toy_sd1))
    status, body = routes_module().run_log({"run": os.path.basename(result.run_dir)})
    assert status == 200 and body["steps"] == 4
    assert body["points"] == [[r["step"], r["loss"]] for r in result.log]
    assert body["image"]["filename"] == "step_000004.png"  # the latest validation image
    json.dumps(body, allow_nan=False)


def test_the_run_files_route_lists_the_run_folder_as_view_references(photos, toy_sd1):
    result = train(cfg_for(photos, steps=2, save_every=1, validation_prompt="a photo of sks ball",
                           validation_every=1, validation_steps=2), components=copy.deepcopy(toy_sd1))
    outside = os.path.join(host.output_dir(), "secret.txt")
    open(outside, "w").write("not a run file")
    os.symlink(outside, os.path.join(result.run_dir, "link.txt"))  # a link inside a run is not followed
    status, body = routes_module().run_files({"run": os.path.basename(result.run_dir)})
    assert status == 200 and body["more"] == 0
    names = [f["name"] for f in body["files"]]
    assert {"config.json", "log.jsonl", "finished.json", "samples/step_000001.png"} <= set(names)
    assert "link.txt" not in names and not any(n.startswith("..") for n in names)
    for f in body["files"]:
        assert f["type"] == "output" and f["subfolder"].startswith("personalize/runs/")
        assert os.path.getsize(os.path.join(host.output_dir(), f["subfolder"], f["filename"])) == f["size"]


@pytest.mark.parametrize("name", ["", ".", "..", "../..", "../personalize", "../../secret.txt", "a/../..",
                                  "/etc", "..\\..", "x\0y", "missing"])
def test_the_run_routes_refuse_names_that_are_not_a_run_folder(name):
    routes = routes_module()
    os.makedirs(os.path.join(host.output_dir(), "personalize", "runs", "real"), exist_ok=True)
    for handler in (routes.run_files, routes.run_log):
        status, body = handler({"run": name})
        assert status == 404 and "error" in body


def test_a_run_folder_linked_from_elsewhere_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "private.txt").write_text("x")
    runs = os.path.join(host.output_dir(), "personalize", "runs")
    os.makedirs(runs, exist_ok=True)
    os.symlink(str(elsewhere), os.path.join(runs, "linked"))
    assert routes_module().run_files({"run": "linked"})[0] == 404


def test_compare_models_sends_its_table_as_cells(tmp_path):
    import importlib

    from pack_loader import PACK, load_pack
    from trainers.testing.toy_metrics import save_toy_dino

    import numpy as np
    from PIL import Image

    node = load_pack().NODE_CLASS_MAPPINGS["PersonalizeCompareModels"]
    host_copy = sys.modules[f"{PACK}.trainers.core.host"]
    save_toy_dino(str(tmp_path / "models" / "metrics" / "dino-vits16"))
    host_copy.configure(models_dir=str(tmp_path / "models"))
    pil_to_image = importlib.import_module(PACK + ".nodes.convert").pil_to_image
    rng = np.random.default_rng(0)
    batch = lambda n: pil_to_image([Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))  # noqa: E731
                                    for _ in range(n)])
    try:
        out = node().compare(subject_photos=batch(2), prompts="a sks dog", identifier="sks", class_noun="dog",
                             clip_model="(none)", dino_model="dino-vits16", lpips_model="(none)", name="cells",
                             images_a=batch(1), label_a="base", images_b=batch(1), label_b="lora")
    finally:
        sys.modules[f"{PACK}.trainers.evaluate.backbones"].unload()
    table = out["ui"]["table"][0]
    assert table["header"][:2] == ["model", "DINO"]
    assert [row[0] for row in table["rows"]][:2] == ["base", "lora"]
    assert all(len(row) == len(table["header"]) and all(isinstance(c, str) for c in row) for row in table["rows"])
    assert "dino" in table["note"].lower()
    json.dumps(out["ui"], allow_nan=False)
    # the report's files, as /view takes them (what `run-workflow` downloads)
    folder = out["result"][3]
    assert {f["filename"] for f in out["ui"]["files"]} >= {"report.md", "report.csv", "report.json", "grid.png"}
    for ref in out["ui"]["files"]:
        assert ref["type"] == "output" and os.path.isfile(
            os.path.join(host_copy.output_dir(), ref["subfolder"], ref["filename"]))
        assert os.path.dirname(os.path.join(host_copy.output_dir(), ref["subfolder"], "x")) == folder
