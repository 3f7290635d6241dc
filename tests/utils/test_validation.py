"""`--val_dataset` parsing and the refCOCO, gRefCOCO, MMR and RefCOCOm validation sets: exact
prompts, masks, target names, paths under refer_seg/ and the bad-record checks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.utils import fixtures_refer as fx
from utils.datasets.base import DataError
from utils.datasets.validation import ValEntry, build_validation_set, parse_val_datasets

ACCEPTED = {
    "ReasonSeg|val": ("ReasonSeg", "", "val"),
    "ReasonSeg|test": ("ReasonSeg", "", "test"),
    "refcoco|unc|val": ("refcoco", "unc", "val"),
    "refcoco|unc|testA": ("refcoco", "unc", "testA"),
    "refcoco+|unc|testB": ("refcoco+", "unc", "testB"),
    "refcocog|umd|test": ("refcocog", "umd", "test"),
    "refclef|unc|val": ("refclef", "unc", "val"),
    "grefcoco|unc|val": ("grefcoco", "unc", "val"),
    "grefcoco|unc|testA": ("grefcoco", "unc", "testA"),
    "grefcoco|unc|testB": ("grefcoco", "unc", "testB"),
    "MultiPartReasonSeg|val": ("MultiPartReasonSeg", "", "val"),
    "MultiPartReasonSeg|test": ("MultiPartReasonSeg", "", "test"),
    "RefCOCOm|val": ("RefCOCOm", "", "val"),
    "RefCOCOm|testA": ("RefCOCOm", "", "testA"),
    "RefCOCOm|testB": ("RefCOCOm", "", "testB"),
}


@pytest.mark.parametrize("text", list(ACCEPTED))
def test_parse_accepted_forms(text: str) -> None:
    (entry,) = parse_val_datasets(text)
    assert entry == ValEntry(*ACCEPTED[text]) and str(entry) == text


def test_parse_joined_entries() -> None:
    assert parse_val_datasets("ReasonSeg|val||grefcoco|unc|testA") == [
        ValEntry("ReasonSeg", "", "val"),
        ValEntry("grefcoco", "unc", "testA"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "refcoco|val",
        "refcoco|umd|val",
        "refcoco|unc|train",
        "Foo|val",
        "MultiPartReasonSeg|x",
        "grefcoco|unc|val|extra",
        "RefCOCOm|unc|val",
        "ReasonSeg|",
    ],
)
def test_parse_rejects_with_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="accepted: ReasonSeg.*refcocog\\|<umd\\|google>"):
        parse_val_datasets(text)


def test_refcoco_validation_per_image_per_sentence(tmp_path: Path) -> None:
    fx.write_refer(tmp_path)
    (entry,) = parse_val_datasets("refcoco|unc|val")
    dataset = build_validation_set(tmp_path, entry)
    assert dataset.name == "refcoco|unc|val" and len(dataset) == 1
    sample = dataset[0]
    assert sample.conversations == [
        [("<image>\n What is val thing in this image? Please output segmentation mask.", "[SEG].")],
        [
            (
                "<image>\n What is the val object in this image? Please output segmentation mask.",
                "[SEG].",
            )
        ],
    ]
    assert np.array_equal(sample.masks, np.stack([fx.ANN_MASKS[31]] * 2))
    assert sample.target_names == ["val thing", "the val object"] and sample.record_id == "3"
    assert "refer_seg/images/mscoco/images/train2014/" in sample.image_path
    assert sample.source == "refer_seg/refcoco" and list(dataset.check()) == []
    test_b = build_validation_set(tmp_path, ValEntry("refcoco", "unc", "testB"))[0]
    assert np.array_equal(test_b.masks[0], fx.ANN_MASKS[21])  # two polygons


def test_missing_split_lists_the_splits(tmp_path: Path) -> None:
    fx.write_refer(tmp_path, "refcocog", refs_name="refs(umd).p")
    with pytest.raises(DataError, match="no refs in split 'bogus'.*'testA'"):
        build_validation_set(tmp_path, ValEntry("refcocog", "umd", "bogus"))


def test_grefcoco_validation_gsva_protocol(tmp_path: Path) -> None:
    fx.write_refer(tmp_path, "grefcoco", fx.grefcoco_refs(), "grefs(unc).json")
    dataset = build_validation_set(tmp_path, ValEntry("grefcoco", "unc", "val"))
    sample = dataset[0]
    assert sample.conversations == [
        [
            (
                "<image>\n What are val thing, nothing here in this image? "
                "Please output segmentation masks.",
                "Sure, val thing:[SEG], nothing here:[REJ].",
            )
        ]
    ]
    assert np.array_equal(sample.masks, np.stack([fx.ANN_MASKS[31], np.zeros((fx.H, fx.W))]))
    assert sample.target_names == ["val thing", "nothing here"]


def test_grefcoco_validation_union_of_instances(tmp_path: Path) -> None:
    refs = [dict(r, split="val") for r in fx.grefcoco_refs()[:2]]
    fx.write_refer(tmp_path, "grefcoco", refs, "grefs(unc).p")
    sample = build_validation_set(tmp_path, ValEntry("grefcoco", "unc", "val"))[0]
    union = fx.ANN_MASKS[11] | fx.ANN_MASKS[12]
    assert np.array_equal(sample.masks, np.stack([union, np.zeros_like(union)]))


def test_mmr_validation_json_choice(tmp_path: Path) -> None:
    fx.write_mmr(tmp_path, "MMR_val.json")
    fx.write_mmr(tmp_path, "MMR_test_obj_only.json", [fx.mmr_record(), fx.mmr_record()])
    (entry,) = parse_val_datasets("MultiPartReasonSeg|val")
    assert len(build_validation_set(tmp_path, entry)) == 1
    dataset = build_validation_set(tmp_path, entry, "MMR_test_obj_only.json")
    assert len(dataset) == 2 and dataset[1].conversations[0][0][1] == "The [SEG] holds the food."


def test_refcocom_validation(tmp_path: Path) -> None:
    fx.write_refcocom(tmp_path)
    (entry,) = parse_val_datasets("RefCOCOm|val")
    dataset = build_validation_set(tmp_path, entry, "refcocom_val.json")
    assert len(dataset) == 2 and list(dataset.check(deep=True)) == []
    sample = dataset[0]
    assert sample.conversations == [
        [
            (
                "<image>\n What is the handle of the cup in this image? Please output segmentation "
                "mask.",
                "[SEG].",
            )
        ],
        [
            (
                "<image>\n What is cup handle in this image? Please output segmentation mask.",
                "[SEG].",
            )
        ],
    ]
    assert np.array_equal(sample.masks, np.stack([fx.REFCOCOM_MASKS["7001"]] * 2))
    assert sample.target_names == ["the handle of the cup", "cup handle"]
    assert sample.record_id == "7001" and sample.image_path.endswith(fx.coco_name(1))
    with pytest.raises(DataError, match="--val_json_name"):
        build_validation_set(tmp_path, entry)


def test_refcocom_check_and_bad_masks(tmp_path: Path) -> None:
    records = fx.refcocom_records()
    records.append(
        {"segment_id": "7003", "img_name": fx.coco_name(1), "sentences": [{"sent": "gone"}]}
    )
    records.append({"segment_id": "7001", "sentences": [{"sent": "no image name"}]})
    path = fx.write_refcocom(tmp_path, records=records)
    masks = tmp_path / "refer_seg/RefCOCOm/masks"
    cv2.imwrite(str(masks / "7002.png"), fx.REFCOCOM_MASKS["7002"])  # 0/1, not 0/255
    dataset = build_validation_set(tmp_path, ValEntry("RefCOCOm", "", "val"), path.name)
    shallow = [str(e) for e in dataset.check()]
    assert len(shallow) == 2
    assert shallow[0].startswith(f"{path}, record #2 (segment_id 7003): ")
    assert "7003.png does not exist" in shallow[0]
    assert shallow[1].startswith(f"{path}, record #3: missing one of")
    deep = [str(e) for e in dataset.check(deep=True)]
    assert len(deep) == 3 and "holds values other than 0 and 255: [0, 1]" in deep[0]
    with pytest.raises(DataError, match="segment_id 7002"):
        dataset[1]


def test_reason_seg_is_built_by_its_module(tmp_path: Path) -> None:
    pytest.importorskip("utils.datasets.reason_seg")
    split = tmp_path / "reason_seg/ReasonSeg/val"
    fx.write_image(split / "a.jpg")
    shape = {"label": "target", "points": [[2, 2], [10, 2], [10, 8], [2, 8]]}
    (split / "a.json").write_text(
        json.dumps({"text": ["the thing I sit on"], "is_sentence": True, "shapes": [shape]})
    )
    (entry,) = parse_val_datasets("ReasonSeg|val")
    dataset = build_validation_set(tmp_path, entry)
    assert len(dataset) == 1
    assert dataset[0].conversations == [
        [("<image>\n the thing I sit on Please output segmentation mask.", "[SEG].")]
    ]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.tiny_dataset_dir(tmp_path_factory)


TINY_SETS = [
    ("refcoco|unc|val", ""),
    ("refcoco+|unc|testA", ""),
    ("refcocog|umd|test", ""),
    ("refclef|unc|testB", ""),
    ("grefcoco|unc|val", ""),
    ("grefcoco|unc|testB", ""),
    ("MultiPartReasonSeg|val", ""),
    ("MultiPartReasonSeg|test", "MMR_test_obj_only.json"),
    ("MultiPartReasonSeg|test", "MMR_test_part_only.json"),
    ("MultiPartReasonSeg|test", "MMR_test_mixed.json"),
    ("RefCOCOm|val", "refcocom_val.json"),
    ("RefCOCOm|testA", "refcocom_testA.json"),
]


@pytest.mark.parametrize(("text", "json_name"), TINY_SETS)
def test_tiny_assets_validation_sets(tiny_dataset: Path, text: str, json_name: str) -> None:
    (entry,) = parse_val_datasets(text)
    dataset = build_validation_set(tiny_dataset, entry, json_name)
    assert len(dataset) > 0 and list(dataset.check(deep=True)) == []
    for index in range(min(len(dataset), 3)):
        sample = dataset[index]
        tokens = fx.answer_tokens(sample.conversations)
        assert len(tokens) == len(sample.masks) == len(sample.target_names) > 0
        assert sample.masks.shape[1:] == sample.image.shape[:2]
        for token, mask in zip(tokens, sample.masks, strict=True):
            assert mask.any() == (token == "[SEG]")
        questions = " ".join(q for conversation in sample.conversations for q, _ in conversation)
        if not text.startswith("MultiPartReasonSeg"):  # MMR names targets by category
            assert all(name in questions for name in sample.target_names)
