"""Hardening of training: crash-safe and exclusive writes, resuming only the right run, torn logs and bad
checkpoints, buckets scaled to the training resolution, and config values checked by type."""
import errno
import json
import os
import stat
import threading
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_dataset_build import _bucket_folder, build
from test_train_lora import cfg_for, env, fresh, interrupt_at  # noqa: F401 (fixtures)
from trainers.cli.main import main as cli_main
from trainers.core import host, safe_io, train_state
from trainers.data import caches as cache_mod, items as data_items
from trainers.dataset_build.buckets import scale_bucket
from trainers.core.config import ConfigError, TrainConfig
from trainers.testing.demo import make_photos
from trainers.methods.registry import get_method
from trainers.core.run_dir import RunDir
from trainers.training.loop import TrainingError, train

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes and folder fsync")


def runs(env):
    return env["root"] / "output" / "personalize" / "runs"


def cancelled(env, comps, stop_at=2, **kw):
    """A run of `kw` stopped by Cancel after `stop_at` steps: unfinished, with a checkpoint."""
    with pytest.raises(host.Interrupted):
        train(cfg_for(env, steps=6, **kw), components=comps, progress=interrupt_at(stop_at))


def trained_weights(comps) -> dict:
    return {n: p.detach() for n, p in comps.unet.named_parameters() if p.requires_grad}


def with_sha(comps, sha):
    comps.info = {**comps.info, "sha256": sha}
    return comps


# ---- safe_io: exclusive names, modes, fsync, names -------------------------------------

@pytest.mark.parametrize("hard_links", [True, False])
def test_two_saves_of_one_name_at_once_both_survive(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        def no_links(src, dst):
            raise OSError(errno.EPERM, "hard links not supported here")
        monkeypatch.setattr(os, "link", no_links)
    both_written = threading.Barrier(2)

    def writer(data):
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
            both_written.wait(timeout=20)  # neither publishes before the other has its file ready
        return write

    paths = {}
    threads = [threading.Thread(target=lambda d=d: paths.__setitem__(d, safe_io.save_new(
        str(tmp_path), "portrait", ".safetensors", writer(d)))) for d in (b"first", b"second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(os.path.basename(p) for p in paths.values()) == ["portrait.safetensors", "portrait_2.safetensors"]
    assert {open(p, "rb").read() for p in paths.values()} == {b"first", b"second"}
    assert sorted(os.listdir(tmp_path)) == ["portrait.safetensors", "portrait_2.safetensors"]  # no temp files


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_name_taken_just_before_publishing_is_not_overwritten(tmp_path, monkeypatch, hard_links):
    taken = tmp_path / "portrait.bin"
    real_link, real_open = os.link, os.open

    def someone_else_first(path):
        if os.path.basename(path) == taken.name and not taken.exists():
            taken.write_bytes(b"theirs")

    def racing_link(src, dst):
        someone_else_first(dst)
        if not hard_links:
            raise OSError(errno.EPERM, "hard links not supported here")
        return real_link(src, dst)

    def racing_open(path, flags, *args):
        if flags & os.O_EXCL:
            someone_else_first(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "link", racing_link)
    monkeypatch.setattr(os, "open", racing_open)
    path = safe_io.save_new(str(tmp_path), "portrait", ".bin", lambda tmp: open(tmp, "wb").write(b"mine"))
    assert os.path.basename(path) == "portrait_2.bin"
    assert taken.read_bytes() == b"theirs" and open(path, "rb").read() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["portrait.bin", "portrait_2.bin"]


def test_export_racing_another_export_of_the_same_name_keeps_both(env, fresh, monkeypatch):
    theirs = env["loras"] / "subject.safetensors"
    real_link = os.link

    def racing_link(src, dst):  # another export publishes 'subject' after our name check, before our link
        if os.path.basename(dst) == theirs.name and not theirs.exists():
            theirs.write_bytes(b"another export")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    result = train(cfg_for(env, steps=1), components=fresh())
    assert os.path.basename(result.lora_path) == "subject_2.safetensors"
    assert theirs.read_bytes() == b"another export"
    assert load_file(result.lora_path)  # complete and readable
    assert sorted(os.listdir(env["loras"])) == ["subject.safetensors", "subject_2.safetensors"]


def test_save_new_refuses_a_folder_outside_its_roots_before_writing(tmp_path):
    with pytest.raises(PermissionError, match="outside"):
        safe_io.save_new(str(tmp_path / "elsewhere"), "x", ".bin", lambda tmp: None, roots=[str(tmp_path / "ok")])
    assert not (tmp_path / "elsewhere").exists() or os.listdir(tmp_path / "elsewhere") == []


@posix_only
def test_new_files_follow_the_umask_and_overwrites_keep_their_mode(tmp_path, monkeypatch):
    current = os.umask(0o022)
    os.umask(current)
    assert safe_io._UMASK == current
    monkeypatch.setattr(safe_io, "_UMASK", 0o027)
    text = safe_io.write_text(str(tmp_path / "a.txt"), "one")
    new = safe_io.save_new(str(tmp_path), "b", ".bin", lambda tmp: open(tmp, "wb").write(b"x"))
    assert stat.S_IMODE(os.stat(text).st_mode) == 0o640 and stat.S_IMODE(os.stat(new).st_mode) == 0o640
    os.chmod(text, 0o604)
    safe_io.write_text(text, "two")
    assert stat.S_IMODE(os.stat(text).st_mode) == 0o604 and open(text).read() == "two"


@posix_only
def test_writes_fsync_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = safe_io.write_json(str(tmp_path / "a.json"), {"x": 1})
    assert synced == [("file", os.stat(path).st_ino), ("dir", os.stat(tmp_path).st_ino)]  # file before rename

    synced.clear()
    safe_io.save_new(str(tmp_path), "c", ".bin", lambda tmp: open(tmp, "wb").write(b"x"))
    assert [kind for kind, _ in synced] == ["file", "dir"]

    synced.clear()
    checkpoint = train_state.save(str(tmp_path / "checkpoints" / "step_000001"), trainable={"w": torch.ones(2)},
                                  optimizer_state={"state": {}, "param_groups": []}, scheduler_state={}, step=1)
    assert [kind for kind, _ in synced].count("file") == 3  # trainable, optimizer, state.json
    assert synced[-1] == ("dir", os.stat(tmp_path / "checkpoints").st_ino)  # the folder rename made durable
    assert os.path.isdir(checkpoint) and not os.path.exists(checkpoint + ".part")


def test_sanitize_name_limits_utf8_bytes_without_cutting_a_character():
    emoji = safe_io.sanitize_name("😀" * 80)
    assert len(emoji.encode("utf-8")) <= 120 and emoji == "😀" * 30
    accented = safe_io.sanitize_name("é" * 100 + "x", max_bytes=51)
    assert accented == "é" * 25  # 50 bytes: the 26th 'é' would be cut in half
    assert safe_io.sanitize_name("a" * 119 + ".b") == "a" * 119  # no trailing dot after the cut
    undecodable = safe_io.sanitize_name("photo\udcff\udc80name")  # os.fsdecode of a non-UTF-8 file name
    assert undecodable == "photo__name" and undecodable.encode("utf-8")
    assert safe_io.sanitize_name("a/b/../c") == "a_b_c"
    assert safe_io.sanitize_name("/etc/passwd") == "etc_passwd"
    assert safe_io.sanitize_name("..") == "untitled"


# ---- which run is resumed --------------------------------------------------------------

def test_resume_needs_the_same_dataset_base_model_and_trigger(env, fresh):
    cancelled(env, with_sha(fresh(), "a" * 64), output_name="portrait")
    other_photos = make_photos(str(env["root"] / "photos_b"), count=2, size=64, seed=1)

    other_data = train(cfg_for(env, steps=1, output_name="portrait", dataset=other_photos),
                       components=with_sha(fresh(), "a" * 64))
    assert other_data.run_dir == str(runs(env) / "portrait_2")
    assert other_data.notes == ["Not resuming portrait: it was trained on a different dataset (images, captions, "
                                "trigger word, buckets or repeats changed)."]

    other_base = train(cfg_for(env, steps=1, output_name="portrait"), components=with_sha(fresh(), "b" * 64))
    assert other_base.run_dir == str(runs(env) / "portrait_3")
    assert other_base.notes == ["Not resuming portrait: it was trained on a different base model."]

    other_trigger = train(cfg_for(env, steps=1, output_name="portrait", trigger_word="zkz"),
                          components=with_sha(fresh(), "a" * 64))
    assert other_trigger.run_dir == str(runs(env) / "portrait_4")
    assert "different dataset" in other_trigger.notes[0]

    same = train(cfg_for(env, steps=6, output_name="portrait"), components=with_sha(fresh(), "a" * 64))
    assert same.run_dir == str(runs(env) / "portrait") and same.notes == []
    assert [r["step"] for r in same.log] == [1, 2, 3, 4, 5, 6]  # continued, not restarted
    config = json.loads((runs(env) / "portrait" / "config.json").read_text())
    assert config["resolved"]["base_model_sha256"] == "a" * 64
    assert config["resolved"]["dataset_fingerprint"] == data_items.dataset_fingerprint(
        data_items.scan_folder(env["photos"], trigger_word="sks"), env["photos"])


def test_resume_needs_the_exact_output_name_and_a_fingerprinted_run(env, fresh):
    cancelled(env, fresh(), output_name="portrait_2")
    result = train(cfg_for(env, steps=1, output_name="portrait"), components=fresh())
    assert result.run_dir == str(runs(env) / "portrait")
    assert result.notes == ["Not resuming portrait_2: it saves to output name 'portrait_2', not 'portrait'."]

    config_path = runs(env) / "portrait_2" / "config.json"  # as an older version wrote it
    config = json.loads(config_path.read_text())
    del config["resolved"]["dataset_fingerprint"]
    config_path.write_text(json.dumps(config))
    old = train(cfg_for(env, steps=1, output_name="portrait_2"), components=fresh())
    assert old.run_dir == str(runs(env) / "portrait_2_2")
    assert old.notes == ["Not resuming portrait_2: its config.json has no dataset_fingerprint "
                         "(it was made by an older version)."]
    assert os.listdir(runs(env) / "portrait_2" / "checkpoints") == ["step_000002"]  # left alone


def test_resume_off_starts_a_new_run_without_notes(env, fresh):
    cancelled(env, fresh())
    result = train(cfg_for(env, steps=1, resume=False), components=fresh())
    assert result.run_dir == str(runs(env) / "subject_2") and result.notes == []


# ---- torn logs and bad checkpoints -----------------------------------------------------

def test_torn_last_log_line_is_skipped_and_never_glued_to(tmp_path, caplog):
    run = RunDir(str(tmp_path))
    run.append_log({"step": 1, "loss": 0.5})
    with open(run.log_path, "a", encoding="utf-8") as f:
        f.write('{"step": 2, "lo')  # the process died mid-append
    run.append_log({"step": 2, "loss": 0.4})
    assert run.read_log() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert "skipped 1 unreadable line" in caplog.text


def test_resume_after_a_torn_log_line(env, fresh):
    cancelled(env, fresh())
    log_path = runs(env) / "subject" / "log.jsonl"
    with open(log_path, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "loss": 0.1')
    result = train(cfg_for(env, steps=4), components=fresh())
    assert [r["step"] for r in result.log] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in open(log_path)] == [1, 2, 3, 4]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(env, fresh):
    straight = train(cfg_for(env, steps=6, output_name="straight"), components=fresh())
    cancelled(env, fresh(), stop_at=4, output_name="cut", save_every=2)
    ckpts = runs(env) / "cut" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_000002", "step_000004"]
    data = (ckpts / "step_000004" / "optimizer.safetensors").read_bytes()
    (ckpts / "step_000004" / "optimizer.safetensors").write_bytes(data[:len(data) // 2])  # torn by a crash

    resumed = train(cfg_for(env, steps=6, output_name="cut", save_every=2), components=fresh())
    assert resumed.run_dir == str(runs(env) / "cut")
    assert len(resumed.notes) == 1 and "step_000004" in resumed.notes[0] and "optimizer.safetensors" in \
        resumed.notes[0] and "resumed from step 2" in resumed.notes[0]
    assert sorted(os.listdir(ckpts)) == ["step_000002", "step_000004", "step_000004.bad", "step_000006"]
    assert [r["step"] for r in resumed.log] == [1, 2, 3, 4, 5, 6]
    # Restored exactly at step 2: the same curve as the run that was never stopped.
    assert [r["loss"] for r in resumed.log] == pytest.approx([r["loss"] for r in straight.log], rel=1e-4, abs=1e-6)


def test_when_no_checkpoint_loads_the_error_names_the_run_and_nothing_is_half_restored(env, fresh):
    cancelled(env, fresh(), stop_at=4, save_every=2)
    ckpts = runs(env) / "subject" / "checkpoints"
    trainable = load_file(ckpts / "step_000002" / "trainable.safetensors")
    name = sorted(trainable)[-1]  # the last one: a loop copying as it checks would have copied the others
    trainable[name] = torch.zeros(1)  # a tensor of the wrong shape
    save_file(trainable, ckpts / "step_000002" / "trainable.safetensors")
    (ckpts / "step_000004" / "state.json").write_text("")  # empty after a crash

    cfg = cfg_for(env, steps=6, save_every=2)
    comps = fresh()
    with pytest.raises(TrainingError) as err:
        train(cfg, components=comps)
    message = str(err.value)
    assert str(runs(env) / "subject") in message and "resume off" in message
    assert "step_000002" in message and "shape" in message and "step_000004" in message and "state.json" in message
    assert sorted(os.listdir(ckpts)) == ["step_000002", "step_000004"]  # kept for a later look
    # step_000002's other tensors were fine, yet none was copied in: the adapters are as freshly made.
    initial = fresh()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        get_method(cfg).setup(initial)
    after, before = trained_weights(comps), trained_weights(initial)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


# ---- buckets at the training resolution ------------------------------------------------

def test_scale_bucket_keeps_the_aspect_on_the_unets_grid():
    assert scale_bucket((448, 576), 512, 128) == (112, 144)
    assert scale_bucket((512, 512), 512, 1024) == (1024, 1024)
    assert scale_bucket((640, 384), 512, 768) == (960, 576)  # multiples of 64 from 512 px up
    assert scale_bucket((80, 48), 64, 32) == (40, 24)
    assert scale_bucket((16, 64), 64, 16) == (8, 16)  # never below one step


def test_dataset_built_at_another_resolution_trains_at_scaled_buckets(tmp_path, toy_sd1, monkeypatch, caplog):
    import copy

    host.configure(models_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "output"))
    built = build(_bucket_folder(tmp_path / "src"), settings={"resolution": 128, "mode": "buckets",
                                                              "bucket_step": 16})
    caches = []
    real_build = cache_mod.LatentCache.build.__func__

    def spy(cls, items, *args, **kwargs):
        caches.append((list(items), real_build(cls, items, *args, **kwargs)))
        return caches[-1][1]

    monkeypatch.setattr(cache_mod.LatentCache, "build", classmethod(spy))
    cfg = TrainConfig(base_model="toy", dataset=built.path, output_name="scaled", steps=2, batch_size=2,
                      resolution=64, rank=4, alpha=4, lr_scheduler="constant", warmup_steps=0, save_every=0,
                      validation_every=0)
    result = train(cfg, components=copy.deepcopy(toy_sd1))

    scaled = Counter("%dx%d" % scale_bucket(tuple(it["bucket"]), 128, 64) for it in built.items)
    assert "64x64" in scaled and all(int(side) % 8 == 0 for size in scaled for side in size.split("x"))
    resolved = json.load(open(os.path.join(result.run_dir, "config.json")))["resolved"]
    assert resolved["dataset_resolution"] == 128 and resolved["train_sizes"] == dict(scaled)
    sizes = ", ".join(f"{k} x{n}" for k, n in sorted(scaled.items(), key=lambda kv: tuple(map(int, kv[0].split("x")))))
    assert result.notes == [f"Dataset built at 128 px, trained at 64 px: buckets scaled to {sizes}."]
    items, cache = caches[0]
    for i, item in enumerate(items):  # latents encoded at the scaled sizes, not the built ones
        w, h = item.bucket
        assert f"{w}x{h}" in scaled and cache.means[i].shape[-2:] == (h // 8, w // 8)
    assert "not its bucket" not in caplog.text  # an intended rescale is no 'edited file' warning


def test_dataset_built_at_the_training_resolution_is_not_rescaled(tmp_path, toy_sd1):
    import copy

    host.configure(models_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "output"))
    built = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    cfg = TrainConfig(base_model="toy", dataset=built.path, output_name="same", steps=1, resolution=64, rank=4,
                      alpha=4, save_every=0, validation_every=0)
    result = train(cfg, components=copy.deepcopy(toy_sd1))
    resolved = json.load(open(os.path.join(result.run_dir, "config.json")))["resolved"]
    assert resolved["train_sizes"] == {"48x80": 1, "64x64": 1, "80x48": 2} and result.notes == []


# ---- config values ---------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("unet_lr", float("nan"), "unet_lr=nan"),
    ("alpha", float("inf"), "alpha=inf"),
    ("noise_offset", float("-inf"), "noise_offset=-inf"),
    ("rank", "x", "rank='x'.*whole number"),
    ("rank", True, "rank=True"),
    ("steps", 200.0, "steps=200.0.*whole number"),
    ("flip", "yes", "flip='yes'.*true or false"),
    ("trigger_word", 3, "trigger_word=3.*string"),
    ("extra", [], "extra=\\[\\].*JSON object"),
    ("weight_decay", -0.1, "weight_decay must not be negative"),
    ("unet_lr", -1e-4, "unet_lr must not be negative"),
])
def test_bad_config_values_name_their_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(base_model="m", dataset="d", **{field: value}).validate()
    with pytest.raises(ConfigError, match=field):  # and so does a JSON config or --set
        TrainConfig.from_dict({"base_model": "m", "dataset": "d", field: value}).validate()


def test_config_json_nan_and_int_for_float(tmp_path):
    (tmp_path / "run.json").write_text('{"alpha": NaN}')
    with pytest.raises(ConfigError, match="alpha=nan"):
        TrainConfig.from_json(str(tmp_path / "run.json"))
    assert TrainConfig.from_dict({"alpha": 2}).alpha == 2.0 and isinstance(TrainConfig.from_dict({"alpha": 2}).alpha,
                                                                           float)
    with pytest.raises(ConfigError, match="JSON object"):
        TrainConfig.from_dict([1, 2])


@pytest.fixture
def host_dirs():
    saved = dict(host._local)
    yield
    host._local.update(saved)


@pytest.mark.parametrize("setting,message", [
    ('rank="x"', "rank='x' is not valid: rank must be a whole number"),
    ("rank=x", "rank='x' is not valid"),
    ("alpha=NaN", "alpha=nan is not valid"),
    ("rank", "--set 'rank' needs the form KEY=VALUE"),
])
def test_cli_set_values_are_type_checked(tmp_path, capsys, host_dirs, setting, message):
    code = cli_main(["--models-dir", str(tmp_path), "--output-dir", str(tmp_path), "train",
                     "--set", "base_model=m", "--set", "dataset=d", "--set", setting])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
