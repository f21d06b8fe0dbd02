"""What the canvas shows while a run trains (web/personalize.js): one small "train" event per step, sent
through the host (nothing outside ComfyUI). The page accumulates the points; one opened mid-run reads the
curve so far from the run's log.jsonl (nodes/routes.py)."""
from __future__ import annotations

import time
from collections import deque

from ..core import host

RECENT = 20  # steps the seconds-per-step figure averages over


class LiveEvents:
    def __init__(self, run, total: int):
        self.run, self.total = run, total
        self._stamps = deque([time.monotonic()], maxlen=RECENT + 1)  # wall clock: validation counts too
        self._last = None

    def step(self, step: int, loss: float, lr: float, sample: str | None = None) -> None:
        """After a finished step; `sample`: the validation image just written, if any."""
        self._stamps.append(time.monotonic())
        per_step = (self._stamps[-1] - self._stamps[0]) / max(1, len(self._stamps) - 1)
        self._last = {"run": self.run.name, "step": step, "total": self.total, "loss": loss, "lr": lr,
                      "sec_per_step": round(per_step, 4), "eta": round(per_step * (self.total - step), 1)}
        self.image(step, sample)

    def image(self, step: int, sample: str | None) -> None:
        """The step's event (again, for the final validation), with the validation image written after it."""
        data = dict(self._last or {"run": self.run.name, "step": step, "total": self.total})
        ref = host.output_ref(sample) if sample else None
        if ref:
            data["image"] = ref
        host.send_event("train", data)


def live_events(run, total: int, main_process: bool) -> LiveEvents | None:
    """LiveEvents when a page is listening (inside ComfyUI, on the main process), else None."""
    return LiveEvents(run, total) if main_process and host.live_events() else None
