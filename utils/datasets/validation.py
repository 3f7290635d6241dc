"""Validation sets named by `--val_dataset` (entries joined by "||") and `--val_json_name`.

Accepted entries:
- "ReasonSeg|<split>": `utils.datasets.reason_seg.ReasonSegValidation`.
- "<refclef|refcoco|refcoco+|refcocog>|<splitBy>|<val|testA|testB|test>": per image, each
  sentence its own conversation "<image>\\n What is {sent} in this image? Please output
  segmentation mask." answered "[SEG]."; one target per sentence (gIoU per sentence).
- "grefcoco|unc|<val|testA|testB>": GSVA protocol, one conversation per image naming all its
  expressions; an expression without target is answered `[REJ]` and has an all-zero mask.
- "MultiPartReasonSeg|<val|test>": the MMR json chosen by `--val_json_name` (default MMR_val.json).
- "RefCOCOm|<val|testA|testB>": `refer_seg/RefCOCOm/annotations/<--val_json_name>`, masks
  `refer_seg/RefCOCOm/masks/<segment_id>.png` (0/255), images train2014; per annotation, each
  sentence its own conversation as refCOCO.
Referring files are read under `<dataset_dir>/refer_seg/`, as in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from utils.datasets.base import (
    DataError,
    ValidationSample,
    read_image,
    read_json,
    read_label_map,
    resolve_inside,
    stack_masks,
)
from utils.datasets.mmr import MMR_VAL_JSON, MMRValidation
from utils.datasets.refer import COCO_TRAIN2014, REFER_ROOT, open_refer_index
from utils.datasets.templates import IMAGE_PREFIX, REJ, SEG, validation_question

ENTRY_SEPARATOR = "||"
FIELD_SEPARATOR = "|"
# dataset -> accepted splitBy values, and the evaluation splits of the three-field forms
REFER_SPLIT_BYS = {
    "refclef": ("unc", "berkeley"),
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "grefcoco": ("unc",),
}
REFER_SPLITS = ("val", "testA", "testB", "test")
# two-field forms -> accepted splits (None: the dataset checks its own split)
TWO_FIELD_SPLITS: dict[str, tuple[str, ...] | None] = {
    "ReasonSeg": None,
    "MultiPartReasonSeg": ("val", "test"),
    "RefCOCOm": ("val", "testA", "testB"),
}
REFCOCOM_DIR = "refer_seg/RefCOCOm"
MASK_FOREGROUND = 255


class ValEntry(NamedTuple):
    """One `--val_dataset` entry; `split_by` is "" for the two-field forms."""

    dataset: str
    split_by: str
    split: str

    def __str__(self) -> str:
        return FIELD_SEPARATOR.join(part for part in self if part)


class ValidationSet(Protocol):
    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> ValidationSample: ...

    def check(self, deep: bool = False) -> Iterator[DataError]: ...


def accepted_forms() -> str:
    forms = [
        f"{name}|<{'|'.join(splits) if splits else 'split'}>"
        for name, splits in TWO_FIELD_SPLITS.items()
    ]
    forms += [
        f"{name}|<{'|'.join(by)}>|<{'|'.join(REFER_SPLITS)}>"
        for name, by in REFER_SPLIT_BYS.items()
    ]
    return "; ".join(forms)


def _parse_entry(text: str) -> ValEntry:
    fields = text.strip().split(FIELD_SEPARATOR)
    error = ValueError(
        f"--val_dataset entry {text!r} is not accepted; accepted: {accepted_forms()}"
    )
    if len(fields) == 2 and fields[0] in TWO_FIELD_SPLITS:
        splits = TWO_FIELD_SPLITS[fields[0]]
        if not fields[1] or (splits is not None and fields[1] not in splits):
            raise error
        return ValEntry(fields[0], "", fields[1])
    if len(fields) == 3 and fields[0] in REFER_SPLIT_BYS:
        if fields[1] in REFER_SPLIT_BYS[fields[0]] and fields[2] in REFER_SPLITS:
            return ValEntry(*fields)
    raise error


def parse_val_datasets(spec: str) -> list[ValEntry]:
    """`--val_dataset` ("ReasonSeg|val||refcoco|unc|val") as entries; ValueError listing the
    accepted forms for an unknown one."""
    return [_parse_entry(text) for text in spec.split(ENTRY_SEPARATOR) if text.strip()]


def _token(mask: np.ndarray | None) -> str:
    return REJ if mask is None else SEG


class ReferValidation:
    """refCOCO-family validation: per image, one conversation and one target per sentence."""

    def __init__(self, dataset_dir: Path, entry: ValEntry) -> None:
        self.name = str(entry)
        self.entry = entry
        self.index = open_refer_index(dataset_dir, entry.dataset, entry.split_by)
        unreadable = self.index.unreadable_refs(entry.split)
        if unreadable:
            # left out of the index, the ref would silently be left out of the scores
            raise DataError(
                unreadable[0].file,
                unreadable[0].record,
                unreadable[0].problem,
                f"{len(unreadable)} ref(s) of {entry} cannot be read and would be left out of "
                "the evaluation; tools/check_dataset.py lists them",
            )
        self.refs_by_image = self.index.refs_by_image(entry.split)
        self.image_ids = list(self.refs_by_image)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _targets(self, index: int) -> tuple[np.ndarray, Path, list[tuple[str, np.ndarray | None]]]:
        """(image, path, [(sentence, mask or None)]) of image `index`."""
        refs = self.refs_by_image[self.image_ids[index]]
        image, path = self.index.read_image(refs[0].image_id, refs[0].label)
        targets = []
        for ref in refs:
            mask = self.index.ref_mask(ref)
            targets.extend((sent, mask) for sent in ref.sentences)
        return image, path, targets

    def _conversations(self, targets: list[tuple[str, np.ndarray | None]]) -> list:
        return [[(validation_question(sent, False), f"{_token(mask)}.")] for sent, mask in targets]

    def __getitem__(self, index: int) -> ValidationSample:
        image, path, targets = self._targets(index)
        shape = image.shape[:2]
        masks = [np.zeros(shape, np.uint8) if mask is None else mask for _, mask in targets]
        return ValidationSample(
            image,
            self._conversations(targets),
            stack_masks(masks, shape),
            str(path),
            f"{REFER_ROOT}/{self.entry.dataset}",
            target_names=[sent for sent, _ in targets],
            record_id=str(self.image_ids[index]),
        )

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from self.index.check(self.entry.split, deep)


class GReferValidation(ReferValidation):
    """gRefCOCO validation (GSVA protocol): one conversation per image naming every expression,
    "What are s1, s2 in this image? ..." (with the space GSVA forgot before "in"), answered
    "Sure, s1:[SEG], s2:[REJ]."; empty ground truth for a no-target expression."""

    def _conversations(self, targets: list[tuple[str, np.ndarray | None]]) -> list:
        sentences = ", ".join(sent for sent, _ in targets)
        prompt = f" What are {sentences} in this image? Please output segmentation masks."
        parts = ", ".join(f"{sent}:{_token(mask)}" for sent, mask in targets)
        return [[(IMAGE_PREFIX + prompt, f"Sure, {parts}.")]]


class RefCOCOmValidation:
    """RefCOCOm (part-level refCOCO): per annotation, each sentence its own conversation about
    the annotation's mask `masks/<segment_id>.png` (0/255)."""

    def __init__(self, dataset_dir: Path, entry: ValEntry, json_name: str) -> None:
        root = Path(dataset_dir) / REFCOCOM_DIR
        if not json_name:
            raise DataError(
                root / "annotations",
                None,
                "no annotation file named",
                "pass --val_json_name=<file under refer_seg/RefCOCOm/annotations/>",
            )
        self.name = f"{entry} ({json_name})"
        self.file = resolve_inside(root / "annotations", json_name, root, json_name)
        self.mask_dir, self.image_dir = root / "masks", Path(dataset_dir) / COCO_TRAIN2014
        hint = f"expected the RefCOCOm annotation json at {self.file}"
        self.records = read_json(self.file, hint)
        if not isinstance(self.records, list) or not self.records:
            raise DataError(self.file, None, "expected a non-empty JSON list of annotations")

    def __len__(self) -> int:
        return len(self.records)

    def _fields(self, index: int) -> tuple[str, list[str], Path, Path]:
        """(record label, sentences, image path, mask path); DataError on a malformed record."""
        record = self.records[index]
        label = f"#{index}"
        if not isinstance(record, dict) or not all(
            key in record for key in ("segment_id", "img_name", "sentences")
        ):
            raise DataError(
                self.file, label, "missing one of 'segment_id', 'img_name', 'sentences'"
            )
        label = f"#{index} (segment_id {record['segment_id']})"
        sentences = record["sentences"]
        if (
            not isinstance(sentences, list)
            or not sentences
            or not all(isinstance(s, dict) and isinstance(s.get("sent"), str) for s in sentences)
        ):
            raise DataError(self.file, label, "'sentences' must be a non-empty list of {sent}")
        image = resolve_inside(self.image_dir, record["img_name"], self.file, label)
        mask = resolve_inside(self.mask_dir, f"{record['segment_id']}.png", self.file, label)
        return label, [s["sent"] for s in sentences], image, mask

    def _mask(self, path: Path, shape: tuple[int, int], label: str) -> np.ndarray:
        raw = read_label_map(path, shape, self.file, label)
        if not np.isin(raw, (0, MASK_FOREGROUND)).all():
            raise DataError(
                self.file,
                label,
                f"mask {path} holds values other than 0 and "
                f"{MASK_FOREGROUND}: {np.unique(raw)[:8].tolist()}",
            )
        return (raw // MASK_FOREGROUND).astype(np.uint8)

    def __getitem__(self, index: int) -> ValidationSample:
        label, sentences, image_path, mask_path = self._fields(index)
        image = read_image(image_path, self.file, label)
        mask = self._mask(mask_path, image.shape[:2], label)
        return ValidationSample(
            image,
            [[(validation_question(sent, False), f"{SEG}.")] for sent in sentences],
            stack_masks([mask] * len(sentences), image.shape[:2]),
            str(image_path),
            f"{REFER_ROOT}/RefCOCOm",
            target_names=sentences,
            record_id=str(self.records[index]["segment_id"]),
        )

    def check(self, deep: bool = False) -> Iterator[DataError]:
        """Every bad record (fields, missing image or mask; deep: decoded and compared)."""
        for index in range(len(self.records)):
            try:
                if deep:  # loading decodes the image and the mask and compares their sizes
                    self[index]
                    continue
                label, _, image_path, mask_path = self._fields(index)
                for path in (image_path, mask_path):
                    if not path.is_file():
                        yield DataError(self.file, label, f"{path} does not exist")
            except DataError as error:
                yield error


def build_validation_set(
    dataset_dir: Path, entry: ValEntry, val_json_name: str = ""
) -> ValidationSet:
    """The validation set of one parsed `--val_dataset` entry."""
    dataset_dir = Path(dataset_dir)
    if entry.dataset == "ReasonSeg":
        from utils.datasets.reason_seg import ReasonSegValidation

        return ReasonSegValidation(dataset_dir, entry.split)
    if entry.dataset == "MultiPartReasonSeg":
        return MMRValidation(dataset_dir, val_json_name or MMR_VAL_JSON, entry.split)
    if entry.dataset == "RefCOCOm":
        return RefCOCOmValidation(dataset_dir, entry, val_json_name)
    if entry.dataset == "grefcoco":
        return GReferValidation(dataset_dir, entry)
    if entry.dataset in REFER_SPLIT_BYS:
        return ReferValidation(dataset_dir, entry)
    raise ValueError(f"unknown validation dataset {entry.dataset!r}; accepted: {accepted_forms()}")
