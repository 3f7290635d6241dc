"""Semantic-segmentation validation (`ade20k|val`, `cocostuff|val`, `cityscapes|val`,
`mapillary|val`; LaSagnA `test_sem.py`): per image the model generates its class sequence and
the masks of its present classes are composed into one label map and scored with mIoU.

Per image, one generation prompt per chunk of the class list (`--semantic_val_chunk`; 0 asks for
the whole list at once, as LaSagnA), the question `lasagna.semantic_question` of the chunk, in
the model's template. The answers of all chunks are generated together (greedy, KV cache,
`model.generate.generate`, at most `--max_new_tokens` tokens each) and read by token ids
(`utils.generative_eval.class_items`); their present items, chunk by chunk, name the image's
masks in order. `utils.semantic_eval.SemanticScorer` matches the names, composes the labels and
adds the image's confusion matrix (`--lasagna_miou_compat`: LaSagnA's own scoring).

Sharding as `utils.evaluation.evaluate`: rank r scores `shard_indices(n, r, world_size)` (each
image once, no padding duplicates); a rank with fewer batches generates for uncounted copies of
image 0 so that every rank runs the same forwards, and the sums are all-reduced once per set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model.batch import Batch
from model.generate import Generation, generate
from model.tokens import IGNORE_INDEX
from utils.collate import (
    ProcessedSample,
    SampleProcessor,
    collate,
    image_tokens_of,
    template_for,
    tokenize_prompt,
)
from utils.datasets.semantic_val import SemanticValidation, SemanticValSample
from utils.generative_eval import class_items
from utils.metrics import gather_records, largest_over_ranks
from utils.semantic_eval import PER_CLASS_IOU, PROTOCOL, SemanticScorer

COMPAT_SUFFIX = " (lasagna_miou_compat)"  # the result name of LaSagnA's scoring
DETAIL_KEYS = (PROTOCOL, PER_CLASS_IOU)  # written to eval_<set>.json, not logged as scalars


@dataclass
class SemanticItem:
    """One image of a semantic set: its prompts (one conversation per chunk), the ground
    truth uint8 [H, W] (class indices, 255 not scored) and what its record names."""

    processed: ProcessedSample
    label: np.ndarray
    record_id: str
    image_path: str


@dataclass
class SemanticOutcome:
    """summary: scalars (miou, pixel_accuracy, generated/unmatched names, fuzzy matches);
    details: the protocol and the per-class IoU table; records: one per image, all ranks'."""

    summary: dict[str, float | None]
    details: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def semantic_prompts(
    sample: SemanticValSample, processor: SampleProcessor, source: str
) -> ProcessedSample:
    """The image's generation prompts, one per question (chunk), ready for `collate`; `source`
    names the set."""
    template = template_for(processor.tokenizer, processor.conv_type)
    image = processor.images(sample.image)
    prompts = [
        tokenize_prompt(
            [(question, None)],
            processor.tokenizer,
            processor.token_ids,
            image_tokens_of(image, processor.image_tokens),
            template,
        )
        for question in sample.questions
    ]
    size = tuple(sample.image.shape[:2])
    return ProcessedSample(
        clip_pixels=image.vision,
        sam_pixels=image.sam,
        resized_size=image.resized_size,
        image_grid=image.grid,
        original_size=size,
        input_ids=prompts,
        labels=[torch.full_like(ids, IGNORE_INDEX) for ids in prompts],
        masks=torch.zeros(0, *size, dtype=torch.uint8),
        image_path=sample.image_path,
        source=source,
    )


class SemanticShard(Dataset):
    """A rank's images of a semantic set as `SemanticItem`s (read in DataLoader workers)."""

    def __init__(
        self, dataset: SemanticValidation, indices: Sequence[int], processor: SampleProcessor
    ) -> None:
        self.dataset, self.indices, self.processor = dataset, list(indices), processor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> SemanticItem:
        sample = self.dataset[self.indices[position]]
        prompts = semantic_prompts(sample, self.processor, self.dataset.name)
        return SemanticItem(prompts, sample.label, sample.record_id, sample.image_path)


@dataclass(frozen=True)
class SemanticCollator:
    """Picklable collate_fn: (Batch of prompts, items)."""

    pad_id: int

    def __call__(self, items: list[SemanticItem]) -> tuple[Batch, list[SemanticItem]]:
        batch = collate([item.processed for item in items], self.pad_id)
        batch.labels, batch.gt_masks = None, None
        return batch, items


def _answer_tokens(sequence: torch.Tensor, eos: int) -> list[int]:
    tokens = sequence.tolist()
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


def score_generation(
    scorer: SemanticScorer,
    batch: Batch,
    items: list[SemanticItem],
    generation: Generation,
    processor: SampleProcessor,
) -> None:
    """Add each image of a generated batch to `scorer` and complete its record with the image
    path, the generated text of each chunk (vocabulary strings shown) and the absent names."""
    token_ids, tokenizer = processor.token_ids, processor.tokenizer
    names_of = _decoder(tokenizer, skip_special=True)
    for image, item in enumerate(items):
        conversations = torch.nonzero(batch.conv_image == image).squeeze(1).tolist()
        answers = [_answer_tokens(generation.sequences[c], token_ids.eos) for c in conversations]
        parsed = [entry for tokens in answers for entry in class_items(tokens, token_ids, names_of)]
        masks = generation.pred_masks[image]
        is_rej = generation.target_is_rej[image].to(masks.device)
        if [not present for _, present in parsed] != is_rej.tolist():
            raise RuntimeError(
                f"{item.image_path} (record {item.record_id}): {len(parsed)} class items read "
                f"from the answers, expected the {len(is_rej)} generated [SEG]/[REJ] in order"
            )
        gt = torch.from_numpy(item.label).to(masks.device)
        present = [name for name, is_present in parsed if is_present]
        record = scorer.update(masks[~is_rej].float(), present, gt, item.record_id)
        record["image"] = item.image_path
        record["texts"] = [_decoder(tokenizer, skip_special=False)(t) for t in answers]
        record["absent"] = [name for name, is_present in parsed if not is_present]


def _decoder(tokenizer, skip_special: bool) -> Callable[[list[int]], str]:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special).strip()


def evaluate_semantic(
    model: nn.Module,
    dataset: SemanticValidation,
    processor: SampleProcessor,
    indices: Sequence[int],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None,
    batch_size: int = 1,
    num_workers: int = 0,
    max_new_tokens: int = 512,
    lasagna_miou_compat: bool = False,
    on_images: Callable[[int], None] = lambda count: None,
) -> SemanticOutcome:
    """Score this rank's `indices` of `dataset` (a collective: every rank calls it for the same
    set). The caller sets eval mode and no_grad; `on_images(n)` after each batch of n images."""
    loader = DataLoader(
        SemanticShard(dataset, indices, processor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=SemanticCollator(processor.token_ids.pad),
    )
    scorer = SemanticScorer(dataset.classes, lasagna_miou_compat, device)
    segmenter = getattr(model, "module", model)

    def run(batch: Batch) -> Generation:
        return generate(
            segmenter,
            batch.to(device, dtype),
            max_new_tokens=max_new_tokens,
            any_rank_unfinished=lambda unfinished: largest_over_ranks(int(unfinished), device) > 0,
        )

    padding_batches = largest_over_ranks(len(loader), device) - len(loader)
    for batch, items in loader:
        score_generation(scorer, batch, items, run(batch), processor)
        on_images(len(items))
    for _ in range(padding_batches):  # uncounted: the other ranks still generate
        run(loader.collate_fn([SemanticShard(dataset, [0], processor)[0]])[0])
    scorer.reduce()
    summary = scorer.summary()
    details = {key: summary.pop(key) for key in DETAIL_KEYS}
    return SemanticOutcome(summary, details, gather_records(scorer.records))
