"""The one map from precision names to torch dtypes: mixed precision, saved files, captioning, sampling."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sampling_dtype(choice: str, device, mixed_precision: str = "no") -> torch.dtype:
    """The autocast dtype for sampling with fp32 weights. "auto": fp16 on a GPU (bf16 when the run trains in
    bf16), bf16 on a CPU with native bf16 arithmetic (about 1.7x faster than fp32 there), fp32 otherwise. fp16 on
    a CPU is emulated and slow: fp32 instead."""
    cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        if cuda:
            return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return torch.bfloat16 if _native_cpu_bf16() else torch.float32
    if choice == "fp16" and not cuda:
        return torch.float32
    return DTYPES[choice]


def _native_cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
