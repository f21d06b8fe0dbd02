"""Caption text: the one caption-file reader, and the trigger word."""
from __future__ import annotations

import re

from ..core import path_policy
from .errors import DatasetError


def read_caption(path: str) -> str:
    """The one caption-file reader (training, dataset building and captioning's keep/append all use it).

    Each line is stripped and the non-empty ones are joined with ", ". The file must be UTF-8 (a BOM is
    allowed). Raises DatasetError, naming the file and the fix, for other encodings and for a link to a
    file outside the allowed folders (path_policy.readable). A missing file is the caller's to handle.
    """
    if not path_policy.readable(path):
        raise DatasetError(f"Caption file '{path}' is a link to a file outside ComfyUI's input, output, temp "
                           f"and model folders; replace the link with the caption text.")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except UnicodeDecodeError as e:
        raise DatasetError(f"Caption file '{path}' is not UTF-8 text ({e.reason}). "
                           f"Re-save it as UTF-8.") from e
    return ", ".join(line for line in lines if line)


def with_trigger(caption: str, trigger_word: str) -> str:
    """'trigger, caption', unless the caption already has the trigger as a word."""
    trigger = (trigger_word or "").strip()
    caption = (caption or "").strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if re.search(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}"
