"""Our streaming safetensors reader and writer against the safetensors package, both ways."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainers.core import safetensors_file as sf

TENSORS = {"w": torch.randn(3, 5), "h": torch.randn(7).half(), "b": torch.randn(4, 2).bfloat16(),
           "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "s": torch.tensor(2.5), "e": torch.zeros(0, 4),
           "m": torch.tensor([True, False, True]), "u": torch.arange(5, dtype=torch.uint8)}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_what_we_write_the_package_reads(tmp_path):
    path = str(tmp_path / "ours.safetensors")
    sf.write(path, {**TENSORS, "c": sf.Pending.cast(torch.ones(2, 2), torch.float16)}, {"k": "v"})
    assert_same(load_file(path), {**TENSORS, "c": torch.ones(2, 2, dtype=torch.float16)})
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_what_the_package_writes_we_read(tmp_path):
    path = str(tmp_path / "theirs.safetensors")
    save_file(TENSORS, path, metadata={"a": "1"})
    tensors, metadata = sf.read(path)
    assert_same(tensors, TENSORS) and metadata == {"a": "1"}
    kept, _ = sf.read(path, keep=lambda k: k in ("w", "i"))
    assert sorted(kept) == ["i", "w"]
    pending = sf.pending(path, keep=lambda k: k != "w")
    assert "w" not in pending and pending["h"].shape == (7,) and pending["h"].dtype == torch.float16
    assert torch.equal(pending["b"].load(), TENSORS["b"])


def test_read_converts_floating_tensors_to_the_asked_dtype_as_it_reads(tmp_path):
    path = str(tmp_path / "mixed.safetensors")
    save_file(TENSORS, path)
    tensors, _ = sf.read(path, dtype=torch.float32)
    for name, tensor in TENSORS.items():
        want = tensor.float() if tensor.is_floating_point() else tensor  # integers and bools as they are
        got = tensors[name]
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert len({t.data_ptr() for t in tensors.values() if t.numel()}) == sum(t.numel() > 0 for t in tensors.values())


def test_every_tensor_starts_aligned_for_its_type(tmp_path):
    path = str(tmp_path / "aligned.safetensors")
    sf.write(path, {"odd": torch.ones(3, dtype=torch.uint8), "f": torch.ones(5),
                    "d": torch.ones(2, dtype=torch.float64)}, {"note": "x" * 5})
    raw = open(path, "rb").read()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    itemsize = {"U8": 1, "F32": 4, "F64": 8}
    for name, entry in header.items():
        if name != "__metadata__":
            assert (8 + size + entry["data_offsets"][0]) % itemsize[entry["dtype"]] == 0, name


def test_a_cut_or_garbled_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="incomplete"):
        sf.read(str(path))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not JSON"):
        sf.read(str(path))
    path.write_bytes(struct.pack("<Q", 30) + b'{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'[:30])
    with pytest.raises(ValueError):
        sf.read(str(path))
