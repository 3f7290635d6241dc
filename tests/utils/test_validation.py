"""`--val_dataset` parsing and the refCOCO, multi-refCOCO, gRefCOCO, RefZOM, MMR and RefCOCOm
validation sets: exact prompts, masks, target names, paths under refer_seg/, GSVA's metrics on
RefZOM and the bad-record checks.

Reference strings are copied from the upstream code: GSVA LeapLabTHU/GSVA@618dc79
`data/dataset.py:396-511` (gRefCOCO / RefZOM), `main.py:197-202` (`--val_refzom`); MMR
jdg900/MMR@702a7b6 `utils/dataset.py:355-357,437,472,489-533` (multi-refCOCO, RefCOCOm); LISA
dvlab-research/LISA@3cb2d43 `utils/dataset.py:372` (`strip().lower()`); CoReS
baoxiaoyi/CoReS@296ee1f `utils/dataset.py:480-493` (its one validation answer)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.utils import fixtures_refer as fx
from utils.datasets.base import DataError
from utils.datasets.validation import (
    GSVA_GRES_VAL,
    GSVA_REFZOM_VAL,
    ValEntry,
    build_validation_set,
    gsva_epoch_validation,
    is_semantic,
    multi_groups,
    parse_val_datasets,
    semantic_chunk_size,
)
from utils.evaluation import build_validation_jobs
from utils.metrics import (
    CIOU,
    GIOU,
    N_ACC,
    T_ACC,
    GresAccumulator,
    MaskIoUAccumulator,
    target_stats,
)

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
    "refzom|final|test": ("refzom", "final", "test"),
    "multirefcoco|unc|val": ("multirefcoco", "unc", "val"),
    "multirefcoco|unc|testA": ("multirefcoco", "unc", "testA"),
    "multirefcoco+|unc|testB": ("multirefcoco+", "unc", "testB"),
    "multirefcocog|umd|test": ("multirefcocog", "umd", "test"),
    "multirefclef|unc|val": ("multirefclef", "unc", "val"),
    "custom|mine/val.jsonl@mine/images": ("custom", "", "mine/val.jsonl@mine/images"),
    "custom|mine/val.json": ("custom", "", "mine/val.json"),
    "ade20k|val": ("ade20k", "", "val"),
    "cocostuff|val": ("cocostuff", "", "val"),
    "cityscapes|val": ("cityscapes", "", "val"),
    "mapillary|val": ("mapillary", "", "val"),
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
        "refzom|unc|test",
        "refzom|test",
        "multirefcoco|umd|val",
        "multigrefcoco|unc|val",
        "multirefzom|final|test",
        "custom|",
        "custom|a|b",
        "ade20k|train",
        "ade20k|unc|val",
        "cocostuff|test",
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
    # GSVA data/dataset.py:496-511: no space before "in", none after "Sure,"
    assert sample.conversations == [
        [
            (
                "<image>\n What are val thing, nothing herein this image? "
                "Please output segmentation masks.",
                "Sure,val thing:[SEG], nothing here:[REJ].",
            )
        ]
    ]
    assert np.array_equal(sample.masks, np.stack([fx.ANN_MASKS[31], np.zeros((fx.H, fx.W))]))
    assert sample.target_names == ["val thing", "nothing here"]


def test_grefcoco_validation_exact_strings_of_a_hand_made_record(tmp_path: Path) -> None:
    refs = [
        fx.ref(800, 1, [11, 12], "val", ["  The Two Things. ", "both"]),
        fx.ref(801, 1, [-1], "val", ["A purple cat."]),
        fx.ref(802, 1, [fx.EMPTY_ANN_ID], "val", ["the .empty. one"]),
    ]
    refs[1]["no_target"] = True
    extra = [fx.empty_annotation()]
    fx.write_refer(tmp_path, "grefcoco", refs, "grefs(unc).json", fx.instances(extra))
    sample = build_validation_set(tmp_path, ValEntry("grefcoco", "unc", "val"))[0]
    # sentences .strip().lower() (GSVA :398), then .strip().strip('.') (:496); an expression
    # whose mask sums below 1 is [REJ] (:506), the no-target one and the empty annotation alike
    question = (
        "<image>\n What are the two things, both, a purple cat, the .empty. onein this image? "
        "Please output segmentation masks."
    )
    answer = "Sure,the two things:[SEG], both:[SEG], a purple cat:[REJ], the .empty. one:[REJ]."
    assert sample.conversations == [[(question, answer)]]
    assert sample.target_names == ["the two things", "both", "a purple cat", "the .empty. one"]
    union = fx.ANN_MASKS[11] | fx.ANN_MASKS[12]
    zeros = np.zeros_like(union)
    assert np.array_equal(sample.masks, np.stack([union, union, zeros, zeros]))


def test_refcoco_family_sentences_are_normalised(tmp_path: Path) -> None:
    refs = [fx.ref(300, 3, 31, "val", ["  The VAL Thing. "])]
    fx.write_refer(tmp_path, refs=refs)
    sample = build_validation_set(tmp_path, ValEntry("refcoco", "unc", "val"))[0]
    # LISA utils/dataset.py:372, MMR utils/dataset.py:437: sent.strip().lower()
    assert sample.conversations == [
        [
            (
                "<image>\n What is the val thing. in this image? Please output segmentation mask.",
                "[SEG].",
            )
        ]
    ]
    assert sample.target_names == ["the val thing."]
    records = fx.refcocom_records()
    records[0]["sentences"][0]["sent"] = " The Handle of the CUP "
    path = fx.write_refcocom(tmp_path, records=records)
    refcocom = build_validation_set(tmp_path, ValEntry("RefCOCOm", "", "val"), path.name)[0]
    # MMR utils/dataset.py:472
    assert refcocom.target_names == ["the handle of the cup", "cup handle"]


CORES_VAL_ANSWER = "It usually appears on [SEG_SEMA]. It is [SEG]."


def test_single_target_sets_answer_val_answer_and_multi_target_sets_their_own(
    tmp_path: Path,
) -> None:
    refs = [fx.ref(300, 3, 31, "val", ["The val thing", "Another one"])]
    fx.write_refer(tmp_path, refs=refs)
    path = fx.write_refcocom(tmp_path)
    multi_refs = [fx.ref(301, 3, 31, "val", ["a", "b"])]
    fx.write_refer(tmp_path, "refcocog", multi_refs, "refs(umd).p")
    refcoco = build_validation_set(
        tmp_path, ValEntry("refcoco", "unc", "val"), val_answer=CORES_VAL_ANSWER
    )[0]
    assert [c[0][1] for c in refcoco.conversations] == [CORES_VAL_ANSWER] * 2
    refcocom = build_validation_set(
        tmp_path, ValEntry("RefCOCOm", "", "val"), path.name, CORES_VAL_ANSWER
    )[0]
    assert {c[0][1] for c in refcocom.conversations} == {CORES_VAL_ANSWER}
    multi = build_validation_set(
        tmp_path, ValEntry("multirefcocog", "umd", "val"), val_answer=CORES_VAL_ANSWER
    )[0]
    assert multi.conversations[0][0][1] == "[SEG] and [SEG]."  # MMR's own answer
    # the default keeps LISA's answer
    default = build_validation_set(tmp_path, ValEntry("refcoco", "unc", "val"))[0]
    assert [c[0][1] for c in default.conversations] == ["[SEG]."] * 2
    for entry, json_name in (
        (ValEntry("refcoco", "unc", "val"), ""),
        (ValEntry("RefCOCOm", "", "val"), path.name),
    ):
        with pytest.raises(ValueError, match=r"--val_answer '\[SEG\] \[SEG\]\.' holds 2"):
            build_validation_set(tmp_path, entry, json_name, "[SEG] [SEG].")


def test_refzom_validation_gsva_protocol(tmp_path: Path) -> None:
    fx.write_refer(tmp_path, "refzom", fx.refzom_refs(), "Ref_ZOM.p")
    (entry,) = parse_val_datasets(GSVA_REFZOM_VAL)
    dataset = build_validation_set(tmp_path, entry)
    assert dataset.name == "refzom|final|test" and len(dataset) == 1  # the test split: image 3
    sample = dataset[0]
    assert sample.conversations == [
        [
            (
                "<image>\n What are the test thing, nothing herein this image? "
                "Please output segmentation masks.",
                "Sure,the test thing:[SEG], nothing here:[REJ].",
            )
        ]
    ]
    assert np.array_equal(sample.masks, np.stack([fx.ANN_MASKS[31], np.zeros((fx.H, fx.W))]))
    assert sample.source == "refer_seg/refzom" and sample.record_id == "3"
    assert "refer_seg/images/mscoco/images/train2014/" in sample.image_path
    assert list(dataset.check(deep=True)) == []


def test_gsva_val_refzom_entry() -> None:
    # GSVA main.py:201: 'refzom|final|test' if args.val_refzom else 'grefcoco|unc|val'
    assert gsva_epoch_validation(True) == GSVA_REFZOM_VAL == "refzom|final|test"
    assert gsva_epoch_validation(False) == GSVA_GRES_VAL == "grefcoco|unc|val"


def test_refzom_is_scored_with_gsva_metrics(tmp_path: Path) -> None:
    fx.write_refer(tmp_path, "refzom", fx.refzom_refs(), "Ref_ZOM.p")
    (job,) = build_validation_jobs(tmp_path, "refzom|final|test")
    accumulator = job.new_accumulator()
    assert isinstance(accumulator, GresAccumulator)
    sample = job.dataset[0]  # "the test thing" (box 4:20 x 4:28), "nothing here" (empty)
    pred = torch.full((2, fx.H, fx.W), -1.0)
    pred[0, 4:20, 4:16] = 1.0  # the left half of the target: I = 16 * 12, U = 16 * 24
    pred[1, 0:2, 0:3] = 1.0  # 6 pixels predicted for the absent target, which is called REJ
    gt = torch.from_numpy(sample.masks)
    accumulator.update(target_stats(pred, gt), torch.tensor([True, False]))
    summary = accumulator.summary()
    # GSVA solver.py:255-300: empty GT called REJ -> IoU 1 (N-acc hit), non-empty -> I/U
    target_iou = (16 * 12) / (16 * 24 + 1e-8)
    assert summary[GIOU] == pytest.approx((target_iou + 1.0) / 2)
    assert summary[CIOU] == pytest.approx(0.5)
    assert summary[N_ACC] == 1.0 and summary[T_ACC] == 1.0


def test_multi_groups_cycle_six_five_four() -> None:
    # MMR utils/dataset.py:489-497,527-531: multi_sample_num = [6, 5, 4], cycled per image
    sizes = [len(group) for group in multi_groups(22)]
    assert sizes == [6, 5, 4, 6, 1]
    assert [list(g) for g in multi_groups(7)] == [[0, 1, 2, 3, 4, 5], [6]]
    assert multi_groups(0) == []


def test_multirefcoco_validation_mmr_strings(tmp_path: Path) -> None:
    first = ["A Red Box "] + [f"box {k}" for k in range(1, 7)]  # 7 sentences of ann 11
    second = [f"blob {k}" for k in range(5)]  # 5 sentences of ann 12
    refs = [fx.ref(700, 1, 11, "val", first), fx.ref(701, 1, 12, "val", second)]
    fx.write_refer(tmp_path, refs=refs)
    (entry,) = parse_val_datasets("multirefcoco|unc|val")
    dataset = build_validation_set(tmp_path, entry)
    assert dataset.name == "multirefcoco|unc|val" and len(dataset) == 1
    sample = dataset[0]
    question = "<image>\n What is {} in this image? Please output segmentation mask."
    assert sample.conversations == [
        [
            (
                question.format("a red box, box 1, box 2, box 3, box 4 and box 5"),
                "[SEG], [SEG], [SEG], [SEG], [SEG] and [SEG].",
            )
        ],
        [
            (
                question.format("box 6, blob 0, blob 1, blob 2 and blob 3"),
                "[SEG], [SEG], [SEG], [SEG] and [SEG].",
            )
        ],
        [(question.format("blob 4"), "[SEG]")],  # MMR's `answer[0]`: no period
    ]
    assert sample.target_names == ["a red box", *first[1:], *second]
    expected = [fx.ANN_MASKS[11]] * len(first) + [fx.ANN_MASKS[12]] * len(second)
    assert np.array_equal(sample.masks, np.stack(expected))
    assert sample.source == "refer_seg/refcoco" and sample.record_id == "1"
    (job,) = build_validation_jobs(tmp_path, "multirefcoco|unc|val")
    assert isinstance(job.new_accumulator(), MaskIoUAccumulator)  # per target, as MMR


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
    ("refzom|final|test", ""),
    ("multirefcoco|unc|val", ""),
    ("multirefcocog|umd|test", ""),
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


def test_custom_entries_are_built_by_their_module() -> None:
    """`custom|FILE@ROOT` is read under the dataset directory by utils.datasets.custom, and the
    accepted forms name it."""
    from utils.datasets.custom import CustomValidation

    data = Path(__file__).resolve().parents[1] / "data"
    (entry,) = parse_val_datasets("custom|custom/val.json@custom/images")
    validation = build_validation_set(data, entry)
    assert isinstance(validation, CustomValidation) and len(validation) == 2
    with pytest.raises(ValueError, match=r"custom\|<file>\[@<image root>\]"):
        parse_val_datasets("custom")


def test_semantic_sets_mix_with_the_others_and_are_built_chunked(assets: Path) -> None:
    """The "ade20k|val" entry and its three siblings join the other entries;
    --semantic_val_chunk 0 asks for the whole class list in one question (LaSagnA), N in
    questions of N names."""
    from utils.datasets.semantic_val import SemanticValidation

    tiny_dataset = assets / "dataset"
    entries = parse_val_datasets("ade20k|val||ReasonSeg|val||cityscapes|val")
    assert [is_semantic(entry) for entry in entries] == [True, False, True]
    whole = build_validation_set(tiny_dataset, entries[0])
    assert isinstance(whole, SemanticValidation) and len(whole[0].questions) == 1
    chunked = build_validation_set(tiny_dataset, entries[0], semantic_val_chunk=60)
    assert [len(q.split(", ")) for q in chunked[0].questions] == [60, 60, 30]
    assert semantic_chunk_size(0) is None and semantic_chunk_size(7) == 7
    with pytest.raises(ValueError, match="--semantic_val_chunk must be 0 or more, got -1"):
        semantic_chunk_size(-1)
    jobs = build_validation_jobs(tiny_dataset, "ade20k|val||ReasonSeg|val", semantic_val_chunk=60)
    assert [(job.name, job.semantic) for job in jobs] == [
        ("ade20k|val", True),
        ("ReasonSeg|val", False),
    ]
    assert len(jobs[0].dataset[0].questions) == 3
