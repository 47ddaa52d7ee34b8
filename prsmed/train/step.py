"""One training forward: the composite model on a batch and its total loss.

The trainer calls :func:`model_loss` for every micro-batch and every validation batch, and the planner's
simulation (prsmed/plan/simulate.py) calls the same function on a synthetic batch, so what the planner sizes is the
trainer's own computation: change the loss here and both follow.
"""

from __future__ import annotations

from typing import Any

import torch

from prsmed.train.lifecycle import TrainingError
from prsmed.train.losses import LossWeights, total_loss


def model_loss(model, pixels: torch.Tensor, inputs, masks: torch.Tensor, modality: torch.Tensor, *, epoch: int,
               weights: LossWeights, autocast) -> tuple[torch.Tensor, dict[str, float], Any, torch.Tensor]:
    """(total loss, its parts, the model's output, float32 mask logits) for one batch; ``autocast`` is the
    precision's context (prsmed.train.device.autocast)."""
    with autocast:
        out = model(pixels, inputs)
    logits = out.mask_logits.float()
    if logits.shape[-2:] != masks.shape[-2:]:
        raise TrainingError(f"the model returned mask logits of size {tuple(logits.shape[-2:])} but masks are "
                            f"{tuple(masks.shape[-2:])} (the vision encoder's input size)")
    loss, parts = total_loss(logits, masks, out.lm_loss, out.modality_logits, modality, epoch=epoch,
                             weights=weights)
    return loss, parts, out, logits
