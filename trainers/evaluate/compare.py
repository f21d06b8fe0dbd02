"""Compare models on one prompt set: DreamBench scores per model, written as a table (markdown, JSON, CSV), a bar
chart per metric and a labelled grid of the images.

Each model's images come prompt-major: the first k images answer prompts[0], the next k prompts[1], and so on
(what ComfyUI's samplers give for a batch of k per prompt with the same seeds for every model). Prompts holding
the identifier are subject prompts (DINO, CLIP-I, CLIP-T, DIV); the others, like "a photo of a dog", are class
prompts, scored by PRES. The subject photos also get a row of their own: their similarity among themselves, the
"real images" ceiling of the paper's table.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field

from ..core import host, safe_io
from . import dreambench

METRICS = ("DINO", "CLIP-I", "CLIP-T", "DIV", "PRES")
PHOTOS = "subject photos"


class CompareError(ValueError):
    pass


@dataclass
class ModelImages:
    label: str
    images: list  # PIL images, prompt-major


@dataclass
class Report:
    prompts: list[str]
    per_prompt: int
    scores: dict = field(default_factory=dict)  # label -> {metric: Score}
    extra: dict = field(default_factory=dict)  # label -> {column: value} (inference cost, file size...)

    def columns(self) -> list[str]:
        metrics = [m for m in METRICS if any(m in row for row in self.scores.values())]
        extra = [c for row in self.extra.values() for c in row]
        return metrics + list(dict.fromkeys(extra))

    def labels(self) -> list[str]:
        return list(dict.fromkeys([*self.scores, *self.extra]))

    def value(self, label: str, column: str):
        score = self.scores.get(label, {}).get(column)
        return score.value if score is not None else self.extra.get(label, {}).get(column)

    def backbones(self) -> dict[str, str]:
        return {m: s.backbone for row in self.scores.values() for m, s in row.items()}

    def cells(self) -> dict:
        """The table as text cells ("-" where a model has no value) and its note: what markdown() prints, and
        what the canvas draws as HTML."""
        cols = self.columns()
        notes = [f"{m}: {b}" for m, b in self.backbones().items()]
        return {"header": ["model", *cols],
                "rows": [[label, *(_cell(self.value(label, c)) for c in cols)] for label in self.labels()],
                "note": "Backbones: " + ", ".join(notes) + ". PRES: lower is better; the others: higher."
                        if notes else ""}

    def markdown(self) -> str:
        table = self.cells()
        lines = ["| " + " | ".join(table["header"]) + " |", "|---" * len(table["header"]) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
        return "\n".join(lines + (["", table["note"]] if table["note"] else []))

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "images_per_prompt": self.per_prompt,
                "models": {label: {**{m: {"value": s.value, "backbone": s.backbone, "count": s.count}
                                      for m, s in self.scores.get(label, {}).items()},
                                   **self.extra.get(label, {})} for label in self.labels()}}

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        cols = self.columns()
        writer.writerow(["model", *cols])
        for label in self.labels():
            writer.writerow([label, *("" if (v := self.value(label, c)) is None else v for c in cols)])
        return out.getvalue()


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def split_by_prompt(model: ModelImages, prompts: list[str]) -> list[list]:
    if not prompts:
        raise CompareError("No prompts were given: write one prompt per line, in the order the images were made.")
    if not model.images or len(model.images) % len(prompts):
        raise CompareError(f"'{model.label}' has {len(model.images)} images for {len(prompts)} prompts: give every "
                           f"model the same number of images per prompt, prompt by prompt.")
    k = len(model.images) // len(prompts)
    return [model.images[i * k:(i + 1) * k] for i in range(len(prompts))]


def compare(models: list[ModelImages], prompts: list[str], references: list, *, identifier: str, class_noun: str,
            clip=None, dino=None, lpips=None, progress=None) -> Report:
    """Score every model (backbones left None are skipped); `progress(done, total)` after each model."""
    groups = {m.label: split_by_prompt(m, prompts) for m in models}
    sizes = {len(g[0]) for g in groups.values()}
    if len(sizes) > 1:
        raise CompareError(f"The models have different numbers of images per prompt ({sorted(sizes)}); sample "
                           f"each with the same batch size and seeds.")
    subject = [i for i, p in enumerate(prompts) if not identifier.strip() or _mentions(p, identifier)]
    classes = [i for i in range(len(prompts)) if i not in subject]
    if (dino or clip) and not references:
        raise CompareError("No subject photos were given: DINO, CLIP-I and PRES compare against them.")
    report = Report(prompts=prompts, per_prompt=sizes.pop())
    for n, model in enumerate(models, 1):
        by_prompt = groups[model.label]
        images = [im for i in subject for im in by_prompt[i]]
        row = {}
        if images and dino:
            row["DINO"] = dreambench.similarity(dino, images, references)
        if images and clip:
            row["CLIP-I"] = dreambench.similarity(clip, images, references)
            texts = [dreambench.neutral_prompt(prompts[i], identifier, class_noun) for i in subject
                     for _ in by_prompt[i]]
            row["CLIP-T"] = dreambench.clip_t(clip, images, texts)
        if images and lpips:
            row["DIV"] = dreambench.diversity(lpips, [by_prompt[i] for i in subject])
        if classes and dino:
            row["PRES"] = dreambench.similarity(dino, [im for i in classes for im in by_prompt[i]], references)
        report.scores[model.label] = row
        if progress:
            progress(n, len(models))
    photos = {}
    if dino and len(references) > 1:
        photos["DINO"] = dreambench.self_similarity(dino, references)
    if clip and len(references) > 1:
        photos["CLIP-I"] = dreambench.self_similarity(clip, references)
    if photos:
        report.scores[PHOTOS] = photos
    return report


def _mentions(prompt: str, identifier: str) -> bool:
    return re.search(rf"\b{re.escape(identifier.strip())}\b", prompt) is not None


def write_report(report: Report, name: str, images: dict | None = None) -> str:
    """output/personalize/compare/<name>/ (or <name>_2...: results are never overwritten) with report.json,
    report.csv, report.md and the given PNG images ({file stem: PIL image}). Returns the folder."""
    root = os.path.join(host.output_dir(), "personalize", "compare")
    os.makedirs(root, exist_ok=True)
    stem = safe_io.sanitize_name(name, "compare")
    for folder in safe_io.numbered_names(root, stem):
        try:
            os.mkdir(folder)  # exclusive: a folder another run has taken is skipped
            break
        except FileExistsError:
            continue
    safe_io.write_json(os.path.join(folder, "report.json"), report.to_json())
    safe_io.write_text(os.path.join(folder, "report.csv"), report.csv())
    safe_io.write_text(os.path.join(folder, "report.md"), report.markdown() + "\n")
    for stem, image in (images or {}).items():
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        safe_io.write_bytes(os.path.join(folder, safe_io.sanitize_name(stem) + ".png"), buf.getvalue())
    return folder


def publish(report: Report, models: list[ModelImages], name: str) -> tuple[str, dict, object]:
    """Draw a bar chart per metric and the grid, and write them with the report (write_report).
    Returns (folder, {metric: chart}, grid)."""
    from .charts import bar_chart, image_grid

    backbones = report.backbones()
    charts = {m: bar_chart(m, {label: report.value(label, m) for label in report.labels()}, backbones.get(m, ""))
              for m in report.columns() if m in METRICS}
    grid = image_grid({m.label: split_by_prompt(m, report.prompts) for m in models}, report.prompts)
    folder = write_report(report, name, {**{f"chart_{m}": c for m, c in charts.items()}, "grid": grid})
    return folder, charts, grid
