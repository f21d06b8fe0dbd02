"""The method seam: the loop calls only the method's hooks (methods/base.py) and knows no method by name."""
import glob
import os

import torch

from test_train_lora import cfg_for, env, fresh, lora_files  # noqa: F401 (fixtures)
from trainers.core import config
from trainers.methods import registry
from trainers.methods.base import Artifact, Batch, TrainingMethod
from trainers.training.loop import train


class RecordingMethod(TrainingMethod):
    """Trains the UNet's conv_in directly and writes a file of its own kind; every hook call is recorded."""

    name = "recording"
    calls = []

    def setup(self, comps):
        for model in (comps.unet, comps.text_encoder, comps.vae):
            model.requires_grad_(False)
        comps.unet.conv_in.requires_grad_(True)
        self.calls.append(("setup",))
        return [{"params": list(comps.unet.conv_in.parameters()), "lr": 1e-3}]

    def batch(self, step, micro, gen, data):
        batch = super().batch(step, micro, gen, data)
        batch = Batch(latents=batch.latents, texts=batch.texts, weights=torch.full((len(batch.texts),), 0.5))
        self.calls.append(("batch", step, micro, batch))
        return batch

    def loss(self, per_sample, batch):
        value = 3.0 * super().loss(per_sample, batch)  # weights all 0.5: the weighted mean is the plain mean
        self.calls.append(("loss", batch, per_sample.shape, value.item(), per_sample.detach().mean().item()))
        return value

    def after_step(self, comps):
        self.calls.append(("after_step",))

    def trainable_state(self, comps):
        self.calls.append(("trainable_state",))
        return super().trainable_state(comps)

    def export(self, comps, family, *, captions, dataset_dir, steps, started):
        path = os.path.join(self.cfg.extra["out"], "conv_in.pt")
        torch.save(comps.unet.conv_in.state_dict(), path)
        self.calls.append(("export", steps))
        return Artifact("recording", path)


def test_the_loop_calls_only_the_method_hooks(env, fresh, monkeypatch):
    declared = config.spec("method")
    monkeypatch.setattr(declared, "metadata", {**declared.metadata, "choices": (*config.choices("method"), "recording")})
    monkeypatch.setitem(registry.METHODS, "recording", RecordingMethod)
    RecordingMethod.calls = []
    cfg = cfg_for(env, method="recording", steps=3, grad_accum=2, batch_size=2, save_every=2)
    cfg.extra = {"out": str(env["root"])}
    result = train(cfg, components=fresh())
    calls = RecordingMethod.calls

    assert [c[0] for c in calls] == (["setup"] + ["batch", "loss"] * 2 + ["after_step"]
                                     + ["batch", "loss"] * 2 + ["after_step", "trainable_state"]  # step 2 saved
                                     + ["batch", "loss"] * 2 + ["after_step", "trainable_state", "export"])
    batches_ = [c for c in calls if c[0] == "batch"]
    losses = [c for c in calls if c[0] == "loss"]
    assert [(c[1], c[2]) for c in batches_] == [(s, m) for s in range(3) for m in range(2)]
    assert all(l[1] is b[3] for l, b in zip(losses, batches_))  # the loss hook gets the batch the method built
    assert all(shape == (2,) for _, _, shape, _, _ in losses)  # per-sample losses reach the method
    # What the method's loss returns is what the loop trains on and logs (mean over the micro-steps).
    for s, record in enumerate(result.log):
        micro = losses[2 * s:2 * s + 2]
        assert abs(record["loss"] - sum(v for _, _, _, v, _ in micro) / 2) < 1e-5
        assert abs(record["loss"] - 3.0 * sum(m for *_, m in micro) / 2) < 1e-5
    assert ("export", 3) in calls
    assert result.artifact == Artifact("recording", str(env["root"] / "conv_in.pt"))
    assert result.lora_path == result.artifact.path and os.path.isfile(result.lora_path)
    assert lora_files(env) == []  # nothing of LoRA's export ran


def test_lora_exports_a_lora_artifact(env, fresh):
    result = train(cfg_for(env, steps=1), components=fresh())
    assert result.artifact.kind == "lora" and result.lora_path == result.artifact.path
    assert lora_files(env) == ["subject.safetensors"]


def test_the_training_package_names_no_method():
    root = os.path.join(os.path.dirname(__file__), "..", "trainers", "training")
    for path in glob.glob(os.path.join(root, "*.py")):
        source = open(path, encoding="utf-8").read()
        for banned in ('"lora"', "'lora'", "method ==", "method.name", "cfg.method", "LoraMethod", "isinstance(method"):
            assert banned not in source, f"{os.path.basename(path)} branches on a method: {banned}"
