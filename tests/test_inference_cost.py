"""Inference cost: the timing and memory harness, and an adapter file's figures."""
import time

import pytest
import torch

from trainers.core.safetensors_file import write
from trainers.evaluate import inference_cost


def test_measure_times_whole_batches_after_the_warmup():
    calls = []

    def sample():
        calls.append(time.perf_counter())
        time.sleep(0.05)

    checks = []
    cost = inference_cost.measure(sample, label="base", images=5, batch=2, steps=10, device="cpu", warmup=1,
                                  check=lambda: checks.append(1))
    assert len(calls) == 1 + 3 and len(checks) == 4  # one warm-up, then ceil(5 / 2) batches, Cancel checked each
    assert cost.images == 6 and cost.steps == 10
    assert cost.seconds_per_image == pytest.approx(0.05 / 2, rel=0.5)
    assert cost.iterations_per_second == pytest.approx(3 * 10 / (6 * cost.seconds_per_image), rel=1e-6)
    assert cost.memory_kind == "peak RSS" and cost.peak_memory_mb > 10
    assert set(cost.columns()) == {"s/image", "it/s", "peak MB (peak RSS)"}


def test_peak_memory_sees_a_short_allocation_on_the_cpu():
    def sample():
        block = torch.ones(64 * 2 ** 20 // 4)  # 64 MB, held for a moment
        time.sleep(0.1)
        del block

    baseline = inference_cost.measure(lambda: time.sleep(0.1), label="idle", images=1, batch=1, steps=1,
                                      device="cpu", warmup=0)
    cost = inference_cost.measure(sample, label="x", images=1, batch=1, steps=1, device="cpu", warmup=0)
    assert cost.peak_memory_mb > baseline.peak_memory_mb + 40


def test_file_figures_count_parameters_but_not_alphas(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    write(path, {"a.lora_down.weight": torch.zeros(4, 320), "a.lora_up.weight": torch.zeros(320, 4),
                 "a.alpha": torch.tensor(4.0)})
    figures = inference_cost.file_figures(path)
    assert figures["parameters"] == 2 * 4 * 320
    assert figures["file MB"] > 0
