"""--report-to: the metrics a run logs reach Weights & Biases (offline mode, read back from its own run file) as
well as metrics.jsonl, and a missing wandb names its extra before the first step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from small_training import config, metrics, run


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the offline wandb run under ``run_dir``: its run file is a LevelDB-style log (32 KiB
    blocks of records with a 7-byte header: CRC, length, kind) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_receives_the_runs_metrics(tmp_path, data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    result = run(config(data, out, max_steps=3, report_to="tensorboard,wandb", tensorboard=True))
    assert result.status == "completed", result.reason
    rows = wandb_history(out)
    logged = [m for m in metrics(out) if m["kind"] == "train"]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [m["step"] for m in logged] == [1, 2, 3]
    assert [r["train/loss"] for r in train] == pytest.approx([m["loss"] for m in logged])
    assert any("train/lr" in r and "train/samples_per_s" in r for r in train)
    assert any("val/score" in r for r in rows), rows[-1]
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard still written beside it
    assert (out / "wandb-run-id").read_text().strip() in next(out.glob("wandb/offline-run-*")).name


def test_report_to_wandb_without_wandb_names_the_extra(tmp_path, data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = run(config(data, tmp_path / "run", max_steps=1, report_to="wandb"))
    assert result.status == "failed" and result.step == 0
    assert "pip install 'prsmed[wandb]'" in result.reason, result.reason


def test_report_to_is_checked(tmp_path):
    with pytest.raises(ValueError, match="tensorboard, wandb"):
        config(tmp_path, tmp_path / "run", report_to="mlflow")
    assert config(tmp_path, tmp_path / "r", report_to="none", tensorboard=True).destinations() == []
    assert config(tmp_path, tmp_path / "r", report_to="wandb,tensorboard", tensorboard=False).destinations() == ["wandb"]
