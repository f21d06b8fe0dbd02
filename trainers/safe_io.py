"""Writing files safely: sanitized names, no overwrites, atomic renames."""
from __future__ import annotations

import json
import os
import re
import tempfile
import unicodedata

_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f\\]')


def sanitize_name(name: str, default: str = "untitled") -> str:
    """A file or folder name from a widget: no path parts, no '..', no odd characters.

    'a/b/../c' becomes 'a_b_c'; an absolute path keeps only its parts, never its root.
    """
    name = unicodedata.normalize("NFC", str(name or "")).strip()
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".", "..")]
    name = "_".join(parts)
    name = _BAD_CHARS.sub("_", name).strip(" .")
    name = re.sub(r"\.{2,}", ".", name)
    return name[:120] or default


def unique_path(directory: str, stem: str, suffix: str = "") -> str:
    """directory/stem+suffix, or stem_2, stem_3... when that exists: results are never overwritten."""
    candidate = os.path.join(directory, stem + suffix)
    n = 2
    while os.path.exists(candidate):
        candidate = os.path.join(directory, f"{stem}_{n}{suffix}")
        n += 1
    return candidate


def ensure_inside(path: str, roots: list[str]) -> str:
    """Refuse to write outside the allowed roots (model, output and temp folders)."""
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root + os.sep):
            return path
    raise PermissionError(f"Refusing to write '{path}': it is outside {', '.join(roots)}.")


def _atomic(path: str, write) -> str:
    """Write through a temp file in the same folder, then rename: no half-written file is ever visible."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1] + ".part", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> str:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def write_bytes(path: str, data: bytes) -> str:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return _atomic(path, write)


def write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return _atomic(path, write)


def write_json(path: str, data) -> str:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
