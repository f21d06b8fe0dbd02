"""The one map from precision names to torch dtypes: mixed precision, saved files, captioning."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
