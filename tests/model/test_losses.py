"""Loss values against hand computation on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import (
    causal_lm_loss,
    mask_losses,
    per_mask_bce,
    per_mask_dice,
    scored_positions,
    selected_lm_loss,
)
from model.tokens import IGNORE_INDEX


def bce(x: float, t: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_causal_lm_loss_is_shifted_mean_over_supervised_tokens() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 2]])
    # position 0 predicts label 1 (class 1); position 2 predicts label 3 (class 2)
    expected0 = -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    expected2 = -math.log(math.exp(3.0) / (math.exp(0.5) * 2 + math.exp(3.0)))
    assert causal_lm_loss(logits, labels).item() == pytest.approx(
        (expected0 + expected2) / 2, rel=1e-6
    )


def test_causal_lm_loss_without_supervised_tokens_is_zero_not_nan() -> None:
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((1, 3), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_bce_and_dice_per_mask_match_hand_values() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.0, 3.0]]])
    target = torch.tensor([[[1, 0], [1, 0]]], dtype=torch.uint8)
    expected_bce = (bce(2, 1) + bce(-1, 0) + bce(0, 1) + bce(3, 0)) / 4
    assert per_mask_bce(logits, target).item() == pytest.approx(expected_bce, rel=1e-6)
    p = [sigmoid(2), sigmoid(-1), sigmoid(0), sigmoid(3)]
    t = [1, 0, 1, 0]
    num = 2 * sum(pi / 1000 * ti for pi, ti in zip(p, t, strict=True))
    den = sum(pi / 1000 for pi in p) + sum(ti / 1000 for ti in t)
    expected_dice = 1 - (num + 1e-6) / (den + 1e-6)
    assert per_mask_dice(logits, target).item() == pytest.approx(expected_dice, rel=1e-5)


def test_a_confident_correct_mask_has_dice_near_zero_and_the_inverse_near_one() -> None:
    """The scale divides the target in the denominator only (LISA): scaling it in the
    numerator too pins Dice at ~1 whatever the prediction, and masks never learn."""
    target = torch.zeros(1, 32, 32, dtype=torch.uint8)
    target[0, 8:24, 8:24] = 1
    right = torch.where(target == 1, 30.0, -30.0).float()
    assert per_mask_dice(right, target).item() < 1e-3
    assert per_mask_dice(-right, target).item() > 1 - 1e-3


def test_ignore_pixels_are_left_out_of_bce_and_dice() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.0, 3.0]]])
    with_ignore = torch.tensor([[[1, 255], [1, 255]]], dtype=torch.uint8)
    only_valid_logits = torch.tensor([[[2.0, 0.0]]])
    only_valid_target = torch.tensor([[[1, 1]]], dtype=torch.uint8)
    assert per_mask_bce(logits, with_ignore).item() == pytest.approx(
        per_mask_bce(only_valid_logits, only_valid_target).item(), rel=1e-6
    )
    assert per_mask_dice(logits, with_ignore).item() == pytest.approx(
        per_mask_dice(only_valid_logits, only_valid_target).item(), rel=1e-6
    )


def test_empty_target_and_empty_prediction() -> None:
    # an empty target with a confident empty prediction: dice = 1 - eps/(~0 + eps) ~ 0
    logits = torch.full((1, 4, 4), -30.0)
    empty = torch.zeros(1, 4, 4, dtype=torch.uint8)
    assert per_mask_dice(logits, empty).item() == pytest.approx(0.0, abs=1e-3)
    assert per_mask_bce(logits, empty).item() == pytest.approx(bce(-30, 0), rel=1e-4)
    # an empty target with a full prediction: dice close to 1
    assert per_mask_dice(-logits, empty).item() == pytest.approx(1.0, abs=1e-3)


def test_mask_losses_are_a_per_mask_mean_over_the_micro_batch() -> None:
    torch.manual_seed(0)
    preds = [torch.randn(2, 3, 4), torch.randn(1, 5, 2)]
    gts = [
        torch.randint(0, 2, (2, 3, 4), dtype=torch.uint8),
        torch.randint(0, 2, (1, 5, 2), dtype=torch.uint8),
    ]
    bce_value, dice_value = mask_losses(preds, gts, torch.device("cpu"))
    per_mask = [per_mask_bce(p, g) for p, g in zip(preds, gts, strict=True)]
    expected = torch.cat(per_mask).sum() / (3 + 1e-8)
    assert bce_value.item() == pytest.approx(expected.item(), rel=1e-6)
    # LISA's form: per image (sum / n_i) * n_i, summed, / sum n_i
    lisa = sum(p.sum() / (len(p) + 1e-8) * len(p) for p in per_mask) / (3 + 1e-8)
    assert bce_value.item() == pytest.approx(lisa.item(), rel=1e-6)
    dice_expected = torch.cat([per_mask_dice(p, g) for p, g in zip(preds, gts, strict=True)]).mean()
    assert dice_value.item() == pytest.approx(dice_expected.item(), rel=1e-6)


def test_mask_losses_without_masks_are_zero() -> None:
    bce_value, dice_value = mask_losses(
        [torch.zeros(0, 3, 3)], [torch.zeros(0, 3, 3)], torch.device("cpu")
    )
    assert bce_value.item() == 0.0 and dice_value.item() == 0.0
    bce_value, dice_value = mask_losses([], [], torch.device("cpu"))
    assert bce_value.item() == 0.0 and dice_value.item() == 0.0


def test_mask_losses_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(1, 3, 3\) != ground truth \(1, 4, 3\)"):
        mask_losses([torch.zeros(1, 3, 3)], [torch.zeros(1, 4, 3)], torch.device("cpu"))


def test_scored_positions_are_the_shifted_supervised_ones() -> None:
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 4, 0]])
    conv, position = scored_positions(labels)
    # row 0: labels at 1 and 3 are predicted from 0 and 2; row 1: labels at 2, 3 from 1, 2
    assert conv.tolist() == [0, 0, 1, 1]
    assert position.tolist() == [0, 2, 1, 2]


def test_selected_lm_loss_equals_causal_lm_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[torch.rand(3, 7, generator=generator) < 0.5] = IGNORE_INDEX
    conv, position = scored_positions(labels)
    trimmed = selected_lm_loss(logits[conv, position], labels[conv, position + 1])
    assert trimmed.item() == pytest.approx(causal_lm_loss(logits, labels).item(), abs=1e-6)


def test_selected_lm_loss_without_rows_is_zero_with_a_graph() -> None:
    logits = torch.randn(0, 5, requires_grad=True)
    loss = selected_lm_loss(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
