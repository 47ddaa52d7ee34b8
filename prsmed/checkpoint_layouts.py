"""Checkpoint layouts: which keys of someone else's state dict are a component's, under which names.

A component that loads checkpoints written by other code (a full SAM state dict, the PRS-Med authors' wrapper, a
DistributedDataParallel save) declares its layouts as data, ordered most specific first; :func:`split_checkpoint`
detects the layout, keeps the component's tensors under the module's own names, and lists the tensors of other
modules as ignored. Keys it does not recognise pass through unchanged, so the strict load that follows
(prsmed.weights.load_strict) refuses them by name. The built-in vision encoders use it, and a third-party
component can too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from prsmed.weights import CheckpointError, LoadReport, load_strict, read_state_dict


@dataclass(frozen=True)
class Layout:
    """One way a checkpoint may hold the component.

    ``marker``: a key prefix that identifies the layout; ``describe``: what writes it, for messages. The
    component's tensors sit under ``prefix`` (stripped, then ``rename`` applied and ``add`` put in front: the names
    in the module); tensors under ``skipped`` belong to other modules and are listed as ignored."""

    name: str
    marker: str
    describe: str
    prefix: str = ""
    skipped: tuple[str, ...] = ()
    add: str = ""
    rename: Callable[[str], str] | None = None


@dataclass
class SplitCheckpoint:
    layout: str
    state: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)


def detect_layout(keys: Sequence[str] | Mapping[str, object], layouts: Sequence[Layout], *, what: str) -> Layout:
    """The first of ``layouts`` whose marker some key starts with; a CheckpointError naming them all otherwise."""
    keys = list(keys)
    for layout in layouts:
        if any(k.startswith(layout.marker) for k in keys):
            return layout
    expected = [f"'{layout.marker}' ({layout.describe})" for layout in layouts]
    listed = ", ".join(expected[:-1]) + f" or {expected[-1]}" if len(expected) > 1 else expected[0]
    shown = ", ".join(keys[:5]) or "no keys at all"
    raise CheckpointError(f"not a {what} checkpoint: expected keys under {listed}; found {shown}")


def unwrapped(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state`` without the ``module.`` prefix a DistributedDataParallel wrapper puts on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def split_checkpoint(state: Mapping[str, torch.Tensor], layouts: Sequence[Layout], *, what: str) -> SplitCheckpoint:
    """``state`` mapped onto the module's names by its detected layout (see the module docs)."""
    state = unwrapped(state)
    layout = detect_layout(state, layouts, what=what)
    rename = layout.rename or (lambda key: key)
    kept: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, tensor in state.items():
        if any(key.startswith(p) for p in layout.skipped):
            ignored.append(key)
        elif key.startswith(layout.prefix):
            kept[layout.add + rename(key[len(layout.prefix):])] = tensor
        else:
            kept[key] = tensor
    return SplitCheckpoint(layout=layout.name, state=kept, ignored=ignored)


def load_checkpoint(module, path, split: Callable[[Mapping[str, torch.Tensor]], SplitCheckpoint]) -> LoadReport:
    """Read ``path``, split it with ``split`` (a component's :func:`split_checkpoint` over its layouts) and load the
    result strictly into ``module``; the report names the layout and the tensors left out."""
    parts = split(read_state_dict(path))
    return load_strict(module, parts.state, source=f"{path} ({parts.layout} layout)", ignored=parts.ignored)
