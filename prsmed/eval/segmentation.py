"""Segmentation metrics: the paper's protocol exactly, plus fixed-threshold Dice/IoU and HD95.

The paper's protocol (PRSMED.md 5.1, the PraNet-style toolbox the authors use):

* predictions are probability maps saved as 8-bit PNGs (per-image min-max normalised, x255);
* each is resized to its ground truth's size with OpenCV-style nearest neighbour (source index
  ``floor(dst_index * src_size / dst_size)``), ground truth is binarised at 0.5, the prediction scaled to [0, 1];
* for 256 thresholds ``linspace(1, 0, 256)`` the prediction is binarised at ``>= t`` and Dice and IoU computed,
  both 0 when the intersection is empty;
* per threshold the metric is averaged over images; ``meanDic`` is the mean of that curve, ``maxDic`` its maximum.

We compute all 256 thresholds at once from per-level histograms: an 8-bit map has only 256 levels, so each
threshold's counts are cumulative sums. The threshold comparison uses the same float64 values as the toolbox, so the
numbers are identical, not merely close.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

THRESHOLDS = np.linspace(1, 0, 256)
_LEVELS = np.arange(256, dtype=np.float64) / 255
# _AT[j, k]: level k counts as foreground at threshold j.
_AT = _LEVELS[None, :] >= THRESHOLDS[:, None]


def probability_to_png(prob: np.ndarray) -> np.ndarray:
    """The authors' saved prediction: min-max normalised per image, x255, rounded to uint8."""
    prob = prob.astype(np.float64)
    norm = (prob - prob.min()) / (prob.max() - prob.min() + 1e-8)
    return np.clip(np.rint(norm * 255), 0, 255).astype(np.uint8)


def resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV ``INTER_NEAREST``: destination pixel x takes source pixel ``floor(x * src / dst)``."""
    h, w = arr.shape[:2]
    rows = np.minimum((np.arange(height) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(width) * (w / width)).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]


@dataclass
class ThresholdCurves:
    """Per-image Dice and IoU at each of the 256 thresholds, and MAE."""

    dice: np.ndarray  # (256,)
    iou: np.ndarray  # (256,)
    mae: float


def image_curves(pred_u8: np.ndarray, gt_u8: np.ndarray) -> ThresholdCurves:
    """Dice/IoU curves for one 8-bit prediction against one 8-bit ground truth (resized as the toolbox does)."""
    if pred_u8.ndim != 2 or gt_u8.ndim != 2:
        raise ValueError(f"expected 2-D grayscale maps, got prediction {pred_u8.shape} and ground truth {gt_u8.shape}")
    if pred_u8.shape != gt_u8.shape:
        pred_u8 = resize_nearest(pred_u8, *gt_u8.shape)
    gt = (gt_u8.astype(np.float64) / 255) > 0.5
    levels = pred_u8.astype(np.int64).ravel()
    all_hist = np.bincount(levels, minlength=256)
    fg_hist = np.bincount(levels[gt.ravel()], minlength=256)
    num_pred = _AT @ all_hist  # predicted foreground at each threshold
    num_and = _AT @ fg_hist  # true positives
    num_obj = gt.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(num_and == 0, 0.0, 2 * num_and / (num_obj + num_pred))
        iou = np.where(num_and == 0, 0.0, num_and / (num_obj + num_pred - num_and))
    mae = float(np.mean(np.abs(gt.astype(np.float64) - pred_u8.astype(np.float64) / 255)))
    return ThresholdCurves(dice=dice, iou=iou, mae=mae)


def paper_metrics(curves: list[ThresholdCurves]) -> dict[str, float]:
    """``meanDic``, ``meanIoU``, ``maxDic``, ``maxIoU``, ``mae`` over a set of images (one modality)."""
    if not curves:
        return {"meanDic": float("nan"), "meanIoU": float("nan"), "maxDic": float("nan"), "maxIoU": float("nan"),
                "mae": float("nan")}
    dice = np.mean([c.dice for c in curves], axis=0)
    iou = np.mean([c.iou for c in curves], axis=0)
    return {
        "meanDic": float(dice.mean()),
        "meanIoU": float(iou.mean()),
        "maxDic": float(dice.max()),
        "maxIoU": float(iou.max()),
        "mae": float(np.mean([c.mae for c in curves])),
    }


def _read_gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            return np.clip(np.rint(arr / max(arr.max(), 1) * 255), 0, 255).astype(np.uint8)
        return np.asarray(im.convert("L"))


def evaluate_mask_folders(pred_dir: str | Path, gt_dir: str | Path) -> dict[str, float]:
    """The paper's protocol over two folders of PNGs paired by file stem."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = {p.stem: p for p in pred_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")}
    gts = {p.stem: p for p in gt_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")}
    if not gts:
        raise FileNotFoundError(f"no ground-truth masks (.png/.jpg/.bmp) in {gt_dir}")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} ground-truth masks have no prediction of the same stem in {pred_dir}, e.g. {missing[:3]}"
        )
    curves = [image_curves(_read_gray(preds[s]), _read_gray(gts[s])) for s in sorted(gts)]
    return {**paper_metrics(curves), "n": len(curves)}


# fixed-threshold metrics ---------------------------------------------------------------------------------------
def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks; both empty counts as a perfect 1.0."""
    inter = np.logical_and(pred, gt).sum()
    total = pred.sum() + gt.sum()
    if total == 0:
        return 1.0, 1.0
    return float(2 * inter / total), float(inter / (total - inter))


def _boundary(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.argwhere(mask & ~interior).astype(np.float32)


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance between mask boundaries, in pixels of the ground truth.

    NaN when either mask is empty (the distance is undefined); reports average it over the images where it exists.
    """
    if not pred.any() or not gt.any():
        return float("nan")
    a, b = torch.from_numpy(_boundary(pred)), torch.from_numpy(_boundary(gt))
    d_ab = torch.cat([torch.cdist(chunk, b).min(dim=1).values for chunk in a.split(4096)])
    d_ba = torch.cat([torch.cdist(chunk, a).min(dim=1).values for chunk in b.split(4096)])
    return float(torch.quantile(torch.cat([d_ab, d_ba]), 0.95))
