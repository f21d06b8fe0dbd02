"""Every shipped workflow (workflows/api/) run in a real ComfyUI through `python -m trainers run-workflow`'s code:
photos uploaded, inputs set by node, progress followed over /ws, results downloaded. The pack is installed here as
custom_nodes/comfyui_personalize (tests/test_comfyui_integration.py installs it as ComfyUI-Personalize, the
browser test under both), so the folder name is not assumed anywhere. Runs when COMFYUI_DIR names a ComfyUI checkout.
"""
import glob
import json
import os
import sys

import pytest

from comfyui_harness import ComfyServer, comfyui_dir, lora_keys_not_loaded
from test_comfyui_integration import (CKPT, CKPT_XL, TRAIN, locon_te_lora, lora_files, metric_models,  # noqa: F401
                                      photos, tiny_blip, toy_checkpoint, toy_sdxl_checkpoint)
from trainers.cli.main import main as cli
from trainers.cli.run_workflow import run_workflow
from trainers.graph.client import WorkflowError

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not comfyui_dir(), reason="set COMFYUI_DIR to a ComfyUI checkout"),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "workflows", "api", "*.json")))
TRAIN_TI, TRAIN_DB = "PersonalizeTrainTextualInversion", "PersonalizeTrainDreamBooth"
PACK_FOLDER = "comfyui_personalize"


@pytest.fixture(scope="module")
def comfy(toy_checkpoint):  # noqa: F811 (this module's own server)
    server = ComfyServer(pack_folder=PACK_FOLDER)
    server.add_model("checkpoints", toy_checkpoint, CKPT)
    with server:
        yield server


@pytest.fixture(scope="module")
def local_photos(tmp_path_factory) -> str:
    """Photos and captions on the client's side, uploaded by the client."""
    from trainers.testing.demo import make_photos

    folder = str(tmp_path_factory.mktemp("client") / "dog")
    make_photos(folder, count=3, size=96)
    return folder


def test_pack_is_installed_under_another_folder_name(comfy):
    assert os.path.basename(comfy.pack_path) == PACK_FOLDER and os.path.islink(comfy.pack_path)
    assert f"{PACK_FOLDER}" in comfy.log_text() and "ComfyUI-Personalize" not in comfy.log_text()
    assert "PersonalizeTrainLoRA" in comfy.object_info()
    scripts = comfy.get("/extensions")  # the canvas script is served from wherever the pack lies
    assert any(s.startswith(f"/extensions/{PACK_FOLDER}/") and s.endswith(".js") for s in scripts), scripts


def test_committed_core_node_description_matches_this_comfyui(comfy):
    """workflows/api/ and tests/test_workflows.py read ComfyUI's nodes from trainers/graph/comfy_core_nodes.json."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import export_workflows

    committed = export_workflows.core_nodes()
    live = export_workflows.core_description(comfy.object_info(), committed)
    for name, entry in live.items():
        assert entry == committed[name], f"{name} changed in this ComfyUI: run tools/export_workflows.py " \
                                         f"--refresh-core <server> and regenerate"


def assignments(prompt: dict, stem: str) -> list[str]:
    """'#id.input=value' for the test's models and sizes; everything else as shipped."""
    trainers = [i for i, n in prompt.items() if n["class_type"] in (TRAIN, TRAIN_TI, TRAIN_DB)]
    out = []
    for node_id, node in prompt.items():
        inputs, kind = node["inputs"], node["class_type"]
        new = {}
        if "ckpt_name" in inputs:  # SDXL workflows name an SDXL base
            new["ckpt_name"] = CKPT_XL if "xl" in inputs["ckpt_name"].lower() else CKPT
        if node_id in trainers:  # several trainers in one workflow: one file each
            new.update(output_name=f"wf_{stem}" if len(trainers) == 1 else f"wf_{stem}_{node_id}", steps=2,
                       resolution=64, resume=False)
            if kind != TRAIN_TI:
                new.update(rank=4, alpha=4.0)
            if kind == TRAIN_DB:
                new.update(num_class_images=2, class_sample_steps=2)
        if kind == "EmptyLatentImage":  # two images per prompt: DIV (variety) needs a pair
            new.update(width=64, height=64, batch_size=2)
        if kind in ("KSampler", "KSamplerAdvanced"):
            new["steps"] = 2
        if kind == "PersonalizeBenchmarkSampling":
            new.update(steps=2, images=2)
            if inputs.get("model_file"):
                new["model_file"] = "it_locon_te.safetensors"
        if kind == "LoraLoader":
            new["lora_name"] = "it_locon_te.safetensors"
        if kind == "PersonalizeCompareModels":
            new.update(clip_model="clip-vit-base-patch32", dino_model="dino-vits16", lpips_model="lpips-alex")
        if "hub_id" in inputs:  # BLIP nodes: a local tiny model instead of a download
            new.update(model="tiny-blip", hub_id="")
        out += [f"#{node_id}.{k}={json.dumps(v)}" for k, v in new.items() if not isinstance(inputs.get(k), list)]
    return out


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=os.path.basename)
def test_shipped_workflow_runs_through_the_client(comfy, local_photos, tiny_blip, locon_te_lora, metric_models,
                                                  toy_sdxl_checkpoint, path, tmp_path, capsys):
    with open(path, encoding="utf-8") as f:
        prompt = json.load(f)
    stem = os.path.splitext(os.path.basename(path))[0]
    mark = comfy.log_size()
    try:
        out = run_workflow(path, comfy.url, assignments(prompt, stem), upload=local_photos,
                           out=str(tmp_path / "results"), timeout=1200)
    except WorkflowError as e:
        pytest.fail(f"{e}\n{comfy.log_since(mark)[-3000:]}")
    log = comfy.log_since(mark)
    said = capsys.readouterr().out
    assert "uploaded" in said and "queued" in said and "running node" in said  # followed over /ws
    assert lora_keys_not_loaded(log) == [], log
    kinds = {i: n["class_type"] for i, n in prompt.items()}
    folders = {name.split("_", 1)[0]: os.path.join(out, name) for name in os.listdir(out)
               if os.path.isdir(os.path.join(out, name))}
    from PIL import Image

    for node_id, kind in kinds.items():  # every image node's pictures came back and open
        if kind in ("SaveImage", "PreviewImage"):
            pictures = glob.glob(os.path.join(folders[node_id], "*.png"))
            assert pictures, (node_id, sorted(folders))
            assert Image.open(pictures[0]).size[0] > 0
        if kind == "PersonalizeCompareModels":  # the report: likeness, prompt fidelity and variety for every model
            table = open(os.path.join(folders[node_id], "text.md"), encoding="utf-8").read()
            header, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                                if line.startswith("|")]
            models = [row for row in rows if row[0] != "subject photos"]
            assert len(models) >= 2, table
            for metric in ("DINO", "CLIP-I", "CLIP-T", "DIV"):
                column = header.index(metric)
                assert all(row[column] not in ("", "-") for row in models), (metric, table)
    trainers = [i for i, k in kinds.items() if k in (TRAIN, TRAIN_DB)]
    for node_id in trainers:
        name = f"wf_{stem}" if len([i for i, k in kinds.items() if k in (TRAIN, TRAIN_DB, TRAIN_TI)]) == 1 \
            else f"wf_{stem}_{node_id}"
        if prompt[node_id]["inputs"].get("method") == "dreambooth":
            assert os.path.isfile(os.path.join(comfy.model_folder("checkpoints"), f"{name}.safetensors"))
        else:
            assert lora_files(comfy, name) == [f"{name}.safetensors"]
    if TRAIN_TI in kinds.values():
        assert os.path.isfile(os.path.join(comfy.model_folder("embeddings"), f"wf_{stem}.safetensors"))
        assert "does not exist" not in log, log  # the prompt's embedding:wf_<stem> was found


def test_client_exits_1_with_comfyuis_error_text(comfy, tmp_path, capsys):
    path = os.path.join(REPO, "workflows", "api", "train_lora_sd15.json")
    code = cli(["run-workflow", path, "--server", comfy.url, "--set", "Train LoRA (Personalize).ckpt_name=nope",
                "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "node" in err and "nope" in err, err  # refused before it ran: the combo check
    models = [f"--set=Train LoRA (Personalize).ckpt_name={CKPT}", f"--set=Load Checkpoint.ckpt_name={CKPT}"]
    code = cli(["run-workflow", path, "--server", comfy.url, *models,
                "--set", "Train LoRA (Personalize).dataset_folder=no_such_photos", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "PersonalizeTrainLoRA" in err and "no_such_photos" in err, err  # failed while running
    assert not os.path.exists(tmp_path / "r")
