"""The model vocabulary (`--vocabulary`): a LaSagnA-vocabulary tiny segmenter reads the data
pipeline's canonical `[SEG]`/`[REJ]` as `<ins>`/`<no_ins>` (ids, labels and decoder prompts where
LaSagnA puts them), keeps its vocabulary through a merged checkpoint, and generates `<ins>` text.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.builder import ModelConfig, build_segmenter
from model.checkpoint import read_segmenter_config, save_merged
from model.tiny import build_tiny_segmenter
from model.tokens import (
    CAT_END_TOKEN,
    CAT_START_TOKEN,
    IGNORE_INDEX,
    INS_TOKEN,
    NO_INS_TOKEN,
    SEMANTIC_TOKEN,
    vocabulary_name,
)
from tests.helpers import rig_greedy_answer
from utils.collate import SampleProcessor, collate, expand_image, template_for
from utils.conversation import DEFAULT_CONV_TYPE
from utils.datasets.base import Sample
from utils.datasets.lasagna import semantic_answer, semantic_question
from utils.inference import Segmentation, target_phrases

IMAGE_SIZE = (24, 32)
# LaSagnA's question and answer as the data pipeline writes them (canonical markers)
QUESTION = semantic_question(["wall", "sky"])
CANONICAL_ANSWER = semantic_answer([("wall", True), ("sky", False)])
LASAGNA_ANSWER = f"wall{INS_TOKEN}sky{NO_INS_TOKEN}"
PLAIN_ROUNDS = [("<image>\nWhere are the red circle and the dog?", "It is [SEG], no [REJ].")]


@pytest.fixture(scope="module")
def lasagna(tiny_dir):
    model, tokenizer = build_tiny_segmenter(tiny_dir, lora_r=0, vocabulary="lasagna")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def lisa(tiny_dir):
    model, tokenizer = build_tiny_segmenter(tiny_dir, lora_r=0)
    return model.eval(), tokenizer


def processor(model, tokenizer, tiny_dir) -> SampleProcessor:
    return SampleProcessor.for_model(model, tokenizer, str(tiny_dir / "llava_tiny"))


def sample(rounds: list[tuple[str, str]], targets: int) -> Sample:
    masks = np.zeros((targets, *IMAGE_SIZE), dtype=np.uint8)
    masks[0, 4:12, 6:20] = 1
    image = np.random.default_rng(0).integers(0, 255, (*IMAGE_SIZE, 3), dtype=np.uint8)
    return Sample(image, [rounds], masks, "wall.jpg", "lasagna_sem_seg/ade20k")


def test_the_lasagna_vocabulary_adds_lasagnas_tokens_in_its_order(lasagna) -> None:
    model, tokenizer = lasagna
    ids = model.token_ids
    first = ids.image + 1  # the tiny tokenizer holds <image>; the rest are new, in add order
    added = [CAT_START_TOKEN, CAT_END_TOKEN, SEMANTIC_TOKEN, INS_TOKEN, NO_INS_TOKEN]
    assert tokenizer.convert_tokens_to_ids(added) == list(range(first, first + 5))
    roles = (ids.seg, ids.rej, ids.im_start, ids.im_end)
    assert roles == (first + 3, first + 4, first + 5, first + 6)
    special = set(tokenizer.all_special_tokens) | {
        token.content for token in tokenizer.added_tokens_decoder.values() if token.special
    }
    assert {CAT_START_TOKEN, CAT_END_TOKEN, SEMANTIC_TOKEN} <= special
    assert not {INS_TOKEN, NO_INS_TOKEN} & special  # LaSagnA's add_tokens(INS_TOKEN): normal
    assert vocabulary_name(tokenizer, ids) == "lasagna"


def test_a_sample_is_tokenized_with_ins_and_no_ins_where_the_model_generates_them(
    lasagna, tiny_dir
) -> None:
    """The processor writes "wall[SEG]sky[REJ]" as "wall<ins>sky<no_ins>": the ids equal those of
    the hand-substituted text, and exactly the answer (with its EOS) is labelled."""
    model, tokenizer = lasagna
    assert CANONICAL_ANSWER == "wall[SEG]sky[REJ]"
    assert SEMANTIC_TOKEN in QUESTION and CAT_END_TOKEN in QUESTION
    ids = model.token_ids
    processed = processor(model, tokenizer, tiny_dir)(sample([(QUESTION, CANONICAL_ANSWER)], 2))
    input_ids, labels = processed.input_ids[0], processed.labels[0]
    template = template_for(tokenizer, DEFAULT_CONV_TYPE)
    image_tokens = int((input_ids == ids.image).sum())
    text, _ = template.render(
        expand_image([(QUESTION, LASAGNA_ANSWER)], tokenizer, ids, image_tokens)
    )
    assert input_ids.tolist() == tokenizer(text).input_ids
    answer = [*tokenizer.encode(LASAGNA_ANSWER, add_special_tokens=False), ids.eos]
    assert answer.count(ids.seg) == answer.count(ids.rej) == 1
    start = len(input_ids) - len(answer)
    assert input_ids[start:].tolist() == answer
    assert labels[start:].tolist() == answer
    assert (labels[:start] == IGNORE_INDEX).all()
    for token in (SEMANTIC_TOKEN, CAT_START_TOKEN, CAT_END_TOKEN):  # one token each
        assert input_ids.tolist().count(tokenizer.convert_tokens_to_ids(token)) == 1
    # the masks go with the <ins> / <no_ins> in order; <ins> prompts the decoder
    batch = collate([processed], ids.pad)
    with torch.no_grad():
        output = model(batch)
    assert output.target_is_rej[0].tolist() == [False, True]
    assert output.pred_masks[0].shape == (2, *IMAGE_SIZE)
    assert torch.isfinite(output.loss)


def test_the_same_answer_is_the_same_tokens_in_either_vocabulary(lasagna, lisa, tiny_dir) -> None:
    """Text without LaSagnA's markers: the lasagna ids are the lisa ids with [SEG] -> <ins>,
    [REJ] -> <no_ins> (and the other added tokens at their own ids), labels alike."""
    (model, tokenizer), (lisa_model, lisa_tokenizer) = lasagna, lisa
    ours = processor(model, tokenizer, tiny_dir)(sample(PLAIN_ROUNDS, 2))
    theirs = processor(lisa_model, lisa_tokenizer, tiny_dir)(sample(PLAIN_ROUNDS, 2))
    renamed = {"[SEG]": INS_TOKEN, "[REJ]": NO_INS_TOKEN}
    pieces = lisa_tokenizer.convert_ids_to_tokens(theirs.input_ids[0].tolist())
    expected = tokenizer.convert_tokens_to_ids([renamed.get(piece, piece) for piece in pieces])
    assert ours.input_ids[0].tolist() == expected
    assert ((ours.labels[0] == IGNORE_INDEX) == (theirs.labels[0] == IGNORE_INDEX)).all()
    assert lisa_tokenizer.convert_ids_to_tokens(lisa_model.token_ids.seg) == "[SEG]"


def test_a_merged_checkpoint_keeps_its_vocabulary_whatever_the_flag_says(
    lasagna, lisa, tmp_path, caplog
) -> None:
    model, tokenizer = lasagna
    merged = save_merged(
        model, tokenizer, tmp_path / "lasagna", source_version=tmp_path, conv_type="llava_v1"
    )
    assert read_segmenter_config(merged).vocabulary == "lasagna"
    config = ModelConfig(
        version=str(merged), vision_pretrained="", precision="fp32", lora_r=0, vocabulary="lisa"
    )
    with caplog.at_level(logging.INFO, logger="model.builder"):
        loaded, loaded_tokenizer = build_segmenter(replace(config, gradient_checkpointing=False))
    assert loaded.token_ids == model.token_ids
    assert loaded_tokenizer.convert_ids_to_tokens(loaded.token_ids.seg) == INS_TOKEN
    assert "trained with the lasagna vocabulary" in caplog.text
    lisa_model, lisa_tokenizer = lisa
    plain = save_merged(
        lisa_model, lisa_tokenizer, tmp_path / "lisa", source_version=tmp_path, conv_type="llava_v1"
    )
    assert read_segmenter_config(plain).vocabulary == "lisa"


def test_generation_decodes_to_the_vocabularys_text(tiny_dir) -> None:
    """A prompt written with the canonical markers is tokenized with LaSagnA's tokens; the
    answer decodes as "wall<ins>sky<no_ins>" with one mask and one absent target."""
    model, tokenizer = build_tiny_segmenter(tiny_dir, lora_r=0, vocabulary="lasagna")
    model.eval()  # its own: its LM head is rigged below
    images = SampleProcessor.for_model(model, tokenizer, str(tiny_dir / "llava_tiny")).images
    segmentation = Segmentation(model, tokenizer, images, DEFAULT_CONV_TYPE, "cpu", torch.float32)
    image = np.random.default_rng(1).integers(0, 255, (*IMAGE_SIZE, 3), dtype=np.uint8)
    prompt = QUESTION.removeprefix("<image>\n")
    assert tokenizer.convert_tokens_to_ids(SEMANTIC_TOKEN) in segmentation.prompt_ids(prompt)
    batch = collate([segmentation.prepare(image, prompt)], model.token_ids.pad)
    plan = [*tokenizer.encode(LASAGNA_ANSWER, add_special_tokens=False), model.token_ids.eos]
    rig_greedy_answer(model, replace(batch, labels=None, gt_masks=None), plan)
    (answer,) = segmentation.answer([(image, prompt)], max_new_tokens=len(plan))
    assert answer.text == LASAGNA_ANSWER
    assert [target.present for target in answer.targets] == [True, False]
    assert answer.targets[0].mask.shape == IMAGE_SIZE and answer.targets[1].mask is None
    assert target_phrases(answer.text) == ["wall", "sky"]
