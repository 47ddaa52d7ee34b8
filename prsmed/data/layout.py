"""Dataset layouts: the authors' per-modality CSVs and the project's JSONL manifest.

The authors' layout (PRSMED.md 4.2, 4.3)::

    <root>/data/<modality>/{train,val,test}_images/<id>.png|.jpg
    <root>/data/<modality>/{train,val,test}_masks/<id>.png        (ISIC: <id>_Segmentation.png)
    <root>/annotations/<modality>.csv                              (every CSV there is read)

with the columns ``image_path`` (the *mask*, relative to ``<root>/data``), ``image_name``, ``split``,
``question``, ``answer``, ``position``. The image is found from the mask path: ``*_masks`` becomes ``*_images``,
a ``_Segmentation`` suffix is dropped, and the first existing file among the mask's own extension and
``.jpg``, ``.jpeg``, ``.png`` is taken (``.jpg`` first, then ``.png``, for ISIC names). When ``<root>/data`` does
not exist the mask paths are taken relative to ``<root>``.

The manifest: one JSON object per line with ``image``, ``mask``, ``question``, ``answer``, ``modality``,
``split`` and an optional ``position``; relative paths are relative to the manifest's folder.

Like the authors' ``dropna()``, a row with an empty required field is dropped, but here every dropped row is
counted and kept in :attr:`RecordList.dropped` with its reason, and a warning is logged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from prsmed.fileio import sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
CSV_COLUMNS = ("image_path", "image_name", "split", "question", "answer", "position")
CSV_REQUIRED = ("image_path", "split", "question", "answer", "position")
MANIFEST_REQUIRED = ("image", "mask", "question", "answer", "modality", "split")
MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class ModalityInfo:
    """A modality folder and the words used for it in questions."""

    folder: str
    image_type: str  # the authors' {image_type} value
    display: str  # the {modality} slot of our questions
    target: str  # the {target} slot: what the lesion is called
    cls_id: int  # the authors' HEAD class id (PRSMED.md 4.1)


MODALITIES: dict[str, ModalityInfo] = {
    m.folder: m
    for m in (
        ModalityInfo("brain_tumors_ct_scan", "MRI", "brain MRI", "tumour", 0),
        ModalityInfo("breast_tumors_ct_scan", "ultrasound", "breast ultrasound", "mass", 1),
        ModalityInfo("lung_CT", "CT", "lung CT", "nodule", 2),
        ModalityInfo("lung_Xray", "X-ray", "chest X-ray", "lesion", 3),
        ModalityInfo("skin_rgbimage", "RGB", "dermoscopy", "skin lesion", 4),
        ModalityInfo("polyp_endoscopy", "endoscopy", "endoscopy", "polyp", 5),
    )
}


class DatasetError(ValueError):
    """A dataset cannot be read: says what layout was expected and what was found."""


@dataclass(frozen=True)
class Record:
    """One question about one image and its mask."""

    image_path: Path
    mask_path: Path
    question: str
    answer: str
    position: str | None
    modality: str
    split: str
    source: str = field(default="", compare=False)  # "annotations/lung_CT.csv:12", for messages

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_path"], d["mask_path"] = str(self.image_path), str(self.mask_path)
        return d


@dataclass(frozen=True)
class DroppedRow:
    source: str
    reason: str


class RecordList(list):
    """The records of a dataset, plus the rows that were dropped and why."""

    def __init__(self, records: Iterable[Record] = (), dropped: Iterable[DroppedRow] = (), layout: str = ""):
        super().__init__(records)
        self.dropped: list[DroppedRow] = list(dropped)
        self.layout = layout


def normalize_split(value: str) -> str | None:
    return _SPLIT_ALIASES.get((value or "").strip().lower())


def image_for_mask(mask_path: Path) -> Path:
    """The image that belongs to a mask, by the authors' naming rule (see the module docs)."""
    parts = list(mask_path.parts)
    for i in range(len(parts) - 2, -1, -1):  # the nearest folder named *_masks
        if parts[i].endswith("_masks"):
            parts[i] = parts[i][: -len("_masks")] + "_images"
            break
    folder = Path(*parts[:-1]) if len(parts) > 1 else Path(".")
    suffix = mask_path.suffix
    stem = mask_path.stem
    isic = stem.endswith("_Segmentation")
    if isic:
        stem = stem[: -len("_Segmentation")]
    order = [".jpg", ".png"] if isic else [suffix, ".jpg", ".jpeg", ".png"]
    candidates = []
    for ext in order:
        if ext and folder / (stem + ext) not in candidates:
            candidates.append(folder / (stem + ext))
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def _clean(value) -> str:
    return "" if value is None else str(value).strip()


def _load_csv_dir(root: Path, data_root: Path | None) -> RecordList:
    ann = root / "annotations"
    csvs = sorted(ann.glob("*.csv"))
    if not csvs:
        raise DatasetError(f"{ann}: expected one <modality>.csv per modality, found no CSV files")
    base = data_root or (root / "data" if (root / "data").is_dir() else root)
    records, dropped = [], []
    for path in csvs:
        modality = path.stem
        rel = f"annotations/{path.name}"
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_REQUIRED if c not in header]
            if missing:
                raise DatasetError(f"{rel}: expected the columns {', '.join(CSV_COLUMNS)}; missing "
                                   f"{', '.join(missing)}; found {', '.join(header) or 'no header'}")
            reader.fieldnames = header
            checked = [c for c in CSV_COLUMNS if c in header]
            for line, row in enumerate(reader, start=2):
                where = f"{rel}:{line}"
                empty = [c for c in checked if not _clean(row.get(c))]
                if empty:
                    dropped.append(DroppedRow(where, f"empty field(s): {', '.join(empty)}"))
                    continue
                split = normalize_split(row["split"])
                if split is None:
                    dropped.append(DroppedRow(where, f"unknown split {row['split']!r}: expected train, val or test"))
                    continue
                mask = base / _clean(row["image_path"])
                records.append(Record(image_for_mask(mask), mask, _clean(row["question"]), _clean(row["answer"]),
                                      _clean(row["position"]), modality, split, where))
    return RecordList(records, dropped, "csv")


def _load_manifest(path: Path) -> RecordList:
    base = path.parent
    records, dropped = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: expected one JSON object per line, found invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object, found {type(obj).__name__}")
            empty = [k for k in MANIFEST_REQUIRED if not _clean(obj.get(k))]
            if empty:
                dropped.append(DroppedRow(where, f"empty or missing field(s): {', '.join(empty)}"))
                continue
            split = normalize_split(obj["split"])
            if split is None:
                dropped.append(DroppedRow(where, f"unknown split {obj['split']!r}: expected train, val or test"))
                continue
            position = _clean(obj.get("position")) or None
            records.append(Record(base / _clean(obj["image"]), base / _clean(obj["mask"]), _clean(obj["question"]),
                                  _clean(obj["answer"]), position, _clean(obj["modality"]), split, where))
    return RecordList(records, dropped, "manifest")


def load_records(root_or_manifest, split: str | None = None, *, data_root=None) -> RecordList:
    """Read a dataset: a folder in the authors' layout, a folder holding ``manifest.jsonl``, or a ``.jsonl`` file.

    ``split`` keeps only that split (``train``, ``val`` or ``test``). Dropped rows are in ``.dropped``.
    """
    path = Path(root_or_manifest)
    if split is not None and normalize_split(split) is None:
        raise DatasetError(f"unknown split {split!r}: expected train, val or test")
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".json"):
            raise DatasetError(f"{path}: expected a .jsonl manifest or a dataset folder, found a {path.suffix} file")
        out = _load_manifest(path)
    elif path.is_dir():
        if (path / "annotations").is_dir():
            out = _load_csv_dir(path, Path(data_root) if data_root else None)
        elif (path / MANIFEST_NAME).is_file():
            out = _load_manifest(path / MANIFEST_NAME)
        else:
            raise DatasetError(f"{path}: expected annotations/<modality>.csv (the PRS-Med layout) or "
                               f"{MANIFEST_NAME}; found neither")
    else:
        raise DatasetError(f"{path}: no such file or folder")
    if out.dropped:
        log.warning("%s: dropped %d row(s) with empty fields or unknown splits (first: %s: %s)", path,
                    len(out.dropped), out.dropped[0].source, out.dropped[0].reason)
    if split is not None:
        wanted = normalize_split(split)
        out = RecordList([r for r in out if r.split == wanted], out.dropped, out.layout)
    return out


def write_manifest(records: Iterable[Record], path) -> Path:
    """Write records as a JSONL manifest; paths are written relative to its folder when they lie under it."""
    path = Path(path)
    base = path.parent.resolve()
    lines = []
    for r in records:
        obj = {}
        for key, p in (("image", r.image_path), ("mask", r.mask_path)):
            rp = Path(p).resolve()
            obj[key] = rp.relative_to(base).as_posix() if rp.is_relative_to(base) else str(rp)
        obj.update(question=r.question, answer=r.answer, modality=r.modality, split=r.split)
        if r.position:
            obj["position"] = r.position
        lines.append(json.dumps(obj, ensure_ascii=False))
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


def file_sha256(path, _cache: dict | None = None) -> str:
    key = str(path)
    if _cache is not None and key in _cache:
        return _cache[key]
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot hash the file for the data manifest ({e.strerror or e})") from e
    if _cache is not None:
        _cache[key] = digest
    return digest


def manifest_sha256(records: Iterable[Record]) -> str:
    """A stable SHA-256 of the data: each record's text fields plus the content hashes of its image and mask.

    File locations do not count (moving the dataset keeps the hash) and neither does row order (the per-record
    digests are sorted), so the same data always gives the same hash.
    """
    cache: dict[str, str] = {}
    digests = []
    for r in records:
        payload = {
            "question": r.question, "answer": r.answer, "position": r.position or "", "modality": r.modality,
            "split": r.split, "image": file_sha256(r.image_path, cache), "mask": file_sha256(r.mask_path, cache),
        }
        digests.append(hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest())
    top = hashlib.sha256()
    top.update(b"prsmed-data-manifest-v1\n")
    for d in sorted(digests):
        top.update(d.encode() + b"\n")
    return top.hexdigest()
