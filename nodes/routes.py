"""HTTP routes the canvas calls (web/): what a picked base model means for a trainer's settings, and
a training run's files and loss curve so far."""
from __future__ import annotations

import math
import os

from ..trainers.core import host

BASE_MODEL_ROUTE = "/personalize/base_model"
RUN_FILES_ROUTE = "/personalize/run_files"
RUN_LOG_ROUTE = "/personalize/run_log"
MAX_FILES = 500  # a listing, not a backup: a run keeps a few checkpoints and samples
MAX_POINTS = 4000  # the chart is a few hundred pixels wide


def base_model_info(query: dict) -> tuple[int, dict]:
    """GET /personalize/base_model?name=<checkpoint>&resolution=<px>&train_text_encoder=<bool>&
    which_text_encoders=<all|clip_l|clip_g>&gradient_checkpointing=<bool>&method=<method>: the base's family, its
    own size and the note the trainer will show for these settings. Only names inside models/checkpoints are
    read, and only their header."""
    from ..trainers.families.detect import family_of
    from ..trainers.families.load_errors import ModelLoadError
    from ..trainers.families.registry import get_family
    from ..trainers.families.defaults import advice

    try:
        path = host.resolve_model("checkpoints", query.get("name", ""))
        name = family_of(path)
    except (FileNotFoundError, ModelLoadError) as e:
        return 404, {"error": str(e)}
    if not name:  # a pickled .ckpt: the run itself will tell
        return 200, {"family": "", "note": ""}
    family = get_family(name)
    try:
        resolution = int(query.get("resolution", "0"))
    except ValueError:
        resolution = 0
    flag = lambda key: query.get(key, "").lower() == "true"  # noqa: E731
    which = query.get("which_text_encoders", "all")
    trained = (which if which in ("all", "clip_l", "clip_g") else "all") if flag("train_text_encoder") else ""
    note = advice(family, resolution, trained, flag("gradient_checkpointing"), query.get("method", "lora"))
    return 200, {"family": name, "label": family.label, "native_resolution": family.native_resolution,
                 "note": note}


def run_folder(name: str) -> str | None:
    """The run folder of this name: a direct child of output/personalize/runs (no separator, no '..', no link
    leading out of it), or None."""
    from ..trainers.core.run_dir import runs_root

    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        return None
    root = os.path.realpath(runs_root())
    path = os.path.realpath(os.path.join(root, name))
    return path if os.path.dirname(path) == root and os.path.isdir(path) else None


def run_files(query: dict) -> tuple[int, dict]:
    """GET /personalize/run_files?run=<name>: the run folder's files, each with the filename/subfolder/type that
    ComfyUI's /view route serves it by."""
    path = run_folder(query.get("run", ""))
    if path is None:
        return 404, {"error": f"No training run named {query.get('run', '')!r} in output/personalize/runs."}
    files = []
    for dirpath, dirnames, filenames in os.walk(path):  # links are not followed, nor listed
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            ref = None if os.path.islink(full) else host.output_ref(full)
            if ref:
                files.append({"name": os.path.relpath(full, path).replace(os.sep, "/"),
                              "size": os.path.getsize(full), **ref})
    return 200, {"run": os.path.basename(path), "files": files[:MAX_FILES], "more": max(0, len(files) - MAX_FILES)}


def run_log(query: dict) -> tuple[int, dict]:
    """GET /personalize/run_log?run=<name>: the loss curve so far ([[step, loss]...], thinned to MAX_POINTS), the
    run's total steps and its latest validation image, for a page opened (or reconnected) mid-run."""
    from ..trainers.core.run_dir import RunDir

    path = run_folder(query.get("run", ""))
    if path is None:
        return 404, {"error": f"No training run named {query.get('run', '')!r} in output/personalize/runs."}
    run = RunDir(path)
    points = [[r["step"], r["loss"]] for r in run.read_log() if isinstance(r.get("step"), int)
              and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    points = points[::-(-len(points) // MAX_POINTS) or 1]
    try:
        steps = int(run.read_config().get("steps", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        steps = 0
    samples = sorted(n for n in os.listdir(run.samples) if n.endswith(".png")) if os.path.isdir(run.samples) else []
    image = host.output_ref(os.path.join(run.samples, samples[-1])) if samples else None
    return 200, {"run": run.name, "points": points, "steps": steps, "image": image}


def register() -> bool:
    return all([host.add_json_route(BASE_MODEL_ROUTE, base_model_info),
                host.add_json_route(RUN_FILES_ROUTE, run_files), host.add_json_route(RUN_LOG_ROUTE, run_log)])
