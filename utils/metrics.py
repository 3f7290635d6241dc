"""Validation metrics as accumulators whose sums are all-reduced once across ranks: gIoU / cIoU
(LISA, MMR, RefCOCOm), gRefCOCO's gIoU / cIoU / N-acc / T-acc (GSVA) and semantic mIoU.

Pixels: predicted = `logit > 0` (GSVA's `>= 0` differs only on exact zeros); ground-truth
pixels labelled 255 are left out of both the foreground intersection I and union U.

Common interface: `update(...)` with per-target values (`target_stats`); `reduce()` sums the
state across ranks when torch.distributed is initialised (else does nothing); `summary()` gives
fractions in [0, 1], None where a denominator is 0 (never a silent 0 or nan); `records` holds one
dict per target for the JSONL (RECORD_KEYS; `gather_records` collects every rank's).

- `MaskIoUAccumulator` (LISA; MMR per `{seg}` target; RefCOCOm "mIoU" = its gIoU): IoU =
  I / (U + 1e-5), 1 when U = 0; gIoU = mean IoU; cIoU = sum I / (sum U + 1e-10). LISA divides
  by (count + 1e-5) because its padded DistributedSampler counts duplicates; we count each
  target once (`shard_indices`) and divide by the count: at most 1e-5 / count apart, relative.
- `GresAccumulator` (gRefCOCO, RefZOM): non-empty GT -> IoU = I / (U + 1e-8) on the decoded
  mask whatever the decision; empty GT -> 1 if `[REJ]` was predicted else 0; cIoU sums I and U
  over non-empty targets plus, in U and for gRefCOCO only (GSVA solver.py), the predicted area
  of empty targets wrongly called `[SEG]`;
  N-acc = #(empty and REJ) / #empty; T-acc = #(non-empty and SEG) / #non-empty.
  GSVA decides from the teacher-forced pass (`predicted_present`), then replaces every `[REJ]`
  of the input by `[SEG]` and reruns, so every target has a decoded mask: the caller passes
  pass 1's decisions and `target_stats` of pass 2's masks (the passes differ only on samples
  whose answer holds a `[REJ]`). Pass 1's masks there (`[REJ]` rows empty) would leave the
  false-positive area out of cIoU.
- `SemanticIoUAccumulator`: K-class confusion matrix, 255 ignored, IoU_c = TP / (TP + FP + FN),
  mIoU = mean over classes with a non-zero union.

Samples are sharded with `shard_indices` (no padding), so ranks may see unequal numbers of
samples, even none: the loop must not assume equal lengths, and every rank calls `reduce()`
once at the end (the only collective).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from utils.datasets.base import IGNORE_LABEL

if TYPE_CHECKING:
    from model.batch import Batch
    from model.segmenter import SegmenterOutput
    from model.tokens import TokenIds

MASK_LOGIT_THRESHOLD = 0.0
MEAN_IOU_EPS = 1e-5  # LISA's smoothing of each mask's IoU denominator (gIoU)
GRES_IOU_EPS = 1e-8  # GSVA's smoothing of each non-empty target's IoU denominator
CUMULATIVE_IOU_EPS = 1e-10  # keeps cIoU finite when every union is 0
GT_FOREGROUND = 1
GRES_DATASETS = ("grefcoco", "refzom", "custom")  # validation sets scored with GSVA's protocol
# those whose cIoU also counts the area predicted for absent targets (GSVA: gRefCOCO; and ours)
FALSE_POSITIVE_AREA_DATASETS = ("grefcoco", "custom")
PERCENT = 100.0

GIOU, CIOU, N_ACC, T_ACC, MIOU, TARGETS = "giou", "ciou", "n_acc", "t_acc", "miou", "targets"
RECORD_KEYS = tuple("record_id target iou intersection union empty_gt predicted_present".split())
TABLE_COLUMNS = {GIOU: "gIoU", CIOU: "cIoU", N_ACC: "N-acc", T_ACC: "T-acc"}
# columns shown only when some set has them (the semantic sets': utils.semantic_eval keys)
OPTIONAL_COLUMNS = {MIOU: "mIoU", "pixel_accuracy": "pAcc", "unmatched_names": "unmatched"}
COUNT_COLUMNS = ("unmatched_names",)  # written as integers, not percentages


@dataclass
class TargetStats:
    """Pixel counts of the k targets of one image. intersection, union: int64 [k] foreground
    counts over non-ignored pixels; empty_gt: bool [k], no foreground in the GT (`[REJ]`)."""

    intersection: torch.Tensor
    union: torch.Tensor
    empty_gt: torch.Tensor


def _check_gt(pred_logits: torch.Tensor, gt: torch.Tensor) -> None:
    if pred_logits.shape != gt.shape or gt.dim() != 3:
        raise ValueError(
            f"predicted masks {tuple(pred_logits.shape)} and ground truth {tuple(gt.shape)} "
            "must both be [k, H, W], one row per target"
        )
    if ((gt != 0) & (gt != GT_FOREGROUND) & (gt != IGNORE_LABEL)).any():
        raise ValueError(
            f"ground-truth masks must hold only 0, {GT_FOREGROUND} and {IGNORE_LABEL} (ignore), "
            f"got values {torch.unique(gt).tolist()}"
        )


def intersection_union(
    pred_logits: torch.Tensor, gt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground intersection and union per target, ignore pixels excluded from both.

    pred_logits: float [k, H, W] mask logits; gt: uint8 [k, H, W] in {0, 1, 255}.
    Returns (I, U), int64 [k] each.
    """
    _check_gt(pred_logits, gt)
    valid = gt != IGNORE_LABEL
    pred = (pred_logits > MASK_LOGIT_THRESHOLD) & valid
    target = gt == GT_FOREGROUND
    return (pred & target).sum(dim=(1, 2)), (pred | target).sum(dim=(1, 2))


def target_stats(pred_logits: torch.Tensor, gt: torch.Tensor) -> TargetStats:
    """`intersection_union` plus which targets have an empty ground truth (shapes as there)."""
    intersection, union = intersection_union(pred_logits, gt)
    return TargetStats(intersection, union, (gt == GT_FOREGROUND).sum(dim=(1, 2)) == 0)


def target_decisions(
    input_ids: torch.Tensor,
    logits: torch.Tensor,
    conv_image: torch.Tensor,
    num_images: int,
    token_ids: TokenIds,
) -> list[torch.Tensor]:
    """GSVA's teacher-forced decisions: per image bool [k_i], True = predicted present (SEG).

    input_ids: long [C, L] with the ground-truth answer; logits: [C, L, V]; conv_image: long [C].
    For a target token at i, the prediction is argmax(logits[i - 1]); a GT `[SEG]` counts as
    present only if that is `[SEG]`, a GT `[REJ]` counts as present unless it is `[REJ]` (so
    any other token is a miss either way). Targets are ordered as `Segmenter.find_targets`
    orders them: row-major over (conversation, position), grouped by image.
    """
    # Imported here: model.tokens pulls in transformers, which metric-only users do not need.
    from model.tokens import predictor_mask

    before_rej = predictor_mask(input_ids, token_ids.rej)
    before_any = predictor_mask(input_ids, token_ids.seg) | before_rej
    conv, position = torch.nonzero(before_any, as_tuple=True)
    predicted = logits[conv, position].argmax(dim=-1)
    present = torch.where(
        before_rej[conv, position], predicted != token_ids.rej, predicted == token_ids.seg
    )
    counts = torch.bincount(conv_image[conv], minlength=num_images).tolist()
    return list(present.split(counts))


def predicted_present(
    batch: Batch, output: SegmenterOutput, token_ids: TokenIds
) -> list[torch.Tensor]:
    """`target_decisions` of a batch and the segmenter's output, aligned with `pred_masks`."""
    decisions = target_decisions(
        batch.input_ids, output.logits, batch.conv_image, batch.num_images, token_ids
    )
    mask_counts = [len(masks) for masks in output.pred_masks]
    if [len(d) for d in decisions] != mask_counts:
        raise ValueError(
            f"target tokens per image {[len(d) for d in decisions]} do not match the predicted "
            f"masks per image {mask_counts}; were the logits computed on this batch?"
        )
    return decisions


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _cumulative_iou(sums: dict[str, float]) -> float | None:
    """cIoU from the summed intersection and union; None when no target was seen."""
    ciou = sums["intersection"] / (sums["union"] + CUMULATIVE_IOU_EPS)
    return ciou if sums["count"] > 0 else None


class Accumulator:
    """Sums kept in one tensor (on the device of the first update unless `device` is given),
    all-reduced once by `reduce()`; subclasses define the state and the summary."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self.records: list[dict[str, Any]] = []
        self._state: torch.Tensor | None = None
        self._reduced = False

    def _zeros(self, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def summary(self) -> dict[str, float | None]:
        raise NotImplementedError

    def _accumulate(self, value: torch.Tensor) -> None:
        if self._reduced:
            raise RuntimeError("update() after reduce(): the reduced sums would mix ranks")
        if self._state is None:
            self._state = self._zeros(self.device or value.device)
        self._state += value.to(self._state)

    def state(self) -> torch.Tensor:
        """The sums (zeros before any update)."""
        default = self.device or torch.device("cpu")
        return self._state if self._state is not None else self._zeros(default)

    def reduce(self) -> None:
        """All-reduce (sum) the state across ranks; every rank calls it exactly once."""
        if self._reduced:
            raise RuntimeError("reduce() called twice: the sums would be multiplied")
        self._reduced = True
        if _distributed():
            if self._state is None:  # a rank that saw no sample; NCCL reduces only CUDA tensors
                nccl = dist.get_backend() == dist.Backend.NCCL
                self._state = self._zeros(self.device or torch.device("cuda" if nccl else "cpu"))
            dist.all_reduce(self._state, op=dist.ReduceOp.SUM)


class _TargetAccumulator(Accumulator):
    """Per-target sums in a float64 vector, one entry per name in FIELDS (exact below 2**53)."""

    FIELDS: tuple[str, ...] = ()

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    def _add(self, **per_target: torch.Tensor) -> None:
        self._accumulate(torch.stack([per_target[name].double().sum() for name in self.FIELDS]))

    def totals(self) -> dict[str, float]:
        return dict(zip(self.FIELDS, self.state().tolist(), strict=True))

    def _record(
        self,
        stats: TargetStats,
        iou: torch.Tensor,
        record_id: str,
        target_names: Sequence[str] | None,
        present: torch.Tensor | None,
    ) -> None:
        count = len(iou)
        if target_names is not None and len(target_names) != count:
            raise ValueError(f"{record_id}: {len(target_names)} target names for {count} masks")
        columns = zip(
            target_names if target_names is not None else [None] * count,
            iou.tolist(),
            stats.intersection.tolist(),
            stats.union.tolist(),
            stats.empty_gt.tolist(),
            present.tolist() if present is not None else [None] * count,
            strict=True,
        )
        self.records += [dict(zip(RECORD_KEYS, (record_id, *row), strict=True)) for row in columns]


class MaskIoUAccumulator(_TargetAccumulator):
    """LISA's gIoU / cIoU (also MMR per target and RefCOCOm "mIoU" = gIoU)."""

    FIELDS = ("iou", "count", "intersection", "union")

    def update(
        self,
        stats: TargetStats,
        record_id: str = "",
        target_names: Sequence[str] | None = None,
        predicted_present: torch.Tensor | None = None,
    ) -> None:
        """Add one image's targets; `predicted_present` (bool [k]) only goes to the records."""
        intersection, union = stats.intersection.double(), stats.union.double()
        iou = torch.where(union == 0, 1.0, intersection / (union + MEAN_IOU_EPS))
        self._add(iou=iou, count=torch.ones_like(iou), intersection=intersection, union=union)
        self._record(stats, iou, record_id, target_names, predicted_present)

    def summary(self) -> dict[str, float | None]:
        sums = self.totals()
        giou = _ratio(sums["iou"], sums["count"])
        return {GIOU: giou, CIOU: _cumulative_iou(sums), TARGETS: sums["count"]}


class GresAccumulator(_TargetAccumulator):
    """GSVA's gRefCOCO / RefZOM gIoU / cIoU / N-acc / T-acc (see the module docstring for the two
    passes). false_positive_area: add the predicted area of empty targets called `[SEG]` to
    cIoU's union (gRefCOCO), or not (RefZOM)."""

    # empty_rej: empty GT called REJ (N-acc hits); nonempty_seg: non-empty called SEG (T-acc)
    FIELDS = MaskIoUAccumulator.FIELDS + ("empty", "empty_rej", "nonempty", "nonempty_seg")

    def __init__(
        self, device: torch.device | str | None = None, false_positive_area: bool = True
    ) -> None:
        super().__init__(device)
        self.false_positive_area = false_positive_area

    def update(
        self,
        stats: TargetStats,
        predicted_present: torch.Tensor,
        record_id: str = "",
        target_names: Sequence[str] | None = None,
    ) -> None:
        """stats: of the masks decoded for every target (pass 2); predicted_present: bool [k]
        from the teacher-forced pass 1 (`predicted_present` / `target_decisions`)."""
        present = predicted_present.to(device=stats.union.device, dtype=torch.bool)
        empty, nonempty = stats.empty_gt, ~stats.empty_gt
        intersection, union = stats.intersection.double(), stats.union.double()
        # An empty target scores 1 when called absent (REJ), 0 otherwise.
        iou = torch.where(nonempty, intersection / (union + GRES_IOU_EPS), (~present).double())
        # cIoU: an empty target wrongly called SEG adds I = 0 and U = its predicted area.
        counted = nonempty | (empty & present) if self.false_positive_area else nonempty
        self._add(
            iou=iou,
            count=torch.ones_like(iou),
            intersection=intersection * nonempty,
            union=union * counted,
            empty=empty,
            empty_rej=empty & ~present,
            nonempty=nonempty,
            nonempty_seg=nonempty & present,
        )
        self._record(stats, iou, record_id, target_names, present)

    def summary(self) -> dict[str, float | None]:
        sums = self.totals()
        return {
            GIOU: _ratio(sums["iou"], sums["count"]),
            CIOU: _cumulative_iou(sums),
            N_ACC: _ratio(sums["empty_rej"], sums["empty"]),
            T_ACC: _ratio(sums["nonempty_seg"], sums["nonempty"]),
            TARGETS: sums["count"],
        }


class SemanticIoUAccumulator(Accumulator):
    """Standard semantic-segmentation mIoU from a K x K confusion matrix (rows GT, columns pred).
    No per-target records (the metric is per pixel class, not per target)."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if not 0 < num_classes <= IGNORE_LABEL:
            raise ValueError(f"num_classes must be in 1..{IGNORE_LABEL} (255 is ignore)")
        super().__init__(device)
        self.num_classes = num_classes

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """pred: integer class ids [..., H, W] in [0, K); gt: same shape, K classes or 255.
        Returns this update's confusion matrix, int64 [K, K] (rows GT, columns prediction)."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and GT {tuple(gt.shape)} differ")
        gt, pred = gt.long(), pred.long()
        valid = gt != IGNORE_LABEL
        labels = torch.cat([gt[valid], pred.flatten()])
        if ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(f"classes must be in [0, {self.num_classes}) (GT may also be 255)")
        pairs = gt[valid] * self.num_classes + pred[valid]
        counts = torch.bincount(pairs, minlength=self.num_classes**2)
        counts = counts.view(self.num_classes, self.num_classes)
        self._accumulate(counts)
        return counts

    def class_iou(self) -> torch.Tensor:
        """float64 [K]: TP / (TP + FP + FN), nan for classes absent from GT and prediction."""
        confusion = self.state().double()
        true_pos = confusion.diagonal()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_pos
        return torch.where(union > 0, true_pos / union.clamp(min=1), torch.nan)

    def summary(self) -> dict[str, float | None]:
        iou = self.class_iou()
        seen = ~iou.isnan()
        return {MIOU: iou[seen].mean().item() if seen.any() else None}


def accumulator_for(dataset: str, device: torch.device | str | None = None) -> Accumulator:
    """The mask accumulator a validation set is scored with (`ValEntry.dataset` names it)."""
    if dataset in GRES_DATASETS:
        return GresAccumulator(device, dataset in FALSE_POSITIVE_AREA_DATASETS)
    return MaskIoUAccumulator(device)


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records, rank by rank (a collective: all ranks call it); a copy when not
    distributed. With NCCL the current CUDA device must be set, as for any object collective."""
    if not _distributed():
        return list(records)
    gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    return [record for part in gathered for record in (part or [])]


def largest_over_ranks(value: int, device: torch.device | str) -> int:
    """The maximum of `value` over the ranks (a collective in a group of several ranks)."""
    if not _distributed() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Rank r evaluates samples r, r + world_size, ...: each of the n samples exactly once.

    No padding (unlike DistributedSampler, whose duplicates LISA counts twice), so shards
    differ in length by up to one and a rank may get none; see the module docstring.
    """
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need n >= 0, 0 <= rank < world_size; got {n=} {rank=} {world_size=}")
    return list(range(rank, n, world_size))


def _cell(value: float | None, count: bool = False) -> str:
    if value is None:
        return ""
    return str(int(value)) if count else f"{value * PERCENT:.2f}"


def _format_row(row: list[str], widths: list[int]) -> str:
    """The name left-aligned, the numbers right-aligned."""
    cells = [row[0].ljust(widths[0])]
    cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
    return "  ".join(cells).rstrip()


def format_table(results: dict[str, dict[str, float | None]]) -> str:
    """One row per validation set: gIoU, cIoU, N-acc, T-acc (and mIoU, pixel accuracy and the
    unmatched-name count when any set has them) as percentages with 2 decimals (the count as an
    integer); blank where a metric is absent or None."""
    columns = dict(TABLE_COLUMNS)
    for key, title in OPTIONAL_COLUMNS.items():
        if any(key in metrics for metrics in results.values()):
            columns[key] = title
    rows = [["dataset", *columns.values()]]
    rows += [
        [name, *(_cell(m.get(key), key in COUNT_COLUMNS) for key in columns)]
        for name, m in results.items()
    ]
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return "\n".join(_format_row(row, widths) for row in rows)
