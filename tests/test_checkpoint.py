"""Training checkpoints: atomic writes, hashes, fallback past a corrupt checkpoint, pruning, RNG state."""

from __future__ import annotations

import errno
import json
import logging
import random

import numpy as np
import pytest
import torch

from prsmed.train import checkpoint as ckpt_mod
from prsmed.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointWriteError,
    capture_rng,
    restore_rng,
)
from prsmed.weights import CheckpointError


def _payload(step: int, *, fp16: bool = False) -> Checkpoint:
    """A realistic small payload: a model's trained tensors, an AdamW state, a cosine schedule, RNG."""
    torch.manual_seed(step)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-6)
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    rng, meta = capture_rng()
    scaler = torch.amp.GradScaler("cpu", enabled=True).state_dict() if fp16 else None
    return Checkpoint(
        trained={k: v.detach().clone() for k, v in layer.state_dict().items()},
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        rng_tensors={f"rank0.{k}": v for k, v in rng.items()},
        state={"step": step, "epoch": 0, "batch_in_epoch": step, "rng": {"0": meta}},
        scaler=scaler,
    )


def test_round_trip_restores_everything(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints")
    original = _payload(3, fp16=True)
    path = mgr.save(original)
    assert path.name == "step-00000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"trained.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt",
                                      "rng.safetensors", "state.json"}
    loaded = mgr.load(path)
    assert loaded.step == 3
    for k, v in original.trained.items():
        torch.testing.assert_close(loaded.trained[k], v, rtol=0, atol=0)
    assert loaded.scheduler == original.scheduler
    assert loaded.scaler == original.scaler
    exp = loaded.optimizer["state"][0]["exp_avg"]
    torch.testing.assert_close(exp, original.optimizer["state"][0]["exp_avg"], rtol=0, atol=0)
    # the optimizer state loads back into a fresh optimizer
    layer = torch.nn.Linear(4, 3)
    torch.optim.AdamW(layer.parameters(), lr=1e-3).load_state_dict(loaded.optimizer)


def test_state_files_load_with_weights_only(tmp_path, monkeypatch):
    """Nothing in a checkpoint needs unpickling: every torch.load runs with weights_only=True."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    mgr = CheckpointManager(tmp_path)
    mgr.load(mgr.save(_payload(1, fp16=True)))
    assert calls and all(c is True for c in calls)


class _RunsCode:
    """A pickle payload that, if unpickled, creates ``marker`` (the harmless stand-in for an attacker's code)."""

    def __init__(self, marker, how: str = "system") -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        import builtins
        import os

        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("how", ["system", "exec"])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_pth_carrying_code_is_refused_and_never_run(tmp_path, how, zipped):
    """A downloaded ``.pth`` (the official TinySAM/PRS-Med weights come as such) or a tampered checkpoint file
    whose pickle would run code: refused with the reason, and the code never runs."""
    from prsmed.weights import read_state_dict

    marker = tmp_path / "pwned"
    evil = {"image_encoder.patch_embed.weight": torch.zeros(2), "payload": _RunsCode(marker, how)}
    weights = tmp_path / "tinysam_42.3.pth"
    torch.save(evil, weights, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match="refused: it is not a plain tensor state dict"):
        read_state_dict(weights)
    assert not marker.exists()

    # The same payload as a checkpoint's optimizer.pt, with the manifest's hash updated to match, so that only
    # the loader stands in the way.
    mgr = CheckpointManager(tmp_path / "ckpts")
    path = mgr.save(_payload(1))
    torch.save({"state": {}, "param_groups": [], "x": _RunsCode(marker, how)}, path / "optimizer.pt",
               _use_new_zipfile_serialization=zipped)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = ckpt_mod.sha256_file(path / "optimizer.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        mgr.load(path)
    assert not marker.exists()


def test_rng_states_round_trip():
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    tensors, meta = capture_rng()
    json.dumps(meta)  # plain JSON
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng(tensors, meta)
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_corrupt_latest_falls_back_to_the_previous_good_one(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        mgr.save(_payload(step))
    # truncate one file of the newest, and remove the manifest of the one before
    newest = tmp_path / "step-00000003" / "trained.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])
    (tmp_path / "step-00000002" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="prsmed.train.checkpoint"):
        good = mgr.latest_valid()
    assert good == tmp_path / "step-00000001"
    text = caplog.text
    assert "step-00000003" in text and "SHA-256" in text and "step-00000002" in text and "missing" in text
    # the broken ones are set aside, so the next save of those steps starts clean
    assert [p.name for p in mgr.checkpoints()] == ["step-00000001"]
    assert len(list(tmp_path.glob("step-*.corrupt-*"))) == 2
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointManager.verify(next(tmp_path.glob("step-00000003.corrupt-*")))


def test_tampered_state_is_refused(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(_payload(4))
    state = json.loads((path / "state.json").read_text())
    state["step"] = 99
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="state.json: SHA-256"):
        mgr.load(path)


def test_disk_full_fails_clearly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(_payload(1))

    def no_space(obj, path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_torch", no_space)
    with pytest.raises(CheckpointWriteError) as e:
        mgr.save(_payload(2))
    msg = str(e.value)
    assert "step 2" in msg and "No space left on device (ENOSPC)" in msg and "step-00000001 is intact" in msg
    assert [p.name for p in mgr.checkpoints()] == ["step-00000001"]
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written left behind
    assert mgr.latest_valid() == tmp_path / "step-00000001"
    mgr.load(tmp_path / "step-00000001")


def test_keeps_the_last_k_and_the_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(_payload(1))
    mgr.save(_payload(2), is_best=True)
    for step in (3, 4, 5):
        mgr.save(_payload(step))
    assert [p.name for p in mgr.checkpoints()] == ["step-00000002", "step-00000004", "step-00000005"]
    # the best is recorded in each later checkpoint, so a resumed run keeps protecting it
    fresh = CheckpointManager(tmp_path, keep_last=2)
    fresh.load(tmp_path / "step-00000005")
    assert fresh.best == "step-00000002"


def test_saving_the_same_step_again_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(_payload(2))
    second = _payload(2)
    second.state["note"] = "second"
    mgr.save(second)
    assert mgr.load(tmp_path / "step-00000002").state["note"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
