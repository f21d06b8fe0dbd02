"""Merging adapters: bake into a checkpoint, mix, re-rank, extract; all arithmetic on per-module weight deltas."""
