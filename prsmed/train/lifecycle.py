"""A run's lifecycle around the loop: how it ends (statuses, exit codes, the result), the signals that stop it
with a checkpoint, the user's ``--on-finish`` command, and what a failed run leaves behind (out-of-memory
diagnosis, ``summary.json``).

Exit statuses (:data:`EXIT_CODES`): 0 completed / early-stopped / budget exhausted, 75 preempted or paused (a
checkpoint was written; rerun with ``--resume``), 1 failed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("prsmed.train")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped with a checkpoint, rerun with --resume
EXIT_CODES = {
    "completed": EXIT_OK,
    "early_stopped": EXIT_OK,
    "budget_exhausted": EXIT_OK,
    "preempted": EXIT_PREEMPTED,
    "paused": EXIT_PREEMPTED,
    "failed": EXIT_FAILED,
}


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says what was expected and what was found."""


@dataclass
class RunResult:
    status: str
    exit_code: int
    reason: str = ""
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    adapter: Path | None = None
    bad_rows: int = 0
    # Validation before training, at the best checkpoint and at the last evaluation, with a verdict
    # (prsmed.train.report); empty when the run failed before it could say anything.
    report: dict[str, Any] = field(default_factory=dict)


def install_signal_handlers(trainer) -> Callable[[], None]:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit 75. A second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if trainer.signalled_at is None:
            trainer.signalled_at = time.monotonic()
        trainer.request_stop("preempted", f"received {name}; stopped after the current step with a checkpoint")
        log.warning("%s received: finishing the current step, then writing a checkpoint (again to abort)", name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for s in previous:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def run_on_finish(command: str, result: RunResult, out: Path) -> None:
    """Run the user's ``--on-finish`` shell command with the outcome in its environment."""
    env = {
        **os.environ,
        "PRSMED_RUN_STATUS": result.status,
        "PRSMED_EXIT_CODE": str(result.exit_code),
        "PRSMED_RUN_REASON": result.reason,
        "PRSMED_RUN_DIR": str(out),
        "PRSMED_STEP": str(result.step),
        "PRSMED_CHECKPOINT": str(result.checkpoint or ""),
        "PRSMED_ADAPTER": str(result.adapter or ""),
    }
    log.info("running --on-finish: %s", command)
    try:
        done = subprocess.run(command, shell=True, env=env, check=False)
        if done.returncode:
            log.warning("--on-finish command exited with status %d", done.returncode)
    except OSError as e:
        log.warning("--on-finish command could not be started: %s", e)


_OOM_MESSAGES = ("can't allocate memory", "out of memory", "bad_alloc")


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _OOM_MESSAGES)


def out_of_memory_reason(e: BaseException, step: int, device: torch.device) -> str:
    where = "GPU" if device.type == "cuda" else "host"
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return (f"out of {where} memory at step {step + 1} ({type(e).__name__}: {first_line}). Lower --batch-size and "
            f"raise --grad-accum to keep the effective batch, add --grad-checkpointing, or size the run first with "
            f"`prsmed plan`. Checkpoints already written are intact: --resume continues from the last one with more "
            f"memory or with --grad-checkpointing")


def write_failed_summary(trainer, result: RunResult) -> None:
    if not trainer.dist.main:
        return
    try:
        out = Path(trainer.config.out)
        out.mkdir(parents=True, exist_ok=True)
        last = trainer.manager.checkpoints()
        summary = {"status": result.status, "exit_code": result.exit_code, "reason": result.reason,
                   "step": result.step, "checkpoint": str(last[-1]) if last else None,
                   "bad_rows": {"count": len(trainer.bad_rows)}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError:
        pass  # the disk that failed the run may refuse this too; the log line above carries the reason
