"""Building a training dataset: prepared images, their captions and a manifest the trainers read.

    python -m trainers build-dataset photos/ --name my_dog --mode buckets --resolution 512

Input is a folder of images (with optional same-name .txt captions) or a list of images
with captions. Each image is decoded once (EXIF rotation applied, any colour mode made
8-bit RGB, JPEGs decoded at a reduced scale when that still leaves enough pixels), checked
against the others with a perceptual hash, cropped (centre, face-centred or into an
aspect-ratio bucket) or padded, resized with Lanczos and saved as PNG in
`<dataset>/images/`. `manifest.json` records where every output came from and how.

A rebuild with the same inputs reuses everything: an output is named after the content
hash of its source and the pixel settings, so unchanged images are neither decoded nor
written again and the folder ends up byte-identical.

One bad file never stops a build: an unreadable image, or one whose outputs cannot be
written, is skipped with its reason in the manifest. Output names are cut to a byte length
any file system takes; file names that are not valid UTF-8 keep their bytes as \\xNN in the
manifest. A build that fails removes the folder it created; a cancelled one keeps it, so
the next build resumes it.

This module runs the build; its parts live beside it: sources.py (the inputs), prepare.py
(one image), reuse.py (what a rebuild keeps), outputs.py (the folder and its files) and
report.py (the result).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil

from ..core import host
from ..data.images import ImageError, list_images
from ..data.items import MANIFEST_NAME
from . import face_crop, phash
from .outputs import (claim_folder, kept_on_cancel, make_manifest, read_own_manifest, remove_stale,
                      write_if_changed, write_item)
from .parallel import ordered_map
from .prepare import CropPlan, process_source, sha256
from .report import BuildResult
from .reuse import output_intact, reuse_index, settings_key
# MODES is re-exported: the nodes and the CLI import it from here.
from .settings import MODES, BuildSettings, DatasetBuildError  # noqa: F401
from .sources import Source, folder_sources, image_sources, shown

log = logging.getLogger("personalize")


def default_root() -> str:
    return os.path.join(host.output_dir(), "personalize", "datasets")


def build_from_folder(folder, name: str = "", settings: BuildSettings | None = None, **kw) -> BuildResult:
    """Build a dataset from the images (and .txt captions) directly in `folder`."""
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder or "")))
    if not os.path.isdir(folder):
        raise DatasetBuildError(f"Image folder '{folder}' does not exist. Give the full path of a folder of images "
                                f"(with optional same-name .txt captions).")
    sources, skipped = folder_sources(folder, kw.pop("caption_ext", ".txt"))
    source = {"kind": "folder", "path": shown(os.path.realpath(folder))}
    return build(sources, source, name or os.path.basename(folder), settings, skipped=skipped, **kw)


def build_from_images(images, captions, name: str = "", settings: BuildSettings | None = None, **kw) -> BuildResult:
    """Build a dataset from PIL images and their captions (a ComfyUI IMAGE batch).

    The pixels of all images, in order, identify the dataset: the same images rebuild into
    their folder (new captions replace the old), different images under a used name go to
    name_2, name_3...
    """
    if not images:
        raise DatasetBuildError("No images were given.")
    sources = image_sources(images, captions)
    pixels = hashlib.sha256()
    for src in sources:
        pixels.update(src.read())  # each starts with its shape: the sequence is unambiguous
    return build(sources, {"kind": "images", "sha256": pixels.hexdigest()}, name or "dataset", settings, **kw)


def build(sources: list[Source], source: dict, name: str, settings: BuildSettings | None = None, *,
          root: str | None = None, class_images: str | None = None, detector="auto", workers: int | None = None,
          skipped=(), progress=None) -> BuildResult:
    """Prepare `sources` into <root>/<name>; see the module docstring.

    source: identifies the input ({"kind": "folder", "path": ...}); a folder of that name
    built from another source is never overwritten (name_2 is used instead). detector:
    "auto" (OpenCV if installed), None, or a callable(PIL image) -> [(x, y, w, h)].
    progress: callable(done, total).
    """
    settings = (settings or BuildSettings()).validate()
    classes = _check_class_images(class_images)  # before claiming: a wrong setting creates no folder
    out, created = claim_folder(root or default_root(), name, source)
    try:
        return _build_into(out, sources, source, name, settings, classes, detector, workers, skipped, progress)
    except BaseException as e:
        if created and not host.is_interrupt(e):  # a cancelled build keeps its folder: the next one resumes it
            shutil.rmtree(out, ignore_errors=True)
        raise


def _build_into(out, sources, source, name, settings, classes, detector, workers, skipped, progress):
    buckets = settings.buckets()
    if detector == "auto":
        detector = face_crop.default_detector() if settings.face_crop else None
    previous = read_own_manifest(out) or {}
    key = settings_key(settings, buckets, detector)
    reuse = reuse_index(previous, key)
    plan = CropPlan(settings, buckets)
    workers = max(1, int(workers or min(4, os.cpu_count() or 1)))

    def work(src: Source) -> dict:
        try:
            data = src.read()
        except ImageError as e:
            return {"status": "skipped", "reason": e.reason}
        sha = sha256(data)
        old = reuse.get(sha)
        if old is not None and old.get("reason"):  # unreadable last time, and the bytes are the same
            return {"status": "skipped", "reason": old["reason"], "source_sha256": sha}
        if old is not None and output_intact(out, old):
            return {**old, "status": "reused"}
        if old is not None and "phash" in old and old.get("image") is None:
            return {**old, "status": "known"}  # a duplicate last time: its hash is enough to decide again
        try:
            return process_source(src, data, sha, key, plan, detector)
        except ImageError as e:
            return {"status": "skipped", "reason": e.reason, "source_sha256": sha}

    items, dupes, skips = [], [], [{"source": p, "reason": r} for p, r in skipped]
    kept_sha: dict[str, str] = {}  # source hash -> label of the items kept so far
    kept_look = phash.HashIndex()
    processed = reused = 0
    names = set()
    manifest = functools.partial(make_manifest, out, source, settings, buckets, detector, key, classes)
    with contextlib.closing(ordered_map(work, sources, workers)) as records, \
            kept_on_cancel(out, manifest, previous, items):  # Cancel stops the threads too
        for done, (src, rec) in enumerate(zip(sources, records), start=1):
            host.check_interrupt()
            if rec["status"] == "skipped":
                skips.append({"source": src.label, "reason": rec["reason"], "source_sha256": rec.get("source_sha256")})
            elif (dup := _duplicate_of(rec, kept_sha, kept_look, settings)) is not None:
                dupes.append({"source": src.label, "source_sha256": rec["source_sha256"], "phash": rec["phash"],
                              "duplicate_of": dup[0], "distance": dup[1]})
            else:
                if rec["status"] == "known":  # a duplicate last time, not any more
                    rec = process_source(src, src.read(), rec["source_sha256"], key, plan, detector)
                try:
                    items.append(write_item(out, src, rec, settings, names))
                except (OSError, UnicodeError) as e:  # a full disk, a name the file system refuses
                    # No source hash: the next build tries this image again.
                    skips.append({"source": src.label, "reason": shown(f"cannot write its output files ({e})")})
                else:
                    kept_sha.setdefault(rec["source_sha256"], src.label)
                    kept_look.add(rec["phash"], src.label)
                    processed += rec["status"] == "processed"
                    reused += rec["status"] == "reused"
            if progress is not None:
                progress(done, len(sources))
    for entry in skips:
        log.warning("Skipping %s: %s", entry["source"], entry["reason"])
    if not items:
        detail = "; ".join(f"{os.path.basename(s['source'])} ({s['reason']})" for s in skips[:5])
        raise DatasetBuildError(f"No usable image to build '{name}' from.{' Skipped: ' + detail + '.' if detail else ''}")

    manifest = manifest(items, skips, dupes)
    manifest_path = os.path.join(out, MANIFEST_NAME)
    write_if_changed(manifest_path, json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    remove_stale(out, names)
    result = BuildResult(out, manifest_path, manifest, processed, reused)
    log.info("%s", result.summary().splitlines()[0])
    return result


def _duplicate_of(rec: dict, kept_sha: dict, kept_look, settings: BuildSettings):
    """(label of the kept image this one duplicates, hash distance), or None."""
    if not settings.dedupe:
        return None
    if rec["source_sha256"] in kept_sha:  # the same bytes
        return kept_sha[rec["source_sha256"]], 0
    nearest = kept_look.nearest(rec["phash"])
    return nearest if nearest is not None and nearest[1] <= settings.dedupe_threshold else None


def _check_class_images(folder) -> tuple[str | None, int]:
    folder = os.path.expanduser(str(folder or "").strip())
    if not folder:
        return None, 0
    if not os.path.isdir(folder):
        raise DatasetBuildError(f"Class-images folder '{folder}' does not exist. Give a folder of images of the "
                                f"class (e.g. 'a photo of a dog') for DreamBooth prior preservation, or leave it empty.")
    folder = os.path.abspath(folder)
    if shown(folder) != folder:  # the trainers reopen it, so an escaped copy in the manifest would not do
        raise DatasetBuildError(f"Class-images folder '{shown(folder)}' has a name that is not valid UTF-8. "
                                f"Rename it (or the folder holding it) and give the new path.")
    paths, _ = list_images(folder)
    return folder, len(paths)
