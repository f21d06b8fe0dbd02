"""One folder per training run: resolved config, step log, checkpoints, samples.

Runs live in <output>/personalize/runs/<name>[_N]. A new run never reuses a folder;
resuming picks the newest unfinished run of the same name that has a checkpoint.
"""
from __future__ import annotations

import json
import os
import re

from . import host, safe_io


def runs_root() -> str:
    return os.path.join(host.output_dir(), "personalize", "runs")


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)

    config_path = property(lambda self: os.path.join(self.path, "config.json"))
    log_path = property(lambda self: os.path.join(self.path, "log.jsonl"))
    checkpoints = property(lambda self: os.path.join(self.path, "checkpoints"))
    samples = property(lambda self: os.path.join(self.path, "samples"))
    finished_path = property(lambda self: os.path.join(self.path, "finished.json"))

    @property
    def finished(self) -> bool:
        return os.path.exists(self.finished_path)

    def checkpoint_dirs(self) -> list[str]:
        if not os.path.isdir(self.checkpoints):
            return []
        names = sorted(n for n in os.listdir(self.checkpoints) if re.fullmatch(r"step_\d+", n))
        return [os.path.join(self.checkpoints, n) for n in names]

    def latest_checkpoint(self) -> str | None:
        dirs = self.checkpoint_dirs()
        return dirs[-1] if dirs else None

    def prune_checkpoints(self, keep: int) -> None:
        import shutil

        for old in self.checkpoint_dirs()[:-max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step_{step:06d}")

    def sample_path(self, step: int) -> str:
        return os.path.join(self.samples, f"step_{step:06d}.png")

    def write_config(self, config: dict) -> None:
        safe_io.write_json(self.config_path, config)

    def read_config(self) -> dict:
        with open(self.config_path, encoding="utf-8") as f:
            return json.load(f)

    def append_log(self, record: dict) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_log(self, step: int) -> None:
        """Drop records past `step`, so a resumed run continues the same curve."""
        kept = [r for r in self.read_log() if r.get("step", 0) <= step]
        safe_io.write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

    def mark_finished(self, result: dict) -> None:
        safe_io.write_json(self.finished_path, result)


def _runs_named(name: str) -> list[RunDir]:
    root = runs_root()
    if not os.path.isdir(root):
        return []
    pattern = re.compile(re.escape(name) + r"(_\d+)?")
    runs = [RunDir(os.path.join(root, n)) for n in os.listdir(root) if pattern.fullmatch(n)]
    return sorted(runs, key=lambda r: os.path.getmtime(r.path))


def find_resumable(name: str) -> RunDir | None:
    """The newest unfinished run of this name with a checkpoint to continue from."""
    for run in reversed(_runs_named(safe_io.sanitize_name(name))):
        if not run.finished and run.latest_checkpoint():
            return run
    return None


def new_run(name: str) -> RunDir:
    root = runs_root()
    os.makedirs(root, exist_ok=True)
    path = safe_io.unique_path(root, safe_io.sanitize_name(name, "run"))
    os.makedirs(path)
    return RunDir(path)


def open_run(path_or_name: str) -> RunDir:
    path = path_or_name if os.path.isdir(path_or_name) else os.path.join(runs_root(), safe_io.sanitize_name(path_or_name))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"No training run at '{path}' (expected a config.json there).")
    return RunDir(path)
