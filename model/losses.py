"""Loss functions of the segmenter: language-model cross-entropy and per-mask BCE and Dice.

Constants and normalisation follow the LISA family so loss values are comparable:
- CE: shifted next-token cross-entropy, mean over non-ignored tokens (`causal_lm_loss` from
  full logits, or `selected_lm_loss` from the logits of the scored positions alone).
- BCE per mask: mean over pixels of BCE-with-logits.
- Dice per mask: p = sigmoid(x); 1 - (2 sum(p/s * t) + eps) / (sum(p/s) + sum(t/s) + eps) with
  s = 1000 and eps = 1e-6 (the scale keeps sums small in half precision).
- Both are summed over all masks of the micro-batch and divided by (number of masks + 1e-8):
  a per-mask mean (LISA's per-image "x n_i, summed, / sum n" reduces to exactly this).
Pixels labelled IGNORE_LABEL (255, e.g. ReasonSeg "ignore" regions) are left out of both
terms: BCE averages over the other pixels, Dice drops them from every sum. Without such pixels
the values equal LISA's. `[REJ]` targets have no predicted mask and are not passed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.tokens import IGNORE_INDEX

IGNORE_LABEL = 255
DICE_SCALE = 1000.0
DICE_EPS = 1e-6
COUNT_EPS = 1e-8


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three loss terms (train_ds.py flags of the same names)."""

    ce_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted next-token cross-entropy. logits [C, L, V], labels [C, L] -> scalar (fp32).

    Token t's logits predict label t+1; IGNORE_INDEX labels are skipped. Returns 0 (with a
    graph) when no token is supervised, instead of NaN.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(
        shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (shifted_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits `causal_lm_loss` scores. labels [C, L] -> (conv, position),
    each long [S]: position t of conversation c is scored when labels[c, t + 1] is not
    IGNORE_INDEX. Row-major order."""
    return torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)


def selected_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss` from the scored rows alone: logits [S, V] at `scored_positions`,
    targets long [S] (the next labels) -> scalar (fp32), the same mean over the S tokens
    (0 with a graph when S = 0)."""
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return total / max(len(targets), 1)


def per_mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the valid pixels of each mask.

    logits [n, H, W] (float), targets [n, H, W] with values {0, 1, IGNORE_LABEL} -> [n].
    """
    valid = targets != IGNORE_LABEL
    target = (targets == 1).to(logits.dtype)
    pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid
    return pixel.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)


def per_mask_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of each mask over its valid pixels. Shapes as `per_mask_bce` -> [n]."""
    valid = (targets != IGNORE_LABEL).to(logits.dtype)
    prob = (logits.sigmoid() * valid).flatten(1) / DICE_SCALE
    target = ((targets == 1).to(logits.dtype)).flatten(1)
    # LISA scales the target in the denominator only: 2 sum(p/s * t) / (sum(p/s) + sum(t/s))
    numerator = 2 * (prob * target).sum(1)
    denominator = prob.sum(1) + target.sum(1) / DICE_SCALE
    return 1 - (numerator + DICE_EPS) / (denominator + DICE_EPS)


def mask_losses(
    pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask mean BCE and Dice over a micro-batch.

    pred_masks[i]: logits [n_i, H_i, W_i]; gt_masks[i]: [n_i, H_i, W_i] in {0, 1, 255}.
    Returns (bce, dice) scalars in fp32: sums over all masks / (sum n_i + 1e-8); 0 without masks.
    """
    bce_terms, dice_terms = [], []
    for pred, gt in zip(pred_masks, gt_masks, strict=True):
        if pred.shape != gt.shape:
            raise ValueError(
                f"predicted masks {tuple(pred.shape)} != ground truth {tuple(gt.shape)}"
            )
        bce_terms.append(per_mask_bce(pred.float(), gt))
        dice_terms.append(per_mask_dice(pred.float(), gt))
    if not bce_terms:
        zero = torch.zeros((), device=device)
        return zero, zero
    count = sum(len(t) for t in bce_terms)
    bce = torch.cat(bce_terms).sum() / (count + COUNT_EPS)
    dice = torch.cat(dice_terms).sum() / (count + COUNT_EPS)
    return bce, dice
