"""Small random Stable Diffusion models built in code: for tests, the demo and benchmarks.

They have the real SD1.x layout (so every key map, loader and LoRA name is exercised)
at a size that trains on a CPU in seconds. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os

from ..families.components import SD_SCHEDULER_CONFIG, SDComponents

# Byte-level BPE alphabet of CLIP's tokenizer (the GPT-2 byte encoder).
def _byte_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_toy_tokenizer(directory: str) -> str:
    """A CLIP tokenizer with single-character tokens only (no merges): a valid, tiny vocab."""
    os.makedirs(directory, exist_ok=True)
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f)
    return directory


SIZES = {
    # Seconds to train on a CPU; the real SD1.x block structure (2 levels).
    "tiny": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                           attention_head_dim=8, norm_num_groups=8),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 vae=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)),
    # The benchmark's "mini SD1.5": SD1.5 widths on two levels, the full CLIP-L text encoder and SD VAE.
    "mini": dict(unet=dict(block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=768,
                           attention_head_dim=8, norm_num_groups=32),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)),
    # The smallest model ComfyUI's CheckpointLoaderSimple accepts as SD1.5: it requires 320 UNet channels,
    # 768-wide cross-attention, the real CLIP-L text encoder (49408 tokens) and the SD VAE.
    "comfy": dict(unet=dict(block_out_channels=(320,), layers_per_block=1, cross_attention_dim=768,
                            attention_head_dim=8, norm_num_groups=32,
                            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)),
                  text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            vocab_size=49408),
                  vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)),
}
_TWO_LEVELS = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def build_sd1(size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> SDComponents:
    """Random SD1.x-layout components. tokenizer_dir: where to write (or find) the toy tokenizer."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = SIZES[size]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **{**_TWO_LEVELS, **spec["unet"]})
    nvae = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * nvae,
                        up_block_types=("UpDecoderBlock2D",) * nvae, **spec["vae"])
    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="toy_tokenizer_")
    if not os.path.isfile(os.path.join(tokenizer_dir, "vocab.json")):
        write_toy_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{"vocab_size": len(tokenizer), **spec["text"]}, max_position_embeddings=77, projection_dim=spec["text"]["hidden_size"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu"))
    return SDComponents(family="sd1", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        source=f"toy-sd1-{size}", info={"name": f"toy-sd1-{size}"})


# SDXL's layout at toy size: the first level without attention, a deeper transformer on the second, both text
# encoders (the second with a projection), size and pooled-text conditioning ("text_time").
SDXL_SIZES = {
    "tiny": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 2),
                           attention_head_dim=(2, 4), norm_num_groups=8, addition_time_embed_dim=8),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 text_2=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=32),
                 vae=SIZES["tiny"]["vae"]),
    # The smallest model ComfyUI's CheckpointLoaderSimple takes as SDXL (its Segmind_Vega entry: 320 channels,
    # transformer depths 0/1/2 per level, 2048-wide context, 2816 added inputs), with CLIP-L and OpenCLIP bigG at
    # full size: ComfyUI builds both encoders from its own configs.
    "comfy": dict(unet=dict(block_out_channels=(320, 320, 320), layers_per_block=2,
                            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(5, 5, 5), norm_num_groups=32, addition_time_embed_dim=256,
                            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
                  text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            vocab_size=49408),
                  text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              projection_dim=1280, vocab_size=49408),
                  vae=SIZES["comfy"]["vae"]),
}


def build_sdxl(size: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None) -> SDComponents:
    """Random SDXL-layout components (UNet, VAE, CLIP-L, OpenCLIP-G with projection, both tokenizers)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = SDXL_SIZES[size]
    torch.manual_seed(seed)
    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="toy_tokenizer_")
    if not os.path.isfile(os.path.join(tokenizer_dir, "vocab.json")):
        write_toy_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")  # OpenCLIP pads with "!"
    ids = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**ids, **spec["text"]}, hidden_act="quick_gelu",
                                                pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**ids, **spec["text_2"]}, hidden_act="gelu",
                                                                pad_token_id=tokenizer_2.pad_token_id))
    unet_spec = dict(spec["unet"])
    levels = {k: unet_spec.pop(k) for k in ("down_block_types", "up_block_types") if k in unet_spec}
    width = spec["text"]["hidden_size"] + spec["text_2"]["hidden_size"]
    # The added embedding takes the six size ids (each embedded in addition_time_embed_dim) and the pooled text.
    added = 6 * unet_spec["addition_time_embed_dim"] + spec["text_2"]["projection_dim"]
    levels = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), **levels}
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=width, use_linear_projection=True,
        addition_embed_type="text_time", projection_class_embeddings_input_dim=added, **levels, **unet_spec)
    nvae = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * nvae,
                        up_block_types=("UpDecoderBlock2D",) * nvae, **spec["vae"])
    return SDComponents(family="sdxl", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, source=f"toy-sdxl-{size}",
                        info={"name": f"toy-sdxl-{size}"})


def save_single_file(components: SDComponents, path: str, dtype=None) -> str:
    """An LDM-layout single-file checkpoint (what CheckpointLoaderSimple reads), written atomically.

    The metadata carries the config values the weights cannot show (GroupNorm groups, heads),
    so our loader rebuilds these small models exactly. dtype (e.g. torch.float16) halves the file.
    """
    from ..families.ldm_keys import config_hints, diffusers_to_ldm
    from ..core.safe_io import save_safetensors

    return save_safetensors(diffusers_to_ldm(components, dtype=dtype), path, metadata=config_hints(components))


def save_diffusers_folder(components: SDComponents, directory: str) -> str:
    """A diffusers folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/ and model_index.json (SDXL: also
    text_encoder_2/ and tokenizer_2/)."""
    import diffusers

    from ..core.safe_io import write_json

    os.makedirs(directory, exist_ok=True)
    components.unet.save_pretrained(os.path.join(directory, "unet"))
    components.vae.save_pretrained(os.path.join(directory, "vae"))
    components.text_encoder.save_pretrained(os.path.join(directory, "text_encoder"))
    components.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    scheduler = diffusers.DDPMScheduler.from_config(  # from_config drops DDIM-only keys
        {**SD_SCHEDULER_CONFIG, "prediction_type": components.prediction_type})
    scheduler.save_pretrained(os.path.join(directory, "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    if components.text_encoder_2 is not None:  # SDXL: the pipeline's own layout
        components.text_encoder_2.save_pretrained(os.path.join(directory, "text_encoder_2"))
        components.tokenizer_2.save_pretrained(os.path.join(directory, "tokenizer_2"))
        index = {k: v for k, v in index.items() if k not in ("safety_checker", "requires_safety_checker")}
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], feature_extractor=[None, None])
    write_json(os.path.join(directory, "model_index.json"), index)
    return directory
