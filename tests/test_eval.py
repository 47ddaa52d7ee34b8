"""The paper's segmentation protocol, fixed-threshold metrics, text metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from prsmed.cli import app
from prsmed.eval.runner import mask_zones, text_zones
from prsmed.eval.segmentation import (
    THRESHOLDS,
    dice_iou,
    evaluate_mask_folders,
    hd95,
    image_curves,
    probability_to_png,
    resize_nearest,
)
from prsmed.eval.text import bleu4, rouge_l


def toolbox_curves(pred_u8: np.ndarray, gt_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The toolbox's per-threshold loop, written out plainly: the reference our vectorised version must equal."""
    gt = (gt_u8.astype(np.float64) / 255 > 0.5).astype(np.float64)
    pred = resize_nearest(pred_u8, *gt.shape).astype(np.float64) / 255
    dice, iou = np.zeros(256), np.zeros(256)
    for j, t in enumerate(THRESHOLDS):
        label = (pred >= t).astype(np.float64)
        num_and = np.sum((label == 1) & (gt == 1))
        num_rec, num_obj = np.sum(label), np.sum(gt)
        if num_and:
            dice[j] = 2 * num_and / (num_obj + num_rec)
            iou[j] = num_and / (num_obj - num_and + num_rec)
    return dice, iou


def _pair(rng, gh=70, gw=90, ph=64, pw=64):
    gt = np.zeros((gh, gw), np.uint8)
    gt[10:40, 20:60] = 255
    prob = rng.random((ph, pw)) * 0.6
    prob[8:35, 12:45] += 0.4
    return probability_to_png(prob), gt


def test_vectorised_curves_equal_the_toolbox_loop():
    rng = np.random.default_rng(0)
    for shape in [dict(), dict(ph=70, pw=90), dict(ph=200, pw=33)]:
        pred, gt = _pair(rng, **shape)
        ours = image_curves(pred, gt)
        ref_dice, ref_iou = toolbox_curves(pred, gt)
        np.testing.assert_array_equal(ours.dice, ref_dice)
        np.testing.assert_array_equal(ours.iou, ref_iou)


def test_nearest_resize_follows_opencv_floor_convention():
    src = np.arange(3)[None, :].repeat(2, 0)
    # OpenCV INTER_NEAREST, 3 -> 5 columns: floor(x * 3 / 5) = 0, 0, 1, 1, 2
    np.testing.assert_array_equal(resize_nearest(src, 2, 5)[0], [0, 0, 1, 1, 2])
    # 5 -> 2 columns: floor(x * 5 / 2) = 0, 2
    np.testing.assert_array_equal(resize_nearest(np.arange(5)[None, :], 1, 2)[0], [0, 2])


def test_perfect_binary_prediction_scores_as_the_protocol_says():
    gt = np.zeros((50, 50), np.uint8)
    gt[10:20, 10:30] = 255
    curves = image_curves(gt.copy(), gt)
    # every threshold above 0 recovers the mask; at t = 0 every pixel is foreground
    assert np.all(curves.dice[:-1] == 1.0)
    assert curves.dice[-1] == pytest.approx(2 * 200 / (200 + 2500))
    assert curves.mae == 0.0
    assert np.all(image_curves(np.zeros_like(gt), gt).dice[:-1] == 0.0)  # empty intersection counts as 0


def test_min_max_normalisation_of_saved_maps():
    png = probability_to_png(np.array([[0.2, 0.3], [0.4, 0.2]]))
    assert png.min() == 0 and png.max() == 255 and png.dtype == np.uint8


def test_mask_folders_are_paired_by_stem(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    curves = []
    for i in range(3):
        pred, gt = _pair(rng)
        Image.fromarray(pred).save(tmp_path / "pred" / f"case{i}.png")
        Image.fromarray(gt).save(tmp_path / "gt" / f"case{i}.png")
        curves.append(toolbox_curves(pred, gt)[0])
    metrics = evaluate_mask_folders(tmp_path / "pred", tmp_path / "gt")
    assert metrics["n"] == 3
    assert metrics["meanDic"] == pytest.approx(float(np.mean(np.mean(curves, axis=0))), abs=0)
    result = CliRunner().invoke(app, ["eval-masks", str(tmp_path / "pred"), str(tmp_path / "gt"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["meanDic"] == metrics["meanDic"]
    (tmp_path / "pred" / "case2.png").unlink()
    with pytest.raises(FileNotFoundError, match="case2"):
        evaluate_mask_folders(tmp_path / "pred", tmp_path / "gt")


def test_fixed_threshold_dice_and_hd95():
    a = np.zeros((40, 40), bool)
    b = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b[10:20, 13:23] = True
    dice, iou = dice_iou(a, b)
    assert dice == pytest.approx(2 * 70 / 200) and iou == pytest.approx(70 / 130)
    assert hd95(a, b) == pytest.approx(3.0)
    assert math.isnan(hd95(a, np.zeros_like(a)))
    assert dice_iou(np.zeros_like(a), np.zeros_like(a)) == (1.0, 1.0)


def test_text_metrics():
    refs = ["the tumour is in the top left of the image", "it lies in the bottom right quadrant"]
    assert bleu4(refs, refs) == pytest.approx(1.0)
    assert rouge_l(refs, refs) == pytest.approx(1.0)
    assert bleu4(["completely different words here"] * 2, refs) == 0.0
    partial = rouge_l(["the tumour is in the top right"], refs[:1])
    assert 0.5 < partial < 1.0


def test_zones_of_masks_and_answers():
    m = np.zeros((100, 100), bool)
    m[5:20, 5:20] = True
    assert mask_zones(m) == ["top left"]
    m[80:95, 80:95] = True
    assert mask_zones(m) == ["bottom right", "top left"]
    assert mask_zones(np.zeros_like(m)) == ["none"]
    assert text_zones("One lesion is in the upper left and another in the lower right.") == ["bottom right", "top left"]
