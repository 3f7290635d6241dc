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
    IMAGE_TOKEN,
    INS_TOKEN,
    NO_INS_TOKEN,
    REJ_TOKEN,
    SEG_TOKEN,
    SEMANTIC_TOKEN,
    _single_id,
    add_segmentation_tokens,
    predictor_mask,
    vocabulary_name,
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


def test_the_lasagna_vocabulary_strips_whitespace_as_the_lisa_family_did() -> None:
    """With LISA-family tokenization every LaSagnA token swallows the whitespace around it,
    as transformers 4.31's slow tokenizer did for `<ins>` as for `[SEG]`."""
    tokenizer = build_tiny_tokenizer()
    ids = add_segmentation_tokens(tokenizer, True, strip_whitespace=True, vocabulary="lasagna")
    semantic = tokenizer.convert_tokens_to_ids(SEMANTIC_TOKEN)
    spaced = tokenizer.encode(
        f"{IM_END_TOKEN}\n {SEMANTIC_TOKEN} ASSISTANT: {INS_TOKEN} {NO_INS_TOKEN}",
        add_special_tokens=False,
    )
    glued = f"{IM_END_TOKEN}{SEMANTIC_TOKEN}ASSISTANT:{INS_TOKEN}{NO_INS_TOKEN}"
    assert spaced == tokenizer.encode(glued, add_special_tokens=False)
    assert spaced[:2] == [ids.im_end, semantic] and spaced[-2:] == [ids.seg, ids.rej]
    assert tokenizer.decode(spaced[2:-2]) == "ASSISTANT:"
    assert tokenizer.convert_ids_to_tokens([ids.seg, ids.rej]) == [INS_TOKEN, NO_INS_TOKEN]
    assert vocabulary_name(tokenizer, ids) == "lasagna"
    assert SEG_TOKEN not in tokenizer.get_vocab() and REJ_TOKEN not in tokenizer.get_vocab()


def test_the_chain_token_works_with_either_vocabulary_and_never_doubles_a_role() -> None:
    for vocabulary in ("lisa", "lasagna"):
        tokenizer = build_tiny_tokenizer()
        ids = add_segmentation_tokens(
            tokenizer, True, chain_token="[SEG_SEMA]", vocabulary=vocabulary
        )
        assert (
            ids.chain == ids.rej + 1 and tokenizer.convert_ids_to_tokens(ids.chain) == "[SEG_SEMA]"
        )
    for token in (INS_TOKEN, SEMANTIC_TOKEN):
        with pytest.raises(ValueError, match=f"--chain_token '{token}': expected"):
            add_segmentation_tokens(
                build_tiny_tokenizer(), True, chain_token=token, vocabulary="lasagna"
            )
    with pytest.raises(ValueError, match=r"--vocabulary must be one of \['lasagna', 'lisa'\]"):
        add_segmentation_tokens(build_tiny_tokenizer(), True, vocabulary="LaSagnA")


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


# --- the tiny tokenizer's two files: tokenizer.model (sentencepiece) and tokenizer.json ---

SHAPES_WORLD_NAMES = ("red circle", "blue house", "green car's left wheel", "yellow tree")
SHAPES_WORLD_SENTENCE = "the roof of the purple house to the left of the black star"


def template_texts() -> list[str]:
    """Every template string of tests/utils/reference_templates.py, its placeholders filled
    with shapes-world names ({class_name}, {sent}, {seg} as the code writes [SEG])."""
    from tests.utils import reference_templates

    templates = [
        text
        for name in dir(reference_templates)
        if name.isupper() and isinstance(value := getattr(reference_templates, name), (list, tuple))
        for text in value
        if isinstance(text, str)
    ]
    assert len(templates) > 20, "the reference template lists were not found"
    return [
        text.replace("{class_name}", name)
        .replace("{sent}", SHAPES_WORLD_SENTENCE)
        .replace("{seg}", SEG_TOKEN)
        for text in templates
        for name in SHAPES_WORLD_NAMES
    ]


def conversation_prompts() -> list[str]:
    """Whole llava_v1 conversations (system text, roles, </s>) around the template texts."""
    from utils.conversation import render_conversation

    texts = template_texts()
    return [
        render_conversation([(question, answer)])[0]
        for question, answer in zip(texts, reversed(texts), strict=True)
    ]


@pytest.fixture(scope="module")
def tokenizer_files(tiny_dir, tmp_path_factory) -> dict:
    """The tiny LLaVA's tokenizer read three ways: `tokenizer.json` (fast), `tokenizer.model`
    alone converted by transformers (as a LLaVA-v1 directory without tokenizer.json is read),
    and the `sentencepiece` processor itself."""
    import shutil

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    directory = tiny_model_config(tiny_dir).version
    model_only = tmp_path_factory.mktemp("sentencepiece_only")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(f"{directory}/{name}", model_only / name)
    return {
        "json": load_tokenizer(directory),
        "model": LlamaTokenizer.from_pretrained(model_only, padding_side="right"),
        "sentencepiece": spm.SentencePieceProcessor(model_file=f"{directory}/tokenizer.model"),
    }


def test_sentencepiece_model_and_tokenizer_json_give_the_same_ids(tokenizer_files) -> None:
    fast, converted, processor = (tokenizer_files[k] for k in ("json", "model", "sentencepiece"))
    assert len(converted) == processor.get_piece_size() == len(fast) - 1  # <image> added
    specials = (processor.unk_id(), processor.bos_id(), processor.eos_id())
    assert specials == (0, 1, 2) == (fast.unk_token_id, fast.bos_token_id, fast.eos_token_id)
    for text in template_texts():
        plain = text.replace(IMAGE_TOKEN, "")  # sentencepiece alone has no added tokens
        expected = processor.encode(plain)
        assert fast.encode(plain, add_special_tokens=False) == expected, plain
        assert converted.encode(plain, add_special_tokens=False) == expected, plain
        assert fast.encode(plain)[0] == converted.encode(plain)[0] == processor.bos_id()
        assert fast.decode(expected) == processor.decode(expected) == plain


def test_both_files_add_and_split_the_segmentation_tokens_alike(tokenizer_files) -> None:
    fast, converted = tokenizer_files["json"], tokenizer_files["model"]
    converted.add_tokens([IMAGE_TOKEN], special_tokens=True)  # as write_tiny_llava's file has it
    for text in conversation_prompts():  # with <image> and </s>, which sentencepiece lacks
        assert fast.encode(text) == converted.encode(text), text
    ids = [add_segmentation_tokens(t, use_mm_start_end=True) for t in (fast, converted)]
    assert ids[0] == ids[1]
    for text in conversation_prompts():
        with_tokens = text.replace(SEG_TOKEN, f"{SEG_TOKEN} or {REJ_TOKEN}")
        encoded = fast.encode(with_tokens)
        assert encoded == converted.encode(with_tokens), with_tokens
        assert encoded.count(ids[0].seg) == encoded.count(ids[0].rej) == text.count(SEG_TOKEN)
        assert encoded.count(ids[0].image) == text.count(IMAGE_TOKEN)
