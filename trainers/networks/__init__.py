"""Adapter types: how a module's weight changes (LoRA), its file keys and metadata."""
