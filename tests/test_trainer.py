"""The trainer end to end on a tiny model and a tiny synthetic dataset (CPU, a few steps each)."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from prsmed.model.bundle import read_manifest, verify_bundle
from prsmed.train import EXIT_PREEMPTED, TrainConfig, Trainer, run_training
from prsmed.train import checkpoint as ckpt_mod
from prsmed.train.checkpoint import CheckpointManager

from small_training import (SIGTERM_DEADLINE_S, build_small, config, driver, make_dataset, metrics, run,
                            trained_state)



# --- tests -------------------------------------------------------------------------------------------------------

def test_a_run_writes_metrics_events_checkpoints_and_the_adapter(tmp_path):
    data = make_dataset(tmp_path / "data", bad=True)
    out = tmp_path / "run"
    result = run(config(data, out, epochs=1, tensorboard=True, save_every=1, keep_last=2))
    assert result.status == "completed" and result.exit_code == 0, result.reason
    assert result.step == 4  # 7 train rows (3 of them bad), batch 2 -> 4 micro-batches
    lines = metrics(out)
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for key in ("loss", "loss_seg", "loss_bce", "loss_iou", "loss_lm", "loss_cls", "lr", "samples_per_s",
                "grad_norm", "epoch", "bad_rows", "eta_s"):
        assert key in train[-1], key
    assert all(np.isfinite(m["loss"]) for m in train)
    assert train[0]["lr"] > train[-1]["lr"]  # cosine, stepped per optimizer step
    evals = [m for m in lines if m["kind"] == "eval"]
    assert evals and 0 <= evals[-1]["val_dice"] <= 1
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # bad rows are skipped, counted and reported
    assert train[-1]["bad_rows"] == 3 and result.bad_rows == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["bad_rows"]["count"] == 3
    reasons = " ".join(summary["bad_rows"]["first"].values())
    assert "cannot be read" in reasons and "is empty" in reasons and "32x37" in reasons
    # checkpoints: the last two kept, each verifiable
    ckpts = CheckpointManager(out / "checkpoints").checkpoints()
    assert [p.name for p in ckpts][-1] == "step-00000004" and len(ckpts) <= 3
    for p in ckpts:
        CheckpointManager.verify(p)
    # the adapter bundle, with the training config, metrics and data hash
    manifest = verify_bundle(out / "adapter")
    assert manifest.training["lr"] == 1e-3 and manifest.training["status"] == "completed"
    assert manifest.metrics["steps"] == 4 and "val_dice" in manifest.metrics
    assert manifest.data_manifest_sha256 and len(manifest.data_manifest_sha256) == 64
    assert {"vision_encoder", "fusion_head", "modality_head"} <= set(manifest.parts)


@pytest.mark.slow
def test_prsmed_tiny_resumes_exactly_and_its_adapter_loads(tmp_path, data):
    """The zoo's CPU model (LLaVA-style LLM with its image tower, TinyViT, PRS-Med head): paused after one step and
    resumed, it ends where an uninterrupted run ends, and its adapter loads back into a fresh prsmed-tiny."""
    from prsmed.model.bundle import load_bundle
    from prsmed.zoo import build_model

    def tiny_run(out: Path, **kw):
        cfg = TrainConfig(model="prsmed-tiny", data=data, out=out, epochs=1, batch_size=2, max_steps=2,
                          val_fraction=0, progress=False, tensorboard=False, lr=1e-3, min_lr=1e-5, **kw)
        return run_training(cfg)

    assert tiny_run(tmp_path / "straight").status == "completed"
    assert tiny_run(tmp_path / "resumed", stop_after=1).step == 1
    done = tiny_run(tmp_path / "resumed", resume=True)
    assert done.status == "completed" and done.step == 2, done.reason
    want, got = trained_state(tmp_path / "straight"), trained_state(tmp_path / "resumed")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    fresh = build_model("prsmed-tiny")
    load_bundle(done.adapter, fresh)
    sample = next(k for k in want if k.startswith("fusion_head."))
    torch.testing.assert_close(fresh.state_dict()[sample], want[sample], rtol=0, atol=0)


def test_bad_row_reasons_are_specific(tmp_path):
    from prsmed.data.layout import load_records
    from prsmed.train.data import RecordDataset

    data = make_dataset(tmp_path / "data", n_train=2, n_val=0, bad=True)
    ds = RecordDataset(list(load_records(data)), mask_size=64)
    results = [ds[i] for i in range(len(ds))]
    bad = [r for r in results if isinstance(r, tuple)]
    assert len(bad) == 3
    text = " | ".join(reason for _, reason in bad)
    assert "missing.png cannot be read" in text
    assert "empty.png is empty" in text
    assert "32x37" in text and "32x32" in text


def test_resume_matches_an_uninterrupted_run(tmp_path, data, caplog):
    """Stopped mid-epoch, then at a step past an epoch end whose checkpoint is then corrupted: the resumed run
    ends with the same weights as a run that was never interrupted."""
    straight = tmp_path / "straight"
    assert run(config(data, straight)).status == "completed"

    out = tmp_path / "interrupted"
    first = run(config(data, out, stop_after=1))
    assert (first.status, first.exit_code, first.step) == ("paused", EXIT_PREEMPTED, 1)
    assert not (out / "adapter").exists()
    second = run(config(data, out, resume=True, stop_after=2))
    assert (second.status, second.step) == ("paused", 3)
    # corrupt the newest checkpoint (step 3): resuming must fall back to step 2 and still end identically
    victim = out / "checkpoints" / "step-00000003" / "optimizer.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        last = run(config(data, out, resume=True))
    assert last.status == "completed" and last.step == 4, last.reason
    assert "step-00000003" in caplog.text and "falling back" in caplog.text

    want, got = trained_state(straight), trained_state(out)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    # metrics.jsonl holds each step once, even though steps 3 was run twice
    steps = [m["step"] for m in metrics(out) if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_a_write_failure_fails_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    real = ckpt_mod.save_torch
    calls = {"n": 0}

    def flaky(obj, path):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (optimizer + scheduler) succeeds
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt_mod, "save_torch", flaky)
    out = tmp_path / "run"
    result = run(config(data, out, save_every=1))
    assert result.status == "failed" and result.exit_code == 1
    assert "ENOSPC" in result.reason and "step-00000001 is intact" in result.reason
    mgr = CheckpointManager(out / "checkpoints")
    assert [p.name for p in mgr.checkpoints()] == ["step-00000001"]
    assert mgr.latest_valid() is not None
    assert not list((out / "checkpoints").glob(".tmp-*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "ENOSPC" in summary["reason"]
    # and the run resumes from the good checkpoint once the disk is fixed
    monkeypatch.setattr(ckpt_mod, "save_torch", real)
    assert run(config(data, out, save_every=1, resume=True, stop_after=1)).step == 2


def test_budget_stop_writes_a_checkpoint_and_runs_on_finish(tmp_path, data):
    out = tmp_path / "run"
    env_file = tmp_path / "env.json"
    hook = f"{sys.executable} -c \"import json,os; json.dump({{k: v for k, v in os.environ.items() " \
           f"if k.startswith('PRSMED_')}}, open('{env_file}', 'w'))\""
    result = run(config(data, out, max_cost=0.01, usd_per_hour=3600.0, on_finish=hook))
    assert result.status == "budget_exhausted" and result.exit_code == 0
    assert result.step >= 1 and "max-cost" in result.reason
    assert result.checkpoint is not None and (out / "adapter").is_dir()
    env = json.loads(env_file.read_text())
    assert env["PRSMED_RUN_STATUS"] == "budget_exhausted" and env["PRSMED_EXIT_CODE"] == "0"
    assert env["PRSMED_RUN_DIR"] == str(out) and env["PRSMED_ADAPTER"] == str(out / "adapter")


def test_max_hours_stops_cleanly(tmp_path, data):
    result = run(config(data, tmp_path / "run", max_hours=1e-9))
    assert result.status == "budget_exhausted" and result.step == 1 and "max-hours" in result.reason


def test_early_stopping(tmp_path, data):
    result = run(config(data, tmp_path / "run", epochs=6, early_stop_patience=1, early_stop_min_delta=1.0))
    assert result.status == "early_stopped" and result.exit_code == 0
    assert result.step == 4  # two epochs: the first sets the best, the second does not beat it by 1.0
    assert read_manifest(tmp_path / "run" / "adapter").training["weights_from_step"] == 2


def test_an_existing_run_is_not_overwritten_and_a_changed_recipe_is_refused(tmp_path, data):
    out = tmp_path / "run"
    assert run(config(data, out, stop_after=1)).exit_code == EXIT_PREEMPTED
    again = run(config(data, out))
    assert again.status == "failed" and "--resume" in again.reason
    changed = run(config(data, out, resume=True, lr=5e-4))
    assert changed.status == "failed" and "lr: checkpoint 0.001, now 0.0005" in changed.reason
    # the one memory option a resume accepts (how a run that ran out of memory goes on)
    leaner = run(config(data, out, resume=True, grad_checkpointing=True, stop_after=1))
    assert leaner.status == "paused" and leaner.step == 2, leaner.reason


def test_fp16_with_accumulation_keeps_fp32_master_weights(tmp_path):
    """fp16 autocast + GradScaler + 2 micro-batches per step, on CPU."""
    model = build_small()
    data = make_dataset(tmp_path / "data", n_val=0)
    cfg = config(data, tmp_path / "run", precision="fp16", grad_accum=2, epochs=1, max_steps=1, val_fraction=0)
    result = run_training(cfg, model=model)
    assert result.status == "completed" and result.step == 1, result.reason
    line = [m for m in metrics(tmp_path / "run") if m["kind"] == "train"][-1]
    assert line["rows"] == 4 and np.isfinite(line["loss"])  # two micro-batches of 2 in one step
    assert "grad_scale" in line
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    state = json.loads((CheckpointManager(tmp_path / "run" / "checkpoints").checkpoints()[-1]
                        / "manifest.json").read_text())
    assert "scaler.pt" in state["files"]


def test_grad_checkpointing_is_enabled_on_the_llm_or_warns(tmp_path, caplog):
    model = build_small()
    data = make_dataset(tmp_path / "data", n_val=0)
    result = run_training(config(data, tmp_path / "run", grad_checkpointing=True, max_steps=1, val_fraction=0),
                          model=model)
    assert result.status == "completed", result.reason
    hf = model.peft_model.base_model.model
    assert any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())
    # a backbone without support: a warning, and training goes on without it
    plain = build_small()
    for m in plain.llm.modules():
        if getattr(m, "supports_gradient_checkpointing", False):
            m.supports_gradient_checkpointing = False
    trainer = Trainer(config(data, tmp_path / "run2", grad_checkpointing=True), model=plain)
    trainer.model = plain
    with caplog.at_level("WARNING"):
        trainer.prepare_model()
    assert "continuing without it" in caplog.text


def test_config_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs a price"):
        TrainConfig(model="m", data=".", out=".", max_cost=10)
    with pytest.raises(ValidationError, match="unknown GPU 'abacus'"):
        TrainConfig(model="m", data=".", out=".", gpu="abacus")
    with pytest.raises(ValidationError):
        TrainConfig(model="m", data=".", out=".", precision="fp8")
    cfg = TrainConfig(model="m", data=".", out=".", gpu="A100-80GB", max_cost=5)
    # The planner's catalogue prices --gpu: the median of its on-demand offers (1.40, 1.64, 3.67 for this GPU).
    assert cfg.hourly_cost(world_size=2) == pytest.approx(2 * 1.64)
    assert TrainConfig(model="m", data=".", out=".").model_dump()["lr"] == 1e-4


def test_cli_rejects_bad_options_with_status_2(tmp_path):
    import typer

    from prsmed.train.cli import train

    app = typer.Typer()
    app.command()(train)
    res = CliRunner().invoke(app, ["--model", "m", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                   "--max-cost", "3"])
    assert res.exit_code == 2
    assert "needs a price" in res.output


# --- processes ---------------------------------------------------------------------------------------------------

def _wait_for_step(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and '"kind": "train"' in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("no training step within the timeout")


def test_sigterm_checkpoints_and_exits_75_then_resumes(tmp_path, data):
    script, spec = driver(tmp_path)
    out = tmp_path / "run"
    args = [sys.executable, str(script), "--model", str(spec), "--data", str(data), "--out", str(out),
            "--epochs", "50", "--batch-size", "2", "--no-progress", "--no-tensorboard", "--lr", "1e-3",
            "--min-lr", "1e-5"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out / "metrics.jsonl", proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    exited_after = time.monotonic() - sent
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "SIGTERM" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted" and "SIGTERM" in summary["reason"]
    # The stated deadline (docs/reliability.md): the rest of one step plus one checkpoint write, well inside the
    # 30 s the shortest cloud notice gives for this model.
    assert 0 < summary["signal_to_checkpoint_s"] <= exited_after <= SIGTERM_DEADLINE_S, (summary, exited_after)
    print(f"\nSIGTERM -> checkpoint {summary['signal_to_checkpoint_s']:.2f} s, -> exit {exited_after:.2f} s")
    stopped_at = summary["step"]
    assert CheckpointManager(out / "checkpoints").latest_valid().name == f"step-{stopped_at:08d}"
    # resume (in this process, same options) and run one more step
    cfg = config(data, out, model=str(spec), epochs=50, resume=True, stop_after=1)
    result = run(cfg)
    assert result.status == "paused" and result.step == stopped_at + 1, result.reason
