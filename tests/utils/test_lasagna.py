"""LaSagnA's sequence format (utils/datasets/lasagna.py): the strings as LaSagnA spells them,
the answer round trip, the random class list's branches, the question list per family, the
training targets of a hand-built label map, and the parser against LaSagnA's own."""

from __future__ import annotations

import re

import numpy as np
import pytest

from model.tokens import VOCABULARIES
from utils.datasets.base import IGNORE_LABEL
from utils.datasets.lasagna import (
    ANSWER_LEAD_INS,
    DEFAULT_NUM_ALL_CLASSES,
    MANY_POSITIVES_DRAWN,
    MANY_POSITIVES_NEGATIVES,
    SEMANTIC_QUESTIONS,
    get_sample_classes,
    lasagna_name,
    lasagna_sample,
    parse_semantic_answer,
    question_classes,
    semantic_answer,
    semantic_question,
    semantic_targets,
)
from utils.datasets.sem_seg import LabelMap

# LaSagnA utils/utils.py SEG_INPUT_LIST (congvvc/LaSagnA @897cbbe), each entry written out
LASAGNA_SEG_INPUT_LIST = [
    "<image>\n<semantic>Segment this image.<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>Please segment this image.<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>Can you segment this image?<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please respond with segmentation mask."
    "<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please output segmentation mask."
    "<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please give segmentation result."
    "<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please visualize segmentation mask."
    "<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please respond with segmentation result."
    "<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please output segmentation result."
    "<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>Segment all the objects in this image.<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>Please segment all the objects in this image."
    "<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>Can you segment all the objects in this image?"
    "<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please respond with segmentation mask of all "
    "the objects.<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please output segmentation mask of all the "
    "objects.<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please give segmentation result of all the "
    "objects.<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please visualize segmentation mask of all the "
    "objects.<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please respond with segmentation result of all "
    "the objects.<cat_start> {all_class} <cat_end>",
    "<image>\n<semantic>What are in this image? Please output segmentation result of all the "
    "objects.<cat_start> {all_class} <cat_end>",
]
# LaSagnA test_sem.py get_class_name's SEG_ANSWER_LIST
LASAGNA_TEST_LEAD_INS = [
    "The segmentation results are ",
    "The segmentations are ",
    "Sure, the results are ",
    "Sure, the segmentation results are ",
    "Sure, the segmentations are ",
    "The results are ",
    "Sure, ",
]
VOCABULARY = [f"class {i}" for i in range(150)]


def lasagna_spelling(answer: str) -> str:
    """A canonical answer as the lasagna vocabulary writes it (`[SEG]` -> `<ins>`, `[REJ]` ->
    `<no_ins>`)."""
    return answer.replace("[SEG]", "<ins>").replace("[REJ]", "<no_ins>")


def lasagna_get_class_name(text: str) -> list[str]:
    """LaSagnA test_sem.py get_class_name, transcribed (the oracle for present names)."""
    for lead_in in LASAGNA_TEST_LEAD_INS:
        text = text.replace(lead_in, "")
    text = text.replace("\n", "").replace("  ", " ")
    match = re.search(r"ASSISTANT:(.+)", text)
    answer = match.group(1).strip() if match else ""
    answer = answer.replace("</s>", "").replace(".", "")
    names = re.findall(r"([^\<\>]+)(?=\s*\<ins\>)", answer)
    return [name.replace(" ", "") for name in names]


def test_strings_are_lasagnas() -> None:
    assert list(SEMANTIC_QUESTIONS) == LASAGNA_SEG_INPUT_LIST
    vocabulary = VOCABULARIES["lasagna"]  # LaSagnA utils/utils.py, in its add order
    assert vocabulary.tokens == ("<cat_start>", "<cat_end>", "<semantic>", "<ins>", "<no_ins>")
    assert list(ANSWER_LEAD_INS) == LASAGNA_TEST_LEAD_INS
    assert DEFAULT_NUM_ALL_CLASSES == 80
    assert (MANY_POSITIVES_DRAWN, MANY_POSITIVES_NEGATIVES) == (40, 20)


def test_question_lists_the_names_lower_cased_with_the_first_template() -> None:
    assert semantic_question(["Wall", "traffic light", "sky"]) == (
        "<image>\n<semantic>Segment this image.<cat_start> wall, traffic light, sky <cat_end>"
    )


def test_answer_round_trip() -> None:
    items = [("Wall", True), ("sky", False), ("traffic light", True), ("person", False)]
    answer = semantic_answer(items)
    assert answer == "wall[SEG]sky[REJ]traffic light[SEG]person[REJ]"  # the canonical markers
    expected = [(name.lower(), present) for name, present in items]
    assert parse_semantic_answer(answer) == expected
    lasagna = "wall<ins>sky<no_ins>traffic light<ins>person<no_ins>"
    assert lasagna_spelling(answer) == lasagna and parse_semantic_answer(lasagna) == expected
    for text in (answer, lasagna):
        generated = f"A chat. USER: <image> hi ASSISTANT: Sure, the results are {text}.</s>"
        assert parse_semantic_answer(generated) == expected


def test_parser_keeps_spaces_and_one_entry_per_token() -> None:
    text = (
        "ASSISTANT: The segmentation results are traffic   light <ins> <ins>sky<no_ins>\nroad<ins>"
    )
    assert parse_semantic_answer(text) == [
        ("traffic light", True),
        ("", True),  # a token without a name keeps its place: the k-th <ins> is the k-th mask
        ("sky", False),
        ("road", True),
    ]
    present = [lasagna_name(name) for name, is_present in parse_semantic_answer(text) if is_present]
    assert present == lasagna_get_class_name(text) == ["trafficlight", "", "road"]
    # with no character between two <ins>, LaSagnA's regex loses the second name's place
    assert lasagna_get_class_name("ASSISTANT: a<ins><ins>") == ["a"]
    assert parse_semantic_answer("ASSISTANT: a<ins><ins>") == [("a", True), ("", True)]


@pytest.mark.parametrize("seed", range(5))
def test_present_names_match_lasagnas_parser_after_its_space_removal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = ["wall", "traffic light", "chest of drawers", "sky", "pool table", "road"]
    items = [(names[i], bool(rng.integers(2))) for i in rng.permutation(len(names))]
    lead_in = LASAGNA_TEST_LEAD_INS[int(rng.integers(len(LASAGNA_TEST_LEAD_INS)))]
    text = f"USER: q ASSISTANT: {lead_in}{lasagna_spelling(semantic_answer(items))}</s>"
    ours = [lasagna_name(name) for name, present in parse_semantic_answer(text) if present]
    assert ours == lasagna_get_class_name(text)


def test_small_vocabulary_uses_every_class() -> None:
    vocabulary = VOCABULARY[:19]
    positives = [vocabulary[3], vocabulary[7]]
    draw = get_sample_classes(vocabulary, positives, 80, np.random.default_rng(0))
    assert sorted(draw.classes) == sorted(vocabulary)
    assert draw.positives == positives
    assert draw.negatives == [name for name in vocabulary if name not in positives]


def test_list_of_num_all_classes_holds_every_positive_and_distinct_negatives() -> None:
    positives = [VOCABULARY[i] for i in (0, 5, 149)]
    for seed in range(3):
        draw = get_sample_classes(VOCABULARY, positives, 80, np.random.default_rng(seed))
        assert len(draw.classes) == 80 and len(set(draw.classes)) == 80
        assert set(positives) <= set(draw.classes)
        assert len(draw.negatives) == 77 and not set(draw.negatives) & set(positives)


def test_many_positives_draw_40_and_20() -> None:
    positives = VOCABULARY[:100]
    draw = get_sample_classes(VOCABULARY, positives, 80, np.random.default_rng(1))
    assert len(draw.positives) == 40 and set(draw.positives) <= set(positives)
    assert len(draw.negatives) == 20 and set(draw.negatives) <= set(VOCABULARY[100:])
    assert sorted(draw.classes) == sorted(draw.positives + draw.negatives)


def test_draw_is_seeded_and_the_answer_order_shuffled() -> None:
    positives = VOCABULARY[:3]

    def draw(seed: int) -> list[str]:
        return get_sample_classes(VOCABULARY, positives, 10, np.random.default_rng(seed)).classes

    assert draw(4) == draw(4)
    orders = {tuple(draw(seed)) for seed in range(6)}
    assert len(orders) == 6
    # positives are not always first: the list is shuffled after drawing
    assert any(set(order[:3]) != set(positives) for order in orders)


def test_question_lists_the_vocabulary_or_the_drawn_classes() -> None:
    vocabulary = VOCABULARY[:30]
    rng = np.random.default_rng(2)
    draw = get_sample_classes(vocabulary, vocabulary[:2], 10, rng)
    closed = question_classes("ade20k", vocabulary, draw, rng)
    assert sorted(closed) == sorted(vocabulary) and closed != vocabulary
    opened = question_classes("openimage", vocabulary, draw, rng)
    assert sorted(opened) == sorted(draw.classes)


def test_targets_of_a_label_map_in_answer_order() -> None:
    vocabulary = ["wall", "sky", "person", "road"]
    # stored values 1 and 5 both mean "wall" (class 0), 3 means "person", 0 is ignored
    raw = np.array([[1, 5, 0], [3, 3, 1]], dtype=np.uint8)
    label = LabelMap(raw, np.array([0, 1, 3, 5]), np.array([IGNORE_LABEL, 0, 2, 0]))
    sample = semantic_targets("ade20k", vocabulary, label, np.random.default_rng(3))
    assert sorted(t.name for t in sample.targets) == sorted(vocabulary)
    masks = {t.name: t.mask for t in sample.targets}
    np.testing.assert_array_equal(masks["wall"], [[1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(masks["person"], [[0, 0, 0], [1, 1, 0]])
    assert masks["sky"] is None and masks["road"] is None
    assert masks["wall"].dtype == np.uint8
    items = [(t.name, t.mask is not None) for t in sample.targets]
    assert sample.answer == semantic_answer(items)
    assert parse_semantic_answer(sample.answer) == items
    asked = sample.question.split("<cat_start> ", 1)[1].removesuffix(" <cat_end>")
    assert sorted(asked.split(", ")) == sorted(vocabulary)
    assert sample.question in [q.format(all_class=asked) for q in LASAGNA_SEG_INPUT_LIST]


def test_sample_masks_are_one_per_item_in_answer_order() -> None:
    vocabulary = ["wall", "sky", "person", "road"]
    raw = np.array([[1, 5, 0], [3, 3, 1]], dtype=np.uint8)
    label = LabelMap(raw, np.array([0, 1, 3, 5]), np.array([IGNORE_LABEL, 0, 2, 0]))
    drawn = semantic_targets("ade20k", vocabulary, label, np.random.default_rng(7), 80, "exclude")
    image = np.zeros((2, 3, 3), np.uint8)
    sample = lasagna_sample(image, drawn, "x.jpg", "sem_seg/ade20k")
    assert sample.conversations == [[(drawn.question, drawn.answer)]]
    items = parse_semantic_answer(drawn.answer)
    assert [t.name for t in drawn.targets] == [name for name, _ in items]
    assert drawn.answer.count("[SEG]") == 2 and drawn.answer.count("[REJ]") == 2
    assert len(sample.masks) == len(items) == 4  # one row per [SEG] / [REJ], in answer order
    expected = {  # "exclude": the ignored pixel (value 0) is IGNORE_LABEL in every class mask
        "wall": [[1, 1, IGNORE_LABEL], [0, 0, 1]],
        "person": [[0, 0, IGNORE_LABEL], [1, 1, 0]],
        "sky": [[0, 0, 0], [0, 0, 0]],  # absent ([REJ]): an all-zero row
        "road": [[0, 0, 0], [0, 0, 0]],
    }
    for (name, present), mask in zip(items, sample.masks, strict=True):
        assert present == (name in ("wall", "person"))
        np.testing.assert_array_equal(mask, expected[name])
    assert sample.masks.dtype == np.uint8
    unlabelled = LabelMap(np.zeros((2, 3), np.uint8), np.array([0]), np.array([IGNORE_LABEL]))
    absent = semantic_targets("ade20k", vocabulary, unlabelled, np.random.default_rng(0))
    assert "[SEG]" not in absent.answer and absent.answer.count("[REJ]") == 4
    rows = lasagna_sample(image, absent, "x.jpg", "sem_seg/ade20k").masks
    assert rows.shape == (4, 2, 3) and not rows.any()


def test_too_few_negatives_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot draw 20 distinct classes from 5"):
        get_sample_classes(VOCABULARY[:85], VOCABULARY[:80], 80, np.random.default_rng(0))
