"""The safetensors format, read and written one tensor at a time.

The `safetensors` package maps the whole file (every page touched counts in the process's memory until the file
closes) and its `save_file` builds the whole file in memory first. For a checkpoint next to a model in training
that doubles the peak. Here a read fills each tensor straight from the file into fresh, aligned memory, and a
write streams each tensor's bytes, so a checkpoint export costs one tensor beyond what is already held.

Layout: 8 bytes (little-endian u64) header length, a JSON header {name: {dtype, shape, data_offsets}, optional
"__metadata__": {str: str}}, padded with spaces, then the tensors' bytes back to back.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Callable

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000  # the safetensors package's own limit


@dataclass
class Pending:
    """A tensor made only when it is written: its shape and dtype are known now, its bytes on `load()`."""
    shape: tuple
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @staticmethod
    def cast(tensor: torch.Tensor, dtype) -> "Pending":
        """`tensor` in `dtype` (floating point only), converted when written."""
        if not tensor.is_floating_point() or dtype is None or tensor.dtype == dtype:
            return Pending(tuple(tensor.shape), tensor.dtype, lambda: tensor)
        return Pending(tuple(tensor.shape), dtype, lambda: tensor.to(dtype))


def read_header(f) -> tuple[dict, dict, int]:
    """(entries, metadata, offset of the data) of an open file; ValueError when it is not safetensors."""
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError("the file is shorter than a safetensors header")
    size = struct.unpack("<Q", raw)[0]
    if size > MAX_HEADER:
        raise ValueError(f"header length {size} is not plausible")
    try:
        header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        _check_entry(name, entry)
    return header, metadata, 8 + size


def _check_entry(name: str, entry) -> None:
    try:
        dtype, shape, (start, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        expected = math.prod(shape) * dtype.itemsize
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"tensor '{name}' has a malformed entry {entry!r}") from None
    if not (0 <= start <= end) or end - start != expected:
        raise ValueError(f"tensor '{name}' has {end - start} bytes for shape {shape} of {entry['dtype']}")


def read(path: str, keep=None, dtype: torch.dtype | None = None, rest_as_meta: bool = False) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; `keep(name)` selects tensors (the others are not read, and with
    `rest_as_meta` come back as meta tensors: their shape and dtype, no memory).

    dtype: floating-point tensors come back in it, each read through one reused buffer and converted into its
    own memory. Reading every tensor in the file's dtype and converting afterwards frees thousands of small
    blocks that the larger converted ones cannot reuse: the heap keeps them, hundreds of MB for an SDXL file."""
    with open(path, "rb") as f:
        entries, metadata, base = read_header(f)
        total = f.seek(0, 2)
        tensors, staging = {}, None
        for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if keep is not None and not keep(name):
                if rest_as_meta:
                    tensors[name] = meta_tensor(entry, dtype)
                continue
            stored = DTYPES[entry["dtype"]]
            if dtype is None or stored == dtype or not stored.is_floating_point:
                tensors[name] = _read_tensor(f, base, entry, total, name)
                continue
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            if staging is None or staging.numel() < size:
                staging = torch.empty(size, dtype=torch.uint8)
            raw = _read_tensor(f, base, entry, total, name, into=staging[:size])
            tensors[name] = torch.empty(entry["shape"], dtype=dtype).copy_(raw)
    return tensors, metadata


def meta_tensor(entry: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A header entry as a meta tensor: its shape and dtype (a floating-point one in `dtype` when given), no data.
    Config inference and strict state-dict loading read it as they read the tensor."""
    stored = DTYPES[entry["dtype"]]
    return torch.empty(entry["shape"], dtype=dtype if dtype is not None and stored.is_floating_point else stored,
                       device="meta")


def pending(path: str, keep=None) -> dict[str, Pending]:
    """The file's tensors as Pending entries, each read from the file when it is written."""
    with open(path, "rb") as f:
        entries, _, base = read_header(f)

    def loader(name, entry):
        def load():
            with open(path, "rb") as f:
                return _read_tensor(f, base, entry, f.seek(0, 2), name)
        return load

    return {name: Pending(tuple(e["shape"]), DTYPES[e["dtype"]], loader(name, e))
            for name, e in entries.items() if keep is None or keep(name)}


def _read_tensor(f, base: int, entry: dict, total: int, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor in fresh memory, or in `into` (a uint8 buffer of its byte size) viewed as its dtype and shape."""
    start, end = entry["data_offsets"]
    if base + end > total:
        raise ValueError(f"tensor '{name}' ends past the end of the file: the file is incomplete")
    dtype = DTYPES[entry["dtype"]]
    tensor = torch.empty(entry["shape"], dtype=dtype) if into is None else into.view(dtype).view(entry["shape"])
    if end > start:
        f.seek(base + start)
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        while view:
            got = f.readinto(view)
            if not got:
                raise ValueError(f"tensor '{name}' is cut short: the file is incomplete")
            view = view[got:]
    return tensor


def write(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write `tensors` (name -> Tensor or Pending) to `path`, one tensor in memory at a time. Larger element
    types come first, so every tensor starts at an address aligned for its type, as the package does."""
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in order:
        entry = tensors[name]
        size = math.prod(entry.shape) * entry.dtype.itemsize
        header[name] = {"dtype": NAMES[entry.dtype], "shape": list(entry.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            entry = tensors[name]
            tensor = entry.load() if isinstance(entry, Pending) else entry
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != tuple(entry.shape):
                raise ValueError(f"tensor '{name}' changed while it was written")
            if tensor.numel():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
