"""The `custom` family: your own images, questions and masks in one documented format
(`utils/datasets/custom_schema.json` defines it; docs/CUSTOM_DATA.md explains it).

A file is JSON (a list of image records, or an object whose "images" holds them) or JSONL (one
record per line). A record names its image (`file_name`, relative to the file's image root), its
`height` and `width`, and its `conversations`; each conversation is a list of turns {question,
answer}, or an object {"turns": [...], "masks": [...]}. Every `{seg}` (a target to segment) and
`{rej}` (a named target that is not in the image) of an answer is a target, filled in order from
the conversation's own `masks` or, for a list-form conversation, from the record's `masks`
(conversation by conversation, left to right). A target is {"phrase"} plus, for `{seg}`, its
mask: "segmentation" (COCO RLE, compressed or not, or polygons) or {"png", "value"} (a label PNG
relative to the annotation file's folder, and the value to take); "ignore" (a segmentation)
marks pixels left out of the loss and the metrics.

Entries (`--custom_data`, "||"-joined; `--val_dataset "custom|<entry>"`): `FILE[@IMAGE_ROOT]`,
and in training `FILE[@IMAGE_ROOT][:WEIGHT]`; relative paths are read under `--dataset_dir`, the
image root defaults to the file's folder, the weight (default 1) is the file's share of the
family's draws.

Training: per record up to `--num_classes_per_sample` conversations (as MMR draws questions:
a random sample when it has more, else all in order), each with all its turns, the text as
written (`{seg}` -> `[SEG]`, `{rej}` -> `[REJ]`), the image placeholder before the first
question; "ignore" pixels follow `--ignore_pixels` as ReasonSeg's (background, or excluded from
the loss). Validation: every conversation of every record, teacher-forced, one target per
placeholder named by its phrase.

Errors name the file, the record (index, and line for JSONL) and the field, e.g.
`mine.jsonl, record 3 (line 4): conversations[0]: its answers hold 2 placeholders but its masks
has 1 target`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from utils.datasets.base import (
    IGNORE_LABEL,
    DataError,
    Sample,
    SamplingOptions,
    ValidationSample,
    check_image,
    check_record_index,
    read_image,
    read_label_map,
    resolve_inside,
    stack_masks,
)
from utils.datasets.coco import decode_segmentation
from utils.datasets.mmr import draw_question_indices
from utils.datasets.reason_seg import training_mask
from utils.datasets.templates import IMAGE_PREFIX, REJ, SEG

FAMILY = "custom"
SCHEMA_PATH = Path(__file__).with_name("custom_schema.json")
SEG_PLACEHOLDER, REJ_PLACEHOLDER = "{seg}", "{rej}"
PLACEHOLDERS = re.compile(r"\{seg\}|\{rej\}")
TOKENS = {SEG_PLACEHOLDER: SEG, REJ_PLACEHOLDER: REJ}
ROOT_SEPARATOR, WEIGHT_SEPARATOR = "@", ":"
JSONL_SUFFIX = ".jsonl"
IMAGES_KEY = "images"
DEFAULT_WEIGHT = 1.0
FORMAT_HINT = "see docs/CUSTOM_DATA.md for the format"


@dataclass(frozen=True)
class CustomEntry:
    """One `--custom_data` / `custom|...` entry: the annotation file, its image root and its
    weight in the family's draws; `text` is the entry as written."""

    file: Path
    image_root: Path
    weight: float
    text: str


def parse_entry(text: str, dataset_dir: Path, with_weight: bool = True) -> CustomEntry:
    """`FILE[@IMAGE_ROOT][:WEIGHT]` (the weight only `with_weight`) read under `dataset_dir`;
    ValueError naming the entry when it is malformed."""
    spec, weight = text.strip(), DEFAULT_WEIGHT
    head, separator, tail = spec.rpartition(WEIGHT_SEPARATOR)
    if with_weight and separator and _is_number(tail):
        spec, weight = head, float(tail)
        if not weight > 0:
            raise ValueError(f"custom data entry {text!r}: the weight must be positive")
    file, _, root = spec.partition(ROOT_SEPARATOR)
    if not file:
        form = "FILE[@IMAGE_ROOT]" + ("[:WEIGHT]" if with_weight else "")
        raise ValueError(f"custom data entry {text!r} names no file; expected {form}")
    path = Path(dataset_dir) / file
    return CustomEntry(path, Path(dataset_dir) / root if root else path.parent, weight, text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@cache
def schema_validator():
    """The format's JSON Schema validator (jsonschema imported where it is used)."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def field_path(path: Sequence[object]) -> str:
    """["conversations", 0, "turns", 1, "answer"] -> "conversations[0].turns[1].answer"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "record"


def schema_problem(record: object) -> str | None:
    """The schema's most relevant complaint about `record` as "<field>: <message>", or None."""
    from jsonschema.exceptions import best_match

    validator = schema_validator()
    if validator.is_valid(record):  # the common case, three times faster than collecting errors
        return None
    error = best_match(validator.iter_errors(record))
    return f"{field_path(error.absolute_path)}: {error.message}"


@dataclass(frozen=True)
class Target:
    """One placeholder's target: its phrase, `where` (its field path), whether it is present
    (`{seg}`) and `mask`, its object as the file gives it."""

    phrase: str
    where: str
    present: bool
    mask: dict


@dataclass(frozen=True)
class Conversation:
    """The turns of one conversation with `[SEG]`/`[REJ]` written in, and its targets in order."""

    turns: tuple[tuple[str, str], ...]
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class Record:
    """A checked record: its label for errors, image, size (H, W), conversations and id."""

    label: str
    file_name: str
    shape: tuple[int, int]
    conversations: tuple[Conversation, ...]
    record_id: str


def _turns(conversation: list | dict) -> list[dict]:
    return conversation if isinstance(conversation, list) else conversation["turns"]


def _turn_where(index: int, conversation: list | dict, turn: int) -> str:
    inner = f"[{turn}]" if isinstance(conversation, list) else f".turns[{turn}]"
    return f"conversations[{index}]{inner}"


def _placeholders(index: int, conversation: list | dict) -> list[tuple[str, str]]:
    """(placeholder, where) of each `{seg}`/`{rej}` of the conversation's answers, in order;
    ValueError for `[SEG]`/`[REJ]` written in the text."""
    found = []
    for turn, rounds in enumerate(_turns(conversation)):
        where = _turn_where(index, conversation, turn)
        for key in ("question", "answer"):
            for token in (SEG, REJ):
                if token in rounds[key]:
                    raise ValueError(
                        f"{where}.{key}: holds {token}; write {SEG_PLACEHOLDER} or "
                        f"{REJ_PLACEHOLDER}, which the targets fill in order"
                    )
        found += [(match, f"{where}.answer") for match in PLACEHOLDERS.findall(rounds["answer"])]
    return found


def _pair(placeholder: str, where: str, mask: dict, mask_where: str) -> Target:
    """The target of one placeholder; ValueError when its kind and its mask disagree."""
    has_mask = "segmentation" in mask or "png" in mask
    if placeholder == SEG_PLACEHOLDER and not has_mask:
        raise ValueError(
            f"{mask_where}: fills the {SEG_PLACEHOLDER} of {where} but has no 'segmentation' "
            f"or 'png' (only a {REJ_PLACEHOLDER} target has no mask)"
        )
    if placeholder == REJ_PLACEHOLDER and has_mask:
        raise ValueError(
            f"{mask_where}: fills the {REJ_PLACEHOLDER} of {where} but has a mask "
            f"(a {REJ_PLACEHOLDER} target is not in the image: give its phrase only)"
        )
    return Target(mask["phrase"], mask_where, placeholder == SEG_PLACEHOLDER, mask)


def _fill(text: str) -> str:
    return PLACEHOLDERS.sub(lambda match: TOKENS[match.group()], text)


def parse_conversations(record: dict) -> tuple[Conversation, ...]:
    """The record's conversations with their targets; ValueError "<field>: <problem>" on the
    first disagreement the schema cannot express (counts, kinds, RLE sizes)."""
    shared, used = record.get("masks", []), 0
    shape = [record["height"], record["width"]]
    parsed = []
    for index, conversation in enumerate(record["conversations"]):
        found = _placeholders(index, conversation)
        if isinstance(conversation, dict) and "masks" in conversation:
            masks, prefix = conversation["masks"], f"conversations[{index}].masks"
            if len(found) != len(masks):
                raise ValueError(
                    f"conversations[{index}]: its answers hold {len(found)} placeholders "
                    f"({SEG_PLACEHOLDER}/{REJ_PLACEHOLDER}) but its masks has {len(masks)} targets"
                )
            pairs = [(mask, f"{prefix}[{k}]") for k, mask in enumerate(masks)]
        else:
            if used + len(found) > len(shared):
                raise ValueError(
                    f"{found[len(shared) - used][1]}: placeholder {len(shared) + 1} of the "
                    f"record's list-form conversations has no target: masks has {len(shared)}"
                )
            pairs = [(shared[used + k], f"masks[{used + k}]") for k in range(len(found))]
            used += len(found)
        targets = [
            _pair(placeholder, where, mask, mask_where)
            for (placeholder, where), (mask, mask_where) in zip(found, pairs, strict=True)
        ]
        for target in targets:
            _check_rle_sizes(target, shape)
        turns = tuple((turn["question"], _fill(turn["answer"])) for turn in _turns(conversation))
        parsed.append(Conversation(turns, tuple(targets)))
    if used != len(shared):
        raise ValueError(
            f"masks: {len(shared)} targets but the answers of the list-form conversations hold "
            f"{used} placeholders ({SEG_PLACEHOLDER}/{REJ_PLACEHOLDER})"
        )
    return tuple(parsed)


def _check_rle_sizes(target: Target, shape: list[int]) -> None:
    for key in ("segmentation", "ignore"):
        value = target.mask.get(key)
        if isinstance(value, dict) and value["size"] != shape:
            raise ValueError(
                f"{target.where}.{key}: RLE size {value['size']} differs from the record's "
                f"[height, width] {shape}"
            )


class CustomFile:
    """The records of one annotation file of the format, parsed and checked per record."""

    def __init__(self, entry: CustomEntry) -> None:
        self.entry = entry
        self.file = entry.file
        self.raw = read_records(entry.file)

    def __len__(self) -> int:
        return len(self.raw)

    def record(self, position: int) -> Record:
        """Record `position` checked against the schema and the placeholder rules; DataError
        naming the file, the record and the field otherwise."""
        label, value = self.raw[position]
        if isinstance(value, DataError):
            raise value
        problem = schema_problem(value)
        if problem is None:
            try:
                conversations = parse_conversations(value)
            except ValueError as error:
                problem = str(error)
        if problem is not None:
            raise DataError(self.file, label, problem, FORMAT_HINT)
        shape = (value["height"], value["width"])
        record_id = str(value.get("id", value["file_name"]))
        return Record(label, value["file_name"], shape, conversations, record_id)

    def image_path(self, record: Record) -> Path:
        return resolve_inside(self.entry.image_root, record.file_name, self.file, record.label)

    def image(self, record: Record) -> tuple[np.ndarray, Path]:
        """The image (uint8 [H, W, 3]); DataError when its size is not the record's."""
        path = self.image_path(record)
        image = read_image(path, self.file, record.label)
        self._check_size(image.shape[:2], record, path)
        return image, path

    def _check_size(self, shape: tuple[int, ...], record: Record, path: Path) -> None:
        if tuple(shape) != record.shape:
            raise DataError(
                self.file,
                record.label,
                f"height, width: the record says {list(record.shape)} but image {path} is "
                f"{list(shape)}",
            )

    def mask(self, target: Target, record: Record) -> np.ndarray:
        """uint8 [H, W] in {0, 1, IGNORE_LABEL}: the target's mask (zeros for a `{rej}`)."""
        shape, where = record.shape, f"{record.label}, {target.where}"
        if not target.present:
            return np.zeros(shape, np.uint8)
        if "png" in target.mask:
            png = resolve_inside(self.file.parent, target.mask["png"], self.file, where)
            mask = (read_label_map(png, shape, self.file, where) == target.mask["value"]).astype(
                np.uint8
            )
        else:
            mask = decode_segmentation(target.mask["segmentation"], shape, self.file, where)
        if "ignore" in target.mask:
            ignored = decode_segmentation(target.mask["ignore"], shape, self.file, where)
            mask[ignored > 0] = IGNORE_LABEL
        return mask

    def masks(self, conversations: Sequence[Conversation], record: Record) -> np.ndarray:
        """uint8 [targets, H, W]: every target of `conversations`, in order."""
        masks = [self.mask(t, record) for c in conversations for t in c.targets]
        return stack_masks(masks, record.shape)

    def check(self, deep: bool = False) -> Iterator[DataError]:
        """Every bad record (schema, placeholders, image; deep: image and masks decoded)."""
        for position in range(len(self)):
            try:
                record = self.record(position)
                path = self.image_path(record)
                image = check_image(path, self.file, record.label, deep)
                if image is not None:
                    self._check_size(image.shape[:2], record, path)
                    self.masks(record.conversations, record)
                else:
                    self._check_pngs(record)
            except DataError as error:
                yield error

    def _check_pngs(self, record: Record) -> None:
        for conversation in record.conversations:
            for target in conversation.targets:
                if target.present and "png" in target.mask:
                    where = f"{record.label}, {target.where}"
                    png = resolve_inside(self.file.parent, target.mask["png"], self.file, where)
                    if not png.is_file():
                        raise DataError(self.file, where, f"png: label map {png} does not exist")


def read_records(path: Path) -> list[tuple[str, object]]:
    """(label, raw record or the DataError of an unparsable JSONL line) per record; DataError
    when the file is missing, empty or not the format's outer shape."""
    if not path.is_file():
        raise DataError(path, None, "file does not exist", FORMAT_HINT)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(path, None, f"is not UTF-8 text ({error})", FORMAT_HINT) from error
    if path.suffix == JSONL_SUFFIX:
        return _jsonl_records(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(path, None, f"is not valid json ({error})", FORMAT_HINT) from error
    if isinstance(data, dict) and isinstance(data.get(IMAGES_KEY), list):
        data = data[IMAGES_KEY]
    if not isinstance(data, list) or not data:
        raise DataError(
            path, None, f"expected a non-empty list of records or an object with {IMAGES_KEY!r}"
        )
    return [(str(position), record) for position, record in enumerate(data)]


def _jsonl_records(path: Path, text: str) -> list[tuple[str, object]]:
    records: list[tuple[str, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label = f"{len(records)} (line {number})"
        try:
            records.append((label, json.loads(line)))
        except json.JSONDecodeError as error:
            records.append((label, DataError(path, label, f"is not valid json ({error})")))
    if not records:
        raise DataError(path, None, "holds no records", FORMAT_HINT)
    return records


def with_image(conversation: Conversation) -> list[tuple[str, str]]:
    """The turns, the first question starting with the image placeholder (as every family's
    conversations)."""
    (question, answer), *rest = conversation.turns
    return [(IMAGE_PREFIX + question, answer), *rest]


class CustomSource:
    """A `--custom_data` file as a training source (see the module docstring); `weight` is its
    share of the family's draws (`utils.datasets.mixer.source_weight`)."""

    def __init__(self, entry: CustomEntry, options: SamplingOptions) -> None:
        self.data = CustomFile(entry)
        self.options = options
        self.weight = entry.weight
        self.name = f"{FAMILY}/{entry.text.strip()}"

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """Record `index` with up to `num_classes_per_sample` of its conversations; masks uint8
        [targets, H, W]."""
        record = self.data.record(check_record_index(index, len(self), self.name))
        limit = self.options.num_classes_per_sample
        drawn = draw_question_indices(len(record.conversations), limit, rng)
        chosen = [record.conversations[k] for k in drawn]
        image, path = self.data.image(record)
        conversations = [with_image(c) for c in chosen]
        masks = training_mask(self.data.masks(chosen, record), self.options.ignore_pixels)
        return Sample(image, conversations, masks, str(path), self.name)

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from self.data.check(deep)


def check_custom_entries(names: Sequence[str]) -> None:
    """ValueError naming the problem when `--custom_data` names no file or a malformed entry
    (the command line's check: nothing is read)."""
    if not names:
        raise ValueError(
            "--dataset names custom but --custom_data names no file; give "
            "FILE[@IMAGE_ROOT][:WEIGHT] entries joined by '||'"
        )
    for name in names:
        parse_entry(name, Path())


def build_custom_sources(
    dataset_dir: Path, names: Sequence[str], options: SamplingOptions
) -> list[CustomSource]:
    """The mixer's factory: one source per `--custom_data` entry; ValueError when none."""
    check_custom_entries(names)
    return [CustomSource(parse_entry(name, Path(dataset_dir)), options) for name in names]


class CustomValidation:
    """`--val_dataset "custom|FILE[@IMAGE_ROOT]"`: every conversation of every record,
    teacher-forced, one target per placeholder named by its phrase."""

    def __init__(self, dataset_dir: Path, spec: str) -> None:
        self.data = CustomFile(parse_entry(spec, Path(dataset_dir), with_weight=False))
        self.name = f"{FAMILY}|{spec}"
        self.source = f"{FAMILY}/{spec}"

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, position: int) -> ValidationSample:
        record = self.data.record(position)
        image, path = self.data.image(record)
        return ValidationSample(
            image,
            [with_image(c) for c in record.conversations],
            self.data.masks(record.conversations, record),
            str(path),
            self.source,
            target_names=[t.phrase for c in record.conversations for t in c.targets],
            record_id=record.record_id,
        )

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from self.data.check(deep)
