"""The `modelspec.*` header (Stability AI's model spec) every file we write carries; A1111 and Civitai read it."""
from __future__ import annotations

import time


def modelspec(architecture: str, title: str, started: float, **fields: str) -> dict:
    """`architecture` e.g. "stable-diffusion-v1/lora"; `fields` become further modelspec.<name> entries."""
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": architecture, "modelspec.title": title,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            **{f"modelspec.{k}": v for k, v in fields.items()}}
