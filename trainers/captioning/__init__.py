"""BLIP captioning: model loading and generation (blip), caption files beside a folder's images (folders)."""
