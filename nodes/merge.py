"""Merge nodes: thin nodes over trainers/merge (bake, mix, re-rank, extract). Each writes a new file where the
standard loaders find it and returns its name, with a summary (ranks, kept energy, errors) under the node."""
from __future__ import annotations

import os

from ..trainers.core import host
from .linked_model import validate_linked

NONE = "(none)"
_STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
_DEVICE = (["auto", "cpu"], {"default": "auto", "tooltip": "Where the arithmetic runs, module by module in fp32: auto "
                                                           "is ComfyUI's device (the GPU when there is one)."})


def _rank(default: int, tooltip: str) -> tuple:
    return ("INT", {"default": default, "min": 1, "max": 1024, "tooltip": tooltip})


def _output(default: str, folder: str) -> tuple:
    return ("STRING", {"default": default, "tooltip": f"Name of the new file in models/{folder}; an existing file "
                                                      f"is never overwritten (a _2 suffix is added)."})


def _loras(optional: bool = False) -> list:
    return ([NONE] if optional else []) + host.list_models("loras")


class MergeNode:
    CATEGORY = "Personalize/merge"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)

    def finish(self, result, folder: str) -> dict:
        name = os.path.relpath(result.path, host.model_dirs(folder)[0]).replace(os.sep, "/")
        return {"ui": {"text": [result.summary()]}, "result": (name,)}


def _device(choice: str):
    return "cpu" if choice == "cpu" else host.torch_device()


def _progress(total_hint: int = 1):
    bar = host.Progress(total_hint)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)
    return update


class TakesTrainedLoRA(MergeNode):
    """A merge node whose `lora_name` may come by link (`trained_lora`) from a trainer that has not written it yet."""

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name, input_types):
        return validate_linked(cls, "lora_name", lora_name, "trained_lora", "loras", input_types)


class BakeLoRA(TakesTrainedLoRA):
    DESCRIPTION = ("Bake one to three LoRA/LoHa/LoKr files into a checkpoint at the strengths given (diffusion model "
                   "and text encoders apart), written as a new checkpoint in models/checkpoints that any loader reads "
                   "and that samples as the checkpoint with the LoRAs applied.")
    RETURN_NAMES = ("ckpt_name",)
    OUTPUT_TOOLTIPS = ("File name of the baked checkpoint in models/checkpoints (link it to Load Trained Checkpoint).",)

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in (2, 3):
            optional[f"lora_{i}"] = (_loras(True), {"default": NONE, "tooltip": "Another adapter to bake in."})
            optional[f"strength_model_{i}"] = ("FLOAT", {**_STRENGTH, "tooltip": "Its strength on the diffusion model."})
            optional[f"strength_clip_{i}"] = ("FLOAT", {**_STRENGTH, "tooltip": "Its strength on the text encoders."})
        return {
            "required": {
                "ckpt_name": (host.list_models("checkpoints"), {"tooltip": "The base checkpoint (.safetensors)."}),
                "lora_name": (_loras(), {"tooltip": "The adapter to bake in (LoRA, LoCon, LoHa, LoKr; kohya, "
                                                    "LyCORIS, diffusers or ComfyUI key names)."}),
                "strength_model": ("FLOAT", {**_STRENGTH, "tooltip": "Strength on the diffusion model, as in "
                                                                     "LoraLoader."}),
                "strength_clip": ("FLOAT", {**_STRENGTH, "tooltip": "Strength on the text encoders."}),
                "output_name": _output("baked", "checkpoints"),
            },
            "optional": {
                "trained_lora": ("STRING", {"forceInput": True, "tooltip": "Link 'lora_name' from Train LoRA to bake "
                                                                           "the file it just wrote (overrides lora_name)."}),
                **optional,
                "device": _DEVICE,
            },
        }

    def run(self, ckpt_name, lora_name, strength_model, strength_clip, output_name, trained_lora=None,
            device="auto", **more):
        from ..trainers.merge.bake import bake

        adapters = [(host.resolve_model("loras", trained_lora or lora_name), strength_model, strength_clip)]
        for i in (2, 3):
            name = more.get(f"lora_{i}", NONE)
            if name and name != NONE:
                adapters.append((host.resolve_model("loras", name), more.get(f"strength_model_{i}", 1.0),
                                 more.get(f"strength_clip_{i}", 1.0)))
        result = bake(host.resolve_model("checkpoints", ckpt_name), adapters, output_name, device=_device(device),
                      progress=_progress())
        return self.finish(result, "checkpoints")


class MixLoRAs(MergeNode):
    DESCRIPTION = ("Mix two to four adapters with weights into one LoRA: exact (LoRA factors stacked, ranks add up) "
                   "or compressed to a rank or an energy share by SVD; the summary gives the error per module and in "
                   "total. The checkpoint names the model they belong to (it gives the modules' shapes).")
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("File name of the mixed LoRA in models/loras.",)

    @classmethod
    def INPUT_TYPES(cls):
        weight = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Its weight in the mix."}
        return {
            "required": {
                "ckpt_name": (host.list_models("checkpoints"), {"tooltip": "The base model the adapters were trained on."}),
                "lora_a": (_loras(), {"tooltip": "An adapter to mix."}),
                "weight_a": ("FLOAT", weight),
                "lora_b": (_loras(), {"tooltip": "An adapter to mix."}),
                "weight_b": ("FLOAT", weight),
                "mode": (["exact", "rank", "energy"], {"default": "exact", "tooltip": "exact: no approximation (the "
                         "ranks add up); rank: every module at `rank`; energy: each module at the smallest rank "
                         "keeping `energy` of its change (at most `rank`)."}),
                "rank": _rank(16, "The rank of the result (mode rank), or its cap (mode energy)."),
                "energy": ("FLOAT", {"default": 0.95, "min": 0.01, "max": 1.0, "step": 0.01,
                                     "tooltip": "Mode energy: the share of each module's change to keep."}),
                "output_name": _output("mixed", "loras"),
            },
            "optional": {
                "lora_c": (_loras(True), {"default": NONE, "tooltip": "Another adapter to mix."}),
                "weight_c": ("FLOAT", weight),
                "lora_d": (_loras(True), {"default": NONE, "tooltip": "Another adapter to mix."}),
                "weight_d": ("FLOAT", weight),
                "device": _DEVICE,
            },
        }

    def run(self, ckpt_name, lora_a, weight_a, lora_b, weight_b, mode, rank, energy, output_name, lora_c=NONE,
            weight_c=1.0, lora_d=NONE, weight_d=1.0, device="auto"):
        from ..trainers.merge.combine import mix

        chosen = [(lora_a, weight_a), (lora_b, weight_b), (lora_c, weight_c), (lora_d, weight_d)]
        adapters = [(host.resolve_model("loras", name), weight) for name, weight in chosen if name and name != NONE]
        result = mix(host.resolve_model("checkpoints", ckpt_name), adapters, output_name,
                     rank=None if mode == "exact" else rank, energy=energy if mode == "energy" else None,
                     device=_device(device), progress=_progress())
        return self.finish(result, "loras")


class RerankLoRA(TakesTrainedLoRA):
    DESCRIPTION = ("Cut an adapter down to a lower rank (or each module to the smallest rank keeping an energy "
                   "share) by SVD, as a kohya LoRA; the summary gives the kept energy.")
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("File name of the re-ranked LoRA in models/loras.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (host.list_models("checkpoints"), {"tooltip": "The base model the adapter was trained on."}),
                "lora_name": (_loras(), {"tooltip": "The adapter to re-rank."}),
                "mode": (["rank", "energy"], {"default": "rank", "tooltip": "rank: every module at `rank`; energy: "
                         "each module at the smallest rank keeping `energy` of its change (at most `rank`)."}),
                "rank": _rank(8, "The new rank (mode rank), or its cap (mode energy)."),
                "energy": ("FLOAT", {"default": 0.95, "min": 0.01, "max": 1.0, "step": 0.01,
                                     "tooltip": "Mode energy: the share of each module's change to keep."}),
                "output_name": _output("reranked", "loras"),
            },
            "optional": {
                "trained_lora": ("STRING", {"forceInput": True, "tooltip": "Link 'lora_name' from Train LoRA to "
                                                                           "re-rank the file it just wrote."}),
                "device": _DEVICE,
            },
        }

    def run(self, ckpt_name, lora_name, mode, rank, energy, output_name, trained_lora=None, device="auto"):
        from ..trainers.merge.combine import rerank

        result = rerank(host.resolve_model("checkpoints", ckpt_name),
                        host.resolve_model("loras", trained_lora or lora_name), output_name,
                        rank=rank, energy=energy if mode == "energy" else None, device=_device(device),
                        progress=_progress())
        return self.finish(result, "loras")


class ExtractLoRA(MergeNode):
    DESCRIPTION = ("Extract a LoRA from a fine-tuned checkpoint (e.g. a DreamBooth result): per module, its "
                   "difference from the base, cut to a rank (or an energy share) by SVD; UNet and text encoders, "
                   "SD1.x and SDXL. The summary gives the kept energy.")
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("File name of the extracted LoRA in models/loras.",)

    @classmethod
    def INPUT_TYPES(cls):
        checkpoints = host.list_models("checkpoints")
        return {
            "required": {
                "ckpt_name": (checkpoints, {"tooltip": "The base the fine-tune was trained from."}),
                "tuned_ckpt_name": (checkpoints, {"tooltip": "The fine-tuned checkpoint."}),
                "rank": _rank(32, "The LoRA's rank (with energy above 0: the most any module gets)."),
                "conv_rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "Rank of the 3x3 convs "
                                      "(kohya's conv_dim, LoCon); 0 leaves them out."}),
                "energy": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "0: every "
                           "module at `rank`; above 0: each module at the smallest rank keeping this share of its "
                           "change's energy (e.g. 0.9)."}),
                "output_name": _output("extracted", "loras"),
            },
            "optional": {
                "trained_checkpoint": ("STRING", {"forceInput": True, "tooltip": "Link 'model_name' from Train "
                                       "DreamBooth to extract from the checkpoint it just wrote (overrides "
                                       "tuned_ckpt_name)."}),
                "device": _DEVICE,
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tuned_ckpt_name, input_types):
        return validate_linked(cls, "tuned_ckpt_name", tuned_ckpt_name, "trained_checkpoint", "checkpoints",
                               input_types)

    def run(self, ckpt_name, tuned_ckpt_name, rank, conv_rank, energy, output_name, trained_checkpoint=None,
            device="auto"):
        from ..trainers.merge.extract import extract

        result = extract(host.resolve_model("checkpoints", ckpt_name),
                         host.resolve_model("checkpoints", trained_checkpoint or tuned_ckpt_name), output_name,
                         rank=rank, energy=energy or None, conv_rank=conv_rank, device=_device(device),
                         progress=_progress())
        return self.finish(result, "loras")


NODE_CLASS_MAPPINGS = {"PersonalizeBakeLoRA": BakeLoRA, "PersonalizeMixLoRAs": MixLoRAs,
                       "PersonalizeRerankLoRA": RerankLoRA, "PersonalizeExtractLoRA": ExtractLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeBakeLoRA": "Bake LoRA into Checkpoint (Personalize)",
                              "PersonalizeMixLoRAs": "Mix LoRAs (Personalize)",
                              "PersonalizeRerankLoRA": "Re-rank LoRA (Personalize)",
                              "PersonalizeExtractLoRA": "Extract LoRA (Personalize)"}
