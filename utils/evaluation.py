"""Validation: teacher-forced evaluation of a segmenter on the `--val_dataset` sets, sharded over
ranks, with one summary per set and one JSONL record per target.

Protocol (LISA / MMR / GSVA, all teacher-forced): each sample's ground-truth answer is in the
input, every `[SEG]`/`[REJ]` target gets the mask its hidden state decodes, and `utils.metrics`
scores it. gRefCOCO and RefZOM follow GSVA (REFERENCE.md section 2.6): the present/absent
decisions come from pass 1 (argmax of the logits before each target, `predicted_present`); then,
only for batches whose input holds a `[REJ]`, every `[REJ]` id is replaced by `[SEG]` and the
batch is run again, and the masks of that pass 2 are scored. Without pass 2 a `[REJ]` target has
no decoded mask, so an absent target wrongly called present would add nothing to cIoU's union
(GSVA counts that area for gRefCOCO, not RefZOM: `utils.metrics.GresAccumulator`).

Sharding: rank r evaluates `shard_indices(n, r, world_size)` (no padding duplicates; shards may
be unequal or empty). `reduce()` and `gather_records` are collectives: every rank reaches them
once per set, whatever its shard. Conversations are never dropped for length here (evaluation
does not truncate), so every target of the set is scored exactly once.

The semantic-segmentation sets (`ade20k|val`, `cocostuff|val`, `cityscapes|val`,
`mapillary|val`) are always evaluated by generation (`--eval_protocol` does not apply) and
scored with mIoU, one record per image: `utils.semantic_validation`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model.batch import Batch
from model.tokens import TokenIds
from utils.collate import ProcessedSample, SampleProcessor, collate
from utils.datasets.base import ValidationSample
from utils.datasets.mmr import MMR_VAL_JSON
from utils.datasets.semantic_val import SemanticValidation
from utils.datasets.templates import DEFAULT_VAL_ANSWER
from utils.datasets.validation import (
    ValEntry,
    ValidationSet,
    build_validation_set,
    is_semantic,
    parse_val_datasets,
)
from utils.generative_eval import (
    PROTOCOL_SUFFIX,
    CoarseMasks,
    MatchCounts,
    generate_batch,
    linked_coarse,
)
from utils.metrics import (
    Accumulator,
    GresAccumulator,
    accumulator_for,
    gather_records,
    largest_over_ranks,
    predicted_present,
    shard_indices,
    target_stats,
)

# Sets whose annotation file is chosen by --val_json_name (-> "<entry>:<json name>").
JSON_NAMED_SETS = {"MultiPartReasonSeg": MMR_VAL_JSON, "RefCOCOm": ""}
JSON_NAME_SEPARATOR = ":"
OUTPUT_PREFIX = "eval_"
UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._+-]+")
JSON_SUFFIX = re.compile(r"\.json(?!l)")  # ".json" but not the start of ".jsonl"
TEACHER_FORCED, GENERATE = "teacher_forced", "generate"


@dataclass
class ValidationJob:
    """One validation set to evaluate: its report name, parsed entry and built dataset.

    name: `str(entry)`, plus ":<json name>" for sets read from `--val_json_name` (MMR, RefCOCOm),
        so several annotation files of one split are reported separately.
    metric: the key `accumulator_for` picks the accumulator with ("grefcoco", "refzom" -> GSVA's).
    """

    name: str
    entry: ValEntry
    dataset: ValidationSet | SemanticValidation

    @property
    def metric(self) -> str:
        return self.entry.dataset

    @property
    def semantic(self) -> bool:
        """A semantic-segmentation set (generated class sequences, mIoU)."""
        return is_semantic(self.entry)

    def new_accumulator(self, device: torch.device | str | None = None) -> Accumulator:
        """A fresh accumulator of this set's kind (sums on `device`)."""
        return accumulator_for(self.metric, device)


@dataclass
class EvalResult:
    """The outcome of `evaluate` for one set.

    summary: the accumulator's reduced summary (gIoU, cIoU, ..., fractions in [0, 1] or None;
        "targets" is a count), scalars only. records: one dict per target
        (`utils.metrics.RECORD_KEYS`; a semantic set: one per image), every rank's, rank by
        rank. samples: images in the set. seconds: wall time of this rank. details: what is
        not a scalar (a semantic set's protocol and per-class IoU table), for eval_<set>.json.
    """

    name: str
    summary: dict[str, float | None]
    records: list[dict[str, Any]]
    seconds: float
    samples: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def job_name(entry: ValEntry, val_json_name: str = "") -> str:
    """The report name of a set, e.g. "grefcoco|unc|val", "MultiPartReasonSeg|val:MMR_val.json"."""
    if entry.dataset not in JSON_NAMED_SETS:
        return str(entry)
    json_name = val_json_name or JSON_NAMED_SETS[entry.dataset]
    return f"{entry}{JSON_NAME_SEPARATOR}{json_name}" if json_name else str(entry)


def build_validation_jobs(
    dataset_dir: str | Path,
    val_dataset: str,
    val_json_name: str = "",
    val_answer: str = DEFAULT_VAL_ANSWER,
    semantic_val_chunk: int = 0,
) -> list[ValidationJob]:
    """One job per `--val_dataset` entry ("||"-joined), datasets built (their files are read);
    the single-target sets answer `val_answer`, the semantic sets ask `semantic_val_chunk`
    class names per question (0: all)."""
    return [
        ValidationJob(
            job_name(entry, val_json_name),
            entry,
            build_validation_set(
                Path(dataset_dir), entry, val_json_name, val_answer, semantic_val_chunk
            ),
        )
        for entry in parse_val_datasets(val_dataset)
    ]


@dataclass
class _Item:
    """One processed validation image and what its records need."""

    processed: ProcessedSample
    record_id: str
    target_names: list[str]


class _ShardSamples(Dataset):
    """A rank's shard of a validation set, read and processed per item (DataLoader workers)."""

    def __init__(
        self, dataset: ValidationSet, indices: Sequence[int], processor: SampleProcessor
    ) -> None:
        self.dataset, self.indices, self.processor = dataset, list(indices), processor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> _Item:
        sample: ValidationSample = self.dataset[self.indices[position]]
        processed = self.processor(sample)
        if len(sample.target_names) != processed.masks.shape[0]:
            raise ValueError(
                f"{sample.image_path} (record {sample.record_id}): {len(sample.target_names)} "
                f"target names for {processed.masks.shape[0]} masks"
            )
        return _Item(processed, sample.record_id, list(sample.target_names))


@dataclass(frozen=True)
class _ItemCollator:
    """Picklable collate_fn: (Batch, items) for a list of `_Item`s."""

    pad_id: int

    def __call__(self, items: list[_Item]) -> tuple[Batch, list[_Item]]:
        return collate([item.processed for item in items], self.pad_id), items


def reject_as_segment(input_ids: torch.Tensor, token_ids: TokenIds) -> torch.Tensor:
    """input_ids long [C, L] with every `[REJ]` id replaced by the `[SEG]` id (GSVA pass 2)."""
    return input_ids.masked_fill(input_ids == token_ids.rej, token_ids.seg)


def decode_batch(
    model: nn.Module, batch: Batch, token_ids: TokenIds, second_pass: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], CoarseMasks]:
    """(decisions, masks, coarse) per image: bool [k_i] from pass 1, float32 [k_i, H_i, W_i]
    logits, and per target the chain token's mask logits [H_i, W_i] that prompted it (None for
    a plain target; `utils.generative_eval.linked_coarse`), from pass 1.

    With `second_pass` and a `[REJ]` in the input (of this or any other rank's batch), the
    masks come from a rerun with `[REJ]` written as `[SEG]`; labels and GT masks are dropped
    there (no loss is needed, and the targets, hence the mask counts, are the same as in
    pass 1). Collective when `second_pass` is set in a process group of several ranks.
    """
    output = model(batch)
    decisions = predicted_present(batch, output, token_ids)
    masks = output.pred_masks
    coarse = [
        linked_coarse(image_coarse, source)
        for image_coarse, source in zip(output.coarse_masks, output.coarse_source, strict=True)
    ]
    has_rej = bool((batch.input_ids == token_ids.rej).any())
    # every rank reruns when any does: ranks must run the same forwards (ZeRO-3 gathers
    # parameters collectively); a batch without [REJ] reruns to the same masks
    if second_pass and largest_over_ranks(int(has_rej), batch.input_ids.device):
        rerun = replace(
            batch,
            input_ids=reject_as_segment(batch.input_ids, token_ids),
            labels=None,
            gt_masks=None,
        )
        masks = model(rerun).pred_masks
    return decisions, masks, coarse


def coarse_fields(coarse: torch.Tensor | None, gt: torch.Tensor) -> dict[str, Any]:
    """The JSONL fields of a target's coarse (chain-token) mask: its IoU with the target's
    ground truth and the binarised mask as COCO RLE (`pycocotools.mask.decode` reads it back);
    nothing for a target without one. coarse: float32 logits [H, W]; gt: [H, W]."""
    if coarse is None:
        return {}
    stats = target_stats(coarse[None].float(), gt[None])
    iou = float(stats.intersection[0] / stats.union[0]) if stats.union[0] > 0 else None
    binary = (coarse > 0).cpu().numpy().astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(binary))
    return {
        "coarse_iou": iou,
        "coarse_mask": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
    }


def _score_batch(
    accumulator: Accumulator,
    batch: Batch,
    items: list[_Item],
    decoded: tuple[list[torch.Tensor], list[torch.Tensor], CoarseMasks],
) -> None:
    """Add each image's targets to the accumulator (GT masks already on the model's device);
    with chained decoding, each target's record also gets its coarse mask (`coarse_fields`)."""
    for item, gt, present, pred, coarse in zip(items, batch.gt_masks, *decoded, strict=True):
        stats = target_stats(pred.float(), gt)
        if isinstance(accumulator, GresAccumulator):
            accumulator.update(stats, present, item.record_id, item.target_names)
        else:
            accumulator.update(stats, item.record_id, item.target_names, present)
        if len(coarse) and any(mask is not None for mask in coarse):
            records = accumulator.records[len(accumulator.records) - len(coarse) :]
            for record, mask, target_gt in zip(records, coarse, gt, strict=True):
                record.update(coarse_fields(mask, target_gt))


def _training_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Each submodule's training flag: frozen parts may sit in eval mode while the rest trains,
    so a plain `model.train(was_training)` afterwards would not restore them."""
    return {module: module.training for module in model.modules()}


def _restore_training_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def _progress_bar(total: int, name: str, enabled: bool):
    """A tqdm bar over images (imported only when shown)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval {name}", unit="img", dynamic_ncols=True)


@contextmanager
def _evaluating(model: nn.Module, total: int, name: str, progress: bool):
    """Eval mode and no_grad around a shard's loop (every submodule's training mode restored
    afterwards); yields `on_images(count)`, which advances the progress bar when shown."""
    bar = _progress_bar(total, name, progress)
    modes = _training_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            yield (lambda count: None) if bar is None else bar.update
    finally:
        _restore_training_modes(modes)
        if bar is not None:
            bar.close()


def evaluate(
    model: nn.Module,
    job: ValidationJob,
    processor: SampleProcessor,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None,
    rank: int,
    world_size: int,
    batch_size: int = 1,
    progress: bool = False,
    num_workers: int = 0,
    protocol: str = TEACHER_FORCED,
    max_new_tokens: int = 512,
    lasagna_miou_compat: bool = False,
) -> EvalResult:
    """Evaluate `model` (a Segmenter or an engine wrapping one) on this rank's shard of `job`.

    Batches of `batch_size` images are collated into one Batch, moved to `device` with floating
    pixels cast to `dtype`, and run under `torch.no_grad()` in eval mode (every submodule's
    previous training mode is restored). `num_workers`: DataLoader workers that read and
    process images. Collective: every rank of the process group calls it for the same job.
    protocol: "teacher_forced" (the published numbers' protocol) or "generate" (the model writes
    its answers, `utils.generative_eval`; the result is named "<set> (generate)" and its
    summary adds missing_targets, extra_targets and answers). A semantic set ignores
    `protocol` (always generated) and is scored as `utils.semantic_validation` says, with
    LaSagnA's own scoring under `lasagna_miou_compat` (its result named "<set>
    (lasagna_miou_compat)").
    """
    if protocol not in (TEACHER_FORCED, GENERATE):
        raise ValueError(f"protocol must be {TEACHER_FORCED} or {GENERATE}, not {protocol!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    # Evaluation never drops a too-long conversation: each target must be scored once.
    processor = replace(processor, model_max_length=None)
    indices = shard_indices(len(job.dataset), rank, world_size)
    if job.semantic:
        from utils.semantic_validation import COMPAT_SUFFIX, evaluate_semantic

        with _evaluating(model, len(indices), job.name, progress and rank == 0) as on_images:
            outcome = evaluate_semantic(
                model,
                job.dataset,
                processor,
                indices,
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                num_workers=num_workers,
                max_new_tokens=max_new_tokens,
                lasagna_miou_compat=lasagna_miou_compat,
                on_images=on_images,
            )
        name = job.name + (COMPAT_SUFFIX if lasagna_miou_compat else "")
        seconds = time.perf_counter() - start
        return EvalResult(
            name, outcome.summary, outcome.records, seconds, len(job.dataset), outcome.details
        )
    token_ids = processor.token_ids
    loader = DataLoader(
        _ShardSamples(job.dataset, indices, processor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_ItemCollator(token_ids.pad),
    )
    accumulator = job.new_accumulator(device)
    second_pass = isinstance(accumulator, GresAccumulator)
    run_batch = _batch_runner(model, token_ids, second_pass, protocol, max_new_tokens, device)
    counts = MatchCounts()
    with _evaluating(model, len(indices), job.name, progress and rank == 0) as on_images:
        # shards may differ by a batch: the shorter ranks repeat an uncounted batch so that
        # every rank runs the same forwards (ZeRO-3 gathers parameters collectively)
        padding_batches = largest_over_ranks(len(loader), device) - len(loader)
        for batch, items in loader:
            batch = batch.to(device, dtype)
            decisions, masks, coarse, batch_counts = run_batch(batch)
            counts.add(batch_counts)
            _score_batch(accumulator, batch, items, (decisions, masks, coarse))
            on_images(len(items))
        for _ in range(padding_batches):
            padding = collate([processor(job.dataset[0])], token_ids.pad)
            run_batch(padding.to(device, dtype))
    accumulator.reduce()
    records = gather_records(accumulator.records)
    summary = accumulator.summary()
    name = job.name
    if protocol == GENERATE:
        summary.update(_reduced_counts(counts, device))
        name += PROTOCOL_SUFFIX
    return EvalResult(name, summary, records, time.perf_counter() - start, len(job.dataset))


def _batch_runner(model, token_ids, second_pass, protocol, max_new_tokens, device):
    """batch -> (decisions, masks, MatchCounts) under the chosen protocol."""
    if protocol == TEACHER_FORCED:
        return lambda batch: (*decode_batch(model, batch, token_ids, second_pass), MatchCounts())

    def any_rank_unfinished(unfinished: bool) -> bool:
        return largest_over_ranks(int(unfinished), device) > 0

    return lambda batch: generate_batch(
        model, batch, token_ids, max_new_tokens, second_pass, any_rank_unfinished
    )


def _reduced_counts(counts: MatchCounts, device) -> dict[str, int]:
    """The generate protocol's counts summed over ranks (a collective with several ranks)."""
    totals = counts.as_tensor(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return dict(zip(("missing_targets", "extra_targets", "answers"), totals.tolist(), strict=True))


def safe_name(name: str) -> str:
    """A file-name stem for a set name: "MultiPartReasonSeg|val:MMR_val.json" ->
    "MultiPartReasonSeg_val_MMR_val" ("|", ":", spaces, slashes... become "_")."""
    stem = JSON_SUFFIX.sub("", name)
    return UNSAFE_CHARACTERS.sub("_", stem).strip("_") or "unnamed"


def write_eval_outputs(directory: str | Path, result: EvalResult) -> tuple[Path, Path]:
    """Write `eval_<safe name>.json` (name, summary, counts, seconds, and the details: a
    semantic set's protocol and per_class_iou) and `eval_<safe name>.jsonl` (one record per
    target; per image for a semantic set) under `directory`; returns both paths. Call it on
    rank 0 only."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = OUTPUT_PREFIX + safe_name(result.name)
    summary_path, records_path = directory / f"{stem}.json", directory / f"{stem}.jsonl"
    summary = {
        "name": result.name,
        "summary": result.summary,
        "samples": result.samples,
        "records": len(result.records),
        "seconds": result.seconds,
        **result.details,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    with records_path.open("w") as handle:
        for record in result.records:
            handle.write(json.dumps(record) + "\n")
    return summary_path, records_path
