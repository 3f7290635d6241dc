"""Semantic-segmentation scoring of generated class sequences (LaSagnA's `test_sem.py` task):
generated names -> class ids, per-class mask logits -> one label per pixel, mIoU.

Per image the model answers a class list with "name<ins>" / "name<no_ins>" items
(`utils.datasets.lasagna.parse_semantic_answer`); the k-th `<ins>` has the k-th mask, float
[k, H, W] logits. Two protocols:

Ours (default):
- Matching (`match_names`): a name equal to a class name (case and whitespace runs ignored) is
  that class; else rapidfuzz's best WRatio match (rapidfuzz `default_process`: lower case, no
  punctuation) scoring at least FUZZY_MIN_SCORE; else the name is unmatched: counted and reported
  (`unmatched_names`), its mask left out of the composition, never silently dropped.
- Composition (`compose_labels`): each pixel takes the class of the mask with the highest logit
  there (the first in answer order on a tie), if that logit is > 0 (the masks' own decision
  threshold, `utils.metrics.MASK_LOGIT_THRESHOLD`); a pixel no mask covers is NO_CLASS, which
  matches no ground-truth class: a miss (false negative) for the pixel's class, a false
  positive for none.
- Scoring (`ComposedIoUAccumulator`): confusion matrix over the K classes plus NO_CLASS
  (rows GT, columns prediction), ground-truth 255 pixels left out; IoU_c = TP / (TP + FP + FN);
  mIoU = mean over the classes present in the ground truth or the prediction (nan-mean, as
  detectron2's SemSegEvaluator and LaSagnA's `utils/miou`); pixel accuracy = TP / scored pixels.

`--lasagna_miou_compat` (LaSagnA `test_sem.py:semantic_inference` + `utils/miou/iou.py` @897cbbe,
`lasagna_compat_labels`): names with every space removed, matched by the best fuzzy match with no
threshold (fuzzywuzzy `process.extractOne`; here rapidfuzz's WRatio, a reimplementation of
the same scorer: no name stays unmatched); predicted mask i's logits, negatives clamped to 0,
written into channel class_i of a K x H x W tensor (a later mask of the same class overwrites an
earlier one); the ground truth is K binary channels; argmax over K for both (first maximum), so
every pixel no mask covers, every all-zero GT pixel, i.e. every 255 pixel, becomes class 0;
the confusion matrix has no ignore index (`IoU(num_classes, ignore_index=None)`). IoU and
mIoU as above over K classes.

Every sum is all-reduced once across ranks by `reduce()` (utils.metrics accumulators). Each
image also leaves a record (names, matched classes, unmatched count, and per class its
[intersection, union] in pixels under the protocol), which `utils.semantic_validation` completes
with the generated texts for the per-image JSONL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from utils.datasets.base import IGNORE_LABEL
from utils.datasets.lasagna import lasagna_name
from utils.metrics import MASK_LOGIT_THRESHOLD, MIOU, Accumulator, SemanticIoUAccumulator

FUZZY_MIN_SCORE = 80.0  # rapidfuzz WRatio, 0..100: our threshold for a fuzzy match
PIXEL_ACCURACY, PER_CLASS_IOU = "pixel_accuracy", "per_class_iou"
UNMATCHED, GENERATED, FUZZY = "unmatched_names", "generated_names", "fuzzy_matches"
PROTOCOL, STANDARD, LASAGNA_COMPAT = "protocol", "standard", "lasagna_compat"
COMPAT_BACKGROUND = 0  # LaSagnA's argmax over all-zero channels
WHITESPACE = re.compile(r"\s+")
PERCENT = 100.0


@dataclass(frozen=True)
class NameMatch:
    """class_ids: per name, its class index or None (unmatched); fuzzy: how many matched
    fuzzily (not exactly)."""

    class_ids: list[int | None]
    fuzzy: int

    @property
    def unmatched(self) -> int:
        return sum(class_id is None for class_id in self.class_ids)


def _normalised(name: str) -> str:
    return WHITESPACE.sub(" ", name).strip().lower()


def _best_fuzzy(name: str, classes: Sequence[str], min_score: float | None) -> int | None:
    """Index of rapidfuzz's best WRatio match scoring at least `min_score` (None: any)."""
    # Imported here: only semantic validation needs rapidfuzz.
    from rapidfuzz import fuzz, process, utils

    best = process.extractOne(
        name, classes, scorer=fuzz.WRatio, processor=utils.default_process, score_cutoff=min_score
    )
    return None if best is None else int(best[2])


def match_names(
    names: Sequence[str], classes: Sequence[str], min_score: float = FUZZY_MIN_SCORE
) -> NameMatch:
    """Our matching: exact (case and whitespace runs ignored), then fuzzy >= `min_score`."""
    exact = {}
    for index, class_name in enumerate(classes):
        exact.setdefault(_normalised(class_name), index)
    class_ids: list[int | None] = []
    fuzzy = 0
    for name in names:
        key = _normalised(name)
        if key in exact:
            class_ids.append(exact[key])
            continue
        match = _best_fuzzy(key, classes, min_score) if key else None
        fuzzy += match is not None
        class_ids.append(match)
    return NameMatch(class_ids, fuzzy)


def lasagna_match(names: Sequence[str], classes: Sequence[str]) -> NameMatch:
    """LaSagnA's matching: spaces removed, then the best fuzzy match whatever its score."""
    class_ids: list[int | None] = [_best_fuzzy(lasagna_name(n), classes, None) for n in names]
    exact = sum(lasagna_name(n) == classes[i] for n, i in zip(names, class_ids, strict=True))
    return NameMatch(class_ids, len(names) - exact)


def _check_masks(logits: torch.Tensor, class_ids: Sequence[int | None]) -> None:
    if logits.dim() != 3 or len(logits) != len(class_ids):
        raise ValueError(
            f"{len(class_ids)} matched names for mask logits of shape {tuple(logits.shape)}; "
            "expected [k, H, W] with one mask per <ins> name"
        )


def compose_labels(
    logits: torch.Tensor, class_ids: Sequence[int | None], num_classes: int
) -> torch.Tensor:
    """Our composition: long [H, W] class ids, `num_classes` (NO_CLASS) where no matched
    mask's logit is > 0. logits: float [k, H, W]; class_ids: k entries, None = unmatched."""
    _check_masks(logits, class_ids)
    rows = [row for row, class_id in enumerate(class_ids) if class_id is not None]
    labels = torch.full(logits.shape[1:], num_classes, dtype=torch.long, device=logits.device)
    if not rows:
        return labels
    kept = logits[rows]
    best_logit, best_row = kept.max(dim=0)
    ids = torch.tensor([class_ids[row] for row in rows], device=logits.device)
    covered = best_logit > MASK_LOGIT_THRESHOLD
    labels[covered] = ids[best_row[covered]]
    return labels


def lasagna_compat_labels(
    logits: torch.Tensor, class_ids: Sequence[int | None], num_classes: int
) -> torch.Tensor:
    """LaSagnA's prediction: argmax over K channels holding clamp(logit, 0) of the last mask of
    each class (zeros elsewhere), first maximum on ties. long [H, W] in [0, K)."""
    _check_masks(logits, class_ids)
    last_row = {class_id: row for row, class_id in enumerate(class_ids) if class_id is not None}
    if any(not 0 <= class_id < num_classes for class_id in last_row):
        raise ValueError(f"class ids must be in [0, {num_classes}), got {sorted(last_row)}")
    labels = torch.full(logits.shape[1:], COMPAT_BACKGROUND, dtype=torch.long, device=logits.device)
    if not last_row:
        return labels
    # Only the written channels can beat the zero channels; among channels, argmax takes the
    # lowest class id, so the channels are stacked in class order.
    ordered = sorted(last_row)
    channels = logits[[last_row[c] for c in ordered]].clamp(min=0)
    best, position = channels.max(dim=0)
    # torch.max(dim) returns the first maximum, as argmax over the K channels does
    ids = torch.tensor(ordered, device=logits.device)
    positive = best > 0
    labels[positive] = ids[position[positive]]
    return labels


def lasagna_compat_gt(gt: torch.Tensor) -> torch.Tensor:
    """argmax over K binary GT channels: the class, or 0 where no channel is set (255)."""
    return torch.where(gt == IGNORE_LABEL, COMPAT_BACKGROUND, gt.long())


class ComposedIoUAccumulator(SemanticIoUAccumulator):
    """SemanticIoUAccumulator over K classes plus NO_CLASS (index K, predictions only)."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        super().__init__(num_classes + 1, device)
        self.scored_classes = num_classes

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """pred: long [H, W] in [0, K] (K = NO_CLASS); gt: [H, W] in [0, K) or 255. Returns
        the image's confusion matrix int64 [K + 1, K + 1]."""
        if ((gt != IGNORE_LABEL) & (gt.long() >= self.scored_classes)).any():
            raise ValueError(f"GT classes must be in [0, {self.scored_classes}) or 255")
        return super().update(pred, gt)

    def class_iou(self) -> torch.Tensor:
        return super().class_iou()[: self.scored_classes]


def class_areas(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, list[int]]:
    """{class name: [intersection, union] in pixels} of one confusion matrix (rows GT, columns
    prediction, at least len(classes) of each), for the classes with a non-zero union."""
    scored = len(classes)
    true_pos = confusion.diagonal()[:scored]
    union = confusion.sum(dim=0)[:scored] + confusion.sum(dim=1)[:scored] - true_pos
    return {
        name: [int(inter), int(total)]
        for name, inter, total in zip(classes, true_pos.tolist(), union.tolist(), strict=True)
        if total > 0
    }


def pixel_accuracy(confusion: torch.Tensor, num_classes: int) -> float | None:
    """Correct pixels / scored pixels (GT rows 0..K-1, every prediction column)."""
    scored = confusion[:num_classes]
    total = scored.sum().item()
    return scored.diagonal()[:num_classes].sum().item() / total if total > 0 else None


class NameCountAccumulator(Accumulator):
    """Sums of (generated names, unmatched names, fuzzy matches)."""

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(3, dtype=torch.int64, device=device)

    def update(self, match: NameMatch) -> None:
        counts = [len(match.class_ids), match.unmatched, match.fuzzy]
        self._accumulate(torch.tensor(counts, dtype=torch.int64))

    def summary(self) -> dict[str, float | None]:
        generated, unmatched, fuzzy = self.state().tolist()
        return {GENERATED: generated, UNMATCHED: unmatched, FUZZY: fuzzy}


class SemanticScorer:
    """One validation set's scoring under one protocol (see the module docstring).

    classes: the set's class names (distinct), index = GT class id.
    """

    def __init__(
        self,
        classes: Sequence[str],
        lasagna_miou_compat: bool = False,
        device: torch.device | str | None = None,
        min_score: float = FUZZY_MIN_SCORE,
    ) -> None:
        if len(set(classes)) != len(classes):
            raise ValueError("class names must be distinct (they key the per-class table)")
        self.classes, self.compat, self.min_score = list(classes), lasagna_miou_compat, min_score
        count = len(self.classes)
        self.confusion = (
            SemanticIoUAccumulator(count, device)
            if self.compat
            else ComposedIoUAccumulator(count, device)
        )
        self.names = NameCountAccumulator(device)
        self.records: list[dict[str, Any]] = []

    def update(
        self, logits: torch.Tensor, names: Sequence[str], gt: torch.Tensor, record_id: str = ""
    ) -> dict[str, Any]:
        """One image. logits: float [k, H, W], one per `<ins>` name in `names`; gt: [H, W]
        class ids or 255. Returns the image's record (also kept in `records`): its names, the
        class each matched (None: unmatched), the unmatched count and per class [intersection,
        union] in pixels (`class_areas`)."""
        if self.compat:
            match = lasagna_match(names, self.classes)
            pred = lasagna_compat_labels(logits, match.class_ids, len(self.classes))
            confusion = self.confusion.update(pred, lasagna_compat_gt(gt))
        else:
            match = match_names(names, self.classes, self.min_score)
            pred = compose_labels(logits, match.class_ids, len(self.classes))
            confusion = self.confusion.update(pred, gt)
        self.names.update(match)
        matched = [None if i is None else self.classes[i] for i in match.class_ids]
        record = {
            "record_id": record_id,
            "names": list(names),
            "matched": matched,
            "unmatched": match.unmatched,
            "classes": class_areas(confusion, self.classes),
        }
        self.records.append(record)
        return record

    def reduce(self) -> None:
        """All-reduce the sums across ranks (every rank calls it once)."""
        self.confusion.reduce()
        self.names.reduce()

    def summary(self) -> dict[str, Any]:
        """miou, pixel_accuracy (fractions; None when undefined), the name counts, the
        protocol and per_class_iou {class name: IoU or None (class in neither GT nor
        prediction)}."""
        iou = self.confusion.class_iou()
        per_class = {
            name: (None if math.isnan(value) else value)
            for name, value in zip(self.classes, iou.tolist(), strict=True)
        }
        return {
            MIOU: self.confusion.summary()[MIOU],
            PIXEL_ACCURACY: pixel_accuracy(self.confusion.state(), len(self.classes)),
            **self.names.summary(),
            PROTOCOL: LASAGNA_COMPAT if self.compat else STANDARD,
            PER_CLASS_IOU: per_class,
        }


def format_class_table(summary: dict[str, Any]) -> str:
    """The per-class IoU table (percentages, 2 decimals; blank when undefined), then mIoU;
    `summary` holds per_class_iou and miou (`SemanticScorer.summary`)."""
    per_class = summary[PER_CLASS_IOU]
    width = max(len(name) for name in [*per_class, "class", "mIoU"])
    lines = [f"{'class'.ljust(width)}  IoU"]
    for name, value in per_class.items():
        lines.append(f"{name.ljust(width)}  {'' if value is None else f'{value * PERCENT:.2f}'}")
    miou = summary[MIOU]
    lines.append(f"{'mIoU'.ljust(width)}  {'' if miou is None else f'{miou * PERCENT:.2f}'}")
    return "\n".join(line.rstrip() for line in lines)
