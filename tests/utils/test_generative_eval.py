"""The generate protocol's pieces: cutting prompts before the answer, and matching generated
[SEG]/[REJ] tokens to the ordered ground-truth targets with missing/extra counts."""

from __future__ import annotations

import pytest
import torch

from model.batch import Batch
from model.generate import Generation
from model.segmenter import EMPTY_MASK_LOGIT
from model.tokens import IGNORE_INDEX, TokenIds
from utils.generative_eval import match_targets, prompt_batch, prompt_lengths

IDS = TokenIds(seg=50, rej=51, image=52, pad=0, bos=1, eos=2, im_start=None, im_end=None)


def manual_batch(
    rows: list[list[int]], labelled_from: list[int], conv_image: list[int], sizes
) -> Batch:
    """Hand-made conversations: ids of each row, labelled from the given column."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (tokens, start) in enumerate(zip(rows, labelled_from, strict=True)):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, start : len(tokens)] = ids[row, start : len(tokens)]
    return Batch(
        input_ids=ids,
        attention_mask=torch.tensor([[c < len(r) for c in range(length)] for r in rows]),
        conv_image=torch.tensor(conv_image),
        clip_pixels=torch.zeros(len(sizes), 3, 4, 4),
        sam_pixels=torch.zeros(len(sizes), 3, 16, 16),
        resized_sizes=torch.tensor(sizes),
        original_sizes=torch.tensor(sizes),
        labels=labels,
    )


def test_prompts_end_where_the_answer_starts() -> None:
    batch = manual_batch([[1, 7, 8, 9, 50, 2], [1, 7, 9, 51, 2]], [4, 3], [0, 0], [(4, 5)])
    assert prompt_lengths(batch).tolist() == [4, 3]
    prompts = prompt_batch(batch)
    assert prompts.labels is None
    assert prompts.input_ids.tolist() == [[1, 7, 8, 9], [1, 7, 9, 0]]
    assert prompts.attention_mask.tolist() == [[True] * 4, [True, True, True, False]]


def test_a_conversation_with_two_answers_is_refused() -> None:
    batch = manual_batch([[1, 7, 50, 2, 8, 50, 2]], [2], [0], [(4, 5)])
    batch.labels[0, 4] = IGNORE_INDEX  # a second question between two answers
    with pytest.raises(ValueError, match="conversation 0 has 2 answers"):
        prompt_lengths(batch)


def generation(target_conv, target_is_rej, masks) -> Generation:
    return Generation(
        sequences=[],
        target_conv=[torch.tensor(c, dtype=torch.long) for c in target_conv],
        target_is_rej=[torch.tensor(r, dtype=torch.bool) for r in target_is_rej],
        pred_masks=masks,
        mask_scores=[torch.zeros(len(c)) for c in target_conv],
        steps=1,
        coarse_masks=[m[:0] for m in masks],
        coarse_scores=[torch.zeros(0) for _ in masks],
        coarse_source=[torch.full((len(c),), -1, dtype=torch.long) for c in target_conv],
        coarse_conv=[torch.zeros(0, dtype=torch.long) for _ in masks],
    )


def test_generated_targets_are_matched_in_order_with_missing_and_extra_counted() -> None:
    # image 0: conv 0 wants [SEG] [REJ], conv 1 wants [SEG]; image 1: conv 2 wants [SEG]
    rows = [[1, 7, 50, 51, 2], [1, 8, 50, 2], [1, 9, 50, 2]]
    batch = manual_batch(rows, [2, 2, 2], [0, 0, 1], [(2, 3), (3, 2)])
    generated_masks = [
        torch.arange(3 * 6, dtype=torch.float).reshape(3, 2, 3),
        torch.zeros(0, 3, 2),
    ]
    # conv 0 generated [SEG] only (one missing), conv 1 generated [REJ] [SEG] (one extra),
    # conv 2 generated nothing (one missing)
    out = generation([[0, 1, 1], []], [[False, True, False], []], generated_masks)
    decisions, masks, coarse, counts = match_targets(batch, out, IDS)
    assert coarse == [[None, None, None], [None]]  # no chain token: no coarse masks
    assert [d.tolist() for d in decisions] == [[True, False, False], [False]]
    assert torch.equal(masks[0][0], generated_masks[0][0])
    assert bool((masks[0][1] == EMPTY_MASK_LOGIT).all())  # missing
    assert torch.equal(masks[0][2], generated_masks[0][1])  # conv 1's first generated target
    assert masks[1].shape == (1, 3, 2) and bool((masks[1] == EMPTY_MASK_LOGIT).all())
    assert (counts.missing_targets, counts.extra_targets, counts.answers) == (2, 1, 3)
