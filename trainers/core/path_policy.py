"""Which paths a graph posted to the server may name: one policy for every node.

A ComfyUI server is often reachable by others (`--listen`, tunnels), and a posted graph is
untrusted. Inside ComfyUI every file or folder a node receives must resolve (real path, links
followed) inside ComfyUI's input, output or temp folder or a model folder it knows; folders
the pack writes into (caption files, datasets, run folders) must be inside input, output or
temp. A server owner who runs ComfyUI only for themselves may set PERSONALIZE_ALLOW_ANY_PATH=1
to lift the read limit (never the write limit). Hub downloads are off in the server unless
PERSONALIZE_ALLOW_HUB_DOWNLOADS=1.

The command line is the local user's own tool: it may read anywhere (`confined()` is False).
"""
from __future__ import annotations

import os

from . import host

ALLOW_ANY_PATH_ENV = "PERSONALIZE_ALLOW_ANY_PATH"
ALLOW_HUB_ENV = "PERSONALIZE_ALLOW_HUB_DOWNLOADS"
_forced: dict = {"confined": None}  # tests: confine outside ComfyUI too


class PathNotAllowed(PermissionError):
    """A path outside the folders a graph may use; the message says where to put the files."""


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def force_confined(value: bool | None) -> None:
    """Apply the server's rules outside ComfyUI (True), never (False) or as the host decides (None)."""
    _forced["confined"] = value


def server_rules() -> bool:
    """True where graphs come from the network: inside ComfyUI (or when a test forces it)."""
    return host.in_comfyui() if _forced["confined"] is None else _forced["confined"]


def confined() -> bool:
    """Whether reads are limited to ComfyUI's folders right now."""
    return server_rules() and not _env_on(ALLOW_ANY_PATH_ENV)


def hub_allowed() -> bool:
    """Downloads from a typed hub id: always on the command line, in the server only when its owner says so."""
    return not server_rules() or _env_on(ALLOW_HUB_ENV)


def hub_refusal(hub_id: str) -> str:
    return (f"Downloading '{hub_id}' from the Hugging Face hub is off on this server. Put the model folder in "
            f"ComfyUI's models folder and pick it from the dropdown, or, as the server's owner, start ComfyUI "
            f"with {ALLOW_HUB_ENV}=1 to allow downloads of typed hub ids.")


def read_roots() -> list[str]:
    return _real([host.input_dir(), host.output_dir(), host.temp_dir(), *host.model_roots()])


def write_roots() -> list[str]:
    return _real([host.input_dir(), host.output_dir(), host.temp_dir()])


def _real(paths) -> list[str]:
    return [os.path.realpath(p) for p in paths if p]


def is_inside(path: str, roots) -> bool:
    """Whether `path` (links followed) is one of `roots` or below one."""
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def node_path(value: str, what: str, write: bool = False) -> str:
    """The real path of a file or folder typed in (or linked into) a node.

    Relative paths are inside ComfyUI's input folder. Under the server's rules the path must
    be inside the allowed folders; the check comes before anything looks at the path, so the
    error says nothing about whether it exists.
    """
    text = os.path.expanduser(str(value or "").strip())
    if not text:
        return ""
    path = os.path.realpath(os.path.join(host.input_dir(), text))
    if write and server_rules() and not is_inside(path, write_roots()):
        raise PathNotAllowed(f"{what} '{value}' is outside ComfyUI's input, output and temp folders, where this "
                             f"node may write. Put the files in ComfyUI's input folder ({host.input_dir()}) and "
                             f"give the path relative to it.")
    if confined() and not is_inside(path, read_roots()):
        raise PathNotAllowed(f"{what} '{value}' is outside ComfyUI's input, output, temp and model folders. Put "
                             f"the files in ComfyUI's input folder ({host.input_dir()}) and give the path relative "
                             f"to it. (A server owner who runs ComfyUI only for themselves may set "
                             f"{ALLOW_ANY_PATH_ENV}=1 to allow reading anywhere.)")
    return path


def readable_check():
    """For the files found inside an accepted folder: a predicate, False for a link that leads outside the
    allowed folders. The allowed folders are resolved once, not once per file."""
    if not confined():
        return lambda path: True
    roots = read_roots()
    return lambda path: is_inside(path, roots)


def readable(path: str) -> bool:
    """readable_check() for one file."""
    return readable_check()(path)
