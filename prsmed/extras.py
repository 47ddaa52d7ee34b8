"""Optional parts of the project and the packages each needs (the ``[project.optional-dependencies]`` of
pyproject.toml). ``pip install prsmed`` gives the library, the trainer, the planner and the CLI; the service and the
demo are extras, checked (without importing them) when a command needs one, so a missing one is named.
"""

from __future__ import annotations

import importlib.util

# extra -> the import names it provides (a representative few: enough to tell it is installed).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("bentoml", "fastapi", "grpc", "grpc_health", "grpc_reflection", "multipart", "httpx", "gradio"),
    "demo": ("gradio", "pandas", "httpx"),
    "convert": ("sentencepiece", "google.protobuf"),
    "wandb": ("wandb",),
    "cloud": ("sky",),
    "s3": ("s3fs",),
    "gcs": ("gcsfs",),
    "azure": ("adlfs",),
}
WHAT = {"serve": "the service (prsmed serve)", "demo": "the demo (prsmed demo)",
        "convert": "converting LLaVA-Med's original tokenizer", "wandb": "reporting to Weights & Biases "
        "(--report-to wandb)", "cloud": "launching on a cloud GPU (prsmed launch)", "s3": "checkpoints in s3://",
        "gcs": "checkpoints in gs://", "azure": "checkpoints in az://"}


class MissingExtra(ImportError):
    """An optional part is not installed; the message names the extra to install."""


def missing(extra: str) -> list[str]:
    """The import names of ``extra`` that cannot be found."""
    out = []
    for name in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a half-removed one
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str) -> None:
    """Raise :class:`MissingExtra` naming ``pip install 'prsmed[extra]'`` when the extra is not installed."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(f"{WHAT[extra]} needs the optional packages of prsmed[{extra}], and "
                           f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed: "
                           f"pip install 'prsmed[{extra}]' (in a checkout: pip install -e '.[{extra}]'"
                           f"{', or make serve' if extra in ('serve', 'demo') else ''})")
