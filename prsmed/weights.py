"""Reading and writing weight files safely.

Weights are safetensors; the official ``.pth`` files are read with ``torch.load(weights_only=True)`` only, so a
pickle that tries to run code is refused instead of executed.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A weight file cannot be read or does not fit the module; the message says what was expected and found."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file holding a (possibly nested) state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: it is not a plain tensor state dict and loading it would need to run code from the "
            f"file (weights_only=True refused it: {str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e}); it may be truncated") from e
    # Some trainers wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return dict(obj)


def write_state_dict(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write contiguous CPU copies of ``state`` as safetensors (shared tensors are copied apart)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)


@dataclass
class LoadReport:
    """What happened when a checkpoint was loaded into a module."""

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors"
        if self.ignored:
            prefixes = sorted({k.split(".")[0] for k in self.ignored})
            text += f", ignored {len(self.ignored)} unused tensors (under {', '.join(prefixes)})"
        return text


def mismatch_report(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str:
    """The first few missing, unexpected and mis-shaped keys of ``found`` against ``expected`` (name -> shape), as
    one sentence; "" when they agree."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: checkpoint {found[k]} vs model {expected[k]}"
             for k in expected if k in found and found[k] != expected[k]]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    return "; ".join(parts)


def check_fits(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``module``'s keys with the same shapes.

    The message lists the first few missing, unexpected and mis-shaped keys, so a checkpoint for another model is
    refused instead of half-loaded.
    """
    report = mismatch_report({k: tuple(v.shape) for k, v in module.state_dict().items()},
                             {k: tuple(v.shape) for k, v in state.items()})
    if report:
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__}: {report}"
            + ". Is it a checkpoint for a different model or configuration?"
        )


def load_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str, ignored: Iterable[str] = ()
) -> LoadReport:
    """Load ``state`` into ``module``, every key matching in name and shape (see :func:`check_fits`)."""
    check_fits(module, state, source=source)
    module.load_state_dict(dict(state), strict=True)
    report = LoadReport(loaded=list(state), ignored=list(ignored))
    log.info("%s: %s", source, report.summary())
    return report
