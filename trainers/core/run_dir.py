"""One folder per training run: resolved config, step log, checkpoints, samples.

Runs live in <output>/personalize/runs/<name>[_N]. A new run never reuses a folder;
resuming picks the newest unfinished run of the same name that has a checkpoint and was
made from the same output name, run name, dataset and base model (see IDENTITY).
"""
from __future__ import annotations

import json
import logging
import os
import re

from . import host, safe_io

log = logging.getLogger("personalize")

# What a run must share with the current config to be resumed: where it lives in config.json, and
# why it was not resumed when it differs.
IDENTITY = (
    ("output_name", None, "it saves to output name {stored!r}, not {want!r}"),
    ("run_name", None, "its run name is {stored!r}, not {want!r}"),
    ("dataset_fingerprint", "resolved", "it was trained on a different dataset (images, captions, trigger word, "
                                        "buckets or repeats changed)"),
    ("base_model_sha256", "resolved", "it was trained on a different base model"),
)


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
        line = (json.dumps(record) + "\n").encode("utf-8")
        with open(self.log_path, "a+b") as f:  # "a": every write lands at the end, whatever we read
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a crash mid-append left a torn line: never glue a record onto it
                    line = b"\n" + line
            f.write(line)

    def read_log(self) -> list[dict]:
        """The step records; a line torn by a crash mid-append is skipped (with one warning)."""
        if not os.path.exists(self.log_path):
            return []
        records, torn = [], 0
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            for line in filter(str.strip, f):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                else:
                    torn += 1
        if torn:
            log.warning("%s: skipped %d unreadable line(s), likely cut short by a crash.", self.log_path, torn)
        return records

    def truncate_log(self, step: int) -> None:
        """Drop records past `step`, so a resumed run continues the same curve."""
        kept = [r for r in self.read_log() if r.get("step", 0) <= step]
        safe_io.write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

    def mark_finished(self, result: dict) -> None:
        safe_io.write_json(self.finished_path, result)

    def set_aside(self, checkpoint: str) -> str:
        """Rename a checkpoint that cannot be loaded to step_N.bad (kept for inspection, never picked again)."""
        aside = safe_io.unique_path(os.path.dirname(checkpoint), os.path.basename(checkpoint), ".bad")
        os.rename(checkpoint, aside)
        return aside

    def mismatch(self, want: dict) -> str | None:
        """Why this run cannot be resumed for `want` (values of the IDENTITY keys), or None if it can."""
        try:
            config = self.read_config()
        except (OSError, ValueError) as e:
            return f"its config.json cannot be read ({e})"
        for key, block, reason in IDENTITY:
            stored = (config.get(block) or {}) if block else config
            if key not in stored:
                return f"its config.json has no {key} (it was made by an older version)"
            if stored[key] != want[key]:
                return reason.format(stored=stored[key], want=want[key])
        return None


def _runs_named(name: str) -> list[RunDir]:
    root = runs_root()
    if not os.path.isdir(root):
        return []
    pattern = re.compile(re.escape(name) + r"(_\d+)?")
    runs = [RunDir(os.path.join(root, n)) for n in os.listdir(root) if pattern.fullmatch(n)]
    return sorted(runs, key=lambda r: os.path.getmtime(r.path))


def find_resumable(name: str, want: dict) -> tuple[RunDir | None, list[str]]:
    """The newest unfinished run of this name with a checkpoint whose IDENTITY values are `want`.

    Also returns a note for every unfinished run with a checkpoint that was passed over, saying why.
    """
    notes = []
    for run in reversed(_runs_named(safe_io.sanitize_name(name, "run"))):
        if run.finished or not run.latest_checkpoint():
            continue
        reason = run.mismatch(want)
        if reason is None:
            return run, []
        notes.append(f"Not resuming {run.name}: {reason}.")
    return None, notes


def new_run(name: str) -> RunDir:
    """A new folder <name>, <name>_2...; mkdir is exclusive, so two runs started at once never share one."""
    root = runs_root()
    os.makedirs(root, exist_ok=True)
    for path in safe_io.numbered_names(root, safe_io.sanitize_name(name, "run")):
        try:
            os.mkdir(path)
            return RunDir(path)
        except FileExistsError:
            continue


def open_run(path_or_name: str) -> RunDir:
    path = path_or_name if os.path.isdir(path_or_name) else os.path.join(runs_root(), safe_io.sanitize_name(path_or_name))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"No training run at '{path}' (expected a config.json there).")
    return RunDir(path)
