"""Checkpoints mirrored to object storage (--checkpoint-uri), against a real S3-compatible server on 127.0.0.1 with
authentication on (tests/object_store.py): a run killed and its disk lost resumes from the bucket to the weights
of a run never interrupted; cut-off or damaged remote checkpoints are skipped; wrong credentials stop the run
before its first step; no credential reaches a log."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch

from prsmed.train.checkpoint import Checkpoint, CheckpointManager
from prsmed.train.remote import MARKER, CheckpointMirror, RemoteError
from object_store import start_object_store
from small_training import SINGLE, assert_same_weights, config, driver, run, single_process_args


@pytest.fixture(scope="module")
def store():
    s = start_object_store()
    yield s
    s.stop()


@pytest.fixture()
def s3_env(store, monkeypatch):
    for key, value in store.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return store


def _no_secret(store, *texts: str) -> None:
    for text in texts:
        assert store.secret not in text


def _checkpoint(step: int) -> Checkpoint:
    return Checkpoint(trained={"w": torch.full((3,), float(step))}, optimizer={"state": {}, "param_groups": []},
                      scheduler={"last_epoch": step}, rng_tensors={"r": torch.zeros(2)}, state={"step": step},
                      scaler=None)


@pytest.mark.slow
def test_a_killed_run_whose_disk_is_lost_resumes_from_the_bucket_exactly(tmp_path, data, s3_env):
    store = s3_env
    straight = tmp_path / "straight"
    assert run(config(data, straight, **SINGLE)).status == "completed"

    script, spec = driver(tmp_path)
    out, uri = tmp_path / "killed", "s3://runs/killed"
    log = tmp_path / "trainer.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(single_process_args(script, spec, data, out, "--checkpoint-uri", uri),
                                stdout=f, stderr=subprocess.STDOUT, env=store.env())
    deadline = time.monotonic() + 180
    def complete_steps() -> list[int]:
        return [int(k.split("/")[2][5:]) for k in store.keys("killed/checkpoints/") if k.endswith(MARKER)]

    # A checkpoint from the middle of the run (one still queued when a newer one is written is skipped).
    while not any(6 <= step < 12 for step in complete_steps()):
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "no complete checkpoint reached the bucket"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    shutil.rmtree(out)  # the machine and its disk are gone; a new one starts with an empty --out

    result = run(config(data, out, model=str(spec), resume=True, checkpoint_uri=uri, **SINGLE))
    assert result.status == "completed" and result.step == 12, result.reason
    assert_same_weights(straight, out, "resumed from s3:// after SIGKILL and a lost disk")
    train_log = (out / "train.log").read_text()
    assert "restored checkpoint step-0000000" in train_log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint_uri"]["uri"] == uri and not summary["checkpoint_uri"]["errors"], summary

    keys = store.keys("killed/")
    steps = sorted({k.split("/")[2] for k in keys if k.startswith("killed/checkpoints/")})
    assert "step-00000012" in steps and len(steps) <= 3 + 1, steps  # keep-last 3, and the best one
    assert "killed/adapter/" + MARKER in keys and "killed/adapter/adapter_manifest.json" in keys
    assert "killed/summary.json" in keys
    _no_secret(store, log.read_text(), train_log, (out / "summary.json").read_text(), result.reason)


def test_cut_off_and_damaged_remote_checkpoints_are_skipped(tmp_path, store, s3_env, caplog):
    local = CheckpointManager(tmp_path / "local", keep_last=5)
    mirror = CheckpointMirror("s3://runs/partial", keep_last=5)
    mirror.check_access()
    for step in (1, 2, 3):  # each uploaded before the next is written (a newer one queued would replace it)
        mirror.submit(local.save(_checkpoint(step)))
        assert mirror.flush(60)
    assert mirror.complete() == ["step-00000001", "step-00000002", "step-00000003"]
    client = store.client()
    client.delete_object(Bucket="runs", Key=f"partial/checkpoints/step-00000003/{MARKER}")  # upload cut off
    client.put_object(Bucket="runs", Key="partial/checkpoints/step-00000002/trained.safetensors", Body=b"\0" * 64)

    fresh = CheckpointManager(tmp_path / "fresh")
    with caplog.at_level("WARNING", logger="prsmed.train"):
        restored = mirror.restore_newer(fresh.root, fresh.latest_valid())
    assert restored is not None and restored.name == "step-00000001"
    assert fresh.load(restored).trained["w"].tolist() == [1.0, 1.0, 1.0]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "step-00000003: it has no COMPLETE marker" in messages
    assert "step-00000002" in messages and "SHA-256" in messages
    assert not list((tmp_path / "fresh").glob(".tmp-*"))

    # A local checkpoint as new as anything complete on the remote: it is the one used, nothing is downloaded.
    before = sorted(p.name for p in fresh.root.iterdir())
    assert mirror.restore_newer(fresh.root, restored) == restored
    assert sorted(p.name for p in fresh.root.iterdir()) == before


def test_wrong_credentials_stop_the_run_before_its_first_step(tmp_path, data, s3_env, monkeypatch):
    store = s3_env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-wrong-secret")
    out = tmp_path / "run"
    result = run(config(data, out, checkpoint_uri="s3://runs/denied", max_steps=2))
    assert result.status == "failed" and result.step == 0
    assert "cannot write there" in result.reason and "signature" in result.reason.lower(), result.reason
    assert not (out / "checkpoints").exists()
    text = (out / "train.log").read_text() + (out / "summary.json").read_text()
    assert "wrong-secret-wrong-secret" not in text and store.secret not in text


def test_a_new_run_refuses_a_uri_that_holds_another_runs_checkpoints(tmp_path, data, s3_env):
    first = run(config(data, tmp_path / "a", checkpoint_uri="s3://runs/taken", max_steps=2, save_every=1))
    assert first.status == "completed", first.reason
    second = run(config(data, tmp_path / "b", checkpoint_uri="s3://runs/taken", max_steps=2))
    assert second.status == "failed" and "already holds checkpoints" in second.reason and "--resume" in second.reason


def test_a_store_without_its_backend_names_the_extra(tmp_path, data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(RemoteError, match=r"prsmed\[gcs\]"):
        CheckpointMirror("gs://bucket/run", keep_last=1)


def test_file_urls_mirror_too(tmp_path):
    local = CheckpointManager(tmp_path / "local", keep_last=2)
    mirror = CheckpointMirror(f"file://{tmp_path}/disk/run", keep_last=2)
    mirror.check_access()
    for step in (1, 2, 3):
        mirror.submit(local.save(_checkpoint(step)), best="step-00000001" if step > 1 else None)
        assert mirror.flush(30)
    # keep-last 2 applies remotely, and the best one is kept too
    assert mirror.complete() == ["step-00000001", "step-00000002", "step-00000003"]
    mirror.keep_last = 1
    mirror.prune(best=None)
    assert mirror.complete() == ["step-00000003"]


def test_sigterm_waits_for_the_upload_of_its_last_checkpoint(tmp_path, data, store):
    script, spec = driver(tmp_path)
    out, log = tmp_path / "spot", tmp_path / "trainer.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(single_process_args(script, spec, data, out, "--checkpoint-uri", "s3://runs/spot"),
                                stdout=f, stderr=subprocess.STDOUT, env=store.env())
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").exists() or '"kind": "train", "step": 4' not in (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # a spot machine being reclaimed
    assert proc.wait(120) == 75, log.read_text()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted"
    last = f"step-{summary['step']:08d}"
    # The checkpoint written on SIGTERM is complete in the bucket before the process is gone.
    assert f"spot/checkpoints/{last}/{MARKER}" in store.keys("spot/"), store.keys("spot/")
    assert summary["checkpoint_uri"]["last_uploaded"] == last


def test_a_dataset_in_a_bucket_is_fetched_to_a_folder(tmp_path, store, s3_env):
    from prsmed.cloud.fetch import main as fetch_main

    client = store.client()
    for key, body in (("data/annotations/brain.csv", b"image,mask\n"), ("data/images/a.png", b"png"),
                      ("data/images/sub/b.png", b"png2")):
        client.put_object(Bucket="runs", Key=key, Body=body)
    assert fetch_main(["s3://runs/data", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d/images/sub/b.png").read_bytes() == b"png2"
    assert (tmp_path / "d/annotations/brain.csv").is_file() and (tmp_path / "d/.fetched").is_file()
    assert fetch_main(["s3://runs/nothing-here", str(tmp_path / "e")]) == 1


def test_a_checkpoint_superseded_while_it_waits_is_not_uploaded(tmp_path):
    import threading

    local = CheckpointManager(tmp_path / "local", keep_last=5)
    mirror = CheckpointMirror(f"file://{tmp_path}/remote", keep_last=5)
    entered, gate = threading.Event(), threading.Event()
    real = mirror._upload_checkpoint

    def held(path, *, best):  # the first upload waits until the next two checkpoints are queued behind it
        entered.set()
        gate.wait(30)
        real(path, best=best)

    mirror._upload_checkpoint = held
    mirror.submit(local.save(_checkpoint(1)))
    assert entered.wait(30)
    for step in (2, 3):
        mirror.submit(local.save(_checkpoint(step)))
    gate.set()
    assert mirror.flush(30)
    assert mirror.complete() == ["step-00000001", "step-00000003"] and mirror.uploaded == mirror.complete()
