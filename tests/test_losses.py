"""Training losses: boundary-weighted structure loss, Dice, modality CE, mask resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prsmed.train.losses import (
    IGNORE_INDEX,
    LossWeights,
    boundary_weights,
    cls_weight_for_epoch,
    modality_id,
    modality_loss,
    modality_targets,
    resize_mask,
    soft_dice,
    structure_loss,
    total_loss,
)


def _square_mask(size: int = 48, lo: int = 12, hi: int = 30) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., lo:hi, lo:hi] = 1
    return m


def test_boundary_weights_peak_at_the_edge_and_are_one_far_from_it():
    m = _square_mask(96, 30, 66)
    w = boundary_weights(m)
    assert w.shape == m.shape
    assert torch.all(w >= 1)
    assert w[0, 0, 30, 48] > w[0, 0, 48, 48]  # on the edge vs the centre of the lesion
    assert w[0, 0, 0, 0] == pytest.approx(1.0)  # far from any edge
    assert w.max() <= 6.0


def test_boundary_weights_equal_the_31x31_pool_of_the_definition():
    torch.manual_seed(0)
    m = (torch.rand(2, 1, 70, 90) > 0.7).float()
    local = torch.nn.functional.avg_pool2d(m, kernel_size=31, stride=1, padding=15)
    torch.testing.assert_close(boundary_weights(m), 1.0 + 5.0 * (local - m).abs(), rtol=0, atol=1e-6)


def test_boundary_weighting_changes_the_loss():
    torch.manual_seed(0)
    m = _square_mask()
    logits = torch.randn_like(m) * 2
    weighted = structure_loss(logits, m, boundary=True)
    uniform = structure_loss(logits, m, boundary=False)
    assert not torch.isclose(weighted.bce, uniform.bce)
    assert not torch.isclose(weighted.total, uniform.total)
    # With uniform weights the weighted BCE is plain mean BCE (what the authors' code actually computes).
    torch.testing.assert_close(uniform.bce, F.binary_cross_entropy_with_logits(logits, m))


def test_weighted_bce_is_normalised_by_the_weights():
    m = _square_mask()
    w = boundary_weights(m)
    logits = torch.full_like(m, 0.3)
    bce = F.binary_cross_entropy_with_logits(logits, m, reduction="none")
    expected = (w * bce).sum() / w.sum()
    torch.testing.assert_close(structure_loss(logits, m).bce, expected)


def test_loss_is_lower_for_a_better_prediction():
    m = _square_mask()
    good = (m * 2 - 1) * 6  # confident and right
    poor = (m * 2 - 1) * 0.5  # right but unsure
    wrong = -good
    losses = [structure_loss(x, m, dice_weight=1.0).total for x in (good, poor, wrong)]
    assert losses[0] < losses[1] < losses[2]
    assert soft_dice(good, m).item() > 0.95 > soft_dice(wrong, m).item()


def test_gradients_are_finite_including_empty_masks_and_extreme_logits():
    m = torch.cat([_square_mask(), torch.zeros(1, 1, 48, 48)])
    logits = (torch.randn(2, 1, 48, 48) * 50).requires_grad_()
    loss = structure_loss(logits, m, dice_weight=0.5).total
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_term_only_when_asked():
    m = _square_mask()
    logits = torch.zeros_like(m)
    assert structure_loss(logits, m).dice is None
    with_dice = structure_loss(logits, m, dice_weight=2.0)
    torch.testing.assert_close(with_dice.total, with_dice.bce + with_dice.iou + 2.0 * with_dice.dice)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        structure_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 16, 16))


def test_masks_are_resized_nearest_and_stay_binary():
    m = np.zeros((37, 53), dtype=bool)
    m[5:20, 10:40] = True
    r = resize_mask(m, 64)
    assert r.shape == (64, 64) and r.dtype == torch.float32
    assert set(r.unique().tolist()) == {0.0, 1.0}
    assert 0.1 < r.mean().item() < 0.4
    # 0/255 masks read as uint8 are binarised too
    assert set(resize_mask(m.astype(np.uint8) * 255, 16).unique().tolist()) == {0.0, 1.0}


def test_modality_names_map_to_the_authors_ids():
    assert [modality_id(n) for n in ("brain", "breast", "lung_CT", "lung_Xray", "skin", "polyp")] == [0, 1, 2, 3, 4, 5]
    assert modality_id("LUNG_ct") == 2
    assert modality_id("dental") == IGNORE_INDEX and modality_id(None) == IGNORE_INDEX
    assert modality_targets(["brain", "x"]).tolist() == [0, IGNORE_INDEX]


def test_modality_loss_ignores_unknown_rows_and_is_zero_without_any():
    logits = torch.randn(3, 6, requires_grad=True)
    targets = torch.tensor([1, IGNORE_INDEX, 5])
    expected = F.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    torch.testing.assert_close(modality_loss(logits, targets), expected)
    none_known = modality_loss(logits, torch.full((3,), IGNORE_INDEX))
    assert none_known.item() == 0.0
    none_known.backward()
    assert torch.isfinite(logits.grad).all()
    assert modality_loss(None, targets) is None


def test_cls_weight_schedule():
    assert [cls_weight_for_epoch(e) for e in range(7)] == [0.5] * 5 + [0.0] * 2
    assert cls_weight_for_epoch(0, weight=1.0, epochs=0) == 0.0


def test_total_loss_combines_the_parts():
    torch.manual_seed(0)
    m = _square_mask()
    logits = torch.randn_like(m, requires_grad=True)
    lm = torch.tensor(2.0, requires_grad=True)
    cls_logits = torch.randn(1, 6, requires_grad=True)
    target = torch.tensor([3])
    w = LossWeights(lm=0.5, cls=0.5, cls_epochs=5)
    early, parts = total_loss(logits, m, lm, cls_logits, target, epoch=0, weights=w)
    late, late_parts = total_loss(logits, m, lm, cls_logits, target, epoch=5, weights=w)
    seg = structure_loss(logits, m).total
    cls = F.cross_entropy(cls_logits, target)
    torch.testing.assert_close(early, seg + 0.5 * lm + 0.5 * cls)
    torch.testing.assert_close(late, seg + 0.5 * lm)
    assert parts["cls_weight"] == 0.5 and late_parts["cls_weight"] == 0.0
    assert parts["loss"] == pytest.approx(early.item())
    late.backward()
    assert cls_logits.grad is not None  # still in the graph at weight 0, so every process reduces the same grads
