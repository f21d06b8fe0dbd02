"""Where to put a crop: centred on the largest face when a detector finds one, else on the image centre.

The detector is OpenCV's Haar cascade, which ships inside the opencv-python(-headless)
wheel, so it works offline. OpenCV is optional: without it every crop is centred.
A detector is any callable(PIL image) -> [(x, y, w, h), ...] in that image's pixels.
"""
from __future__ import annotations

import importlib.util
import threading

import numpy as np
from PIL import Image

_CASCADE = "haarcascade_frontalface_default.xml"
_DETECT_SIDE = 640  # faces are found on a copy at most this large: fast, and big enough for portraits
_local = threading.local()  # one classifier per thread: OpenCV does not promise a shared one is safe


def haar_available() -> bool:
    return importlib.util.find_spec("cv2") is not None


def _classifier():
    import cv2

    if getattr(_local, "classifier", None) is None:
        path = cv2.data.haarcascades + _CASCADE
        classifier = cv2.CascadeClassifier(path)
        if classifier.empty():  # OpenCV 5 wheels no longer ship the cascades
            raise RuntimeError(f"OpenCV {cv2.__version__} has no {_CASCADE}; install opencv-python-headless<5.")
        _local.classifier = classifier
    return _local.classifier


def haar_faces(img: Image.Image) -> list[tuple[int, int, int, int]]:
    """Frontal faces in `img` as (x, y, w, h), found by OpenCV's Haar cascade."""
    scale = min(1.0, _DETECT_SIDE / max(img.size))
    small = img.convert("L")
    if scale < 1.0:
        small = small.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BOX)
    side = min(small.size)
    min_face = max(24, side // 12)
    found = _classifier().detectMultiScale(np.asarray(small), scaleFactor=1.1, minNeighbors=4,
                                           minSize=(min_face, min_face))
    return [tuple(int(round(v / scale)) for v in box) for box in found]



def default_detector():
    """The Haar detector when OpenCV is installed, else None (crops stay centred)."""
    return haar_faces if haar_available() else None


def largest_face(img: Image.Image, detector) -> tuple[int, int, int, int] | None:
    boxes = [tuple(int(v) for v in b) for b in detector(img) or []]
    boxes = [b for b in boxes if b[2] > 0 and b[3] > 0]
    return max(boxes, key=lambda b: (b[2] * b[3], -b[1], -b[0])) if boxes else None


def crop_box(width: int, height: int, box_w: int, box_h: int, center=None) -> tuple[int, int, int, int]:
    """A box_w x box_h box inside width x height, centred on `center` (x, y) as far as the edges allow."""
    cx, cy = center if center is not None else (width / 2, height / 2)
    left = int(round(min(max(cx - box_w / 2, 0), width - box_w)))
    top = int(round(min(max(cy - box_h / 2, 0), height - box_h)))
    return left, top, left + box_w, top + box_h
