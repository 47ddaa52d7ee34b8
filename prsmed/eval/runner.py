"""Evaluate a model on a dataset split: masks by the paper's protocol and at a fixed threshold, zones, text.

Zones. A sample's reference zones are those of its ground-truth mask by the authors' rule (one zone, or one per
lesion when the mask has two lesions; ``none`` when empty). ``zone_acc_text`` counts answers whose named zones
(read with the lexicon in :mod:`prsmed.data.zones`) equal that set; ``zone_acc_mask`` does the same for the
predicted mask binarised at 0.5; ``agreement`` compares the answer's zones with the predicted mask's. All three
are fractions of samples.

Aggregation. Per modality, as the paper reports. ``overall`` pools every sample of the split (the paper's
``meanDic`` curve is averaged over the pooled images there). HD95 is averaged over the samples where both masks
are non-empty.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prsmed.data.layout import Record
from prsmed.data.readers import read_image, read_mask
from prsmed.data.zones import NONE, zone_of_mask, zones_from_text
from prsmed.eval.segmentation import ThresholdCurves, dice_iou, hd95, image_curves, paper_metrics, probability_to_png
from prsmed.eval.text import bleu4, rouge_l

METRIC_KEYS = ("dice@0.5", "iou@0.5", "hd95", "meanDic", "meanIoU", "zone_acc_text", "zone_acc_mask", "agreement",
               "bleu4", "rougeL", "n")


def mask_zones(mask: np.ndarray) -> list[str]:
    lesions = zone_of_mask(mask).lesions
    return sorted({z for z, _ in lesions}) if lesions else [NONE]


def text_zones(answer: str) -> list[str]:
    return sorted(set(zones_from_text(answer)))


@dataclass
class SampleResult:
    record: Record
    answer: str
    dice: float
    iou: float
    hd95: float
    curves: ThresholdCurves
    zones_gt: list[str]
    zones_text: list[str]
    zones_mask: list[str]
    prob_png: np.ndarray = field(repr=False)


def _aggregate(results: Sequence[SampleResult]) -> dict[str, float]:
    if not results:
        return {k: (0 if k == "n" else float("nan")) for k in METRIC_KEYS}
    paper = paper_metrics([r.curves for r in results])
    hds = [r.hd95 for r in results if not math.isnan(r.hd95)]
    return {
        "dice@0.5": float(np.mean([r.dice for r in results])),
        "iou@0.5": float(np.mean([r.iou for r in results])),
        "hd95": float(np.mean(hds)) if hds else float("nan"),
        "meanDic": paper["meanDic"],
        "meanIoU": paper["meanIoU"],
        "zone_acc_text": float(np.mean([r.zones_text == r.zones_gt for r in results])),
        "zone_acc_mask": float(np.mean([r.zones_mask == r.zones_gt for r in results])),
        "agreement": float(np.mean([r.zones_text == r.zones_mask for r in results])),
        "bleu4": bleu4([r.answer for r in results], [r.record.position for r in results]),
        "rougeL": rouge_l([r.answer for r in results], [r.record.position for r in results]),
        "n": len(results),
    }


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def predict_records(model, records: Sequence[Record], *, batch_size: int = 8, max_new_tokens: int = 48,
                    progress: bool = False) -> list[SampleResult]:
    model.eval()
    device = next(model.parameters()).device
    results = []
    batches = list(_batches(list(records), batch_size))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluating", unit="batch")
    for batch in batches:
        images = [read_image(r.image_path) for r in batch]
        seg, inputs = model.encode(images, [r.question for r in batch], padding_side="left")
        pred = model.predict(seg.to(device), inputs.to(device), max_new_tokens=max_new_tokens)
        probs = torch.sigmoid(pred.mask_logits.float()).cpu()
        for record, answer, prob in zip(batch, pred.answers, probs):
            gt = read_mask(record.mask_path)
            at_gt = F.interpolate(prob[None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            binary = at_gt > 0.5
            png = probability_to_png(prob[0].numpy())
            dice, iou = dice_iou(binary, gt)
            results.append(
                SampleResult(
                    record=record,
                    answer=answer,
                    dice=dice,
                    iou=iou,
                    hd95=hd95(binary, gt),
                    curves=image_curves(png, gt.astype(np.uint8) * 255),
                    zones_gt=mask_zones(gt),
                    zones_text=text_zones(answer),
                    zones_mask=mask_zones(binary),
                    prob_png=png,
                )
            )
    return results


def summarize(results: Sequence[SampleResult]) -> dict:
    by_modality: dict[str, list[SampleResult]] = defaultdict(list)
    for r in results:
        by_modality[r.record.modality].append(r)
    return {
        "overall": _aggregate(results),
        "per_modality": {m: _aggregate(rs) for m, rs in sorted(by_modality.items())},
    }


def write_outputs(results: Sequence[SampleResult], out_dir: str | Path) -> None:
    """Probability maps as PNGs named like the ground-truth masks (per modality), and the answers as CSV."""
    out_dir = Path(out_dir)
    for r in results:
        target = out_dir / "masks" / r.record.modality / (Path(r.record.mask_path).stem + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(r.prob_png).save(target)
    with open(out_dir / "answers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["modality", "image_path", "mask_path", "question", "answer", "position", "zones_gt",
                         "zones_text", "zones_mask", "dice@0.5"])
        for r in results:
            writer.writerow([r.record.modality, r.record.image_path, r.record.mask_path, r.record.question, r.answer,
                             r.record.position, ";".join(r.zones_gt), ";".join(r.zones_text),
                             ";".join(r.zones_mask), f"{r.dice:.4f}"])
