"""Fine-tuning jobs: validation, the queue, and real `python -m prsmed.train` workers on prsmed-tiny and tiny data
(success, cancel and resume, a worker killed by SIGKILL, a server that crashed and restarted)."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import zipfile
from pathlib import Path

import pytest
from prsmed_sdk.models import JobInfo, JobRequest, TrainingReport

from prsmed.data.synth import synthesize
from prsmed.infer.adapters import AdapterStore
from prsmed.model.bundle import verify_bundle
from prsmed.train.config import TrainConfig

from prsmed_service import job_worker
from prsmed_service import jobs as jobs_mod

from prsmed_service.auth import TOKEN_ENV
from prsmed_service.datasets import DatasetNotFound, DatasetStore
from prsmed_service.jobs import InvalidJob, JobManager, JobNotFound, MetricsTail, QueueFull

pytestmark = pytest.mark.timeout(120)

# A few optimizer steps of one row, a checkpoint after each, validation on 2 rows: a step takes a fraction of a
# second, a worker's start about 5 s. Jobs that are stopped midway run longer, so the test can react in time.
FAST = {"max_steps": 3, "save_every": 1, "val_max_samples": 2, "tensorboard": False}
LONG = 12


def zipped(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


@pytest.fixture(scope="module")
def upload(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=24, seed=1, size=64)
    return zipped(root)


@pytest.fixture(scope="module")
def store(tmp_path_factory, upload) -> DatasetStore:
    return DatasetStore(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="module")
def dataset(store, upload) -> str:
    return store.add_zip(upload, name="synthetic").id


def manager(root: Path, store: DatasetStore, **kw) -> JobManager:
    kw.setdefault("poll_s", 0.2)
    # One thread: OpenMP workers spinning on cores that other processes also use make each step 20-40x slower.
    kw.setdefault("worker_threads", 1)
    return JobManager(root / "svc", datasets=store, adapter_dir=root / "adapters", **kw)


def request(dataset: str, name: str | None = None, **options) -> JobRequest:
    return JobRequest(dataset=dataset, base="prsmed-tiny", epochs=3, batch_size=1, lr=1e-3, name=name,
                      options={**FAST, **options})


def wait_for(predicate, timeout: float = 60, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def states(events) -> list[str]:
    return [e.data["state"] for e in events if e.event == "state"]


def worker_pid(jm: JobManager, job_id: str) -> int:
    return wait_for(lambda: jm._procs.get(job_id) and jm._procs[job_id].proc.pid, what="the worker")


# --- without training ----------------------------------------------------------------------------------------------

def test_requests_are_validated(tmp_path, store, dataset):
    jm = manager(tmp_path, store)
    with pytest.raises(DatasetNotFound):
        jm.submit(request("0123456789ab"))
    with pytest.raises(InvalidJob, match="unknown base model 'nope'.*prsmed-tiny"):
        jm.submit(request(dataset).model_copy(update={"base": "nope"}))
    with pytest.raises(InvalidJob, match="unknown option.*bogus, colour.*max_steps"):
        jm.submit(request(dataset, bogus=1, colour="red"))
    with pytest.raises(InvalidJob, match="'on_finish' is not accepted: it runs a shell command"):
        jm.submit(request(dataset, on_finish="touch /tmp/x"))
    with pytest.raises(InvalidJob, match="'out' is set by the service"):
        jm.submit(request(dataset, out="/tmp/elsewhere"))
    with pytest.raises(InvalidJob, match="'epochs' is a field of the job request"):
        jm.submit(request(dataset, epochs=4))
    with pytest.raises(InvalidJob, match="max_steps: Input should be greater than 0"):
        jm.submit(request(dataset, max_steps=0))
    with pytest.raises(InvalidJob, match="min_lr"):
        jm.submit(request(dataset, min_lr=0.5))
    with pytest.raises(InvalidJob, match="adapter name '../x' is not valid"):
        jm.submit(request(dataset, name="../x"))
    job = jm.submit(request(dataset, name="mine", max_steps="7", grad_checkpointing=True))
    assert job.config == {"epochs": 3, "batch_size": 1, "lr": 1e-3, **FAST, "max_steps": 7,
                          "grad_checkpointing": True}
    with pytest.raises(InvalidJob, match="'mine' is already taken by job"):
        jm.submit(request(dataset, name="mine"))
    (tmp_path / "adapters" / "published").mkdir()
    with pytest.raises(InvalidJob, match="'published' is already taken by an adapter"):
        jm.submit(request(dataset, name="published"))
    fields = jm._worker_config(jm._db.one(job.id), Path("/d"), tmp_path / "run")
    config = job_worker.write_config(tmp_path, fields)
    cmd = job_worker.worker_command(sys.executable, config)
    assert cmd[1:] == ["-m", "prsmed.train", "--config", str(config)]
    handed = TrainConfig.model_validate_json(config.read_text())
    assert (handed.max_steps, handed.grad_checkpointing, handed.tensorboard) == (7, True, False)
    assert (handed.model, handed.data, handed.resume, handed.progress) == ("prsmed-tiny", Path("/d"), False, False)


def test_every_config_field_is_a_cli_option_and_an_api_option(tmp_path, store, dataset):
    """The CLI's options are derived from TrainConfig, and a job accepts every field but the few the service sets
    itself or refuses (a shell command, say); betas among them, which the command line once lacked."""
    import typer

    from prsmed.train.cli import train

    app = typer.Typer()
    app.command()(train)
    known = {o for p in typer.main.get_command(app).params for o in (*p.opts, *p.secondary_opts)}
    for key in TrainConfig.model_fields:
        assert "--" + key.replace("_", "-") in known, f"TrainConfig.{key} has no `prsmed train` option"
    accepted = set(jobs_mod.train_options())
    assert accepted == set(TrainConfig.model_fields) - jobs_mod.SERVICE_OPTIONS - set(jobs_mod.REQUEST_FIELDS) \
        - set(jobs_mod.REFUSED_OPTIONS)
    jm = manager(tmp_path, store)
    job = jm.submit(request(dataset, betas=[0.8, 0.95]))
    fields = jm._worker_config(jm._db.one(job.id), Path("/d"), tmp_path / "run")
    config = job_worker.write_config(tmp_path, fields)
    assert TrainConfig.model_validate_json(config.read_text()).betas == (0.8, 0.95)
    with pytest.raises(InvalidJob, match="betas"):
        jm.submit(request(dataset, betas=[0.8, 1.5]))


def test_the_queue_bounds_orders_cancels_and_resumes(tmp_path, store, dataset):
    jm = manager(tmp_path, store, max_queue=2)  # not started: nothing leaves the queue
    a, b = jm.submit(request(dataset)), jm.submit(request(dataset))
    assert (a.state, a.queue_position, b.queue_position) == ("queued", 1, 2)
    assert a.adapter_name == a.id and a.created_at.endswith("Z")
    with pytest.raises(QueueFull) as full:
        jm.submit(request(dataset))
    assert full.value.queue_position == 3 and full.value.retry_after_s == 30
    assert [j.id for j in jm.list()] == [b.id, a.id]  # newest first

    canceled = jm.cancel(a.id)
    assert canceled.state == "canceled" and canceled.finished_at and canceled.queue_position is None
    assert jm.get(b.id).queue_position == 1
    assert [e.event for e in jm.events(a.id)] == ["state", "end"]  # a finished job's stream ends at once
    assert jm.cancel(a.id).state == "canceled"  # final: as it is

    again = jm.resume(a.id)
    assert again.state == "queued" and again.queue_position == 2 and again.finished_at is None
    assert jm.resume(b.id) == jm.get(b.id)  # queued: as it is
    with pytest.raises(QueueFull):
        jm.submit(request(dataset))
    assert [e.event for e in jm.events(b.id, follow=False)] == ["state"]
    for bad in (jm.get, jm.cancel, jm.resume, jm.events):
        with pytest.raises(JobNotFound):
            bad("nope")


def test_a_worker_that_fails_at_once_is_failed_with_its_log(tmp_path, store, dataset):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'something broke: no GPU today' >&2\nexit 3\n")
    fake.chmod(0o755)
    with manager(tmp_path, store, python=str(fake)) as jm:
        job = jm.submit(request(dataset))
        end = list(jm.events(job.id))[-1]
    info = JobInfo(**end.data)
    assert end.event == "end" and info.state == "failed" and info.attempts == 1
    assert info.error.startswith("the worker exited with status 3") and "no GPU today" in info.error


def test_a_job_whose_dataset_vanished_fails_clearly(tmp_path, store, upload):
    # Other files than the shared dataset's: the same files would be that dataset (uploads are deduplicated).
    other = io.BytesIO(upload)
    with zipfile.ZipFile(other, "a") as zf:
        zf.writestr("notes.txt", "a dataset of its own")
    doomed = store.add_zip(other.getvalue()).id
    jm = manager(tmp_path, store)
    job = jm.submit(request(doomed))
    store.delete(doomed)
    with jm:
        end = list(jm.events(job.id))[-1]
    assert end.data["state"] == "failed" and f"dataset {doomed} was deleted" in end.data["error"]


def test_metrics_tail_skips_partial_lines_and_survives_a_resume_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []

    def line(step: int, t: float) -> str:
        return json.dumps({"time": t, "kind": "train", "step": step}) + "\n"

    path.write_text(line(1, 1.0) + line(2, 2.0) + line(3, 3.0)[:10])
    assert [r["step"] for r in tail.read()] == [1, 2]
    with open(path, "a") as f:
        f.write(line(3, 3.0)[10:] + line(4, 4.0))
    assert [r["step"] for r in tail.read()] == [3, 4]
    # a resumed run keeps the lines up to its checkpoint (step 2), then appends the re-run steps
    path.write_text(line(1, 1.0) + line(2, 2.0) + line(3, 10.0) + line(4, 11.0) + line(5, 12.0))
    assert [r["step"] for r in tail.read()] == [3, 4, 5]
    assert tail.read() == []
    big = MetricsTail(path, from_end=60)  # a progress view starts near the end, at a line boundary
    assert [r["step"] for r in big.read()] == [5]


def report_of_a_run() -> dict:
    from prsmed.train.report import build_report

    def scores(step: int, zone: float) -> dict:
        return {"step": step, "score": (0.8 + 2 * zone) / 3, "dice_at_05": 0.8, "soft_dice": 0.78,
                "zone_acc_text": zone, "agreement": zone, "hit_length_limit": 0.0, "repeated_words": 0.0,
                "loss_lm": 1.2, "rows": 2, "answer_rows": 2, "examples": ["top left."]}

    return build_report(validation="2 rows of the dataset's val split", rows=2, before=scores(0, 1.0),
                        best=scores(2, 0.5), last=scores(2, 0.5), kept="best", final_step=2, max_new_tokens=48)


def test_the_runs_report_reaches_the_job_typed_and_survives_an_older_table(tmp_path, store, dataset):
    import sqlite3

    jm = manager(tmp_path, store)
    job = jm.submit(request(dataset))
    assert job.report is None
    run = tmp_path / "run"
    run.mkdir()
    report = report_of_a_run()
    (run / "summary.json").write_text(json.dumps({"status": "preempted", "step": 2, "report": report}))
    worker = job_worker.Worker(proc=None, run=run, log=run / "worker.log", tail=MetricsTail(run / "metrics.jsonl"))
    jm._finish(job.id, worker, jobs_mod.EXIT_PREEMPTED)
    info = jm.get(job.id)
    assert info.state == "preempted" and isinstance(info.report, TrainingReport)
    assert info.report.answers_worse and info.report.verdict.startswith("worse than before training")
    assert info.report.before.zone_acc_text == 1.0 and info.report.best.step == 2
    assert JobInfo.model_validate_json(info.model_dump_json()).report == info.report  # as the API sends it
    # A report that breaks the contract is left out; the job's state does not depend on it.
    (run / "summary.json").write_text(json.dumps({"status": "preempted", "step": 2, "report": {"kept": "neither"}}))
    jm._finish(job.id, worker, jobs_mod.EXIT_PREEMPTED)
    assert jm.get(job.id).state == "preempted" and jm.get(job.id).report == info.report
    jm.close()
    # A job table written before reports existed gains the column and reads as "no report yet".
    with sqlite3.connect(tmp_path / "svc" / "jobs.sqlite") as conn:
        conn.execute("ALTER TABLE jobs DROP COLUMN report")
    again = manager(tmp_path, store)
    assert again.get(job.id).report is None and again.get(job.id).state == "preempted"
    again.close()


# --- real workers ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_job_trains_publishes_its_adapter_and_replays(tmp_path, store, dataset):
    with manager(tmp_path, store) as jm:
        job = jm.submit(request(dataset, name="tiny-ft"))
        events = list(jm.events(job.id))
    assert events[0].event == "state" and events[-1].event == "end"
    assert [e.data["step"] for e in events if e.event == "step"] == [1, 2, 3]
    assert all(e.data["loss"] is not None and e.data["lr"] for e in events if e.event == "step")
    assert any(e.event == "metrics" and "val_dice" in e.data for e in events)
    assert "running" in states(events) and states(events)[-1] == "succeeded"
    info = JobInfo(**events[-1].data)
    assert (info.state, info.adapter, info.step, info.total_steps, info.attempts) == ("succeeded", "tiny-ft", 3, 3, 1)
    assert info.error is None and info.finished_at and info.started_at and "val_dice" in info.metrics
    report = info.report  # the run's before / best / last, typed by the SDK's contract
    assert report.rows == 2 and report.kept == "best" and report.verdict
    assert (report.before.step, report.best.step, report.last.step) == (0, 3, 3)
    assert report.before.answer_rows == report.best.answer_rows == 2 and report.best.zone_acc_text is not None
    before = [e for e in events if e.event == "metrics" and e.data["before_training"]]
    assert [e.data["step"] for e in before] == [0] and not info.metrics["before_training"]

    manifest = verify_bundle(tmp_path / "adapters" / "tiny-ft")
    assert manifest.base.name == "prsmed-tiny"
    assert AdapterStore(tmp_path / "adapters").names() == ["tiny-ft"]
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["tiny-ft"]  # no temporary copies

    later = manager(tmp_path, store)  # a finished job replays: state, its steps, end
    replay = list(later.events(job.id))
    assert replay[0].data["state"] == "succeeded" and replay[-1].event == "end"
    assert [e.data["step"] for e in replay if e.event == "step"] == [1, 2, 3]
    with pytest.raises(InvalidJob, match="already succeeded"):
        later.resume(job.id)
    with pytest.raises(InvalidJob, match="already taken"):
        later.submit(request(dataset, name="tiny-ft"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cancel_keeps_the_checkpoint_and_resume_finishes(tmp_path, store, dataset):
    with manager(tmp_path, store) as jm:
        job = jm.submit(request(dataset, max_steps=LONG))
        first = []
        for ev in jm.events(job.id):
            if ev.event == "step" and not any(e.event == "step" for e in first):
                assert jm.cancel(job.id).state == "running"  # it stops after the step, with a checkpoint
            first.append(ev)
        stopped = JobInfo(**first[-1].data)
        assert stopped.state == "canceled" and stopped.error is None and stopped.adapter is None
        assert stopped.step < LONG
        assert list((jm.run_dir(job.id) / "checkpoints").glob("step-*"))
        assert not (tmp_path / "adapters" / job.adapter_name).exists()

        assert jm.resume(job.id).state == "queued"
        second = list(jm.events(job.id))
    done = JobInfo(**second[-1].data)
    assert (done.state, done.step, done.attempts, done.adapter) == ("succeeded", LONG, 2, job.adapter_name)
    steps = [e.data["step"] for e in second if e.event == "step"]
    assert steps[-1] == LONG and steps == sorted(steps)
    assert "resumed from" in jm.log_path(job.id).read_text()
    verify_bundle(tmp_path / "adapters" / job.adapter_name)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_worker_fails_with_the_signal_and_the_manager_carries_on(tmp_path, store, dataset):
    with manager(tmp_path, store) as jm:
        job = jm.submit(request(dataset, max_steps=2))
        os.killpg(worker_pid(jm, job.id), signal.SIGKILL)
        failed = JobInfo(**list(jm.events(job.id))[-1].data)
        assert failed.state == "failed" and "killed by SIGKILL" in failed.error and failed.finished_at
        # the scheduler is still there: the same job, resumed, runs to the end
        jm.resume(job.id)
        done = JobInfo(**list(jm.events(job.id))[-1].data)
    assert (done.state, done.step, done.attempts, done.error) == ("succeeded", 2, 2, None)


OOM_WORKER = """
import resource, runpy, sys
from prsmed.train import trainer

def out_of_room(self, _train_loop=trainer.Trainer.train_loop):
    # Cap the address space a little above what the worker maps now: its first training step finds no memory,
    # as a worker on a machine that is out of memory would.
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (16 << 20), resource.RLIM_INFINITY))
    return _train_loop(self)

trainer.Trainer.train_loop = out_of_room
assert sys.argv[1:3] == ["-m", "prsmed.train"], sys.argv
sys.argv = ["prsmed.train", *sys.argv[3:]]
runpy.run_module("prsmed.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_worker_that_runs_out_of_memory_is_failed_with_the_reason(tmp_path, store, dataset):
    script = tmp_path / "oom_worker.py"
    script.write_text(OOM_WORKER)
    python = tmp_path / "python-with-little-memory"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    python.chmod(0o755)
    with manager(tmp_path, store, python=str(python)) as jm:
        job = jm.submit(request(dataset))
        end = JobInfo(**list(jm.events(job.id))[-1].data)
    assert end.state == "failed" and end.finished_at, end
    assert "out of host memory at step 1" in end.error and "--batch-size" in end.error, end.error


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_crashed_server_leaves_running_jobs_that_the_next_one_resumes(tmp_path, store, dataset):
    first = manager(tmp_path, store)
    first.start()
    job = first.submit(request(dataset, max_steps=LONG))
    for ev in first.events(job.id):
        if ev.event == "step":
            break
    checkpoints = first.run_dir(job.id) / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("step-*")), what="a checkpoint")
    # the crash: the scheduler thread dies with the server, the worker too, the row still says running
    first._stopping.set()
    first._wake.set()
    first._thread.join()
    worker = first._procs[job.id].proc
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert first.get(job.id).state == "running"

    second = manager(tmp_path, store)
    stream = second.events(job.id)
    assert next(stream).data["state"] == "running"
    second.start()
    try:
        rest = list(stream)
    finally:
        second.stop()
    assert states(rest)[:3] == ["interrupted", "queued", "running"] and states(rest)[-1] == "succeeded"
    done = JobInfo(**rest[-1].data)
    assert (done.state, done.step, done.attempts) == ("succeeded", LONG, 2)
    log = second.log_path(job.id).read_text()
    assert "attempt 2 (resuming)" in log and "resumed from" in log


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stop_checkpoints_running_jobs_and_start_resumes_them(tmp_path, store, dataset, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "do-not-leak-this-token")
    jm = manager(tmp_path, store)
    jm.start()
    job = jm.submit(request(dataset, max_steps=LONG))
    for ev in jm.events(job.id):
        if ev.event == "step":
            break
    # the worker runs at a lower priority, with capped threads, and without the API token
    pid = worker_pid(jm, job.id)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"OMP_NUM_THREADS=1" in environ and b"MKL_NUM_THREADS=1" in environ
    assert not any(e.startswith(TOKEN_ENV.encode()) for e in environ)
    assert os.getpriority(os.PRIO_PROCESS, pid) >= job_worker.WORKER_NICE
    jm.stop(timeout=120)
    paused = jm.get(job.id)
    assert paused.state == "interrupted" and paused.finished_at is None
    assert list((jm.run_dir(job.id) / "checkpoints").glob("step-*"))
    with manager(tmp_path, store) as again:
        done = JobInfo(**list(again.events(job.id))[-1].data)
    assert (done.state, done.step, done.attempts) == ("succeeded", LONG, 2)
