"""The custom family (utils/datasets/custom.py) on the hand-written files of tests/data/custom:
samples and validation samples with hand-computed masks, every encoding of one mask decoding
equal, each format violation's one-line message (and where the JSON Schema stands on it), the
entries' syntax, per-file weights in the mixer, and the evaluation's scores on hand-built
predicted masks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from utils.datasets.base import IGNORE_LABEL, DataError, SamplingOptions
from utils.datasets.custom import (
    CustomFile,
    CustomValidation,
    build_custom_sources,
    parse_entry,
    schema_problem,
)
from utils.datasets.mixer import pick_source
from utils.datasets.templates import IMAGE_PREFIX
from utils.datasets.validation import ValEntry, build_validation_set, parse_val_datasets

DATA = Path(__file__).resolve().parents[1] / "data"
TRAIN = "custom/train.jsonl@custom/images"
VAL = "custom/val.json@custom/images"
SIDE = 32
SQUARE = (slice(8, 16), slice(8, 16))  # every image's coloured square, rows and columns 8..15
BAR = (slice(20, 28), slice(4, 12))  # green.png's dark bar


def hand_mask(*regions: tuple[slice, slice]) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), np.uint8)
    for region in regions:
        mask[region] = 1
    return mask


EMPTY = hand_mask()


@pytest.fixture(scope="module")
def source():
    [built] = build_custom_sources(DATA, [TRAIN + ":2"], SamplingOptions())
    return built


def test_training_samples_are_the_files_text_and_masks(source) -> None:
    assert source.name == f"custom/{TRAIN}:2" and source.weight == 2 and len(source) == 3
    rng = np.random.default_rng(0)
    red, blue, green = (source.sample_at(i, rng) for i in range(3))
    assert red.conversations == [[(IMAGE_PREFIX + "Where is the red square?", "It is [SEG].")]]
    assert blue.conversations == [
        [
            (
                IMAGE_PREFIX + "Segment the blue square and the unicorn.",
                "Sure, the blue square: [SEG], the unicorn: [REJ].",
            ),
            ("What colour is the square?", "Blue."),
        ]
    ]
    assert green.conversations == [
        [(IMAGE_PREFIX + "Segment the square.", "[SEG].")],
        [(IMAGE_PREFIX + "And the bar?", "It is [SEG].")],
    ]
    for sample, expected in (
        (red, [hand_mask(SQUARE)]),
        (blue, [hand_mask(SQUARE), EMPTY]),
        (green, [hand_mask(SQUARE), hand_mask(BAR)]),
    ):
        assert np.array_equal(sample.masks, np.stack(expected))
        assert sample.image.shape == (SIDE, SIDE, 3) and sample.source == source.name
    assert Path(red.image_path) == DATA / "custom" / "images" / "red.png"


def test_at_most_num_classes_per_sample_conversations_are_drawn() -> None:
    [one] = build_custom_sources(DATA, [TRAIN], SamplingOptions(num_classes_per_sample=1))
    drawn = {
        one.sample_at(2, np.random.default_rng(seed)).conversations[0][0][1] for seed in range(8)
    }
    assert drawn == {"[SEG].", "It is [SEG]."}


def test_rle_polygon_and_label_png_decode_to_the_same_mask() -> None:
    """red (polygon), blue (uncompressed RLE), green (label PNG, value 2) in train.jsonl and red
    (compressed RLE) in val.json all give the hand-built square."""
    train, val = CustomFile(parse_entry(TRAIN, DATA)), CustomFile(parse_entry(VAL, DATA))
    encodings = {}
    for data, position, kind in ((train, 0, "polygon"), (train, 1, "rle"), (train, 2, "png")):
        record = data.record(position)
        encodings[kind] = data.mask(record.conversations[0].targets[0], record)
    record = val.record(0)
    encodings["compressed rle"] = val.mask(record.conversations[0].targets[0], record)
    assert set(encodings) == {"polygon", "rle", "png", "compressed rle"}
    for kind, mask in encodings.items():
        assert np.array_equal(mask, hand_mask(SQUARE)), kind


def test_ignore_pixels_follow_the_flag(tmp_path: Path) -> None:
    """Pixels marked "ignore" stay IGNORE_LABEL with --ignore_pixels exclude (and in validation),
    and train as background by default (ReasonSeg's rule)."""
    record = json.loads((DATA / "custom" / "train.jsonl").read_text().splitlines()[0])
    record["masks"][0]["ignore"] = [[0, 0, 4, 0, 4, 4, 0, 4]]
    excluded = hand_mask(SQUARE)
    excluded[0:4, 0:4] = IGNORE_LABEL
    exclude = SamplingOptions(ignore_pixels="exclude")
    assert np.array_equal(sample_of(record, exclude, tmp_path).masks[0], excluded)
    background = sample_of(record, SamplingOptions(), tmp_path)
    assert np.array_equal(background.masks[0], hand_mask(SQUARE))


# --- violations: (change to a valid record, the field and problem named, schema's verdict) ----
def red_record() -> dict:
    return json.loads((DATA / "custom" / "train.jsonl").read_text().splitlines()[0])


def blue_record() -> dict:
    return json.loads((DATA / "custom" / "train.jsonl").read_text().splitlines()[1])


def edit(record: dict, path: str, value: object) -> dict:
    """`record` with the value at "a.b[0].c" replaced (`...` deletes it)."""
    record = copy.deepcopy(record)
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    node = record
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    key = int(last) if last.isdigit() else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return record


RLE_16 = {"size": [16, 16], "counts": [256]}
VIOLATIONS = {
    "no height": (
        edit(red_record(), "height", ...),
        "record: 'height' is a required property",
        True,
    ),
    "height as text": (
        edit(red_record(), "height", "32"),
        "height: '32' is not of type 'integer'",
        True,
    ),
    "misspelt masks": (
        edit(edit(red_record(), "mask", []), "masks", ...),
        "Additional properties are not allowed ('mask' was unexpected)",
        True,
    ),
    "turn without answer": (
        edit(red_record(), "conversations[0][0].answer", ...),
        "conversations[0][0]: 'answer' is a required property",
        True,
    ),
    "target without phrase": (
        edit(red_record(), "masks[0].phrase", ...),
        "masks[0]: 'phrase' is a required property",
        True,
    ),
    "png without value": (
        edit(red_record(), "masks[0]", {"phrase": "x", "png": "masks/green.png"}),
        "masks[0]: 'value' is a dependency of 'png'",
        True,
    ),
    "segmentation and png": (
        edit(red_record(), "masks[0].png", "masks/green.png"),
        "masks[0]",
        True,
    ),
    "polygon of two points": (
        edit(red_record(), "masks[0].segmentation", [[0, 0, 4, 4]]),
        "masks[0].segmentation",
        True,
    ),
    "two {seg} but one mask": (
        edit(red_record(), "conversations[0][0].answer", "{seg} and {seg}"),
        "conversations[0][0].answer: placeholder 2 of the record's list-form conversations has "
        "no target: masks has 1",
        False,
    ),
    "a mask no placeholder takes": (
        edit(red_record(), "conversations[0][0].answer", "Nowhere."),
        "masks: 1 targets but the answers of the list-form conversations hold 0 placeholders",
        False,
    ),
    "conversation masks count": (
        edit(blue_record(), "conversations[0].turns[1].answer", "Blue, {seg}."),
        "conversations[0]: its answers hold 3 placeholders ({seg}/{rej}) but its masks has 2 "
        "targets",
        False,
    ),
    "{seg} without a mask": (
        edit(red_record(), "masks[0]", {"phrase": "the red square"}),
        "masks[0]: fills the {seg} of conversations[0][0].answer but has no 'segmentation' or "
        "'png'",
        False,
    ),
    "{rej} with a mask": (
        edit(red_record(), "conversations[0][0].answer", "No: {rej}."),
        "masks[0]: fills the {rej} of conversations[0][0].answer but has a mask",
        False,
    ),
    "[SEG] written": (
        edit(red_record(), "conversations[0][0].answer", "It is [SEG]."),
        "conversations[0][0].answer: holds [SEG]; write {seg} or {rej}",
        False,
    ),
    "RLE of another size": (
        edit(red_record(), "masks[0].segmentation", RLE_16),
        "masks[0].segmentation: RLE size [16, 16] differs from the record's [height, width] "
        "[32, 32]",
        False,
    ),
}


def sample_of(record: dict, options: SamplingOptions, tmp_path: Path):
    """The training sample of a one-record JSONL file."""
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [one] = build_custom_sources(DATA, [f"{path}@custom/images"], options)
    return one.sample_at(0, np.random.default_rng(0))


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_each_violation_gives_its_one_line_message(name: str, tmp_path: Path) -> None:
    record, expected, schema_rejects = VIOLATIONS[name]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n" + json.dumps(red_record()) + "\n" + json.dumps(record) + "\n")
    data = CustomFile(parse_entry(f"{path}@{DATA / 'custom' / 'images'}", DATA))
    data.record(0)
    with pytest.raises(DataError) as caught:
        data.record(1)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}, record 1 (line 3): ")
    assert expected in message
    # the schema is the format's definition: it rejects every structural violation, and the
    # ones it cannot express (counts, kinds, sizes) are the loader's own checks
    assert (schema_problem(record) is not None) == schema_rejects
    assert [str(error) for error in data.check()] == [message]


def test_unparsable_jsonl_line_is_its_record_error(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(red_record()) + "\n{not json\n")
    data = CustomFile(parse_entry(f"{path}@{DATA / 'custom' / 'images'}", DATA))
    assert len(data) == 2
    [error] = list(data.check())
    assert str(error).startswith(f"{path}, record 1 (line 2): is not valid json")


def test_outer_shape_and_image_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"categories": []}))
    with pytest.raises(DataError, match="expected a non-empty list of records or an object"):
        CustomFile(parse_entry(str(path), DATA))
    record = edit(red_record(), "height", 31)
    path.write_text(json.dumps([record]))
    data = CustomFile(parse_entry(f"{path}@{DATA / 'custom' / 'images'}", DATA))
    assert list(data.check(deep=False)) == []  # quick: the image exists
    [error] = list(data.check(deep=True))
    assert "record 0: height, width: the record says [31, 32] but image" in str(error)


def test_entries() -> None:
    entry = parse_entry("mine/train.jsonl@mine/images:3", Path("/data"))
    assert (entry.file, entry.image_root, entry.weight) == (
        Path("/data/mine/train.jsonl"),
        Path("/data/mine/images"),
        3.0,
    )
    entry = parse_entry("mine/val.json", Path("/data"), with_weight=False)
    assert (entry.image_root, entry.weight) == (Path("/data/mine"), 1.0)
    with pytest.raises(ValueError, match="must be positive"):
        parse_entry("a.jsonl:0", Path("/data"))
    with pytest.raises(ValueError, match="names no file"):
        parse_entry("@images", Path("/data"))
    with pytest.raises(ValueError, match="names no file"):
        build_custom_sources(Path("/data"), ["@x"], SamplingOptions())
    with pytest.raises(ValueError, match="--custom_data names no file"):
        build_custom_sources(Path("/data"), [], SamplingOptions())


class Weighted:
    def __init__(self, weight: float) -> None:
        self.weight = weight


def test_files_are_drawn_by_weight_and_equal_weights_draw_as_before() -> None:
    rng = np.random.default_rng(0)
    picks = [pick_source([Weighted(3), Weighted(1)], rng) for _ in range(4000)]
    assert np.mean(np.array(picks) == 0) == pytest.approx(0.75, abs=0.03)
    uniform, before = np.random.default_rng(1), np.random.default_rng(1)
    sources = [Weighted(1), Weighted(1), Weighted(1)]
    assert [pick_source(sources, uniform) for _ in range(50)] == [
        int(before.integers(3)) for _ in range(50)
    ]


# --- validation ---------------------------------------------------------------------------------
def test_validation_entry_and_samples() -> None:
    [entry] = parse_val_datasets(f"custom|{VAL}")
    assert entry == ValEntry("custom", "", VAL) and str(entry) == f"custom|{VAL}"
    validation = build_validation_set(DATA, entry)
    assert isinstance(validation, CustomValidation) and validation.name == f"custom|{VAL}"
    red, blue = validation[0], validation[1]
    assert red.conversations == [[(IMAGE_PREFIX + "Where is the red square?", "It is [SEG].")]]
    assert red.target_names == ["the red square"] and red.record_id == "red"
    assert blue.target_names == ["the blue square", "the unicorn"] and blue.record_id == "blue"
    assert np.array_equal(blue.masks, np.stack([hand_mask(SQUARE), EMPTY]))
    assert list(validation.check(deep=True)) == []


class HandMasks(nn.Module):
    """The tiny segmenter with every target decided `[SEG]` and predicted as the left half of
    the square (rows 8..15, columns 8..11: 32 pixels)."""

    def __init__(self, model: nn.Module, seg_id: int) -> None:
        super().__init__()
        self.model, self.seg_id = model, seg_id

    def forward(self, batch):
        output = self.model(batch)
        output.logits[..., self.seg_id] += 1.0e4
        half = torch.full((SIDE, SIDE), -1.0)
        half[8:16, 8:12] = 1.0
        output.pred_masks = [half.expand(len(p), SIDE, SIDE).clone() for p in output.pred_masks]
        return output


@pytest.fixture(scope="module")
def custom_result(tiny_dir):
    from model.tiny import build_tiny_segmenter
    from utils.collate import SampleProcessor
    from utils.evaluation import build_validation_jobs, evaluate

    model, tokenizer = build_tiny_segmenter(tiny_dir)
    processor = SampleProcessor.for_model(model, tokenizer, str(tiny_dir / "llava_tiny"))
    [job] = build_validation_jobs(DATA, f"custom|{VAL}")
    stub = HandMasks(model, processor.token_ids.seg)
    return evaluate(stub, job, processor, device="cpu", dtype=torch.float32, rank=0, world_size=1)


def test_evaluation_scores_hand_built_masks(custom_result) -> None:
    """red square: I 32, U 64 (IoU 0.5); blue square: the same; the unicorn (no ground truth)
    predicted with 32 pixels: IoU 0. gIoU = (0.5 + 0.5 + 0) / 3, cIoU = 64 / (64 + 64 + 32)."""
    assert custom_result.name == f"custom|{VAL}"
    assert custom_result.summary["giou"] == pytest.approx(1 / 3, abs=1e-6)
    assert custom_result.summary["ciou"] == pytest.approx(64 / 160, abs=1e-6)
    rows = {
        (r["record_id"], r["target"]): (r["intersection"], r["union"])
        for r in custom_result.records
    }
    assert rows == {
        ("red", "the red square"): (32, 64),
        ("blue", "the blue square"): (32, 64),
        ("blue", "the unicorn"): (0, 32),
    }


def test_evaluation_reports_n_acc_and_t_acc(custom_result) -> None:
    """Every target called [SEG]: the unicorn (empty) is a miss, both squares hits."""
    assert custom_result.summary["n_acc"] == 0.0
    assert custom_result.summary["t_acc"] == 1.0
