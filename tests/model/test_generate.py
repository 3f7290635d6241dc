"""Greedy generation with masks: left padding, the KV-cache path against the re-run path,
batched against one by one, and the captured [SEG] state against teacher forcing on the
generated answer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.generate import generate, left_pad
from model.tiny import build_tiny_segmenter
from model.tokens import IGNORE_INDEX
from tests.helpers import Conversation, generation_prompts, rig_greedy_answer

SIZES = [(30, 40), (24, 20)]
QUESTIONS = [
    Conversation(0, "Please segment the red circle.", ""),
    Conversation(1, "What is the blue square in this image? Please respond with a mask.", ""),
]


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    """A tiny segmenter whose greedy answer to QUESTIONS[0] is `[SEG] [REJ] </s>`."""
    model, tokenizer = build_tiny_segmenter(tmp_path_factory.mktemp("gen"), seed=0, lora_r=0)
    model.eval()
    batch = generation_prompts(model, tokenizer, SIZES, QUESTIONS)
    ids = model.token_ids
    rig_greedy_answer(model, batch, [ids.seg, ids.rej, ids.eos])
    return model, tokenizer, batch


def test_left_pad_moves_each_row_to_the_right_edge() -> None:
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    padded, padded_mask, positions = left_pad(ids, mask, pad_id=0)
    assert padded.tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert padded_mask.tolist() == [[False, True, True, True], [False, False, True, True]]
    assert positions.tolist() == [[0, 0, 1, 2], [0, 0, 0, 1]]


def test_generation_writes_the_rigged_answer_with_one_mask_and_one_rejection(rigged) -> None:
    model, _, batch = rigged
    out = generate(model, batch, max_new_tokens=12)
    assert out.sequences[0].tolist() == [model.token_ids.seg, model.token_ids.rej, 2]
    assert out.target_is_rej[0].tolist() == [False, True]
    assert out.target_conv[0].tolist() == [0, 0]
    masks = out.pred_masks[0]
    assert masks.shape == (2, *SIZES[0])
    assert masks[0].abs().max() < 1e3 and bool((masks[1] == -1e4).all())
    assert out.mask_scores[0][1] == 0 and torch.isfinite(out.mask_scores[0][0])


def test_cached_and_rerun_generation_give_identical_tokens_and_masks(rigged) -> None:
    model, _, batch = rigged
    cached = generate(model, batch, max_new_tokens=16, use_cache=True)
    rerun = generate(model, batch, max_new_tokens=16, use_cache=False)
    assert cached.steps == rerun.steps
    for first, second in zip(cached.sequences, rerun.sequences, strict=True):
        assert torch.equal(first, second)
    for first, second in zip(cached.pred_masks, rerun.pred_masks, strict=True):
        torch.testing.assert_close(first, second, atol=1e-4, rtol=1e-4)
        assert torch.equal(first > 0, second > 0)


def single_prompt(batch, row: int):
    """Conversation `row` of a batch (one conversation per image) as a batch of its own."""
    length = int(batch.attention_mask[row].sum())
    return replace(
        batch,
        input_ids=batch.input_ids[row : row + 1, :length],
        attention_mask=batch.attention_mask[row : row + 1, :length],
        conv_image=torch.zeros(1, dtype=torch.long),
        clip_pixels=batch.clip_pixels[row : row + 1],
        sam_pixels=batch.sam_pixels[row : row + 1],
        resized_sizes=batch.resized_sizes[row : row + 1],
        original_sizes=batch.original_sizes[row : row + 1],
    )


def test_a_batch_generates_what_each_prompt_generates_alone(rigged) -> None:
    model, _, batch = rigged
    together = generate(model, batch, max_new_tokens=16)
    assert batch.attention_mask.sum(1).unique().numel() == 2  # rows of different lengths
    for row in range(len(QUESTIONS)):
        alone = generate(model, single_prompt(batch, row), max_new_tokens=16)
        assert torch.equal(alone.sequences[0], together.sequences[row])
        torch.testing.assert_close(
            alone.pred_masks[0], together.pred_masks[row], atol=1e-4, rtol=1e-4
        )


def test_the_captured_state_is_the_teacher_forced_one(rigged) -> None:
    """Feeding prompt + generated answer through the training forward decodes the same mask:
    the state captured while generating is the one that predicts [SEG]."""
    model, _, batch = rigged
    out = generate(model, batch, max_new_tokens=12)
    prompt_length = int(batch.attention_mask[0].sum())
    answer = out.sequences[0]
    input_ids = torch.cat([batch.input_ids[0, :prompt_length], answer])[None]
    forced = replace(
        batch,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids, dtype=torch.bool),
        labels=torch.full_like(input_ids, IGNORE_INDEX),
        conv_image=torch.tensor([0]),
        clip_pixels=batch.clip_pixels[:1],
        sam_pixels=batch.sam_pixels[:1],
        resized_sizes=batch.resized_sizes[:1],
        original_sizes=batch.original_sizes[:1],
    )
    with torch.no_grad():
        teacher = model(forced)
    torch.testing.assert_close(teacher.pred_masks[0], out.pred_masks[0], atol=1e-4, rtol=1e-4)
    assert teacher.target_is_rej[0].tolist() == [False, True]


def test_decode_rejected_gives_the_rejected_target_a_mask(rigged) -> None:
    model, _, batch = rigged
    out = generate(model, batch, max_new_tokens=12, decode_rejected=True)
    assert out.target_is_rej[0].tolist() == [False, True]
    assert out.pred_masks[0][1].abs().max() < 1e3


def test_rows_stop_at_eos_and_at_max_new_tokens(rigged) -> None:
    model, _, batch = rigged
    out = generate(model, batch, max_new_tokens=2)
    assert out.steps == 2 and [len(s) for s in out.sequences] == [2, 2]
    longer = generate(model, batch, max_new_tokens=6)
    assert len(longer.sequences[0]) == 3  # stopped at its EOS while the other row went on
    assert len(longer.sequences[1]) == 6 or longer.sequences[1][-1] == 2
