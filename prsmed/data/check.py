"""Validate a dataset before training on it.

Errors are what would break training or evaluation: no records, missing or unreadable files, empty masks (unless
the position says there is no lesion), image/mask size mismatches, and the same image (same path or same bytes)
in two splits. Warnings are label-quality findings: rows dropped for empty fields, masks that are not two-valued,
and position or answer text whose zone disagrees with the zone recomputed from the mask (by the rule of
:mod:`prsmed.data.zones`; a two-lesion mask is compared as the set of its two lesions' zones).

The :class:`Report` is plain data: ``report.to_dict()`` is JSON-serialisable.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from prsmed.data.layout import DatasetError, load_records
from prsmed.data.readers import ImageReadError, read_image, read_mask_and_levels
from prsmed.data.zones import NONE, zone_label, zone_of_mask, zones_from_text

MAX_ISSUES_PER_CODE = 100


@dataclass(frozen=True)
class Issue:
    level: str  # "error" or "warning"
    code: str
    message: str
    path: str | None = None
    source: str | None = None  # "annotations/lung_CT.csv:12"


@dataclass
class Report:
    root: str
    layout: str = ""
    rows: int = 0
    images: int = 0
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    issue_counts: dict[str, int] = field(default_factory=dict)  # every issue, including those not listed
    counts: dict[str, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, level: str, code: str, message: str, path=None, source=None) -> None:
        self.issue_counts[code] = self.issue_counts.get(code, 0) + 1
        if self.issue_counts[code] > MAX_ISSUES_PER_CODE:
            return
        issue = Issue(level, code, message, None if path is None else str(path), source)
        (self.errors if level == "error" else self.warnings).append(issue)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["n_errors"] = sum(n for c, n in self.issue_counts.items() if c in _ERROR_CODES)
        d["n_warnings"] = sum(n for c, n in self.issue_counts.items() if c not in _ERROR_CODES)
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def summary(self) -> str:
        """A few human-readable lines."""
        d = self.to_dict()
        lines = [f"{self.root}: {self.rows} rows, {self.images} images ({self.layout or 'unknown layout'}); "
                 f"{d['n_errors']} error(s), {d['n_warnings']} warning(s)"]
        for name in ("modality", "split", "zone"):
            if self.counts.get(name):
                lines.append(f"  by {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts[name].items())))
        for issue in self.errors + self.warnings:
            where = f" [{issue.source or issue.path}]" if (issue.source or issue.path) else ""
            lines.append(f"  {issue.level}: {issue.code}: {issue.message}{where}")
        hidden = sum(max(0, n - MAX_ISSUES_PER_CODE) for n in self.issue_counts.values())
        if hidden:
            lines.append(f"  ... and {hidden} more issue(s) of the same kinds")
        return "\n".join(lines)


_ERROR_CODES = {"layout", "no_records", "missing_image", "missing_mask", "unreadable_image", "unreadable_mask",
                "empty_mask", "size_mismatch", "split_leak"}


def _expected_zones(info) -> set[str]:
    if info.zone == NONE:
        return {NONE}
    return {z for z, _ in info.lesions}


def check_dataset(root, *, data_root=None, read_pixels: bool = True) -> Report:
    """Check a dataset (anything :func:`prsmed.data.layout.load_records` reads) and return a :class:`Report`.

    ``read_pixels=False`` only checks that files exist and skips decoding (fast, for a first look).
    """
    report = Report(str(root))
    try:
        records = load_records(root, data_root=data_root)
    except DatasetError as e:
        report.add("error", "layout", str(e), root)
        return report
    report.layout = records.layout
    report.rows = len(records)
    for d in records.dropped:
        report.add("warning", "dropped_row", f"row dropped: {d.reason}", source=d.source)
    if not records:
        report.add("error", "no_records", "no usable rows: expected at least one row with every field filled", root)
        return report

    masks: dict[Path, object] = {}  # path -> ZoneInfo, or None when unusable
    mask_shapes: dict[Path, tuple[int, int]] = {}
    images: dict[Path, tuple[tuple[int, int], str] | None] = {}  # path -> ((H, W), sha256)
    splits_of_path: dict[Path, set[str]] = defaultdict(set)
    paths_of_hash: dict[str, set[Path]] = defaultdict(set)
    by_modality, by_split, by_zone = Counter(), Counter(), Counter()
    by_modality_split: dict[str, Counter] = defaultdict(Counter)
    counted_images: set[Path] = set()

    for r in records:
        by_modality[r.modality] += 1
        by_split[r.split] += 1
        by_modality_split[r.modality][r.split] += 1
        splits_of_path[r.image_path].add(r.split)

        if r.mask_path not in masks:
            masks[r.mask_path] = None
            if not r.mask_path.is_file():
                report.add("error", "missing_mask", "mask file not found", r.mask_path, r.source)
            elif read_pixels:
                try:
                    levels, fg = read_mask_and_levels(r.mask_path)
                except ImageReadError as e:
                    report.add("error", "unreadable_mask", str(e), r.mask_path, r.source)
                else:
                    values = np.unique(levels)
                    if len(values) > 2:
                        report.add("warning", "non_binary_mask",
                                   f"expected two values (0 and one foreground level), found {len(values)} "
                                   f"distinct values from {values[0]:g} to {values[-1]:g}", r.mask_path, r.source)
                    masks[r.mask_path] = zone_of_mask(fg)
                    mask_shapes[r.mask_path] = fg.shape

        if r.image_path not in images:
            images[r.image_path] = None
            if not r.image_path.is_file():
                report.add("error", "missing_image", "image file not found (looked for it next to the mask's "
                           "*_images folder)", r.image_path, r.source)
            else:
                digest = hashlib.sha256(r.image_path.read_bytes()).hexdigest()
                size = None
                if read_pixels:
                    try:
                        w, h = read_image(r.image_path).size
                        size = (h, w)
                    except ImageReadError as e:
                        report.add("error", "unreadable_image", str(e), r.image_path, r.source)
                        digest = None
                if digest:
                    images[r.image_path] = (size, digest)
                    paths_of_hash[digest].add(r.image_path)

        info = masks.get(r.mask_path)
        img = images.get(r.image_path)
        if r.image_path not in counted_images and info is not None:
            counted_images.add(r.image_path)
            by_zone[zone_label(info)] += 1
            if img is not None and img[0] is not None and img[0] != mask_shapes[r.mask_path]:
                report.add("error", "size_mismatch", f"image is {img[0][1]}x{img[0][0]} (WxH) but its mask is "
                           f"{mask_shapes[r.mask_path][1]}x{mask_shapes[r.mask_path][0]}", r.image_path, r.source)
        if info is None:
            continue
        said = zones_from_text(r.position) if r.position else []
        if info.zone == NONE and said != [NONE]:
            report.add("error", "empty_mask", "the mask is empty, so no position can be learnt from it",
                       r.mask_path, r.source)
            continue
        expected = _expected_zones(info)
        if r.position:
            if not said:
                report.add("warning", "position_unparsed", f"no zone found in the position text {r.position!r}",
                           source=r.source)
            elif set(said) != expected:
                report.add("warning", "position_mismatch", f"the position text says {', '.join(said)} but the "
                           f"mask's zone is {', '.join(sorted(expected))}", r.mask_path, r.source)
        answer_zones = zones_from_text(r.answer)
        if answer_zones and set(answer_zones) != expected:
            report.add("warning", "answer_mismatch", f"the answer says {', '.join(answer_zones)} but the mask's "
                       f"zone is {', '.join(sorted(expected))}", r.mask_path, r.source)

    for path, splits in splits_of_path.items():
        if len(splits) > 1:
            report.add("error", "split_leak", f"the same image is in splits {', '.join(sorted(splits))}", path)
    for digest, paths in paths_of_hash.items():
        splits = set().union(*(splits_of_path[p] for p in paths))
        if len(paths) > 1 and len(splits) > 1:
            names = ", ".join(sorted(str(p) for p in paths))
            report.add("error", "split_leak", f"identical image files in splits {', '.join(sorted(splits))}: {names}")

    report.images = len(images)
    report.counts = {
        "modality": dict(by_modality),
        "split": dict(by_split),
        "zone": dict(by_zone),
        "modality_split": {m: dict(c) for m, c in by_modality_split.items()},
    }
    return report
