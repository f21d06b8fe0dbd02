"""Model hashes for metadata: A1111's legacy hash and a cached full sha256."""
from __future__ import annotations

import hashlib
import json
import os

from ..core import host
from ..core.safe_io import write_json

_HASH_CACHE = "personalize_sha256_cache.json"


def legacy_hash(path: str) -> str:
    """A1111's old model hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def file_sha256(path: str) -> str:
    """Full sha256, cached by path, size and mtime so a 2 GB checkpoint is hashed once."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = os.path.join(host.cache_dir(), _HASH_CACHE)
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    try:
        write_json(cache_file, cache)
    except OSError:
        pass  # a read-only temp folder only costs a re-hash next time
    return cache[key]
