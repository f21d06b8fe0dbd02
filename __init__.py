"""ComfyUI-Personalize: caption, build datasets and train LoRAs on Stable Diffusion inside ComfyUI.

Kept cheap to import: the heavy libraries load only when a node runs.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
