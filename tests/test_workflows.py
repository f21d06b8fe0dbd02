"""The example workflows in workflows/ (ComfyUI UI format), checked without ComfyUI.

Every file must parse, use only this pack's nodes and ComfyUI core nodes, have consistent
links, and carry one widget value per widget of each node (in INPUT_TYPES order, seed
widgets with their control_after_generate value), so the frontend loads it as drawn.
tests/test_comfyui_integration.py runs each one in a real ComfyUI.
"""
import glob
import importlib
import json
import os
import sys

import pytest

from pack_loader import load_pack
from trainers.graph.api_format import VIRTUAL_NODES, is_api_prompt, ui_to_api, widget_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))

# ComfyUI's own nodes are checked against a committed copy of their /object_info entries
# (trainers/graph/comfy_core_nodes.json; the COMFYUI_DIR tier checks it against a real server).
export_workflows = importlib.import_module("export_workflows")
CORE_NODES = export_workflows.core_nodes()

# Our inputs whose choices are the user's model folders: a workflow names the folder a user is told to create
# (README), which the test machine does not have.
MODEL_FOLDER_INPUTS = {("PersonalizeCompareModels", name) for name in ("clip_model", "dino_model", "lpips_model")}


def object_info() -> dict:
    """/object_info as the server would give it, for our nodes and CORE_NODES."""
    return export_workflows.object_info()


def _spec(info: dict, name: str):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name]
    return None


@pytest.fixture(scope="module", params=WORKFLOWS, ids=os.path.basename)
def workflow(request):
    with open(request.param, encoding="utf-8") as f:
        return json.load(f)


def test_the_pack_ships_workflows():
    assert [os.path.basename(p) for p in WORKFLOWS if p.endswith("train_lora_sd15.json")]


def test_workflow_is_a_ui_workflow_with_unique_ids(workflow):
    assert workflow["version"] == 0.4
    ids = [n["id"] for n in workflow["nodes"]]
    link_ids = [link[0] for link in workflow["links"]]
    assert len(ids) == len(set(ids)) and len(link_ids) == len(set(link_ids))
    assert workflow["last_node_id"] >= max(ids) and workflow["last_link_id"] >= max(link_ids)
    for node in workflow["nodes"]:
        assert {"id", "type", "pos", "size", "mode", "order", "properties"} <= set(node), node["id"]
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        assert node["mode"] == 0, f"node {node['id']} is muted or bypassed in a shipped workflow"


def test_every_node_is_ours_or_core(workflow):
    ours = set(load_pack().NODE_CLASS_MAPPINGS)
    for node in workflow["nodes"]:
        assert node["type"] in ours | set(CORE_NODES) | set(VIRTUAL_NODES), node["type"]


def test_links_are_consistent(workflow):
    nodes = {n["id"]: n for n in workflow["nodes"]}
    info = object_info()
    for link_id, origin, out_slot, target, in_slot, kind in workflow["links"]:
        source, dest = nodes[origin], nodes[target]
        output = source["outputs"][out_slot]
        assert link_id in output["links"], f"link {link_id} missing from node {origin} output {out_slot}"
        assert output["type"] == kind
        assert dest["inputs"][in_slot]["link"] == link_id, f"node {target} input {in_slot} is not link {link_id}"
        assert dest["inputs"][in_slot]["type"] in (kind, "*")
        if source["type"] in info:  # the link type is what the node really returns in that slot
            assert info[source["type"]]["output"][out_slot] == kind, (source["type"], out_slot)
        if dest["type"] in info:  # and what the input really takes
            spec = _spec(info[dest["type"]], dest["inputs"][in_slot]["name"])
            assert spec is not None and spec[0] == kind, (dest["type"], dest["inputs"][in_slot]["name"])
    by_id = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:  # no dangling ends on the node side either
        for slot, inp in enumerate(node.get("inputs") or []):
            if inp.get("link") is not None:
                assert by_id[inp["link"]][3:5] == [node["id"], slot]
        for slot, out in enumerate(node.get("outputs") or []):
            for link_id in out.get("links") or []:
                assert by_id[link_id][1:3] == [node["id"], slot]


def test_every_required_socket_is_linked(workflow):
    """A required input that is not a widget (MODEL, CLIP, IMAGE...) must come by a link, or the server refuses
    the graph."""
    info = object_info()
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        widgets = {name for name, _, _ in widget_inputs(info[node["type"]])}
        linked = {i["name"] for i in node.get("inputs") or [] if i.get("link") is not None}
        for name in info[node["type"]]["input"].get("required", {}):
            assert name in widgets or name in linked, f"{node['type']} (node {node['id']}): '{name}' is not linked"


def test_widget_values_fit_the_nodes(workflow):
    info = object_info()
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        node_info = info[node["type"]]
        expected = sum(count for _, count, _ in widget_inputs(node_info))
        values = node.get("widgets_values") or []
        assert len(values) == expected, f"{node['type']} (node {node['id']}): {len(values)} widget values, " \
                                        f"its inputs take {expected}: regenerate the workflow"
        api = ui_to_api({"nodes": [dict(node, inputs=[])], "links": []}, info)[str(node["id"])]["inputs"]
        for name, value in api.items():
            spec = _spec(node_info, name)
            kind = spec[0]
            # fixed choices; an empty list (ComfyUI's model-file combos) and our metric-model folders take a file
            # name as a placeholder the user replaces
            if isinstance(kind, list) and kind and (node["type"], name) not in MODEL_FOLDER_INPUTS:
                assert value in kind, f"{node['type']}.{name}={value!r} is not one of {kind}"
            elif kind in ("INT", "FLOAT"):
                opts = spec[1] if len(spec) > 1 else {}
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (node["type"], name, value)
                assert opts.get("min", value) <= value <= opts.get("max", value), (node["type"], name, value)
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), (node["type"], name, value)
            elif kind == "STRING":
                assert isinstance(value, str), (node["type"], name, value)


def test_api_forms_are_generated_from_the_ui_forms():
    """workflows/api/ is what tools/export_workflows.py makes of workflows/: edited by hand or left stale, it fails."""
    assert export_workflows.drift() == []
    for path in WORKFLOWS:
        with open(export_workflows.api_path(path), encoding="utf-8") as f:
            prompt = json.load(f)
        assert is_api_prompt(prompt) and all(n["_meta"]["title"] for n in prompt.values())


def test_drift_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(export_workflows, "API_DIR", str(tmp_path))
    export_workflows.export()
    first = sorted(os.listdir(tmp_path))[0]
    with open(tmp_path / first, "a", encoding="utf-8") as f:
        f.write(" ")
    (tmp_path / "gone.json").write_text("{}")
    assert export_workflows.drift() == [f"{os.path.relpath(export_workflows.api_path(first), ROOT)} is stale",
                                        "workflows/api/gone.json has no workflows/gone.json"]
    os.remove(tmp_path / first)
    assert "is missing" in export_workflows.drift()[0]


def shipped_prompt(name: str) -> tuple[dict, dict]:
    """A shipped workflow as an API prompt, and its node ids by class type."""
    with open(os.path.join(ROOT, "workflows", name), encoding="utf-8") as f:
        prompt = ui_to_api(json.load(f), object_info())
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    return prompt, by_type


def test_train_lora_workflow_converts_to_a_prompt_that_applies_the_trained_lora():
    prompt, by_type = shipped_prompt("train_lora_sd15.json")
    assert "MarkdownNote" not in by_type and "Note" not in by_type  # frontend-only
    (train,), (apply,), (sampler,) = by_type["PersonalizeTrainLoRA"], by_type["PersonalizeApplyTrainedLoRA"], \
        by_type["KSampler"]
    t = prompt[train]["inputs"]
    assert t["seed"] == 42 and t["steps"] == 800 and t["preset"] == "attn" and t["resume"] is True
    assert t["validation_prompt"].startswith("a photo of sks")
    assert prompt[apply]["inputs"]["trained_lora"] == [train, 0]  # lora_name output, by link
    assert {prompt[apply]["inputs"][k][0] for k in ("model", "clip")} == set(by_type["CheckpointLoaderSimple"])
    s = prompt[sampler]["inputs"]
    assert s["model"] == [apply, 0] and s["seed"] == 1234 and s["steps"] == 25 and s["sampler_name"] == "euler"
    previews = {prompt[p]["inputs"]["images"][1] for p in by_type["PreviewImage"] if prompt[p]["inputs"]["images"][0] == train}
    assert previews == {1, 2}  # the loss curve and the validation image


def test_textual_inversion_workflow_prompts_with_the_trained_embedding():
    prompt, by_type = shipped_prompt("train_textual_inversion_sd15.json")
    (train,), (concat,), (sampler,) = by_type["PersonalizeTrainTextualInversion"], by_type["StringConcatenate"], \
        by_type["KSampler"]
    t = prompt[train]["inputs"]
    assert t["init_word"] == "dog" and t["num_vectors"] == 2 and t["trigger_word"] == "sks" and t["resume"] is True
    assert prompt[concat]["inputs"]["string_a"] == [train, 1]  # "embedding:<name>", by link
    positive = prompt[sampler]["inputs"]["positive"][0]
    assert prompt[positive]["inputs"]["text"] == [concat, 0]


@pytest.mark.parametrize("name,method,loader", [
    ("train_dreambooth_sd15.json", "dreambooth", "PersonalizeLoadTrainedCheckpoint"),
    ("train_dreambooth_lora_sd15.json", "dreambooth_lora", "PersonalizeApplyTrainedLoRA")])
def test_dreambooth_workflows_sample_base_and_tuned_with_the_same_seed_and_prompt(name, method, loader):
    prompt, by_type = shipped_prompt(name)
    (train,), (load,) = by_type["PersonalizeTrainDreamBooth"], by_type[loader]
    t = prompt[train]["inputs"]
    assert t["method"] == method and t["class_prompt"] and t["instance_prompt"].startswith("a photo of sks")
    link = "trained_checkpoint" if method == "dreambooth" else "trained_lora"
    assert prompt[load]["inputs"][link] == [train, 0]  # the file it just wrote, by link
    base, tuned = sorted(by_type["KSampler"], key=lambda k: prompt[k]["inputs"]["model"][0] == load)
    assert prompt[tuned]["inputs"]["model"] == [load, 0] and prompt[base]["inputs"]["model"][0] != load
    b, t = prompt[base]["inputs"], prompt[tuned]["inputs"]
    assert b["seed"] == t["seed"] and b["latent_image"] == t["latent_image"] and b["steps"] == t["steps"]
    text = lambda k: prompt[prompt[k]["inputs"]["positive"][0]]["inputs"]["text"]  # noqa: E731
    assert text(base) == text(tuned)


# --- ui_to_api on small hand-made graphs ----------------------------------------------
def _node(node_id, kind, widgets=(), inputs=(), outputs=(), mode=0):
    return {"id": node_id, "type": kind, "mode": mode, "widgets_values": list(widgets),
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": t, "type": t, "links": links} for t, links in outputs]}


def test_ui_to_api_skips_seed_controls_and_follows_reroutes_and_bypasses():
    info = object_info()
    wf = {"nodes": [
        _node(1, "CheckpointLoaderSimple", ["m.safetensors"], outputs=[("MODEL", [1]), ("CLIP", [2, 3]), ("VAE", [])]),
        _node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("MODEL", [4])]),
        _node(3, "LoraLoader", ["x.safetensors", 0.5, 1.0], inputs=[("model", "MODEL", 4), ("clip", "CLIP", 2)],
              outputs=[("MODEL", [5]), ("CLIP", [])], mode=4),  # bypassed: MODEL passes through
        _node(4, "CLIPTextEncode", ["hello"], inputs=[("clip", "CLIP", 3)], outputs=[("CONDITIONING", [6, 7])]),
        _node(5, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", [8])]),
        _node(6, "KSampler", [7, "randomize", 3, 5.5, "euler", "normal", 1.0],
              inputs=[("model", "MODEL", 5), ("positive", "CONDITIONING", 6), ("negative", "CONDITIONING", 7),
                      ("latent_image", "LATENT", 8)], outputs=[("LATENT", [])]),
        _node(7, "Note", ["just text"]),
        _node(8, "PreviewImage", inputs=[("images", "IMAGE", None)], mode=2),  # muted
    ], "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 3, 1, "CLIP"], [3, 1, 1, 4, 0, "CLIP"],
                 [4, 2, 0, 3, 0, "MODEL"], [5, 3, 0, 6, 0, "MODEL"], [6, 4, 0, 6, 1, "CONDITIONING"],
                 [7, 4, 0, 6, 2, "CONDITIONING"], [8, 5, 0, 6, 3, "LATENT"]]}
    prompt = ui_to_api(wf, info)
    assert set(prompt) == {"1", "4", "5", "6"}
    assert prompt["6"]["inputs"] == {"seed": 7, "steps": 3, "cfg": 5.5, "sampler_name": "euler", "scheduler": "normal",
                                     "denoise": 1.0, "model": ["1", 0], "positive": ["4", 0],
                                     "negative": ["4", 0], "latent_image": ["5", 0]}
    assert prompt["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}


def test_ui_to_api_names_what_does_not_fit():
    info = object_info()
    with pytest.raises(ValueError, match="NoSuchNode"):
        ui_to_api({"nodes": [_node(1, "NoSuchNode")], "links": []}, info)
    with pytest.raises(ValueError, match="4 widget values, its inputs take 3"):
        ui_to_api({"nodes": [_node(1, "LoraLoader", ["x", 1.0, 1.0, 2.0])], "links": []}, info)
    with pytest.raises(ValueError, match="'denoise' has none"):  # a seed saved without its control value
        ui_to_api({"nodes": [_node(1, "KSampler", [1, 20, 8.0, "euler", "normal", 1.0])], "links": []}, info)
