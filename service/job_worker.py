"""One job's worker process: the training configuration it is handed, its command line, environment and launch;
following its ``metrics.jsonl``; and telling whether a pid is still one of our workers.

The worker is ``python -m prsmed.train --config FILE``: the job's whole TrainConfig, validated when the job was
submitted, as JSON in the job's folder, so what the API accepts and what the trainer runs are the same fields.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "train-config.json"
WORKER_NICE = 10
LOG_TAIL_LINES = 20


def write_config(job_dir: Path, fields: dict[str, Any]) -> Path:
    """The worker's TrainConfig as validated JSON in ``job_dir``; raises ValueError when it does not validate."""
    from prsmed.train.config import TrainConfig

    text = TrainConfig(**fields).model_dump_json(indent=2)
    path = job_dir / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def worker_command(python: str, config: Path) -> list[str]:
    return [python, "-m", "prsmed.train", "--config", str(config)]


def worker_env(threads: int | None, *, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The worker's environment: ours without ``drop`` (credentials it does not need), unbuffered, and with
    ``threads`` BLAS/OpenMP threads when given."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        n = str(int(threads))
        env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n)
    return env


def launch(args: list[str], *, cwd: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a worker in its own session (so a signal to its group reaches its data loaders too, and it outlives
    nothing it should not), writing to ``log_path``, at a lower CPU priority than the server."""
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env, start_new_session=True, close_fds=True)
    try:
        # Right after exec the worker has one thread; the ones it starts later inherit this priority.
        os.setpriority(os.PRIO_PROCESS, proc.pid, WORKER_NICE)
    except (OSError, AttributeError):
        pass
    return proc


class MetricsTail:
    """New complete lines of a growing ``metrics.jsonl``, as dicts; a half-written last line waits for its end.

    A resumed run rewrites the file in place, keeping the lines up to its checkpoint, then appends. That is noticed
    by the bytes just before the read position changing (or the file shrinking); the file is then read again from
    the start, skipping lines no newer than the last one already returned, so the re-run steps come through once.
    ``from_end`` starts a first read that many bytes before the end (for a progress view, not a replay).
    """

    _MARK = 64

    def __init__(self, path: Path, *, from_end: int | None = None) -> None:
        self.path = Path(path)
        self.from_end = from_end
        self.offset = 0
        self._mark = b""
        self._last_time = float("-inf")
        self._not_after: float | None = None

    def read(self) -> list[dict]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - a missing file is the usual case, not an error
        except OSError:
            return []
        with f:
            size = os.fstat(f.fileno()).st_size
            if self.offset and self._rewritten(f, size):
                self.offset, self._mark, self._not_after = 0, b"", self._last_time
            skip_partial = False
            if self.offset == 0 and self.from_end and size > self.from_end:
                self.offset, skip_partial = size - self.from_end, True
            f.seek(self.offset)
            data = f.read(size - self.offset)
        if skip_partial:
            cut = data.find(b"\n")
            if cut < 0:
                return []
            self.offset += cut + 1
            data = data[cut + 1:]
        end = data.rfind(b"\n")
        if end < 0:
            return []
        chunk = data[:end + 1]
        self.offset += len(chunk)
        self._mark = (self._mark + chunk)[-self._MARK:]
        out = []
        for line in chunk.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line a crash cut short, kept by a later rewrite
            if not isinstance(rec, dict):
                continue
            t = rec.get("time")
            if isinstance(t, (int, float)):
                if self._not_after is not None and t <= self._not_after:
                    continue
                self._last_time = max(self._last_time, t)
            out.append(rec)
        return out

    def _rewritten(self, f, size: int) -> bool:
        if size < self.offset:
            return True
        if not self._mark:
            return False
        f.seek(self.offset - len(self._mark))
        return f.read(len(self._mark)) != self._mark


@dataclass
class Worker:
    """A running worker as the manager follows it."""

    proc: subprocess.Popen
    run: Path
    log: Path
    tail: MetricsTail
    stop: str | None = None  # "cancel" or "shutdown": why we sent SIGTERM


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def total_from_checkpoints(run: Path) -> int | None:
    """The run's planned number of steps, from its newest checkpoint (metrics lines do not carry it)."""
    ckpts = sorted((run / "checkpoints").glob("step-*/state.json"))
    if not ckpts:
        return None
    total = read_json(ckpts[-1]).get("total_steps")
    return int(total) if isinstance(total, int) else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def is_worker(pid: int, config: Path) -> bool:
    """Whether ``pid`` is still a trainer started with ``config`` (not a reused pid): checked on /proc, else assumed
    not."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"prsmed.train" in cmdline and str(config).encode() in cmdline
