"""The DreamBench metrics and the comparison report, with tiny random CLIP and DINO folders."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _host_copies
from pack_loader import PACK
from trainers.evaluate import backbones, compare, dreambench
from trainers.evaluate.errors import BackboneError
from trainers.testing.toy_lpips import save_toy_lpips
from trainers.testing.toy_metrics import save_toy_clip, save_toy_dino


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_toy_clip(str(root / "metrics" / "clip-vit-base-patch32"))
    save_toy_dino(str(root / "metrics" / "dino-vits16"))
    save_toy_lpips(str(root / "metrics" / "lpips-alex"))
    return root


@pytest.fixture
def env(metric_models, tmp_path):
    """Both copies of the host (the engine's, and the pack's as ComfyUI imports it) see the toy models."""
    copies = [h for h, _ in _host_copies()]
    saved = [dict(h._local) for h in copies]
    for h in copies:
        h.configure(models_dir=str(metric_models), output_dir=str(tmp_path / "output"))
    yield tmp_path
    for module in (backbones, sys.modules.get(f"{PACK}.trainers.evaluate.backbones")):
        if module is not None:
            module.unload()
    for h, local in zip(copies, saved):
        h._local.update(local)


def picture(seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("prompt, expected", [
    ("a photo of sks dog", "a photo of dog"),
    ("a sks dog on the beach", "a dog on the beach"),
    ("sks wearing a hat", "dog wearing a hat"),
    ("a photo of a dog", "a photo of a dog"),
    ("a sksy dog", "a sksy dog"),  # only the whole word
])
def test_the_identifier_becomes_the_class_noun_for_clip_t(prompt, expected):
    assert dreambench.neutral_prompt(prompt, "sks", "dog") == expected


def test_similarity_is_the_mean_cosine_over_every_pair(env):
    dino = backbones.load_backbone("dino")
    a, b, c = picture(1), picture(2), picture(3)
    e = dino.embed_images([a, b, c])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    score = dreambench.similarity(dino, [a, b], [c, a])
    expected = ((e[0] @ e[2]) + (e[0] @ e[0]) + (e[1] @ e[2]) + (e[1] @ e[0])).item() / 4
    assert score.value == pytest.approx(expected, abs=1e-6) and score.count == 4
    assert score.backbone == "dino-vits16"
    assert dreambench.similarity(dino, [a], [a]).value == pytest.approx(1.0, abs=1e-5)


def test_clip_t_matches_clips_own_image_text_logits(env):
    clip = backbones.load_backbone("clip")
    images, prompts = [picture(4), picture(5)], ["a dog", "a red ball on grass"]
    score = dreambench.clip_t(clip, images, prompts)
    inputs = clip.processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)
    cosines = out.logits_per_image.diagonal() / clip.model.logit_scale.exp()
    assert score.value == pytest.approx(cosines.mean().item(), abs=1e-5) and score.count == 2


def test_compare_scores_subject_prompts_and_uses_class_prompts_for_pres(env):
    clip, dino = backbones.load_backbone("clip"), backbones.load_backbone("dino")
    photos = [picture(10), picture(11)]
    prompts = ["a sks dog on the beach", "a photo of a dog"]
    base = compare.ModelImages("base", [picture(20), picture(21), picture(22), picture(23)])
    # The tuned model's class-prompt images are the photos themselves: PRES must be their mean similarity.
    tuned = compare.ModelImages("tuned", [picture(30), picture(31), *photos])
    report = compare.compare([base, tuned], prompts, photos, identifier="sks", class_noun="dog", clip=clip, dino=dino)
    assert report.per_prompt == 2
    e = dino.embed_images(photos)
    assert report.scores["tuned"]["PRES"].value == pytest.approx((e @ e.T).mean().item(), abs=1e-5)
    subject = dreambench.similarity(dino, [picture(30), picture(31)], photos)
    assert report.scores["tuned"]["DINO"].value == pytest.approx(subject.value, abs=1e-6)
    clip_t = dreambench.clip_t(clip, [picture(20), picture(21)], ["a dog on the beach"] * 2)
    assert report.scores["base"]["CLIP-T"].value == pytest.approx(clip_t.value, abs=1e-6)
    assert report.scores[compare.PHOTOS]["DINO"].value == pytest.approx((e[0] @ e[1]).item(), abs=1e-5)
    assert "DIV" not in report.scores["base"]  # no LPIPS model given


def test_div_is_the_mean_pairwise_lpips_within_each_prompt(env):
    lpips = backbones.load_backbone("lpips")
    a, b, c = picture(1, (64, 64)), picture(2, (64, 64)), picture(3, (64, 64))
    assert dreambench.diversity(lpips, [[a, a, a]]).value == pytest.approx(0.0, abs=1e-6)
    x = dreambench._to_lpips_input([a, b, c])
    d = lambda i, j: lpips.model(x[i:i + 1], x[j:j + 1]).item()  # noqa: E731
    score = dreambench.diversity(lpips, [[a, b, c], [a, b], [c]])  # a lone image has no pair: skipped
    expected = ((d(0, 1) + d(0, 2) + d(1, 2)) / 3 + d(0, 1)) / 2
    assert score.value == pytest.approx(expected, rel=1e-5) and score.count == 4 and score.value > 0
    report = compare.compare([compare.ModelImages("m", [a, b, c, a])], ["a sks dog", "a sks cat"], [a],
                             identifier="sks", class_noun="dog", lpips=lpips)
    assert report.scores["m"]["DIV"].value == pytest.approx((d(0, 1) + d(2, 0)) / 2, rel=1e-5)


def test_image_counts_that_do_not_fit_the_prompts_are_refused(env):
    prompts = ["a sks dog", "a photo of a dog"]
    with pytest.raises(compare.CompareError, match="'odd' has 3 images for 2 prompts"):
        compare.compare([compare.ModelImages("odd", [picture(i) for i in range(3)])], prompts, [picture(9)],
                        identifier="sks", class_noun="dog")
    with pytest.raises(compare.CompareError, match="different numbers of images per prompt"):
        compare.compare([compare.ModelImages("a", [picture(i) for i in range(2)]),
                         compare.ModelImages("b", [picture(i) for i in range(4)])], prompts, [picture(9)],
                        identifier="sks", class_noun="dog")


def test_report_files_are_written_and_never_overwritten(env):
    dino = backbones.load_backbone("dino")
    report = compare.compare([compare.ModelImages("base", [picture(1), picture(2)])], ["a sks dog"],
                             [picture(3)], identifier="sks", class_noun="dog", dino=dino)
    report.extra["base"] = {"s/image": 1.25}
    first = compare.write_report(report, "dog run", {"grid": picture(4)})
    second = compare.write_report(report, "dog run")
    assert os.path.basename(first) == "dog run" and os.path.basename(second) == "dog run_2"
    assert sorted(os.listdir(first)) == ["grid.png", "report.csv", "report.json", "report.md"]
    data = json.loads(open(os.path.join(first, "report.json")).read())
    assert data["models"]["base"]["DINO"]["backbone"] == "dino-vits16"
    assert data["models"]["base"]["s/image"] == 1.25
    md = open(os.path.join(first, "report.md")).read()
    assert md.splitlines()[0] == "| model | DINO | s/image |" and "| base |" in md
    rows = open(os.path.join(first, "report.csv")).read().splitlines()
    assert rows[0] == "model,DINO,s/image" and rows[1].startswith("base,")


def test_a_missing_backbone_names_the_folder_and_the_files(env, metric_models):
    with pytest.raises(BackboneError, match=r"config.json.*into .*metrics"):
        backbones.load_backbone("clip", "clip-vit-large-patch14")
    with pytest.raises(BackboneError, match="is a 'vit' model, not a CLIP model"):
        backbones.load_backbone("clip", "dino-vits16")
    assert backbones.list_metric_models() == ["clip-vit-base-patch32", "dino-vits16", "lpips-alex"]


def test_backbones_are_loaded_once_and_unloaded(env):
    first = backbones.load_backbone("dino")
    assert backbones.load_backbone("dino") is first
    assert backbones.unload() is True and first.model is None
    assert backbones.load_backbone("dino") is not first


def test_charts_draw_every_model():
    from trainers.evaluate.charts import bar_chart, image_grid

    chart = bar_chart("DINO", {"base": 0.4, "tuned": 0.7, "none": float("nan")})
    assert chart.size == (512, 256) and len(set(chart.getdata())) > 3
    grid = image_grid({"base": [[picture(1)], [picture(2)]], "tuned": [[picture(3)], [picture(4)]]},
                      ["a sks dog", "a photo of a dog"], cell=64)
    assert grid.size == (180 + 2 * 64, 22 + 2 * 64)


def test_compare_node_scores_image_batches_and_writes_the_report(env):
    import importlib

    from pack_loader import load_pack

    node = load_pack().NODE_CLASS_MAPPINGS["PersonalizeCompareModels"]
    pil_to_image = importlib.import_module(PACK + ".nodes.convert").pil_to_image
    inputs = node.INPUT_TYPES()
    assert inputs["required"]["clip_model"][1]["default"] == "clip-vit-base-patch32"
    assert inputs["required"]["lpips_model"][0][-1] == "(none)"
    batch = lambda *seeds: pil_to_image([picture(s, (64, 64)) for s in seeds])  # noqa: E731
    out = node().compare(subject_photos=batch(1, 2), prompts="a sks dog on the beach\n\na photo of a dog\n",
                         identifier="sks", class_noun="dog", clip_model="clip-vit-base-patch32",
                         dino_model="dino-vits16", lpips_model="lpips-alex", name="run",
                         images_a=batch(3, 4, 5, 6), label_a="base", images_b=batch(7, 8, 9, 10), label_b="lora")
    table, charts, grid, folder = out["result"]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:5]] == ["| base", "| lora", "| subject photos"]
    assert "| model | DINO | CLIP-I | CLIP-T | DIV | PRES |" == table.splitlines()[0]
    assert charts.shape == (5, 256, 512, 3) and grid.shape[0] == 1
    assert sorted(os.listdir(folder)) == sorted(["report.json", "report.csv", "report.md", "grid.png"] +
                                                [f"chart_{m}.png" for m in compare.METRICS])
    photos = env / "photos"
    photos.mkdir()
    picture(11, (64, 64)).save(photos / "a.png")
    out = node().compare(subject_folder=str(photos), prompts="a sks dog", identifier="sks", class_noun="dog",
                         clip_model="(none)", dino_model="dino-vits16", lpips_model="(none)", name="folder",
                         images_a=batch(3), label_a="base", images_b=batch(4), label_b="lora")
    assert "| base |" in out["result"][0]
    with pytest.raises(ValueError, match="No subject photos"):
        node().compare(prompts="a sks dog", identifier="sks", class_noun="dog", clip_model="(none)",
                       dino_model="dino-vits16", lpips_model="(none)", name="x", images_a=batch(3), images_b=batch(4))
    with pytest.raises(ValueError, match="same label"):
        node().compare(subject_photos=batch(1), prompts="a sks dog", identifier="sks", class_noun="dog",
                       clip_model="(none)", dino_model="dino-vits16", lpips_model="(none)", name="x",
                       images_a=batch(3), label_a="same", images_b=batch(4), label_b="same")


def test_compare_command_scores_image_folders(env, metric_models, tmp_path, capsys):
    from trainers.cli.main import main

    for folder, seeds in (("base", (1, 2, 3, 4)), ("lora", (5, 6, 7, 8)), ("photos", (9, 10))):
        (tmp_path / folder).mkdir()
        for n, seed in enumerate(seeds):
            picture(seed, (64, 64)).save(tmp_path / folder / f"{n:03d}.png")
    (tmp_path / "prompts.txt").write_text("a sks dog on the beach\na photo of a dog\n")
    code = main(["--models-dir", str(metric_models), "--output-dir",
                 str(tmp_path / "out"), "compare", "--model", f"base={tmp_path / 'base'}", "--model",
                 f"lora={tmp_path / 'lora'}", "--photos", str(tmp_path / "photos"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--class-noun", "dog", "--name", "cli"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0] == "| model | DINO | CLIP-I | CLIP-T | DIV | PRES |"
    assert os.path.isfile(tmp_path / "out" / "personalize" / "compare" / "cli" / "report.json")
    assert main(["compare", "--model", "nolabel", "--photos", "x", "--prompts", "y", "--class-noun", "dog"]) == 2


@pytest.mark.parametrize("allowed", [False, True])
def test_the_papers_hub_ids_are_offered_only_when_downloads_are_allowed(env, monkeypatch, allowed):
    from pack_loader import load_pack

    node = load_pack().NODE_CLASS_MAPPINGS["PersonalizeCompareModels"]
    monkeypatch.setattr(sys.modules[f"{PACK}.trainers.core.path_policy"], "hub_allowed", lambda: allowed)
    choices = node.INPUT_TYPES()["required"]["dino_model"][0]
    assert ("facebook/dino-vits16" in choices) is allowed
    assert "openai/clip-vit-base-patch32" in node.INPUT_TYPES()["required"]["clip_model"][0] if allowed else True
    assert not any("/" in c for c in node.INPUT_TYPES()["required"]["lpips_model"][0])  # LPIPS is not on the hub
