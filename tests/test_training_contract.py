"""What training promises, checked so that each test fails when its promise breaks: resume repeats the run
exactly (schedule included), min-SNR and v-prediction weigh the loss as the formulas say, old checkpoints are
pruned, the chosen optimizer is the one that steps, and every option the README names does what it says."""
import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from test_dataset_build import _bucket_folder, build
from test_train_lora import cfg_for, env, fresh, interrupt_at  # noqa: F401 (fixtures)
from trainers.core import host, train_state
from trainers.data import caches, order
from trainers.networks import lora as lora_network
from trainers.training import objective
from trainers.families.components import SD_SCHEDULER_CONFIG
from trainers.families.conditioning import Conditioning
from trainers.testing.demo import make_photos
from trainers.families.registry import get_family
from trainers.training.optim import make_optimizer
from trainers.training.loop import train


def logged(run_dir, key):
    """One field of every record in the run folder's log.jsonl, in step order."""
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[0]}"


# ---- resume --------------------------------------------------------------------------------

def test_resume_in_a_warmup_cosine_schedule_repeats_the_rates_and_the_exact_weights(env, fresh):
    settings = dict(steps=6, lr_scheduler="cosine", warmup_steps=2, save_precision="fp32")
    straight = train(cfg_for(env, output_name="straight", **settings), components=fresh())
    cut = cfg_for(env, output_name="cut", **settings)
    with pytest.raises(host.Interrupted):
        train(cut, components=fresh(), progress=interrupt_at(3))  # past the warmup, into the cosine
    resumed = train(cut, components=fresh())

    rates = logged(straight.run_dir, "lr")
    assert len(set(rates)) == 6  # every step has its own rate: a schedule restarted at 0 shows
    assert logged(resumed.run_dir, "lr") == rates
    assert logged(resumed.run_dir, "loss") == logged(straight.run_dir, "loss")
    assert_same_tensors(load_file(resumed.lora_path), load_file(straight.lora_path))


def test_resume_of_a_bucketed_dataset_in_a_fresh_process_trains_the_same_batches(env, fresh, tmp_path):
    built = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    settings = dict(dataset=built.path, steps=9, batch_size=2, save_precision="fp32")  # 3 epochs of 3 batches
    straight = train(cfg_for(env, output_name="straight", **settings), components=fresh())
    cut = cfg_for(env, output_name="cut", **settings)
    with pytest.raises(host.Interrupted):
        train(cut, components=fresh(), progress=interrupt_at(3))
    for cached in vars(order).values():  # a new process remembers no batch order: work it out again
        getattr(cached, "cache_clear", lambda: None)()
    resumed = train(cut, components=fresh())
    assert logged(resumed.run_dir, "loss") == logged(straight.run_dir, "loss")
    assert_same_tensors(load_file(resumed.lora_path), load_file(straight.lora_path))


# ---- the loss: min-SNR, v-prediction, noise offset ------------------------------------------

class FixedPrediction(torch.nn.Module):
    """Stands in for the UNet: keeps what it is given and predicts zeros, so a sample's loss is mean(target**2)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, noisy, t, encoder_hidden_states, **kwargs):
        self.seen.append((noisy.detach().double(), t.clone()))
        return SimpleNamespace(sample=torch.zeros_like(noisy))


def loss_of(prediction_type="epsilon", seed=0, batch=1, **cfg):
    """_diffusion_loss on fixed latents with a FixedPrediction UNet: (loss, x0, noisy latents, t, alphas_cumprod)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=prediction_type, **SD_SCHEDULER_CONFIG)
    settings = SimpleNamespace(**{"min_snr_gamma": 0.0, "noise_offset": 0.0, **cfg})
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1000 + seed))
    unet = FixedPrediction()
    loss = objective.diffusion_loss(settings, unet, get_family("sd1"), scheduler, scheduler.alphas_cumprod,
                                     latents, Conditioning(torch.zeros(batch, 77, 32)), None,
                                     torch.Generator().manual_seed(seed), "cpu")
    noisy, t = unet.seen[0]
    return loss.mean().item(), latents.double(), noisy, t, scheduler.alphas_cumprod.double()


def noise_and_velocity(x0, noisy, t, alphas_cumprod):
    """What was added to x0 to make `noisy` (recovered from the UNet's input), and the velocity target."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
    return noise, a.sqrt() * noise - (1 - a).sqrt() * x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [5.0, 0.0])
def test_min_snr_weights_and_targets_follow_the_formulas(prediction_type, gamma):
    snrs = []
    for seed in range(40):  # one sample per call: the loss is that sample's weight times mean(target**2)
        loss, x0, noisy, t, alphas_cumprod = loss_of(prediction_type, seed, min_snr_gamma=gamma)
        noise, velocity = noise_and_velocity(x0, noisy, t, alphas_cumprod)
        target = velocity if prediction_type == "v_prediction" else noise
        snr = float(alphas_cumprod[t] / (1 - alphas_cumprod[t]))
        if not gamma:
            weight = 1.0  # 0 turns min-SNR off
        elif prediction_type == "v_prediction":
            weight = min(snr, gamma) / (snr + 1)
        else:
            weight = min(snr, gamma) / snr
        assert loss == pytest.approx(weight * float((target ** 2).mean()), rel=1e-4), (seed, int(t), snr)
        snrs.append(snr)
    assert min(snrs) < 5.0 < max(snrs)  # timesteps on both sides of gamma were checked


def test_noise_offset_shifts_each_channel_of_the_noise_by_one_constant():
    _, x0, noisy, t, alphas_cumprod = loss_of(seed=3, batch=8)
    plain, _ = noise_and_velocity(x0, noisy, t, alphas_cumprod)
    _, x0, noisy, t, alphas_cumprod = loss_of(seed=3, batch=8, noise_offset=0.1)
    offset, _ = noise_and_velocity(x0, noisy, t, alphas_cumprod)
    shift = offset - plain  # the same generator draws the same base noise first
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert (shift - per_channel).abs().max() < 1e-4  # constant over each channel of each image
    assert 0.05 < float(per_channel.std()) < 0.2  # 0.1 * N(0, 1), drawn per image and channel


def test_noise_offset_and_v_prediction_reach_the_training_loop(env, fresh):
    base = train(cfg_for(env, steps=1, output_name="base"), components=fresh())
    offset = train(cfg_for(env, steps=1, output_name="offset", noise_offset=0.5), components=fresh())
    v_model = fresh()
    v_model.prediction_type = "v_prediction"
    velocity = train(cfg_for(env, steps=1, output_name="v"), components=v_model)
    losses = [result.log[0]["loss"] for result in (base, offset, velocity)]
    assert len(set(losses)) == 3, losses  # the same seed: each option changes the first step's loss


# ---- checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [None, 1])
def test_only_the_newest_checkpoints_are_kept(env, fresh, keep):
    kw = {} if keep is None else {"keep_checkpoints": keep}
    result = train(cfg_for(env, steps=6, save_every=1, **kw), components=fresh())
    newest = ["step_000004", "step_000005", "step_000006"] if keep is None else ["step_000006"]  # README: the last 3
    assert sorted(os.listdir(os.path.join(result.run_dir, "checkpoints"))) == newest


# ---- optimizers ----------------------------------------------------------------------------

def one_group():
    return [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 1.0}]


def test_the_optimizer_factory_builds_what_was_asked(caplog):
    from prodigyopt import Prodigy

    prodigy = make_optimizer("prodigy", one_group(), 0.01, torch.device("cpu"))
    assert type(prodigy) is Prodigy and {"d", "d0", "d_coef"} <= set(prodigy.param_groups[0])
    assert type(make_optimizer("adamw", one_group(), 0.01, torch.device("cpu"))) is torch.optim.AdamW
    fallback = make_optimizer("adamw8bit", one_group(), 0.01, torch.device("cpu"))
    assert type(fallback) is torch.optim.AdamW
    assert "AdamW8bit needs a CUDA GPU (bitsandbytes); using AdamW on cpu instead." in caplog.text


def test_prodigy_is_the_optimizer_that_steps(env, fresh):
    result = train(cfg_for(env, steps=2, optimizer="prodigy", unet_lr=1.0), components=fresh())
    saved = train_state.load(os.path.join(result.run_dir, "checkpoints", "step_000002"))["optimizer"]
    assert {"d", "d0", "d_coef"} <= set(saved["param_groups"][0])  # Prodigy's step-size estimate
    assert saved["state"] and all({"p0", "s"} <= set(s) for s in saved["state"].values())


# ---- gradient accumulation -----------------------------------------------------------------

def spied_run(env, fresh, monkeypatch, **kw):
    """Train `kw` and return what the loop did: the items it drew, each micro-batch's gradient of its own loss
    (taken aside, without touching .grad), and the .grad every optimizer step applied."""
    drawn, micro_grads, applied = [], [], []
    real_sample, real_loss = caches.LatentCache.sample, objective.diffusion_loss

    def sample(self, index, generator=None):
        drawn.append(index)
        return real_sample(self, index, generator)

    def loss(cfg, unet, *args):
        value = real_loss(cfg, unet, *args)
        params = [p for p in unet.parameters() if p.requires_grad]
        grads = torch.autograd.grad(value.mean(), params, retain_graph=True)  # per-sample losses, LoRA's mean
        micro_grads.append({id(p): g for p, g in zip(params, grads)})
        return value

    def before_step(optimizer, args, kwargs):
        applied.append({id(p): p.grad.clone() for g in optimizer.param_groups for p in g["params"]})

    with monkeypatch.context() as patch:
        patch.setattr(caches.LatentCache, "sample", sample)
        patch.setattr(objective, "diffusion_loss", loss)
        hook = register_optimizer_step_pre_hook(before_step)
        try:
            train(cfg_for(env, **kw), components=fresh())
        finally:
            hook.remove()
    return drawn, micro_grads, applied


def test_accumulated_micro_batches_are_the_global_batch_and_their_gradient_is_the_mean(env, fresh, monkeypatch):
    photos = make_photos(str(env["root"] / "three"), count=3, size=64)  # 3 steps of 2: two shuffled epochs
    whole, _, _ = spied_run(env, fresh, monkeypatch, dataset=photos, steps=3, batch_size=2, output_name="batch")
    drawn, micro_grads, applied = spied_run(env, fresh, monkeypatch, dataset=photos, steps=3, grad_accum=2,
                                            max_grad_norm=0.0, output_name="accum")
    assert drawn == whole  # micro-batches 2s and 2s+1 hold the items of batch s
    assert len(micro_grads) == 6 and len(applied) == 3
    # A batch's loss is the mean of its items' losses; accumulating must give the mean of the micro-batch gradients.
    for step, grads in enumerate(applied):
        first, second = micro_grads[2 * step], micro_grads[2 * step + 1]
        for k, grad in grads.items():
            # backward(loss / 2) twice: halving is exact in floating point, only the order of the sum may vary
            torch.testing.assert_close(grad, (first[k] + second[k]) / 2, rtol=1e-6, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in applied[0].values())


# ---- gradient checkpointing ----------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_caption_dropout_trains_that_share_of_steps_on_the_empty_caption(env, fresh, monkeypatch, dropout):
    seen, real_get = [], caches.CaptionCache.get

    def get(self, captions):
        seen.extend(captions)
        return real_get(self, captions)

    monkeypatch.setattr(caches.CaptionCache, "get", get)
    train(cfg_for(env, steps=40, caption_dropout=dropout, output_name=f"drop{dropout}"), components=fresh())
    empty = seen.count("")
    assert len(seen) == 40 and all(c.startswith("sks") for c in seen if c)
    assert (empty == 0) if dropout == 0 else (10 <= empty <= 30)  # 20 expected; binomial sd ~3.2


def test_training_attention_runs_through_sdpa(env, fresh, monkeypatch):
    """The README's 'SDPA attention': the UNet's attention goes through torch's fused kernel."""
    calls, real_sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    train(cfg_for(env, steps=1, output_name="sdpa"), components=fresh())
    assert len(calls) >= 2  # self- and cross-attention of the UNet's transformer blocks, at least


def count_calls(module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))  # the recomputation may stop before the end
    return calls


def test_gradient_checkpointing_recomputes_activations_and_trains_the_same(env, fresh):
    outcome = {}
    for checkpointing in (False, True):
        comps = fresh()
        unet_block = count_calls(comps.unet.down_blocks[0].attentions[0].transformer_blocks[0])
        te_layer = count_calls(next(m for n, m in comps.text_encoder.named_modules()
                                    if n.endswith("encoder.layers.0.self_attn")))
        result = train(cfg_for(env, steps=2, train_text_encoder=True, gradient_checkpointing=checkpointing,
                               save_precision="fp32", output_name=f"gc_{checkpointing}"), components=comps)
        outcome[checkpointing] = (len(unet_block), len(te_layer), load_file(result.lora_path), result.log)
    # 2 steps: one forward each, and with checkpointing one more per step, in the backward pass.
    assert outcome[False][:2] == (2, 2) and outcome[True][:2] == (4, 4)
    # Recomputing runs the same operations on the same inputs: the same gradients, the same weights.
    assert_same_tensors(outcome[True][2], outcome[False][2])
    assert [r["loss"] for r in outcome[True][3]] == [r["loss"] for r in outcome[False][3]]


# ---- mixed precision -----------------------------------------------------------------------

def test_bf16_trains_frozen_weights_in_bf16_and_trainable_ones_in_fp32(env, fresh):
    comps = fresh()
    dtypes = []

    def progress(step, total, loss):  # during training: after each optimizer step
        dtypes.append(({p.dtype for p in comps.unet.parameters() if p.requires_grad},
                       {p.dtype for p in comps.unet.parameters() if not p.requires_grad}))

    # An fp32 run first, in this same process: the node may be queued again with another precision.
    fp32 = train(cfg_for(env, steps=2, output_name="fp32"), components=fresh())
    bf16 = train(cfg_for(env, steps=2, output_name="bf16", mixed_precision="bf16"), components=comps,
                 progress=progress)
    assert dtypes == [({torch.float32}, {torch.bfloat16})] * 2
    resolved = json.load(open(os.path.join(bf16.run_dir, "config.json")))["resolved"]
    assert resolved["mixed_precision"] == "bf16"
    a, b = fp32.log[0]["loss"], bf16.log[0]["loss"]
    assert a != b and b == pytest.approx(a, rel=0.05)  # computed in bf16, yet the same loss to bf16's precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 falls back to fp32 only without CUDA")
def test_fp16_on_the_cpu_trains_in_fp32_and_says_so(env, fresh, caplog):
    comps = fresh()
    result = train(cfg_for(env, steps=1, mixed_precision="fp16"), components=comps)
    assert "fp16 mixed precision needs a CUDA GPU; training in fp32 on the CPU." in caplog.text
    assert json.load(open(os.path.join(result.run_dir, "config.json")))["resolved"]["mixed_precision"] == "no"
    assert {p.dtype for p in comps.unet.parameters()} == {torch.float32}


# ---- learning-rate schedules ---------------------------------------------------------------

SHAPES = {"constant": lambda progress: 1.0,
          "linear": lambda progress: 1.0 - progress,
          "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress))}


@pytest.mark.parametrize("schedule", sorted(SHAPES))
def test_logged_rates_follow_warmup_then_the_schedule(env, fresh, schedule):
    steps, warmup, lr = 6, 2, 1e-3
    result = train(cfg_for(env, steps=steps, lr_scheduler=schedule, warmup_steps=warmup, unet_lr=lr),
                   components=fresh())
    # Step s (0-based) warms up linearly to lr over `warmup` steps, then follows the shape from 1 towards 0.
    expected = [lr * (s + 1) / (warmup + 1) if s < warmup else lr * SHAPES[schedule]((s - warmup) / (steps - warmup))
                for s in range(steps)]
    assert logged(result.run_dir, "lr") == pytest.approx(expected, rel=1e-9)


# ---- what the LoRA covers ------------------------------------------------------------------

def test_text_encoder_lora_covers_attention_and_mlp_of_every_layer(env, fresh):
    result = train(cfg_for(env, steps=1, train_text_encoder=True), components=fresh())
    layers = fresh().text_encoder.config.num_hidden_layers
    kinds = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    expected = {f"lora_te_text_model_encoder_layers_{i}_{kind}" for i in range(layers) for kind in kinds}
    assert {k.split(".")[0] for k in load_file(result.lora_path) if k.startswith("lora_te_")} == expected


ATTN = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}
KOHYA = ATTN | {"proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"}
LOCON = KOHYA | {"conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"}


def layer_kind(name):
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> 'attn1.to_q', '...resnets.1.conv1' -> 'conv1'."""
    m = re.search(r"(?:transformer_blocks\.\d+\.|attentions\.\d+\.(?!transformer_blocks)|resnets\.\d+\.)(.+)$"
                  r"|((?:down|up)samplers\.0\.conv)$", name)
    return m.group(1) or m.group(2)


@pytest.mark.parametrize("preset,kinds", [("attn", ATTN), ("kohya", KOHYA), ("locon", LOCON)])
def test_unet_presets_cover_the_layers_the_readme_names(toy_sd1, preset, kinds):
    targets = lora_network.unet_targets(toy_sd1.unet, preset)
    assert {layer_kind(name) for name in targets} == kinds
    blocks = [n for n, m in toy_sd1.unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert sum(name.endswith(".attn1.to_q") for name in targets) == len(blocks)  # in every transformer block
