"""Referring-segmentation training sources: prompts, masks (polygon, RLE, union, no-target),
GSVA's `[REJ]` for empty targets and its all-`[REJ]` redraws (unusable samples the mixer
redraws), `--refer_draw varied`, `--no_target_answer`, RefZOM, sampling, determinism,
`--exclude_val`, factories, the bad-record checks and the per-image `sample_at` of GSVA's
`--no_sampling`.

Upstream (the behaviour the expected values follow): GSVA LeapLabTHU/GSVA@618dc79
`data/refer_seg_dataset.py:270-281` (`masks[t].sum() < 1` -> `[REJ]`, all-`[REJ]` redrawn),
`data/refzom.py` (`Ref_ZOM.p`, `ann_id == []`); MMR jdg900/MMR@702a7b6
`utils/refer_seg_dataset.py:249-256` and LISA dvlab-research/LISA@3cb2d43
`utils/refer_seg_dataset.py:190` (a gRefCOCO `[-1]` target: zero mask, answered `[SEG]`)."""

from __future__ import annotations

import json
import math
import pickle
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.e2e import run, tiny_flags
from tests.utils import fixtures_refer as fx
from tests.utils.test_engine import free_port
from tests.utils.test_sem_seg import assert_records_read_by_index
from utils.datasets.base import DataError, SamplingOptions, UnusableSample
from utils.datasets.mixer import MAX_DRAWS, HybridDataset
from utils.datasets.refer_seg import ReferSegSource, build_refer_seg_sources
from utils.datasets.templates import REJ, SEG

LISA = SamplingOptions(
    num_classes_per_sample=3, prompt_style="lisa", use_expand_question_list=False
)
GSVA = SamplingOptions(num_classes_per_sample=5, prompt_style="gsva")
ZEROS = np.zeros((fx.H, fx.W), np.uint8)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.tiny_dataset_dir(tmp_path_factory)


def sentence_of(question: str, sentences: list[str]) -> str:
    """The one expression of `sentences` that the question contains (longest match wins)."""
    found = [s for s in sentences if s in question]
    assert found, question
    return max(found, key=len)


def test_lisa_samples_name_expressions_and_masks_match(tmp_path: Path) -> None:
    fx.write_refer(tmp_path)
    source = ReferSegSource(tmp_path, LISA, "refcoco")
    assert source.name == "refer_seg/refcoco" and len(source) == 2  # train images 1 and 2
    seen = set()
    for seed in range(12):
        sample = source.sample(np.random.default_rng(seed))
        assert sample.image.shape == (fx.H, fx.W, 3) and sample.masks.dtype == np.uint8
        assert len(sample.conversations) == len(sample.masks)
        sentences = [
            sentence_of(c[0][0], list(fx.REFCOCO_TRAIN_SENTENCES)) for c in sample.conversations
        ]
        assert len(set(sentences)) == len(sentences)  # drawn without replacement
        for conversation, sentence, mask in zip(
            sample.conversations, sentences, sample.masks, strict=True
        ):
            question, answer = conversation[0]
            assert question.startswith("<image>\n") and answer.count(SEG) == 1
            assert np.array_equal(mask, fx.ANN_MASKS[fx.REFCOCO_TRAIN_SENTENCES[sentence]])
            seen.add(sentence)
    assert seen == set(fx.REFCOCO_TRAIN_SENTENCES)  # polygon, RLE and two-polygon anns all used


def test_image_with_three_sentences_gives_all_three(tmp_path: Path) -> None:
    fx.write_refer(tmp_path)
    source = ReferSegSource(tmp_path, LISA, "refcoco")
    source.image_ids = [1]
    sample = source.sample(np.random.default_rng(0))
    questions = " ".join(c[0][0] for c in sample.conversations)
    assert all(s in questions for s in ("the red box", "left box", "round blob"))


def test_same_seed_same_sample(tmp_path: Path) -> None:
    fx.write_refer(tmp_path)
    source = ReferSegSource(tmp_path, SamplingOptions(prompt_style="mmr"), "refcoco")
    first, second = (source.sample(np.random.default_rng(7)) for _ in range(2))
    assert first.conversations == second.conversations
    assert np.array_equal(first.masks, second.masks) and first.image_path == second.image_path


def test_grefcoco_union_and_no_target(tmp_path: Path) -> None:
    fx.write_refer(tmp_path, "grefcoco", fx.grefcoco_refs(), "grefs(unc).json")
    options = SamplingOptions(num_classes_per_sample=5, prompt_style="gsva")
    source = build_refer_seg_sources(tmp_path, ["grefcoco"], options)[0]
    source.image_ids = [1]
    sample = source.sample(np.random.default_rng(0))
    ((question, answer),) = sample.conversations[0]
    assert "both things" in question and "the purple cat" in question
    assert answer.count(SEG) + answer.count(REJ) == len(sample.masks) == 2
    # each token follows its own expression: split the answer after every token
    pieces = re.findall(r"(.*?)\[(SEG|REJ)\]", answer)
    expected = {
        "both things": ("SEG", fx.ANN_MASKS[11] | fx.ANN_MASKS[12]),
        "the purple cat": ("REJ", np.zeros((fx.H, fx.W), np.uint8)),
    }
    for (text, token), mask in zip(pieces, sample.masks, strict=True):
        name = next(n for n in expected if n in text)
        assert token == expected[name][0] and np.array_equal(mask, expected[name][1])


def mixed(source: ReferSegSource, length: int) -> list:
    """`length` items of the weighted mix over `source` alone (redraws as in training)."""
    return [HybridDataset([("refer_seg", [source])], [1], length)[i] for i in range(length)]


def test_gsva_style_all_reject_samples_are_unusable_and_redrawn(tmp_path: Path) -> None:
    refs = [fx.ref(1, 1, [-1], "train", ["nothing"]), fx.ref(2, 2, [21], "train", ["parts"])]
    fx.write_refer(tmp_path, "grefcoco", refs, "grefs(unc).p")
    source = ReferSegSource(tmp_path, SamplingOptions(prompt_style="gsva"), "grefcoco")
    assert source.image_ids == [1, 2]
    with pytest.raises(UnusableSample, match="every sentence drawn for image 1 is answered"):
        source.sample_at(0, np.random.default_rng(0))
    assert SEG in source.sample_at(1, np.random.default_rng(0)).conversations[0][0][1]
    # the mixer draws another image of the family, as GSVA's `return self.__getitem__(0)`
    items = mixed(source, 12)
    assert all(SEG in item.conversations[0][0][1] for item in items)


VARIED = SamplingOptions(num_classes_per_sample=3, prompt_style="gsva", refer_draw="varied")


def test_varied_draw_asks_one_to_the_most_sentences_uniformly(tmp_path: Path) -> None:
    # image 1: four sentences over two refs; at most 3 per sample, so 1, 2 or 3, each a third
    refs = [
        fx.ref(1, 1, [11], "train", ["the red box", "a box"]),
        fx.ref(2, 1, [-1], "train", ["the purple cat", "a dog"]),
    ]
    fx.write_refer(tmp_path, "grefcoco", refs, "grefs(unc).json")
    source = ReferSegSource(tmp_path, VARIED, "grefcoco")
    draws = 600
    counts = np.bincount(
        [len(source.sample_at(0, np.random.default_rng(seed)).masks) for seed in range(draws)],
        minlength=5,
    )
    assert counts[0] == counts[4] == 0
    # each count's share within 5 standard deviations of a third
    spread = 5 * math.sqrt(draws * (1 / 3) * (2 / 3))
    assert all(abs(int(c) - draws / 3) < spread for c in counts[1:4]), counts
    # the reference draw always asks about three
    reference = ReferSegSource(tmp_path, replace(VARIED, refer_draw="reference"), "grefcoco")
    assert {len(reference.sample_at(0, np.random.default_rng(s)).masks) for s in range(20)} == {3}


def test_varied_draw_keeps_samples_whose_every_sentence_is_absent(tmp_path: Path) -> None:
    refs = [fx.ref(1, 1, [-1], "train", ["nothing"]), fx.ref(2, 2, [21], "train", ["parts"])]
    fx.write_refer(tmp_path, "grefcoco", refs, "grefs(unc).p")
    sample = ReferSegSource(tmp_path, VARIED, "grefcoco").sample_at(0, np.random.default_rng(0))
    ((question, answer),) = sample.conversations[0]
    assert "nothing" in question and fx.answer_tokens(sample.conversations) == [REJ]
    assert np.array_equal(sample.masks, ZEROS[None])
    # so a source of only no-target images trains instead of stopping
    refs = [fx.ref(1, 1, [-1], "train", ["nothing"]), fx.ref(2, 2, [-1], "train", ["no one"])]
    fx.write_refer(tmp_path, "grefcoco", refs, "grefs(unc).p")
    source = ReferSegSource(tmp_path, VARIED, "grefcoco")
    assert all(fx.answer_tokens(item.conversations) == [REJ] for item in mixed(source, 4))


def gsva_tokens(sample) -> list[tuple[str, str, np.ndarray]]:
    """(text before the token, "SEG" or "REJ", mask) for each target of a gsva-style sample."""
    ((_, answer),) = sample.conversations[0]
    pieces = re.findall(r"(.*?)\[(SEG|REJ)\]", answer)
    assert len(pieces) == len(sample.masks)
    return [(text, token, mask) for (text, token), mask in zip(pieces, sample.masks, strict=True)]


def test_gsva_style_rejects_targets_with_empty_masks(tmp_path: Path) -> None:
    # GSVA data/refer_seg_dataset.py:275: any target whose mask sums below 1 is [REJ], also a
    # refCOCO annotation that decodes to no pixel
    refs = [
        fx.ref(100, 1, 11, "train", ["the red box"]),
        fx.ref(102, 1, fx.EMPTY_ANN_ID, "train", ["the empty box"]),
    ]
    fx.write_refer(tmp_path, refs=refs, instances_json=fx.instances([fx.empty_annotation()]))
    sample = ReferSegSource(tmp_path, GSVA, "refcoco").sample(np.random.default_rng(0))
    expected = {"the red box": ("SEG", fx.ANN_MASKS[11]), "the empty box": ("REJ", ZEROS)}
    got = gsva_tokens(sample)
    assert len(got) == len(expected)
    for text, token, mask in got:
        name = next(n for n in expected if n in text)
        assert token == expected[name][0] and np.array_equal(mask, expected[name][1])
    # LISA answers every refCOCO sentence [SEG] (LISA utils/refer_seg_dataset.py:169)
    lisa = ReferSegSource(tmp_path, LISA, "refcoco").sample(np.random.default_rng(0))
    assert fx.answer_tokens(lisa.conversations) == [SEG, SEG]


def test_all_reject_redraws_count_empty_masks_as_absent(tmp_path: Path) -> None:
    refs = [
        fx.ref(102, 1, fx.EMPTY_ANN_ID, "train", ["the empty box"]),
        fx.ref(200, 2, 21, "train", ["two parts"]),
    ]
    fx.write_refer(tmp_path, refs=refs, instances_json=fx.instances([fx.empty_annotation()]))
    source = ReferSegSource(tmp_path, GSVA, "refcoco")
    with pytest.raises(UnusableSample):
        source.sample_at(source.image_ids.index(1), np.random.default_rng(0))
    for sample in mixed(source, 6):
        assert [token for _, token, _ in gsva_tokens(sample)] == ["SEG"]
        assert np.array_equal(sample.masks[0], fx.ANN_MASKS[21])


def test_a_source_of_only_no_target_images_stops_with_a_clear_error(tmp_path: Path) -> None:
    # GSVA would redraw forever; the mixer gives up after MAX_DRAWS draws (no [REJ]-only sample)
    refs = [fx.ref(1, 1, [-1], "train", ["nothing"]), fx.ref(2, 2, [-1], "train", ["no one"])]
    fx.write_refer(tmp_path, "grefcoco", refs, "grefs(unc).p")
    source = ReferSegSource(tmp_path, GSVA, "grefcoco")
    for index in range(len(source)):
        with pytest.raises(UnusableSample):
            source.sample_at(index, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match=f"{MAX_DRAWS} draws in a row gave unusable samples"):
        mixed(source, 1)


@pytest.mark.parametrize(
    ("style", "answer", "token"),
    [
        ("lisa", "rej", REJ),
        ("lisa", "empty_seg", SEG),
        ("mmr", "rej", REJ),
        ("mmr", "empty_seg", SEG),
        ("gsva", "empty_seg", REJ),  # GSVA always rejects an empty target
    ],
)
def test_no_target_answer(tmp_path: Path, style: str, answer: str, token: str) -> None:
    fx.write_refer(tmp_path, "grefcoco", fx.grefcoco_refs(), "grefs(unc).json")
    options = SamplingOptions(num_classes_per_sample=3, prompt_style=style, no_target_answer=answer)
    source = ReferSegSource(tmp_path, options, "grefcoco")
    source.image_ids = [1]  # "both things" (anns 11 and 12) and "the purple cat" (no target)
    sample = source.sample(np.random.default_rng(0))
    tokens = fx.answer_tokens(sample.conversations)
    assert len(tokens) == len(sample.masks) == 2
    questions = [q for conversation in sample.conversations for q, _ in conversation]
    if style == "gsva":
        order = [0, 1] if questions[0].index("both") < questions[0].index("purple") else [1, 0]
    else:  # one target per question here (two targets, up to three questions)
        order = [0 if "both things" in q else 1 for q in questions]
    expected = [(SEG, fx.ANN_MASKS[11] | fx.ANN_MASKS[12]), (token, ZEROS)]
    for position, target in enumerate(order):
        assert tokens[position] == expected[target][0]
        assert np.array_equal(sample.masks[position], expected[target][1])


def test_refzom_training_source(tmp_path: Path) -> None:
    fx.write_refer(tmp_path, "refzom", fx.refzom_refs(), "Ref_ZOM.p")
    (source,) = build_refer_seg_sources(tmp_path, "refzom", GSVA)
    assert source.name == "refer_seg/refzom" and source.image_ids == [1, 2]
    assert source.heldout_image_ids() == {3} and list(source.check(deep=True)) == []
    source.image_ids = [1]
    sample = source.sample(np.random.default_rng(0))
    assert "refer_seg/images/mscoco/images/train2014/" in sample.image_path
    expected = {
        "both things": ("SEG", fx.ANN_MASKS[11] | fx.ANN_MASKS[12]),
        "the purple cat": ("REJ", ZEROS),  # ann_id == []
    }
    got = gsva_tokens(sample)
    assert len(got) == len(expected)
    for text, token, mask in got:
        name = next(n for n in expected if n in text)
        assert token == expected[name][0] and np.array_equal(mask, expected[name][1])


def test_exclude_val_drops_heldout_images(tmp_path: Path) -> None:
    fx.write_refer(tmp_path)
    fx.write_refer(tmp_path, "refcocog", refs_name="refs(umd).p")
    assert [len(s) for s in build_refer_seg_sources(tmp_path, "refcoco||refcocog", LISA)] == [2, 2]
    sources = build_refer_seg_sources(
        tmp_path, ["refcoco", "refcocog"], replace(LISA, exclude_val=True)
    )
    assert [s.image_ids for s in sources] == [[1], [1]]  # image 2 has a testB ref


def test_factory_names_and_files(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="refclef, refcoco, refcoco\\+, refcocog, grefcoco, refzom"
    ):
        build_refer_seg_sources(tmp_path, ["refcoco", "refcocoX"], LISA)
    fx.write_refer(tmp_path, "refcocog", refs_name="refs(unc).p")  # wrong split file for umd
    with pytest.raises(DataError, match=r"refs\(umd\)\.p"):
        build_refer_seg_sources(tmp_path, ["refcocog"], LISA)
    fx.write_refer(tmp_path, "refclef", images=False)
    fx.write_images(tmp_path, "refer_seg/images/saiapr_tc-12")
    sample = build_refer_seg_sources(tmp_path, ["refclef"], LISA)[0].sample(
        np.random.default_rng(0)
    )
    assert "refer_seg/images/saiapr_tc-12/" in sample.image_path


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"not a pickle", "cannot be read"),
        (pickle.dumps([]), "holds no refs"),
        (pickle.dumps({"a": 1}), "expected a list"),
    ],
)
def test_unreadable_refs_raise(tmp_path: Path, content: bytes, problem: str) -> None:
    directory = fx.write_refer(tmp_path)
    (directory / "refs(unc).p").write_bytes(content)
    with pytest.raises(DataError, match=problem) as error:
        ReferSegSource(tmp_path, LISA, "refcoco")
    assert error.value.file.endswith("refs(unc).p")


@pytest.mark.parametrize(
    ("content", "problem"),
    [("{broken", "not valid json"), (json.dumps({"images": [], "annotations": []}), "no images")],
)
def test_bad_instances_raise(tmp_path: Path, content: str, problem: str) -> None:
    directory = fx.write_refer(tmp_path)
    (directory / "instances.json").write_text(content)
    with pytest.raises(DataError, match=problem) as error:
        ReferSegSource(tmp_path, LISA, "refcoco")
    assert error.value.file.endswith("instances.json")


def test_missing_files_name_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"refer_seg/refcoco/refs\(unc\)\.p"):
        ReferSegSource(tmp_path, LISA, "refcoco")


def bad_dataset(tmp_path: Path) -> Path:
    """The refcoco fixture plus one bad training ref of every kind."""
    extra_images = [
        {"id": 4, "file_name": "COCO_missing.jpg", "height": fx.H, "width": fx.W},
        {"id": 5, "file_name": "../../../../escape.jpg", "height": fx.H, "width": fx.W},
    ]
    extra_anns = [
        {"id": 41, "image_id": 1, "segmentation": [[1, 1, 5, 1]]},
        {"id": 42, "image_id": 1, "segmentation": {"size": [fx.H + 1, fx.W], "counts": "abc"}},
    ]
    bad_refs = [
        fx.ref(900, 4, 11, "train", ["no image"]),
        fx.ref(901, 5, 11, "train", ["escaping"]),
        fx.ref(902, 1, 41, "train", ["two points"]),
        fx.ref(903, 1, 42, "train", ["wrong size"]),
        fx.ref(904, 1, 999, "train", ["absent ann"]),
        {k: v for k, v in fx.ref(905, 1, 11, "train", ["no split"]).items() if k != "split"},
    ]
    fx.write_refer(
        tmp_path,
        refs=fx.refcoco_refs() + bad_refs,
        instances_json=fx.instances(extra_anns, extra_images),
    )
    return tmp_path


def test_check_reports_every_bad_record(tmp_path: Path) -> None:
    source = ReferSegSource(bad_dataset(tmp_path), LISA, "refcoco")
    problems = [str(error) for error in source.check()]
    refs, instances = "refs(unc).p", "instances.json"
    expected = {
        "ref_id 900": (refs, "does not exist"),
        "ref_id 901": (refs, "escapes the dataset root"),
        "ref_id 902, annotation id 41": (instances, "polygon 0 has 2 points"),
        "ref_id 903, annotation id 42": (instances, f"RLE size [{fx.H + 1}, {fx.W}] differs"),
        "ref_id 904": (refs, "ann_id 999 is not in instances.json"),
        "ref_id 905": (refs, "missing required field(s) ['split']"),
    }
    assert len(problems) == len(expected), problems
    for record, (file, problem) in expected.items():
        hits = [p for p in problems if f"{file}, record {record}: " in p and problem in p]
        assert len(hits) == 1, (record, problems)


def test_degenerate_polygon_part_is_dropped_with_a_warning(tmp_path: Path) -> None:
    segmentation = [fx.box_polygon(2, 10, 3, 12), [1, 1, 5, 1]]
    extra = [{"id": 43, "image_id": 3, "segmentation": segmentation}]
    refs = [fx.ref(906, 3, 43, "train", ["the box and a sliver"])]
    fx.write_refer(tmp_path, refs=refs, instances_json=fx.instances(extra))
    source = ReferSegSource(tmp_path, LISA, "refcoco")
    (warning,) = source.check(deep=True)
    assert not warning.fatal and "ref_id 906, annotation id 43: polygon 1 has 2" in str(warning)
    sample = source.sample(np.random.default_rng(0))
    assert np.array_equal(sample.masks, fx.ANN_MASKS[11][None])


def test_deep_check_reports_undecodable_image(tmp_path: Path) -> None:
    fx.write_refer(tmp_path)
    assert list(ReferSegSource(tmp_path, LISA, "refcoco").check(deep=True)) == []
    (tmp_path / fx.TRAIN2014 / fx.coco_name(2)).write_bytes(b"not an image")
    source = ReferSegSource(tmp_path, LISA, "refcoco")
    assert list(source.check()) == []
    (problem,) = source.check(deep=True)
    assert "ref_id 200" in str(problem) and "not a readable image" in str(problem)


def test_sample_raises_on_bad_record(tmp_path: Path) -> None:
    source = ReferSegSource(bad_dataset(tmp_path), LISA, "refcoco")
    for record, message in [(903, "RLE size"), (904, "ann_id 999"), (900, "does not exist")]:
        image_id = {903: 1, 904: 1, 900: 4}[record]
        source.image_ids = [image_id]
        source.refs_by_image[image_id] = [r for r in source.index.refs if r.ref_id == record]
        with pytest.raises(DataError, match=message) as error:
            source.sample(np.random.default_rng(0))
        assert f"ref_id {record}" in str(error.value)


def test_sample_rejects_image_of_another_size(tmp_path: Path) -> None:
    fx.write_refer(tmp_path)
    fx.write_image(tmp_path / fx.TRAIN2014 / fx.coco_name(2), shape=(fx.H, fx.W + 1))
    source = ReferSegSource(tmp_path, LISA, "refcoco")
    source.image_ids = [2]
    with pytest.raises(DataError, match=f"is {fx.W + 1}x{fx.H} but instances.json says"):
        source.sample(np.random.default_rng(0))
    (problem,) = source.check(deep=True)
    assert "record ref_id 200" in str(problem)


@pytest.mark.parametrize(
    "name", ["refclef", "refcoco", "refcoco+", "refcocog", "grefcoco", "refzom"]
)
def test_tiny_assets_sources(tiny_dataset: Path, name: str) -> None:
    style = "gsva" if name in ("grefcoco", "refzom") else "lisa"
    options = SamplingOptions(num_classes_per_sample=3, prompt_style=style)
    (source,) = build_refer_seg_sources(tiny_dataset, [name], options)
    assert len(source) > 0 and list(source.check(deep=True)) == []
    for seed in range(6):
        sample = source.sample(np.random.default_rng(seed))
        tokens = fx.answer_tokens(sample.conversations)
        assert len(tokens) == len(sample.masks) > 0
        assert sample.masks.shape[1:] == sample.image.shape[:2]
        for token, mask in zip(tokens, sample.masks, strict=True):
            assert mask.any() == (token == SEG)


# refs file and image folder of each dataset, as the reference loaders name them
REFS_FILES = {
    "refclef": ("refclef/refs(unc).p", "saiapr_tc-12"),
    "refcoco": ("refcoco/refs(unc).p", "mscoco/images/train2014"),
    "refcoco+": ("refcoco+/refs(unc).p", "mscoco/images/train2014"),
    "refcocog": ("refcocog/refs(umd).p", "mscoco/images/train2014"),
    "grefcoco": ("grefcoco/grefs(unc).json", "mscoco/images/train2014"),
    "refzom": ("refzom/Ref_ZOM.p", "mscoco/images/train2014"),
}


def training_image_paths(dataset_dir: Path, name: str) -> list[Path]:
    """The images with a "train" ref, in order of first appearance in the refs file."""
    root = dataset_dir / "refer_seg"
    refs_file, images = REFS_FILES[name]
    if refs_file.endswith(".json"):
        refs = json.loads((root / refs_file).read_text())
    else:
        refs = pickle.loads((root / refs_file).read_bytes())
    image_ids = list(dict.fromkeys(ref["image_id"] for ref in refs if ref["split"] == "train"))
    instances = json.loads((root / name / "instances.json").read_text())
    file_names = {info["id"]: info["file_name"] for info in instances["images"]}
    return [root / "images" / images / file_names[image_id] for image_id in image_ids]


@pytest.mark.parametrize("name", sorted(REFS_FILES))
@pytest.mark.parametrize("style", ["mmr", "gsva"])
def test_sample_at_reads_training_image(assets: Path, name: str, style: str) -> None:
    (source,) = build_refer_seg_sources(
        assets / "dataset", [name], SamplingOptions(prompt_style=style)
    )
    assert_records_read_by_index(source, training_image_paths(assets / "dataset", name))


def test_no_sampling_trains_one_pass_over_refcoco(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train_ds.py --no_sampling` (GSVA) on one process: an epoch is one pass over refCOCO's
    training images, in micro-batches of 2, one optimizer step each."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    batch = 2
    flags = tiny_flags(assets, tmp_path, "full_pass") + [
        "--no_sampling",
        "--dataset=refer_seg",
        "--refer_seg_data=refcoco",
        "--sample_rates=1",
        f"--batch_size={batch}",
        "--grad_accumulation_steps=1",
        "--epochs=1",
        "--no_eval",
    ]
    run([sys.executable, "train_ds.py", *flags])
    records = len(training_image_paths(assets / "dataset", "refcoco"))
    steps = math.ceil(records / batch)
    log = (tmp_path / "full_pass" / "train_ds.log").read_text()
    assert f"one pass over the {records} records of refer_seg/refcoco: {steps} micro-batches" in log
    progress = json.loads((tmp_path / "full_pass" / "progress.json").read_text())
    assert (progress["epoch"], progress["global_step"]) == (0, steps)
