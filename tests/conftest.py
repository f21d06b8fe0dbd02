"""Shared test setup: the repo root on sys.path, the host's folders in tmp folders for every test, and
tiny SD1.x models built once per session.

The session fixtures are shared by every test: do not train or edit them in place
(copy.deepcopy(toy_sd1.unet) first, or load a fresh copy from toy_checkpoint).
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _host_copies():
    """(host, path_policy) of the engine and of the pack as ComfyUI imports it: two copies of each module."""
    from pack_loader import load_pack
    from trainers.core import host, path_policy

    pack = load_pack().__name__
    return [(host, path_policy), (sys.modules[f"{pack}.trainers.core.host"], sys.modules[f"{pack}.trainers.core.path_policy"])]


@pytest.fixture(scope="session", autouse=True)
def _host_temp_dir(tmp_path_factory):
    """Keep the engine's temp files (hash cache, scratch) out of the repository and of any ComfyUI checkout."""
    temp = str(tmp_path_factory.mktemp("host_temp"))
    copies = _host_copies()
    previous = [h._local["temp"] for h, _ in copies]
    for h, _ in copies:
        h.configure(temp_dir=temp)
    yield
    for (h, _), value in zip(copies, previous):
        h._local["temp"] = value


@pytest.fixture(autouse=True)
def _isolated_host(tmp_path_factory):
    """Every test starts with the host's models, output and input folders in a fresh tmp folder (never
    $COMFYUI_DIR's), no pending interrupt and the path rules as the host decides; all three are put back
    afterwards, for the engine and the pack copy. Tests may still configure their own folders."""
    root = tmp_path_factory.mktemp("host")
    copies = _host_copies()
    saved = [dict(h._local) for h, _ in copies]
    for h, policy in copies:
        h.configure(models_dir=str(root / "models"), output_dir=str(root / "output"), input_dir=str(root / "input"))
        h._interrupt.clear()
        policy.force_confined(None)
    yield root
    for (h, policy), local in zip(copies, saved):
        h._local.clear()
        h._local.update(local)
        h._interrupt.clear()
        policy.force_confined(None)


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory) -> str:
    from trainers.testing.toy_models import write_toy_tokenizer

    return write_toy_tokenizer(str(tmp_path_factory.mktemp("toy_tokenizer")))


@pytest.fixture(scope="session")
def toy_sd1(toy_tokenizer_dir):
    """build_sd1("tiny") components: random weights, the real SD1.x layout."""
    from trainers.testing.toy_models import build_sd1

    return build_sd1("tiny", tokenizer_dir=toy_tokenizer_dir)


@pytest.fixture(scope="session")
def toy_checkpoint(toy_sd1, tmp_path_factory) -> str:
    """toy_sd1 as an LDM single-file checkpoint (load it with tokenizer_dir=toy_tokenizer_dir)."""
    from trainers.testing.toy_models import save_single_file

    return save_single_file(toy_sd1, str(tmp_path_factory.mktemp("toy_checkpoint") / "toy_sd1.safetensors"))


@pytest.fixture(scope="session")
def toy_diffusers_dir(toy_sd1, tmp_path_factory) -> str:
    """toy_sd1 as a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/)."""
    from trainers.testing.toy_models import save_diffusers_folder

    return save_diffusers_folder(toy_sd1, str(tmp_path_factory.mktemp("toy_diffusers") / "toy_sd1"))
