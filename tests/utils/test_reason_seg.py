"""ReasonSeg training source and validation set: polygon masks (ignore = 255, largest first,
flag skipped), ignore pixels as background or excluded in training, the short/long query splits,
cp1252 fallback, the explanatory branches, record checks and determinism, CoReS's answers (its
ReasonSegDataset is LISA's with CoReS's ANSWER_LIST) and `--val_answer`."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.utils import fixtures_sem as fx
from tests.utils import reference_templates as ref
from tests.utils.test_sem_seg import assert_records_read_by_index
from utils.datasets.base import IGNORE_LABEL, DataError, SamplingOptions
from utils.datasets.reason_seg import (
    ReasonSegSource,
    ReasonSegValidation,
    build_reason_seg_sources,
)
from utils.datasets.templates import (
    ANSWERS,
    CORES_ANSWERS,
    EXPLANATORY_QUESTIONS,
    IMAGE_PREFIX,
    validation_question,
)

OPTIONS = SamplingOptions(num_classes_per_sample=2, explanatory=-1)
OUTPUTS = "Because it is the biggest red thing."
SENTENCES = ["What holds the water? ", "Which object is the largest?", "Find the big one."]


def box(y0: int, y1: int, x0: int, x1: int) -> list[list[float]]:
    """Polygon whose cv2 fill covers rows y0..y1 and columns x0..x1 (inclusive)."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def shape(label: str, points: list) -> dict:
    return {"label": label, "points": points, "shape_type": "polygon"}


def nested_masks() -> tuple[np.ndarray, np.ndarray]:
    """The masks of `nested()`, drawn by hand: (ignore square kept as IGNORE_LABEL, as validation
    and `--ignore_pixels exclude` see it; ignore square as background, LISA's `mask == 1`)."""
    excluded = np.zeros((fx.H, fx.W), np.uint8)
    excluded[2:17, 2:21] = 1
    excluded[5:10, 5:10] = IGNORE_LABEL
    excluded[6:8, 6:8] = 1
    background = np.zeros((fx.H, fx.W), np.uint8)
    background[2:17, 2:21] = 1
    background[5:10, 5:10] = 0
    background[6:8, 6:8] = 1
    return excluded, background


def nested(ignore_label: str = "ignore") -> tuple[dict, np.ndarray]:
    """Shapes listed small-first: a drawing in file order would let the big target cover the
    ignore square; largest-first keeps it, and the tiny target inside it on top. Returns (json,
    mask with IGNORE_LABEL)."""
    shapes = [
        shape(ignore_label, box(5, 9, 5, 9)),
        shape("target", [[2.7, 2.2], [20.9, 2.0], [20.5, 16.99], [2.0, 16.0]]),  # truncated
        shape("target", box(6, 7, 6, 7)),
        shape("flag", box(0, fx.H - 1, 0, fx.W - 1)),
    ]
    return {"text": SENTENCES, "is_sentence": True, "shapes": shapes}, nested_masks()[0]


def short() -> tuple[dict, np.ndarray]:
    mask = np.zeros((fx.H, fx.W), np.uint8)
    mask[10:21, 12:31] = 1
    shapes = [shape("target", box(10, 20, 12, 30))]
    return {"text": ["Red Cup", "Mug"], "is_sentence": False, "shapes": shapes}, mask


# the training masks with the default --ignore_pixels background ("short" has no ignore region)
TRAINING_MASKS = {"nested.jpg": nested_masks()[1], "short.jpg": short()[1]}


def write_record(root: Path, split: str, name: str, data: dict, encoding: str = "utf-8") -> None:
    folder = root / "reason_seg/ReasonSeg" / split
    fx.write_jpeg(folder / f"{name}.jpg", len(name))
    (folder / f"{name}.json").write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))


def write_reason_seg(root: Path, explanations: bool = True) -> dict[str, tuple[dict, np.ndarray]]:
    """train: "nested" (explained) and "short"; val: "nested". Returns {image: (json, mask)}."""
    records = {"nested.jpg": nested(), "short.jpg": short()}
    for name, (data, _) in records.items():
        write_record(root, "train", name[:-4], data)
    write_record(root, "val", "nested", nested()[0])
    if explanations:
        items = [{"image": "nested.jpg", "query": SENTENCES[0], "outputs": OUTPUTS}]
        fx.write_json(root / "reason_seg/ReasonSeg/explanatory/train.json", items)
    return records


def sample_record(source, seed: int) -> tuple[object, str]:
    sample = source.sample(np.random.default_rng(seed))
    return sample, Path(sample.image_path).name


def test_plain_training_samples(tmp_path):
    records = write_reason_seg(tmp_path, explanations=False)
    (source,) = build_reason_seg_sources(tmp_path, ["ReasonSeg|train"], OPTIONS)
    assert len(source) == 2 and source.name == "reason_seg/ReasonSeg|train"
    asked = set()
    for seed in fx.RNG_SEEDS:
        sample, name = sample_record(source, seed)
        data, mask = records[name][0], TRAINING_MASKS[name]
        assert fx.token_count(sample.conversations) == (len(sample.masks), 0)
        assert len(sample.conversations) == min(len(data["text"]), 2)
        texts = data["text"] if data["is_sentence"] else [t.lower() for t in data["text"]]
        for (question, answer), row in zip(
            (c[0] for c in sample.conversations), sample.masks, strict=True
        ):
            text = fx.asked_name(question, long=data["is_sentence"])
            assert text in texts and answer in ANSWERS
            asked.add(text)
            np.testing.assert_array_equal(row, mask)
    assert asked == set(SENTENCES) | {"red cup", "mug"}


def test_explanation_only_with_probability_one(tmp_path):
    write_reason_seg(tmp_path)
    source = ReasonSegSource(tmp_path, replace(OPTIONS, explanatory=1.0))
    for seed in fx.RNG_SEEDS:
        sample, name = sample_record(source, seed)
        if name == "nested.jpg":
            assert sample.masks.shape == (0, fx.H, fx.W)
            assert fx.token_count(sample.conversations) == (0, 0)
            for ((question, answer),) in sample.conversations:
                assert question.removeprefix(IMAGE_PREFIX) in SENTENCES and answer == OUTPUTS
        else:  # no explanation for this image: plain
            np.testing.assert_array_equal(sample.masks[0], TRAINING_MASKS[name])


def test_explained_and_plain_with_probability_zero(tmp_path):
    write_reason_seg(tmp_path)
    mask = TRAINING_MASKS["nested.jpg"]
    source = ReasonSegSource(tmp_path, replace(OPTIONS, explanatory=0.0))
    forms = set()
    for seed in fx.RNG_SEEDS:
        sample, name = sample_record(source, seed)
        if name != "nested.jpg":
            continue
        assert fx.token_count(sample.conversations) == (len(sample.masks), 0) != (0, 0)
        assert all((row == mask).all() for row in sample.masks)
        (question, answer), *_ = sample.conversations[0]
        if answer.endswith(OUTPUTS):
            text, asked = question.removeprefix(IMAGE_PREFIX).rsplit(" Please", 1)
            assert text in SENTENCES and "Please" + asked in EXPLANATORY_QUESTIONS
            assert answer[: -len(OUTPUTS) - 1] in ANSWERS
            forms.add("explained")
        else:
            assert answer in ANSWERS
            forms.add("plain")
    assert forms == {"explained", "plain"}


@pytest.mark.parametrize(
    ("prompt_style", "answers"),
    [
        ("cores", ref.CORES_ANSWER_LIST),
        ("lisa", ref.LISA_ANSWER_LIST),
        ("mmr", ref.LISA_ANSWER_LIST),  # MMR and GSVA keep LISA's ReasonSeg loader
        ("gsva", ref.LISA_ANSWER_LIST),
    ],
)
def test_plain_and_explained_answers_follow_the_style(tmp_path, prompt_style, answers):
    """CoReS utils/reason_seg_dataset.py:147-179 (@296ee1f): `random.choice(self.answer_list)`
    for plain answers and `random.choice(self.answer_list) + " {}".format(explanation)`."""
    write_reason_seg(tmp_path)
    options = replace(OPTIONS, explanatory=0.0, prompt_style=prompt_style)
    source = ReasonSegSource(tmp_path, options)
    seen = {"plain": set(), "explained": set()}
    for seed in range(120):
        sample, _ = sample_record(source, seed)
        for ((_, answer),) in sample.conversations:
            form = "explained" if answer.endswith(OUTPUTS) else "plain"
            template = answer[: -len(OUTPUTS) - 1] if form == "explained" else answer
            assert template in answers, (form, answer)
            seen[form].add(template)
    assert seen["plain"] == set(answers) and len(seen["explained"]) > len(answers) // 2


def test_validation_answers_val_answer(tmp_path):
    write_reason_seg(tmp_path)
    cores = ReasonSegValidation(tmp_path, "val", answer=ref.CORES_VALIDATION_ANSWER)
    question = validation_question(SENTENCES[0].strip(), True)
    assert cores[0].conversations == [[(question, ref.CORES_VALIDATION_ANSWER)]]
    assert CORES_ANSWERS[1] == ref.CORES_VALIDATION_ANSWER  # one of its training answers
    with pytest.raises(ValueError, match="--val_answer 'It is.' holds 0 \\[SEG\\]"):
        ReasonSegValidation(tmp_path, "val", answer="It is.")


def test_explanatory_json_required_unless_disabled(tmp_path):
    write_reason_seg(tmp_path, explanations=False)
    with pytest.raises(DataError, match="explanatory/train.json: file does not exist.*-1"):
        ReasonSegSource(tmp_path, replace(OPTIONS, explanatory=0.1))
    assert len(ReasonSegSource(tmp_path, OPTIONS)) == 2


def test_train_val_joins_splits_and_bad_specs(tmp_path):
    write_reason_seg(tmp_path)
    assert len(ReasonSegSource(tmp_path, OPTIONS, "ReasonSeg|train_val")) == 3
    with pytest.raises(ValueError, match="name\\|split"):
        ReasonSegSource(tmp_path, OPTIONS, "ReasonSeg")
    with pytest.raises(DataError, match="ReasonSeg/test: directory does not exist"):
        ReasonSegSource(tmp_path, OPTIONS, "ReasonSeg|test")


def test_validation_sample(tmp_path):
    _, mask = write_reason_seg(tmp_path)["nested.jpg"]
    dataset = ReasonSegValidation(tmp_path, "val")
    assert len(dataset) == 1 and dataset.name == "ReasonSeg|val"
    item = dataset[0]
    text = SENTENCES[0].strip()
    assert item.conversations == [[(validation_question(text, True), "[SEG].")]]
    assert item.target_names == [text] and item.record_id == "nested.jpg"
    assert item.source == "reason_seg/ReasonSeg|val"
    np.testing.assert_array_equal(item.masks, mask[None])
    assert list(dataset.check(deep=True)) == []


def test_cp1252_json_fallback(tmp_path):
    data, mask = short()
    data["text"] = ["the caf\u00e9\u2019s sign"]
    write_record(tmp_path, "val", "windows", data, encoding="cp1252")
    with pytest.raises(UnicodeDecodeError):
        (tmp_path / "reason_seg/ReasonSeg/val/windows.json").read_text(encoding="utf-8")
    item = ReasonSegValidation(tmp_path, "val")[0]
    assert item.target_names == ["the caf\u00e9\u2019s sign"]
    np.testing.assert_array_equal(item.masks[0], mask)


def test_same_seed_same_sample(tmp_path):
    write_reason_seg(tmp_path)
    source = ReasonSegSource(tmp_path, replace(OPTIONS, explanatory=0.5))
    for seed in range(5):
        first, second = (source.sample(np.random.default_rng(seed)) for _ in range(2))
        assert first.conversations == second.conversations
        np.testing.assert_array_equal(first.masks, second.masks)


def test_check_finds_each_bad_record(tmp_path):
    write_reason_seg(tmp_path)
    good, _ = short()
    bad = {
        "a_no_text": {**good, "text": []},
        "b_no_sentence_flag": {key: v for key, v in good.items() if key != "is_sentence"},
        "c_two_points": {**good, "shapes": [shape("target", [[1, 1], [5, 5]])]},
        "d_no_label": {**good, "shapes": [{"points": box(1, 2, 1, 2)}]},
        "e_corrupt_image": good,
    }
    for name, data in bad.items():
        write_record(tmp_path, "val", name, data)
    folder = tmp_path / "reason_seg/ReasonSeg/val"
    (folder / "f_malformed.json").write_text('{"text": [')
    fx.write_jpeg(folder / "f_malformed.jpg")
    fx.write_jpeg(folder / "g_no_json.jpg")
    (folder / "e_corrupt_image.jpg").write_bytes(b"\xff\xd8\xff")
    dataset = ReasonSegValidation(tmp_path, "val")
    shallow = [str(error) for error in dataset.check()]
    expected = [
        "a_no_text.json, record a_no_text.jpg: missing field 'text'",
        "b_no_sentence_flag.json, record b_no_sentence_flag.jpg: missing field 'is_sentence'",
        "c_two_points.json, record c_two_points.jpg shape 0: polygon has 2 points",
        "d_no_label.json, record d_no_label.jpg shape 0: missing field 'label'",
        "f_malformed.json, record f_malformed.jpg: is not valid json",
        "g_no_json.json, record g_no_json.jpg: file does not exist",
    ]
    assert len(shallow) == len(expected)
    for message, part in zip(shallow, expected, strict=True):
        assert part in message, message
    deep = [str(error) for error in dataset.check(deep=True)]
    assert len(deep) == len(expected) + 1
    assert "e_corrupt_image.json, record e_corrupt_image.jpg: image" in deep[4]
    assert "not a readable image" in deep[4]


def test_an_annotation_without_its_image_is_named(tmp_path):
    write_reason_seg(tmp_path)
    good, _ = short()
    for name in ("h_no_image", "i_no_image"):
        write_record(tmp_path, "val", name, good)
        (tmp_path / f"reason_seg/ReasonSeg/val/{name}.jpg").unlink()
    expected = "2 annotation(s) without their .jpg image: h_no_image.json, i_no_image.json"
    with pytest.raises(DataError, match=re.escape(expected)):
        ReasonSegValidation(tmp_path, "val")
    with pytest.raises(DataError, match=re.escape(expected)):
        ReasonSegSource(tmp_path, OPTIONS, "ReasonSeg|val")


def test_bad_explanation_entry_is_reported_and_raised(tmp_path):
    write_reason_seg(tmp_path)
    items = [{"image": "nested.jpg", "query": "q"}, {"outputs": "no image"}]
    fx.write_json(tmp_path / "reason_seg/ReasonSeg/explanatory/train.json", items)
    source = ReasonSegSource(tmp_path, replace(OPTIONS, explanatory=0.5))
    messages = [str(error) for error in source.check()]
    assert len(messages) == 2
    assert "train.json, record 1: missing field 'image'" in messages[0]
    assert "train.json, record 0 (nested.jpg): missing field 'outputs'" in messages[1]
    with pytest.raises(DataError, match="missing field 'outputs'"):
        for seed in fx.RNG_SEEDS:
            source.sample(np.random.default_rng(seed))


def test_tiny_assets_load(tmp_path):
    from tools.make_tiny_assets import make_tiny_assets

    root = make_tiny_assets(tmp_path, 0, families=["reason_seg"], models=False) / "dataset"
    source = ReasonSegSource(root, replace(OPTIONS, explanatory=0.5))
    assert list(source.check(deep=True)) == []
    for seed in range(10):
        sample = source.sample(np.random.default_rng(seed))
        assert fx.token_count(sample.conversations) == (len(sample.masks), 0)
        assert all((mask == 1).any() for mask in sample.masks)
    validation = ReasonSegValidation(root, "val")
    assert list(validation.check(deep=True)) == []
    assert all((validation[i].masks == 1).any() for i in range(len(validation)))
    test = ReasonSegValidation(root, "test").images
    short_split, long_split = (
        ReasonSegValidation(root, s).images for s in ("testshort", "testlong")
    )
    assert short_split and long_split and sorted(short_split + long_split) == test
    for images, is_sentence in ((short_split, False), (long_split, True)):
        for image in images:
            assert json.loads(image.with_suffix(".json").read_text())["is_sentence"] is is_sentence


@pytest.mark.parametrize("ignore_label", ["ignore", "Ignore region"])
def test_ignore_pixels_background_or_excluded_in_training(tmp_path, ignore_label):
    """LISA utils/reason_seg_dataset.py:131-133 trains `(mask == 1)` (dvlab-research/LISA
    @3cb2d4301f1af4691bd4f3938335ef06e76f155a): the ignore square is background; "exclude"
    keeps it IGNORE_LABEL; validation keeps it either way (LISA utils/data_processing.py:52
    lower-cases the label, so any case marks "ignore")."""
    write_record(tmp_path, "train", "nested", nested(ignore_label)[0])
    write_record(tmp_path, "val", "nested", nested(ignore_label)[0])
    excluded, background = nested_masks()
    assert (excluded == IGNORE_LABEL).sum() == 25 - 4 and not (background == IGNORE_LABEL).any()
    for ignore_pixels, expected in (("background", background), ("exclude", excluded)):
        for explanatory in (-1, 0.0):  # plain, and plain/explained (same mask for both)
            options = replace(OPTIONS, ignore_pixels=ignore_pixels, explanatory=explanatory)
            if explanatory >= 0:
                items = [{"image": "nested.jpg", "query": SENTENCES[0], "outputs": OUTPUTS}]
                fx.write_json(tmp_path / "reason_seg/ReasonSeg/explanatory/train.json", items)
            source = ReasonSegSource(tmp_path, options)
            for seed in range(8):
                sample = source.sample(np.random.default_rng(seed))
                assert len(sample.masks) == 2
                for row in sample.masks:
                    np.testing.assert_array_equal(row, expected)
    np.testing.assert_array_equal(ReasonSegValidation(tmp_path, "val")[0].masks[0], excluded)
    with pytest.raises(ValueError, match="--ignore_pixels must be one of"):
        ReasonSegSource(tmp_path, replace(OPTIONS, ignore_pixels="zero"))


def long_record(index: int) -> dict:
    return {**nested()[0], "text": [f"Which thing number {index} holds water?"]}


def short_record(index: int) -> dict:
    return {**short()[0], "text": [f"cup {index}", "mug"]}


# a test split of mixed query types, file names sorted as the loader lists them
TEST_KINDS = {"a_long": True, "b_short": False, "c_long": True, "d_long": True, "e_short": False}


def write_test_split(root: Path, kinds: dict[str, bool]) -> None:
    for index, (name, is_sentence) in enumerate(kinds.items()):
        data = long_record(index) if is_sentence else short_record(index)
        write_record(root, "test", name, data)


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("test_short", ["b_short.jpg", "e_short.jpg"]),
        ("testshort", ["b_short.jpg", "e_short.jpg"]),  # CoReS's README spelling
        ("test_long", ["a_long.jpg", "c_long.jpg", "d_long.jpg"]),
        ("testlong", ["a_long.jpg", "c_long.jpg", "d_long.jpg"]),
        ("test", ["a_long.jpg", "b_short.jpg", "c_long.jpg", "d_long.jpg", "e_short.jpg"]),
    ],
)
def test_short_and_long_query_splits(tmp_path, split, expected):
    write_test_split(tmp_path, TEST_KINDS)
    dataset = ReasonSegValidation(tmp_path, split)
    assert dataset.name == f"ReasonSeg|{split}"
    assert [dataset[i].record_id for i in range(len(dataset))] == expected
    for index in range(len(dataset)):
        item = dataset[index]
        is_sentence = TEST_KINDS[item.record_id[:-4]]
        text = item.target_names[0]
        assert item.conversations == [[(validation_question(text, is_sentence), "[SEG].")]]
        assert item.source == f"reason_seg/ReasonSeg|{split}"


def test_query_split_of_joined_splits_and_training(tmp_path):
    write_reason_seg(tmp_path)  # train: nested (long), short (short); val: nested (long)
    long_val = ReasonSegValidation(tmp_path, "train_val_long")
    assert [Path(p).parent.name + "/" + p.name for p in long_val.images] == [
        "train/nested.jpg",
        "val/nested.jpg",
    ]
    (source,) = build_reason_seg_sources(tmp_path, ["ReasonSeg|train_short"], OPTIONS)
    assert [p.name for p in source.images] == ["short.jpg"]
    assert source.name == "reason_seg/ReasonSeg|train_short"


def test_query_split_without_records_of_the_kind_is_an_error(tmp_path):
    write_test_split(tmp_path, {"a_long": True, "c_long": True})
    with pytest.raises(DataError, match="is_sentence false, so 'ReasonSeg|test_short' is empty"):
        ReasonSegValidation(tmp_path, "test_short")
    with pytest.raises(DataError, match="is_sentence false, so 'ReasonSeg|testshort' is empty"):
        ReasonSegValidation(tmp_path, "testshort")
    assert len(ReasonSegValidation(tmp_path, "test_long")) == 2


def test_query_split_with_an_unreadable_json_is_an_error(tmp_path):
    write_test_split(tmp_path, TEST_KINDS)
    (tmp_path / "reason_seg/ReasonSeg/test/c_long.json").write_text('{"text": [')
    with pytest.raises(DataError, match="c_long.json, record c_long.jpg: is not valid json"):
        ReasonSegValidation(tmp_path, "test_short")
    assert len(ReasonSegValidation(tmp_path, "test")) == 5  # the plain split reads jsons lazily


def test_a_folder_named_like_the_query_split_takes_precedence(tmp_path):
    """CoReS (as every LISA-family ValDataset) globs `reason_seg/ReasonSeg/<split>/*.jpg`: a
    `testshort/` folder is read whole, whatever the query types inside."""
    write_test_split(tmp_path, TEST_KINDS)
    write_record(tmp_path, "testshort", "z_long", long_record(9))
    dataset = ReasonSegValidation(tmp_path, "testshort")
    assert [p.name for p in dataset.images] == ["z_long.jpg"]
    assert [p.name for p in ReasonSegValidation(tmp_path, "test_short").images] == [
        "b_short.jpg",
        "e_short.jpg",
    ]


@pytest.mark.parametrize("explanatory", [-1, 0.5])
def test_sample_at_reads_image(assets, explanatory):
    """Record i: the i-th image of the split folder, by name (explanations drawn or not)."""
    root = assets / "dataset"
    paths = sorted((root / "reason_seg/ReasonSeg/train").glob("*.jpg"))
    options = replace(OPTIONS, explanatory=explanatory)
    (source,) = build_reason_seg_sources(root, ["ReasonSeg|train"], options)
    assert_records_read_by_index(source, paths)
