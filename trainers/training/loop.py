"""The training loop: one loop for every method (LoRA now; DreamBooth variants plug in as methods).

The loop knows no method by name: it calls only the method's hooks (methods/base.py) to build a batch, reduce
the per-sample loss, work after a step, fill a checkpoint and export what the run produces.

Runs the same in a ComfyUI node, from the command line and under `accelerate launch`
on several processes: accelerate owns devices, mixed precision and gradient sync.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..core import host, path_policy, train_state
from ..core.config import TrainConfig
from ..core.dtypes import DTYPES
from ..core.run_dir import RunDir, find_resumable, new_run
from ..data import caches, items as data_items
from ..families.registry import get_family
from ..methods.base import Artifact, TrainData
from ..methods.registry import get_method
from . import batches, objective
from .plots import loss_curve
from .resume import TrainingError, restore

log = logging.getLogger("personalize")


@dataclass
class TrainResult:
    artifact: Artifact | None  # what the run wrote (None on the processes other than the main one)
    run_dir: str
    steps: int
    log: list = field(default_factory=list)  # [{"step", "loss", "lr"}...]
    validation_image: object = None  # PIL image of the last validation, if any
    notes: list = field(default_factory=list)  # what the user should know: a run not resumed and why, a
    # checkpoint that fell back to an older one, buckets scaled to the training resolution

    @property
    def lora_path(self) -> str:
        """The file the run wrote ("" where none): the LoRA file of a LoRA run."""
        return self.artifact.path if self.artifact else ""

    def loss_image(self):
        return loss_curve([r["step"] for r in self.log], [r["loss"] for r in self.log])


def train(cfg: TrainConfig, components=None, progress=None) -> TrainResult:
    """Train per `cfg`. `components` skips loading (tests, the demo); `progress(step, total, loss)` is optional."""
    cfg.validate()
    accelerator = _make_accelerator(cfg)
    device = accelerator.device
    host.free_memory()
    # The base model and the dataset come first: which run may be resumed depends on both.
    comps = components or _load_base(cfg)
    items = data_items.scan_folder(cfg.dataset, trigger_word=cfg.trigger_word)
    built_at = data_items.built_resolution(cfg.dataset)
    identity = _identity(cfg, items, comps)
    notes = []
    run, checkpoints, passed_over = _open_run(cfg, accelerator, identity)
    _note(accelerator, notes, *passed_over)
    if checkpoints:
        cfg = _resumed_config(cfg, run, accelerator)
    _log_main(accelerator, "run %s on %s (%d process(es))%s", run.path, device, accelerator.num_processes,
              ", resuming it" if checkpoints else "")

    family = get_family(comps.family)
    method = get_method(cfg)
    items, scaled = batches.fit_buckets(items, built_at, cfg.resolution)
    _note(accelerator, notes, *scaled)
    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)  # "no": fp32

    # Encode every image once: the loop never runs the VAE.
    latents = caches.LatentCache.build(items, comps.vae.to(device), cfg.resolution, crop=cfg.crop, flip=cfg.flip,
                                        device=device, rescaled=bool(scaled))
    comps.vae.to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the same seed gives the same initial adapter weights
        groups = method.setup(comps)
    captions = None
    if not method.trains_text_encoder:  # frozen text encoders: encode every caption once
        for encoder in comps.text_encoders:
            encoder.to(device)
        with torch.no_grad():
            captions = caches.CaptionCache.build([it.caption for it in items],
                                                 lambda texts: family.encode(comps, texts).to("cpu", torch.float32))
        for encoder in comps.text_encoders:
            encoder.to("cpu")
    _to_training_dtype(comps, method, weight_dtype, device)
    if cfg.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            for encoder in comps.text_encoders:
                encoder.gradient_checkpointing_enable()

    trainable = [p for g in groups for p in g["params"]]
    from .optim import make_optimizer, make_scheduler

    optimizer = make_optimizer(cfg.optimizer, groups, cfg.weight_decay, device)
    scheduler = make_scheduler(cfg.lr_scheduler, optimizer, cfg.warmup_steps, cfg.steps)
    encoders = comps.text_encoders if method.trains_text_encoder else []
    prepared = accelerator.prepare(comps.unet, *encoders, optimizer)
    unet, optimizer = prepared[0], prepared[-1]
    text_encoders = list(prepared[1:-1])  # the trained ones, wrapped for gradient sync; [] when frozen

    start_step = 0
    if checkpoints:
        start_step, fallbacks = restore(run, checkpoints, comps, optimizer, scheduler, accelerator)
        _note(accelerator, notes, *fallbacks)
        if accelerator.is_main_process:
            run.truncate_log(start_step)
    elif accelerator.is_main_process:
        run.write_config({**cfg.to_dict(), "resolved": {
            "base_model_path": comps.source, "base_model_sha256": identity["base_model_sha256"],
            "dataset_fingerprint": identity["dataset_fingerprint"], "dataset_resolution": built_at,
            "train_sizes": batches.train_sizes(items, cfg.resolution),
            "family": comps.family, "images": len(items), "device": str(device),
            "mixed_precision": accelerator.mixed_precision, "processes": accelerator.num_processes}})

    noise_scheduler = comps.noise_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    history = run.read_log() if accelerator.is_main_process else []
    bar = host.Progress(cfg.steps)
    validation_image = None
    started = time.time()
    step = start_step
    for model in (unet, *text_encoders):
        model.train()

    data = TrainData(items=items, latents=latents, accelerator=accelerator)

    def save_checkpoint(at_step):
        if accelerator.is_main_process and not os.path.exists(run.checkpoint_path(at_step)):
            train_state.save(run.checkpoint_path(at_step), trainable=method.trainable_state(comps),
                             optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                             step=at_step)
            run.prune_checkpoints(cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    try:
        while step < cfg.steps:
            t0 = time.time()
            loss_value = 0.0
            for micro in range(cfg.grad_accum):
                gen = torch.Generator().manual_seed(objective.step_seed(cfg.seed, step, micro, accelerator.process_index))
                batch = method.batch(step, micro, gen, data)
                batch_latents = batch.latents.to(device, weight_dtype)
                if captions is not None:
                    cond = captions.get(batch.texts).to(device, weight_dtype)
                else:
                    cond = family.encode(comps, batch.texts, text_encoders)
                sync = micro == cfg.grad_accum - 1
                with accelerator.no_sync(unet) if not sync and accelerator.num_processes > 1 else nullcontext():
                    per_sample = objective.diffusion_loss(cfg, unet, family, noise_scheduler, alphas_cumprod,
                                                          batch_latents, cond, batch, gen, device)
                    loss = method.loss(per_sample, batch)
                    accelerator.backward(loss / cfg.grad_accum)
                loss_value += loss.detach().float() / cfg.grad_accum
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step(comps)
            step += 1

            loss_value = accelerator.reduce(loss_value.to(device), reduction="mean").item()
            if not math.isfinite(loss_value):
                last = run.latest_checkpoint()
                raise TrainingError(
                    f"The loss became {loss_value} at step {step}; training stopped and nothing was saved from this "
                    f"step. Last good checkpoint: {last or 'none'}. Lower the learning rate, or use bf16 or fp32 "
                    f"instead of fp16.")
            record = {"step": step, "loss": loss_value, "lr": lr,
                      "time": round(time.time() - t0, 4)}
            if accelerator.is_main_process:
                history.append(record)
                run.append_log(record)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint(step)
            if cfg.validation_prompt and cfg.validation_every and step % cfg.validation_every == 0 \
                    and step < cfg.steps:
                validation_image = _validate(cfg, method, comps, accelerator, unet, run, step, device)
            if progress is not None:
                progress(step, cfg.steps, loss_value)
            if host.in_comfyui():
                bar.update(step, loss_curve([r["step"] for r in history], [r["loss"] for r in history], 256, 128),
                           text=f"step {step}/{cfg.steps}  loss {loss_value:.4f}  lr {lr:.2e}")
            host.check_interrupt()  # Cancel: raises here, after a finished step
    except BaseException as exc:
        if host.is_interrupt(exc) and step > start_step:
            save_checkpoint(step)
            _log_main(accelerator, "stopped at step %d; resumable checkpoint in %s", step, run.checkpoints)
        raise

    save_checkpoint(step)  # so a failed export can be resumed without retraining
    if cfg.validation_prompt:
        validation_image = _validate(cfg, method, comps, accelerator, unet, run, step, device)
    artifact = None
    if accelerator.is_main_process:
        artifact = method.export(comps, family, captions=[it.caption for it in items], dataset_dir=cfg.dataset,
                                 steps=step, started=started)
        run.mark_finished({artifact.kind: artifact.path, "steps": step, "seconds": round(time.time() - started, 2)})
        log.info("saved %s %s", artifact.kind, artifact.path)
    accelerator.wait_for_everyone()
    return TrainResult(artifact=artifact, run_dir=run.path, steps=step, log=history,
                       validation_image=validation_image, notes=notes)


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = cfg.mixed_precision
    cuda = host.torch_device().type == "cuda"  # inside ComfyUI, its --cpu choice counts
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if precision == "fp16" and not cuda:
        log.warning("fp16 mixed precision needs a CUDA GPU; training in fp32 on the CPU.")
        precision = "no"
    # accelerate keeps one precision per process; a later run in this process (the node queued again) may choose another.
    AcceleratorState._reset_state()
    # On the CPU, cpu=True also lets several launched processes train together over gloo.
    return Accelerator(mixed_precision=precision, cpu=host.torch_device().type == "cpu")


def _open_run(cfg: TrainConfig, accelerator, identity: dict) -> tuple[RunDir, list[str], list[str]]:
    """The main process picks (or creates) the run folder; the others follow its choice.

    Returns the run, its checkpoints oldest first (none for a new run), and notes on the runs
    of this name that were not resumed because their identity (see run_dir.IDENTITY) differs.
    """
    from accelerate.utils import broadcast_object_list

    choice = [None, [], []]
    if accelerator.is_main_process:
        run, passed_over = find_resumable(cfg.name, identity) if cfg.resume else (None, [])
        checkpoints = run.checkpoint_dirs() if run else []
        choice = [(run or new_run(cfg.name)).path, checkpoints, passed_over]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    return RunDir(choice[0]), choice[1], choice[2]


def _identity(cfg: TrainConfig, items, comps) -> dict:
    """What a run must share with this config to be resumed (run_dir.IDENTITY)."""
    return {"output_name": cfg.output_name, "run_name": cfg.run_name,
            "dataset_fingerprint": data_items.dataset_fingerprint(items, cfg.dataset),
            "base_model_sha256": comps.info.get("sha256", "")}  # "" for components passed in (tests, demo)


def _resumed_config(cfg: TrainConfig, run: RunDir, accelerator) -> TrainConfig:
    """A resumed run keeps its own settings (they shaped its checkpoint); only `steps` may change."""
    stored = TrainConfig.from_dict({**run.read_config(), "steps": cfg.steps, "resume": True})
    changed = [k for k, v in cfg.values().items() if k not in ("extra",) and getattr(stored, k) != v]
    if changed:
        _log_main(accelerator, "resuming %s with its saved settings; ignored new values for: %s",
                  run.name, ", ".join(changed))
    return stored


def _load_base(cfg: TrainConfig):
    from ..families.model_loading import load_sd_components

    local = not path_policy.server_rules()  # the command line may name any file; a graph, only its folders
    path = cfg.base_model
    if not (local and os.path.exists(path)):
        try:
            path = host.resolve_model("checkpoints", cfg.base_model, allow_absolute=local)
        except FileNotFoundError as missing:
            try:
                path = host.resolve_model("diffusers", cfg.base_model, allow_absolute=local)
            except FileNotFoundError:
                raise missing from None  # name the checkpoints folder, where most models live
    return load_sd_components(path)


def _to_training_dtype(comps, method, weight_dtype, device):
    """Frozen weights in the compute dtype; trainable ones stay fp32 (no fp16 grads to unscale)."""
    cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
    comps.unet.to(device, **cast)
    if method.trains_text_encoder:
        for encoder in comps.text_encoders:
            encoder.to(device, **cast)
    for model in (comps.unet, *comps.text_encoders):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def _validate(cfg, method, comps, accelerator, unet, run, step, device):
    if not accelerator.is_main_process:
        return None
    from .validation import sample_image

    model = accelerator.unwrap_model(unet)
    model.eval()
    image = sample_image(comps, model, method.prompt(cfg.validation_prompt), resolution=cfg.resolution,
                         steps=cfg.validation_steps, seed=cfg.validation_seed, device=device)
    model.train()
    os.makedirs(run.samples, exist_ok=True)
    image.save(run.sample_path(step))
    return image


def _log_main(accelerator, msg, *args):
    if accelerator.is_main_process:
        log.info(msg, *args)


def _note(accelerator, notes: list, *texts: str) -> None:
    """Keep a note for TrainResult.notes (the node shows them) and log it."""
    for text in texts:
        notes.append(text)
        if accelerator.is_main_process:
            log.warning("%s", text)
