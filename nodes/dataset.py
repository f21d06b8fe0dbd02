"""Dataset nodes: build a training dataset from a folder or from an IMAGE batch, and preview one.

Thin wrappers over trainers/dataset_build/builder.py; the DATASET they output is a dict
{"path", "manifest", "count", "buckets", "class_images", "summary"} that Train LoRA accepts.
"""
from __future__ import annotations


from ..trainers.core import host
from ..trainers.dataset_build.builder import MODES, BuildSettings, build_from_folder, build_from_images
from ..trainers.dataset_build.preview_grid import dataset_preview
from .convert import image_to_pil, pil_to_image
from .paths import folder_fingerprint, node_dataset, node_folder

CATEGORY = "Personalize/dataset"
_D = BuildSettings()


def _settings_inputs() -> dict:
    return {
        "name": ("STRING", {"default": "", "tooltip": "Dataset name: the folder output/personalize/datasets/<name>. "
                                                      "Building the same input again under the same name reuses "
                                                      "the prepared images; a different dataset of that name is "
                                                      "never overwritten (a _2 suffix is added)."}),
        "resolution": ("INT", {"default": _D.resolution, "min": 64, "max": 2048, "step": 8,
                               "tooltip": "Training resolution (512 for SD1.5). Images smaller than this are "
                                          "upscaled with a warning."}),
        "mode": (list(MODES), {"default": _D.mode, "tooltip": "center crop: a square from the middle. pad: the "
                                                               "whole image on a square of its average colour. "
                                                               "buckets: the aspect-ratio bucket nearest each "
                                                               "image (about resolution² pixels), so wide and tall "
                                                               "photos keep their framing."}),
        "face_crop": ("BOOLEAN", {"default": _D.face_crop, "tooltip": "Centre each crop on the largest face "
                                                                      "(OpenCV, offline). Without OpenCV or a "
                                                                      "face the crop stays centred."}),
        "repeats": ("INT", {"default": _D.repeats, "min": 1, "max": 1000,
                            "tooltip": "Times each image appears per epoch (weights this set against others)."}),
        "dedupe": ("BOOLEAN", {"default": _D.dedupe, "tooltip": "Drop near-identical images (perceptual hash); "
                                                                "the summary lists which file duplicates which."}),
    }


def _optional_inputs() -> dict:
    return {
        "class_images_folder": ("STRING", {"default": "", "tooltip": "DreamBooth: a folder of generic images of "
                                                                     "the class (e.g. 'a dog'), recorded with the "
                                                                     "dataset for prior preservation."}),
        "dedupe_threshold": ("INT", {"default": _D.dedupe_threshold, "min": 0, "max": 32,
                                     "tooltip": "How many of 64 hash bits may differ for two images to count as "
                                                "duplicates (0: identical pictures only)."}),
        "bucket_step": ("INT", {"default": _D.bucket_step, "min": 8, "max": 256, "step": 8,
                                "tooltip": "Bucket sides are multiples of this (64 for SD)."}),
        "min_aspect": ("FLOAT", {"default": _D.min_ratio, "min": 0.1, "max": 1.0, "step": 0.05,
                                 "tooltip": "Tallest bucket, as width/height."}),
        "max_aspect": ("FLOAT", {"default": _D.max_ratio, "min": 1.0, "max": 10.0, "step": 0.05,
                                 "tooltip": "Widest bucket, as width/height."}),
        "preview_images": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "Images in the preview grid."}),
    }


def _settings(kw: dict) -> BuildSettings:
    return BuildSettings(resolution=kw["resolution"], mode=kw["mode"], face_crop=kw["face_crop"],
                         repeats=kw["repeats"], dedupe=kw["dedupe"],
                         dedupe_threshold=kw.get("dedupe_threshold", _D.dedupe_threshold),
                         bucket_step=kw.get("bucket_step", _D.bucket_step),
                         min_ratio=kw.get("min_aspect", _D.min_ratio), max_ratio=kw.get("max_aspect", _D.max_ratio))


def _bar_progress():
    bar = host.Progress(1)

    def progress(done, total):
        bar.total = max(total, 1)
        bar.update(done)
    return progress


def _outputs(result, preview_images: int) -> dict:
    value = result.dataset_value()
    grid = pil_to_image(dataset_preview(result.path, max_images=preview_images))
    return {"ui": {"text": [value["summary"]]}, "result": (value, grid, value["summary"])}


class BuildDataset:
    DESCRIPTION = ("Prepare a folder of photos (and same-name .txt captions) for training: EXIF rotation, any "
                   "colour format, crop or aspect buckets, duplicates and broken files removed, a manifest the "
                   "trainers read. Rebuilding unchanged photos is instant.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    OUTPUT_NODE = True
    RETURN_TYPES = ("DATASET", "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "preview", "summary")
    OUTPUT_TOOLTIPS = ("The dataset, for Train LoRA's dataset input.",
                       "A grid of the prepared images with their captions.",
                       "What was built, reused, skipped or found duplicate.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": ("STRING", {"default": "", "tooltip": "Folder of photos; relative paths are "
                                                                             "inside ComfyUI's input folder."}),
                             **_settings_inputs()},
                "optional": _optional_inputs()}

    @classmethod
    def IS_CHANGED(cls, folder=None, class_images_folder="", **kw):
        if folder is None:  # linked from another node: that node decides
            return ""
        return folder_fingerprint(folder, class_images_folder)

    def build(self, folder, name, class_images_folder="", preview_images=16, **kw):
        folder = node_folder(folder, "Image folder")
        class_images = node_folder(class_images_folder, "Class-images folder") or None
        result = build_from_folder(folder, name, _settings(kw), class_images=class_images,
                                   progress=_bar_progress())
        return _outputs(result, preview_images)


class BuildDatasetFromImages:
    DESCRIPTION = ("Prepare an IMAGE batch and its captions (e.g. from BLIP Caption Images: one caption per image, "
                   "or one text with a line per image) into a training dataset.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True  # captions arrive as a list (one per image), not one run per caption
    RETURN_TYPES = ("DATASET", "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "preview", "summary")
    OUTPUT_TOOLTIPS = BuildDataset.OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The training images."}), **_settings_inputs()},
                "optional": {"captions": ("STRING", {"forceInput": True,
                                                     "tooltip": "One caption per image, in order."}),
                             **_optional_inputs()}}

    def build(self, images, captions=None, **kw):
        kw = {k: v[0] if isinstance(v, list) and v else v for k, v in kw.items()}  # widgets: lists of one
        pil = [img for batch in images for img in image_to_pil(batch)]
        captions = list(captions or [])
        if len(captions) == 1 and len(pil) > 1:  # one text with a caption per line
            captions = [line.strip() for line in captions[0].splitlines() if line.strip()]
        result = build_from_images(pil, captions, kw.pop("name"), _settings(kw),
                                   class_images=node_folder(kw.get("class_images_folder"), "Class-images folder") or None,
                                   progress=_bar_progress())
        return _outputs(result, kw.get("preview_images", 16))


class PreviewDataset:
    DESCRIPTION = "A grid of a dataset's prepared images with their captions, size and repeats."
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("preview",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dataset": ("DATASET", {"tooltip": "A dataset from Build Dataset."}),
                             "max_images": ("INT", {"default": 16, "min": 1, "max": 256}),
                             "columns": ("INT", {"default": 4, "min": 1, "max": 16}),
                             "cell": ("INT", {"default": 192, "min": 64, "max": 512, "step": 16,
                                              "tooltip": "Thumbnail size in pixels."})}}

    def preview(self, dataset, max_images, columns, cell):
        folder = node_dataset(dataset)
        return (pil_to_image(dataset_preview(folder, max_images=max_images, columns=columns, cell=cell)),)


NODE_CLASS_MAPPINGS = {
    "PersonalizeBuildDataset": BuildDataset,
    "PersonalizeBuildDatasetFromImages": BuildDatasetFromImages,
    "PersonalizePreviewDataset": PreviewDataset,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizeBuildDataset": "Build Dataset",
    "PersonalizeBuildDatasetFromImages": "Build Dataset From Images",
    "PersonalizePreviewDataset": "Preview Dataset",
}
