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


def images_only(work: str, count: int, size: int) -> str:
    """`count` demo photos of `size` px in work/photos, without the caption files beside them (diffusers' scripts
    open every file of their instance folder as an image)."""
    made = engine("testing.demo").make_photos(os.path.join(work, "made"), count=count, size=size)
    photos = os.path.join(work, "photos")
    os.makedirs(photos)
    for name in os.listdir(made):
        if not name.endswith(".txt"):
            os.link(os.path.join(made, name), os.path.join(photos, name))
    return photos
