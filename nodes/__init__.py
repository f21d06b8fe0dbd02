"""ComfyUI node classes. Each module exports its own mappings; they are merged here."""
from . import (apply_lora, benchmark, caption, compare, dataset, load_checkpoint, merge, routes, train_dreambooth,
               train_embedding, train_lora)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (train_lora, train_dreambooth, train_embedding, apply_lora, load_checkpoint, caption, dataset,
                compare, benchmark, merge):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

routes.register()  # inside ComfyUI: the canvas asks what a picked base model means for a trainer
