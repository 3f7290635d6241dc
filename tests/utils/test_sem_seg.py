"""Semantic and part segmentation sources: names in the prompts, masks equal to the annotations,
label conventions, ignore pixels as background or excluded, part targets per instance or per
category, record checks and determinism, on tiny datasets in the real formats; GSVA's
`--no_sampling` record-indexed `sample_at` (its checks, `assert_records_read_by_index`, are
shared with the other family test modules)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.utils import fixtures_sem as fx
from utils.datasets.base import (
    IGNORE_LABEL,
    DataError,
    Sample,
    SamplingOptions,
    UnusableSample,
    read_label_map,
)
from utils.datasets.mixer import MAX_DRAWS, FullPassBatchSampler, FullPassDataset, HybridDataset
from utils.datasets.parts import PART_SPECS, PartSource
from utils.datasets.sem_seg import (
    ADE20K_CLASSES,
    LABEL_MAP_SPECS,
    LabelMap,
    LabelMapSource,
    build_sem_seg_sources,
    stored_values,
)
from utils.datasets.templates import GSVA_PARTS, GSVA_QUESTIONS, GSVA_STARTS

LISA = SamplingOptions(num_classes_per_sample=3, prompt_style="lisa", use_expand_question_list=True)
IGNORE_MODES = ["background", "exclude"]
GSVA_PATTERNS = [fx.template_pattern(template, "{x}") for template in GSVA_QUESTIONS]
SAMPLE_SEEDS = range(6)
RANKS, MICRO_BATCH, EPOCHS = 2, 3, 2


def asked_masks(sample, unique: bool = True) -> list[tuple[str, np.ndarray]]:
    """(asked name, its mask) per conversation; also checks one [SEG] per mask row and no
    [REJ], and (`unique`) that no name is asked twice."""
    assert fx.token_count(sample.conversations) == (len(sample.masks), 0)
    names = [fx.asked_name(conversation[0][0]) for conversation in sample.conversations]
    assert not unique or len(set(names)) == len(names), names
    return list(zip(names, sample.masks, strict=True))


def training_mask(truth: np.ndarray, ignore_pixels: str) -> np.ndarray:
    """The mask a loader must give for a fixture mask (which marks ignored pixels IGNORE_LABEL):
    unchanged when they are excluded; as background (LISA/GSVA/MMR `label == class_id`), only
    the class's own pixels are 1."""
    return truth if ignore_pixels == "exclude" else (truth == 1).astype(np.uint8)


def assert_label_map_samples(
    source, truth: dict[str, dict[str, np.ndarray]], ignore_pixels: str = "background"
) -> set[str]:
    """Every sample's masks equal the expected masks of the asked names; returns the names.
    The samples are drawn as training draws them (a mix of `source` alone), so a record without
    a usable class is replaced by another."""
    seen = set()
    mix = HybridDataset([("sem_seg", [source])], [1], length=len(fx.RNG_SEEDS))
    for index in range(len(mix)):
        sample = mix[index]
        stem = Path(sample.image_path).stem
        assert sample.image.shape == (fx.H, fx.W, 3) and sample.source == source.name
        for name, mask in asked_masks(sample):
            expected = training_mask(truth[stem][name], ignore_pixels)
            np.testing.assert_array_equal(mask, expected, err_msg=name)
            seen.add(name)
    return seen


@pytest.mark.parametrize("ignore_pixels", IGNORE_MODES)
def test_ade20k_shift_ignore_and_builtin_vocabulary(tmp_path, ignore_pixels):
    truth = fx.write_ade20k(tmp_path)
    options = replace(LISA, ignore_pixels=ignore_pixels)
    source = LabelMapSource(tmp_path, options, "ade20k")
    assert source.classes == list(ADE20K_CLASSES) and len(source.classes) == 150
    assert len(source) == 2 and source.name == "sem_seg/ade20k"
    # record "b" (all 0) is unusable; the mixer draws another record in its place
    with pytest.raises(UnusableSample, match=r"b.png \(record b\) has no labelled pixel"):
        source.sample_at(1, np.random.default_rng(0))
    # raw 1 -> "wall", raw 3 -> "sky"; raw 0 and 255 ignored
    assert assert_label_map_samples(source, truth, ignore_pixels) == {"wall", "sky"}
    mask = truth["a"]["wall"]
    assert set(np.unique(mask)) == {0, 1, IGNORE_LABEL}


@pytest.mark.parametrize("ignore_pixels", IGNORE_MODES)
def test_ignore_pixels_are_background_or_excluded(tmp_path, ignore_pixels):
    """Raw 0 ("other") and 255 of ADE20K: 0 in every mask (background) or IGNORE_LABEL."""
    fx.write_ade20k(tmp_path, with_empty=False)
    raw = np.array(Image.open(tmp_path / "ade20k/annotations/training/a.png"))
    ignored = (raw == 0) | (raw == IGNORE_LABEL)
    source = LabelMapSource(tmp_path, replace(LISA, ignore_pixels=ignore_pixels), "ade20k")
    for seed in range(5):
        masks = source.sample(np.random.default_rng(seed)).masks
        expected_at_ignored = 0 if ignore_pixels == "background" else IGNORE_LABEL
        assert (masks[:, ignored] == expected_at_ignored).all()
        assert set(np.unique(masks)) == {0, 1} | {expected_at_ignored}


def test_unknown_option_values_are_errors(tmp_path):
    fx.write_ade20k(tmp_path)
    fx.write_paco(tmp_path)
    with pytest.raises(ValueError, match="--ignore_pixels must be one of .* not 'zero'"):
        LabelMapSource(tmp_path, replace(LISA, ignore_pixels="zero"), "ade20k")
    with pytest.raises(ValueError, match="--part_targets must be one of .* not 'part'"):
        PartSource(tmp_path, replace(LISA, part_targets="part"), "paco_lvis")


def test_ade20k_vocabulary_file_wins(tmp_path):
    truth = fx.write_ade20k(tmp_path, with_empty=False)
    names = [f"thing {i}" for i in range(150)]
    fx.write_json(tmp_path / "ade20k/ade20k_classes.json", names)
    source = LabelMapSource(tmp_path, LISA, "ade20k")
    renamed = {"a": {"thing 0": truth["a"]["wall"], "thing 2": truth["a"]["sky"]}}
    assert assert_label_map_samples(source, renamed) == {"thing 0", "thing 2"}


def test_ade20k_shipped_vocabulary_is_lisas_list(tmp_path):
    """Without a user file the names are LISA's ade20k_classes.json: label value v is class v - 1
    (hand-checked against the SceneParsing-150 objectInfo150 order)."""
    fx.write_ade20k(tmp_path, with_empty=False)
    assert not (tmp_path / "ade20k/ade20k_classes.json").exists()
    classes = LabelMapSource(tmp_path, LISA, "ade20k").classes
    assert len(classes) == 150
    assert (classes[0], classes[2], classes[12], classes[20], classes[149]) == (
        "wall",
        "sky",
        "person",
        "car",
        "flag",
    )


@pytest.mark.parametrize(("dtype", "top"), [(np.uint8, 255), (np.uint16, 65535), (np.int32, 999)])
def test_stored_values_are_the_sorted_distinct_values(dtype, top):
    """One counting pass per map on its stored dtype; oracle: np.unique."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        raw = rng.integers(0, top + 1, rng.integers(1, 40, size=2)).astype(dtype)
        raw.flat[0] = top
        np.testing.assert_array_equal(stored_values(raw), np.unique(raw))
        assert stored_values(raw).dtype == np.int64


@pytest.mark.parametrize("dataset", sorted(LABEL_MAP_SPECS))
def test_label_statistics_on_stored_values_equal_remapping_every_pixel(dataset):
    """Oracle: the remapping applied to the whole map widened to int64, then np.unique and
    `label == c` (what the loader did before it remapped only the distinct values)."""
    classes = [f"class{i}" if i % 7 else f"merged-{i}" for i in range(150)]
    remap = LABEL_MAP_SPECS[dataset].remap
    rng = np.random.default_rng(0)
    for dtype, top in ((np.uint8, 151), (np.uint16, 151)):
        raw = rng.integers(0, top, (fx.H, fx.W)).astype(dtype)
        raw[0, :4] = (0, IGNORE_LABEL, 150, 149)
        values = stored_values(raw)
        label = LabelMap(raw, values, remap(values, classes))
        full = remap(raw.astype(np.int64), classes)
        expected = [int(v) for v in np.unique(full) if v != IGNORE_LABEL]
        assert label.present() == expected
        for class_index in [*expected[:5], IGNORE_LABEL]:
            np.testing.assert_array_equal(label.where(class_index), full == class_index)


@pytest.mark.parametrize("mode", ["L", "I;16", "P", "1", "LA"])
def test_label_maps_read_as_pil_reads_them(tmp_path, mode):
    """8-bit greyscale maps go through OpenCV, the others through PIL: the values are PIL's."""
    rng = np.random.default_rng(0)
    top = {"L": 255, "I;16": 65535, "P": 200, "1": 1, "LA": 255}[mode]
    raw = rng.integers(0, top + 1, (fx.H, fx.W))
    stored = {
        "L": lambda: Image.fromarray(raw.astype(np.uint8)),
        "I;16": lambda: Image.fromarray(raw.astype(np.uint16)),
        "P": lambda: Image.fromarray(raw.astype(np.uint8), "L").convert("P"),
        "1": lambda: Image.fromarray(raw.astype(bool)),
        "LA": lambda: Image.fromarray(raw.astype(np.uint8)).convert("LA"),
    }[mode]()
    path = tmp_path / "label.png"
    stored.save(path)
    if mode == "LA":
        with pytest.raises(DataError, match="has 2 channels, not 1"):
            read_label_map(path, (fx.H, fx.W))
        return
    expected = np.array(Image.open(path))
    label = read_label_map(path, (fx.H, fx.W))
    assert label.dtype == expected.dtype
    np.testing.assert_array_equal(label, expected)


def test_a_truncated_greyscale_label_map_is_refused_as_pil_refuses_it(tmp_path):
    path = tmp_path / "label.png"
    fx.write_png(path, np.random.default_rng(0).integers(0, 9, (fx.H, fx.W)))
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match=r"label.png is not readable \(image file is truncated"):
        read_label_map(path, (fx.H, fx.W))


def write_cocostuff_without_vocabulary(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """A stuffthingmaps label with real COCO-Stuff values and no cocostuff_classes.txt: pixel 0
    person (id 1), 123 grass (id 124), 156 sky (id 157), 170 wall-brick (id 171, hyphenated:
    ignored), 255 unlabeled frame."""
    raw = np.full((fx.H, fx.W), 123, np.uint8)
    person, sky, brick = (
        fx.rectangle(4, 14, 4, 12),
        fx.rectangle(1, 4, 14, 30),
        fx.circle(16, 22, 4),
    )
    raw[person], raw[sky], raw[brick] = 0, 156, 170
    raw[0, :] = raw[-1, :] = IGNORE_LABEL
    ignored = brick | (raw == IGNORE_LABEL)
    stem = "000000000001"
    fx.write_png(root / "cocostuff/train2017" / f"{stem}.png", raw)
    fx.write_jpeg(root / "coco/train2017" / f"{stem}.jpg")
    names = {"person": person, "grass": raw == 123, "sky": sky}
    return {stem: {name: fx.expected(inside, ignored) for name, inside in names.items()}}


@pytest.mark.parametrize("ignore_pixels", IGNORE_MODES)
def test_cocostuff_reads_the_shipped_class_list(tmp_path, ignore_pixels):
    """The COCO-Stuff download has no class list: LISA's, shipped with the loaders, is read."""
    truth = write_cocostuff_without_vocabulary(tmp_path)
    options = replace(LISA, ignore_pixels=ignore_pixels)
    (source,) = build_sem_seg_sources(tmp_path, ["cocostuff"], options)
    assert len(source.classes) == 182 and source.classes[:2] == ["person", "bicycle"]
    assert assert_label_map_samples(source, truth, ignore_pixels) == {"person", "grass", "sky"}


@pytest.mark.parametrize(
    ("file", "content", "problem"),
    [
        ("ade20k/ade20k_classes.json", '{"wall": 1}', "expected a json list of class names"),
        ("ade20k/ade20k_classes.json", "[wall", "is not valid json"),
        ("cocostuff/cocostuff_classes.txt", "0: unlabeled\n2: person\n", "line 2: expected '1:"),
        ("cocostuff/cocostuff_classes.txt", "0: unlabeled\n", "has no class after"),
        ("cocostuff/cocostuff_classes.txt", b"0: unlabeled\n1: caf\xe9\n", "not readable UTF-8"),
    ],
)
def test_a_bad_user_class_list_is_a_one_line_error(tmp_path, file, content, problem):
    fx.write_ade20k(tmp_path, with_empty=False)
    write_cocostuff_without_vocabulary(tmp_path)
    path = tmp_path / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    dataset = file.split("/")[0]
    with pytest.raises(DataError, match=problem) as caught:
        build_sem_seg_sources(tmp_path, [dataset], LISA)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


@pytest.mark.parametrize("ignore_pixels", IGNORE_MODES)
def test_cocostuff_hyphen_classes_are_ignored(tmp_path, ignore_pixels):
    truth = fx.write_cocostuff(tmp_path)
    options = replace(LISA, ignore_pixels=ignore_pixels)
    (source,) = build_sem_seg_sources(tmp_path, ["cocostuff"], options)
    assert source.classes == ["person", "wall-brick", "grass"]
    assert assert_label_map_samples(source, truth, ignore_pixels) == {"person", "grass"}


def test_mapillary_palette_read_by_index(tmp_path):
    truth = fx.write_mapillary(tmp_path)
    (source,) = build_sem_seg_sources(tmp_path, ["mapillary"], LISA)
    assert assert_label_map_samples(source, truth) == {"car", "road", "sky"}


def test_no_usable_class_raises_after_bounded_draws(tmp_path):
    fx.write_ade20k(tmp_path)
    (tmp_path / "ade20k/images/training/a.jpg").unlink()
    (tmp_path / "ade20k/annotations/training/a.png").unlink()
    source = LabelMapSource(tmp_path, LISA, "ade20k")
    with pytest.raises(UnusableSample, match="record b"):
        source.sample(np.random.default_rng(0))
    mix = HybridDataset([("sem_seg", [source])], [1], length=1)
    with pytest.raises(RuntimeError, match=f"{MAX_DRAWS} draws in a row gave unusable samples"):
        mix[0]


def test_part_image_without_annotations_is_unusable(tmp_path):
    fx.write_pascal_part(tmp_path)
    path = tmp_path / "vlpart/pascal_part/train.json"
    data = json.loads(path.read_text())
    data["images"].append({"id": 2, "file_name": "bare.jpg", "height": fx.H, "width": fx.W})
    fx.write_json(path, data)
    source = PartSource(tmp_path, LISA, "pascal_part")
    assert len(source) == 2
    with pytest.raises(UnusableSample, match="train.json, image 2 has no annotation"):
        source.sample_at(1, np.random.default_rng(0))
    assert source.sample_at(0, np.random.default_rng(0)).image_path.endswith("2008_000001.jpg")


def part_names(key: tuple[str, str | None]) -> set[str]:
    obj, part = key
    return {obj} if part is None else {f"{obj} {part}", f"the {part} of the {obj}"}


def masks_by_name(truth: dict, combine) -> dict[str, list[np.ndarray]]:
    """{asked name: the masks it may have}; `combine` maps a category's instance masks to them."""
    return {name: combine(masks) for key, masks in truth.items() for name in part_names(key)}


def union(masks: list[np.ndarray]) -> list[np.ndarray]:
    return [np.bitwise_or.reduce(masks)]


@pytest.mark.parametrize("dataset", ["paco_lvis", "pascal_part"])
def test_part_category_targets_union_instances(tmp_path, dataset):
    writer = fx.write_paco if dataset == "paco_lvis" else fx.write_pascal_part
    by_name = masks_by_name(next(iter(writer(tmp_path).values())), union)
    options = replace(LISA, part_targets="category")
    (source,) = build_sem_seg_sources(tmp_path, [dataset], options)
    assert len(source) == 1 and source.name == f"sem_seg/{dataset}"
    seen = set()
    for seed in fx.RNG_SEEDS:
        for name, mask in asked_masks(source.sample(np.random.default_rng(seed))):
            np.testing.assert_array_equal(mask, by_name[name][0], err_msg=name)
            seen.add(name)
    # "_(...)" suffixes stripped, both part renderings drawn, two "dog" polygons unioned
    assert seen == set(by_name)


@pytest.mark.parametrize("dataset", ["paco_lvis", "pascal_part"])
def test_part_instance_targets_one_per_annotation(tmp_path, dataset):
    """LISA utils/sem_seg_dataset.py:219-236,306-310: annotations drawn without replacement,
    one `annToMask` each; the two "dog" annotations may both be asked, each with its own mask."""
    writer = fx.write_paco if dataset == "paco_lvis" else fx.write_pascal_part
    truth = next(iter(writer(tmp_path).values()))
    by_name = masks_by_name(truth, list)
    annotations = sum(len(masks) for masks in truth.values())
    (source,) = build_sem_seg_sources(tmp_path, [dataset], LISA)
    seen, both_dogs = set(), False
    for seed in fx.RNG_SEEDS:
        pairs = asked_masks(source.sample(np.random.default_rng(seed)), unique=False)
        assert len(pairs) == min(LISA.num_classes_per_sample, annotations)
        for name, mask in pairs:
            index = next(k for k, m in enumerate(by_name[name]) if np.array_equal(mask, m))
            seen.add((name, index))
        # drawn without replacement: no annotation twice
        assert len({mask.tobytes() for _, mask in pairs}) == len(pairs)
        both_dogs |= sum(name == "dog" for name, _ in pairs) == 2
    assert seen == {(name, k) for name, masks in by_name.items() for k in range(len(masks))}
    assert both_dogs == (dataset == "paco_lvis")


@pytest.mark.parametrize("part_targets", ["instance", "category"])
def test_mmr_and_gsva_styles_count_tokens(tmp_path, part_targets):
    fx.write_paco(tmp_path)
    for style in ("mmr", "gsva"):
        options = SamplingOptions(2, 2, prompt_style=style, part_targets=part_targets)
        (source,) = build_sem_seg_sources(tmp_path, ["paco_lvis"], options)
        for seed in range(10):
            sample = source.sample(np.random.default_rng(seed))
            segs, rejs = fx.token_count(sample.conversations)
            assert segs == len(sample.masks) and rejs == 0
            # five annotations of four categories; 2 (gsva) or 2 x 2 (mmr) drawn at most
            assert 1 <= len(sample.masks) <= (4 if style == "mmr" else 2)


def test_gsva_style_part_answers_join_with_a_bare_comma(tmp_path):
    """GSVA data/sem_seg_dataset.py:323-333: the parts of a sem_seg answer are joined with ","."""
    truth = next(iter(fx.write_paco(tmp_path).values()))
    names = {name for key in truth for name in part_names(key)}
    options = SamplingOptions(3, prompt_style="gsva")
    (source,) = build_sem_seg_sources(tmp_path, ["paco_lvis"], options)
    for seed in range(20):
        ((question, answer),) = source.sample(np.random.default_rng(seed)).conversations[0]
        (asked,) = [m.group(1) for p in GSVA_PATTERNS if (m := p.fullmatch(question))]
        parts = asked.split(", ")
        assert set(parts) <= names and len(parts) == 3
        composed = {
            start + " " + ",".join(template.format(x=n) for n in parts) + "."
            for start, template in zip(GSVA_STARTS, GSVA_PARTS, strict=True)
        }
        assert answer in composed, answer


def test_same_seed_same_sample(tmp_path):
    fx.write_ade20k(tmp_path, with_empty=False)  # record "b" is unusable (no sample to compare)
    fx.write_paco(tmp_path)
    for source in build_sem_seg_sources(tmp_path, ["ade20k", "paco_lvis"], LISA):
        first, second = (source.sample(np.random.default_rng(7)) for _ in range(2))
        assert first.conversations == second.conversations
        np.testing.assert_array_equal(first.masks, second.masks)


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="partimagenet.*ade20k, cocostuff"):
        build_sem_seg_sources(tmp_path, ["partimagenet"], LISA)


@pytest.mark.parametrize(
    "dataset, missing",
    [
        ("ade20k", "ade20k/images/training"),
        ("cocostuff", "cocostuff/train2017"),  # the class list is shipped
        ("mapillary", "mapillary/config_v2.0.json"),
        ("paco_lvis", "vlpart/paco/annotations/paco_lvis_v1_train.json"),
        ("pascal_part", "vlpart/pascal_part/train.json"),
    ],
)
def test_missing_index_names_expected_path(tmp_path, dataset, missing):
    with pytest.raises(DataError, match=missing):
        build_sem_seg_sources(tmp_path, [dataset], LISA)


def test_malformed_and_empty_index_json(tmp_path):
    path = tmp_path / "vlpart/pascal_part/train.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(DataError, match="train.json: is not valid json"):
        PartSource(tmp_path, LISA, "pascal_part")
    path.write_text("{}")
    with pytest.raises(DataError, match="is empty"):
        PartSource(tmp_path, LISA, "pascal_part")


def test_label_map_check_finds_each_bad_record(tmp_path):
    fx.write_ade20k(tmp_path)
    for stem in ("c", "d", "e"):
        fx.write_jpeg(tmp_path / f"ade20k/images/training/{stem}.jpg")
    # c: no label map; d: label map of the wrong size; e: truncated image
    fx.write_png(tmp_path / "ade20k/annotations/training/d.png", np.ones((fx.H, fx.W + 1)))
    fx.write_png(tmp_path / "ade20k/annotations/training/e.png", np.ones((fx.H, fx.W)))
    image = tmp_path / "ade20k/images/training/e.jpg"
    image.write_bytes(image.read_bytes()[:40])
    source = LabelMapSource(tmp_path, LISA, "ade20k")
    shallow = [str(error) for error in source.check()]
    assert len(shallow) == 1 and "c.png, record c: label map" in shallow[0]
    deep = sorted(str(error) for error in source.check(deep=True))
    assert len(deep) == 3
    assert "record c" in deep[0] and "does not exist" in deep[0]
    assert "record d" in deep[1] and "33x24 but its image is 32x24" in deep[1]
    assert "record e" in deep[2] and "not a readable image" in deep[2]


def test_label_map_sample_errors_name_file_and_record(tmp_path):
    fx.write_cocostuff(tmp_path)
    (tmp_path / "coco/train2017/000000000001.jpg").unlink()
    (source,) = build_sem_seg_sources(tmp_path, ["cocostuff"], LISA)
    with pytest.raises(DataError, match=r"000000000001.png, record 000000000001: image .*exist"):
        source.sample(np.random.default_rng(0))
    assert len(list(source.check())) == 1


def test_label_value_outside_vocabulary_is_an_error(tmp_path):
    fx.write_mapillary(tmp_path)
    fx.write_png(tmp_path / "mapillary/training/v2.0/labels/k1.png", np.full((fx.H, fx.W), 7))
    (source,) = build_sem_seg_sources(tmp_path, ["mapillary"], LISA)
    with pytest.raises(DataError, match="class index 7 .* vocabulary of 3 classes"):
        source.sample(np.random.default_rng(0))


def test_part_check_finds_each_bad_record(tmp_path):
    fx.write_paco(tmp_path)
    path = tmp_path / "vlpart/paco/annotations/paco_lvis_v1_train.json"
    data = json.loads(path.read_text())
    good = data["images"][0]
    data["images"] += [
        {**good, "id": 2, "file_name": "train2017/missing.jpg"},
        {"id": 3, "height": fx.H, "width": fx.W},
        {**good, "id": 4, "file_name": "../../outside.jpg"},
        {**good, "id": 5, "file_name": "train2017/corrupt.jpg"},
    ]
    (tmp_path / "coco/train2017/corrupt.jpg").write_bytes(b"not a jpeg")
    bad = [[1, 1, 5, 1]], {"size": [fx.H + 1, fx.W], "counts": "abc"}, [[1, 1, 5, 1, 5, 5, 1]]
    for ann_id, segmentation in enumerate(bad, start=101):
        data["annotations"].append(
            {"id": ann_id, "image_id": 1, "category_id": 1, "segmentation": segmentation}
        )
    data["annotations"] += [
        {"id": 201, "image_id": 1, "category_id": 99, "segmentation": fx.polygon(0, 2, 0, 2)},
        {"id": 202, "image_id": 77, "category_id": 1, "segmentation": fx.polygon(0, 2, 0, 2)},
    ]
    fx.write_json(path, data)
    source = PartSource(tmp_path, LISA, "paco_lvis")
    shallow = [str(error) for error in source.check()]
    expected = [
        "annotations[9]: has no image_id",
        "annotation 101: polygon 0 has 2 points; at least 3",
        "annotation 102: RLE size [25, 32] differs from the image's [24, 32]",
        "annotation 103: polygon 0 has an odd number of coordinates (7)",
        "annotation 201: category_id 99 is not a category",
        "image 2: image",
        "image 3: missing field 'file_name'",
        "image 4: path '../../outside.jpg' escapes",
    ]
    assert len(shallow) == len(expected)
    for message, part in zip(shallow, expected, strict=True):
        assert "paco_lvis_v1_train.json, record " in message and part in message, message
    deep = [str(error) for error in source.check(deep=True)]
    assert len(deep) == len(expected) + 1 and "image 5: image" in deep[-1]
    assert "not a readable image" in deep[-1]


def test_part_sample_raises_on_bad_polygon(tmp_path):
    fx.write_pascal_part(tmp_path)
    path = tmp_path / "vlpart/pascal_part/train.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = [[1, 1, 4, 4]]
    fx.write_json(path, data)
    source = PartSource(tmp_path, LISA, "pascal_part")
    with pytest.raises(DataError, match="train.json, record annotation 1: polygon 0 has 2"):
        for seed in fx.RNG_SEEDS:
            source.sample(np.random.default_rng(seed))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """The synthetic dataset of tools/make_tiny_assets.py (sem_seg families only)."""
    from tools.make_tiny_assets import make_tiny_assets

    out = tmp_path_factory.mktemp("tiny_sem")
    families = ["ade20k", "cocostuff", "mapillary", "paco_lvis", "pascal_part"]
    return make_tiny_assets(out, 0, families=families, models=False) / "dataset"


@pytest.mark.parametrize("part_targets", ["instance", "category"])
def test_tiny_assets_load_with_shape_names(tiny_dataset, part_targets):
    from tools.tiny_assets.classes import SEMANTIC_NAMES
    from tools.tiny_assets.shapes_world import OBJECT_SHAPES, PART_NAMES

    # ADE20K and COCO-Stuff label the kinds with real classes of the shipped lists, whose
    # neighbours are other real classes, so an off-by-one reads a name outside `allowed`
    allowed = set(OBJECT_SHAPES) | set(SEMANTIC_NAMES.values())
    allowed.add("unlabeled")  # Mapillary's own last class, kept as LISA
    for obj, parts in PART_NAMES.items():
        allowed |= {name for part in parts for name in part_names((obj, part))}
    names = ["ade20k", "cocostuff", "mapillary", "paco_lvis", "pascal_part"]
    options = replace(LISA, part_targets=part_targets)
    repeated = set()
    for source in build_sem_seg_sources(tiny_dataset, names, options):
        assert list(source.check(deep=True)) == [], source.name
        unique = part_targets == "category" or source.name.split("/")[1] not in PART_SPECS
        for seed in range(5):
            pairs = asked_masks(source.sample(np.random.default_rng(seed)), unique)
            for name, mask in pairs:
                assert name in allowed and (mask == 1).any(), (source.name, name)
            if len({name for name, _ in pairs}) < len(pairs):
                repeated.add(source.name)
    # the tiny scenes repeat shapes and parts, so instance targets repeat names somewhere
    assert bool(repeated) == (part_targets == "instance"), repeated


def test_part_degenerate_polygon_part_is_dropped_and_warned(tmp_path):
    truth = next(iter(fx.write_pascal_part(tmp_path).values()))
    path = tmp_path / "vlpart/pascal_part/train.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"].append([1, 1, 4, 4])  # two points beside the head
    fx.write_json(path, data)
    source = PartSource(tmp_path, LISA, "pascal_part")
    (warning,) = source.check(deep=True)
    assert not warning.fatal and "record annotation 1: polygon 1 has 2 points" in str(warning)
    head = {name: truth[("dog", "head")][0] for name in part_names(("dog", "head"))}
    for seed in fx.RNG_SEEDS:
        for name, mask in asked_masks(source.sample(np.random.default_rng(seed))):
            if name in head:
                np.testing.assert_array_equal(mask, head[name], err_msg=name)


def test_multi_channel_label_map_is_an_error(tmp_path):
    fx.write_ade20k(tmp_path, with_empty=False)
    rgb = np.zeros((fx.H, fx.W, 3), np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "ade20k/annotations/training/a.png")
    source = LabelMapSource(tmp_path, LISA, "ade20k")
    with pytest.raises(DataError, match="a.png, record a: label map .* has 3 channels, not 1"):
        source.sample(np.random.default_rng(0))
    (error,) = source.check(deep=True)
    assert "has 3 channels" in str(error)


# --- GSVA's --no_sampling: the sample of a given record ---
def assert_same_sample(got: Sample, expected: Sample) -> None:
    assert (got.image_path, got.source) == (expected.image_path, expected.source)
    assert got.conversations == expected.conversations
    np.testing.assert_array_equal(got.image, expected.image)
    np.testing.assert_array_equal(got.masks, expected.masks)


def assert_records_read_by_index(source, image_paths: Sequence[Path]) -> None:
    """`source.sample_at(i, rng)` is record i, whose image is `image_paths[i]` (composed by the
    caller from the dataset's own files); `sample(rng)` is `sample_at` of the first integer drawn
    from a copy of `rng`, continued with that copy; an index outside 0..len-1 is an IndexError;
    and a two-rank `--no_sampling` pass builds every record once in each epoch."""
    assert len(source) == len(image_paths) > RANKS
    for index, path in enumerate(image_paths):
        assert source.sample_at(index, np.random.default_rng(index)).image_path == str(path)
    for seed in SAMPLE_SEEDS:
        rng = np.random.default_rng(seed)
        copy = deepcopy(rng)
        index = int(copy.integers(len(image_paths)))
        assert_same_sample(source.sample(rng), source.sample_at(index, copy))
        assert rng.bit_generator.state == copy.bit_generator.state
    for outside in (-1, len(image_paths)):
        with pytest.raises(IndexError, match=f"there is no record {outside}$"):
            source.sample_at(outside, np.random.default_rng(0))
    dataset = FullPassDataset(source, seed=1)
    for epoch in range(EPOCHS):
        dataset.set_epoch(epoch)
        built = [
            dataset[position].image_path
            for rank in range(RANKS)
            for batch in FullPassBatchSampler(len(dataset), rank, RANKS, MICRO_BATCH)
            for position in batch
        ]
        assert Counter(built) == Counter(str(path) for path in image_paths), epoch


@pytest.mark.parametrize(
    ("name", "listed", "images"),
    [
        ("ade20k", "ade20k/images/training/*.jpg", "ade20k/images/training"),
        ("cocostuff", "cocostuff/train2017/*.png", "coco/train2017"),
        ("mapillary", "mapillary/training/v2.0/labels/*.png", "mapillary/training/images"),
    ],
)
def test_label_map_sample_at_reads_record(assets, name, listed, images):
    """Record i: the i-th file of the listed folder, by name (LabelMapSpec.listed)."""
    root = assets / "dataset"
    stems = sorted(path.stem for path in root.glob(listed))
    (source,) = build_sem_seg_sources(root, [name], LISA)
    assert_records_read_by_index(source, [root / images / f"{stem}.jpg" for stem in stems])


@pytest.mark.parametrize(
    ("name", "annotations", "images"),
    [
        ("paco_lvis", "vlpart/paco/annotations/paco_lvis_v1_train.json", "coco"),
        (
            "pascal_part",
            "vlpart/pascal_part/train.json",
            "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages",
        ),
    ],
)
def test_part_sample_at_reads_record(assets, name, annotations, images):
    """Record i: the json's images[i]."""
    root = assets / "dataset"
    (source,) = build_sem_seg_sources(root, [name], LISA)
    listed = json.loads((root / annotations).read_text())["images"]
    assert_records_read_by_index(source, [root / images / info["file_name"] for info in listed])
