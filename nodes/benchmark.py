"""Benchmark Sampling: the inference cost of a MODEL through ComfyUI's own sampling, measured the same way for
every model (base, LoRA unfused, LoRA merged, DreamBooth checkpoint); its COST joins Compare Models' table."""
from __future__ import annotations

from ..trainers.core import host

COST = "PERSONALIZE_COST"
FILE_FOLDERS = ("loras", "checkpoints", "embeddings")


class BenchmarkSampling:
    DESCRIPTION = ("Sample a model the way KSampler does and measure it after a warm-up: seconds per image, "
                   "iterations per second and peak memory (CUDA peak allocated on a GPU, peak resident memory on "
                   "the CPU). Give every model the same latent, prompts and settings. Optionally names the adapter "
                   "or checkpoint file, for its size and parameter count.")
    CATEGORY = "Personalize/compare"
    FUNCTION = "benchmark"
    RETURN_TYPES = ("LATENT", COST, "STRING")
    RETURN_NAMES = ("latent", "cost", "summary")
    OUTPUT_TOOLTIPS = ("The last sampled batch (decode it to look at it or to score it).",
                       "The measurement: connect it to Compare Models' cost input of the same model.",
                       "The figures as text.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = host.sampler_choices()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to measure (with its LoRA applied, or merged)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt, the same for every model."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt, the same for every model."}),
                "latent": ("LATENT", {"tooltip": "Empty Latent Image: its size and batch size are what is timed."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "sampler_name": (samplers, {"default": "euler" if "euler" in samplers else samplers[0]}),
                "scheduler": (schedulers, {"default": "normal" if "normal" in schedulers else schedulers[0]}),
                "images": ("INT", {"default": 4, "min": 1, "max": 1000,
                                   "tooltip": "Images timed (whole batches), after the warm-up."}),
                "warmup": ("INT", {"default": 1, "min": 0, "max": 10,
                                   "tooltip": "Untimed batches first: model loading and kernel set-up."}),
                "label": ("STRING", {"default": "base", "tooltip": "The model's name in the summary."}),
            },
            "optional": {
                "model_file": ("STRING", {"default": "", "tooltip": "Optional: the LoRA, embedding or checkpoint "
                                                                    "file name (as in the loaders' lists), for its "
                                                                    "size and parameter count."}),
            },
        }

    def benchmark(self, model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, images, warmup,
                  label, model_file=""):
        from ..trainers.evaluate.inference_cost import file_figures, measure

        batch = latent["samples"].shape[0]
        out = {}

        def sample():
            out["samples"] = host.sample_latents(model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg,
                                                 sampler_name=sampler_name, scheduler=scheduler)

        cost = measure(sample, label=label, images=images, batch=batch, steps=steps, device=host.torch_device(),
                       warmup=warmup, check=host.check_interrupt)
        columns = cost.columns()
        if model_file.strip():
            columns.update(file_figures(_model_file(model_file.strip())))
        summary = f"{label}: " + ", ".join(f"{k} {v}" for k, v in columns.items())
        return {"ui": {"text": [summary]},
                "result": ({**latent, "samples": out["samples"]}, {"label": label, "columns": columns}, summary)}


def _model_file(name: str) -> str:
    for folder in FILE_FOLDERS:
        try:
            return host.resolve_model(folder, name)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"'{name}' is not in models/{', models/'.join(FILE_FOLDERS)}: give the name as the "
                            f"LoRA, checkpoint or embedding loaders list it.")


NODE_CLASS_MAPPINGS = {"PersonalizeBenchmarkSampling": BenchmarkSampling}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeBenchmarkSampling": "Benchmark Sampling (Personalize)"}
