"""What a checkpoint holds of the models (the trainable parameters) and restoring a run from its newest good one."""
from __future__ import annotations

import logging
import os

import torch

from ..core import train_state
from ..core.run_dir import RunDir

log = logging.getLogger("personalize")


class TrainingError(RuntimeError):
    """Training cannot go on (a loss that is not finite, no checkpoint that loads); the message says what to do."""


def trainable_params(comps) -> dict:
    """The parameters that train, by their checkpoint names (unet.<name>, text_encoder.<name>)."""
    params = {}
    for prefix, model in comps.named_models():
        params.update({f"{prefix}.{n}": p for n, p in model.named_parameters() if p.requires_grad})
    return params


def restore(run: RunDir, checkpoints: list[str], params: dict, optimizer, scheduler, accelerator) -> tuple[int, list[str]]:
    """Continue from the newest checkpoint that loads; ones that do not are set aside (step_N.bad). `params`: the
    live tensors a checkpoint holds, by name (the method's trainable_state), which are restored in place.

    Returns the step and notes on the checkpoints skipped. Each is read and checked whole before
    anything is copied into the model or optimizer, so a failed attempt leaves nothing half-restored.
    """
    saved, failed = None, []
    for checkpoint in reversed(checkpoints):
        try:
            saved = train_state.load_checked(checkpoint, params, optimizer, scheduler)
            break
        except train_state.CheckpointError as e:
            log.warning("Checkpoint %s cannot be loaded: %s", checkpoint, e)
            failed.append((os.path.basename(checkpoint), e))
    if saved is None:
        reasons = "; ".join(f"{name}: {e}" for name, e in failed)
        raise TrainingError(f"No checkpoint of the run {run.path} can be loaded ({reasons}). Set resume off to "
                            f"start a new run (the old run folder is left as it is).")
    if accelerator.is_main_process:
        log.info("resuming from %s (step %d)", checkpoint, saved["step"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    with torch.no_grad():
        for k, v in saved["trainable"].items():
            params[k].copy_(v.to(params[k].dtype))
    accelerator.wait_for_everyone()  # every process has read the bad ones before they move
    notes = []
    for name, e in failed:
        aside = run.set_aside(os.path.join(run.checkpoints, name)) if accelerator.is_main_process else name + ".bad"
        notes.append(f"Checkpoint {name} of {run.name} could not be loaded ({e}); resumed from step {saved['step']} "
                     f"instead. The bad one was renamed to {os.path.basename(aside)}.")
    return saved["step"], notes
