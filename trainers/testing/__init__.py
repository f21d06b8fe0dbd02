"""Toy models and the demo: a whole run without downloads."""
