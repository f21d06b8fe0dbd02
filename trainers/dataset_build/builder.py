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
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageOps

from ..core import host, safe_io
from ..data.captions import read_caption
from ..data.errors import DatasetError
from ..data.images import ImageError, list_images, to_rgb
from ..data.items import MANIFEST_NAME
from ..data.pixels import check_resolution
from . import face_crop, phash
from .buckets import make_buckets, nearest_bucket

log = logging.getLogger("personalize")

FORMAT = "personalize-dataset"
VERSION = 1
PIXELS_VERSION = 1  # bump when the same settings would give different pixels: outputs are then rebuilt
MODES = ("center crop", "pad", "buckets")
IMAGES_DIR = "images"
_OUTPUT_NAME = re.compile(r".+_[0-9a-f]{10}\.(png|txt)$")
_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_NO_CAPTION, _BAD_CAPTION = "no caption", "caption not used"  # notes about the caption, re-made every build


class DatasetBuildError(ValueError):
    """Inputs or settings the builder cannot use; the message says what to change."""


@dataclass
class BuildSettings:
    resolution: int = 512
    mode: str = "center crop"  # one of MODES
    face_crop: bool = False  # centre crops on the largest face (OpenCV), else on the image centre
    repeats: int = 1  # times each image appears per epoch
    bucket_step: int = 64  # bucket sides are multiples of this
    min_ratio: float = 0.5  # bucket aspect ratios (w/h) allowed
    max_ratio: float = 2.0
    dedupe: bool = True
    dedupe_threshold: int = 6  # pHash bits that may differ between duplicates (0: identical pictures only)

    def validate(self) -> "BuildSettings":
        try:
            self.resolution = check_resolution(self.resolution)
        except DatasetError as e:
            raise DatasetBuildError(str(e)) from None
        if self.mode not in MODES:
            raise DatasetBuildError(f"Resize mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if not 1 <= int(self.repeats) <= 1000:
            raise DatasetBuildError(f"Repeats must be between 1 and 1000, got {self.repeats}.")
        if not 0 <= int(self.dedupe_threshold) <= 32:
            raise DatasetBuildError(f"Duplicate threshold must be 0-32 bits of 64, got {self.dedupe_threshold}.")
        self.repeats, self.dedupe_threshold = int(self.repeats), int(self.dedupe_threshold)
        self.buckets()  # raises on bad bucket settings
        return self

    def buckets(self) -> list[tuple[int, int]] | None:
        if self.mode != "buckets":
            return None
        try:
            return make_buckets(self.resolution, self.bucket_step, self.min_ratio, self.max_ratio)
        except ValueError as e:
            raise DatasetBuildError(str(e)) from None


# ---- sources ---------------------------------------------------------------------------

@dataclass
class Source:
    """One input image: a file, or a picture already in memory (a ComfyUI IMAGE)."""

    label: str  # what the manifest and messages call it: the file path, or "image 3"
    stem: str  # start of the output file names
    caption: str | None = None
    path: str | None = None
    image: Image.Image | None = field(default=None, repr=False)
    warnings: list = field(default_factory=list)

    def read(self) -> bytes:
        """The bytes whose hash identifies this source (file bytes, or the raw pixels)."""
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ImageError(self.path, f"cannot read the file ({e.strerror or e})") from e
        arr = np.asarray(self.image.convert("RGB"))
        return f"{arr.shape}".encode() + arr.tobytes()


def folder_sources(folder: str, caption_ext: str = ".txt") -> tuple[list[Source], list[tuple[str, str]]]:
    """The images directly in `folder` with their captions, and (path, reason) for the non-images."""
    paths, skipped = list_images(folder)
    sources = []
    for path in paths:
        src = Source(label=_shown(path), stem=_stem(os.path.basename(path)), path=path)
        caption_path = os.path.splitext(path)[0] + caption_ext
        if os.path.isfile(caption_path):
            try:
                src.caption = read_caption(caption_path)
            except DatasetError as e:
                src.warnings.append(_shown(f"{_BAD_CAPTION}: {e}"))
        sources.append(src)
    return sources, [(_shown(path), _shown(reason)) for path, reason in skipped]


def image_sources(images, captions) -> list[Source]:
    """Sources for in-memory PIL images; captions: one per image (None or a shorter list: no caption)."""
    captions = list(captions or [])
    if len(captions) > len(images):
        raise DatasetBuildError(f"{len(captions)} captions for {len(images)} images: give one caption per image.")
    captions += [None] * (len(images) - len(captions))
    width = max(4, len(str(len(images))))
    return [Source(label=f"image {i}", stem=f"image_{i:0{width}d}", caption=c, image=img)
            for i, (img, c) in enumerate(zip(images, captions))]


def _stem(name: str) -> str:
    # Bytes, not characters: 80 emoji are 320 bytes, and most file systems allow 255 per name.
    return safe_io.sanitize_name(os.path.splitext(name)[0], default="image", max_bytes=80)


def _shown(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name (lone surrogates from os.listdir) as \\xNN:
    a label that UTF-8 files, JSON and logs accept."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates no file name decodes to
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


# ---- one image -------------------------------------------------------------------------

def _upright_size(img: Image.Image) -> tuple[int, int]:
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in _TRANSPOSED else (w, h)


def _decode(data: bytes, label: str, scale_for) -> tuple[Image.Image, tuple[int, int]]:
    """(upright 8-bit RGB image, upright full size). JPEGs are decoded at 1/2, 1/4 or 1/8 scale
    when `scale_for(full_size)` (output pixels per source pixel) still leaves enough pixels."""
    if not data:
        raise ImageError(label, "the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:
        raise ImageError(label, "not an image Pillow can read (wrong extension or corrupt file)") from e
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageError(label, str(e)) from e
    full = _upright_size(img)
    if img.format in ("JPEG", "MPO"):
        reduce = next((r for r in (8, 4, 2) if r * scale_for(full) <= 1), 1)
        if reduce > 1:  # the DCT scaling of libjpeg: a fast, filtered downscale
            img.draft("RGB", (img.width // reduce, img.height // reduce))
    try:
        img.load()
    except Exception as e:  # truncated data, decoder errors
        raise ImageError(label, f"the image data is damaged or incomplete ({e})") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        pass
    return to_rgb(img, label), full


class CropPlan:
    """Output size and crop geometry of one image under the build settings."""

    def __init__(self, settings: BuildSettings, buckets):
        self.settings = settings
        self.buckets = buckets

    def target(self, size) -> tuple[int, int]:
        if self.buckets:
            return nearest_bucket(size[0], size[1], self.buckets)
        return self.settings.resolution, self.settings.resolution

    def scale(self, size) -> float:
        (w, h), (tw, th) = size, self.target(size)
        fit = min if self.settings.mode == "pad" else max
        return fit(tw / w, th / h)


def prepare_image(img: Image.Image, full_size, plan: CropPlan, detector=None) -> dict:
    """Crop/pad and resize `img` (upright; possibly decoded smaller than `full_size`).

    Returns the output image and its geometry in full-size source pixels:
    {"image", "crop_box", "pad_box", "bucket", "face_box", "warnings"}.
    """
    W, H = full_size
    tw, th = plan.target(full_size)
    s = plan.scale(full_size)
    fx, fy = img.width / W, img.height / H  # decoded pixels per source pixel
    warnings, face_box, pad_box = [], None, None
    if s > 1.0:
        warnings.append(f"smaller than the training size: {W}x{H} source for a {tw}x{th} output, upscaled "
                        f"{s:.2f}x (expect a softer image)")
    if plan.settings.mode == "pad":
        box = (0, 0, W, H)
        nw, nh = max(1, min(tw, round(W * s))), max(1, min(th, round(H * s)))
        inner = img.resize((nw, nh), Image.Resampling.LANCZOS)
        fill = tuple(int(round(c)) for c in np.asarray(inner, dtype=np.float64).reshape(-1, 3).mean(axis=0))
        out = Image.new("RGB", (tw, th), fill)  # the image's mean colour: the border adds no new colour
        left, top = (tw - nw) // 2, (th - nh) // 2
        out.paste(inner, (left, top))
        pad_box = (left, top, left + nw, top + nh)
    else:
        bw, bh = min(W, round(tw / s)), min(H, round(th / s))
        center = None
        if plan.settings.face_crop:
            face_box, note = _find_face(img, detector, fx, fy)
            if face_box is not None:
                center = (face_box[0] + face_box[2] / 2, face_box[1] + face_box[3] / 2)
            else:
                warnings.append(note)
        box = face_crop.crop_box(W, H, bw, bh, center)
        scaled = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        out = img.resize((tw, th), Image.Resampling.LANCZOS, box=scaled)
    return {"image": out, "crop_box": list(box), "pad_box": list(pad_box) if pad_box else None,
            "bucket": [tw, th] if plan.buckets else None, "face_box": list(face_box) if face_box else None,
            "warnings": warnings}


def _find_face(img, detector, fx, fy):
    """(largest face as (x, y, w, h) in source pixels, or None; the note when there is none)."""
    if detector is None:
        return None, "face crop needs OpenCV (pip install opencv-python-headless): centred instead"
    try:
        face = face_crop.largest_face(img, detector)
    except Exception as e:  # a broken OpenCV install must not stop the build
        return None, f"face detector failed ({e}): centred instead"
    if face is None:
        return None, "no face found: centred instead"
    x, y, w, h = face
    return (round(x / fx), round(y / fy), round(w / fx), round(h / fy)), None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)  # fast; no timestamps or text chunks: same pixels, same bytes
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the build -------------------------------------------------------------------------

@dataclass
class BuildResult:
    path: str
    manifest_path: str
    manifest: dict
    processed: int  # images decoded and written by this build
    reused: int  # images kept from the previous build of this folder

    @property
    def items(self) -> list[dict]:
        return self.manifest["items"]

    def bucket_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            if item["bucket"]:
                key = f"{item['bucket'][0]}x{item['bucket'][1]}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def summary(self) -> str:
        m = self.manifest
        s = m["settings"]
        lines = [f"Dataset '{m['name']}': {len(self.items)} image(s) at {s['resolution']} px ({s['mode']}), "
                 f"{self.processed} prepared, {self.reused} reused; {len(m['duplicates'])} duplicate(s), "
                 f"{len(m['skipped'])} skipped.", f"Folder: {self.path}"]
        if self.bucket_counts():
            lines.append("Buckets: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.bucket_counts().items())))
        if m["class_images"]:
            lines.append(f"Class images: {m['class_images']} ({m['class_images_count']} images)")
        uncaptioned = sum(1 for it in self.items if not it["caption"])
        if uncaptioned:
            lines.append(f"{uncaptioned} image(s) have no caption.")
        lines += _first(f"duplicate: {os.path.basename(d['source'])} = {os.path.basename(d['duplicate_of'])}"
                        for d in m["duplicates"])
        lines += _first(f"skipped {os.path.basename(k['source'])}: {k['reason']}" for k in m["skipped"])
        lines += _first(f"warning {os.path.basename(it['source'])}: {w}"
                        for it in self.items for w in it["warnings"] if w != _NO_CAPTION)
        return "\n".join(lines)

    def dataset_value(self) -> dict:
        """The DATASET value the nodes pass to the trainers."""
        buckets = self.manifest["settings"]["buckets"]
        return {"path": self.path, "manifest": self.manifest_path, "count": len(self.items),
                "buckets": [tuple(b) for b in buckets] if buckets else [],
                "class_images": self.manifest["class_images"], "summary": self.summary()}


def _first(lines, limit: int = 10) -> list[str]:
    """At most `limit` lines, then how many more there are (the manifest has them all)."""
    lines = list(lines)
    return lines[:limit] + ([f"... and {len(lines) - limit} more (see manifest.json)"] if len(lines) > limit else [])


def default_root() -> str:
    return os.path.join(host.output_dir(), "personalize", "datasets")


def build_from_folder(folder, name: str = "", settings: BuildSettings | None = None, **kw) -> BuildResult:
    """Build a dataset from the images (and .txt captions) directly in `folder`."""
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder or "")))
    if not os.path.isdir(folder):
        raise DatasetBuildError(f"Image folder '{folder}' does not exist. Give the full path of a folder of images "
                                f"(with optional same-name .txt captions).")
    sources, skipped = folder_sources(folder, kw.pop("caption_ext", ".txt"))
    source = {"kind": "folder", "path": _shown(os.path.realpath(folder))}
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
    out, created = _claim_folder(root or default_root(), name, source)
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
    previous = _read_own_manifest(out) or {}
    key = _settings_key(settings, buckets, detector)
    reuse = _reuse_index(previous, key)
    plan = CropPlan(settings, buckets)
    workers = max(1, int(workers or min(4, os.cpu_count() or 1)))

    def work(src: Source) -> dict:
        try:
            data = src.read()
        except ImageError as e:
            return {"status": "skipped", "reason": e.reason}
        sha = _sha256(data)
        old = reuse.get(sha)
        if old is not None and old.get("reason"):  # unreadable last time, and the bytes are the same
            return {"status": "skipped", "reason": old["reason"], "source_sha256": sha}
        if old is not None and _output_intact(out, old):
            return {**old, "status": "reused"}
        if old is not None and "phash" in old and old.get("image") is None:
            return {**old, "status": "known"}  # a duplicate last time: its hash is enough to decide again
        try:
            return _process(src, data, sha, key, plan, detector)
        except ImageError as e:
            return {"status": "skipped", "reason": e.reason, "source_sha256": sha}

    items, dupes, skips = [], [], [{"source": p, "reason": r} for p, r in skipped]
    kept_sha: dict[str, str] = {}  # source hash -> label of the items kept so far
    kept_look = phash.HashIndex()
    processed = reused = 0
    names = set()
    manifest = functools.partial(_manifest, out, source, settings, buckets, detector, key, classes)
    with contextlib.closing(_ordered_map(work, sources, workers)) as records, \
            _kept_on_cancel(out, manifest, previous, items):  # Cancel stops the threads too
        for done, (src, rec) in enumerate(zip(sources, records), start=1):
            host.check_interrupt()
            if rec["status"] == "skipped":
                skips.append({"source": src.label, "reason": rec["reason"], "source_sha256": rec.get("source_sha256")})
            elif (dup := _duplicate_of(rec, kept_sha, kept_look, settings)) is not None:
                dupes.append({"source": src.label, "source_sha256": rec["source_sha256"], "phash": rec["phash"],
                              "duplicate_of": dup[0], "distance": dup[1]})
            else:
                if rec["status"] == "known":  # a duplicate last time, not any more
                    rec = _process(src, src.read(), rec["source_sha256"], key, plan, detector)
                try:
                    items.append(_write_item(out, src, rec, settings, names))
                except (OSError, UnicodeError) as e:  # a full disk, a name the file system refuses
                    # No source hash: the next build tries this image again.
                    skips.append({"source": src.label, "reason": _shown(f"cannot write its output files ({e})")})
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
    _write_if_changed(manifest_path, json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    _remove_stale(out, names)
    result = BuildResult(out, manifest_path, manifest, processed, reused)
    log.info("%s", result.summary().splitlines()[0])
    return result


def _manifest(out, source, settings, buckets, detector, key, classes, items, skips, dupes, incomplete=False) -> dict:
    manifest = {
        "format": FORMAT, "version": VERSION, "name": os.path.basename(out), "source": source,
        "settings": {**asdict(settings), "buckets": [list(b) for b in buckets] if buckets else None,
                     "face_detector": _detector_name(detector) if settings.face_crop else None,
                     "pixels_key": key},
        "class_images": classes[0], "class_images_count": classes[1],
        "items": items, "skipped": skips, "duplicates": dupes,
    }
    return {**manifest, "incomplete": True} if incomplete else manifest


@contextlib.contextmanager
def _kept_on_cancel(out: str, manifest, previous: dict, items: list):
    """On Cancel, record what is done (an incomplete manifest the trainers refuse) so the next build
    reuses it; the previous build's items not reached yet are kept too, their files are still there."""
    try:
        yield
    except BaseException as e:
        if host.is_interrupt(e):
            done = {it["source_sha256"] for it in items}
            earlier = [it for it in previous.get("items") or [] if it.get("source_sha256") not in done]
            safe_io.write_json(os.path.join(out, MANIFEST_NAME), manifest(items + earlier, [], [], incomplete=True))
        raise


def _process(src: Source, data: bytes, sha: str, key: str, plan: CropPlan, detector) -> dict:
    if src.image is not None:
        img = src.image.convert("RGB") if src.image.mode != "RGB" else src.image
        full = img.size
    else:
        img, full = _decode(data, src.label, plan.scale)
    prepared = prepare_image(img, full, plan, detector)
    png = _png(prepared.pop("image"))
    return {"status": "processed", "source_sha256": sha, "source_bytes": len(data) if src.path else None,
            "source_size": list(full), "phash": phash.phash(img), "png": png,
            "output_sha256": _sha256(png), "output_name": f"{src.stem}_{_sha256((sha + key).encode())[:10]}",
            **prepared}


def _duplicate_of(rec: dict, kept_sha: dict, kept_look, settings: BuildSettings):
    """(label of the kept image this one duplicates, hash distance), or None."""
    if not settings.dedupe:
        return None
    if rec["source_sha256"] in kept_sha:  # the same bytes
        return kept_sha[rec["source_sha256"]], 0
    nearest = kept_look.nearest(rec["phash"])
    return nearest if nearest is not None and nearest[1] <= settings.dedupe_threshold else None


def _write_item(out: str, src: Source, rec: dict, settings: BuildSettings, names: set) -> dict:
    """Write the image (unless reused) and its caption file; the manifest entry."""
    stem = rec["output_name"]
    image_rel, caption_rel = f"{IMAGES_DIR}/{stem}.png", f"{IMAGES_DIR}/{stem}.txt"
    if "png" in rec:
        safe_io.write_bytes(os.path.join(out, image_rel), rec["png"])
    caption = src.caption or ""
    _write_if_changed(os.path.join(out, caption_rel), caption + "\n")
    names.update({os.path.basename(image_rel), os.path.basename(caption_rel)})
    w, h = rec["bucket"] or [settings.resolution, settings.resolution]
    return {
        "image": image_rel, "caption": caption, "caption_file": caption_rel, "output_name": stem,
        "output_size": [w, h], "output_sha256": rec["output_sha256"],
        "source": src.label, "source_sha256": rec["source_sha256"], "source_bytes": rec["source_bytes"],
        "source_size": rec["source_size"], "crop_box": rec["crop_box"], "pad_box": rec["pad_box"],
        "face_box": rec["face_box"], "bucket": rec["bucket"], "repeats": settings.repeats, "phash": rec["phash"],
        "warnings": src.warnings + rec["warnings"] + ([] if src.caption is not None else [_NO_CAPTION]),
    }


def _write_if_changed(path: str, text: str) -> None:
    """Atomic write, skipped when the file already holds `text` (a rebuild leaves files untouched)."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    safe_io.write_text(path, text)


# ---- folder, reuse and cleanup ---------------------------------------------------------

def _claim_folder(root: str, name: str, source: dict) -> tuple[str, bool]:
    """(<root>/<name>, or name_2, name_3...: the first that is free or was built from the same
    source; whether this call created it)."""
    stem = safe_io.sanitize_name(name, default="dataset")
    for n in itertools.count(1):
        path = os.path.join(root, stem if n == 1 else f"{stem}_{n}")
        if not os.path.exists(path):
            os.makedirs(path)
            # Claim it at once: a cancelled first build still marks the folder as ours.
            safe_io.write_json(os.path.join(path, MANIFEST_NAME),
                               {"format": FORMAT, "version": VERSION, "source": source, "items": [],
                                "incomplete": True})
            return path, True
        own = _read_own_manifest(path)
        if own is not None and own.get("source") == source:
            return path, False
    raise AssertionError("unreachable")


def _read_own_manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _settings_key(settings: BuildSettings, buckets, detector) -> str:
    """Hash of everything that decides an output's pixels (not captions, repeats or dedupe)."""
    pixels = {"v": PIXELS_VERSION, "resolution": settings.resolution, "mode": settings.mode,
              "buckets": buckets, "face": _detector_name(detector) if settings.face_crop else None}
    return _sha256(json.dumps(pixels, sort_keys=True).encode())[:16]


def _detector_name(detector) -> str:
    if detector is None:
        return "none"
    return getattr(detector, "__name__", type(detector).__name__)


def _reuse_index(previous: dict, key: str) -> dict[str, dict]:
    """Source hash -> what the last build knew about it, when it used the same pixel settings."""
    if (previous.get("settings") or {}).get("pixels_key") != key:
        return {}
    index = {}
    for k in previous.get("skipped") or []:
        if k.get("source_sha256") and k.get("reason"):
            index[k["source_sha256"]] = {"reason": k["reason"]}
    for d in previous.get("duplicates") or []:
        if d.get("source_sha256") and d.get("phash"):
            index[d["source_sha256"]] = {"source_sha256": d["source_sha256"], "phash": d["phash"], "image": None}
    for item in previous.get("items") or []:
        if item.get("source_sha256") and item.get("image"):
            index[item["source_sha256"]] = {k: item.get(k) for k in (
                "image", "output_name", "output_sha256", "source_sha256", "source_bytes", "source_size",
                "crop_box", "pad_box", "face_box", "bucket", "phash")}
            index[item["source_sha256"]]["warnings"] = [w for w in item.get("warnings") or []
                                                         if not w.startswith((_NO_CAPTION, _BAD_CAPTION))]
    return index


def _output_intact(out: str, old: dict) -> bool:
    if not old.get("image"):
        return False
    try:
        with open(os.path.join(out, old["image"]), "rb") as f:
            return _sha256(f.read()) == old["output_sha256"]
    except OSError:
        return False


def _remove_stale(out: str, keep: set) -> None:
    """Delete outputs of earlier builds that this build no longer lists (only files named like ours)."""
    folder = os.path.join(out, IMAGES_DIR)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name not in keep and _OUTPUT_NAME.match(name):
            os.remove(os.path.join(folder, name))


def _check_class_images(folder) -> tuple[str | None, int]:
    folder = os.path.expanduser(str(folder or "").strip())
    if not folder:
        return None, 0
    if not os.path.isdir(folder):
        raise DatasetBuildError(f"Class-images folder '{folder}' does not exist. Give a folder of images of the "
                                f"class (e.g. 'a photo of a dog') for DreamBooth prior preservation, or leave it empty.")
    folder = os.path.abspath(folder)
    if _shown(folder) != folder:  # the trainers reopen it, so an escaped copy in the manifest would not do
        raise DatasetBuildError(f"Class-images folder '{_shown(folder)}' has a name that is not valid UTF-8. "
                                f"Rename it (or the folder holding it) and give the new path.")
    paths, _ = list_images(folder)
    return folder, len(paths)


def _ordered_map(fn, items, workers: int):
    """fn over items on a thread pool, results in input order, at most 2*workers in flight.

    Pillow and OpenCV release the GIL while decoding, resizing and encoding, so threads scale.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="dataset") as pool:
        pending = deque(pool.submit(fn, x) for x in itertools.islice(items, 2 * workers))
        try:
            while pending:
                result = pending.popleft().result()
                for x in itertools.islice(items, 1):
                    pending.append(pool.submit(fn, x))
                yield result
        finally:
            for f in pending:
                f.cancel()
