"""Graphs posted by someone who can reach the server, against a real ComfyUI (set COMFYUI_DIR).

Each graph names a private folder beside ComfyUI's own folders: by absolute path, by '../', through
a link in the input folder, or smuggled in a manifest or a DATASET value. Nothing of that folder may
be read into an output and nothing may be written there or outside ComfyUI's folders.

Run:  COMFYUI_DIR=/work/comfyui python -m pytest tests/test_comfyui_attacks.py -s
"""
import os

import numpy as np
import pytest
from PIL import Image

from comfyui_harness import ComfyServer, comfyui_dir, execution_error

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not comfyui_dir(), reason="set COMFYUI_DIR to a ComfyUI checkout"),
]

SECRET_TEXT = "SECRET-CAPTION-7f3a"
SECRET_COLOUR = (255, 0, 255)  # no photo of the tests has whole regions of pure magenta


CKPT = "attack_toy_sd15.safetensors"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import torch

    from trainers.testing.toy_models import build_sd1, save_single_file

    path = save_single_file(build_sd1("comfy"), str(tmp_path_factory.mktemp("ckpt") / CKPT), dtype=torch.float16)
    with ComfyServer() as server:
        server.add_model("checkpoints", path, CKPT)
        from test_captioning import save_tiny_blip  # a captioner the attacker can pick from the list

        save_tiny_blip(os.path.join(server.model_folder("blip"), "tiny-blip"))
        yield server


@pytest.fixture(scope="module")
def private(comfy) -> str:
    """A folder beside ComfyUI's input folder, with a photo, its caption and a weights file."""
    folder = os.path.join(comfy.work_dir, "private")
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (96, 96), SECRET_COLOUR).save(os.path.join(folder, "secret.png"))
    with open(os.path.join(folder, "secret.txt"), "w", encoding="utf-8") as f:
        f.write(SECRET_TEXT + "\n")
    with open(os.path.join(folder, "evil.safetensors"), "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return folder


def _snapshot(folder: str) -> dict:
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mode)
    return out


@pytest.fixture(scope="module")
def own_photo(comfy) -> str:
    """input/mine/own.png: a legitimate photo, and beside it a link to the private photo and caption."""
    folder = os.path.join(comfy.input_dir, "mine")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 200, (96, 96, 3), dtype=np.uint8)).save(os.path.join(folder, "own.png"))
    return folder


def _post_and_fail(comfy, prompt) -> str:
    """Queue a graph that must fail; the error text (validation or execution)."""
    try:
        prompt_id = comfy.post_prompt(prompt)
    except Exception as e:  # refused at validation (HTTP 400)
        return str(e)
    entry = comfy.wait(prompt_id, timeout=300)
    error = execution_error(entry)
    assert error is not None, entry["status"]
    return f"{error['exception_type']}: {error['exception_message']}"


def _leaks(comfy) -> list[str]:
    """Files in ComfyUI's folders that hold the private caption text or the private photo's pixels."""
    found = []
    for root in (comfy.output_dir, comfy.input_dir, os.path.join(comfy.temp_root, "temp")):
        for d, _, files in os.walk(root):
            for name in files:
                path = os.path.join(d, name)
                if os.path.islink(path):  # the links the tests planted; what matters is what was made of them
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                if SECRET_TEXT.encode() in data:
                    found.append(path)
                elif name.lower().endswith((".png", ".jpg", ".webp")):
                    arr = np.asarray(Image.open(path).convert("RGB"))
                    if (arr == SECRET_COLOUR).all(axis=-1).sum() > 200:
                        found.append(path)
    return found


def _caption_folder(folder, **over) -> dict:
    inputs = dict(folder=folder, policy="overwrite", model="tiny-blip", hub_id="", prompt="", prefix="pwned",
                  suffix="pwned", decoding="beam search", num_beams=1, min_length=1, max_length=4, batch_size=1,
                  seed=0, device="cpu", dtype="auto", keep_loaded=False)
    return {"1": {"class_type": "PersonalizeBlipCaptionFolder", "inputs": {**inputs, **over}}}


def _build(folder, name="stolen", **over) -> dict:
    inputs = dict(folder=folder, name=name, resolution=64, mode="center crop", face_crop=False, repeats=1,
                  dedupe=True)
    return {"1": {"class_type": "PersonalizeBuildDataset", "inputs": {**inputs, **over}}}


def test_folders_outside_comfyui_are_refused_before_any_work(comfy, private):
    before = _snapshot(private)
    os.symlink(private, os.path.join(comfy.input_dir, "linked"))
    for folder in (private, "../private", "linked", os.path.join(comfy.input_dir, "..", "private")):
        message = _post_and_fail(comfy, _caption_folder(folder))
        assert "outside ComfyUI" in message, message
        message = _post_and_fail(comfy, _build(folder))
        assert "outside ComfyUI" in message and "does not exist" not in message, message
    message = _post_and_fail(comfy, _build("mine", class_images_folder=private))
    assert "outside ComfyUI" in message, message
    message = _post_and_fail(comfy, _build(os.path.join(private, "missing")))  # same answer for no such folder
    assert "outside ComfyUI" in message and "does not exist" not in message, message
    assert _snapshot(private) == before  # no caption written, nothing replaced, modes unchanged
    assert not os.path.exists(os.path.join(comfy.output_dir, "personalize", "datasets", "stolen"))
    assert _leaks(comfy) == []


def test_links_inside_an_input_folder_are_not_followed_out(comfy, private, own_photo):
    os.symlink(os.path.join(private, "secret.png"), os.path.join(own_photo, "zz_linked.png"))
    os.symlink(os.path.join(private, "secret.txt"), os.path.join(own_photo, "own.txt"))
    prompt = _build("mine", name="mine")
    prompt["2"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}
    entry = comfy.wait(comfy.post_prompt(prompt), timeout=300)
    assert execution_error(entry) is None, execution_error(entry)
    summary = entry["outputs"]["1"]["text"][0]
    assert "1 image(s)" in summary and "zz_linked.png" in summary, summary  # skipped, with its reason
    dataset = os.path.join(comfy.output_dir, "personalize", "datasets", "mine")
    assert sorted(os.listdir(os.path.join(dataset, "images")))[0].startswith("own_")
    assert _leaks(comfy) == []  # neither the linked photo nor the linked caption's text was taken in


def test_manifest_and_dataset_values_cannot_point_outside(comfy, private, own_photo):
    smuggle = os.path.join(comfy.input_dir, "smuggle")  # what /upload/image would store
    os.makedirs(smuggle, exist_ok=True)
    with open(os.path.join(smuggle, "manifest.json"), "w", encoding="utf-8") as f:
        f.write('{"items": [{"image": "%s", "caption": "x"}, {"image": "../../private/secret.png"}]}'
                % os.path.join(private, "secret.png"))
    preview = {"class_type": "PersonalizePreviewDataset", "inputs": {
        "dataset": {"path": "smuggle"}, "max_images": 4, "columns": 2, "cell": 64}}
    message = _post_and_fail(comfy, {"1": preview, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    assert "outside its folder" in message, message
    preview["inputs"]["dataset"] = {"path": private}
    message = _post_and_fail(comfy, {"1": preview, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    assert "outside ComfyUI" in message, message
    train = {"class_type": "PersonalizeTrainLoRA", "inputs": dict(
        ckpt_name=CKPT, dataset_folder="", trigger_word="x", output_name="x", preset="attn", rank=1,
        alpha=1.0, steps=1, unet_lr=1e-4, batch_size=1, resolution=64, seed=0, dataset={"path": private})}
    message = _post_and_fail(comfy, {"1": train})
    assert "outside ComfyUI" in message, message
    assert _leaks(comfy) == []


def test_lora_names_stay_in_models_loras(comfy, private):
    def graph(lora_name, trained_lora=None, model=("9", 0)):
        inputs = {"model": list(model), "clip": ["9", 1], "lora_name": lora_name, "strength_model": 1.0,
                  "strength_clip": 1.0}
        prompt = {"9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
                  "1": {"class_type": "PersonalizeApplyTrainedLoRA", "inputs": inputs},
                  "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
        if trained_lora is not None:
            inputs["trained_lora"] = ["8", 0]
            prompt["8"] = {"class_type": "PrimitiveString", "inputs": {"value": trained_lora}}
        return prompt

    for name in ("../../private/evil.safetensors", os.path.join(private, "evil.safetensors")):
        message = _post_and_fail(comfy, graph(name))
        assert "not in models/loras" in message, message  # refused at validation, as LoraLoader does
        message = _post_and_fail(comfy, graph("anything.safetensors", trained_lora=name))
        assert "not found in the 'loras' folders" in message, message  # a linked name cannot leave it either
    message = _post_and_fail(comfy, graph("x.safetensors", trained_lora="x", model=("8", 0)))
    assert "takes MODEL" in message, message  # link types are still checked


def test_hub_downloads_are_off_unless_the_owner_enables_them(comfy):
    message = _post_and_fail(comfy, _caption_folder("mine", model="(use hub id)", hub_id="someone/any-repo"))
    assert "PERSONALIZE_ALLOW_HUB_DOWNLOADS=1" in message, message
