"""`python -m trainers demo`, as the README tells a new user to run it: it trains, and its report is right."""
import json
import os
import re
import subprocess
import sys

from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60  # enough for a clear drop on the tiny model (the default is 120)
NUMBER = r"(\d+(?:\.\d+)?)"


def field(report: str, pattern: str) -> tuple[str, ...]:
    match = re.search(pattern, report)
    assert match, f"no {pattern!r} in the report:\n{report}"
    return match.groups()


def test_demo_trains_a_lora_that_lowers_the_loss_and_reports_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainers", "demo", "--out", "demo", "--steps", str(STEPS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo"
    assert os.listdir(tmp_path) == ["demo"]  # everything in --out

    lora, tensors, unused = field(proc.stdout, r"- LoRA: (\S+) \((\d+) tensors, (\d+) unused keys\)")
    assert os.path.dirname(lora) == str(out / "models" / "loras") and os.path.isfile(lora)
    assert int(tensors) == len(load_file(lora)) > 0 and int(unused) == 0

    steps, first, last = field(proc.stdout, rf"- steps: (\d+); loss first {NUMBER} -> last {NUMBER}")
    base, tuned, lower = (float(x) for x in field(
        proc.stdout, rf"denoising loss on the training photos: base {NUMBER} -> with LoRA {NUMBER} \({NUMBER}% lower\)"))
    assert int(steps) == STEPS
    assert tuned < 0.9 * base  # the LoRA, loaded from its file, fits the photos clearly better
    assert abs((1 - tuned / base) * 100 - lower) < 0.1

    run = field(proc.stdout, r"- run folder: (\S+) ")[0]
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert f"{log[0]['loss']:.4f}" == first and f"{log[-1]['loss']:.4f}" == last
    assert {"config.json", "loss.png", "report.md", "checkpoints"} <= set(os.listdir(run))
    assert open(os.path.join(run, "report.md"), encoding="utf-8").read().strip() in proc.stdout
