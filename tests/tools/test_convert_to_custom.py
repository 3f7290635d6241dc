"""tools/convert_to_custom.py: the existing families' sets round-trip through the custom format
(refCOCO, gRefCOCO, ReasonSeg with its ignore pixels, MMR: the same samples, masks and target
names), and a COCO instances file with a question table (CSV and JSON) gives the hand-expected
records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools.convert_to_custom import main, parse_args
from utils.datasets.custom import CustomValidation, read_records, schema_problem
from utils.datasets.validation import ValEntry, build_validation_set

DATA = Path(__file__).resolve().parents[1] / "data"
SIDE = 32
SETS = (
    ("refcoco|unc|val", ""),
    ("refcoco|unc|train", ""),
    ("grefcoco|unc|val", ""),
    ("ReasonSeg|val", ""),
    ("MultiPartReasonSeg|val", "MMR_val.json"),
)


def assert_same_samples(original, converted) -> None:
    assert len(converted) == len(original) > 0
    for index in range(len(original)):
        want, got = original[index], converted[index]
        assert got.conversations == want.conversations
        assert np.array_equal(got.masks, want.masks)
        assert got.target_names == want.target_names
        assert (got.image_path, got.record_id) == (want.image_path, want.record_id)


@pytest.mark.parametrize(("spec", "json_name"), SETS)
def test_sets_round_trip(assets: Path, tmp_path: Path, spec: str, json_name: str) -> None:
    dataset_dir = assets / "dataset"
    out = tmp_path / "converted.jsonl"
    argv = ["set", f"--dataset_dir={dataset_dir}", f"--set={spec}", f"--out={out}"]
    assert main([*argv, f"--val_json_name={json_name}"] if json_name else argv) == 0
    assert all(schema_problem(record) is None for _, record in read_records(out))
    fields = spec.split("|")
    entry = ValEntry(*fields) if len(fields) == 3 else ValEntry(fields[0], "", fields[1])
    original = build_validation_set(dataset_dir, entry, json_name)
    assert_same_samples(original, CustomValidation(dataset_dir, f"{out}@."))


def write_coco(path: Path) -> None:
    """red.png: a square; green.png: a square and a bar (two instances of "shape"); blue.png:
    nothing annotated."""
    square = [[8, 8, 16, 8, 16, 16, 8, 16]]
    bar = [[4, 20, 12, 20, 12, 28, 4, 28]]
    images = [
        {"id": n, "file_name": name, "height": SIDE, "width": SIDE}
        for n, name in ((1, "red.png"), (2, "green.png"), (3, "blue.png"))
    ]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": square, "iscrowd": 0},
        {"id": 11, "image_id": 2, "category_id": 1, "segmentation": square, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 2, "segmentation": bar, "iscrowd": 0},
    ]
    categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


TABLE_CSV = (
    "category,image_id,question,answer,absent_answer,targets\n"
    "bar,,Where is the {category}?,It is {seg}.,There is no {category}: {rej}.,\n"
    ',2,Segment the square and the star.,"Sure, {seg} and {rej}.",,square;star\n'
)
TABLE_JSON = [
    {
        "category": "bar",
        "question": "Where is the {category}?",
        "answer": "It is {seg}.",
        "absent_answer": "There is no {category}: {rej}.",
    },
    {
        "image_id": 2,
        "question": "Segment the square and the star.",
        "answer": "Sure, {seg} and {rej}.",
        "targets": "square;star",
    },
]


@pytest.mark.parametrize("table_kind", ["csv", "json"])
def test_coco_with_a_question_table(tmp_path: Path, table_kind: str) -> None:
    write_coco(tmp_path / "instances.json")
    table = tmp_path / f"questions.{table_kind}"
    table.write_text(TABLE_CSV if table_kind == "csv" else json.dumps(TABLE_JSON))
    out = tmp_path / "mine.json"
    argv = ["coco", f"--instances={tmp_path / 'instances.json'}", f"--questions={table}"]
    assert main([*argv, f"--out={out}"]) == 0
    converted = CustomValidation(DATA, f"{out}@custom/images")
    assert [converted[i].record_id for i in range(len(converted))] == ["1", "2", "3"]
    red, green, blue = (converted[i] for i in range(3))
    assert red.conversations == [[("<image>\nWhere is the bar?", "There is no bar: [REJ].")]]
    assert green.conversations == [
        [("<image>\nWhere is the bar?", "It is [SEG].")],
        [("<image>\nSegment the square and the star.", "Sure, [SEG] and [REJ].")],
    ]
    assert green.target_names == ["bar", "square", "star"]
    square, bar = np.zeros((2, SIDE, SIDE), np.uint8)
    square[8:16, 8:16], bar[20:28, 4:12] = 1, 1
    assert np.array_equal(green.masks, np.stack([bar, square, np.zeros_like(bar)]))
    assert blue.target_names == ["bar"] and not blue.masks.any()


def test_coco_table_rows_that_contradict_the_annotations(tmp_path: Path, capsys) -> None:
    write_coco(tmp_path / "instances.json")
    table = tmp_path / "questions.csv"
    table.write_text("image_id,question,answer,targets\n1,Where?,It is {seg}.,bar\n")
    argv = ["coco", f"--instances={tmp_path / 'instances.json'}", f"--questions={table}"]
    assert main([*argv, f"--out={tmp_path / 'out.jsonl'}"]) == 1
    assert "category 'bar' is not in image 1 ({seg})" in capsys.readouterr().err
    table.write_text("question,answer\nWhere?,It is {seg}.\n")
    assert main([*argv, f"--out={tmp_path / 'out.jsonl'}"]) == 1
    assert "row 0: needs question and answer" in capsys.readouterr().err


def test_parse_args_reads_no_file() -> None:
    args = parse_args(["set", "--set=refcoco|unc|train", "--out=x.jsonl"])
    assert args.entry == ValEntry("refcoco", "unc", "train") and args.dataset_dir == Path("dataset")
    with pytest.raises(SystemExit):
        parse_args(["set", "--set=refcoco", "--out=x.jsonl"])
