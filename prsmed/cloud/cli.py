"""``prsmed launch``: a training run as a SkyPilot managed job (``prsmed launch status``, ``prsmed launch logs ID``).

The training options are ``prsmed train``'s, derived from the same :class:`~prsmed.train.config.TrainConfig`
(``--out`` and ``--resume`` are fixed by the task: every start of the job resumes from ``--checkpoint-uri``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from prsmed.train.cli import _fail, _given, _parameter
from prsmed.train.config import TrainConfig
from prsmed.validation import as_flag, validation_problems

launch_app = typer.Typer(help="Train on a rented cloud GPU through SkyPilot (the prsmed\\[cloud] extra).")
# TrainConfig fields the launch sets itself, or that mean nothing on a machine the user never sees.
_NOT_OPTIONS = {"model", "data", "out", "resume", "checkpoint_uri", "gpu", "device", "progress", "on_finish",
                "stop_after"}
EXIT_NO_CLOUD = 3


def _plan_precision(precision: str) -> str:
    return "bf16" if precision == "auto" else precision


def _launch(ctx: typer.Context, *, model: str, data: str, checkpoint_uri: str, gpu: list[str] | None,
            clouds: str | None, spot: bool, max_usd_per_hour: float | None, dry_run: bool, task_file: Path | None,
            name: str | None, options: dict[str, Any]) -> None:
    from prsmed.cloud.task import (CLOUDS, PLATFORMS, LaunchError, build_task, candidates, check_checkpoint_uri,
                                   secret_overrides, to_yaml)
    from prsmed.plan.cli import print_report
    from prsmed.plan.estimate import PlanOptions, plan

    given = _given(ctx, options)
    cloud_list = None
    if clouds:
        cloud_list = [c.strip().lower() for c in clouds.split(",") if c.strip()]
        unknown = sorted(set(cloud_list) - set(CLOUDS))
        if unknown:
            _fail(f"--clouds {', '.join(unknown)}: expected some of {', '.join(CLOUDS)}")
    try:
        # --data is a URI here; TrainConfig checks everything else as `prsmed train` would.
        config = TrainConfig(model=model, data=Path("."), out=Path("."), checkpoint_uri=checkpoint_uri, **given)
    except ValidationError as e:
        _fail(validation_problems(e, as_flag))
    try:
        check_checkpoint_uri(checkpoint_uri)  # before the planner's minute on a big model
        effective = config.batch_size * config.grad_accum if "batch_size" in given else None
        report = plan(PlanOptions(model=model, precision=_plan_precision(config.precision), batch_size=effective,
                                  grad_checkpointing=config.grad_checkpointing, epochs=config.epochs))
        chosen = candidates(report, batch_size=config.batch_size if "batch_size" in given else None,
                            grad_checkpointing=config.grad_checkpointing, gpus=gpu, clouds=cloud_list,
                            max_usd_per_hour=max_usd_per_hour)
        task = build_task(config, data_uri=data, plan=chosen, clouds=cloud_list, spot=spot, name=name)
    except (LaunchError, ValueError) as e:
        _fail(str(e))
    text = to_yaml(task)
    if task_file is not None:
        task_file.write_text(text)
    if dry_run:
        platforms = {PLATFORMS[c] for c in (cloud_list or CLOUDS) if c in PLATFORMS}
        print_report({**report, "rows": [r for r in report["rows"]
                                         if r["gpu"] in chosen["gpus"] and r["platform"] in platforms]})
        typer.echo(f"\nbatch {chosen['batch_size']}"
                   + (f" x accumulation {chosen['grad_accum']}" if chosen["grad_accum"] else "")
                   + (", gradient checkpointing" if chosen["grad_checkpointing"] else "")
                   + f" on any of: {', '.join(chosen['accelerators'])}\n")
        typer.echo(text)
        return
    sky = _sky()
    overrides = secret_overrides(task)
    # A secret this machine does not have is left out rather than sent empty (SkyPilot refuses a null one).
    given = {k for k, _ in overrides}
    submitted = {**task, "envs": {k: v for k, v in task["envs"].items() if v is not None or k in given}}
    sky_task = sky.Task.from_yaml_config(submitted, env_overrides=overrides)
    _check_feasible(sky, sky_task)
    job_id, _ = sky.stream_and_get(sky.jobs.launch(sky_task, name=task["name"]))
    typer.echo(f"submitted managed job {job_id} ({task['name']}); follow it with: prsmed launch logs {job_id}")


def _sky():
    from prsmed.extras import MissingExtra, require

    try:
        require("cloud")
    except MissingExtra as e:
        _fail(str(e))
    import sky

    return sky


def _check_feasible(sky, task) -> None:
    """Run SkyPilot's optimizer here first, so "no cloud enabled" and "no fitting GPU offered" are plain messages
    with what to run, before anything is submitted."""
    from sky import exceptions, optimizer

    with sky.Dag() as dag:
        dag.add(task)
    try:
        optimizer.Optimizer.optimize(dag, quiet=True)
    except exceptions.NoCloudAccessError:
        _fail("no cloud is enabled for SkyPilot on this machine: set up a cloud's credentials and run `sky check` "
              "(docs/cloud-training.md)", EXIT_NO_CLOUD)
    except exceptions.ResourcesUnavailableError as e:
        _fail(f"none of the clouds enabled here offers one of the fitting GPUs: {str(e).splitlines()[0]}; run "
              f"`sky check` to enable more clouds, or widen --gpu / --clouds / --max-usd-per-hour", EXIT_NO_CLOUD)
    except SystemExit:  # SkyPilot 0.9's cloud check exits instead of raising when it finds no cloud
        _fail("no cloud is enabled for SkyPilot on this machine: run `sky check`", EXIT_NO_CLOUD)


def _build_launch():
    def launch(ctx: typer.Context, **kwargs: Any) -> None:
        """Train on a rented GPU as a SkyPilot managed job: spot capacity that recovers from preemption,
        checkpoints in object storage, the machine torn down when the run ends.

        The GPUs offered to SkyPilot are those `prsmed plan` finds this run fits on; SkyPilot picks the cheapest
        one available on your enabled clouds. --dry-run prints the task and the planner's table and launches
        nothing.
        """
        if ctx.invoked_subcommand is not None:
            return
        fixed = {k: kwargs.pop(k) for k in ("model", "data", "checkpoint_uri", "gpu", "clouds", "spot",
                                             "max_usd_per_hour", "dry_run", "task_file", "name")}
        if not fixed["model"] or not fixed["data"] or not fixed["checkpoint_uri"]:
            _fail("--model, --data and --checkpoint-uri are required (or a subcommand: status, logs)")
        _launch(ctx, **fixed, options=kwargs)

    def opt(default, *flags, **kw):
        return typer.Option(default, *flags, show_default=False, **kw)

    own = [
        ("model", Optional[str], opt(None, "--model", help="Zoo model name or a ModelSpec JSON file.")),
        ("data", Optional[str], opt(None, "--data", help="Dataset: a local folder (uploaded), s3://, gs://, az:// "
                                    "or hf://datasets/OWNER/NAME.")),
        ("checkpoint_uri", Optional[str], opt(None, "--checkpoint-uri", help="Object storage for checkpoints and "
                                              "the adapter (s3://, gs://, az://); every recovery resumes from it.")),
        ("gpu", Optional[list[str]], opt(None, "--gpu", help="Only these GPUs of the planner's catalogue "
                                        "(repeatable), e.g. --gpu a100-80gb --gpu h100.")),
        ("clouds", Optional[str], opt(None, "--clouds", help="Comma-separated: vast, runpod, lambda, aws, gcp, "
                                      "azure, kubernetes (default: every cloud enabled in SkyPilot).")),
        ("spot", bool, opt(True, "--spot/--on-demand", help="Spot capacity that SkyPilot recovers from "
                           "preemption (default), or on-demand.")),
        ("max_usd_per_hour", Optional[float], opt(None, "--max-usd-per-hour", min=0.01,
                                                  help="Leave out GPUs whose catalogue price is above this.")),
        ("dry_run", bool, opt(False, "--dry-run", help="Print the task YAML and the planner's table; launch "
                              "nothing.")),
        ("task_file", Optional[Path], opt(None, "--task-file", help="Also write the task YAML here.")),
        ("name", Optional[str], opt(None, "--name", help="The managed job's name.")),
    ]
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d) for n, a, d in own]
    params += [_parameter(n, f) for n, f in TrainConfig.model_fields.items() if n not in _NOT_OPTIONS]
    launch.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return launch


launch_app.callback(invoke_without_command=True)(_build_launch())


@launch_app.command("status")
def status_command() -> None:
    """The managed jobs SkyPilot knows about: id, name, status."""
    sky = _sky()
    try:
        jobs = sky.get(sky.jobs.queue(refresh=False))
    except Exception as e:  # SkyPilot's API server unreachable, not set up, ...
        _fail(f"SkyPilot could not list managed jobs ({type(e).__name__}: {e}); run `sky check` and `sky api info`")
    if not jobs:
        typer.echo("no managed jobs")
    for job in jobs:
        typer.echo(f"{job.get('job_id')}\t{job.get('job_name')}\t{job.get('status')}")


@launch_app.command("logs")
def logs_command(job_id: int = typer.Argument(..., help="The managed job's id (prsmed launch status).")) -> None:
    """Follow a managed job's output."""
    sky = _sky()
    try:
        sky.jobs.tail_logs(job_id=job_id, follow=True)
    except Exception as e:
        _fail(f"SkyPilot could not show job {job_id}'s logs ({type(e).__name__}: {e})")
