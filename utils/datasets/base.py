"""Shared types of every data family: raw records -> `Sample` (image, conversations, masks).

Data flows one way: a family reads its annotation files and yields `Sample`s; `utils.collate`
turns samples into token ids, labels and pixel tensors and batches them into `model.batch.Batch`.
Every bad record raises `DataError`, which names the file, the record and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
IGNORE_LABEL = 255
# JPEG markers: start of image, end of image, start of scan
JPEG_START, JPEG_END, JPEG_SCAN = b"\xff\xd8", b"\xff\xd9", b"\xff\xda"
REPLACE_IMAGE = "copy the image again from the dataset's download, or remove its record"
# a PNG file: signature, then the IHDR chunk (length, type, width, height, bit depth, colour type)
PNG_SIGNATURE, PNG_IHDR = b"\x89PNG\r\n\x1a\n", b"IHDR"
PNG_IHDR_AT, PNG_BIT_DEPTH_AT, PNG_COLOUR_TYPE_AT = 12, 24, 25
PNG_8_BITS, PNG_GREYSCALE = 8, 0


class DataError(ValueError):
    """A bad input record: `file`, `record` (an index, id or name) and what was expected.

    fatal: False for a finding a source's `check` reports but the loaders work around (e.g. a
    degenerate polygon part left out of its mask); the dataset doctor lists it as a warning.
    `DataError(message)` alone is how PyTorch's DataLoader re-raises one from a loader worker
    (the worker's message, its traceback included): it keeps the type for the main process.
    """

    def __init__(
        self,
        file: str | Path,
        record: object = None,
        problem: str | None = None,
        hint: str = "",
        *,
        fatal: bool = True,
    ) -> None:
        self.file, self.record, self.problem, self.hint = str(file), record, problem, hint
        self.fatal = fatal
        if problem is None:
            super().__init__(str(file))
            return
        where = f"{file}" + (f", record {record}" if record is not None else "")
        super().__init__(f"{where}: {problem}" + (f" ({hint})" if hint else ""))


class UnusableSample(ValueError):
    """A well-formed sample that cannot be used as drawn (e.g. every conversation is longer than
    `--model_max_length`); the mixer draws another one instead."""


@dataclass
class Sample:
    """One image with its conversations and the masks of their targets, before tokenization.

    image: uint8 [H, W, 3] RGB.
    conversations: each conversation is a list of (question, answer) rounds; the first question
        starts with IMAGE_PLACEHOLDER + "\\n". Answers hold `[SEG]`/`[REJ]` tokens.
    masks: uint8 [k, H, W] in {0, 1, IGNORE_LABEL}: one per `[SEG]`/`[REJ]` token of the answers,
        conversation by conversation, left to right; a `[REJ]` row is all zeros.
    image_path: the file the image came from.
    source: "<family>/<dataset>", e.g. "sem_seg/ade20k".
    """

    image: np.ndarray
    conversations: list[list[tuple[str, str]]]
    masks: np.ndarray
    image_path: str
    source: str


@dataclass
class ValidationSample(Sample):
    """A validation sample: one teacher-forced conversation per target group, plus per target
    its name (for the per-sample JSONL) and whether the ground truth is empty (`[REJ]`).

    target_names: one per mask row. record_id: the annotation's own id (ref id, image name...).
    """

    target_names: list[str] = field(default_factory=list)
    record_id: str = ""


IGNORE_PIXEL_CHOICES = ("background", "exclude")
PART_TARGET_CHOICES = ("instance", "category")
MMR_PAIRING_CHOICES = ("aligned", "upstream")
NO_TARGET_ANSWER_CHOICES = ("rej", "empty_seg")
# how many sentences a referring sample draws: "reference" (GSVA, LISA, MMR: as many as
# --num_classes_per_sample allows; "gsva" style redraws a sample whose every sentence is absent) |
# "varied" (1 to that many, uniformly, and an all-absent draw is kept: one-sentence questions
# answered [REJ])
REFER_DRAW_CHOICES = ("reference", "varied")
# how a "gsva"-style answer is worded: "drawn" (GSVA's loaders: one of its five forms per answer) |
# "colon" (always its "Sure, they are a:[SEG], b:[REJ]." form, the one its validation answers
# are read in: "Sure,a:[SEG], b:[REJ].")
GSVA_ANSWER_FORM_CHOICES = ("drawn", "colon")


@dataclass(frozen=True)
class SamplingOptions:
    """How a training source turns records into conversations (train_ds.py flags).

    num_classes_per_sample: conversations (questions) per image at most.
    num_classes_per_question: targets per question ("mmr" style).
    use_expand_question_list: draw questions from the expanded template lists.
    prompt_style: "lisa" | "mmr" | "gsva" | "cores" (see utils.datasets.templates).
    explanatory: probability of ReasonSeg's explanation-only answer; -1 disables.
    exclude_val: keep the refCOCO-family val/test images out of training.
    ignore_pixels: "background" (LISA, GSVA, MMR: ignore pixels (255) of sem_seg and ReasonSeg
        masks are trained as background) | "exclude" (kept as 255, left out of the mask loss).
    part_targets: "instance" (LISA, GSVA, MMR: one target per PACO-LVIS / PASCAL-Part
        annotation) | "category" (one target per part category, the union of its instances).
    mmr_pairing: "aligned" (each MMR question with its own answer and masks) | "upstream" (the
        released M2SA loader's pairing: sampled questions with answers 0, 1, 2 in file order).
    no_target_answer: how "lisa"/"mmr"/"cores" styles answer a referring sentence without a target
        (gRefCOCO, RefZOM): "rej" (`[REJ]`) | "empty_seg" (LISA/MMR: `[SEG]` with an empty mask).
    refer_draw: how many sentences a referring sample asks about (REFER_DRAW_CHOICES).
    gsva_answer_form: how a "gsva"-style answer is worded (GSVA_ANSWER_FORM_CHOICES).
    """

    num_classes_per_sample: int = 3
    num_classes_per_question: int = 3
    use_expand_question_list: bool = True
    prompt_style: str = "mmr"
    explanatory: float = 0.1
    exclude_val: bool = False
    ignore_pixels: str = "background"
    part_targets: str = "instance"
    mmr_pairing: str = "aligned"
    no_target_answer: str = "rej"
    refer_draw: str = "reference"
    gsva_answer_form: str = "drawn"

    def __post_init__(self) -> None:
        """ValueError naming the flag when a choice field holds none of its choices (the one
        check every source relies on)."""
        for flag, choices in (
            ("ignore_pixels", IGNORE_PIXEL_CHOICES),
            ("part_targets", PART_TARGET_CHOICES),
            ("mmr_pairing", MMR_PAIRING_CHOICES),
            ("no_target_answer", NO_TARGET_ANSWER_CHOICES),
            ("refer_draw", REFER_DRAW_CHOICES),
            ("gsva_answer_form", GSVA_ANSWER_FORM_CHOICES),
        ):
            value = getattr(self, flag)
            if value not in choices:
                raise ValueError(f"--{flag} must be one of {choices}, not {value!r}")


# what happens to a conversation longer than --model_max_length (counted with its image tokens):
# "truncate" (LISA, GSVA, MMR: cut to the limit) | "drop" (left out whole with its masks; a
# sample left with none is redrawn from the same family)
TOO_LONG_CHOICES = ("truncate", "drop")


class Source(Protocol):
    """A training source: `len` records, the sample of a given record (`sample_at`), a random
    sample drawn with the caller's generator, and a check of every record (the dataset doctor;
    `deep` also decodes images)."""

    name: str

    def __len__(self) -> int: ...

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """The sample of record `index` (an image: one sem_seg map, part-json image, referring
        training image, VQA dialogue, ReasonSeg image or MMR record), its other choices (which
        targets, templates...) drawn from `rng` (GSVA's `--no_sampling` `data[idx]`).
        IndexError unless 0 <= index < len; UnusableSample when the record cannot be used as
        drawn (e.g. no labelled pixel), never another record in its place."""
        ...

    def sample(self, rng: np.random.Generator) -> Sample:
        """`sample_at(int(rng.integers(len(self))), rng)`: a uniformly random record."""
        ...

    def check(self, deep: bool = False) -> Iterator[DataError]: ...


def check_record_index(index: int, length: int, source: str) -> int:
    """`index` itself when it names one of the `length` records of `source` (0 <= index <
    length); IndexError naming both otherwise (a negative index does not count from the end)."""
    if not 0 <= index < length:
        raise IndexError(f"{source} has records 0..{length - 1}; there is no record {index}")
    return index


def resolve_inside(root: str | Path, relative: str, file: str | Path, record: object) -> Path:
    """`root / relative`, rejected (DataError) if it escapes `root` (e.g. `../` or absolute).

    Containment is checked on the normalised path, not the resolved one, so dataset folders
    that are symbolic links to other disks (common for COCO images) stay usable.
    """
    base = normalised(root)
    path = normalised(base / relative)
    if not path.is_relative_to(base):
        raise DataError(
            file,
            record,
            f"path {relative!r} escapes the dataset root {base}",
            "paths in annotation files must stay inside their dataset folder; fix the record",
        )
    return path


def normalised(path: str | Path) -> Path:
    """`path` made absolute with `..` and `.` folded away, symbolic links left as they are."""
    return Path(os.path.normpath(Path(path).absolute()))


def is_inside(root: str | Path, path: str | Path) -> bool:
    """Whether `path` lies inside `root` (compared as `resolve_inside` does)."""
    return normalised(path).is_relative_to(normalised(root))


def read_image(
    path: str | Path, file: str | Path | None = None, record: object = None
) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3]; DataError if missing or not decodable.

    `file`/`record` name the annotation that referred to the image (defaults to the image).
    """
    path = Path(path)
    source = file if file is not None else path
    if not path.is_file():
        raise DataError(source, record, f"image {path} does not exist", REPLACE_IMAGE)
    data = path.read_bytes()
    if truncated_jpeg(data):
        problem = f"image {path} is a truncated JPEG (it ends before its end-of-image marker)"
        raise DataError(source, record, problem, REPLACE_IMAGE)
    # imdecode applies the EXIF orientation as imread does
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        problem = (
            f"image {path} is not a readable image ({len(data)} bytes; damaged or not an image)"
        )
        raise DataError(source, record, problem, REPLACE_IMAGE)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def truncated_jpeg(data: bytes) -> bool:
    """Whether `data` is a JPEG cut off inside its last scan (no end-of-image marker after the
    last start-of-scan marker). OpenCV decodes such a file without an error, filling the missing
    rows with grey, so it would silently become a wrong training image. Byte stuffing keeps both
    markers out of the compressed data; trailing bytes after the end marker are allowed."""
    return data.startswith(JPEG_START) and data.rfind(JPEG_END) < data.rfind(JPEG_SCAN)


def check_image(path: Path, file: str | Path, record: object, deep: bool) -> np.ndarray | None:
    """A source check's look at an image: decoded when `deep` (DataError if unreadable), else
    None once it is known to exist (DataError if it does not)."""
    if deep:
        return read_image(path, file, record)
    if not path.is_file():
        raise DataError(file, record, f"image {path} does not exist", REPLACE_IMAGE)
    return None


def read_json(
    path: Path, hint: str = "", record: object = None, encodings: tuple[str, ...] = ("utf-8",)
) -> object:
    """Parse a json file, trying `encodings` in order; DataError naming the file (with `hint`)
    if it is missing, undecodable, not json, or an empty list/dict."""
    if not path.is_file():
        raise DataError(path, record, "file does not exist", hint)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, record, f"is empty ({len(raw)} bytes), expected json", hint)
    for encoding in encodings:
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise DataError(path, record, f"is not text in any of {', '.join(encodings)}", hint)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(path, record, f"is not valid json ({error})", hint) from error
    if isinstance(data, (list, dict)) and not data:
        raise DataError(path, record, "is empty", hint)
    return data


def read_label_map(
    path: str | Path,
    image_shape: tuple[int, int],
    file: str | Path | None = None,
    record: object = None,
) -> np.ndarray:
    """A single-channel PNG label map [H, W] of its stored values in their stored dtype (uint8,
    uint16 for 16-bit PNGs; never widened: label statistics run on the narrowest dtype);
    DataError if it is missing, unreadable, not single-channel, or its size differs from the
    image's (H, W).

    PIL keeps palette PNGs (Mapillary) as class indices, where OpenCV would return colours;
    8-bit greyscale ones are decoded by OpenCV (`decode_gray_png`).
    `file`/`record` name the annotation that referred to the map (defaults to the map).
    """
    path = Path(path)
    source = file if file is not None else path
    if not path.is_file():
        raise DataError(source, record, f"label map {path} does not exist")
    label = decode_gray_png(path.read_bytes())
    if label is None:
        try:
            with Image.open(path) as stored:
                label = np.array(stored)
        except (OSError, ValueError) as error:
            problem = f"label map {path} is not readable ({error})"
            raise DataError(source, record, problem) from error
    if label.ndim != 2:
        raise DataError(source, record, f"label map {path} has {label.shape[-1]} channels, not 1")
    if label.shape != tuple(image_shape):
        raise DataError(
            source,
            record,
            f"label map {path} is {label.shape[1]}x{label.shape[0]} but its image is "
            f"{image_shape[1]}x{image_shape[0]} (W x H)",
        )
    return label


def decode_gray_png(data: bytes) -> np.ndarray | None:
    """uint8 [H, W] of an 8-bit greyscale PNG (ADE20K, COCO-Stuff), decoded by OpenCV (a third
    faster than PIL, same values); None for any other file, or one OpenCV cannot decode, which
    PIL then reads (palette PNGs as indices) or refuses with its own message."""
    header = data[: PNG_COLOUR_TYPE_AT + 1]
    if not (
        header.startswith(PNG_SIGNATURE)
        and header[PNG_IHDR_AT : PNG_IHDR_AT + len(PNG_IHDR)] == PNG_IHDR
        and header[PNG_BIT_DEPTH_AT:] == bytes((PNG_8_BITS, PNG_GREYSCALE))
    ):
        return None
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return label if label is not None and label.ndim == 2 else None


def stack_masks(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Stack [H, W] masks into uint8 [k, H, W] (k may be 0)."""
    if not masks:
        return np.zeros((0, *shape), dtype=np.uint8)
    return np.stack([mask.astype(np.uint8) for mask in masks])
