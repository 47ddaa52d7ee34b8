"""Training under injected faults, in one process and in two DDP processes: SIGKILL at an arbitrary moment, SIGTERM
with its deadline, a corrupted newest checkpoint and a full disk. Every interrupted run, once resumed, must end with
the weights of a run that was never interrupted (CPU, fixed seed, to 1e-6).

The moment of each kill is drawn at random; the seed is in every failure message, and ``PRSMED_FAULT_SEED=<seed>``
replays it."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from prsmed.train import EXIT_PREEMPTED
from prsmed.train.checkpoint import CheckpointManager
from small_training import (FAIL_SAVES_ENV, SIGTERM_DEADLINE_S, SINGLE, VENV_BIN, assert_same_weights, config,
                            driver, metrics, run, single_process_args)


def fault_rng() -> tuple[int, random.Random]:
    seed = int(os.environ.get("PRSMED_FAULT_SEED") or secrets.randbelow(2**31))
    return seed, random.Random(seed)


def last_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (a line being written may be cut short: it is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "train":
            step = max(step, int(rec["step"]))
    return step


def wait_until(check, proc: subprocess.Popen, what: str, timeout: float = 180, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited with {proc.returncode} before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def kill_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal a launcher and every process under it at once, as a preempted machine does."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def train_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in metrics(run_dir) if m["kind"] == "train"]


@pytest.mark.slow
def test_sigkill_at_arbitrary_moments_then_resume_matches_an_uninterrupted_run(tmp_path, data):
    seed, rng = fault_rng()
    straight = tmp_path / "straight"
    assert run(config(data, straight, **SINGLE)).status == "completed"
    total = last_step(straight)
    assert total == 12

    script, spec = driver(tmp_path)
    out = tmp_path / "killed"
    log = (tmp_path / "trainer.log").open("ab")
    story = []
    # First kill: right after a step drawn at random. Second kill (on the resumed run): a random delay after its
    # first step, so it may land inside a step or inside a checkpoint write.
    kill_step = rng.randint(1, total - 2)
    proc = subprocess.Popen(single_process_args(script, spec, data, out), stdout=log, stderr=log)
    wait_until(lambda: last_step(out) >= kill_step, proc, f"step {kill_step}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    story.append(f"killed after step {last_step(out)} with {[p.name for p in CheckpointManager(out / 'checkpoints').checkpoints()]}")

    proc = subprocess.Popen(single_process_args(script, spec, data, out, "--resume"), stdout=log, stderr=log)
    before = last_step(out)
    wait_until(lambda: last_step(out) > before or proc.poll() is not None, proc, "a resumed step")
    delay = rng.uniform(0.0, 1.0)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    story.append(f"killed {delay:.2f} s after a resumed step, at step {last_step(out)} (exit {proc.returncode})")
    log.close()

    result = run(config(data, out, model=str(spec), resume=True, **SINGLE))
    why = f"PRSMED_FAULT_SEED={seed}: " + "; ".join(story)
    assert result.status == "completed" and result.step == total, f"{why}: {result.reason}"
    assert_same_weights(straight, out, why)
    assert train_steps(out) == list(range(1, total + 1)), why  # every step logged once, however often it ran
    assert not list((out / "checkpoints").glob(".tmp-*")), why


# --- two processes (torchrun) ------------------------------------------------------------------------------------

def torchrun_launch(script: Path, spec: Path, data: Path, out: Path, *extra: str, env: dict | None = None,
                    log: Path) -> subprocess.Popen:
    """4 rows / (2 processes x batch 1) x 4 epochs: 8 steps, a checkpoint after each."""
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(script), "--model", str(spec),
           "--data", str(data), "--out", str(out), "--epochs", "4", "--batch-size", "1", "--save-every", "1",
           "--keep-last", "10", "--no-progress", "--no-tensorboard", "--lr", "1e-3", "--min-lr", "1e-5", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc, signal.SIGKILL)
        tail = log.read_text()[-3000:]
        raise AssertionError(f"torchrun did not finish within {timeout} s (a hang):\n{tail}") from None


@pytest.mark.slow
def test_two_ddp_processes_survive_sigterm_a_full_disk_sigkill_and_a_corrupt_checkpoint(tmp_path, data):
    if not (VENV_BIN / "torchrun").exists():
        pytest.skip("torchrun is not installed next to this Python")
    seed, rng = fault_rng()
    script, spec = driver(tmp_path)
    log = tmp_path / "torchrun.log"

    straight = tmp_path / "straight"
    assert finish(torchrun_launch(script, spec, data, straight, log=log), log) == 0, log.read_text()[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 8
    assert train_steps(straight) == list(range(1, 9))  # only rank 0 writes metrics and checkpoints

    out = tmp_path / "faulty"
    mgr = CheckpointManager(out / "checkpoints")

    # 1. SIGTERM to every process (a spot VM going away): a checkpoint within the deadline, exit 75 on each rank.
    proc = torchrun_launch(script, spec, data, out, log=log)
    stop_step = rng.randint(1, 3)
    wait_until(lambda: last_step(out) >= stop_step, proc, f"step {stop_step}", poll=0.01)
    kill_tree(proc, signal.SIGTERM)
    finish(proc, log)
    summary = json.loads((out / "summary.json").read_text())
    why = f"PRSMED_FAULT_SEED={seed}, SIGTERM after step {stop_step}"
    assert summary["status"] == "preempted" and summary["exit_code"] == EXIT_PREEMPTED, (why, summary)
    assert summary["signal_to_checkpoint_s"] <= SIGTERM_DEADLINE_S, (why, summary)
    print(f"\n2 processes: SIGTERM -> checkpoint {summary['signal_to_checkpoint_s']:.2f} s")
    stopped = summary["step"]
    assert mgr.latest_valid().name == f"step-{stopped:08d}", why

    # 2. The disk fills up: rank 0's next checkpoint write fails; both processes stop (no hang in a collective),
    #    the reason is recorded and the last good checkpoint is untouched.
    rc = finish(torchrun_launch(script, spec, data, out, "--resume", env={FAIL_SAVES_ENV: "0"}, log=log), log)
    summary = json.loads((out / "summary.json").read_text())
    assert rc != 0 and summary["status"] == "failed", (why, rc, summary)
    assert "ENOSPC" in summary["reason"] and f"step-{stopped:08d} is intact" in summary["reason"], summary
    assert mgr.latest_valid().name == f"step-{stopped:08d}" and not list(mgr.root.glob(".tmp-*"))

    # 3. Resumed, then SIGKILL to every process at a random moment after its second resumed step.
    proc = torchrun_launch(script, spec, data, out, "--resume", log=log)
    wait_until(lambda: last_step(out) >= stopped + 2, proc, f"step {stopped + 2}", poll=0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    kill_tree(proc, signal.SIGKILL)
    finish(proc, log, timeout=30)
    killed_at = mgr.checkpoints()[-1].name
    why += f"; SIGKILL with {killed_at} the newest checkpoint"

    # 4. The newest checkpoint is corrupted in place (same size, bytes flipped): resuming detects it by its hash,
    #    sets it aside, continues from the one before, and ends with the uninterrupted run's weights.
    victim = mgr.checkpoints()[-1] / "trained.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[-16:] = bytes(b ^ 0xFF for b in raw[-16:])
    victim.write_bytes(bytes(raw))
    mark = log.stat().st_size
    assert finish(torchrun_launch(script, spec, data, out, "--resume", log=log), log) == 0, log.read_text()[-3000:]
    text = log.read_text()[mark:]
    assert "corrupt" in text and "falling back" in text, (why, text[-3000:])
    assert json.loads((out / "summary.json").read_text())["step"] == 8
    assert_same_weights(straight, out, why)
    assert train_steps(out) == list(range(1, 9)), why
