"""MMR training source and validation: question/answer/mask pairing by the same index
("aligned") or as the released M2SA loader ("upstream"), templates, masks from compressed RLE,
determinism and the bad-record checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from tests.utils import fixtures_refer as fx
from tests.utils.test_sem_seg import assert_records_read_by_index
from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.mmr import (
    MMRQuestion,
    MMRSource,
    MMRValidation,
    build_mmr_source,
    build_mmr_sources,
    draw_question_indices,
    pair_questions,
)
from utils.datasets.templates import EXPANDED_LONG_QUESTIONS, IMAGE_PREFIX, LONG_QUESTIONS, SEG


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.tiny_dataset_dir(tmp_path_factory)


def question_index(question: str) -> int:
    (k,) = [k for k, text in enumerate(fx.MMR_QUESTIONS) if text in question]
    return k


def test_questions_answers_and_masks_share_the_index(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path)
    options = SamplingOptions(num_classes_per_sample=2, use_expand_question_list=False)
    source = build_mmr_source(tmp_path, options)
    assert source.name == "multi_part_reason_seg/MMR" and len(source) == 1
    drawn = set()
    for seed in range(10):
        sample = source.sample(np.random.default_rng(seed))
        assert len(sample.conversations) == 2
        row = 0
        indices = []
        for conversation in sample.conversations:
            ((question, answer),) = conversation
            k = question_index(question)
            indices.append(k)
            sentence = question[len(IMAGE_PREFIX) :].replace(fx.MMR_QUESTIONS[k], "{sent}")
            assert sentence in LONG_QUESTIONS
            assert answer == fx.MMR_TEXT_ANSWERS[k].replace("{seg}", SEG)
            for expected in fx.MMR_MASKS[k]:  # one mask per [SEG], in order, not merged
                assert np.array_equal(sample.masks[row], expected)
                row += 1
        assert row == len(sample.masks) == sum(c[0][1].count(SEG) for c in sample.conversations)
        assert len(set(indices)) == len(indices)  # without replacement
        drawn.update(indices)
    assert drawn == {0, 1, 2}


def test_expanded_templates_and_determinism(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path)
    source = MMRSource(tmp_path, SamplingOptions(num_classes_per_sample=5))
    templates = set()
    for seed in range(30):
        for conversation in source.sample(np.random.default_rng(seed)).conversations:
            question = conversation[0][0]
            k = question_index(question)
            templates.add(question[len(IMAGE_PREFIX) :].replace(fx.MMR_QUESTIONS[k], "{sent}"))
    assert templates <= set(EXPANDED_LONG_QUESTIONS) and templates - set(LONG_QUESTIONS)
    first, second = (source.sample(np.random.default_rng(3)) for _ in range(2))
    assert first.conversations == second.conversations
    assert np.array_equal(first.masks, second.masks)


def test_factory_for_the_mixer(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path)
    fx.write_mmr(tmp_path, "MMR_val.json")
    sources = build_mmr_sources(tmp_path, ["MMR", "MMR_val.json"], SamplingOptions())
    assert [s.data.file.name for s in sources] == ["MMR_train.json", "MMR_val.json"]
    with pytest.raises(ValueError, match="json file name under MMR/"):
        build_mmr_sources(tmp_path, ["mmr_train"], SamplingOptions())


def bad_records() -> list:
    """Index -> the one fault of that record (0 is good)."""
    mismatch = fx.mmr_record(image_id=11)
    mismatch["text_answers"][1] = "Only {seg} here"
    missing_field = fx.mmr_record(image_id=12)
    del missing_field["answers"]
    wrong_size = fx.mmr_record(image_id=13)
    wrong_size["answers"][2][1]["segmentation"] = fx.rle(np.zeros((fx.H, fx.W + 2), np.uint8))
    no_image = fx.mmr_record("val2017/000000000014.jpg", image_id=14)
    escaping = fx.mmr_record("../../../../../escape.jpg", image_id=15)
    return [fx.mmr_record(), mismatch, missing_field, wrong_size, no_image, escaping]


def test_check_reports_every_bad_record(tmp_path: Path) -> None:
    path = fx.write_mmr(tmp_path, records=bad_records())
    (tmp_path / fx.COCO_DIR / "val2017/000000000014.jpg").unlink()
    problems = [str(e) for e in MMRSource(tmp_path, SamplingOptions()).check()]
    expected = {
        "#1 (image_id 11)": "text_answers[1] has 1 {seg} but answers[1] has 2 annotations",
        "#2 (image_id 12)": "missing required field(s) ['answers']",
        "#3 (image_id 13), answers[2][1]": f"RLE size [{fx.H}, {fx.W + 2}] differs",
        "#4 (image_id 14)": "does not exist",
        "#5 (image_id 15)": "escapes the dataset root",
    }
    assert len(problems) == len(expected), problems
    for record, problem in expected.items():
        assert any(p.startswith(f"{path}, record {record}: ") and problem in p for p in problems)


def test_deep_check_decodes_images(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path)
    (tmp_path / fx.COCO_DIR / "train2017/000000000009.jpg").write_bytes(b"junk")
    source = MMRSource(tmp_path, SamplingOptions())
    assert list(source.check()) == []
    (problem,) = source.check(deep=True)
    assert "#0 (image_id 9)" in str(problem) and "not a readable image" in str(problem)


def test_sample_raises_on_seg_count_mismatch(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path, records=bad_records()[1:2])
    with pytest.raises(DataError, match=r"text_answers\[1\] has 1 \{seg\}") as error:
        MMRSource(tmp_path, SamplingOptions()).sample(np.random.default_rng(0))
    assert error.value.file.endswith("MMR_train.json") and error.value.record == "#0 (image_id 11)"


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "does not exist"), ("[", "not valid json"), ("[]", "non-empty JSON list")],
)
def test_unusable_json_raises(tmp_path: Path, content: str | None, problem: str) -> None:
    if content is not None:
        (tmp_path / "MMR").mkdir()
        (tmp_path / "MMR" / "MMR_train.json").write_text(content)
    with pytest.raises(DataError, match=problem) as error:
        MMRSource(tmp_path, SamplingOptions())
    assert error.value.file.endswith("MMR/MMR_train.json")


def test_validation_conversations(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path, "MMR_test_part_only.json")
    dataset = MMRValidation(tmp_path, "MMR_test_part_only.json", "test")
    assert len(dataset) == 1 and "MMR_test_part_only.json" in dataset.name
    sample = dataset[0]
    assert sample.conversations == [
        [
            (
                "<image>\n What holds the food? Please output segmentation mask.",
                "The [SEG] holds the food.",
            )
        ],
        [
            (
                "<image>\n Which parts carry it? Please output segmentation mask.",
                "The [SEG] and the [SEG] carry it.",
            )
        ],
        [
            (
                "<image>\n What is on the table? Please output segmentation mask.",
                "A [SEG], a [SEG] and a [SEG] are on the table.",
            )
        ],
    ]
    expected = [mask for masks in fx.MMR_MASKS for mask in masks]
    assert np.array_equal(sample.masks, np.stack(expected))
    assert sample.target_names == [f"obj{k}:part{j}" for k in range(3) for j in range(k + 1)]
    assert sample.record_id == "9" and list(dataset.check()) == []


def test_validation_json_is_a_list_of_records(tmp_path: Path) -> None:
    (tmp_path / "MMR").mkdir()
    (tmp_path / "MMR" / "MMR_val.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(DataError, match="non-empty JSON list"):
        MMRValidation(tmp_path)


def test_sample_raises_on_rle_size_mismatch(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path, records=bad_records()[3:4])
    source = MMRSource(tmp_path, SamplingOptions(num_classes_per_sample=3))
    with pytest.raises(DataError, match=r"image_id 13\), answers\[2\]\[1\]: RLE size"):
        source.sample(np.random.default_rng(0))


def test_tiny_assets_source(tiny_dataset: Path) -> None:
    source = build_mmr_source(tiny_dataset, SamplingOptions(num_classes_per_sample=3))
    assert len(source) > 0 and list(source.check(deep=True)) == []
    records = json.loads((tiny_dataset / "MMR/MMR_train.json").read_text())
    for seed in range(6):
        sample = source.sample(np.random.default_rng(seed))
        record = next(r for r in records if sample.image_path.endswith(r["file_name"]))
        row = 0
        for ((question, answer),) in sample.conversations:
            (k,) = [k for k, q in enumerate(record["questions"]) if q in question]
            assert answer == record["text_answers"][k].replace("{seg}", SEG)
            for ann in record["answers"][k]:
                expected = coco_mask.decode(
                    dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
                )
                assert np.array_equal(sample.masks[row], expected)
                row += 1
        assert row == len(sample.masks)


# A record with five questions (one with a trailing space, kept in training as upstream does),
# 1 to 3 `{seg}`s each and distinct masks.
FIVE_MASKS = [
    [fx.box(0, 2, 0, 2)],
    [fx.box(4, 6, 0, 2), fx.box(8, 10, 0, 2)],
    [fx.box(0, 2, 6, 8), fx.box(4, 6, 6, 8), fx.box(8, 10, 6, 8)],
    [fx.box(12, 14, 0, 2)],
    [fx.box(12, 14, 6, 8), fx.box(16, 18, 6, 8)],
]
FIVE_QUESTIONS = [
    "What holds the soup?",
    "Which parts carry the tray? ",
    "What is on the shelf?",
    "What keeps the door shut?",
    "Which parts touch the floor?",
]
FIVE_TEXT_ANSWERS = [
    "The {seg} holds the soup",
    "The {seg} and the {seg} carry it.",
    "A {seg}, a {seg} and a {seg} are on the shelf",
    "The {seg} keeps it shut.",
    "The {seg} and the {seg} touch the floor",
]


def five_question_record() -> dict:
    record = fx.mmr_record()
    answers = [
        [fx.mmr_ann(m, f"obj{k}:part{j}") for j, m in enumerate(masks)]
        for k, masks in enumerate(FIVE_MASKS)
    ]
    record.update(
        questions=list(FIVE_QUESTIONS),
        answers=answers,
        annotations=[a for group in answers for a in group],
        text_answers=list(FIVE_TEXT_ANSWERS),
        raw_answers=list(FIVE_TEXT_ANSWERS),
    )
    return record


def decode(ann: dict) -> np.ndarray:
    rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
    return coco_mask.decode(rle)


def upstream_conversations(record: dict, sampled_inds: list[int]) -> list[tuple]:
    """(question text, text answer, masks) per conversation, as the released loader builds them
    from `sampled_inds` (jdg900/MMR @702a7b60e993b0c8ce24f93f57ed5fc3f425b0fa,
    utils/multi_part_reason_seg_dataset.py:128-158): the sampled questions zipped with the
    answers and text answers in file order, `{seg}` filled by str.format."""
    question, gt_answer = record["questions"], record["answers"]
    sampled_sents = [question[i] for i in sampled_inds]
    conversations = []
    for text, answer_list, text_answer in zip(
        sampled_sents, gt_answer, record["text_answers"], strict=False
    ):
        masks = [decode(answer) for answer in answer_list]
        conversations.append((text, text_answer.format(seg="[SEG]"), masks))
    return conversations


def own_conversation(record: dict, k: int) -> tuple:
    """(question text, text answer, masks) of question k with its own answer."""
    answer = record["text_answers"][k].format(seg="[SEG]")
    return record["questions"][k], answer, [decode(a) for a in record["answers"][k]]


def asked(question: str, templates: tuple[str, ...]) -> int:
    """The index of the FIVE_QUESTIONS entry `question` asks, checking the long template."""
    body = question.removeprefix(IMAGE_PREFIX)
    (k,) = [k for k, text in enumerate(FIVE_QUESTIONS) if body.replace(text, "{sent}") in templates]
    return k


def drawn_conversations(source: MMRSource, seed: int) -> tuple[list[int], list[tuple]]:
    """(question index of each conversation, (question text, answer, masks) per conversation)."""
    sample = source.sample(np.random.default_rng(seed))
    indices = [asked(c[0][0], LONG_QUESTIONS) for c in sample.conversations]
    rows, got = iter(sample.masks), []
    for ((_, answer),), k in zip(sample.conversations, indices, strict=True):
        got.append((FIVE_QUESTIONS[k], answer, [next(rows) for _ in range(answer.count(SEG))]))
    assert next(rows, None) is None  # one mask per [SEG], nothing left over
    return indices, got


def assert_same_conversations(got: list[tuple], expected: list[tuple]) -> None:
    assert len(got) == len(expected)
    for (text, answer, masks), (text_e, answer_e, masks_e) in zip(got, expected, strict=True):
        assert (text, answer) == (text_e, answer_e)
        assert len(masks) == len(masks_e)
        for mask, mask_e in zip(masks, masks_e, strict=True):
            np.testing.assert_array_equal(mask, mask_e)


def test_upstream_pairing_reproduces_the_released_loader(tmp_path: Path) -> None:
    record = five_question_record()
    fx.write_mmr(tmp_path, records=[record])
    options = SamplingOptions(
        num_classes_per_sample=3, use_expand_question_list=False, mmr_pairing="upstream"
    )
    source = MMRSource(tmp_path, options)
    asked_questions, misaligned = set(), 0
    for seed in range(40):
        sampled_inds, got = drawn_conversations(source, seed)
        assert len(sampled_inds) == len(set(sampled_inds)) == 3  # sampled without replacement
        assert_same_conversations(got, upstream_conversations(record, sampled_inds))
        # the answers are always text_answers[0..2]: 3 and 4 are never trained
        assert [answer for _, answer, _ in got] == [
            FIVE_TEXT_ANSWERS[k].replace("{seg}", SEG) for k in range(3)
        ]
        asked_questions.update(sampled_inds)
        misaligned += sum(i != k for k, i in enumerate(sampled_inds))
    assert asked_questions == set(range(5))
    assert misaligned > 40  # about 3 * 4/5 per draw; "aligned" would give none


def test_aligned_pairing_keeps_each_question_with_its_answer(tmp_path: Path) -> None:
    record = five_question_record()
    fx.write_mmr(tmp_path, records=[record])
    options = SamplingOptions(num_classes_per_sample=3, use_expand_question_list=False)
    source = MMRSource(tmp_path, options)
    trained_answers = set()
    for seed in range(40):
        sampled_inds, got = drawn_conversations(source, seed)
        assert len(sampled_inds) == len(set(sampled_inds)) == 3
        assert_same_conversations(got, [own_conversation(record, i) for i in sampled_inds])
        trained_answers.update(sampled_inds)
    assert trained_answers == set(range(5))


@pytest.mark.parametrize("pairing", ["aligned", "upstream"])
def test_fewer_questions_than_per_sample_are_all_used_in_file_order(
    tmp_path: Path, pairing: str
) -> None:
    record = five_question_record()
    for key in ("questions", "answers", "text_answers"):
        record[key] = record[key][:2]
    fx.write_mmr(tmp_path, records=[record])
    options = SamplingOptions(
        num_classes_per_sample=3, use_expand_question_list=False, mmr_pairing=pairing
    )
    source = MMRSource(tmp_path, options)
    for seed in range(5):
        sampled_inds, got = drawn_conversations(source, seed)
        assert sampled_inds == [0, 1]
        assert_same_conversations(got, upstream_conversations(record, [0, 1]))
        assert got[1][0].endswith("tray? ")  # the question text as written, not stripped


def test_question_draws_and_pairings_directly() -> None:
    rng = np.random.default_rng(0)
    assert draw_question_indices(2, 3, rng) == [0, 1]
    drawn = draw_question_indices(5, 3, rng)
    assert len(set(drawn)) == 3 and set(drawn) <= set(range(5))
    parsed = [MMRQuestion(k, f"q{k}", f"answer {k}", ()) for k in range(4)]
    drawn = [3, 0, 2]
    aligned = pair_questions(parsed, drawn, "aligned")
    upstream = pair_questions(parsed, drawn, "upstream")
    assert [(text, q.index) for text, q in aligned] == [("q3", 3), ("q0", 0), ("q2", 2)]
    assert [(text, q.index) for text, q in upstream] == [("q3", 0), ("q0", 1), ("q2", 2)]
    with pytest.raises(ValueError, match="--mmr_pairing must be one of"):
        SamplingOptions(mmr_pairing="legacy")  # the options refuse it before any source reads it


def test_unknown_pairing_is_refused(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path)
    with pytest.raises(ValueError, match=r"--mmr_pairing must be one of \('aligned', 'upstream'\)"):
        MMRSource(tmp_path, SamplingOptions(mmr_pairing="legacy"))


def test_validation_strips_the_question(tmp_path: Path) -> None:
    """MMR utils/dataset.py:500 (`sampled_sents[i].strip()`); training keeps it as written."""
    fx.write_mmr(tmp_path, "MMR_val.json", records=[five_question_record()])
    conversations = MMRValidation(tmp_path)[0].conversations
    assert conversations[1] == [
        (
            "<image>\n Which parts carry the tray? Please output segmentation mask.",
            "The [SEG] and the [SEG] carry it.",
        )
    ]


@pytest.mark.parametrize("pairing", ["aligned", "upstream"])
def test_sample_at_reads_record(assets: Path, pairing: str) -> None:
    """Record i: the json's record i (its image under the COCO folder)."""
    root = assets / "dataset"
    records = json.loads((root / "MMR/MMR_train.json").read_text())
    options = SamplingOptions(num_classes_per_sample=2, mmr_pairing=pairing)
    (source,) = build_mmr_sources(root, ["MMR_train.json"], options)
    images = root / "refer_seg/images/mscoco/images"
    assert_records_read_by_index(source, [images / record["file_name"] for record in records])
