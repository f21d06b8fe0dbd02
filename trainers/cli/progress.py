"""What every long command prints: images done so far, and a clean stop on Cancel (Ctrl+C)."""
from __future__ import annotations

import sys

from ..core import host

CANCELLED = 130  # the exit status of a command stopped by Ctrl+C


def print_images_done(done: int, total: int) -> None:
    """progress(done, total) for the engines: one line on stderr, rewritten until the last image."""
    print(f"\r{done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)


def until_cancelled(work, stopped: str):
    """(work(), None), or (None, CANCELLED) after printing "stopped; <stopped>" when the user cancels."""
    try:
        return work(), None
    except BaseException as e:
        if host.is_interrupt(e):
            print(f"\nstopped; {stopped}", file=sys.stderr)
            return None, CANCELLED
        raise
