"""Check that `prsmed eval-masks` gives the authors' evaluation toolbox's numbers on the same files.

Usage (needs a checkout of the authors' repository and, for their code, opencv-python-headless and scipy):

    python bench/parity_eval.py --reference PATH/TO/PRS-Med [--n 12] [--seed 0]

It writes pairs of probability maps and ground-truth masks (several sizes, prediction sizes that differ from the
ground truth, empty masks, blank predictions), runs the authors' per-image loop (`Fmeasure_calu` from their
`evaluation/segmentation/eval_functions.py`, OpenCV nearest resize, 256 thresholds) and ours, and prints both.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from prsmed.eval.segmentation import THRESHOLDS, evaluate_mask_folders, probability_to_png


def _load_reference(repo: Path):
    src = (repo / "evaluation" / "segmentation" / "eval_functions.py").read_text()
    # Their file imports SciPy names from paths newer SciPy releases removed; the functions are the same.
    src = src.replace("scipy.ndimage.morphology", "scipy.ndimage").replace("scipy.ndimage.filters", "scipy.ndimage")
    spec = importlib.util.spec_from_loader("reference_eval_functions", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(src, "reference_eval_functions", "exec"), module.__dict__)
    return module


def _write_pairs(root: Path, n: int, seed: int) -> None:
    import cv2

    rng = np.random.default_rng(seed)
    (root / "pred").mkdir()
    (root / "gt").mkdir()
    for i in range(n):
        gh, gw = (int(v) for v in rng.integers(40, 300, 2))
        gt = np.zeros((gh, gw), np.uint8)
        if i % 6 != 5:
            y, x = rng.integers(0, gh - 10), rng.integers(0, gw - 10)
            gt[y : y + rng.integers(5, gh // 2), x : x + rng.integers(5, gw // 2)] = 255
        ph, pw = (256, 256) if i % 2 else (gh, gw)
        if i % 4 == 3:
            pred = np.zeros((ph, pw), np.uint8)
        else:
            soft = cv2.resize(gt, (pw, ph), interpolation=cv2.INTER_LINEAR).astype(float) / 255
            pred = probability_to_png(1 / (1 + np.exp(-(6 * soft - 3 + rng.normal(0, 1.5, (ph, pw))))))
        Image.fromarray(gt).save(root / "gt" / f"{i:03d}.png")
        Image.fromarray(pred).save(root / "pred" / f"{i:03d}.png")


def _reference_metrics(ref, root: Path) -> dict[str, float]:
    import cv2

    preds, gts = sorted((root / "pred").iterdir()), sorted((root / "gt").iterdir())
    dice, iou, mae = np.zeros((len(preds), 256)), np.zeros((len(preds), 256)), np.zeros(len(preds))
    for i, (p, g) in enumerate(zip(preds, gts)):
        pm, gm = cv2.imread(str(p), 0), cv2.imread(str(g), 0)
        pm = cv2.resize(pm, (gm.shape[1], gm.shape[0]), interpolation=cv2.INTER_NEAREST)
        gm = (gm.astype(np.float64) / 255 > 0.5).astype(np.float64)
        pm = pm.astype(np.float64) / 255
        mae[i] = np.mean(np.abs(gm - pm))
        for j, t in enumerate(THRESHOLDS):
            _, _, _, dice[i, j], _, iou[i, j] = ref.Fmeasure_calu(pm, gm, t)
    d, u = dice.mean(axis=0), iou.mean(axis=0)
    return {"meanDic": d.mean(), "meanIoU": u.mean(), "maxDic": d.max(), "maxIoU": u.max(), "mae": mae.mean()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="checkout of the authors' PRS-Med repository")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ref = _load_reference(args.reference)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_pairs(root, args.n, args.seed)
        theirs = _reference_metrics(ref, root)
        ours = evaluate_mask_folders(root / "pred", root / "gt")
    equal = True
    for key, value in theirs.items():
        same = float(value) == ours[key]
        equal &= same
        print(f"{key:8s} authors {float(value)!r:24s} ours {ours[key]!r:24s} {'identical' if same else 'DIFFERENT'}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
