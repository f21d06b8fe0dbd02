"""BLIP captioning nodes: caption an IMAGE batch, caption a folder, unload the model.

The engine (trainers/captioning/) is imported inside the functions, so loading the
pack stays cheap; transformers is imported only when a caption is asked for.
"""
from __future__ import annotations

from ..trainers.core import host
from .paths import folder_fingerprint, node_folder
from .unload import UnloadNode

CATEGORY = "Personalize/dataset"
HUB_CHOICE = "(use hub id)"
_MODEL_MARKERS = ("config.json",)


def _model_choices() -> list[str]:
    host.register_model_folder("blip")
    # Folders only (extensions=()): BLIP needs a whole transformers folder, not a weights file.
    return host.list_models("blip", extensions=(), include_dirs=True, dir_markers=_MODEL_MARKERS) + [HUB_CHOICE]


def _model_inputs() -> dict:
    return {
        "model": (_model_choices(), {"tooltip": "A BLIP model folder under models/blip (for example "
                                                "blip-image-captioning-base with its config.json, weights and "
                                                "processor files). BLIP-2 folders work too."}),
        "hub_id": ("STRING", {"default": "", "tooltip": "Optional Hugging Face id such as "
                                                        "Salesforce/blip-image-captioning-large; when set it is "
                                                        "used instead of the folder and downloaded if needed."}),
    }


def _generation_inputs() -> dict:
    return {
        "prompt": ("STRING", {"default": "", "tooltip": "Conditional start given to BLIP, e.g. 'a photo of'. "
                                                        "It steers the caption and is not repeated in it."}),
        "prefix": ("STRING", {"default": "", "tooltip": "Text put before each caption, e.g. your trigger "
                                                        "'a photo of sks person'. Joined with ', '."}),
        "suffix": ("STRING", {"default": "", "tooltip": "Text put after each caption. Joined with ', '."}),
        "decoding": (["beam search", "sampling"], {"tooltip": "Beam search gives the likeliest caption; "
                                                              "sampling gives more varied ones (top-p 0.9)."}),
        "num_beams": ("INT", {"default": 3, "min": 1, "max": 16, "tooltip": "Beams for beam search (1: greedy)."}),
        "min_length": ("INT", {"default": 5, "min": 0, "max": 200, "tooltip": "Minimum caption length in tokens."}),
        "max_length": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "Maximum caption length in tokens."}),
        "batch_size": ("INT", {"default": 8, "min": 1, "max": 32, "tooltip": "Images captioned together; "
                                                                           "lower it if memory runs out."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed for sampling."}),
        "device": (["auto", "cpu", "cuda", "mps"], {"tooltip": "auto: the device ComfyUI uses."}),
        "dtype": (["auto", "fp32", "fp16", "bf16"], {"tooltip": "auto: fp16 on CUDA, fp32 elsewhere."}),
        "keep_loaded": ("BOOLEAN", {"default": True, "tooltip": "Keep BLIP in memory for the next run "
                                                                "(ComfyUI still offloads it when others need "
                                                                "the room). Off: free it after this run."}),
    }


def _load(kw: dict):
    from ..trainers.captioning import blip

    name = kw["hub_id"].strip() or ("" if kw["model"] == HUB_CHOICE else kw["model"])
    return blip.load_blip(name, device=kw["device"], dtype=kw["dtype"])


def _generate_options(kw: dict) -> dict:
    return dict(prefix_prompt=kw["prompt"], num_beams=kw["num_beams"], do_sample=kw["decoding"] == "sampling",
                min_length=kw["min_length"], max_length=kw["max_length"], batch_size=kw["batch_size"],
                seed=kw["seed"], check_interrupt=host.check_interrupt)


def _finish(kw: dict) -> None:
    if not kw["keep_loaded"]:
        from ..trainers.captioning import blip
        blip.unload()


class BlipCaptionImages:
    DESCRIPTION = ("Caption each image of a batch with BLIP. Outputs the captions as a list (one per image) "
                   "and as one text with a line per image. The model stays loaded for the next run.")
    CATEGORY = CATEGORY
    FUNCTION = "caption"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("captions", "text")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = ("One caption per image, in order.", "All captions, one per line.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to caption."}),
                             **_model_inputs(), **_generation_inputs()}}

    def caption(self, images, **kw):
        from ..trainers.captioning import blip
        from .convert import image_to_pil

        captioner = _load(kw)
        pil_images = image_to_pil(images)
        bar = host.Progress(len(pil_images))
        captions = blip.caption_images(captioner, pil_images, progress=lambda done, total: bar.update(done),
                                             **_generate_options(kw))
        captions = [blip.apply_affixes(c, kw["prefix"], kw["suffix"]) for c in captions]
        _finish(kw)
        return (captions, "\n".join(captions))


class BlipCaptionFolder:
    DESCRIPTION = ("Caption every image in a folder with BLIP, writing name.txt beside each image. Existing "
                   "captions are kept, overwritten or appended to; unreadable images are skipped and listed "
                   "in the summary. Cancel stops after the current batch; finished files stay complete.")
    CATEGORY = CATEGORY
    FUNCTION = "caption"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("summary", "folder")
    OUTPUT_TOOLTIPS = ("What was captioned, kept and skipped.", "The folder, to chain into dataset nodes.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "", "tooltip": "Folder of images; a relative path is inside ComfyUI's input folder."}),
            "policy": (["keep", "overwrite", "append"], {"tooltip": "For images that already have a .txt: keep "
                                                                    "it (BLIP skips them), overwrite it, or add "
                                                                    "the new caption after it."}),
            **_model_inputs(), **_generation_inputs()}}

    @classmethod
    def IS_CHANGED(cls, folder="", **kw):
        # New or changed photos re-run it; the .txt files it writes itself do not.
        from ..trainers.data.images import IMAGE_EXTENSIONS

        return folder_fingerprint(folder, extensions=IMAGE_EXTENSIONS, write=True)

    def caption(self, folder, policy, **kw):
        from ..trainers.captioning import folders

        folder = node_folder(folder, "Caption folder", write=True)  # caption files are written there
        captioner = _load(kw)
        bar = host.Progress(1)

        def progress(done, total):
            bar.total = max(total, 1)
            bar.update(done)

        report = folders.caption_folder(captioner, folder, policy=policy, prefix=kw["prefix"],
                                        suffix=kw["suffix"], progress=progress, **_generate_options(kw))
        _finish(kw)
        summary = report.summary()
        return {"ui": {"text": [summary]}, "result": (summary, report.folder)}


class UnloadBlip(UnloadNode):
    DESCRIPTION = "Free the BLIP captioning model from memory (it otherwise stays loaded between runs)."
    CATEGORY = CATEGORY
    AFTER = "Connect a caption output to unload after it."
    DONE, NOTHING = "BLIP unloaded.", "No BLIP model was loaded."

    def release(self) -> bool:
        from ..trainers.captioning import blip

        return blip.unload()


NODE_CLASS_MAPPINGS = {
    "PersonalizeBlipCaptionImages": BlipCaptionImages,
    "PersonalizeBlipCaptionFolder": BlipCaptionFolder,
    "PersonalizeUnloadBlip": UnloadBlip,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizeBlipCaptionImages": "BLIP Caption Images",
    "PersonalizeBlipCaptionFolder": "BLIP Caption Folder",
    "PersonalizeUnloadBlip": "Unload BLIP",
}
