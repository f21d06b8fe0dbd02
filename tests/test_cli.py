"""The command line: the same run config outside ComfyUI, and under `accelerate launch` with 2 processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def workspace(tmp_path, toy_checkpoint, toy_tokenizer_dir):
    """A models folder as a user would have it: the checkpoint and a local tokenizer."""
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(toy_checkpoint, models / "checkpoints" / "toy.safetensors")
    shutil.copytree(toy_tokenizer_dir, models / "clip" / "tokenizer")
    from trainers.testing.demo import make_photos

    photos = make_photos(str(tmp_path / "photos"), count=2, size=64)
    config = {"base_model": "toy.safetensors", "dataset": photos, "output_name": "cli", "trigger_word": "sks",
              "steps": 4, "resolution": 64, "rank": 4, "alpha": 4, "save_every": 2, "validation_every": 0}
    (tmp_path / "run.json").write_text(json.dumps(config))
    return tmp_path


def run_cli(args, cwd, timeout=600):
    """The command line in `cwd`; folders not given as arguments default to `cwd`'s, never $COMFYUI_DIR's."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.update({f"PERSONALIZE_{kind}_DIR": os.path.join(str(cwd), kind.lower()) for kind in ("MODELS", "OUTPUT")})
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_from_config_file(workspace):
    proc = run_cli([sys.executable, "-m", "trainers", "--models-dir", "models", "--output-dir", "output",
                    "train", "--config", "run.json", "--set", "rank=2", "--set", "alpha=1"], workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["lora"].endswith(os.path.join("models", "loras", "cli.safetensors"))
    tensors = load_file(result["lora"])
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_down.weight")} == {2}
    saved = json.load(open(os.path.join(result["run_dir"], "config.json")))
    assert saved["lora"]["rank"] == 2 and saved["lora"]["alpha"] == 1  # the run config nests the network group


def test_bad_config_is_a_clear_error(workspace):
    proc = run_cli([sys.executable, "-m", "trainers", "--models-dir", "models", "--output-dir", "output",
                    "train", "--config", "run.json", "--set", "resolution=500"], workspace)
    assert proc.returncode == 2
    assert "resolution 500 must be a multiple of 8" in proc.stderr
    proc = run_cli([sys.executable, "-m", "trainers", "--models-dir", "models", "--output-dir", "output", "train",
                    "--config", "run.json", "--set", "base_model=nope.safetensors"], workspace)
    assert proc.returncode == 2 and "checkpoints" in proc.stderr and "nope.safetensors" in proc.stderr


def gloo_unavailable() -> str | None:
    """Why two CPU processes cannot train together on this machine, or None when they can."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return "this torch build has no gloo backend for CPU processes"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
    except OSError as e:
        return f"no loopback network for the processes to meet on ({e})"
    return None


def one_process_like_two(workspace, monkeypatch):
    """run.json trained in this process as 2 processes x batch 1 would train it: batch 1, 2 accumulated micro-batches.

    Micro-batch m takes the items and the random draws of process m: items because both hold position
    2 * step + m of the shuffled order, draws because the loop seeds them by (seed, step, micro, process) and
    here micro m is seeded as process m. (One process with batch 2 draws its noise from one generator, so it
    cannot repeat the 2-process draws.)
    """
    from trainers.core import host
    from trainers.training import loop, objective
    from trainers.core.config import TrainConfig

    real_seed = objective.step_seed
    monkeypatch.setattr(objective, "step_seed", lambda seed, step, micro, process: real_seed(seed, step, 0, micro))
    host.configure(models_dir=str(workspace / "models"), output_dir=str(workspace / "one_process"))
    cfg = TrainConfig.from_dict({**json.loads((workspace / "run.json").read_text()), "output_name": "one",
                                 "train_text_encoder": True, "save_precision": "fp32", "grad_accum": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): the same float rounding
    try:
        return loop.train(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_accelerate_launch_two_processes(workspace, monkeypatch):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    why = gloo_unavailable()
    if why:
        pytest.skip(why)
    proc = run_cli([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainers",
                    "--models-dir", "models", "--output-dir", "output", "train", "--config", "run.json",
                    "--set", "train_text_encoder=true", "--set", "save_precision=fp32"], workspace, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 process(es))" in proc.stderr
    run = workspace / "output" / "personalize" / "runs" / "cli"
    assert json.load(open(run / "config.json"))["resolved"]["processes"] == 2
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # written once, by the main process
    assert sorted(os.listdir(workspace / "models" / "loras")) == ["cli.safetensors"]
    two = load_file(workspace / "models" / "loras" / "cli.safetensors")
    assert any(k.startswith("lora_te_text_model_") for k in two)

    one = one_process_like_two(workspace, monkeypatch)
    # Averaging the processes' gradients (halve, then add two numbers) rounds exactly like accumulating
    # loss / 2 twice, so the runs agree to the last bit here; the 1e-7 allowed is far below what a run that
    # does not average (or trains one process) differs by: about the learning rate (1e-4) per step.
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in one.log], rel=1e-6)
    reference = load_file(one.lora_path)
    assert two.keys() == reference.keys()
    for k in two:
        torch.testing.assert_close(two[k], reference[k], rtol=0, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    assert any(float(v.abs().max()) > 1e-5 for k, v in two.items() if "lora_up" in k)  # it trained
