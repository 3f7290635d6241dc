"""Special tokens: single ids, loud failures, predictor positions, mean-initialised rows."""

from __future__ import annotations

import pytest
import torch

from model.backbone import (
    init_new_rows_normal,
    init_new_token_rows,
    load_llava,
    load_tokenizer,
    parse_token_init,
    resize_embeddings_to_mean,
)
from model.tiny import build_tiny_tokenizer, tiny_model_config
from model.tokens import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    REJ_TOKEN,
    SEG_TOKEN,
    _single_id,
    add_segmentation_tokens,
    predictor_mask,
)


def test_added_tokens_encode_to_one_id_each() -> None:
    tokenizer = build_tiny_tokenizer()
    size = len(tokenizer)
    ids = add_segmentation_tokens(tokenizer, use_mm_start_end=True)
    assert {ids.seg, ids.rej, ids.im_start, ids.im_end} == set(range(size, size + 4))
    encoded = tokenizer.encode("Sure, it is [SEG]. The dog is [REJ].", add_special_tokens=False)
    assert encoded.count(ids.seg) == 1 and encoded.count(ids.rej) == 1
    assert tokenizer.convert_ids_to_tokens(ids.im_start) == IM_START_TOKEN
    assert tokenizer.convert_ids_to_tokens(ids.im_end) == IM_END_TOKEN
    assert ids.pad == tokenizer.unk_token_id == 0 and tokenizer.padding_side == "right"


def test_without_mm_start_end_no_wrapping_tokens() -> None:
    tokenizer = build_tiny_tokenizer()
    ids = add_segmentation_tokens(tokenizer, use_mm_start_end=False)
    assert ids.im_start is None and ids.im_end is None
    assert IM_START_TOKEN not in tokenizer.get_vocab()


def test_token_that_splits_or_is_unknown_fails_loudly() -> None:
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match=r"'\[NOPE\]' must encode to exactly one id"):
        _single_id(tokenizer, "[NOPE]")
    # a word-internal vocabulary piece: it has an id, but encoding it on its own prepends the
    # word marker and splits it (the LLaMA "▁" pitfall of tokenizer("[SEG]").input_ids[0])
    piece = "ouse"
    assert piece in tokenizer.get_vocab() and "\u2581" + piece not in tokenizer.get_vocab()
    with pytest.raises(ValueError, match="must encode to exactly one id"):
        _single_id(tokenizer, piece)


def test_predictor_mask_marks_the_position_before_each_target() -> None:
    seg = 7
    input_ids = torch.tensor([[1, 5, seg, 3, seg], [seg, 2, 2, 2, 2]])
    mask = predictor_mask(input_ids, seg)
    assert mask.tolist() == [
        [False, True, False, True, False],
        [False, False, False, False, False],
    ]


def test_new_embedding_rows_start_at_the_mean(tiny_dir) -> None:
    config = tiny_model_config(tiny_dir)
    llava = load_llava(config.version, torch.float32)
    tokenizer = load_tokenizer(config.version)
    old = llava.get_input_embeddings().weight.detach().clone()
    old_head = llava.lm_head.weight.detach().clone()
    add_segmentation_tokens(tokenizer, use_mm_start_end=True)
    resize_embeddings_to_mean(llava, len(tokenizer))
    new = llava.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 4 == len(tokenizer)
    torch.testing.assert_close(new[: old.shape[0]], old)
    for row in range(old.shape[0], new.shape[0]):
        torch.testing.assert_close(new[row], old.mean(0))
        torch.testing.assert_close(llava.lm_head.weight[row], old_head.mean(0))
    assert llava.config.text_config.vocab_size == len(tokenizer)
    assert SEG_TOKEN in tokenizer.get_vocab()


def test_new_rows_normal_draw_as_transformers_4_31(tiny_dir) -> None:
    """`--new_token_rows normal`: the rows this run adds are N(0, initializer_range) draws in
    both matrices (what resize_token_embeddings' _init_weights gave LISA, GSVA and MMR), the
    old rows untouched; with a seeded generator, exactly the draws of that generator."""
    config = tiny_model_config(tiny_dir)
    llava = load_llava(config.version, torch.float32)
    tokenizer = load_tokenizer(config.version)
    first_new = len(tokenizer)
    old = llava.get_input_embeddings().weight.detach().clone()
    add_segmentation_tokens(tokenizer, use_mm_start_end=True)
    resize_embeddings_to_mean(llava, len(tokenizer))
    init_new_rows_normal(llava, first_new, torch.Generator().manual_seed(3))
    std = llava.config.text_config.initializer_range
    expected = torch.Generator().manual_seed(3)
    for matrix in (llava.get_input_embeddings().weight, llava.lm_head.weight):
        rows = matrix[first_new:]
        draw = torch.empty(rows.shape).normal_(0.0, std, generator=expected)
        torch.testing.assert_close(rows, draw)
    torch.testing.assert_close(llava.get_input_embeddings().weight[:first_new], old)
    assert std == 0.02  # LLaMA's initializer_range, as in the LLaVA-v1 configs


def test_new_token_rows_can_start_as_a_words_first_token(tiny_dir) -> None:
    config = tiny_model_config(tiny_dir)
    llava = load_llava(config.version, torch.float32)
    tokenizer = load_tokenizer(config.version)
    first_new = len(tokenizer)
    yes, no = (tokenizer.encode(word, add_special_tokens=False)[0] for word in ("yes", "no"))
    ids = add_segmentation_tokens(tokenizer, use_mm_start_end=True)
    resize_embeddings_to_mean(llava, len(tokenizer))
    mean_row = llava.lm_head.weight[ids.im_start].detach().clone()
    init_new_token_rows(llava, tokenizer, parse_token_init("[SEG]=yes, [REJ]=no"), first_new)
    for matrix in (llava.get_input_embeddings().weight, llava.lm_head.weight):
        torch.testing.assert_close(matrix[ids.seg], matrix[yes])
        torch.testing.assert_close(matrix[ids.rej], matrix[no])
    assert not torch.equal(llava.lm_head.weight[ids.seg], llava.lm_head.weight[ids.rej])
    torch.testing.assert_close(llava.lm_head.weight[ids.im_start], mean_row)  # not named: mean


def test_new_token_init_refuses_old_tokens_unknown_words_and_bad_items(tiny_dir) -> None:
    config = tiny_model_config(tiny_dir)
    llava = load_llava(config.version, torch.float32)
    tokenizer = load_tokenizer(config.version)
    add_segmentation_tokens(tokenizer, use_mm_start_end=False)
    resize_embeddings_to_mean(llava, len(tokenizer))
    with pytest.raises(ValueError, match=r"'\[SEG\]', which is not a token this run adds"):
        init_new_token_rows(llava, tokenizer, {SEG_TOKEN: "yes"}, len(tokenizer))
    with pytest.raises(ValueError, match="does not encode to a token of the original"):
        init_new_token_rows(llava, tokenizer, {REJ_TOKEN: "[SEG]"}, len(tokenizer) - 2)
    with pytest.raises(ValueError, match="must read TOKEN=WORD"):
        parse_token_init("[SEG]:yes")
    assert parse_token_init("") == {}
