"""What a build reports: the result, its summary text and the DATASET value the nodes pass on."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .sources import NO_CAPTION


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
                        for it in self.items for w in it["warnings"] if w != NO_CAPTION)
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
