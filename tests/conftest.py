"""Shared test setup: the repo root on sys.path, and tiny SD1.x models built once per session.

The session fixtures are shared by every test: do not train or edit them in place
(copy.deepcopy(toy_sd1.unet) first, or load a fresh copy from toy_checkpoint).
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def _host_temp_dir(tmp_path_factory):
    """Keep the engine's temp files (hash cache, scratch) out of the repository."""
    from trainers import host

    previous = host._local["temp"]
    host.configure(temp_dir=str(tmp_path_factory.mktemp("host_temp")))
    yield
    host._local["temp"] = previous


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory) -> str:
    from trainers.toy_models import write_toy_tokenizer

    return write_toy_tokenizer(str(tmp_path_factory.mktemp("toy_tokenizer")))


@pytest.fixture(scope="session")
def toy_sd1(toy_tokenizer_dir):
    """build_sd1("tiny") components: random weights, the real SD1.x layout."""
    from trainers.toy_models import build_sd1

    return build_sd1("tiny", tokenizer_dir=toy_tokenizer_dir)


@pytest.fixture(scope="session")
def toy_checkpoint(toy_sd1, tmp_path_factory) -> str:
    """toy_sd1 as an LDM single-file checkpoint (load it with tokenizer_dir=toy_tokenizer_dir)."""
    from trainers.toy_models import save_single_file

    return save_single_file(toy_sd1, str(tmp_path_factory.mktemp("toy_checkpoint") / "toy_sd1.safetensors"))


@pytest.fixture(scope="session")
def toy_diffusers_dir(toy_sd1, tmp_path_factory) -> str:
    """toy_sd1 as a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/)."""
    from trainers.toy_models import save_diffusers_folder

    return save_diffusers_folder(toy_sd1, str(tmp_path_factory.mktemp("toy_diffusers") / "toy_sd1"))
