"""Visual question answering (LISA's `vqa` task, `--vqa_data`): LLaVA-Instruct dialogues.

`llava_dataset/<name>.json` is a list of `{id, image, conversations: [{from, value}]}` with images
under `coco/train2017/`. The whole dialogue is one conversation of (human, gpt) rounds: a
non-human first turn is dropped, `<image>` is removed wherever it occurs and put at the start of
the first question, and the sample has no masks (its answers hold no `[SEG]`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from utils.datasets.base import (
    IMAGE_PLACEHOLDER,
    DataError,
    Sample,
    SamplingOptions,
    Source,
    check_image,
    check_record_index,
    read_image,
    read_json,
    resolve_inside,
    stack_masks,
)
from utils.datasets.templates import IMAGE_PREFIX

VQA_DIR = "llava_dataset"
VQA_IMAGE_DIR = "coco/train2017"
HUMAN, GPT = "human", "gpt"


def dialogue_rounds(turns: object, file: str | Path, record: object) -> list[tuple[str, str]]:
    """(question, answer) rounds of a LLaVA dialogue; the first question starts with
    IMAGE_PREFIX. DataError unless, after dropping a non-human first turn, the turns alternate
    human/gpt from a human one and end with a gpt one."""
    if not isinstance(turns, list) or not turns:
        raise DataError(file, record, "missing field 'conversations' (a non-empty list)")
    for position, turn in enumerate(turns):
        valid = isinstance(turn, dict) and isinstance(turn.get("value"), str)
        if not valid or turn.get("from") not in (HUMAN, GPT):
            raise DataError(file, record, f"turn {position} is not {{from: human|gpt, value: str}}")
    if turns[0]["from"] != HUMAN:
        turns = turns[1:]
    expected = [HUMAN if position % 2 == 0 else GPT for position in range(len(turns))]
    if not turns or len(turns) % 2 or [turn["from"] for turn in turns] != expected:
        raise DataError(
            file, record, "turns do not alternate human/gpt, starting human and ending gpt"
        )
    values = [without_image(turn["value"]) for turn in turns]
    values[0] = IMAGE_PREFIX + values[0]
    return list(zip(values[0::2], values[1::2], strict=True))


def without_image(text: str) -> str:
    """`text` with every `<image>` removed (and then stripped, as LLaVA does); else unchanged."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


class VqaSource:
    """LLaVA-Instruct dialogues about COCO images (`len` = number of dialogues)."""

    def __init__(
        self, dataset_dir: Path, options: SamplingOptions, dataset: str = "llava_instruct_150k"
    ) -> None:
        self.name, self.options = f"vqa/{dataset}", options
        self.file = Path(dataset_dir) / VQA_DIR / f"{dataset}.json"
        self.image_dir = Path(dataset_dir) / VQA_IMAGE_DIR
        hint = f"--vqa_data {dataset} reads {VQA_DIR}/{dataset}.json under --dataset_dir"
        records = read_json(self.file, hint)
        if not isinstance(records, list):
            raise DataError(self.file, None, "expected a json list of dialogues", hint)
        self.records: list = records

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[str, Path, list[tuple[str, str]]]:
        """(record name, image path, rounds) of record `index`; DataError if it is malformed."""
        record = self.records[index]
        name = f"{index} (id {record.get('id')})" if isinstance(record, dict) else str(index)
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise DataError(self.file, name, "missing field 'image'")
        rounds = dialogue_rounds(record.get("conversations"), self.file, name)
        return name, resolve_inside(self.image_dir, record["image"], self.file, name), rounds

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """Dialogue `index` as one conversation, no masks (`rng` is not used: nothing is drawn)."""
        name, path, rounds = self.load(check_record_index(index, len(self), self.name))
        image = read_image(path, self.file, name)
        return Sample(image, [rounds], stack_masks([], image.shape[:2]), str(path), self.name)

    def check(self, deep: bool = False) -> Iterator[DataError]:
        for index in range(len(self.records)):
            try:
                name, path, _ = self.load(index)
                check_image(path, self.file, name, deep)
            except DataError as error:
                yield error


def build_vqa_sources(
    dataset_dir: str | Path, names: list[str], options: SamplingOptions
) -> list[Source]:
    """One source per `--vqa_data` name ("llava_instruct_150k" -> llava_dataset/<name>.json)."""
    return [VqaSource(Path(dataset_dir), options, name) for name in names]
