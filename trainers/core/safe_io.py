"""Writing files safely: sanitized names, no overwrites, atomic and crash-safe renames.

Every write goes to a temp file in the target folder, is fsynced, gets the mode a plain
open() would give it, and is renamed into place; the folder is fsynced after the rename,
so a power cut leaves either the old file or the new one, never an empty or torn one.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import unicodedata

_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f\\]')
_SURROGATES = re.compile(r"[\ud800-\udfff]")  # from undecodable file names; not encodable in UTF-8
# Names Windows keeps for devices, whatever the case or extension ("con.txt" too); the digits include ¹²³.
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
             *(f"{d}{n}" for d in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3")}


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which would race with other threads' file creation.
_UMASK = _read_umask()


def sanitize_name(name: str, default: str = "untitled", max_bytes: int = 120) -> str:
    """A file or folder name from a widget: no path parts, no '..', no odd characters.

    'a/b/../c' becomes 'a_b_c'; an absolute path keeps only its parts, never its root. The result
    is at most `max_bytes` bytes of UTF-8 (file systems limit bytes, not characters), cut between
    characters, never inside one. A name Windows reserves for a device (CON, PRN, AUX, NUL, COM1-9,
    LPT1-9, any case, with or without an extension) gets '_' after its stem: 'con.txt' becomes 'con_.txt'.
    """
    name = _SURROGATES.sub("_", str(name or ""))
    name = unicodedata.normalize("NFC", name).strip()
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".", "..")]
    name = "_".join(parts)
    name = _BAD_CHARS.sub("_", name).strip(" .")
    name = re.sub(r"\.{2,}", ".", name)
    name = _unreserved(_cut(name, max_bytes))
    return _cut(name, max_bytes) or default  # '_' may need a byte: cut again (max_bytes > 4 keeps it)


def _cut(name: str, max_bytes: int) -> str:
    name = name.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")  # "ignore" drops only a cut last character
    return name.strip(" .")


def _unreserved(name: str) -> str:
    """'CON' -> 'CON_', 'lpt1.txt' -> 'lpt1_.txt': Windows opens the device, not a file, for these stems."""
    stem, dot, rest = name.partition(".")
    return f"{stem}_{dot}{rest}" if stem.rstrip(" ").upper() in _RESERVED else name


def numbered_names(directory: str, stem: str, suffix: str = ""):
    """directory/stem+suffix, then stem_2+suffix, stem_3+suffix... without end."""
    yield os.path.join(directory, stem + suffix)
    n = 2
    while True:
        yield os.path.join(directory, f"{stem}_{n}{suffix}")
        n += 1


def unique_path(directory: str, stem: str, suffix: str = "") -> str:
    """The first of numbered_names that does not exist yet. Only a hint when others write there too:
    publish with save_new to be sure nothing is overwritten."""
    return next(p for p in numbered_names(directory, stem, suffix) if not os.path.lexists(p))


def ensure_inside(path: str, roots: list[str]) -> str:
    """Refuse to write outside the allowed roots (model, output and temp folders)."""
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root + os.sep):
            return path
    raise PermissionError(f"Refusing to write '{path}': it is outside {', '.join(roots)}.")


def fsync_dir(directory: str) -> None:
    """Make a rename or new entry in `directory` durable. Best effort: Windows cannot open folders."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows can only flush a handle open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    return 0o666 & ~_UMASK


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_temp(directory: str, suffix: str, write, mode: int) -> str:
    """A complete, fsynced temp file in `directory` (mkstemp makes it 0600: it gets `mode`)."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix + ".part", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, mode)
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _atomic(path: str, write) -> str:
    """Write through a temp file in the same folder, then rename: no half-written file is ever visible.

    An existing file keeps its mode; a new one gets the umask's.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = _new_file_mode()
    tmp = _write_temp(directory, os.path.splitext(path)[1], write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(directory)
    return path


def _publish_new(tmp: str, path: str) -> bool:
    """Give the complete file `tmp` the name `path` only if nobody holds that name; False if taken."""
    try:
        os.link(tmp, path)  # atomic and exclusive: fails if the name exists, even if it appeared a moment ago
        return True
    except FileExistsError:
        return False
    except OSError:
        pass  # no hard links on this file system (FAT, some shares): claim the name, then fill it
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(path)
        raise
    return True


def save_new(directory: str, stem: str, suffix: str, write, roots: list[str] | None = None) -> str:
    """Write a new file stem+suffix (or stem_2+suffix...) in `directory` through `write(tmp_path)`.

    Never overwrites: the name is taken with an exclusive create at the moment of publishing, so two
    saves of one name at the same time both survive, as stem and stem_2. `roots`: refuse a path
    outside them (see ensure_inside). Returns the path written.
    """
    check = (lambda path: ensure_inside(path, roots)) if roots is not None else (lambda path: path)
    tmp = _write_temp(check(directory), suffix, write, _new_file_mode())
    try:
        for path in numbered_names(directory, stem, suffix):
            check(path)
            if _publish_new(tmp, path):
                fsync_dir(directory)
                return path
    finally:
        _remove(tmp)


def safetensors_writer(tensors: dict, metadata: dict | None = None):
    """A write(path) function for _atomic or save_new. `tensors` maps names to tensors or
    safetensors_file.Pending entries; they are streamed one at a time (see safetensors_file)."""
    from . import safetensors_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return lambda tmp: safetensors_file.write(tmp, tensors, meta)


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> str:
    return _atomic(path, safetensors_writer(tensors, metadata))


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
