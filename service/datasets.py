"""Uploaded datasets: zipped, safely extracted, validated, and kept by id for training jobs.

An upload is a ZIP holding a dataset that :func:`prsmed.data.layout.load_records` reads (the authors'
``annotations/<modality>.csv`` + ``data/<modality>/...`` layout, or a ``manifest.jsonl``), either at the top of the
archive or inside one top-level folder. It is stored as::

    <root>/<id>/dataset.json     the DatasetInfo, plus where the data root lies inside files/
    <root>/<id>/files/...        the archive's contents

Extraction never trusts the archive: absolute paths, ``..``, links and special files are refused, the number of
entries and the declared sizes are bounded before anything is written, and the bytes actually written are counted
too, because an archive can lie about its sizes. Everything is written under a temporary folder that is renamed
into place only once the dataset passed :func:`prsmed.data.check.check_dataset`, so a half-extracted or invalid
upload is never visible under an id.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Self

from prsmed_sdk.models import DatasetInfo

from prsmed.data.layout import MANIFEST_NAME
from prsmed.data.layout import DatasetError as LayoutError
from prsmed.fileio import sha256_file

MiB = 1 << 20
GiB = 1 << 30
INFO_FILE = "dataset.json"
FILES_DIR = "files"
_ID = re.compile(r"^[0-9a-f]{12}$")
_CHUNK = 1 << 20
_SPOOL = "upload.zip"
_MAX_WARNINGS = 50
_MAX_ERRORS_SHOWN = 5
# Folders the archivers of some systems add; they hold no data and their "._x.csv" files would look like CSVs.
_JUNK_DIRS = {"__MACOSX"}
_JUNK_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
# Leftovers of an upload or delete that a crash interrupted are removed after this long.
_STALE_S = 6 * 3600


class DatasetError(ValueError):
    """The upload is not a usable dataset; the message says what was expected and what was found."""


class UploadTooLarge(DatasetError):
    """The upload, or what it expands to, is over one of the store's limits."""


class DatasetNotFound(LookupError):
    """No dataset has that id."""

    def __init__(self, dataset_id: str) -> None:
        super().__init__(f"no dataset with id {dataset_id!r}")
        self.dataset_id = dataset_id


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"


def _describe_bytes(head: bytes) -> str:
    """A guess at what a non-ZIP upload is, so the error can say what was found."""
    if not head:
        return "an empty upload"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data (a .tar.gz?)"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "a tar archive"
    if head.startswith(b"7z\xbc\xaf"):
        return "a 7-Zip archive"
    if head.startswith(b"Rar!"):
        return "a RAR archive"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    return f"data starting with {head[:8]!r}"


class DatasetStore:
    """Datasets under ``root``, one folder per id. Safe to use from several threads."""

    def __init__(self, root: str | Path, *, max_upload_bytes: int = 512 * MiB, max_uncompressed_bytes: int = 4 * GiB,
                 max_files: int = 200_000) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self.max_uncompressed_bytes = max_uncompressed_bytes
        self.max_files = max_files
        self._sweep()

    # --- reading ------------------------------------------------------------------------------------------------
    def _dir(self, dataset_id: str) -> Path:
        if not isinstance(dataset_id, str) or not _ID.match(dataset_id):
            raise DatasetNotFound(str(dataset_id))
        d = self.root / dataset_id
        if not (d / INFO_FILE).is_file():
            raise DatasetNotFound(dataset_id)
        return d

    def _record(self, dataset_id: str) -> dict:
        d = self._dir(dataset_id)
        try:
            return json.loads((d / INFO_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetNotFound(dataset_id) from e

    def get(self, dataset_id: str) -> DatasetInfo:
        return DatasetInfo.model_validate(self._record(dataset_id))

    def path(self, dataset_id: str) -> Path:
        """The data root to give the trainer (``--data``)."""
        rec = self._record(dataset_id)
        return self.root / dataset_id / FILES_DIR / rec.get("data_root", ".")

    def list(self) -> list[DatasetInfo]:
        """Every dataset, newest first."""
        out = []
        for d in self.root.iterdir():
            if _ID.match(d.name):
                try:
                    out.append(self.get(d.name))
                except DatasetNotFound:
                    continue  # being deleted right now
        return sorted(out, key=lambda i: (i.created_at, i.id), reverse=True)

    def delete(self, dataset_id: str) -> None:
        d = self._dir(dataset_id)
        # Renamed first so the id vanishes at once even when removing a large tree takes a while.
        trash = self.root / f".trash-{dataset_id}-{secrets.token_hex(4)}"
        try:
            os.rename(d, trash)
        except FileNotFoundError as e:
            raise DatasetNotFound(dataset_id) from e
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep(self) -> None:
        cutoff = time.time() - _STALE_S
        for d in self.root.glob(".*-*"):
            if d.name.startswith((".upload-", ".trash-")):
                try:
                    if d.stat().st_mtime < cutoff:
                        shutil.rmtree(d, ignore_errors=True)
                except OSError:
                    pass

    # --- adding -------------------------------------------------------------------------------------------------
    def add_zip(self, source: bytes | bytearray | BinaryIO | str | Path, *, name: str = "") -> DatasetInfo:
        """Extract, validate and store a zipped dataset; see the module docs. Raises :class:`DatasetError`
        (:class:`UploadTooLarge` for the limits)."""
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        try:
            with self._open_upload(source, staging) as f:
                info = self._extract_and_check(f, staging, name=name)
            (staging / _SPOOL).unlink(missing_ok=True)
            same = self._with_content(info["content_sha256"])
            if same is not None:  # the same files uploaded again (the SDK's finetune of one folder, twice)
                shutil.rmtree(staging, ignore_errors=True)
                return same.model_copy(update={"reused": True})
            dataset_id = self._publish(staging, info)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(dataset_id)

    def _with_content(self, content_sha256: str) -> DatasetInfo | None:
        """The stored dataset whose files are exactly these (names and bytes), if one is."""
        for info in self.list():
            if info.content_sha256 and info.content_sha256 == content_sha256:
                return info
        return None

    def _open_upload(self, source, staging: Path) -> BinaryIO:
        limit = self.max_upload_bytes
        too_big = f"the upload is over the limit of {_size(limit)}"
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) > limit:
                raise UploadTooLarge(f"{too_big}: found {_size(len(source))}")
            return io.BytesIO(bytes(source))
        if isinstance(source, (str, Path)):
            path = Path(source)
            try:
                size = path.stat().st_size
            except OSError as e:
                raise DatasetError(f"cannot read the upload {path.name}: {e.strerror or e}") from e
            if size > limit:
                raise UploadTooLarge(f"{too_big}: found {_size(size)}")
            return open(path, "rb")
        if not hasattr(source, "read"):
            raise TypeError(f"expected bytes, a binary file or a path; found {type(source).__name__}")
        if _seekable(source):
            start = source.tell()
            size = source.seek(0, io.SEEK_END) - start
            source.seek(start)
            if size > limit:
                raise UploadTooLarge(f"{too_big}: found {_size(size)}")
            return _Window(source, start)
        # A stream that cannot seek is copied, counting, because ZIP's directory sits at the end.
        spool = open(staging / _SPOOL, "w+b")  # noqa: SIM115 - handed to the caller, who closes it
        total = 0
        while chunk := source.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                spool.close()
                raise UploadTooLarge(f"{too_big}: found more than that")
            spool.write(chunk)
        spool.seek(0)
        return spool

    def _extract_and_check(self, f: BinaryIO, staging: Path, *, name: str) -> dict:
        head = f.read(512)
        f.seek(0)
        if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            raise DatasetError(f"expected a ZIP archive of the dataset folder; found {_describe_bytes(head)}")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:
            raise DatasetError(f"expected a readable ZIP archive; found a damaged one ({e})") from e
        with zf:
            members = self._plan(zf)
            files = staging / FILES_DIR
            files.mkdir()
            written = self._extract(zf, members, files)
        data_root = _find_root(files)
        _check_paths_inside(data_root, files)
        content = _content_sha256(data_root)
        report = _check(data_root, files)
        top = data_root.relative_to(files)
        info = DatasetInfo(
            id="", name=name or (top.parts[0] if top.parts else ""), created_at=_now(), size_bytes=written,
            layout=report.layout, rows=report.rows, splits=dict(report.counts.get("split", {})),
            modalities=dict(report.counts.get("modality", {})), warnings=_warnings(report, files),
            content_sha256=content,
        )
        return {**info.model_dump(mode="json"), "data_root": top.as_posix() or "."}

    def _plan(self, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath, bool]]:
        """The entries to extract (entry, safe relative path, is a folder); refuses a bad archive before anything
        is written."""
        infos = zf.infolist()
        if len(infos) > self.max_files:
            raise UploadTooLarge(f"expected at most {self.max_files} entries in the archive; found {len(infos)}")
        members, declared = [], 0
        for info in infos:
            rel = _safe_name(info.filename)
            if rel is None:
                continue
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise DatasetError(f"{info.filename!r}: the archive holds a symbolic link; expected only regular "
                                   f"files and folders")
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise DatasetError(f"{info.filename!r}: the archive holds a special file (mode {oct(kind)}); "
                                   f"expected only regular files and folders")
            if info.flag_bits & 0x1:
                raise DatasetError(f"{info.filename!r} is encrypted; expected an archive without a password")
            declared += info.file_size
            members.append((info, rel, info.is_dir() or info.filename.replace("\\", "/").endswith("/")))
        if declared > self.max_uncompressed_bytes:
            raise UploadTooLarge(f"the archive expands to {_size(declared)}; the limit is "
                                 f"{_size(self.max_uncompressed_bytes)}")
        if all(is_dir for _, _, is_dir in members):
            raise DatasetError("expected a dataset in the archive; found no files")
        return members

    def _extract(self, zf: zipfile.ZipFile, members, dest: Path) -> int:
        budget = self.max_uncompressed_bytes
        total = 0
        for info, rel, is_dir in members:
            target = dest.joinpath(*rel.parts)
            try:
                if is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        total += len(chunk)
                        if total > budget:
                            raise UploadTooLarge(f"the archive expands beyond the limit of {_size(budget)} "
                                                 f"(while writing {info.filename!r})")
                        if written > info.file_size:
                            raise DatasetError(f"{info.filename!r} expands beyond its declared size of "
                                               f"{info.file_size} bytes; the archive is corrupt or malicious")
                        out.write(chunk)
            except FileExistsError as e:
                raise DatasetError(f"{info.filename!r} appears twice in the archive; expected unique paths") from e
            except NotADirectoryError as e:
                raise DatasetError(f"{info.filename!r}: a file and a folder share a name in the archive") from e
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise DatasetError(f"{info.filename!r} cannot be extracted: the archive is corrupt or lies about "
                                   f"its sizes ({e})") from e
            except NotImplementedError as e:
                raise DatasetError(f"{info.filename!r} uses a compression method this server cannot read ({e}); "
                                   f"expected deflate or store") from e
        return total

    def _publish(self, staging: Path, record: dict) -> str:
        while True:
            dataset_id = secrets.token_hex(6)
            record["id"] = dataset_id
            (staging / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            try:
                os.rename(staging, self.root / dataset_id)
                return dataset_id
            except OSError:
                if not (self.root / dataset_id).exists():
                    raise
                # Another upload drew the same id: draw again.


def _content_sha256(root: Path) -> str:
    """A hash of the dataset's files, their paths under its root and their bytes: the same folder zipped twice
    (other timestamps, another order, another compression) gives the same hash."""
    listing = "".join(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n"
                      for p in sorted(p for p in root.rglob("*") if p.is_file()))
    return hashlib.sha256(listing.encode()).hexdigest()


def _seekable(f) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


class _Window:
    """A seekable stream seen from ``start`` on (an upload the caller had already read into), closing nothing."""

    def __init__(self, f: BinaryIO, start: int) -> None:
        self._f, self._start = f, start

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            offset += self._start
        return self._f.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._f.tell() - self._start

    def seekable(self) -> bool:
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _safe_name(name: str) -> PurePosixPath | None:
    """The entry's path relative to the extraction folder, None for junk to skip; refuses escaping paths."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise DatasetError(f"{name!r}: expected paths relative to the archive; found an absolute path")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"{name!r}: expected paths inside the archive; found '..'")
    if not parts or parts[0] in _JUNK_DIRS or parts[-1] in _JUNK_FILES or parts[-1].startswith("._"):
        return None
    if any("\x00" in p for p in parts):
        raise DatasetError(f"{name!r}: a path with a NUL character")
    return PurePosixPath(*parts)


def _is_data_root(d: Path) -> bool:
    return (d / "annotations").is_dir() or (d / MANIFEST_NAME).is_file()


def _find_root(files: Path) -> Path:
    """The archive's top, or the single folder the archive wrapped everything in."""
    here = files
    for _ in range(3):
        if _is_data_root(here):
            return here
        entries = list(here.iterdir())
        if len(entries) == 1 and entries[0].is_dir():
            here = entries[0]
            continue
        break
    found = sorted(p.relative_to(files).as_posix() + ("/" if p.is_dir() else "") for p in here.iterdir())
    shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
    where = here.relative_to(files).as_posix()
    raise DatasetError(
        f"expected annotations/<modality>.csv (the PRS-Med layout) or {MANIFEST_NAME} at the top of the archive or "
        f"inside its one top-level folder; found {'in ' + where + '/: ' if where != '.' else ''}{shown or 'nothing'}"
    )


def _check_paths_inside(data_root: Path, files: Path) -> None:
    """Every image and mask a row names must lie inside the upload: a manifest may not point at server files."""
    from prsmed.data.layout import load_records

    try:
        records = load_records(data_root)
    except LayoutError as e:
        raise DatasetError(_relative(str(e), files)) from e
    top = files.resolve()
    for r in records:
        for p in (r.image_path, r.mask_path):
            if not Path(p).resolve().is_relative_to(top):
                raise DatasetError(f"{r.source}: expected image and mask paths inside the dataset; found "
                                   f"{_relative(str(p), files)!r}, which lies outside it")


def _check(data_root: Path, files: Path):
    from prsmed.data.check import check_dataset

    report = check_dataset(data_root)
    if report.errors:
        total = report.to_dict()["n_errors"]
        shown = "; ".join(_issue(i, files) for i in report.errors[:_MAX_ERRORS_SHOWN])
        more = f" (and {total - _MAX_ERRORS_SHOWN} more)" if total > _MAX_ERRORS_SHOWN else ""
        raise DatasetError(f"the dataset failed its check with {total} error(s): {shown}{more}")
    return report


def _issue(issue, files: Path) -> str:
    where = ", ".join(w for w in (issue.source, issue.path) if w)
    text = f"{issue.code}: {issue.message}" + (f" [{where}]" if where else "")
    return _relative(text, files)


def _warnings(report, files: Path) -> list[str]:
    out = [_issue(i, files) for i in report.warnings[:_MAX_WARNINGS]]
    hidden = report.to_dict()["n_warnings"] - len(out)
    if hidden > 0:
        out.append(f"... and {hidden} more warning(s)")
    return out


def _relative(text: str, files: Path) -> str:
    """Messages name files relative to the upload, never by their place on the server."""
    for base in {str(files.resolve()), str(files)}:
        text = text.replace(base + os.sep, "").replace(base, ".")
    return text
