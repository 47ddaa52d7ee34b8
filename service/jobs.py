"""Fine-tuning jobs: the manager. It validates requests, keeps the queue in the job store (job_store.py), runs one
``python -m prsmed.train --config FILE`` worker per running job (job_worker.py), and publishes finished adapters.

The server process never trains: each job is a child process in its own process group, at a lower CPU priority,
so a training job cannot take the server down with it or starve predictions. A scheduler thread launches queued
jobs in order, follows their ``metrics.jsonl``, and reads how each one ended::

    exit 0 and summary.json completed / early_stopped / budget_exhausted  -> succeeded (adapter published)
    exit 75 after cancel()                                                -> canceled (checkpoint kept)
    exit 75 after stop() (server shutdown)                                -> interrupted (resumed by the next start)
    exit 75 otherwise (someone else sent SIGTERM)                         -> preempted (resume() continues it)
    anything else, or killed by a signal                                  -> failed (error says how, with the log)

Files of a job live under ``<root>/jobs/<id>/``: ``train-config.json`` (the worker's whole TrainConfig),
``worker.log`` (the worker's stdout and stderr, all attempts) and ``run/`` (the trainer's run directory: checkpoints, metrics.jsonl, summary.json, adapter/). A finished adapter is
copied to ``<adapter_dir>/<adapter name>/`` under a temporary name, verified, then renamed into place, so the
adapter store never lists a half-copied bundle.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from pydantic import ValidationError

from prsmed_sdk.models import FINAL_JOB_STATES, JobEvent, JobInfo, JobRequest, TrainingReport

from .auth import TOKEN_ENV
from .datasets import DatasetNotFound, DatasetStore
from .job_store import JobStore, now
from .job_worker import (
    CONFIG_FILE,
    MetricsTail,
    Worker,
    alive,
    is_worker,
    killpg,
    launch,
    log_tail,
    read_json,
    signal_name,
    total_from_checkpoints,
    worker_command,
    worker_env,
    write_config,
)

log = logging.getLogger("prsmed.service.jobs")

EXIT_OK = 0
EXIT_BAD_OPTIONS = 2
EXIT_PREEMPTED = 75
# summary.json statuses of a run that ended with a usable adapter (exit 0).
DONE_STATUSES = frozenset({"completed", "early_stopped", "budget_exhausted"})
# TrainConfig fields the service sets itself, and those the request carries as top-level fields.
SERVICE_OPTIONS = frozenset({"model", "data", "out", "resume"})
REQUEST_FIELDS = ("epochs", "batch_size", "lr")
# TrainConfig fields a request may not set, and why.
REFUSED_OPTIONS = {
    "on_finish": "it runs a shell command on the server, which the API does not allow",
    "progress": "the service always runs the trainer without a progress bar",
    "stop_after": "the service schedules runs itself; use max_steps, or cancel and resume the job",
}
_DEFAULT_RETRY_S = 30.0
_ORPHAN_GRACE_S = 15.0


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class InvalidJob(ValueError):
    """The request cannot become a job, or the job cannot do what was asked; the message says why."""


class QueueFull(Exception):
    """Too many jobs are waiting; try again after ``retry_after_s``."""

    def __init__(self, message: str, *, queue_position: int, retry_after_s: float) -> None:
        super().__init__(message)
        self.queue_position = queue_position
        self.retry_after_s = retry_after_s


def train_options() -> dict[str, Any]:
    """The ``options`` a job request may carry: TrainConfig fields with their defaults."""
    from prsmed.train.config import TrainConfig

    skip = SERVICE_OPTIONS | set(REQUEST_FIELDS) | set(REFUSED_OPTIONS)
    return {k: f.default for k, f in TrainConfig.model_fields.items() if k not in skip}


def _step_data(rec: dict, total_steps: int | None) -> dict:
    return {
        "step": rec.get("step"),
        "epoch": rec.get("epoch_progress", rec.get("epoch")),
        "loss": rec.get("loss"),
        "lr": rec.get("lr"),
        "eta_s": rec.get("eta_s"),
        "total_steps": rec.get("total_steps", total_steps),
    }


def _eval_metrics(rec: dict) -> dict:
    # Every evaluation says whether it is the one before training, so that flag never outlives its line.
    out = {k: v for k, v in rec.items() if k not in ("kind", "time", "step", "epoch", "epoch_progress")}
    out["before_training"] = bool(rec.get("before_training"))
    return out


def _report(summary: dict, job_id: str) -> dict | None:
    """The run's validation report from its summary.json, in the wire form; None when it has none or it does not
    follow the contract (logged: the job's outcome does not depend on it)."""
    raw = summary.get("report")
    if not isinstance(raw, dict):
        return None
    try:
        return TrainingReport.model_validate(raw).model_dump(mode="json")
    except ValidationError as e:
        log.warning("job %s: summary.json's report does not follow the TrainingReport contract: %s", job_id, e)
        return None


# --- the manager -------------------------------------------------------------------------------------------------

class JobManager:
    """Fine-tuning jobs under ``root``; finished adapters go to ``adapter_dir``. See the module docs.

    ``max_queue`` bounds the waiting jobs (:class:`QueueFull` beyond), ``max_running`` the workers at once.
    ``worker_threads`` caps each worker's BLAS/OpenMP threads. Call :meth:`start` to run jobs, :meth:`stop` to
    checkpoint and halt them (they resume on the next start).
    """

    def __init__(self, root: str | Path, *, datasets: DatasetStore, adapter_dir: str | Path, max_queue: int = 8,
                 max_running: int = 1, python: str = sys.executable, worker_threads: int | None = None,
                 poll_s: float = 0.5) -> None:
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.adapter_dir = Path(adapter_dir)
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.datasets = datasets
        self.max_queue = max_queue
        self.max_running = max_running
        self.python = python
        self.worker_threads = worker_threads
        self.poll_s = poll_s
        self._db = JobStore(self.root / "jobs.sqlite")
        self._lock = threading.RLock()  # guards _procs and every state change
        self._procs: dict[str, Worker] = {}
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()

    # --- reading ------------------------------------------------------------------------------------------------
    def _row(self, job_id: str) -> dict:
        row = self._db.one(job_id) if isinstance(job_id, str) else None
        if row is None:
            raise JobNotFound(str(job_id))
        return row

    def _queue_order(self) -> dict[str, int]:
        queued = self._db.select("state = 'queued'", order="queue_seq, seq")
        return {r["id"]: i for i, r in enumerate(queued, start=1)}

    def _info(self, row: dict, positions: dict[str, int] | None = None) -> JobInfo:
        position = None
        if row["state"] == "queued":
            position = (positions if positions is not None else self._queue_order()).get(row["id"])
        return JobInfo(
            id=row["id"], state=row["state"], base=row["base"], dataset=row["dataset"],
            adapter_name=row["adapter_name"], config=row["config"], created_at=row["created_at"],
            started_at=row["started_at"], finished_at=row["finished_at"], step=row["step"],
            total_steps=row["total_steps"], epoch=row["epoch"], loss=row["loss"], eta_s=row["eta_s"],
            metrics=row["metrics"], error=row["error"], adapter=row["adapter"], queue_position=position,
            attempts=row["attempts"], report=row["report"],
        )

    def get(self, job_id: str) -> JobInfo:
        return self._info(self._row(job_id))

    def list(self) -> list[JobInfo]:
        """Every job, newest first."""
        positions = self._queue_order()
        return [self._info(r, positions) for r in self._db.select()]

    def run_dir(self, job_id: str) -> Path:
        """The trainer's run directory of a job (checkpoints, metrics.jsonl, summary.json, adapter/)."""
        return self.jobs_dir / self._row(job_id)["id"] / "run"

    def log_path(self, job_id: str) -> Path:
        return self.jobs_dir / self._row(job_id)["id"] / "worker.log"

    # --- submitting ---------------------------------------------------------------------------------------------
    def submit(self, req: JobRequest | dict) -> JobInfo:
        """Queue a job; raises DatasetNotFound, InvalidJob or QueueFull."""
        if not isinstance(req, JobRequest):
            req = JobRequest.model_validate(req)
        data = self.datasets.path(req.dataset)  # DatasetNotFound
        self._check_base(req.base)
        options = self._check_options(req, data)
        job_id = secrets.token_hex(6)
        name = req.name or job_id
        from prsmed.infer.adapters import check_name

        try:
            check_name(name)
        except ValueError as e:
            raise InvalidJob(str(e)) from e
        with self._lock:
            self._check_name_free(name)
            self._check_room()
            self._db.insert({
                "id": job_id, "state": "queued", "base": req.base, "dataset": req.dataset, "adapter_name": name,
                "config": options,
                "created_at": now(), "queue_seq": self._next_queue_seq(),
            })
        self._wake.set()
        return self.get(job_id)

    @staticmethod
    def _check_base(base: str) -> None:
        from prsmed.zoo.presets import PRESETS

        if base not in PRESETS:
            raise InvalidJob(f"unknown base model {base!r}: expected a zoo model, one of {', '.join(sorted(PRESETS))}")

    def _check_options(self, req: JobRequest, data: Path) -> dict[str, Any]:
        """The options, validated as the trainer will validate them, in their canonical JSON form."""
        from pydantic import ValidationError

        from prsmed.train.config import TrainConfig
        from prsmed.validation import validation_problems

        known = set(TrainConfig.model_fields)
        allowed = train_options()
        options = dict(req.options)
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            raise InvalidJob(f"unknown option(s) {', '.join(unknown)}: expected training options, some of "
                             f"{', '.join(sorted(allowed))}")
        for key in options:
            if key in SERVICE_OPTIONS:
                raise InvalidJob(f"option {key!r} is set by the service for each job; remove it from options")
            if key in REQUEST_FIELDS:
                raise InvalidJob(f"option {key!r} is a field of the job request itself; set it there, not in options")
            if key in REFUSED_OPTIONS:
                raise InvalidJob(f"option {key!r} is not accepted: {REFUSED_OPTIONS[key]}")
        try:
            cfg = TrainConfig(model=req.base, data=data, out=self.jobs_dir / "_check", epochs=req.epochs,
                              batch_size=req.batch_size, lr=req.lr, **options)
        except ValidationError as e:
            raise InvalidJob(f"invalid training options: {validation_problems(e)}") from e
        dumped = cfg.model_dump(mode="json")
        # The base model's fine-tuning defaults are made explicit here, so the job's record shows what it runs
        # (and the worker's command line, which passes --epochs, gets the model's max_steps with it).
        resolved = {k: dumped[k] for k in (*REQUEST_FIELDS, "max_steps") if dumped[k] is not None}
        return {**resolved, **{k: dumped[k] for k in options}}

    def _check_name_free(self, name: str) -> None:
        other = self._db.select("adapter_name = ?", (name,))
        if other:
            raise InvalidJob(f"adapter name {name!r} is already taken by job {other[0]['id']}; choose another name")
        if (self.adapter_dir / name).exists():
            raise InvalidJob(f"adapter name {name!r} is already taken by an adapter in the store; choose another name")

    def _check_room(self) -> None:
        waiting = self._db.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
        if waiting >= self.max_queue:
            etas = [r["eta_s"] for r in self._db.select("state = 'running' AND eta_s IS NOT NULL")]
            retry = max(1.0, min(etas)) if etas else _DEFAULT_RETRY_S
            raise QueueFull(f"the job queue is full: {waiting} job(s) waiting, the limit is {self.max_queue}",
                            queue_position=waiting + 1, retry_after_s=float(retry))

    def _next_queue_seq(self) -> int:
        return int(self._db.scalar("SELECT COALESCE(MAX(queue_seq), 0) + 1 FROM jobs"))

    # --- control ------------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobInfo:
        """A queued (or paused) job is canceled at once; a running one is asked to checkpoint and stop, and is
        canceled when its worker exits. A finished job is returned as it is."""
        with self._lock:
            row = self._row(job_id)
            state = row["state"]
            if state in ("queued", "interrupted", "preempted"):
                self._db.update(job_id, state="canceled", finished_at=now(), eta_s=None,
                                detail=f"canceled while {state}")
            elif state == "running":
                self._db.update(job_id, cancel_requested=1)
                worker = self._procs.get(job_id)
                if worker is not None:
                    worker.stop = "cancel"
                    killpg(worker.proc.pid, signal.SIGTERM)
        self._wake.set()
        return self.get(job_id)

    def resume(self, job_id: str) -> JobInfo:
        """Queue a canceled, failed, interrupted or preempted job again; it continues from its last checkpoint."""
        with self._lock:
            row = self._row(job_id)
            state = row["state"]
            if state in ("queued", "running"):
                return self._info(row)
            if state == "succeeded":
                raise InvalidJob(f"job {job_id} already succeeded (adapter {row['adapter']!r}); submit a new job to "
                                 f"train again")
            self._check_room()
            self._db.update(job_id, state="queued", queue_seq=self._next_queue_seq(), cancel_requested=0,
                            error=None, finished_at=None, detail=f"resumed after {state}")
        self._wake.set()
        return self.get(job_id)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover what a previous server process left running, then run the scheduler thread."""
        with self._lock:
            if self._thread is not None and self._thread.isalive():
                return
            self._stopping.clear()
            self._recover()
            self._thread = threading.Thread(target=self._loop, name="prsmed-jobs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the workers (each checkpoints and exits 75), wait up to ``timeout`` seconds (then SIGKILL), mark
        them interrupted so the next :meth:`start` resumes them, and end the scheduler thread."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(1.0, timeout))
            self._thread = None
        with self._lock:
            workers = dict(self._procs)
            for w in workers.values():
                w.stop = w.stop or "shutdown"
                killpg(w.proc.pid, signal.SIGTERM)
        for job_id, w in workers.items():
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("job %s: the worker did not stop within %.0f s; killing it", job_id, timeout)
                killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait()
        for job_id, w in workers.items():
            with self._lock:
                self._procs.pop(job_id, None)
            self._finish(job_id, w, w.proc.returncode)

    def close(self, timeout: float = 60.0) -> None:
        self.stop(timeout)
        self._db.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _recover(self) -> None:
        for row in self._db.select("state = 'running'"):
            self._reap_orphan(row)
            if row["cancel_requested"]:
                self._db.update(row["id"], state="canceled", finished_at=now(), pid=None, eta_s=None,
                                detail="canceled; the server stopped before the worker confirmed")
            else:
                self._db.update(row["id"], state="interrupted", pid=None, eta_s=None,
                                detail="the server stopped while the job was running")
        for row in self._db.select("state = 'interrupted'", order="queue_seq, seq"):
            # An interrupted job keeps its original place in the queue: it was started before those behind it.
            seq = row["queue_seq"] if row["queue_seq"] is not None else self._next_queue_seq()
            self._db.update(row["id"], state="queued", queue_seq=seq,
                            detail="requeued to resume from its last checkpoint")

    def _reap_orphan(self, row: dict) -> None:
        """A worker can outlive a crashed server (it has its own session); stop it before its run is resumed."""
        pid = row["pid"]
        if not pid or not is_worker(pid, self.jobs_dir / row["id"] / CONFIG_FILE):
            return
        log.warning("job %s: a worker from a previous server (pid %d) is still running; stopping it", row["id"], pid)
        killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + _ORPHAN_GRACE_S
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.2)
        if alive(pid):
            killpg(pid, signal.SIGKILL)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # the scheduler must outlive any one job's surprise
                log.exception("job scheduler step failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _tick(self) -> None:
        done: list[tuple[str, Worker, int]] = []
        with self._lock:
            for job_id, w in list(self._procs.items()):
                rc = w.proc.poll()
                if rc is None:
                    self._progress(job_id, w)
                else:
                    del self._procs[job_id]
                    done.append((job_id, w, rc))
        # Outside the lock: publishing an adapter copies files, and get()/cancel() should not wait for that.
        for job_id, w, rc in done:
            self._finish(job_id, w, rc)
        with self._lock:
            while len(self._procs) < self.max_running and not self._stopping.is_set():
                nxt = self._db.select("state = 'queued'", order="queue_seq, seq", limit=1)
                if not nxt:
                    break
                self._launch(nxt[0])

    # --- workers ------------------------------------------------------------------------------------------------
    def _worker_config(self, row: dict, data: Path, run: Path) -> dict[str, Any]:
        """The TrainConfig fields the worker runs: the job's validated options, and what the service sets."""
        # The trainer refuses a run directory with checkpoints unless it resumes.
        return {**row["config"], "model": row["base"], "data": str(data), "out": str(run),
                "resume": (run / "checkpoints").is_dir(), "progress": False}

    def _launch(self, row: dict) -> None:
        job_id = row["id"]
        job_dir = self.jobs_dir / job_id
        run = job_dir / "run"
        try:
            data = self.datasets.path(row["dataset"])
        except DatasetNotFound:
            self._db.update(job_id, state="failed", finished_at=now(),
                            error=f"dataset {row['dataset']} was deleted before the job could start",
                            detail="dataset missing")
            return
        attempt = row["attempts"] + 1
        log_path = job_dir / "worker.log"
        fields = self._worker_config(row, data, run)
        try:
            run.mkdir(parents=True, exist_ok=True)
            # A summary from an earlier attempt must not be mistaken for this attempt's.
            (run / "summary.json").unlink(missing_ok=True)
            args = worker_command(self.python, write_config(job_dir, fields))
            with open(log_path, "ab") as logf:
                resuming = " (resuming)" if fields["resume"] else ""
                logf.write(f"--- {now()} attempt {attempt}{resuming}: {' '.join(args[1:])}\n".encode())
            proc = launch(args, cwd=job_dir, log_path=log_path, env=worker_env(self.worker_threads, drop=(TOKEN_ENV,)))
        except (OSError, ValueError) as e:
            self._db.update(job_id, state="failed", finished_at=now(), attempts=attempt,
                            error=f"could not start the training worker ({self.python}): {e}", detail="no worker")
            return
        self._procs[job_id] = Worker(proc, run, log_path, MetricsTail(run / "metrics.jsonl", from_end=1 << 20))
        self._db.update(job_id, state="running", started_at=row["started_at"] or now(), finished_at=None,
                        attempts=attempt, pid=proc.pid, error=None, cancel_requested=0, report=None,
                        detail=f"attempt {attempt}{resuming}")
        log.info("job %s: worker %d started (attempt %d)", job_id, proc.pid, attempt)

    def _progress(self, job_id: str, w: Worker) -> None:
        lines = w.tail.read()
        row = None
        fields: dict[str, Any] = {}
        train = [r for r in lines if r.get("kind") == "train"]
        evals = [r for r in lines if r.get("kind") == "eval"]
        if train:
            last = train[-1]
            fields.update(step=int(last.get("step", 0)), epoch=last.get("epoch_progress", last.get("epoch")),
                          loss=last.get("loss"), eta_s=last.get("eta_s"))
            if last.get("total_steps"):
                fields["total_steps"] = int(last["total_steps"])
        if evals:
            row = self._db.one(job_id)
            metrics = dict(row["metrics"]) if row else {}
            for r in evals:
                metrics.update(_eval_metrics(r))
            fields["metrics"] = metrics
        if "total_steps" not in fields:
            row = row or self._db.one(job_id)
            if row and row["total_steps"] is None:
                total = total_from_checkpoints(w.run)
                if total:
                    fields["total_steps"] = total
        self._db.update(job_id, **fields)

    def _finish(self, job_id: str, w: Worker, rc: int) -> None:
        """Record how a worker ended (see the module docs), publishing its adapter when it succeeded."""
        self._progress(job_id, w)
        row = self._db.one(job_id)
        summary = read_json(w.run / "summary.json")
        fields: dict[str, Any] = {"pid": None, "eta_s": None}
        if summary.get("step") is not None:
            fields["step"] = int(summary["step"])
        if summary.get("total_steps"):
            fields["total_steps"] = int(summary["total_steps"])
        if isinstance(summary.get("metrics"), dict):
            fields["metrics"] = {**row["metrics"], **summary["metrics"]}
        report = _report(summary, job_id)
        if report is not None:
            fields["report"] = report
        stop = w.stop or ("cancel" if row["cancel_requested"] else None)
        status = summary.get("status")
        if rc == EXIT_OK and status in DONE_STATUSES:
            try:
                self._publish(w.run / "adapter", row["adapter_name"])
            except (OSError, ValueError) as e:
                state, error, detail = "failed", f"training finished but its adapter could not be published: {e}", \
                    "adapter not published"
            else:
                state, error, detail = "succeeded", None, f"{status}: {summary.get('reason') or ''}".rstrip(": ")
                fields["adapter"] = row["adapter_name"]
        elif stop and rc in (EXIT_PREEMPTED, -signal.SIGTERM, -signal.SIGKILL):
            state, error = ("canceled", None) if stop == "cancel" else ("interrupted", None)
            detail = "canceled; the last checkpoint is kept" if stop == "cancel" else "stopped with the server"
        elif rc == EXIT_PREEMPTED:
            state, error = "preempted", None
            detail = summary.get("reason") or "the worker stopped with a checkpoint (exit 75)"
        else:
            state, error = "failed", self._failure(rc, status, summary, w.log)
            detail = error.splitlines()[0]
        if state in FINAL_JOB_STATES:
            fields["finished_at"] = now()
        with self._lock:
            self._db.update(job_id, state=state, error=error, detail=detail, **fields)
        log.info("job %s: worker exited with %s -> %s", job_id, rc, state)
        self._wake.set()

    @staticmethod
    def _failure(rc: int, status: str | None, summary: dict, log_path: Path) -> str:
        if rc < 0:
            how = f"the worker was killed by {signal_name(-rc)}"
            if -rc == signal.SIGKILL:
                how += (" (the kernel's out-of-memory killer sends SIGKILL: if nobody killed it, the job needed more "
                        "memory than the machine or container allows; `prsmed plan` sizes a run)")
        elif rc == EXIT_OK:
            how = f"the worker exited with status 0 but its summary.json says {status or 'nothing'}"
        elif rc == EXIT_BAD_OPTIONS:
            how = "the trainer refused its options (exit status 2)"
        else:
            how = f"the worker exited with status {rc}"
        if summary.get("reason") and status == "failed":
            how += f": {summary['reason']}"
        tail = log_tail(log_path)
        return how + (f"\nlast lines of worker.log:\n{tail}" if tail else "")

    def _publish(self, bundle: Path, name: str) -> None:
        from prsmed.fileio import fsync_dir, fsync_tree
        from prsmed.model.bundle import MANIFEST, verify_bundle

        if not (bundle / MANIFEST).is_file():
            raise ValueError(f"the run wrote no adapter bundle ({bundle.name}/{MANIFEST} is missing)")
        dest = self.adapter_dir / name
        if dest.exists():
            raise ValueError(f"{name!r} already exists in the adapter store")
        tmp = self.adapter_dir / f".{name}.tmp-{secrets.token_hex(4)}"
        try:
            shutil.copytree(bundle, tmp)
            verify_bundle(tmp)
            fsync_tree(tmp)
            os.rename(tmp, dest)
            fsync_dir(self.adapter_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- events -------------------------------------------------------------------------------------------------
    def events(self, job_id: str, *, follow: bool = True) -> Iterator[JobEvent]:
        """A job's progress: its state, then ``step`` and ``metrics`` events from its metrics.jsonl (a finished job
        replays them), ``state`` events on each change, and ``end`` with the final JobInfo once the job is
        succeeded, failed or canceled. Interrupted and preempted jobs are followed on (they resume). Raises
        JobNotFound at once; with ``follow=False`` it stops after what is there now."""
        info = self.get(job_id)
        return self._events(info, follow)

    def _events(self, info: JobInfo, follow: bool) -> Iterator[JobEvent]:
        job_id = info.id
        seen = self._db.last_transition(job_id)
        tail = MetricsTail(self.jobs_dir / job_id / "run" / "metrics.jsonl")
        total = info.total_steps
        yield JobEvent(event="state", data=info.model_dump(mode="json"))
        while True:
            new = self._db.transitions(job_id, seen)
            final = new[-1] if new and new[-1]["state"] in FINAL_JOB_STATES else None
            if new:
                seen = new[-1]["n"]
            current = self.get(job_id)
            total = current.total_steps or total
            for t in new[:-1] if final else new:
                yield self._state_event(current, t)
            # Metrics after the transitions that came before them: a worker has exited before it is final.
            for rec in tail.read():
                if rec.get("kind") == "train":
                    yield JobEvent(event="step", data=_step_data(rec, total))
                elif rec.get("kind") == "eval":
                    yield JobEvent(event="metrics", data={"step": rec.get("step"), **_eval_metrics(rec)})
            if final:
                yield self._state_event(current, final)
            if current.state in FINAL_JOB_STATES:
                yield JobEvent(event="end", data=self.get(job_id).model_dump(mode="json"))
                return
            if not follow:
                return
            time.sleep(self.poll_s)

    @staticmethod
    def _state_event(info: JobInfo, transition: dict) -> JobEvent:
        data = info.model_dump(mode="json")
        data.update(state=transition["state"], at=transition["at"], detail=transition["detail"])
        return JobEvent(event="state", data=data)


