"""The training losses (PRSMED.md section 2), with the authors' two mask-loss slips fixed.

* Structure loss (PraNet style) = boundary-weighted BCE + weighted IoU. The boundary weight
  ``w = 1 + 5·|AvgPool31x31(mask) − mask|`` emphasises pixels near the lesion edge. The authors pass
  ``reduce='none'`` to the BCE, which PyTorch reads as ``reduction='mean'``, so their BCE ignores ``w``; here the
  weight is applied: ``sum(w·bce) / sum(w)`` per image.
* Masks are resized to the model's input size with NEAREST and stay binary (the authors resize bilinearly and never
  re-binarise, which turns the edges into soft targets).
* LM loss: cross-entropy on the answer tokens only; the model computes it (its labels mask the prompt).
* Auxiliary modality classification: CE on the 6 dataset classes, weight 0.5 for the first 5 epochs, then 0.

``total = seg_weight·L_seg + lm_weight·L_lm + cls_weight(epoch)·L_cls``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# The authors' labels (PRSMED.md 1.4); "polyp" is the last class. Names match case-insensitively.
MODALITY_IDS: dict[str, int] = {"brain": 0, "breast": 1, "lung_ct": 2, "lung_xray": 3, "skin": 4, "polyp": 5}


def modality_id(name: str | None) -> int:
    """The class id of a modality name, or ``IGNORE_INDEX`` for anything unknown (no loss for that row)."""
    if not name:
        return IGNORE_INDEX
    return MODALITY_IDS.get(str(name).strip().lower(), IGNORE_INDEX)


def modality_targets(names: Iterable[str | None]) -> torch.Tensor:
    return torch.tensor([modality_id(n) for n in names], dtype=torch.long)


def resize_mask(mask: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """A binary (H, W) mask -> float (size, size) in {0, 1}, resized NEAREST so it stays binary."""
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    m = (m > 0).float()[None, None]
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m, size=(size, size), mode="nearest")
    return m[0, 0]


def boundary_weights(mask: torch.Tensor, *, kernel: int = 31, factor: float = 5.0) -> torch.Tensor:
    """``1 + factor·|AvgPool(mask) − mask|`` with a ``kernel``-wide window, stride 1, same-size padding."""
    # A k×k mean with zero padding is a k-row mean of k-column means: two 1-D passes instead of k² work per pixel
    # (at 1024² the 2-D pool dominated the whole loss).
    pad = kernel // 2
    local_mean = F.avg_pool2d(mask, kernel_size=(kernel, 1), stride=1, padding=(pad, 0))
    local_mean = F.avg_pool2d(local_mean, kernel_size=(1, kernel), stride=1, padding=(0, pad))
    return 1.0 + factor * (local_mean - mask).abs()


def _as_b1hw(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected masks/logits shaped (B, 1, H, W) or (B, H, W); got {tuple(x.shape)}")
    return x.float()


def weighted_bce(logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image ``sum(w·bce) / sum(w)``: shape (B,)."""
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    return (weight * bce).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3))


def weighted_iou(logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image ``1 − (Σw·p·m + 1) / (Σw·(p+m) − Σw·p·m + 1)``: shape (B,)."""
    p = torch.sigmoid(logits)
    inter = (weight * p * mask).sum(dim=(1, 2, 3))
    union = (weight * (p + mask)).sum(dim=(1, 2, 3))
    return 1.0 - (inter + 1.0) / (union - inter + 1.0)


def dice_loss(logits: torch.Tensor, mask: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Per-image ``1 − soft Dice``: shape (B,)."""
    return 1.0 - soft_dice(logits, mask, smooth=smooth)


def soft_dice(logits: torch.Tensor, mask: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Per-image soft Dice of sigmoid(logits) against a binary mask (the validation metric): shape (B,)."""
    logits, mask = _as_b1hw(logits), _as_b1hw(mask)
    p = torch.sigmoid(logits)
    inter = (p * mask).sum(dim=(1, 2, 3))
    return (2.0 * inter + smooth) / (p.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + smooth)


@dataclass(frozen=True)
class SegLoss:
    total: torch.Tensor  # scalar
    bce: torch.Tensor
    iou: torch.Tensor
    dice: torch.Tensor | None


def structure_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    dice_weight: float = 0.0,
    boundary: bool = True,
    kernel: int = 31,
    factor: float = 5.0,
) -> SegLoss:
    """Boundary-weighted BCE + weighted IoU (+ ``dice_weight``·Dice), averaged over the batch.

    ``logits`` and ``mask`` are (B, 1, H, W) (or (B, H, W)) at the same size; the loss is computed in float32 so it
    is safe under autocast. ``boundary=False`` uses uniform weights (for comparison only).
    """
    logits, mask = _as_b1hw(logits), _as_b1hw(mask)
    if logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} must have the same shape")
    weight = boundary_weights(mask, kernel=kernel, factor=factor) if boundary else torch.ones_like(mask)
    bce = weighted_bce(logits, mask, weight).mean()
    iou = weighted_iou(logits, mask, weight).mean()
    total = bce + iou
    dice = None
    if dice_weight:
        dice = dice_loss(logits, mask).mean()
        total = total + dice_weight * dice
    return SegLoss(total=total, bce=bce, iou=iou, dice=dice)


def modality_loss(logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
    """CE over rows with a known modality. With none known it is an exact zero that still touches ``logits``,
    so the head's parameters get (zero) gradients on every step instead of a NaN from an empty mean."""
    if logits is None:
        return None
    logits = logits.float()
    targets = targets.to(logits.device)
    if bool((targets != IGNORE_INDEX).any()):
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return logits.sum() * 0.0


def cls_weight_for_epoch(epoch: int, *, weight: float = 0.5, epochs: int = 5) -> float:
    """The auxiliary classifier's weight: ``weight`` for epochs ``0..epochs-1`` (0-based), then 0."""
    return weight if epoch < epochs else 0.0


@dataclass(frozen=True)
class LossWeights:
    seg: float = 1.0
    lm: float = 1.0
    dice: float = 0.0
    cls: float = 0.5
    cls_epochs: int = 5


def total_loss(
    mask_logits: torch.Tensor,
    masks: torch.Tensor,
    lm_loss: torch.Tensor | None,
    modality_logits: torch.Tensor | None,
    modality: torch.Tensor,
    *,
    epoch: int,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective and its parts (as floats, for logging)."""
    seg = structure_loss(mask_logits, masks, dice_weight=weights.dice)
    total = weights.seg * seg.total
    parts: dict[str, float] = {"loss_seg": _num(seg.total), "loss_bce": _num(seg.bce), "loss_iou": _num(seg.iou)}
    if seg.dice is not None:
        parts["loss_dice"] = _num(seg.dice)
    if lm_loss is not None and weights.lm:
        lm = lm_loss.float()
        total = total + weights.lm * lm
        parts["loss_lm"] = _num(lm)
    cls_w = cls_weight_for_epoch(epoch, weight=weights.cls, epochs=weights.cls_epochs)
    cls = modality_loss(modality_logits, modality)
    if cls is not None:
        # Kept in the graph at weight 0 too, so every trained parameter sees a gradient on every step.
        total = total + cls_w * cls
        parts["loss_cls"] = _num(cls)
        parts["cls_weight"] = cls_w
    parts["loss"] = _num(total)
    return total, parts


def _num(t: torch.Tensor) -> float:
    return float(t.detach())


def mean_parts(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average logged loss parts over micro-batches."""
    keys = sorted({k for p in parts for k in p})
    return {k: float(np.mean([p[k] for p in parts if k in p])) for k in keys}
