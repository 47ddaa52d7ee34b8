"""Which base weights a model was built on, so that an adapter trained on one set is not loaded onto another.

An adapter (LoRA, vision encoder, fusion head) is trained against the frozen base weights it saw; on other base
weights of the same architecture it loads without complaint and predicts wrongly. So every model carries a
:class:`WeightsIdentity` of the files it was built from, every adapter bundle records its model's, and loading
compares the two.

* **Shipped weights** (``prsmed-tiny``, a few MB in the package) are hashed whole. A ``weights.json`` beside them
  (:class:`WeightsRecord`, written by :func:`write_record` whenever the recipe writes the files) records the
  preset, the weights' revision, the SHA-256 of every file, the identity combining them, and what the weights
  were trained on. A model built from exactly those files takes its revision from the record.
* **Large external weights** (the 7B presets: a converted LLaVA-Med directory of about 15 GB, SAM ViT-B) would take
  minutes to hash on every load, so each safetensors tensor contributes its name, dtype, shape and the SHA-256 of
  its first and last 64 KiB (:data:`SAMPLE_BYTES`). That reads a few tens of MB, tells apart any two trainings
  or conversions to another dtype (training moves every value of a tensor, and a merged LoRA every value of its
  matrices), and does not depend on how the tensors are split into shards. It is not a tamper check: an edit
  confined to the middle of a tensor goes unseen. Files in other formats (``tinysam_42.3.pth``, 40 MB) are
  hashed whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from prsmed.fileio import fsync_dir, sha256_file

RECORD = "weights.json"
RECORD_FORMAT = 1
# Safetensors files up to this size are hashed whole; above it, and for weight directories, tensors are sampled.
WHOLE_FILE_LIMIT = 256 << 20
SAMPLE_BYTES = 64 << 10
# Where a model's component options name its weights (the other location options, tokenizer and dtype, do not).
WEIGHT_OPTIONS = ("checkpoint", "pretrained")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_METHOD_RANK = {"none": 0, "files": 1, "sampled": 2, "named": 3}


class WeightsIdentity(BaseModel):
    """The identity of a set of base weights, as recorded in a bundle's manifest and shown to users."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # The weights' revision from their weights.json, or None when no record names these exact files.
    revision: str | None = None
    # Hex SHA-256 combining every weight file's hash (see combine()); "none" for a model built without weights.
    identity: str
    # files: every file hashed whole; sampled: tensors sampled (large external weights); named: some weights are
    # a remote id, identified by that name only; none: no weights were loaded (random initialisation).
    method: Literal["files", "sampled", "named", "none"]

    @property
    def short(self) -> str:
        return self.identity[:12]

    def label(self) -> str:
        """``revision 5 (identity 1a2b3c4d5e6f)``, as messages name weights."""
        if self.method == "none":
            return "no base weights (random initialisation)"
        revision = f"revision {self.revision}" if self.revision else "no recorded revision"
        return f"{revision} (identity {self.short})"


NO_WEIGHTS = WeightsIdentity(revision=None, identity="none", method="none")


class WeightsRecord(BaseModel):
    """``weights.json``: what a folder of shipped weights is, and what it was trained on."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = RECORD_FORMAT
    preset: str
    revision: str
    files: dict[str, str]  # file name -> SHA-256
    # Files fine-tuning reads but prediction does not (prsmed-tiny's tower probe): checked like the others, left out
    # of the identity, which names the weights a prediction or an adapter depends on.
    training_files: dict[str, str] = {}
    identity: str
    trained_on: str
    intended_use: str

    def as_identity(self) -> WeightsIdentity:
        return WeightsIdentity(revision=self.revision, identity=self.identity, method="files")


def combine(hashes: dict[str, str]) -> str:
    """One hash for a set of named hashes; the same set gives the same hash in any order."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\t{hashes[name]}\n".encode())
    return h.hexdigest()


def write_record(folder: str | Path, *, preset: str, revision: str, trained_on: str, intended_use: str,
                 training_only: Iterable[str] = ()) -> WeightsRecord:
    """(Re)write ``folder/weights.json`` from the ``*.safetensors`` files now in ``folder``; those named in
    ``training_only`` are recorded as training files, outside the identity."""
    folder = Path(folder)
    training_only = set(training_only)
    found = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    files = {k: v for k, v in found.items() if k not in training_only}
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder} to record; write the weights first")
    record = WeightsRecord(preset=preset, revision=str(revision), files=files, identity=combine(files),
                           training_files={k: v for k, v in found.items() if k in training_only},
                           trained_on=trained_on, intended_use=intended_use)
    tmp = folder / f".{RECORD}.tmp"
    tmp.write_text(record.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / RECORD)
    fsync_dir(folder)
    return record


def read_record(folder: str | Path) -> WeightsRecord | None:
    """``folder/weights.json``, or None when there is none. A record that cannot be read is an error."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        return WeightsRecord.model_validate_json(path.read_text())
    except (ValidationError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid weights record ({e}); rewrite it with "
                         f"prsmed.base_weights.write_record or rebuild the weights") from e


def check_record(folder: str | Path) -> list[str]:
    """How the files in ``folder`` differ from its record; [] when they match."""
    folder = Path(folder)
    record = read_record(folder)
    if record is None:
        return [f"{folder / RECORD} is missing"]
    problems = []
    on_disk = {p.name for p in folder.glob("*.safetensors")}
    recorded = {**record.files, **record.training_files}
    for name in sorted(on_disk - set(recorded)):
        problems.append(f"{name}: not in the record")
    for name, expected in sorted(recorded.items()):
        if name not in on_disk:
            problems.append(f"{name}: in the record but missing")
        elif (found := sha256_file(folder / name)) != expected:
            problems.append(f"{name}: SHA-256 {found[:12]} but the record says {expected[:12]}")
    if combine(record.files) != record.identity:
        problems.append(f"identity {record.identity[:12]} does not combine the recorded files' hashes")
    return problems


def weight_paths(spec) -> list[str]:
    """The weight locations a model spec's component options name (nothing for a spec without weights)."""
    out = []
    for kind in ("vision_encoder", "llm", "fusion_head"):
        options = getattr(spec, kind).options
        out += [str(options[k]) for k in WEIGHT_OPTIONS if options.get(k)]
    return out


def identify(paths: Iterable[str | os.PathLike]) -> WeightsIdentity:
    """The identity of the weights at ``paths`` (files, weight directories, or remote ids)."""
    paths = list(dict.fromkeys(str(p) for p in paths))
    if not paths:
        return NO_WEIGHTS
    entries: dict[str, str] = {}
    method = "files"
    for text in paths:
        path = Path(text)
        # Keyed by name so the identity is the same wherever the files live; a clash falls back to the full path.
        key = path.name if path.name not in entries else text
        if path.is_file() and (path.suffix != ".safetensors" or path.stat().st_size <= WHOLE_FILE_LIMIT):
            entries[key], kind = sha256_file(path), "files"
        elif path.is_file():
            entries[key], kind = combine(_sample_tensors(path)), "sampled"
        elif path.is_dir():
            entries[key + "/"], kind = _identify_dir(path)
        else:
            entries[text], kind = hashlib.sha256(f"named {text}".encode()).hexdigest(), "named"
        method = max(method, kind, key=_METHOD_RANK.__getitem__)
    identity = combine(entries)
    return WeightsIdentity(revision=_recorded_revision(paths, identity), identity=identity, method=method)


def _recorded_revision(paths: list[str], identity: str) -> str | None:
    folders = {Path(p).parent for p in paths}
    if len(folders) != 1 or not all(Path(p).is_file() for p in paths):
        return None
    try:
        record = read_record(folders.pop())
    except ValueError:
        return None
    return record.revision if record is not None and record.identity == identity else None


def _identify_dir(folder: Path) -> tuple[str, str]:
    shards = sorted(folder.rglob("*.safetensors"))
    if shards:  # what transformers loads when a directory has both formats
        tensors: dict[str, str] = {}
        for shard in shards:
            tensors.update(_sample_tensors(shard))
        return combine(tensors), "sampled"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return combine({p.relative_to(folder).as_posix(): sha256_file(p) for p in files}), "files"


def _sample_tensors(path: Path) -> dict[str, str]:
    """Tensor name -> hash of its dtype, shape and first and last SAMPLE_BYTES, read from a safetensors file."""
    out = {}
    with open(path, "rb") as f:
        try:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        except (struct.error, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download or re-convert it") from e
        base = 8 + size
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            h = hashlib.sha256(f"{info['dtype']} {info['shape']}\n".encode())
            f.seek(base + start)
            if end - start <= 2 * SAMPLE_BYTES:
                h.update(f.read(end - start))
            else:
                h.update(f.read(SAMPLE_BYTES))
                f.seek(base + end - SAMPLE_BYTES)
                h.update(f.read(SAMPLE_BYTES))
            out[name] = h.hexdigest()
    return out
