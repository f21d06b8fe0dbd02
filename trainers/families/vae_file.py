"""A standalone VAE file from models/vae (e.g. the fp16-fix SDXL VAE), used in place of a checkpoint's own.

Files in the wild hold either the LDM names A1111 and ComfyUI write (`encoder.down.0.block.0...`, sometimes under
`first_stage_model.`) or diffusers names (`encoder.down_blocks.0.resnets.0...`, what diffusers repositories ship).
Either loads strictly; the checkpoint's scaling factor is kept, since the family fixes it, not the file.
"""
from __future__ import annotations

from .checkpoint_file import read_state_dict
from .config_inference import infer_vae_config
from .ldm_keys import VAE_PREFIX, KeyMapError, vae_to_diffusers
from .load_errors import ModelLoadError


def load_vae_file(path: str, like, dtype=None):
    """An AutoencoderKL from `path`, shaped like the checkpoint's VAE `like`."""
    from diffusers import AutoencoderKL

    from .single_file import _instantiate

    tensors, _ = read_state_dict(path)
    bare = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in tensors.items()}
    scaling = like.config.scaling_factor
    dtype = dtype or like.dtype
    try:
        if any(k.startswith("encoder.down.") for k in bare):  # LDM names
            config = {**infer_vae_config(bare), "scaling_factor": scaling}
            weights = vae_to_diffusers({VAE_PREFIX + k: v for k, v in bare.items()}, config)
        elif any(k.startswith("encoder.down_blocks.") for k in bare):  # diffusers names
            config, weights = dict(like.config), bare
        else:
            raise ModelLoadError(f"'{path}' is not a VAE: it has neither encoder.down.* (LDM) nor "
                                 f"encoder.down_blocks.* (diffusers) keys. Put a VAE file in models/vae.")
    except (KeyMapError, KeyError) as e:
        raise ModelLoadError(f"'{path}' does not have a Stable Diffusion VAE's layout: {e}") from e
    if config["latent_channels"] != like.config.latent_channels:
        raise ModelLoadError(f"'{path}' makes {config['latent_channels']}-channel latents; this model's UNet takes "
                             f"{like.config.latent_channels}. Pick a VAE made for this model family.")
    return _instantiate(lambda: AutoencoderKL.from_config(config), weights, dtype, "VAE", path)
