"""HTTP routes the canvas calls (web/personalize.js): what a picked base model means for a trainer's settings."""
from __future__ import annotations

from ..trainers.core import host

BASE_MODEL_ROUTE = "/personalize/base_model"


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


def register() -> bool:
    return host.add_json_route(BASE_MODEL_ROUTE, base_model_info)
