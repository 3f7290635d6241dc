"""MMR (multi-target, object- and part-level reasoning segmentation): training and validation.

Files: `MMR/MMR_{train,val,test_obj_only,test_part_only,test_mixed}.json` under `--dataset_dir`;
images `refer_seg/images/mscoco/images/<file_name>` (file names start with "train2017/" or
"val2017/"). A record is one image with `questions[k]`, `answers[k]` (the annotations answering
question k, each a compressed RLE) and `text_answers[k]` (with one `{seg}` per answer).

Training (as the released M2SA loader, MMR utils/multi_part_reason_seg_dataset.py:121-158): an
image with n >= `num_classes_per_sample` (N) questions gets a random sample of N question indices,
one with fewer gets all of them in file order; each drawn question is its own conversation: a long
question template (`templates.question`) around the question text as written, answered by a text
answer with every `{seg}` made `[SEG]` and no ending added, one mask per `{seg}` in order (not
merged). `--mmr_pairing` says which answer a drawn question gets:
- "aligned" (default): its own (question k with `text_answers[k]` and `answers[k]`);
- "upstream": the released loader's `zip(sampled_sents, answers, text_answers)`: conversation k
  pairs the k-th sampled question with `text_answers[k]` and `answers[k]` (not re-indexed). With
  n >= N each conversation gets its own answer with probability 1/n, and answers N.. are never
  trained; with n < N it equals "aligned". This is the data of the published M2SA rows.
`{seg}` is filled by `str.replace`; upstream's `str.format(seg=...)` gives the same text for
every answer it accepts except ones with escaped braces `{{`/`}}`.

Validation (MMR utils/dataset.py:446-461, 486-529): every question of a record in file order,
stripped, in the validation template, answered with its own text answer + "." (not doubled).

A question whose `{seg}` count differs from `len(answers[k])` is a bad record: `check` reports it
and `sample`/`__getitem__` raise DataError, in both pairings. Upstream instead draws another
record (`return self[0]`, a random record since its index is ignored) when the text answer of a
drawn conversation k < `num_classes_per_sample` mismatches, and never looks at the others;
`--skip_bad_samples` draws another record here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.datasets.base import (
    DataError,
    Sample,
    SamplingOptions,
    ValidationSample,
    check_image,
    check_record_index,
    read_image,
    read_json,
    resolve_inside,
    stack_masks,
)
from utils.datasets.coco import check_segmentation, decode_segmentation
from utils.datasets.templates import SEG, question, validation_question

MMR_DIR = "MMR"
MMR_IMAGES = "refer_seg/images/mscoco/images"
MMR_TRAIN_JSON = "MMR_train.json"
MMR_VAL_JSON = "MMR_val.json"
SOURCE_NAME = "multi_part_reason_seg/MMR"
SEG_PLACEHOLDER = "{seg}"
REQUIRED_FIELDS = ("file_name", "questions", "answers", "text_answers")
RECORDS_DESCRIPTION = "non-empty JSON list of image records (MMR annotations)"


@dataclass(frozen=True)
class MMRQuestion:
    """Question k of a record: its text as written, its answer with `[SEG]`s, one annotation per
    `[SEG]`."""

    index: int
    text: str
    answer: str
    annotations: tuple[dict, ...]


def record_label(position: int, record: object) -> str:
    if isinstance(record, dict) and "image_id" in record:
        return f"#{position} (image_id {record['image_id']})"
    return f"#{position}"


def load_mmr_records(path: Path) -> list:
    """The records of one MMR json; DataError when missing, malformed or empty."""
    expected = f"expected <dataset_dir>/{MMR_DIR}/{path.name}, a {RECORDS_DESCRIPTION}"
    records = read_json(path, expected)
    if not isinstance(records, list):
        raise DataError(path, None, f"expected a {RECORDS_DESCRIPTION}")
    return records


def parse_questions(record: object, file: Path, label: str) -> list[MMRQuestion]:
    """The questions of a record with their answers, same index k; DataError on the first fault."""
    if not isinstance(record, dict):
        raise DataError(file, label, "is not a JSON object")
    missing = [key for key in REQUIRED_FIELDS if key not in record]
    if missing:
        raise DataError(file, label, f"missing required field(s) {missing}")
    questions, answers, texts = record["questions"], record["answers"], record["text_answers"]
    if not (isinstance(questions, list) and isinstance(answers, list) and isinstance(texts, list)):
        raise DataError(file, label, "questions, answers and text_answers must be lists")
    if not len(questions) == len(answers) == len(texts) > 0:
        raise DataError(
            file,
            label,
            f"{len(questions)} questions, {len(answers)} answers and "
            f"{len(texts)} text_answers (expected equal, non-zero counts)",
        )
    if not all(isinstance(item, str) for item in questions + texts):
        raise DataError(file, label, "questions and text_answers must be strings")
    parsed = []
    for k, (text, anns, answer) in enumerate(zip(questions, answers, texts, strict=True)):
        if not isinstance(anns, list) or not all(
            isinstance(a, dict) and "segmentation" in a for a in anns
        ):
            raise DataError(
                file, label, f"answers[{k}] is not a list of annotations with 'segmentation'"
            )
        placeholders = answer.count(SEG_PLACEHOLDER)
        if placeholders != len(anns):
            raise DataError(
                file,
                label,
                f"text_answers[{k}] has {placeholders} {SEG_PLACEHOLDER}"
                f" but answers[{k}] has {len(anns)} annotations",
            )
        parsed.append(MMRQuestion(k, text, answer.replace(SEG_PLACEHOLDER, SEG), tuple(anns)))
    return parsed


class MMRRecords:
    """The records of one MMR json, with per-record questions, images and masks."""

    def __init__(self, dataset_dir: Path, json_name: str) -> None:
        self.dataset_dir = Path(dataset_dir)
        mmr_dir = self.dataset_dir / MMR_DIR
        self.file = resolve_inside(mmr_dir, json_name, mmr_dir, json_name)
        self.records = load_mmr_records(self.file)
        self.image_root = self.dataset_dir / MMR_IMAGES

    def __len__(self) -> int:
        return len(self.records)

    def questions(self, position: int) -> tuple[str, list[MMRQuestion]]:
        """(record label, parsed questions) of record `position`."""
        label = record_label(position, self.records[position])
        return label, parse_questions(self.records[position], self.file, label)

    def image_path(self, position: int, label: str) -> Path:
        """The image of record `position`; DataError if its file name escapes the image root."""
        return resolve_inside(
            self.image_root, self.records[position]["file_name"], self.file, label
        )

    def image(self, position: int, label: str) -> tuple[np.ndarray, Path]:
        path = self.image_path(position, label)
        return read_image(path, self.file, label), path

    def masks(self, chosen: list[MMRQuestion], shape: tuple[int, int], label: str) -> np.ndarray:
        """uint8 [sum of answers, H, W]: each chosen question's answers in order, not merged."""
        decoded = [
            decode_segmentation(ann["segmentation"], shape, self.file, f"{label}, {where}")
            for q in chosen
            for where, ann in _answer_labels(q)
        ]
        return stack_masks(decoded, shape)

    def check(self, deep: bool = False) -> Iterator[DataError]:
        """Every bad record (fields, `{seg}` counts, RLE sizes, images), without raising."""
        for position, record in enumerate(self.records):
            label = record_label(position, record)
            try:
                parsed = parse_questions(record, self.file, label)
            except DataError as error:
                yield error
                continue
            shape = _declared_shape(record)
            try:
                image = check_image(self.image_path(position, label), self.file, label, deep)
                shape = image.shape[:2] if image is not None else shape
            except DataError as error:
                yield error
            for q in parsed:
                for where, ann in _answer_labels(q):
                    yield from check_segmentation(
                        ann["segmentation"], shape, self.file, f"{label}, {where}", deep
                    )


def _answer_labels(q: MMRQuestion) -> list[tuple[str, dict]]:
    """("answers[k][j]", annotation) for each annotation answering question k."""
    return [(f"answers[{q.index}][{j}]", ann) for j, ann in enumerate(q.annotations)]


def _declared_shape(record: dict) -> tuple[int, int] | None:
    if isinstance(record.get("height"), int) and isinstance(record.get("width"), int):
        return record["height"], record["width"]
    return None


def draw_question_indices(count: int, limit: int, rng: np.random.Generator) -> list[int]:
    """The questions an image trains on, as the released loader draws them: `limit` distinct
    indices in random order when `count >= limit`, else all `count` in file order."""
    if count >= limit:
        return [int(k) for k in rng.choice(count, size=limit, replace=False)]
    return list(range(count))


def pair_questions(
    parsed: list[MMRQuestion], drawn: list[int], pairing: str
) -> list[tuple[str, MMRQuestion]]:
    """(question text, the MMRQuestion whose answer and annotations it is trained with) per
    conversation: "aligned" pairs question `drawn[k]` with its own answer, "upstream" with
    answer k (`zip(sampled_sents, answers, text_answers)` in the released loader)."""
    if pairing == "aligned":
        return [(parsed[i].text, parsed[i]) for i in drawn]
    return [(parsed[i].text, parsed[k]) for k, i in enumerate(drawn)]


class MMRSource:
    """MMR training source: per image up to `num_classes_per_sample` drawn questions, each its
    own conversation, paired with answers as `options.mmr_pairing` says (module docstring)."""

    def __init__(
        self, dataset_dir: Path, options: SamplingOptions, json_name: str = MMR_TRAIN_JSON
    ) -> None:
        self.name = SOURCE_NAME
        self.options = options
        self.data = MMRRecords(dataset_dir, json_name)

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """Record `index` with its drawn questions as conversations; masks uint8
        [#[SEG], H, W]."""
        position = check_record_index(index, len(self), self.name)
        label, parsed = self.data.questions(position)
        drawn = draw_question_indices(len(parsed), self.options.num_classes_per_sample, rng)
        pairs = pair_questions(parsed, drawn, self.options.mmr_pairing)
        image, path = self.data.image(position, label)
        expand = self.options.use_expand_question_list
        conversations = [
            [(question([text], True, rng, expand), answered.answer)] for text, answered in pairs
        ]
        masks = self.data.masks([answered for _, answered in pairs], image.shape[:2], label)
        return Sample(image, conversations, masks, str(path), self.name)

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from self.data.check(deep)


def build_mmr_source(
    dataset_dir: Path, options: SamplingOptions, json_name: str = MMR_TRAIN_JSON
) -> MMRSource:
    """The `multi_part_reason_seg` training source of `MMR/<json_name>`."""
    return MMRSource(Path(dataset_dir), options, json_name)


def build_mmr_sources(
    dataset_dir: Path, names: Sequence[str], options: SamplingOptions
) -> list[MMRSource]:
    """The mixer's factory: one source per name, a json file under `MMR/` ("MMR" alone means
    MMR_train.json); ValueError naming the accepted forms otherwise."""
    sources = []
    for name in names or [MMR_TRAIN_JSON]:
        json_name = MMR_TRAIN_JSON if name == MMR_DIR else name
        if not json_name.endswith(".json"):
            raise ValueError(
                f"unknown multi_part_reason_seg data {name!r}; expected {MMR_DIR!r} "
                f"or a json file name under {MMR_DIR}/ such as {MMR_TRAIN_JSON!r}"
            )
        sources.append(build_mmr_source(dataset_dir, options, json_name))
    return sources


def validation_answer(answer: str) -> str:
    """The answer with a final "." (as MMR's validation), not doubled."""
    return answer if answer.endswith(".") else answer + "."


class MMRValidation:
    """MMR validation (`MultiPartReasonSeg|<split>` + `--val_json_name`): per image record, each
    question its own teacher-forced conversation; one target per `[SEG]`, in order."""

    def __init__(
        self, dataset_dir: Path, json_name: str = MMR_VAL_JSON, split: str = "val"
    ) -> None:
        self.data = MMRRecords(dataset_dir, json_name)
        self.name = f"MultiPartReasonSeg|{split} ({json_name})"

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, position: int) -> ValidationSample:
        label, parsed = self.data.questions(position)
        image, path = self.data.image(position, label)
        conversations = [
            [(validation_question(q.text.strip(), True), validation_answer(q.answer))]
            for q in parsed
        ]
        names = [
            str(ann.get("category_name", q.text.strip())) for q in parsed for ann in q.annotations
        ]
        record = self.data.records[position]
        return ValidationSample(
            image,
            conversations,
            self.data.masks(parsed, image.shape[:2], label),
            str(path),
            SOURCE_NAME,
            target_names=names,
            record_id=str(record.get("image_id", record["file_name"])),
        )

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from self.data.check(deep)
