"""End-to-end checks against a real ComfyUI (set COMFYUI_DIR to a checkout).

Run:  COMFYUI_DIR=/work/comfyui python -m pytest tests/test_comfyui_integration.py -m comfyui -s
"""
import os

import pytest

from comfyui_harness import ComfyServer, comfyui_dir

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not comfyui_dir(), reason="set COMFYUI_DIR to a ComfyUI checkout"),
]


@pytest.fixture(scope="module")
def comfy():
    with ComfyServer() as server:
        yield server


def test_server_starts_with_pack_and_imports_it_quickly(comfy):
    log = comfy.log_text()
    pack_path = os.path.join(comfy.comfy_dir, "custom_nodes", comfy.pack_folder)
    assert f"Cannot import {pack_path} module" not in log, log
    timing = comfy.pack_import_time()
    assert timing is not None, f"pack missing from the import-times block:\n{log}"
    seconds, imported = timing
    print(f"\n{comfy.pack_folder} import time (ComfyUI log, 0.1 s resolution): {seconds:.1f} s")
    assert imported, f"ComfyUI marked the pack IMPORT FAILED:\n{log}"
    assert seconds < 1.0
    assert "CheckpointLoaderSimple" in comfy.object_info()  # the server answers real queries


def test_pack_import_is_cheap_inside_comfyui(comfy):
    from comfyui_harness import measure_pack_import
    probe = measure_pack_import(comfy.comfy_dir, comfy.pack_folder)
    print(f"\n{comfy.pack_folder} import inside ComfyUI's interpreter: "
          f"{probe['seconds'] * 1000:.1f} ms; pulled in {probe['added_top_level_modules']}")
    heavy = {"diffusers", "peft", "accelerate", "bitsandbytes"} & set(probe["added_top_level_modules"])
    assert not heavy, f"the pack imports {sorted(heavy)} at load time; import them inside functions"
    assert probe["seconds"] < 1.0
