"""One wording for pydantic's validation errors, wherever options reach the user (CLI flags, environment
variables, job requests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import ValidationError


def dotted(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc)


def as_flag(loc: Sequence) -> str:
    """``("grad_accum",)`` -> ``--grad-accum``."""
    return "--" + "-".join(str(p) for p in loc).replace("_", "-")


def validation_problems(e: ValidationError, where: Callable[[Sequence], str] = dotted) -> str:
    """Every problem, as ``field: message``; a check across several fields (no location) by its message alone."""
    problems = []
    for err in e.errors():
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where(err['loc'])}: {message}" if err["loc"] else message)
    return "; ".join(problems)
