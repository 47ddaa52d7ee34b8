"""Dataset uploads: a zipped dataset is extracted safely, validated, stored by id; bad archives are refused whole."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from prsmed.data.layout import load_records, write_manifest
from prsmed.data.synth import synthesize

from prsmed_service.datasets import DatasetError, DatasetNotFound, DatasetStore, UploadTooLarge

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=24, seed=1, size=64)
    return root


@pytest.fixture
def store(tmp_path) -> DatasetStore:
    return DatasetStore(tmp_path / "datasets")


def zip_dir(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return buf.getvalue()


def zip_entries(*entries: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def leftovers(store: DatasetStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir())


def test_a_valid_upload_is_stored_listed_and_deleted(store, synth):
    info = store.add_zip(zip_dir(synth), name="demo")
    assert info.id and info.name == "demo" and info.layout == "csv"
    assert info.rows == 24 and sum(info.splits.values()) == 24 and set(info.splits) <= {"train", "val", "test"}
    assert len(info.modalities) == 6 and sum(info.modalities.values()) == 24
    assert info.size_bytes > 0 and info.created_at.endswith("Z")
    assert store.get(info.id) == info
    assert [i.id for i in store.list()] == [info.id]
    data = store.path(info.id)
    assert (data / "annotations").is_dir() and len(load_records(data)) == 24
    assert json.loads((store.root / info.id / "dataset.json").read_text())["id"] == info.id
    assert leftovers(store) == [info.id]  # nothing half-extracted left beside it
    store.delete(info.id)
    with pytest.raises(DatasetNotFound):
        store.get(info.id)
    assert leftovers(store) == []


def test_one_top_level_folder_a_file_object_and_a_path(store, synth, tmp_path):
    blob = zip_dir(synth, prefix="my_scans/")
    from_file = store.add_zip(io.BytesIO(blob))
    assert from_file.name == "my_scans" and store.path(from_file.id).name == "my_scans"
    archive = tmp_path / "upload.zip"
    archive.write_bytes(blob)
    from_path = store.add_zip(archive, name="again")
    # The same files again: the stored dataset is returned, not a copy (the SDK's finetune of one folder, twice).
    assert from_path.id == from_file.id and from_path.reused and not from_file.reused
    assert [i.id for i in store.list()] == [from_file.id] and leftovers(store) == [from_file.id]


def test_identical_files_are_one_dataset_however_they_are_zipped(store, synth):
    import zipfile

    first = store.add_zip(zip_dir(synth))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # another order, compression and time
        for path in sorted((p for p in synth.rglob("*") if p.is_file()), reverse=True):
            info = zipfile.ZipInfo(path.relative_to(synth).as_posix(), date_time=(2001, 2, 3, 4, 5, 6))
            zf.writestr(info, path.read_bytes())
    again = store.add_zip(buf.getvalue())
    assert again.id == first.id and again.reused and again.content_sha256 == first.content_sha256
    changed = synth / "extra-note.txt"
    changed.write_text("one more file")
    try:
        other = store.add_zip(zip_dir(synth))
    finally:
        changed.unlink()
    assert other.id != first.id and not other.reused


def test_a_stream_that_cannot_seek_is_spooled(store, synth):
    class Pipe:
        def __init__(self, data: bytes) -> None:
            self._b = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self._b.read(n)

        def seekable(self) -> bool:
            return False

    info = store.add_zip(Pipe(zip_dir(synth)))
    assert info.rows == 24 and leftovers(store) == [info.id]


def test_a_manifest_dataset(store, synth, tmp_path):
    root = tmp_path / "manifest_ds"
    shutil.copytree(synth, root)
    write_manifest(load_records(root), root / "manifest.jsonl")
    shutil.rmtree(root / "annotations")
    info = store.add_zip(zip_dir(root))
    assert info.layout == "manifest" and info.rows == 24


def test_a_manifest_may_not_point_outside_the_upload(store):
    line = {"image": "/etc/hostname", "mask": "../../secret.png", "question": "q?", "answer": "a",
            "modality": "lung_CT", "split": "train"}
    with pytest.raises(DatasetError, match="outside"):
        store.add_zip(zip_entries(("manifest.jsonl", json.dumps(line).encode() + b"\n")))
    assert leftovers(store) == []


@pytest.mark.parametrize("name", ["../evil.txt", "data/../../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_paths_that_escape_are_refused(store, synth, tmp_path, name):
    blob = zip_entries(("annotations/lung_CT.csv", b"image_path\n"), (name, b"x"))
    with pytest.raises(DatasetError, match="absolute|'\\.\\.'"):
        store.add_zip(blob)
    assert leftovers(store) == []
    assert not (tmp_path / "evil.txt").exists() and not (store.root / "evil.txt").exists()


def test_symlinks_are_refused(store, synth):
    link = zipfile.ZipInfo("data/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(DatasetError, match="symbolic link"):
        store.add_zip(zip_entries(("annotations/lung_CT.csv", b"image_path\n"), (link, b"../../../etc/passwd")))
    assert leftovers(store) == []


def test_non_zip_uploads_say_what_they_are(store):
    with pytest.raises(DatasetError, match="expected a ZIP archive.*found data starting"):
        store.add_zip(b"hello, this is not an archive")
    with pytest.raises(DatasetError, match="gzip"):
        store.add_zip(gzip.compress(b"x" * 100))
    with pytest.raises(DatasetError, match="empty upload"):
        store.add_zip(b"")
    with pytest.raises(DatasetError, match="damaged"):
        store.add_zip(b"PK\x03\x04" + b"\x00" * 200)
    assert leftovers(store) == []


def test_size_limits(tmp_path, synth):
    blob = zip_dir(synth)
    with pytest.raises(UploadTooLarge, match="limit"):
        DatasetStore(tmp_path / "a", max_upload_bytes=len(blob) - 1).add_zip(blob)
    with pytest.raises(UploadTooLarge, match="limit"):
        DatasetStore(tmp_path / "b", max_upload_bytes=1000).add_zip(io.BytesIO(blob))
    with pytest.raises(UploadTooLarge, match="expands to"):
        DatasetStore(tmp_path / "c", max_uncompressed_bytes=10_000).add_zip(blob)
    with pytest.raises(UploadTooLarge, match="entries"):
        DatasetStore(tmp_path / "d", max_files=5).add_zip(blob)
    assert issubclass(UploadTooLarge, DatasetError)
    for name in "abcd":
        assert list((tmp_path / name).iterdir()) == []


def test_a_zip_bomb_that_lies_about_its_size_is_stopped(store):
    real = 8 << 20
    blob = bytearray(zip_entries(("annotations/lung_CT.csv", b"\0" * real)))
    assert len(blob) < 100_000
    lie = struct.pack("<I", 1000)
    blob[22:26] = lie  # the local header's uncompressed size
    central = blob.rfind(b"PK\x01\x02")
    blob[central + 24:central + 28] = lie  # and the central directory's
    assert zipfile.ZipFile(io.BytesIO(bytes(blob))).infolist()[0].file_size == 1000
    small = DatasetStore(store.root, max_uncompressed_bytes=1 << 20)
    with pytest.raises(DatasetError, match="corrupt|declared"):
        small.add_zip(bytes(blob))
    assert leftovers(store) == []


def test_a_dataset_with_check_errors_is_refused_by_name(store, synth, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synth, broken)
    victim = min((broken / "data").rglob("*_images/*.png"))
    victim.unlink()
    with pytest.raises(DatasetError, match="missing_image") as err:
        store.add_zip(zip_dir(broken))
    message = str(err.value)
    assert "failed its check" in message and victim.name in message
    assert str(store.root) not in message and str(tmp_path) not in message  # no server paths in messages
    assert leftovers(store) == []


def test_warnings_are_kept(store, synth, tmp_path):
    noisy = tmp_path / "noisy"
    shutil.copytree(synth, noisy)
    csv_path = min((noisy / "annotations").glob("*.csv"))
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow(["lung_CT/train_masks/x.png", "x.png", "train", "", "an answer", "top left"])
    info = store.add_zip(zip_dir(noisy))
    assert info.rows == 24 and any(w.startswith("dropped_row") for w in info.warnings)


def test_an_archive_without_a_dataset_says_what_it_found(store):
    with pytest.raises(DatasetError, match="expected annotations/<modality>.csv.*found.*notes.txt"):
        store.add_zip(zip_entries(("notes.txt", b"hi"), ("pics/a.png", b"x")))
    with pytest.raises(DatasetError, match="no files"):
        store.add_zip(zip_entries(("empty/", b"")))
    # macOS archive litter is skipped, not mistaken for data
    with pytest.raises(DatasetError, match="found nothing|found .*notes"):
        store.add_zip(zip_entries(("__MACOSX/._x", b"junk"), ("notes.txt", b"hi")))
    assert leftovers(store) == []


@pytest.mark.parametrize("bad", ["", "../x", "ABCDEF012345", "0123456789ab/../x", "zz"])
def test_unknown_or_malformed_ids(store, bad):
    for call in (store.get, store.path, store.delete):
        with pytest.raises(DatasetNotFound):
            call(bad)
