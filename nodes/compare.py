"""Compare Models: DreamBench scores of labelled image batches (base, LoRA, DreamBooth...) made by ComfyUI's own
samplers with the same prompts and seeds, as a table, bar charts and a labelled grid; and Unload Metric Models.

The engine (trainers/evaluate/) is imported inside the functions, so loading the pack stays cheap.
"""
from __future__ import annotations

import os

from ..trainers.core import host
from .benchmark import COST
from .unload import UnloadNode

CATEGORY = "Personalize/compare"
NONE = "(none)"
MODELS = 4  # labelled image inputs: two required, the rest optional
_LETTERS = "abcdef"[:MODELS]


def _backbone_choices(kind: str) -> tuple[list[str], dict]:
    """The folders under models/metrics, the papers' hub id when the server owner allows downloads, and (none)."""
    from ..trainers.core import path_policy
    from ..trainers.evaluate.backbones import DEFAULTS, HUB_IDS, list_metric_models

    names = list_metric_models()
    hub = [HUB_IDS[kind]] if kind in HUB_IDS and path_policy.hub_allowed() else []
    default = DEFAULTS[kind] if DEFAULTS[kind] in names else (hub or [NONE])[0]
    return names + hub + [NONE], {"default": default}


def _backbone_input(kind: str, what: str) -> tuple:
    choices, options = _backbone_choices(kind)
    return (choices, {**options, "tooltip": f"{what} Folder under models/metrics in Hugging Face layout (or the hub "
                                            f"id, listed when downloads are allowed); {NONE}: skip these scores."})


def _model_inputs(letter: str, label: str, required: bool) -> dict:
    which = "" if required else " (optional)"
    return {f"images_{letter}": ("IMAGE", {"tooltip": f"A model's images{which}: for each prompt in order, the "
                                                      f"same number of images, with the same seeds as the others."}),
            f"label_{letter}": ("STRING", {"default": label, "tooltip": "The model's name in the table."})}


class CompareModels:
    DESCRIPTION = ("Score two or more models on the same prompts with the DreamBench metrics: DINO and CLIP-I "
                   "(likeness to the subject photos), CLIP-T (likeness to the prompt, the identifier read as the "
                   "class noun), DIV (variety among one prompt's images) and PRES (class-prompt images that still "
                   "look like the subject: lower is better). Writes report.md/.json/.csv and the pictures to "
                   "output/personalize/compare/<name>/.")
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("table", "charts", "grid", "folder")
    OUTPUT_TOOLTIPS = ("The scores as a markdown table.", "One bar chart per metric.",
                       "Rows: prompts; columns: models (each prompt's first image).", "Where the report was written.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        required = {**_model_inputs("a", "base", True), **_model_inputs("b", "tuned", True)}
        optional = {}
        for letter in _LETTERS[2:]:
            optional.update(_model_inputs(letter, f"model {letter}", False))
        for letter in _LETTERS:
            optional[f"cost_{letter}"] = (COST, {"tooltip": f"Optional: Benchmark Sampling's measurement of model "
                                                            f"{letter}, added to its row."})
        return {
            "required": {
                **required,
                "prompts": ("STRING", {"multiline": True, "default": "a photo of sks dog on the beach\n"
                                                                     "a photo of a dog",
                                       "tooltip": "One prompt per line, in the order the images were made. "
                                                  "Lines with the identifier score the subject; lines without "
                                                  "it (e.g. 'a photo of a dog') score PRES."}),
                "identifier": ("STRING", {"default": "sks", "tooltip": "The trigger word the models learnt."}),
                "class_noun": ("STRING", {"default": "dog", "tooltip": "The subject's class (dog, man, backpack)."}),
                "clip_model": _backbone_input("clip", "CLIP for CLIP-I and CLIP-T (the papers: "
                                                      "openai/clip-vit-base-patch32)."),
                "dino_model": _backbone_input("dino", "DINO for DINO and PRES (the papers: facebook/dino-vits16)."),
                "lpips_model": _backbone_input("lpips", "LPIPS (AlexNet) for DIV: alexnet weights and the lpips "
                                                        "package's alex.pth."),
                "name": ("STRING", {"default": "compare", "tooltip": "Report folder name (never overwritten: "
                                                                     "_2, _3... are added)."}),
            },
            "optional": {
                "subject_photos": ("IMAGE", {"tooltip": "The real photos of the subject (e.g. the training "
                                                        "photos, or held-out ones), as an IMAGE batch..."}),
                "subject_folder": ("STRING", {"default": "", "tooltip": "...or a folder of them (e.g. the training "
                                                                        "photos' folder, inside ComfyUI's input "
                                                                        "folder). Both: all are used."}),
                **optional,
            },
        }

    def compare(self, prompts, identifier, class_noun, clip_model, dino_model, lpips_model, name,
                subject_photos=None, subject_folder="", **inputs):
        from ..trainers.evaluate import backbones, charts, compare
        from .convert import image_to_pil, pil_to_image

        models = [compare.ModelImages(inputs.get(f"label_{x}") or x, image_to_pil(inputs[f"images_{x}"]))
                  for x in _LETTERS if inputs.get(f"images_{x}") is not None]
        labels = [m.label for m in models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"Two models have the same label ({', '.join(labels)}): give each its own.")
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        chosen = {"clip": clip_model, "dino": dino_model, "lpips": lpips_model}
        loaded = {k: backbones.load_backbone(k, v) for k, v in chosen.items() if v and v != NONE}
        bar = host.Progress(len(models))

        def progress(done, total):
            bar.update(done, text=f"scored {done}/{total} models")
            host.check_interrupt()

        photos = _subject_photos(subject_photos, subject_folder)
        report = compare.compare(models, lines, photos, identifier=identifier,
                                 class_noun=class_noun, progress=progress, **loaded)
        for x in _LETTERS:  # inference cost joins the row of the model it was measured on
            cost = inputs.get(f"cost_{x}")
            if isinstance(cost, dict) and inputs.get(f"images_{x}") is not None:
                report.extra[inputs.get(f"label_{x}") or x] = dict(cost.get("columns", {}))
        folder, pictures, grid = compare.publish(report, models, name)
        table = report.markdown()
        chart_batch = pil_to_image(list(pictures.values())) if pictures else pil_to_image(
            [charts.bar_chart("no metric", {})])
        # "table": the same table as cells, which the canvas renders as HTML (web/live.js); "files": the report's
        # files as /view takes them (the run-workflow client downloads them)
        files = [ref for ref in (host.output_ref(os.path.join(folder, f)) for f in sorted(os.listdir(folder))) if ref]
        ui = {"text": [table], "table": [report.cells()], "files": files}
        return {"ui": ui, "result": (table, chart_batch, pil_to_image(grid), folder)}


def _subject_photos(batch, folder: str) -> list:
    from ..trainers.data.images import list_images
    from .convert import image_to_pil
    from .paths import node_folder

    photos = image_to_pil(batch) if batch is not None else []
    if folder.strip():
        from PIL import Image

        paths, _ = list_images(node_folder(folder.strip(), "Subject photos folder"))
        photos += [Image.open(p).convert("RGB") for p in paths]
    if not photos:
        raise ValueError("No subject photos: connect an IMAGE batch to subject_photos or name their folder in "
                         "subject_folder (inside ComfyUI's input folder).")
    return photos


class UnloadMetricModels(UnloadNode):
    DESCRIPTION = "Free the CLIP, DINO and LPIPS models of Compare Models (they otherwise stay loaded between runs)."
    CATEGORY = CATEGORY
    AFTER = "Connect Compare Models' table to unload after it."
    DONE, NOTHING = "Metric models unloaded.", "No metric model was loaded."

    def release(self) -> bool:
        from ..trainers.evaluate import backbones

        return backbones.unload()


NODE_CLASS_MAPPINGS = {"PersonalizeCompareModels": CompareModels, "PersonalizeUnloadMetricModels": UnloadMetricModels}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeCompareModels": "Compare Models (Personalize)",
                              "PersonalizeUnloadMetricModels": "Unload Metric Models (Personalize)"}
