"""MMR training source and validation: question/answer/mask pairing by the same index,
templates, masks from compressed RLE, determinism and the bad-record checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from tests.utils import fixtures_refer as fx
from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.mmr import MMRSource, MMRValidation, build_mmr_source, build_mmr_sources
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
