"""The pack's engine for the benchmark scripts, which run from a checkout outside ComfyUI.

Inside ComfyUI the pack is imported under its folder name; here its `trainers` package is
put on the path once, for every script in bench/.
"""
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def engine(name: str):
    """trainers.<name>, e.g. engine("training.loop")."""
    return importlib.import_module(f"trainers.{name}")
