"""End-to-end checks against a real ComfyUI (set COMFYUI_DIR to a checkout).

Run:  COMFYUI_DIR=/work/comfyui python -m pytest tests/test_comfyui_integration.py -m comfyui -s

One server serves the whole module. Its model is the smallest one ComfyUI loads as SD1.5
(trainers.testing.toy_models.build_sd1("comfy"): random weights), training runs on the CPU for a
few steps at 64 px, so every result here is about plumbing and numerics, not image quality.
"""
import glob
import json
import os
import subprocess
import time

import pytest

from comfyui_harness import (ComfyServer, comfyui_dir, execution_error, lora_keys_not_loaded,
                             wait_until, was_interrupted)

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not comfyui_dir(), reason="set COMFYUI_DIR to a ComfyUI checkout"),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = "personalize_toy_sd15.safetensors"
TRAIN, APPLY = "PersonalizeTrainLoRA", "PersonalizeApplyTrainedLoRA"


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> str:
    """The smallest SD1.5 ComfyUI accepts (320 channels, CLIP-L, SD VAE), in LDM layout, fp16."""
    import torch

    from trainers.testing.toy_models import build_sd1, save_single_file

    path = str(tmp_path_factory.mktemp("comfy_ckpt") / CKPT)
    return save_single_file(build_sd1("comfy"), path, dtype=torch.float16)


@pytest.fixture(scope="module")
def comfy(toy_checkpoint):
    server = ComfyServer()
    server.add_model("checkpoints", toy_checkpoint, CKPT)
    with server:
        yield server


@pytest.fixture(scope="module")
def photos(comfy) -> str:
    """Photos in ComfyUI's input folder (the only place a graph may read them from), named relative to it."""
    from trainers.testing.demo import make_photos

    make_photos(os.path.join(comfy.input_dir, "photos"), count=3, size=96)
    return "photos"


def train_inputs(photos: str, output_name: str, **over) -> dict:
    """PersonalizeTrainLoRA inputs for a few CPU steps at 64 px."""
    inputs = dict(ckpt_name=CKPT, dataset_folder=photos, trigger_word="sks", output_name=output_name,
                  preset="attn", rank=4, alpha=4.0, steps=3, unet_lr=1e-3, batch_size=1, resolution=64, seed=1,
                  train_text_encoder=False, text_encoder_lr=1e-3, mixed_precision="no", save_every=0,
                  warmup_steps=0, lr_scheduler="constant", resume=False)
    return {**inputs, **over}


def sample_nodes(model, clip, vae, first_id: int = 10) -> dict:
    """CLIPTextEncode x2 -> EmptyLatentImage 64 px -> KSampler (2 steps) -> VAEDecode -> PreviewImage."""
    i = first_id
    return {
        str(i): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a photo of sks ball on the beach"}},
        str(i + 1): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
        str(i + 2): {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        str(i + 3): {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [str(i), 0], "negative": [str(i + 1), 0], "latent_image": [str(i + 2), 0],
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        str(i + 4): {"class_type": "VAEDecode", "inputs": {"samples": [str(i + 3), 0], "vae": vae}},
        str(i + 5): {"class_type": "PreviewImage", "inputs": {"images": [str(i + 4), 0]}},
    }


def run_prompt(comfy, prompt: dict, timeout: float = 600) -> tuple[dict, str, float]:
    """Queue, wait; returns (history entry, what the server logged meanwhile, seconds)."""
    mark, started = comfy.log_size(), time.monotonic()
    entry = comfy.wait(comfy.post_prompt(prompt), timeout=timeout)
    return entry, comfy.log_since(mark), time.monotonic() - started


def assert_success(entry: dict, log: str) -> None:
    error = execution_error(entry)
    assert error is None, f"{error['node_type']}: {error['exception_type']}: {error['exception_message']}\n" \
                          f"{''.join(error['traceback'])}\n{log[-3000:]}"
    assert entry["status"]["status_str"] == "success", entry["status"]


def lora_files(comfy, stem: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(comfy.model_folder("loras"), stem + "*")))


def read_log(run_folder: str) -> list[dict]:
    """The run's step records; a line still being written (no newline yet) is left out."""
    try:
        with open(os.path.join(run_folder, "log.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f.read().splitlines(keepends=True)
                    if line.endswith("\n") and line.strip()]
    except FileNotFoundError:
        return []


def run_equivalence(comfy, script: str, checkpoint: str, work, *args: str) -> dict:
    """Run one of tests/comfy_*_equivalence.py with ComfyUI's interpreter; returns its EQUIVALENCE record."""
    proc = subprocess.run([comfy.python, os.path.join(REPO, "tests", script), "--ckpt", checkpoint, *args,
                           "--work", str(work), "--comfy-dir", comfy.comfy_dir],
                          cwd=comfy.comfy_dir, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("EQUIVALENCE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1][len("EQUIVALENCE "):])


def write_canary_lora(path: str) -> list[str]:
    """A LoRA whose one module exists in no model: ComfyUI must report each of its keys."""
    import torch
    from safetensors.torch import save_file

    stem = "lora_unet_no_such_block_proj"
    tensors = {f"{stem}.lora_down.weight": torch.zeros(4, 8), f"{stem}.lora_up.weight": torch.zeros(8, 4),
               f"{stem}.alpha": torch.tensor(4.0)}
    save_file(tensors, path)
    return sorted(tensors)


@pytest.fixture(scope="module")
def locon_te_lora(comfy, photos) -> dict:
    """A LoRA trained through POST /prompt: LoCon preset (UNet convs) and the text encoder."""
    prompt = {"1": {"class_type": TRAIN, "inputs": train_inputs(
        photos, "it_locon_te", preset="locon", train_text_encoder=True, steps=2, unet_lr=1e-3)}}
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"\ntraining through /prompt (locon + text encoder, 2 steps): {seconds:.1f} s")
    assert_success(entry, log)
    return {"entry": entry, "log": log, "name": "it_locon_te.safetensors",
            "path": os.path.join(comfy.model_folder("loras"), "it_locon_te.safetensors")}


# --- start-up -------------------------------------------------------------------------------
def test_server_starts_with_pack_and_imports_it_quickly(comfy):
    log = comfy.log_text()
    assert f"Cannot import {comfy.pack_path} module" not in log, log
    timing = comfy.pack_import_time()
    assert timing is not None, f"pack missing from the import-times block:\n{log}"
    seconds, imported = timing
    print(f"\n{comfy.pack_folder} import time (ComfyUI log, 0.1 s resolution): {seconds:.1f} s")
    assert imported, f"ComfyUI marked the pack IMPORT FAILED:\n{log}"
    assert seconds < 1.0
    assert "CheckpointLoaderSimple" in comfy.object_info()  # the server answers real queries


def test_pack_import_is_cheap_inside_comfyui(comfy):
    from comfyui_harness import measure_pack_import
    probe = measure_pack_import(comfy.comfy_dir, comfy.pack_folder, pack_path=comfy.pack_path)
    print(f"\n{comfy.pack_folder} import inside ComfyUI's interpreter: "
          f"{probe['seconds'] * 1000:.1f} ms; pulled in {probe['added_top_level_modules']}")
    heavy = {"diffusers", "peft", "accelerate", "bitsandbytes"} & set(probe["added_top_level_modules"])
    assert not heavy, f"the pack imports {sorted(heavy)} at load time; import them inside functions"
    assert probe["seconds"] < 1.0


# --- train, then use ---------------------------------------------------------------------------
def test_train_lora_through_prompt_api_writes_a_kohya_file(comfy, locon_te_lora):
    from safetensors import safe_open

    assert CKPT in comfy.object_info(TRAIN)["input"]["required"]["ckpt_name"][0]  # the server's checkpoints
    entry = locon_te_lora["entry"]
    text = entry["outputs"]["1"]["text"][0]
    assert text.startswith(locon_te_lora["name"] + ":"), text  # the node reports the file it wrote
    assert lora_files(comfy, "it_locon_te") == ["it_locon_te.safetensors"]  # no .part left behind
    with safe_open(locon_te_lora["path"], framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in keys)  # LoCon: UNet convs too
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_train_unet_only"] == "False"
    assert meta["ss_sd_model_name"] == os.path.splitext(CKPT)[0] and meta["ss_steps"] == "2"
    run = comfy.run_folder("it_locon_te")
    assert os.path.isfile(os.path.join(run, "finished.json"))
    assert [r["step"] for r in read_log(run)] == [1, 2]


def test_trained_lora_loads_in_lora_loader_and_samples_without_unmatched_keys(comfy, locon_te_lora):
    # A second LoraLoader with a canary file proves the log check sees ComfyUI's warnings at all.
    canary = write_canary_lora(os.path.join(comfy.model_folder("loras"), "it_canary.safetensors"))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                     "lora_name": locon_te_lora["name"],
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "LoraLoader", "inputs": {"model": ["2", 0], "clip": ["2", 1],
                                                     "lora_name": "it_canary.safetensors",
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        **sample_nodes(["3", 0], ["3", 1], ["1", 2]),
    }
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"\nLoraLoader + 2-step sampling: {seconds:.1f} s")
    assert_success(entry, log)
    assert entry["outputs"]["15"]["images"], entry["outputs"]
    assert sorted(lora_keys_not_loaded(log)) == canary, log  # only the canary's keys: all of ours loaded


def test_one_prompt_trains_and_applies_through_the_trained_lora_link(comfy, photos):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": TRAIN, "inputs": train_inputs(photos, "it_linked", preset="kohya", steps=2)},
        # lora_name names no file: the link must win over the dropdown
        "3": {"class_type": APPLY, "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "not_there.safetensors",
                                              "strength_model": 1.0, "strength_clip": 1.0, "trained_lora": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},  # the loss curve
        **sample_nodes(["3", 0], ["3", 1], ["1", 2]),
    }
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"\ntrain (kohya, 2 steps) + apply by link + sample, one prompt: {seconds:.1f} s")
    assert_success(entry, log)
    assert lora_files(comfy, "it_linked") == ["it_linked.safetensors"]
    assert entry["outputs"]["15"]["images"] and entry["outputs"]["4"]["images"]
    assert lora_keys_not_loaded(log) == [], log


# --- numerics: ComfyUI's LoRA application == our peft model ----------------------------------------
@pytest.mark.parametrize("network", ["lora", "loha", "lokr"])
def test_lora_applied_by_comfyui_changes_the_model_as_our_peft_model(comfy, toy_checkpoint, locon_te_lora, photos,
                                                                    tmp_path, network):
    path = locon_te_lora["path"]
    if network != "lora":  # LyCORIS: trained through /prompt too, alpha != rank so that the scale matters, and
        # the 3x3 convs with a rank and alpha of their own (kohya's conv_dim / conv_alpha)
        name = f"it_{network}_locon_te"
        entry, log, _ = run_prompt(comfy, {"1": {"class_type": TRAIN, "inputs": train_inputs(
            photos, name, network=network, preset="locon", train_text_encoder=True, steps=2, unet_lr=1e-3,
            alpha=2.0, conv_rank=2, conv_alpha=1.0)}})
        assert_success(entry, log)
        path = os.path.join(comfy.model_folder("loras"), name + ".safetensors")
    started = time.monotonic()
    r = run_equivalence(comfy, "comfy_lora_equivalence.py", toy_checkpoint, tmp_path, "--lora", path)
    print(f"\nequivalence script: {time.monotonic() - started:.1f} s; "
          + ", ".join(f"{k}={v:.2e}" for k, v in r.items() if k.endswith(("_err", "_size"))))
    # Every tensor of the file lands in both: ComfyUI patches one weight per module, we attach one adapter.
    assert r["network"] == network
    assert r["keys_not_loaded"] == [] and r["unused_stems"] == []
    assert r["comfy_unet_patches"] == r["file_unet_stems"] == r["ours_unet_modules"] > 0
    assert r["comfy_clip_patches"] == r["file_te_stems"] == r["ours_te_modules"] == 12 * 6  # CLIP-L: q k v out fc1 fc2
    assert r["locon_stems_missing_from_file"] == [] and r["file_stems_outside_locon"] == []
    assert r["unet_dtype"] == "torch.float32"
    for part in ("unet", "te"):
        assert r[f"{part}_base_rel_err"] < 1e-4  # control: the same base model on both sides
        assert r[f"{part}_delta_size"] > 1e-3  # the LoRA really changes the output...
        assert r[f"{part}_delta_rel_err"] < 1e-3  # ...and by the same amount in ComfyUI


# --- textual inversion: trained through /prompt, used as embedding:<name> ---------------------------
TRAIN_TI = "PersonalizeTrainTextualInversion"


def ti_inputs(photos: str, output_name: str, **over) -> dict:
    inputs = dict(ckpt_name=CKPT, dataset_folder=photos, trigger_word="sks", output_name=output_name,
                  init_word="ball", num_vectors=2, steps=3, embedding_lr=0.05, batch_size=1, resolution=64, seed=1,
                  mixed_precision="no", save_every=0, warmup_steps=0, lr_scheduler="constant", resume=False)
    return {**inputs, **over}


def test_embedding_trained_in_one_prompt_is_used_by_clip_text_encode(comfy, toy_checkpoint, photos, tmp_path):
    """One graph: train the embedding, put its `embedding:<name>` output into a prompt, sample with it. Then
    ComfyUI's conditioning for that prompt is compared with our engine's."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": TRAIN_TI, "inputs": ti_inputs(photos, "it_emb")},
        "3": {"class_type": "StringConcatenate", "inputs": {"string_a": ["2", 1], "string_b": "on the beach",
                                                            "delimiter": " "}},
        **sample_nodes(["1", 0], ["1", 1], ["1", 2]),
    }
    prompt["10"]["inputs"]["text"] = ["3", 0]
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"\ntextual inversion through /prompt (3 steps) and sampling: {seconds:.1f} s")
    assert_success(entry, log)
    assert entry["outputs"]["2"]["text"][0].startswith("it_emb.safetensors: 3 steps")
    path = os.path.join(comfy.model_folder("embeddings"), "it_emb.safetensors")
    assert os.path.isfile(path)
    assert "does not exist" not in log, log  # ComfyUI found embedding:it_emb when it encoded the prompt
    assert entry["outputs"]["15"]["images"]

    r = run_equivalence(comfy, "comfy_embedding_equivalence.py", toy_checkpoint, tmp_path, "--embedding", path)
    print("embedding equivalence: " + ", ".join(f"{k}={v}" for k, v in r.items()))
    assert r["missing_warnings"] == []
    assert r["comfy_embedding_vectors"] == r["file_vectors"] == 2  # both vectors went into the prompt
    assert r["control_rel_err"] < 1e-4  # the same base CLIP on both sides
    assert r["embedding_effect"] > 1e-3  # the trained vectors change the conditioning...
    assert r["embedding_rel_err"] < 1e-4  # ...and ComfyUI's conditioning is ours


# --- DreamBooth: trained through /prompt, cancelled during class images and training, loaded by ComfyUI --------
TRAIN_DB = "PersonalizeTrainDreamBooth"


def db_inputs(photos: str, output_name: str, **over) -> dict:
    inputs = dict(ckpt_name=CKPT, dataset_folder=photos, method="dreambooth", trigger_word="sks",
                  output_name=output_name, instance_prompt="a photo of sks ball", class_prompt="a photo of a ball",
                  num_class_images=3, prior_loss_weight=1.0, steps=2, unet_lr=1e-4, batch_size=1, resolution=64,
                  seed=1, class_sample_steps=2, mixed_precision="no", save_every=0, warmup_steps=0,
                  lr_scheduler="constant", gradient_checkpointing=False, resume=False)
    return {**inputs, **over}


def test_dreambooth_checkpoint_loads_in_checkpoint_loader_simple_and_samples(comfy, photos):
    entry, log, seconds = run_prompt(comfy, {"1": {"class_type": TRAIN_DB, "inputs": db_inputs(photos, "it_db")}})
    print(f"\nDreamBooth through /prompt (3 class images, 2 steps): {seconds:.1f} s")
    assert_success(entry, log)
    assert entry["outputs"]["1"]["text"][0].startswith("it_db.safetensors: 2 steps")
    assert os.path.isfile(os.path.join(comfy.model_folder("checkpoints"), "it_db.safetensors"))
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "it_db.safetensors"}},
              **sample_nodes(["1", 0], ["1", 1], ["1", 2])}
    entry, log, _ = run_prompt(comfy, prompt)
    assert_success(entry, log)
    assert entry["outputs"]["15"]["images"]


def test_dreambooth_cancel_during_class_images_and_training_then_resume(comfy, photos):
    name = "it_db_cancel"
    run = comfy.run_folder(name)
    classes = os.path.join(comfy.output_dir, "personalize", "class_images")
    before = set(os.listdir(classes)) if os.path.isdir(classes) else set()
    inputs = db_inputs(photos, name, num_class_images=400, class_prompt="a photo of a cup", steps=2000,
                       resume=True)
    # Cancel while the class images are made: the finished ones stay, no half-written file.
    prompt_id = comfy.post_prompt({"1": {"class_type": TRAIN_DB, "inputs": inputs}})
    comfy.wait_running(prompt_id, timeout=120)

    def made():
        folders = set(os.listdir(classes)) - before if os.path.isdir(classes) else set()
        return [f for d in folders for f in os.listdir(os.path.join(classes, d)) if f.endswith(".png")]

    wait_until(lambda: len(made()) >= 4, timeout=300, what="four class images")
    comfy.interrupt(prompt_id)
    entry = comfy.wait(prompt_id, timeout=300)
    assert was_interrupted(entry) and execution_error(entry) is None, entry["status"]
    (folder,) = set(os.listdir(classes)) - before
    kept = sorted(os.listdir(os.path.join(classes, folder)))
    assert 4 <= len([f for f in kept if f.endswith(".png")]) < 400 and not [f for f in kept if f.endswith(".part")]

    # Fewer class images now (the ones made are reused), cancel during training, then resume to the end.
    inputs.update(num_class_images=4)
    prompt_id = comfy.post_prompt({"1": {"class_type": TRAIN_DB, "inputs": inputs}})
    comfy.wait_running(prompt_id, timeout=120)
    wait_until(lambda: len(read_log(run)) >= 2, timeout=300, what="two logged training steps")
    comfy.interrupt(prompt_id)
    entry = comfy.wait(prompt_id, timeout=300)
    assert was_interrupted(entry) and execution_error(entry) is None, entry["status"]
    stopped = read_log(run)[-1]["step"]
    assert not os.path.exists(os.path.join(comfy.model_folder("checkpoints"), f"{name}.safetensors"))
    assert os.listdir(os.path.join(run, "checkpoints")) == [f"step_{stopped:06d}"]

    entry, log, _ = run_prompt(comfy, {"1": {"class_type": TRAIN_DB, "inputs": {**inputs, "steps": stopped + 2}}})
    assert_success(entry, log)
    assert "generating" not in log  # every class image was there already
    assert [r["step"] for r in read_log(run)] == list(range(1, stopped + 3))
    assert all("prior_loss" in r and "instance_loss" in r for r in read_log(run))
    assert os.path.isfile(os.path.join(comfy.model_folder("checkpoints"), f"{name}.safetensors"))


# --- cancel and resume -------------------------------------------------------------------------
def test_cancel_keeps_a_checkpoint_and_resume_continues_it(comfy, photos):
    name = "it_cancel"
    run = comfy.run_folder(name)
    inputs = train_inputs(photos, name, steps=2000)
    prompt_id = comfy.post_prompt({"1": {"class_type": TRAIN, "inputs": inputs}})
    comfy.wait_running(prompt_id, timeout=120)
    wait_until(lambda: len(read_log(run)) >= 2, timeout=300, what="two logged training steps")
    comfy.interrupt(prompt_id)
    entry = comfy.wait(prompt_id, timeout=300)
    assert was_interrupted(entry), entry["status"]
    assert execution_error(entry) is None, execution_error(entry)  # a cancel, not a crash
    stopped = read_log(run)[-1]["step"]
    assert 2 <= stopped < 2000
    assert lora_files(comfy, name) == []  # nothing exported, nothing half-written
    checkpoints = os.listdir(os.path.join(run, "checkpoints"))
    assert checkpoints == [f"step_{stopped:06d}"], checkpoints  # complete (no .part) and at the stop step
    assert not os.path.exists(os.path.join(run, "finished.json"))

    entry, log, seconds = run_prompt(comfy, {"1": {"class_type": TRAIN, "inputs": {
        **inputs, "steps": stopped + 2, "resume": True}}})
    print(f"\ncancelled at step {stopped}; resume to {stopped + 2}: {seconds:.1f} s")
    assert_success(entry, log)
    assert "resuming from" in log and f"step_{stopped:06d}" in log, log[-3000:]
    assert [r["step"] for r in read_log(run)] == list(range(1, stopped + 3))  # one curve, no gap or repeat
    assert lora_files(comfy, name) == [f"{name}.safetensors"]
    assert not glob.glob(os.path.join(os.path.dirname(run), name + "_*"))  # the same run folder, not a new one
    assert entry["outputs"]["1"]["text"][0].startswith(f"{name}.safetensors: {stopped + 2} steps")


# --- shipped workflows ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_blip(comfy) -> str:
    """A tiny random BLIP folder in models/blip, picked in the workflows' caption nodes in place of a real one."""
    from test_captioning import save_tiny_blip

    save_tiny_blip(os.path.join(comfy.model_folder("blip"), "tiny-blip"))
    return "tiny-blip"


# --- compare: Benchmark Sampling and Compare Models in a real ComfyUI ---------------------------------------
@pytest.fixture(scope="module")
def metric_models(comfy) -> dict:
    """Tiny random CLIP, DINO and LPIPS folders in models/metrics, picked in Compare Models' dropdowns."""
    from trainers.testing.toy_lpips import save_toy_lpips
    from trainers.testing.toy_metrics import save_toy_clip, save_toy_dino

    folder = comfy.model_folder("metrics")
    save_toy_clip(os.path.join(folder, "clip-vit-base-patch32"))
    save_toy_dino(os.path.join(folder, "dino-vits16"))
    save_toy_lpips(os.path.join(folder, "lpips-alex"))
    return {"clip_model": "clip-vit-base-patch32", "dino_model": "dino-vits16", "lpips_model": "lpips-alex"}


def test_benchmark_and_compare_base_against_a_lora_in_one_prompt(comfy, photos, locon_te_lora, metric_models):
    """Base and LoRA sampled by Benchmark Sampling with the same seed, decoded, and scored by Compare Models."""
    bench = dict(seed=5, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", images=2, warmup=1)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                     "lora_name": locon_te_lora["name"],
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks ball"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a photo of sks ball"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "7": {"class_type": "PersonalizeBenchmarkSampling", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["5", 0], "latent": ["6", 0], "label": "base",
            "model_file": CKPT, **bench}},
        "8": {"class_type": "PersonalizeBenchmarkSampling", "inputs": {
            "model": ["2", 0], "positive": ["4", 0], "negative": ["5", 0], "latent": ["6", 0], "label": "lora",
            "model_file": locon_te_lora["name"], **bench}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "compare_photo.png"}},
        "12": {"class_type": "PersonalizeCompareModels", "inputs": {
            "images_a": ["9", 0], "label_a": "base", "images_b": ["10", 0], "label_b": "lora",
            "cost_a": ["7", 1], "cost_b": ["8", 1], "subject_photos": ["11", 0], "prompts": "a photo of sks ball",
            "identifier": "sks", "class_noun": "ball", "name": "it_compare", **metric_models}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 2]}},
    }
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 80, 40)).save(os.path.join(comfy.input_dir, "compare_photo.png"))
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"\nbenchmark x2 + compare: {seconds:.1f} s")
    print(entry["outputs"]["12"]["text"][0])
    assert_success(entry, log)
    assert lora_keys_not_loaded(log) == [], log
    table = entry["outputs"]["12"]["text"][0]  # the node's ui text
    header = table.splitlines()[0]
    assert header.startswith("| model | DINO | CLIP-I | CLIP-T | DIV |") and "s/image" in header, table
    assert "parameters" in header and "file MB" in header, table
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:] if line.startswith("| ")}
    assert set(rows) >= {"base", "lora"} and "-" not in rows["lora"].split(" | ")[1:6], table
    reports = glob.glob(os.path.join(comfy.output_dir, "personalize", "compare", "it_compare*", "report.json"))
    data = json.load(open(reports[0]))
    assert data["models"]["lora"]["DINO"]["backbone"] == "dino-vits16"
    assert data["models"]["lora"]["s/image"] > 0 and data["models"]["lora"]["parameters"] > 0
    assert entry["outputs"]["13"]["images"]


# --- SDXL: the smallest checkpoint ComfyUI takes as SDXL (Segmind Vega's layout, full CLIP-L and bigG) ---------
CKPT_XL = "personalize_toy_sdxl.safetensors"


@pytest.fixture(scope="module")
def toy_sdxl_checkpoint(comfy, tmp_path_factory) -> str:
    import torch

    from trainers.testing.toy_models import build_sdxl, save_single_file

    tokenizer = os.path.join(comfyui_dir(), "comfy", "sd1_tokenizer")
    path = str(tmp_path_factory.mktemp("comfy_xl") / CKPT_XL)
    save_single_file(build_sdxl("comfy", tokenizer_dir=tokenizer), path, dtype=torch.float16)
    comfy.add_model("checkpoints", path, CKPT_XL)
    return path


def test_a_vae_picked_on_the_trainer_encodes_the_photos(comfy, photos, tmp_path):
    """vae_name from models/vae: the trainer reads its base text-first and swaps this VAE in once the base's own is
    read; the run records it."""
    from trainers.core.safetensors_file import write
    from trainers.families.ldm_keys import diffusers_to_ldm
    from trainers.testing.toy_models import build_sd1

    path = str(tmp_path / "it_vae.safetensors")
    write(path, diffusers_to_ldm(build_sd1("comfy", seed=7), parts=("vae",)))
    comfy.add_model("vae", path)
    entry, log, _ = run_prompt(comfy, {"1": {"class_type": TRAIN, "inputs": train_inputs(
        photos, "it_vae", steps=1, vae_name="it_vae.safetensors")}})
    assert_success(entry, log)
    assert "encoding with the VAE" in log and "it_vae.safetensors" in log, log[-3000:]
    with open(os.path.join(comfy.run_folder("it_vae"), "config.json"), encoding="utf-8") as f:
        assert json.load(f)["vae"] == "it_vae.safetensors"


@pytest.fixture(scope="module")
def sdxl_lora(comfy, photos, toy_sdxl_checkpoint) -> dict:
    """An SDXL LoRA trained through POST /prompt, kohya preset, both text encoders, and sampled through it."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_XL}},
        "2": {"class_type": TRAIN, "inputs": train_inputs(photos, "it_sdxl", ckpt_name=CKPT_XL, preset="kohya",
                                                          steps=2, train_text_encoder=True)},
        "3": {"class_type": APPLY, "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "not_there.safetensors",
                                              "strength_model": 1.0, "strength_clip": 1.0, "trained_lora": ["2", 0]}},
        **sample_nodes(["3", 0], ["3", 1], ["1", 2]),
    }
    entry, log, seconds = run_prompt(comfy, prompt, timeout=900)
    print(f"\nSDXL LoRA (kohya preset, both text encoders, 2 steps) + apply + sample: {seconds:.1f} s")
    assert_success(entry, log)
    return {"path": os.path.join(comfy.model_folder("loras"), "it_sdxl.safetensors"), "log": log,
            "summary": "\n".join(entry["outputs"]["2"]["text"])}


def test_sdxl_lora_trained_through_prompt_applies_every_key_in_comfyui(sdxl_lora):
    from safetensors import safe_open

    log = sdxl_lora["log"]
    assert "SDXLClipModel" in log, log[-3000:]  # ComfyUI took the base as SDXL
    assert lora_keys_not_loaded(log) == [], log
    with safe_open(sdxl_lora["path"], "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    # The node says what an SDXL base means for its settings (here a typed 64 px, far below SDXL's own size).
    assert "SDXL base: resolution 64 px as set, but SDXL was trained at 1024 px" in sdxl_lora["summary"]


def test_the_canvas_asks_the_server_what_a_picked_base_means(comfy, toy_sdxl_checkpoint):
    """web/personalize.js calls this route when ckpt_name, resolution or a memory setting changes."""
    import urllib.error
    from urllib.parse import urlencode

    body = comfy.get("/api/personalize/base_model?" + urlencode({"name": CKPT_XL, "resolution": 0,
                                                                 "gradient_checkpointing": "true"}))
    assert body["family"] == "sdxl" and body["native_resolution"] == 1024
    assert body["note"].startswith("SDXL base: training at 1024 px, its own size (resolution 0).")
    assert comfy.get("/personalize/base_model?" + urlencode({"name": CKPT}))["family"] == "sd1"
    with pytest.raises(urllib.error.HTTPError) as refused:  # only names inside models/checkpoints are read
        comfy.get("/api/personalize/base_model?" + urlencode({"name": "../../comfy/sd1_tokenizer/vocab.json"}))
    assert refused.value.code == 404


@pytest.mark.parametrize("network", ["lora", "loha", "lokr"])
def test_sdxl_lora_applied_by_comfyui_changes_unet_and_both_encoders_as_ours(comfy, photos, sdxl_lora,
                                                                            toy_sdxl_checkpoint, tmp_path, network):
    path = sdxl_lora["path"]
    if network != "lora":  # LyCORIS on SDXL: trained through /prompt too, both encoders, alpha != rank
        name = f"it_sdxl_{network}"
        entry, log, _ = run_prompt(comfy, {"1": {"class_type": TRAIN, "inputs": train_inputs(
            photos, name, ckpt_name=CKPT_XL, network=network, preset="kohya", train_text_encoder=True, steps=2,
            alpha=2.0, unet_lr=1e-2)}}, timeout=900)  # a change well above the base's float noise (6e-7)
        assert_success(entry, log)
        path = os.path.join(comfy.model_folder("loras"), name + ".safetensors")
    r = run_equivalence(comfy, "comfy_lora_equivalence.py", toy_sdxl_checkpoint, tmp_path, "--lora", path)
    print(f"\nSDXL {network} equivalence: "
          + ", ".join(f"{k}={v:.2e}" for k, v in r.items() if k.endswith(("_err", "_size"))))
    assert r["network"] == network
    assert r["keys_not_loaded"] == [] and r["unused_stems"] == []
    assert r["comfy_unet_patches"] == r["file_unet_stems"] == r["ours_unet_modules"] > 0
    assert r["comfy_clip_patches"] == r["file_te_stems"] == r["ours_te_modules"] == (12 + 32) * 6  # CLIP-L, bigG
    for part in ("unet", "te"):
        assert r[f"{part}_base_rel_err"] < 1e-4  # control: the same base model (and conditioning) on both sides
        assert r[f"{part}_delta_size"] > 1e-4  # the LoRA really changes the output...
        assert r[f"{part}_delta_rel_err"] < 1e-3  # ...and by the same amount in ComfyUI


def test_sdxl_embedding_and_dreambooth_checkpoint_work_in_comfyui(comfy, photos, toy_sdxl_checkpoint, tmp_path):
    """Textual inversion on SDXL (clip_l and clip_g vectors) used as embedding:<name>; DreamBooth on SDXL with prior
    preservation, its checkpoint loaded by CheckpointLoaderSimple as SDXL and sampled."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_XL}},
        "2": {"class_type": TRAIN_TI, "inputs": ti_inputs(photos, "it_emb_xl", ckpt_name=CKPT_XL)},
        "3": {"class_type": "StringConcatenate", "inputs": {"string_a": ["2", 1], "string_b": "on the beach",
                                                            "delimiter": " "}},
        **sample_nodes(["1", 0], ["1", 1], ["1", 2]),
    }
    prompt["10"]["inputs"]["text"] = ["3", 0]
    entry, log, seconds = run_prompt(comfy, prompt, timeout=900)
    print(f"\nSDXL textual inversion through /prompt and sampling: {seconds:.1f} s")
    assert_success(entry, log)
    assert "does not exist" not in log and "shape mismatch" not in log, log[-3000:]
    path = os.path.join(comfy.model_folder("embeddings"), "it_emb_xl.safetensors")
    r = run_equivalence(comfy, "comfy_embedding_equivalence.py", toy_sdxl_checkpoint, tmp_path, "--embedding", path)
    print("SDXL embedding equivalence: " + ", ".join(f"{k}={v}" for k, v in r.items()))
    assert r["file_keys"] == ["clip_g", "clip_l"] and r["missing_warnings"] == []
    assert r["comfy_embedding_vectors"] == r["file_vectors"] == 2
    assert r["control_rel_err"] < 1e-4 and r["embedding_effect"] > 1e-4 and r["embedding_rel_err"] < 1e-4

    db = db_inputs(photos, "it_db_xl", ckpt_name=CKPT_XL, num_class_images=2)
    entry, log, seconds = run_prompt(comfy, {"1": {"class_type": TRAIN_DB, "inputs": db}}, timeout=900)
    print(f"SDXL DreamBooth through /prompt (2 class images, 2 steps): {seconds:.1f} s")
    assert_success(entry, log)
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "it_db_xl.safetensors"}},
              **sample_nodes(["1", 0], ["1", 1], ["1", 2])}
    entry, log, _ = run_prompt(comfy, prompt)
    assert_success(entry, log)
    assert "SDXLClipModel" in log and entry["outputs"]["15"]["images"]


# --- merge: bake, extract, mix, re-rank through /prompt ---------------------------------------------------------
BAKE, MIX = "PersonalizeBakeLoRA", "PersonalizeMixLoRAs"
RERANK, EXTRACT = "PersonalizeRerankLoRA", "PersonalizeExtractLoRA"


def file_keys_and_meta(path: str) -> tuple[list, dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys()), f.metadata() or {}


def stems(keys) -> set:
    return {k.split(".", 1)[0] for k in keys}


def lora_ranks(path: str) -> set:
    """The ranks of a kohya LoRA file's modules (rows of each lora_down)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_down.weight")}


def bake_equivalence(comfy, base: str, lora: str, baked: str, work, strength_model: float,
                     strength_clip: float) -> dict:
    """comfy_bake_equivalence.py's record for one baked SD1 file, with the checks that hold whatever its dtype."""
    started = time.monotonic()
    r = run_equivalence(comfy, "comfy_bake_equivalence.py", base, work, "--lora", lora, "--baked", baked,
                        "--strength-model", str(strength_model), "--strength-clip", str(strength_clip))
    print(f"bake equivalence script ({os.path.basename(baked)}, {r['baked_file_dtype']}): "
          f"{time.monotonic() - started:.1f} s; "
          + ", ".join(f"{k}={v:.2e}" for k, v in r.items() if isinstance(v, float) and "strength" not in k)
          + f"; weights changed by LoRA/bake: unet {r['unet_weights_changed_by_lora']}/"
            f"{r['unet_weights_changed_by_bake']}, te {r['te_weights_changed_by_lora']}/"
            f"{r['te_weights_changed_by_bake']}")
    assert r["keys_not_loaded"] == []
    assert r["same_model_class"] and r["same_clip_class"], (r["base"], r["baked"])  # ComfyUI sees the same model
    assert r["base"]["model_class"] == "BaseModel" and r["baked"]["unet_dtype"] == "torch.float32"
    assert r["comfy_unet_patches"] > 0 and r["comfy_clip_patches"] == 12 * 6  # CLIP-L: q k v out fc1 fc2
    for part in ("unet", "te"):  # the bake changed exactly the tensors the LoRA patches
        assert r[f"{part}_weight_keys_differ"] == [] and r[f"{part}_weights_changed_by_bake_only"] == []
        assert r[f"{part}_weights_changed_by_bake"] == r[f"{part}_weights_changed_by_lora"] > 0
    return r


def trained_stems(path: str) -> set:
    """The modules of a kohya LoRA file whose change is not zero (lora_up all zeros: the module never trained)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k.split(".", 1)[0] for k in f.keys() if k.endswith(".lora_up.weight") and f.get_tensor(k).any()}


@pytest.fixture(scope="module")
def baked_sd1(comfy, locon_te_lora) -> dict:
    """`locon_te_lora` baked into the SD1 toy through /prompt at strength 0.8 (UNet), 0.6 (CLIP)."""
    prompt = {"1": {"class_type": BAKE, "inputs": dict(
        ckpt_name=CKPT, lora_name=locon_te_lora["name"], strength_model=0.8, strength_clip=0.6,
        output_name="it_baked", device="cpu")}}
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"\nbake through /prompt (SD1 toy, locon + text encoder LoRA): {seconds:.1f} s")
    assert_success(entry, log)
    return {"entry": entry, "name": "it_baked.safetensors",
            "path": os.path.join(comfy.model_folder("checkpoints"), "it_baked.safetensors")}


def test_bake_through_prompt_samples_as_the_lora_applied_by_comfyui(comfy, toy_checkpoint, locon_te_lora, baked_sd1,
                                                                    tmp_path):
    text = baked_sd1["entry"]["outputs"]["1"]["text"][0]
    assert text.startswith("it_baked.safetensors (checkpoint)"), text  # the node reports the file it wrote
    assert os.path.isfile(baked_sd1["path"])
    keys, meta = file_keys_and_meta(baked_sd1["path"])
    base_keys, _ = file_keys_and_meta(toy_checkpoint)
    assert sorted(keys) == sorted(base_keys)  # every tensor of the base, nothing else
    record = json.loads(meta["personalize.merge"])
    assert record["method"] == "bake" and record["base"]["name"] == CKPT
    assert [(a["name"], a["unet_strength"], a["text_strength"]) for a in record["adapters"]] == \
        [(locon_te_lora["name"], 0.8, 0.6)]

    r = bake_equivalence(comfy, toy_checkpoint, locon_te_lora["path"], baked_sd1["path"], tmp_path, 0.8, 0.6)
    assert r["baked_file_dtype"] == "torch.float16"  # the base's dtype: base + delta is rounded to fp16
    for part in ("unet", "te"):
        assert r[f"{part}_delta_size"] > 1e-4  # the LoRA really changes the output...
        # ...and the baked checkpoint computes what ComfyUI computes with the LoRA applied, up to storing the sum in
        # fp16: the same as ComfyUI's patched weights rounded to fp16 (a float-noise gap), and no farther from the
        # patched fp32 model than that rounding takes it. (Baked into an fp32 base, below: < 1e-4 outright.)
        assert r[f"{part}_rel_err_vs_rounded"] < 1e-4
        assert r[f"{part}_rel_err"] < 1.5 * r[f"{part}_rounding_rel_err"] + 1e-5
        assert r[f"{part}_weight_rel_err_after_rounding"] < 1e-3  # per tensor: at most an fp16 ulp here and there

    # The baked file in ComfyUI's own loader, sampled.
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": baked_sd1["name"]}},
              **sample_nodes(["1", 0], ["1", 1], ["1", 2])}
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"baked checkpoint in CheckpointLoaderSimple + 2-step sampling: {seconds:.1f} s")
    assert_success(entry, log)
    assert entry["outputs"]["15"]["images"]


def test_bake_into_an_fp32_base_is_the_lora_applied_by_comfyui_to_float_noise(comfy, toy_checkpoint, locon_te_lora,
                                                                              tmp_path):
    """The same bake into an fp32 copy of the base (the values ComfyUI computes with on a CPU): nothing is rounded,
    so the baked checkpoint is ComfyUI's LoRA-applied model outright."""
    from safetensors.torch import load_file, save_file

    metadata = file_keys_and_meta(toy_checkpoint)[1]
    base32 = str(tmp_path / "personalize_toy_sd15_fp32.safetensors")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(toy_checkpoint).items()}, base32,
              metadata=metadata)
    comfy.add_model("checkpoints", base32)
    entry, log, seconds = run_prompt(comfy, {"1": {"class_type": BAKE, "inputs": dict(
        ckpt_name=os.path.basename(base32), lora_name=locon_te_lora["name"], strength_model=0.8, strength_clip=0.6,
        output_name="it_baked_fp32", device="cpu")}})
    print(f"\nbake into the fp32 base through /prompt: {seconds:.1f} s")
    assert_success(entry, log)
    baked = os.path.join(comfy.model_folder("checkpoints"), "it_baked_fp32.safetensors")
    r = bake_equivalence(comfy, base32, locon_te_lora["path"], baked, tmp_path / "work", 0.8, 0.6)
    assert r["baked_file_dtype"] == "torch.float32"
    for part in ("unet", "te"):
        assert r[f"{part}_delta_size"] > 1e-4  # the LoRA really changes the output...
        assert r[f"{part}_rel_err"] < 1e-4  # ...and the baked checkpoint computes exactly that
        assert r[f"{part}_weight_rel_err"] < 1e-5
    for name in (baked, os.path.join(comfy.model_folder("checkpoints"), os.path.basename(base32))):
        os.remove(name)  # ~1 GB each; no other test reads them


def test_extract_from_the_baked_checkpoint_links_into_apply_and_samples(comfy, toy_checkpoint, locon_te_lora,
                                                                        baked_sd1, tmp_path):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": EXTRACT, "inputs": dict(ckpt_name=CKPT, tuned_ckpt_name=baked_sd1["name"], rank=8,
                                                    conv_rank=4, energy=0.0, output_name="it_extracted",
                                                    device="cpu")},
        # lora_name names no file: the link from Extract must win
        "3": {"class_type": APPLY, "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "not_there.safetensors",
                                              "strength_model": 1.0, "strength_clip": 1.0, "trained_lora": ["2", 0]}},
        **sample_nodes(["3", 0], ["3", 1], ["1", 2]),
    }
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"\nextract (rank 8, conv 4) + apply by link + sample, one prompt: {seconds:.1f} s")
    print(entry["outputs"].get("2", {}).get("text", [""])[0])
    assert_success(entry, log)
    assert lora_keys_not_loaded(log) == [], log
    assert entry["outputs"]["15"]["images"]
    assert lora_files(comfy, "it_extracted") == ["it_extracted.safetensors"]
    path = os.path.join(comfy.model_folder("loras"), "it_extracted.safetensors")
    keys, meta = file_keys_and_meta(path)
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    record = json.loads(meta["personalize.merge"])
    assert record["method"] == "extract" and record["rank"] == 8 and record["conv_rank"] == 4
    assert record["base"]["name"] == CKPT and record["tuned"]["name"] == baked_sd1["name"]
    lora_keys, _ = file_keys_and_meta(locon_te_lora["path"])
    assert stems(keys) == trained_stems(locon_te_lora["path"]) == stems(lora_keys)  # the modules the LoRA changed
    assert lora_ranks(path) <= {4, 8} and max(lora_ranks(path)) <= 8

    # The extracted LoRA applied at strength 1 by ComfyUI computes what the baked checkpoint does: the baked change
    # is the rank-4 LoRA at 0.8 / 0.6 plus the fp16 rounding of base + delta (full rank, about 1 % of the LoRA's
    # effect on the UNet's output here), so rank 8 holds all of it but that rounding.
    r = run_equivalence(comfy, "comfy_bake_equivalence.py", toy_checkpoint, tmp_path, "--lora", path,
                        "--baked", baked_sd1["path"], "--strength-model", "1.0", "--strength-clip", "1.0")
    print("extracted LoRA vs baked checkpoint: "
          + ", ".join(f"{k}={v:.2e}" for k, v in r.items() if k.endswith(("_err", "_size"))))
    assert r["keys_not_loaded"] == []
    for part in ("unet", "te"):
        assert r[f"{part}_delta_size"] > 1e-4
        assert r[f"{part}_delta_rel_err"] < 3e-2  # the extracted change is the baked change


def test_mix_and_rerank_chained_by_links_apply_and_sample(comfy, photos, locon_te_lora):
    # A second LoRA with other modules (kohya preset: no resnets, no text encoder) and another seed.
    entry, log, seconds = run_prompt(comfy, {"1": {"class_type": TRAIN, "inputs": train_inputs(
        photos, "it_mix_b", preset="kohya", steps=2, seed=7)}})
    print(f"\nsecond LoRA (kohya, 2 steps): {seconds:.1f} s")
    assert_success(entry, log)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": MIX, "inputs": dict(ckpt_name=CKPT, lora_a=locon_te_lora["name"], weight_a=0.7,
                                                lora_b="it_mix_b.safetensors", weight_b=0.5, mode="rank", rank=4,
                                                energy=0.95, output_name="it_mixed", device="cpu")},
        "3": {"class_type": RERANK, "inputs": dict(ckpt_name=CKPT, lora_name="not_there.safetensors", mode="energy",
                                                   rank=4, energy=0.9, output_name="it_reranked",
                                                   trained_lora=["2", 0], device="cpu")},
        "4": {"class_type": APPLY, "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "not_there.safetensors",
                                              "strength_model": 1.0, "strength_clip": 1.0, "trained_lora": ["2", 0]}},
        "5": {"class_type": APPLY, "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "not_there.safetensors",
                                              "strength_model": 1.0, "strength_clip": 1.0, "trained_lora": ["3", 0]}},
        **sample_nodes(["4", 0], ["4", 1], ["1", 2], first_id=10),
        **sample_nodes(["5", 0], ["5", 1], ["1", 2], first_id=20),
    }
    entry, log, seconds = run_prompt(comfy, prompt)
    print(f"mix (rank 4) -> re-rank (energy 0.9), both applied by link and sampled, one prompt: {seconds:.1f} s")
    print(entry["outputs"].get("2", {}).get("text", [""])[0])
    print(entry["outputs"].get("3", {}).get("text", [""])[0])
    assert_success(entry, log)
    assert lora_keys_not_loaded(log) == [], log
    assert entry["outputs"]["15"]["images"] and entry["outputs"]["25"]["images"]
    assert lora_files(comfy, "it_mixed") == ["it_mixed.safetensors"]
    assert lora_files(comfy, "it_reranked") == ["it_reranked.safetensors"]
    mixed = os.path.join(comfy.model_folder("loras"), "it_mixed.safetensors")
    reranked = os.path.join(comfy.model_folder("loras"), "it_reranked.safetensors")
    a_keys, _ = file_keys_and_meta(locon_te_lora["path"])
    b_keys, _ = file_keys_and_meta(os.path.join(comfy.model_folder("loras"), "it_mix_b.safetensors"))
    mixed_keys, mixed_meta = file_keys_and_meta(mixed)
    reranked_keys, reranked_meta = file_keys_and_meta(reranked)
    assert stems(a_keys) != stems(b_keys)
    assert stems(mixed_keys) == stems(a_keys) | stems(b_keys) == stems(reranked_keys)  # every module of both
    record = json.loads(mixed_meta["personalize.merge"])
    assert record["method"] == "mix" and record["rank"] == 4
    assert [(a["name"], a["weight"]) for a in record["adapters"]] == [(locon_te_lora["name"], 0.7),
                                                                     ("it_mix_b.safetensors", 0.5)]
    record = json.loads(reranked_meta["personalize.merge"])
    assert record["method"] == "rerank" and record["energy"] == 0.9
    assert [a["name"] for a in record["adapters"]] == ["it_mixed.safetensors"]  # the linked file
    assert lora_ranks(mixed) == {4} and max(lora_ranks(reranked)) <= 4
    assert "kept energy" in entry["outputs"]["3"]["text"][0]


def test_sdxl_bake_then_extract_by_links_applies_every_key_and_samples(comfy, sdxl_lora, toy_sdxl_checkpoint):
    """One prompt on the SDXL toy: bake the SDXL LoRA, extract it back (rank 4) from the baked file by link, apply
    the extracted LoRA by link and sample."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_XL}},
        "2": {"class_type": BAKE, "inputs": dict(ckpt_name=CKPT_XL, lora_name="it_sdxl.safetensors",
                                                 strength_model=1.0, strength_clip=1.0, output_name="it_baked_xl",
                                                 device="cpu")},
        "3": {"class_type": EXTRACT, "inputs": dict(ckpt_name=CKPT_XL, tuned_ckpt_name="not_there.safetensors",
                                                    rank=4, conv_rank=0, energy=0.0, output_name="it_extracted_xl",
                                                    trained_checkpoint=["2", 0], device="cpu")},
        "4": {"class_type": APPLY, "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "not_there.safetensors",
                                              "strength_model": 1.0, "strength_clip": 1.0, "trained_lora": ["3", 0]}},
        **sample_nodes(["4", 0], ["4", 1], ["1", 2]),
    }
    baked = os.path.join(comfy.model_folder("checkpoints"), "it_baked_xl.safetensors")
    try:
        entry, log, seconds = run_prompt(comfy, prompt, timeout=900)
        print(f"\nSDXL bake + extract (rank 4) + apply + sample, one prompt: {seconds:.1f} s")
        print(entry["outputs"].get("2", {}).get("text", [""])[0])
        print(entry["outputs"].get("3", {}).get("text", [""])[0])
        assert_success(entry, log)
        assert os.path.isfile(baked)
    finally:
        if os.path.exists(baked):
            os.remove(baked)  # ~2 GB; no other test reads it
    assert "SDXLClipModel" in log, log[-3000:]
    assert lora_keys_not_loaded(log) == [], log
    assert entry["outputs"]["15"]["images"]
    path = os.path.join(comfy.model_folder("loras"), "it_extracted_xl.safetensors")
    keys, meta = file_keys_and_meta(path)
    for prefix in ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    record = json.loads(meta["personalize.merge"])
    assert record["method"] == "extract" and record["rank"] == 4
    assert record["tuned"]["name"] == "it_baked_xl.safetensors"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    changed = trained_stems(sdxl_lora["path"])
    assert stems(keys) == changed  # the modules the SDXL LoRA changed, te2's q/k/v rows included
    # The file's other modules never trained: SDXL conditions on CLIP-L's penultimate layer, so its last layer
    # gets no gradient and keeps lora_up at its zero init. No change there, so nothing to extract.
    unchanged = stems(file_keys_and_meta(sdxl_lora["path"])[0]) - changed
    assert {s.rsplit("_layers_11_", 1)[0] for s in unchanged} <= {"lora_te1_text_model_encoder"}, unchanged
    assert lora_ranks(path) == {4}
