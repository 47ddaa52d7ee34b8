"""Synthetic data, the PRS-Med layout and manifest, the dataset checker and the `prsmed data` commands."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from prsmed.data.check import check_dataset
from prsmed.data.cli import data_app
from prsmed.data.layout import (
    MODALITIES,
    DatasetError,
    image_for_mask,
    load_records,
    manifest_sha256,
    write_manifest,
)
from prsmed.data.readers import read_image, read_mask
from prsmed.data.synth import STANDARD, render_sample, synthesize
from prsmed.data.templates import TEST_QUESTIONS, TRAIN_QUESTIONS
from prsmed.data.zones import zone_of_mask, zones_from_text


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=60, seed=3, size=96, questions_per_image=2)
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def _rows(root: Path, modality: str) -> list[dict]:
    with open(root / "annotations" / f"{modality}.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(root: Path, modality: str, rows: list[dict]) -> None:
    with open(root / "annotations" / f"{modality}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------------------------
# Synthesis


def test_synth_layout_splits_questions_and_labels(synth_root):
    assert sorted(p.stem for p in (synth_root / "annotations").glob("*.csv")) == sorted(STANDARD)
    records = load_records(synth_root)
    assert len(records) == 120 and records.dropped == []
    splits = {r.split for r in records}
    assert splits == {"train", "val", "test"}
    train_q = {q.format(modality=m.display, target=m.target) for m in MODALITIES.values() for q in TRAIN_QUESTIONS}
    test_q = {q.format(modality=m.display, target=m.target) for m in MODALITIES.values() for q in TEST_QUESTIONS}
    for r in records:
        assert r.image_path.is_file() and r.mask_path.is_file(), r
        assert r.question in (test_q if r.split == "test" else train_q), r.question
        info = zone_of_mask(read_mask(r.mask_path))
        expected = {z for z, _ in info.lesions}
        assert set(zones_from_text(r.position)) == expected
        assert set(zones_from_text(r.answer)) == expected
    # two questions per image, never the same one twice
    by_image: dict = {}
    for r in records:
        by_image.setdefault(r.image_path, []).append(r.question)
    assert all(len(qs) == 2 and qs[0] != qs[1] for qs in by_image.values())
    # ISIC naming for skin: <id>.jpg with <id>_Segmentation.png masks
    skin = [r for r in records if r.modality == "skin_rgbimage"]
    assert skin and all(r.mask_path.name.endswith("_Segmentation.png") and r.image_path.suffix == ".jpg"
                        for r in skin)
    header = (synth_root / "annotations" / "lung_CT.csv").read_text().splitlines()[0]
    assert header == "image_path,image_name,split,question,answer,position"
    # masks are binary 0/255
    mask = np.asarray(Image.open(records[0].mask_path))
    assert set(np.unique(mask)) <= {0, 255}
    info = json.loads((synth_root / "synth.json").read_text())
    assert info["seed"] == 3 and info["images"] == 60


def test_synth_is_deterministic(tmp_path):
    synthesize(tmp_path / "a", n=14, seed=7, size=64)
    synthesize(tmp_path / "b", n=14, seed=7, size=64)
    synthesize(tmp_path / "c", n=14, seed=8, size=64)
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c


def test_styles_look_different_and_cover_all_zones():
    looks = {}
    for style in STANDARD + ("retina_fundus",):
        img, mask = render_sample(style, 0, 1, 64)
        assert mask.any() and mask.shape == (64, 64)
        looks[style] = (img.ndim, round(float(img.mean()), 1))
    assert looks["lung_CT"][0] == 2 and looks["skin_rgbimage"][0] == 3 and looks["retina_fundus"][0] == 3
    assert len(set(looks.values())) == len(looks)  # no two styles share a colour model and brightness
    zones = set()
    for i in range(36):
        info = zone_of_mask(render_sample("brain_tumors_ct_scan", 0, i, 128)[1])
        zones.add((info.zone, info.near_center))
    assert {"center", "top left", "top right", "bottom left", "bottom right"} <= {z for z, _ in zones}
    assert any(near for z, near in zones if z != "center") and any(not near for z, near in zones)
    two = zone_of_mask(render_sample("lung_CT", 0, 0, 128, two_lesions=True)[1])
    assert len(two.lesions) == 2


def test_unseen_style(tmp_path):
    summary = synthesize(tmp_path, n=8, seed=0, size=64, style="unseen")
    assert summary.styles == ["retina_fundus"]
    assert [p.stem for p in (tmp_path / "annotations").glob("*.csv")] == ["retina_fundus"]
    assert check_dataset(tmp_path).ok
    with pytest.raises(ValueError, match="unknown style 'fancy'"):
        synthesize(tmp_path / "x", n=4, style="fancy")


def test_no_lesion_images_and_other_phrasings(tmp_path):
    summary = synthesize(tmp_path / "a", n=60, seed=3, size=64, no_lesion_fraction=0.3, phrasing="plain")
    rows = load_records(tmp_path / "a")
    empty = [r for r in rows if not read_mask(r.mask_path).any()]
    assert 8 <= len(empty) <= 30 and summary.by_zone.get("none") == len(empty)
    for r in rows:  # every answer reads back to the zones of its own mask, "none" for an empty one
        info = zone_of_mask(read_mask(r.mask_path))
        want = sorted({z for z, _ in info.lesions}) or ["none"]
        assert sorted(set(zones_from_text(r.answer))) == want, r.answer
        if want != ["none"]:
            assert "upper" in r.answer or "lower" in r.answer or "centre" in r.answer, r.answer
            assert "top" not in r.answer and "bottom" not in r.answer, r.answer
    assert check_dataset(tmp_path / "a").ok
    # Images with no lesion are drawn from a stream of their own: the others are the bytes they were without.
    synthesize(tmp_path / "b", n=60, seed=3, size=64, phrasing="plain")
    kept = [r for r in rows if r not in empty]
    same = sum((tmp_path / "b" / r.image_path.relative_to(tmp_path / "a")).read_bytes() == r.image_path.read_bytes()
               for r in kept)
    assert same == len(kept)
    with pytest.raises(ValueError, match="unknown phrasing 'fancy'"):
        synthesize(tmp_path / "c", n=4, size=64, phrasing="fancy")


@pytest.mark.parametrize("style", ["histology_slide", "thermal_image"])
def test_more_unseen_styles(tmp_path, style):
    summary = synthesize(tmp_path, n=6, seed=0, size=64, style=style, phrasing="radiology")
    assert summary.styles == [style]
    assert check_dataset(tmp_path).ok
    assert all(r.answer.startswith(("Finding", "A ")) for r in load_records(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# Layout and manifest


def test_image_for_mask_rules(tmp_path):
    d = tmp_path / "skin" / "train_images"
    d.mkdir(parents=True)
    mask = tmp_path / "skin" / "train_masks" / "ISIC_0000001_Segmentation.png"
    assert image_for_mask(mask) == d / "ISIC_0000001.jpg"  # nothing exists: the first candidate
    (d / "ISIC_0000001.png").write_bytes(b"")
    assert image_for_mask(mask) == d / "ISIC_0000001.png"
    (d / "ISIC_0000001.jpg").write_bytes(b"")
    assert image_for_mask(mask) == d / "ISIC_0000001.jpg"  # .jpg wins
    assert image_for_mask(tmp_path / "lung" / "test_masks" / "12.png") == tmp_path / "lung" / "test_images" / "12.png"


def test_dropped_rows_are_counted_and_bad_layouts_explained(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path)
    rows = _rows(root, "lung_Xray")
    rows[0]["answer"] = ""
    rows[1]["split"] = "holdout"
    _write_rows(root, "lung_Xray", rows)
    records = load_records(root)
    assert len(records) == 118
    reasons = [d.reason for d in records.dropped]
    assert reasons == ["empty field(s): answer", "unknown split 'holdout': expected train, val or test"]
    assert records.dropped[0].source == "annotations/lung_Xray.csv:2"
    assert {r.split for r in load_records(root, "test")} == {"test"}
    with pytest.raises(DatasetError, match="unknown split"):
        load_records(root, "dev-test")
    (root / "annotations" / "bad.csv").write_text("image_path,question\nx.png,q\n")
    with pytest.raises(DatasetError, match="missing split, answer, position"):
        load_records(root)
    with pytest.raises(DatasetError, match="found neither"):
        load_records(tmp_path / "copy" / "data")
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_records(tmp_path / "nowhere")


def test_manifest_roundtrip_and_stable_hash(synth_root, tmp_path):
    records = load_records(synth_root)
    digest = manifest_sha256(records)
    assert digest == manifest_sha256(list(reversed(records)))  # row order does not count
    copy = _copy(synth_root, tmp_path)
    moved = load_records(copy)
    assert manifest_sha256(moved) == digest  # nor does the location
    manifest = write_manifest(moved, copy / "manifest.jsonl")
    first = json.loads(manifest.read_text().splitlines()[0])
    assert set(first) == {"image", "mask", "question", "answer", "modality", "split", "position"}
    assert not Path(first["image"]).is_absolute()
    again = load_records(manifest)
    assert list(again) == list(moved)  # equal up to where each row came from
    assert manifest_sha256(again) == digest
    # one changed mask byte changes the hash
    mask = moved[0].mask_path
    img = np.asarray(Image.open(mask)).copy()
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(mask)
    assert manifest_sha256(load_records(copy / "manifest.jsonl")) != digest
    # a folder with only the manifest is read too; bad lines are explained or dropped and counted
    shutil.rmtree(copy / "annotations")
    assert len(load_records(copy)) == len(moved)
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:3] + ['{"image": "x.png"}']) + "\n")
    out = load_records(manifest)
    assert len(out) == 3 and "mask, question, answer, modality, split" in out.dropped[0].reason
    manifest.write_text("not json\n")
    with pytest.raises(DatasetError, match=r"manifest.jsonl:1: expected one JSON object per line"):
        load_records(manifest)


# ----------------------------------------------------------------------------------------------------------------
# Checker


def test_check_passes_on_synthetic_data(synth_root):
    report = check_dataset(synth_root)
    assert report.ok and report.errors == [] and report.warnings == [], report.summary()
    d = json.loads(report.to_json())
    assert d["ok"] and d["rows"] == 120 and d["images"] == 60
    assert sum(d["counts"]["split"].values()) == 120
    assert set(d["counts"]["modality"]) == set(STANDARD)
    assert sum(d["counts"]["zone"].values()) == 60
    assert d["counts"]["modality_split"]["lung_CT"]["train"] > 0


def test_check_finds_each_problem(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path)
    recs = [r for r in load_records(root) if r.modality == "brain_tumors_ct_scan"]
    by_image = {}
    for r in recs:
        by_image.setdefault(r.image_path, r)
    broken = list(by_image.values())[:6]
    r_missing, r_corrupt_mask, r_nonbinary, r_size, r_empty, r_leak = broken
    r_missing.image_path.unlink()
    r_corrupt_mask.mask_path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    m = np.asarray(Image.open(r_nonbinary.mask_path)).copy()
    m[m > 0] = 200
    m[0, 0] = 90
    Image.fromarray(m).save(r_nonbinary.mask_path)
    Image.open(r_size.image_path).resize((40, 30)).save(r_size.image_path)
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(r_empty.mask_path)
    rows = _rows(root, "brain_tumors_ct_scan")
    leak_rel = r_leak.mask_path.relative_to(root / "data").as_posix()
    leak_row = next(row for row in rows if row["image_path"] == leak_rel)
    other = {"train": "test", "val": "test", "test": "train"}[leak_row["split"]]
    rows.append({**leak_row, "split": other})
    wrong = next(row for row in rows if row["image_path"] not in
                 {x.mask_path.relative_to(root / "data").as_posix() for x in broken})
    info = zone_of_mask(read_mask(root / "data" / wrong["image_path"]))
    opposite = {"top left": "bottom right", "top right": "bottom left", "bottom left": "top right",
                "bottom right": "top left", "center": "top left"}[info.zone]
    wrong["position"] = f"The tumour is in the {opposite} region."
    rows.append({**rows[0], "question": ""})
    _write_rows(root, "brain_tumors_ct_scan", rows)

    report = check_dataset(root)
    codes = {i.code for i in report.errors}
    assert {"missing_image", "unreadable_mask", "size_mismatch", "empty_mask", "split_leak"} <= codes, report.summary()
    warn = {i.code for i in report.warnings}
    assert {"non_binary_mask", "position_mismatch", "dropped_row"} <= warn, report.summary()
    assert not report.ok
    mismatch = next(i for i in report.warnings if i.code == "position_mismatch")
    assert opposite in mismatch.message and mismatch.source.startswith("annotations/brain_tumors_ct_scan.csv:")
    json.dumps(report.to_dict())
    quick = check_dataset(root, read_pixels=False)
    assert {i.code for i in quick.errors} >= {"missing_image", "split_leak"}


def test_check_reports_unreadable_layout(tmp_path):
    report = check_dataset(tmp_path)
    assert not report.ok and report.errors[0].code == "layout"


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_synth_and_check(tmp_path):
    runner = CliRunner()
    out = tmp_path / "ds"
    res = runner.invoke(data_app, ["synth", str(out), "--n", "12", "--seed", "1", "--size", "64"])
    assert res.exit_code == 0, res.output
    assert "wrote 12 images" in res.output
    res = runner.invoke(data_app, ["check", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ok"] is True
    res = runner.invoke(data_app, ["check", str(out)])
    assert res.exit_code == 0 and "0 error(s)" in res.output
    next((out / "data").rglob("*_images/*.png")).unlink()
    res = runner.invoke(data_app, ["check", str(out), "--json"])
    assert res.exit_code == 1
    assert json.loads(res.output)["issue_counts"]["missing_image"] == 1
    res = runner.invoke(data_app, ["synth", str(tmp_path / "u"), "--n", "3", "--size", "64", "--style", "unseen",
                                   "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["styles"] == ["retina_fundus"]
    res = runner.invoke(data_app, ["synth", str(tmp_path / "x"), "--style", "other"])
    assert res.exit_code == 2 and "unknown style" in res.output


def test_read_image_accepts_synthetic_files(synth_root):
    rec = load_records(synth_root)[0]
    img = read_image(rec.image_path)
    assert img.mode == "RGB" and img.size == (96, 96)
