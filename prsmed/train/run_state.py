"""What a run's checkpoint holds for this run (checkpoint.py holds how it is written): the tensors a run trains,
and whether a checkpoint belongs to the run that wants to resume from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prsmed.train.checkpoint import Checkpoint
from prsmed.train.config import RESUMABLE_OVERRIDES
from prsmed.train.lifecycle import TrainingError
from prsmed.weights import CheckpointError


def trained_keys(model, trainable: Sequence[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Trained parameters, plus the buffers (e.g. BatchNorm statistics) of the non-LLM components that train."""
    trained = {n for n, _ in trainable}
    parts = {n.split(".", 1)[0] for n in trained} - {"llm"}
    params = {n for n, _ in model.named_parameters()}
    return [k for k in model.state_dict() if k in trained or (k not in params and k.split(".", 1)[0] in parts)]


def trained_tensors(model, trainable: Sequence[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """The tensors behind :func:`trained_keys`, live (writing into them changes the model)."""
    state = model.state_dict(keep_vars=True)
    return {k: state[k].data if isinstance(state[k], torch.nn.Parameter) else state[k]
            for k in trained_keys(model, trainable)}


def copy_trained(own: dict[str, torch.Tensor], ckpt: Checkpoint) -> None:
    """Copy a checkpoint's trained tensors into the model's, after checking that names and shapes match."""
    missing, extra = sorted(set(own) - set(ckpt.trained)), sorted(set(ckpt.trained) - set(own))
    if missing or extra:
        raise CheckpointError(f"{ckpt.path}: trained tensors do not fit this model ({len(missing)} missing, e.g. "
                              f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})")
    for k, t in own.items():
        if tuple(ckpt.trained[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{ckpt.path}: {k} is {tuple(ckpt.trained[k].shape)} but the model has "
                                  f"{tuple(t.shape)}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(ckpt.trained[k].to(t.dtype))


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with the run resuming from it."""

    world_size: int
    recipe: dict[str, Any]
    model_name: str
    fingerprint: str
    data: str
    data_sha256: str
    params: list[str]

    def check(self, ckpt: Checkpoint) -> None:
        """Raise :class:`TrainingError` naming the first difference between the checkpoint's run and this one."""
        st, where = ckpt.state, ckpt.path
        if st.get("world_size") != self.world_size:
            raise TrainingError(f"{where} was written by {st.get('world_size')} processes but this run has "
                                f"{self.world_size}; resume with the same number of processes")
        # A field that became resumable since the checkpoint was written no longer counts.
        theirs = {k: v for k, v in st.get("recipe", {}).items() if k not in RESUMABLE_OVERRIDES}
        diff = sorted(k for k in set(theirs) | set(self.recipe) if theirs.get(k) != self.recipe.get(k))
        if diff:
            shown = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {self.recipe.get(k)!r}" for k in diff[:6])
            raise TrainingError(f"{where} belongs to a run with a different recipe ({shown}); resume with the same "
                                f"options, or start a new run in a new --out")
        if st.get("model", {}).get("fingerprint") != self.fingerprint:
            raise TrainingError(f"{where} was trained on model {st.get('model')} but this is "
                                f"{self.model_name!r} ({self.fingerprint})")
        if st.get("data_manifest_sha256") != self.data_sha256:
            raise TrainingError(f"{where} was trained on data with manifest {st.get('data_manifest_sha256')} but "
                                f"{self.data} now has {self.data_sha256}; the data changed since the checkpoint")
        if st.get("optimizer_params") != self.params:
            raise TrainingError(f"{where}: the trained parameters differ from this model's")
