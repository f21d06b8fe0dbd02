"""The command line: the same run config outside ComfyUI, and under `accelerate launch` with 2 processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def workspace(tmp_path, toy_checkpoint, toy_tokenizer_dir):
    """A models folder as a user would have it: the checkpoint and a local tokenizer."""
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(toy_checkpoint, models / "checkpoints" / "toy.safetensors")
    shutil.copytree(toy_tokenizer_dir, models / "clip" / "tokenizer")
    from trainers.demo import make_photos

    photos = make_photos(str(tmp_path / "photos"), count=2, size=64)
    config = {"base_model": "toy.safetensors", "dataset": photos, "output_name": "cli", "trigger_word": "sks",
              "steps": 4, "resolution": 64, "rank": 4, "alpha": 4, "save_every": 2, "validation_every": 0}
    (tmp_path / "run.json").write_text(json.dumps(config))
    return tmp_path


def run_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_train_from_config_file(workspace):
    proc = run_cli([sys.executable, "-m", "trainers", "--models-dir", "models", "--output-dir", "output",
                    "train", "--config", "run.json", "--set", "rank=2", "--set", "alpha=1"], workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["lora"].endswith(os.path.join("models", "loras", "cli.safetensors"))
    tensors = load_file(result["lora"])
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {2}
    saved = json.load(open(os.path.join(result["run_dir"], "config.json")))
    assert saved["rank"] == 2 and saved["alpha"] == 1


def test_bad_config_is_a_clear_error(workspace):
    proc = run_cli([sys.executable, "-m", "trainers", "--models-dir", "models", "--output-dir", "output",
                    "train", "--config", "run.json", "--set", "resolution=500"], workspace)
    assert proc.returncode == 2
    assert "resolution 500 must be a multiple of 8" in proc.stderr
    proc = run_cli([sys.executable, "-m", "trainers", "--models-dir", "models", "train", "--config", "run.json",
                    "--set", "base_model=nope.safetensors"], workspace)
    assert proc.returncode == 2 and "checkpoints" in proc.stderr and "nope.safetensors" in proc.stderr


@pytest.mark.slow
def test_accelerate_launch_two_processes(workspace):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    proc = run_cli([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainers",
                    "--models-dir", "models", "--output-dir", "output", "train", "--config", "run.json",
                    "--set", "train_text_encoder=true"], workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 process(es))" in proc.stderr
    run = workspace / "output" / "personalize" / "runs" / "cli"
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # written once, by the main process
    assert sorted(os.listdir(workspace / "models" / "loras")) == ["cli.safetensors"]
    ups = [v for k, v in load_file(workspace / "models" / "loras" / "cli.safetensors").items() if "lora_up" in k]
    assert any(float(v.abs().max()) > 0 for v in ups)  # the two processes trained it
    assert any(k.startswith("lora_te_text_model_") for k in load_file(workspace / "models" / "loras" / "cli.safetensors"))
