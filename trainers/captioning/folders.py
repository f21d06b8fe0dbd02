"""Caption files beside a folder's images: keep, overwrite or append, one atomic write per file."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..core import host, safe_io
from ..data.captions import read_caption
from ..data.errors import DatasetError
from ..data.images import ImageError, list_images, open_rgb
from .blip import BlipCaptioner, CaptionError, apply_affixes, caption_images, decode_side

log = logging.getLogger(__name__)

POLICIES = ("keep", "overwrite", "append")


@dataclass
class CaptionReport:
    folder: str
    written: list[str] = field(default_factory=list)  # caption files written
    kept: list[str] = field(default_factory=list)  # images whose existing caption was kept
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    captions: dict[str, str] = field(default_factory=dict)  # image path -> text now in its caption file

    def summary(self) -> str:
        lines = [f"Captioned {len(self.written)} image(s) in {self.folder}; kept {len(self.kept)} existing "
                 f"caption(s); skipped {len(self.skipped)}."]
        lines += [f"skipped {os.path.basename(p)}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def caption_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".txt"


def _existing_caption(path: str) -> str:
    """The caption file beside an image ('' when there is none), read as training reads it."""
    return read_caption(path) if os.path.isfile(path) else ""


def caption_folder(captioner: BlipCaptioner, folder: str, policy: str = "keep", prefix: str = "",
                   suffix: str = "", prefix_prompt: str = "", batch_size: int = 8, progress=None,
                   check_interrupt=None, **generate) -> CaptionReport:
    """Write `name.txt` beside each image of `folder` (not its sub-folders).

    keep: images that already have a non-empty caption are left alone (the model never sees
    them); overwrite: replace it; append: add the new caption after the old one. Each file is
    written atomically once its batch is done, so a Cancel leaves only complete files.
    Unreadable images, and (keep, append) existing captions that cannot be read (not UTF-8, a
    link out of the allowed folders: see data.captions.read_caption), are skipped with the
    reason logged and reported. Each image is decoded
    at reduced size (`decode_side`) as it is opened, so a batch of big photos stays small.
    """
    if policy not in POLICIES:
        raise CaptionError(f"Unknown caption policy '{policy}': use one of {', '.join(POLICIES)}.")
    folder = os.path.abspath(os.path.expanduser(str(folder or "").strip()))
    if not os.path.isdir(folder):
        raise CaptionError(f"Image folder '{folder}' does not exist.")
    report = CaptionReport(folder)
    paths, report.skipped = list_images(folder)
    todo, owners, existing = [], {}, {}
    for path in paths:
        target = caption_path(path).lower()
        if target in owners:  # a.jpg and a.png would share a.txt
            report.skipped.append((path, f"its caption file would be the same as {os.path.basename(owners[target])}'s"))
            continue
        owners[target] = path
        if policy != "overwrite":
            try:
                existing[path] = _existing_caption(caption_path(path))
            except DatasetError as e:
                log.warning("Skipping %s: %s", path, e)
                report.skipped.append((path, str(e)))
                continue
        if policy == "keep" and existing[path]:
            report.kept.append(path)
            report.captions[path] = existing[path]
        else:
            todo.append(path)

    check = check_interrupt or host.check_interrupt
    batch_size = max(1, int(batch_size))
    side = decode_side(captioner)
    done = 0
    for start in range(0, len(todo), batch_size):
        check()
        batch_paths, images = [], []
        for path in todo[start:start + batch_size]:
            try:
                images.append(open_rgb(path, max_short_side=side))
                batch_paths.append(path)
            except ImageError as e:
                log.warning("Skipping %s: %s", path, e.reason)
                report.skipped.append((path, e.reason))
        if images:
            captions = caption_images(captioner, images, prefix_prompt=prefix_prompt, batch_size=batch_size,
                                      check_interrupt=check, **generate)
            for path, caption in zip(batch_paths, captions):
                text = caption
                if policy == "append" and existing[path]:
                    text = f"{existing[path]}, {caption}"
                text = apply_affixes(text, prefix, suffix)
                safe_io.write_text(caption_path(path), text + "\n")
                report.written.append(caption_path(path))
                report.captions[path] = text
        done += len(todo[start:start + batch_size])
        if progress is not None:
            progress(done, len(todo))
    return report
