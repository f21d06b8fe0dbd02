"""What sampling costs: seconds per image, iterations per second and peak memory of a sampling call, after a
warm-up, measured the same way for every model (base, LoRA unfused or merged, DreamBooth checkpoint).

Peak memory is the CUDA peak allocated on a GPU; on a CPU, the peak resident memory of the process during the
timed calls (sampled every 10 ms, since the process-lifetime peak cannot be reset).
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Cost:
    label: str
    seconds_per_image: float
    iterations_per_second: float
    peak_memory_mb: float
    memory_kind: str  # "CUDA peak allocated" or "peak RSS"
    images: int
    steps: int
    device: str

    def columns(self) -> dict:
        """The report's extra columns for this model."""
        return {"s/image": round(self.seconds_per_image, 3), "it/s": round(self.iterations_per_second, 2),
                f"peak MB ({self.memory_kind})": round(self.peak_memory_mb, 1)}

    def to_dict(self) -> dict:
        return asdict(self)


def measure(sample, *, label: str, images: int, batch: int, steps: int, device, warmup: int = 1,
            check=None) -> Cost:
    """Time `sample()` (one call makes `batch` images in `steps` steps) until `images` images are made, after
    `warmup` untimed calls. `check()` runs between calls (Cancel)."""
    device = torch.device(device)
    for _ in range(warmup):
        sample()
        if check:
            check()
    calls = max(1, -(-images // batch))
    with _PeakMemory(device) as peak:
        start = time.perf_counter()
        for _ in range(calls):
            sample()
            if check:
                check()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    made = calls * batch
    return Cost(label, seconds / made, calls * steps / seconds, peak.mb, peak.kind, made, steps, str(device))


class _PeakMemory:
    def __init__(self, device):
        self.device, self.mb = device, 0.0
        self.kind = "CUDA peak allocated" if device.type == "cuda" else "peak RSS"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self.mb = _rss_mb()
            self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.01):
            self.mb = max(self.mb, _rss_mb())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.mb = max(self.mb, _rss_mb())


def _rss_mb() -> float:
    """Resident memory now: /proc on Linux; elsewhere the lifetime peak, the best the standard library offers
    (NaN on Windows, which has neither)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def file_figures(path: str) -> dict:
    """An adapter's (or checkpoint's) file size and parameter count, read from its header alone; a LoRA's alpha
    scalars are not parameters."""
    from ..core.safetensors_file import read_header

    with open(path, "rb") as f:
        entries, _, _ = read_header(f)
    count = sum(math.prod(e["shape"]) for name, e in entries.items() if not name.endswith(".alpha"))
    return {"file MB": round(os.path.getsize(path) / 2 ** 20, 2), "parameters": count}
