"""Dataset build settings: what they may be, and the error for inputs the builder cannot use."""
from __future__ import annotations

from dataclasses import dataclass

from ..data.errors import DatasetError
from ..data.pixels import check_resolution
from .buckets import make_buckets

MODES = ("center crop", "pad", "buckets")


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
