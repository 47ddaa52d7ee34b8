"""From mask logits to what a user reads: the mask at the image's size, its box, area, zone and a confidence."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prsmed.data.zones import NONE, zone_of_mask


@dataclass
class MaskSummary:
    mask: np.ndarray  # (H, W) bool at the input image's size
    probability: np.ndarray  # (H, W) float32 in [0, 1]
    bbox: list[int] | None  # [x0, y0, x1, y1], inclusive, or None for an empty mask
    area_fraction: float
    confidence: float
    zone: str  # the whole mask's zone by the authors' rule, or "none"
    zones: list[str]  # one zone per described lesion (two for two lesions), or ["none"]


def probability_at(mask_logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(1, h, w) logits -> (height, width) probabilities; bilinear, as the model was trained against resized masks."""
    up = F.interpolate(mask_logits[None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(up)[0, 0].numpy()


def summarize_mask(probability: np.ndarray, threshold: float = 0.5) -> MaskSummary:
    """Confidence is the mean probability inside the mask (how sure the model is of the pixels it marked); for an
    empty mask it is one minus the highest probability anywhere (how sure it is that nothing is there)."""
    mask = probability > threshold
    info = zone_of_mask(mask)
    lesions = info.lesions
    if mask.any():
        ys, xs = np.nonzero(mask)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        confidence = float(probability[mask].mean())
    else:
        bbox = None
        confidence = float(1.0 - probability.max()) if probability.size else 0.0
    return MaskSummary(
        mask=mask,
        probability=probability.astype(np.float32, copy=False),
        bbox=bbox,
        area_fraction=float(mask.mean()) if mask.size else 0.0,
        confidence=confidence,
        zone=info.zone,
        zones=sorted({z for z, _ in lesions}) if lesions else [NONE],
    )


def mask_png(mask: np.ndarray) -> bytes:
    """A binary mask as an 8-bit greyscale PNG (0 and 255), the format of the authors' ground truth."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def overlay(image: Image.Image, mask: np.ndarray, *, color=(255, 64, 32), alpha: float = 0.45,
            outline: bool = True) -> Image.Image:
    """The image with the mask tinted over it and its outline drawn in full colour."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if base.shape[:2] != mask.shape:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {base.shape[1]}x{base.shape[0]}")
    tint = np.asarray(color, dtype=np.float32)
    out = base.copy()
    out[mask] = (1 - alpha) * base[mask] + alpha * tint
    if outline and mask.any():
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        out[mask & ~inner] = tint
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB")
