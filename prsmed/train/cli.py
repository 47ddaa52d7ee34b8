"""``prsmed train``: the command-line face of :class:`~prsmed.train.config.TrainConfig`.

Every option is derived from a TrainConfig field (its name, type, bounds and description), so each field a
configuration has can be set here as it can through the service's API and the SDK; ``--config FILE`` reads a whole
configuration as JSON (what a service job hands its worker), and options given beside it override its fields.

Mount with ``app.command("train")(train)``; ``python -m prsmed.train`` runs it alone (that is what torchrun runs).
"""

from __future__ import annotations

import inspect
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from prsmed.train.config import TrainConfig
from prsmed.validation import as_flag, validation_problems

EXIT_BAD_OPTIONS = 2


def _fail(message: str, code: int = EXIT_BAD_OPTIONS) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _plain(annotation: Any) -> Any:
    """``int | None`` -> ``int``: the CLI's None already means "not given"."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _parameter(name: str, field) -> inspect.Parameter:
    kind = _plain(field.annotation)
    flag = "--" + name.replace("_", "-")
    description = (field.description or "").rstrip(".")
    help_text = description[:1].upper() + description[1:] + "."
    if not field.is_required() and field.default is not None and "default" not in description:
        help_text += f" Default: {_shown(field.default)}."
    if kind is bool:
        option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
        annotation: Any = Optional[bool]
    elif typing.get_origin(kind) is tuple:
        option = typer.Option(None, flag, help=help_text, show_default=False)
        annotation = Optional[tuple[typing.get_args(kind)]]  # type: ignore[misc]
    else:
        option = typer.Option(None, flag, help=help_text, show_default=False)
        annotation = Optional[kind]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options the user typed (not defaults), as TrainConfig fields."""
    # By name: typer may carry its own copy of click, whose enum is not click's.
    return {name: value for name, value in values.items()
            if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        _fail(f"--config: cannot read {path} ({e.strerror or e})")
    except json.JSONDecodeError as e:
        _fail(f"--config: {path} is not JSON ({e.msg} at line {e.lineno})")
    if not isinstance(raw, dict):
        _fail(f"--config: {path} holds a JSON {type(raw).__name__}, expected an object of training options")
    return raw


def _train(ctx: typer.Context, config: Optional[Path], **options: Any) -> None:
    from prsmed.train.trainer import run_training

    fields = _read_config(config) if config is not None else {}
    fields.update(_given(ctx, options))
    try:
        cfg = TrainConfig(**fields)
    except ValidationError as e:
        _fail(validation_problems(e, as_flag))
    result = run_training(cfg)
    if result.status == "failed":
        typer.echo(f"error: {result.reason}", err=True)
    elif result.report and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one table, not one per process
        from prsmed.train.report import format_report

        typer.echo(format_report(result.report))
    raise typer.Exit(result.exit_code)


def _build_train():
    def train(ctx: typer.Context, config: Optional[Path] = None, **options: Any) -> None:
        """Fine-tune a PRS-Med model (LoRA on the LLM, vision encoder and fusion head trained).

        --model, --data and --out are required, on the command line or in --config. Exit status: 0 done
        (completed, early-stopped or budget reached), 75 preempted/paused with a checkpoint (rerun with --resume),
        1 failed, 2 bad options.
        """
        _train(ctx, config, **options)

    params = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--config", help="A JSON file of training options (TrainConfig fields); options given here "
            "override its values.", show_default=False)),
        *(_parameter(name, field) for name, field in TrainConfig.model_fields.items()),
    ]
    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return train


train = _build_train()
