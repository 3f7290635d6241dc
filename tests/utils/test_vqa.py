"""LLaVA-Instruct VQA source: `<image>` moved to the first question, a non-human first turn
dropped, no masks, record checks and determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.utils import fixtures_sem as fx
from tests.utils.test_sem_seg import assert_records_read_by_index
from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.templates import IMAGE_PREFIX, SEG
from utils.datasets.vqa import VqaSource, build_vqa_sources

OPTIONS = SamplingOptions()
INDEX = "llava_dataset/llava_instruct_150k.json"


def turn(who: str, value: str) -> dict:
    return {"from": who, "value": value}


def write_vqa(root, extra: list | None = None) -> dict[str, list[tuple[str, str]]]:
    """Two good dialogues (+ `extra` records); returns {image file: expected rounds}."""
    records = [
        {
            "id": "a",
            "image": "000000000001.jpg",
            "conversations": [
                turn("human", "What is this?\n<image>"),
                turn("gpt", "A cat."),
                turn("human", "Its colour? <image>"),
                turn("gpt", "Black."),
            ],
        },
        {
            "id": "b",
            "image": "000000000002.jpg",
            "conversations": [
                turn("gpt", "Hello."),
                turn("human", "Describe it."),
                turn("gpt", "A dog."),
            ],
        },
    ]
    for seed, record in enumerate(records):
        fx.write_jpeg(root / "coco/train2017" / record["image"], seed)
    fx.write_json(root / INDEX, records + (extra or []))
    return {
        "000000000001.jpg": [(IMAGE_PREFIX + "What is this?", "A cat."), ("Its colour?", "Black.")],
        "000000000002.jpg": [(IMAGE_PREFIX + "Describe it.", "A dog.")],
    }


def test_dialogue_is_one_conversation_without_masks(tmp_path):
    truth = write_vqa(tmp_path)
    (source,) = build_vqa_sources(tmp_path, ["llava_instruct_150k"], OPTIONS)
    assert len(source) == 2 and source.name == "vqa/llava_instruct_150k"
    seen = set()
    for seed in fx.RNG_SEEDS:
        sample = source.sample(np.random.default_rng(seed))
        name = sample.image_path.rsplit("/", 1)[-1]
        assert sample.conversations == [truth[name]]
        assert sample.masks.shape == (0, fx.H, fx.W) and sample.masks.dtype == np.uint8
        assert sample.image.shape == (fx.H, fx.W, 3)
        assert not any(SEG in answer for _, answer in sample.conversations[0])
        seen.add(name)
    assert seen == set(truth)


def test_same_seed_same_sample(tmp_path):
    write_vqa(tmp_path)
    source = VqaSource(tmp_path, OPTIONS)
    first, second = (source.sample(np.random.default_rng(3)) for _ in range(2))
    assert first.conversations == second.conversations and first.image_path == second.image_path


def test_missing_or_malformed_index(tmp_path):
    with pytest.raises(DataError, match="llava_dataset/llava_instruct_150k.json: file does not"):
        VqaSource(tmp_path, OPTIONS)
    (tmp_path / "llava_dataset").mkdir()
    (tmp_path / INDEX).write_text("[{")
    with pytest.raises(DataError, match="is not valid json"):
        VqaSource(tmp_path, OPTIONS)
    (tmp_path / INDEX).write_text(json.dumps({"a": 1}))
    with pytest.raises(DataError, match="expected a json list"):
        VqaSource(tmp_path, OPTIONS)


def test_check_finds_each_bad_record(tmp_path):
    talk = [turn("human", "<image>\nQ?"), turn("gpt", "A.")]
    extra = [
        {"id": "missing", "image": "000000000009.jpg", "conversations": talk},
        {"id": "no image field", "conversations": talk},
        {"id": "out", "image": "../../../outside.jpg", "conversations": talk},
        {"id": "order", "image": "000000000001.jpg", "conversations": talk[::-1] + talk},
        {"id": "unanswered", "image": "000000000001.jpg", "conversations": talk + talk[:1]},
        {"id": "bad turn", "image": "000000000001.jpg", "conversations": [{"from": "human"}]},
        {"id": "corrupt", "image": "000000000003.jpg", "conversations": talk},
    ]
    write_vqa(tmp_path, extra)
    (tmp_path / "coco/train2017/000000000003.jpg").write_bytes(b"\xff\xd8 truncated")
    source = VqaSource(tmp_path, OPTIONS)
    shallow = [str(error) for error in source.check()]
    expected = [
        "record 2 (id missing): image",
        "record 3 (id no image field): missing field 'image'",
        "record 4 (id out): path '../../../outside.jpg' escapes",
        "record 5 (id order): turns do not alternate",
        "record 6 (id unanswered): turns do not alternate",
        "record 7 (id bad turn): turn 0 is not",
    ]
    assert len(shallow) == len(expected)
    for message, part in zip(shallow, expected, strict=True):
        assert "llava_instruct_150k.json, " + part in message, message
    deep = [str(error) for error in source.check(deep=True)]
    assert deep[:-1] == shallow and "record 8 (id corrupt): image" in deep[-1]
    assert "not a readable image" in deep[-1]


def test_sample_raises_on_bad_record(tmp_path):
    write_vqa(tmp_path)
    records = json.loads((tmp_path / INDEX).read_text())
    records[1]["image"] = "000000000404.jpg"
    records[0]["image"] = "000000000404.jpg"
    fx.write_json(tmp_path / INDEX, records)
    source = VqaSource(tmp_path, OPTIONS)
    with pytest.raises(DataError, match=r"json, record \d \(id \w\): image .*000000000404.jpg"):
        source.sample(np.random.default_rng(0))


def test_tiny_assets_load(tmp_path):
    from tools.make_tiny_assets import make_tiny_assets

    root = make_tiny_assets(tmp_path, 0, families=["vqa"], models=False) / "dataset"
    (source,) = build_vqa_sources(root, ["llava_instruct_150k"], OPTIONS)
    assert len(source) > 0 and list(source.check(deep=True)) == []
    for seed in range(5):
        sample = source.sample(np.random.default_rng(seed))
        questions = [question for question, _ in sample.conversations[0]]
        assert questions[0].startswith(IMAGE_PREFIX)
        assert sum(question.count("<image>") for question in questions) == 1
        assert sample.masks.shape == (0, *sample.image.shape[:2])


def test_sample_at_reads_dialogue(assets):
    """Record i: the json's dialogue i (its image under coco/train2017)."""
    root = assets / "dataset"
    records = json.loads((root / INDEX).read_text())
    (source,) = build_vqa_sources(root, ["llava_instruct_150k"], OPTIONS)
    paths = [root / "coco/train2017" / record["image"] for record in records]
    assert_records_read_by_index(source, paths)
