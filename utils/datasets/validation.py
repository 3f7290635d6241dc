"""Validation sets named by `--val_dataset` (entries joined by "||") and `--val_json_name`.

Accepted entries (upstream commits: LISA 3cb2d43, GSVA 618dc79, MMR 702a7b6):
- "ReasonSeg|<split>": `utils.datasets.reason_seg.ReasonSegValidation`.
- "<refclef|refcoco|refcoco+|refcocog>|<splitBy>|<val|testA|testB|test>" (LISA / MMR): per
  image, each sentence its own conversation "<image>\\n What is {sent} in this image? Please
  output segmentation mask." answered `--val_answer` ("[SEG]." by default, as LISA and MMR;
  CoReS: "It usually appears on [SEG_SEMA]. It is [SEG]."); one target per sentence (gIoU per
  sentence).
- "multi<refclef|refcoco|refcoco+|refcocog>|<splitBy>|<split>" (MMR's multi-target referring
  evaluation, MMR `utils/dataset.py:355-357,489-533`): per image, its sentences in file order
  grouped 6, 5, 4, 6, 5, 4, ... per conversation, "What is a, b and c in this image? ..."
  answered "[SEG], [SEG] and [SEG]." (a one-sentence group: "[SEG]", without the period, as
  MMR writes it); one target per sentence, scored as refCOCO.
- "grefcoco|unc|<val|testA|testB>" and "refzom|final|test" (GSVA protocol, GSVA
  `data/dataset.py:396-511`): one conversation per image naming all its expressions, each
  `strip().lower()` then `.strip().strip('.')`: "<image>\\n What are s1, s2in this image? Please
  output segmentation masks." (no space before "in", as GSVA) answered "Sure,s1:[SEG],
  s2:[REJ]." (no space after "Sure,"); an expression whose ground truth is empty (a no-target
  ref, or annotations without pixels) is answered `[REJ]`. Scored with GSVA's gIoU / cIoU /
  N-acc / T-acc (GSVA_PROTOCOL_SETS).
- "MultiPartReasonSeg|<val|test>": the MMR json chosen by `--val_json_name` (default MMR_val.json).
- "custom|FILE[@IMAGE_ROOT]": a file of the generic format (`utils.datasets.custom`, read under
  `--dataset_dir`): every conversation as written, teacher-forced, one target per
  `{seg}`/`{rej}`, named by its phrase.
- "<ade20k|cocostuff|cityscapes|mapillary>|val": LaSagnA's semantic-segmentation sets
  (`utils.datasets.semantic_val.SemanticValidation`, their real layouts): per image the class
  list asked in `--semantic_val_chunk` names per question (0: all at once, as LaSagnA); always
  evaluated by generation and scored with mIoU (`utils.semantic_eval`).
- "RefCOCOm|<val|testA|testB>": `refer_seg/RefCOCOm/annotations/<--val_json_name>`, masks
  `refer_seg/RefCOCOm/masks/<segment_id>.png` (0/255), images train2014; per annotation, each
  sentence its own conversation as refCOCO (answered `--val_answer`).
The single-target sets (ReasonSeg, refCOCO-family, RefCOCOm) answer `--val_answer`, which must
hold exactly one `[SEG]`; the multi-target ones (MMR's, GSVA's, custom) write their own answers.
Sentences are read `strip().lower()` as LISA, MMR and GSVA read them (`normalised_sentence`).
Referring files are read under `<dataset_dir>/refer_seg/`, as in training.

GSVA's `--val_refzom` (GSVA `main.py:86,197-202,321-343,365`): GSVA validates every epoch on
`--val_dataset` and, beside it, on "grefcoco|unc|val", which the switch replaces by
"refzom|final|test" (`gsva_epoch_validation`); with `--eval_only` only `--val_dataset` is
evaluated.
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
from utils.datasets.refer import (
    COCO_TRAIN2014,
    REFER_ROOT,
    normalised_sentence,
    open_refer_index,
)
from utils.datasets.semantic_val import (
    SEMANTIC_VAL_SETS,
    SEMANTIC_VAL_SPLIT,
    SemanticValidation,
)
from utils.datasets.templates import (
    DEFAULT_VAL_ANSWER,
    IMAGE_PREFIX,
    REJ,
    SEG,
    check_val_answer,
    join_names,
    validation_question,
)

ENTRY_SEPARATOR = "||"
FIELD_SEPARATOR = "|"
# dataset -> accepted splitBy values, and the evaluation splits of the three-field forms
REFER_SPLIT_BYS = {
    "refclef": ("unc", "berkeley"),
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "grefcoco": ("unc",),
    "refzom": ("final",),
}
REFER_SPLITS = ("val", "testA", "testB", "test")
# MMR's "multi<dataset>" entries -> the referring dataset they read
MULTI_PREFIX = "multi"
MULTI_REFER_SETS = {
    MULTI_PREFIX + name: name for name in ("refclef", "refcoco", "refcoco+", "refcocog")
}
# sizes of MMR's consecutive sentence groups, cycled per image (MMR utils/dataset.py:489)
MMR_MULTI_GROUP_SIZES = (6, 5, 4)
# sets scored with GSVA's eval_gres (gIoU, cIoU, N-acc, T-acc) after its two passes
GSVA_PROTOCOL_SETS = ("grefcoco", "refzom")
GSVA_GRES_VAL = "grefcoco|unc|val"
GSVA_REFZOM_VAL = "refzom|final|test"
# GSVA data/dataset.py:496-511 (GSVA's own spacing: no space before "in", none after "Sure,")
GSVA_QUESTION = " What are {sentences}in this image? Please output segmentation masks."
GSVA_ANSWER_START = "Sure,"
GSVA_JOINER = ", "
# two-field forms -> accepted splits (None: the dataset checks its own split)
TWO_FIELD_SPLITS: dict[str, tuple[str, ...] | None] = {
    "ReasonSeg": None,
    "MultiPartReasonSeg": ("val", "test"),
    "RefCOCOm": ("val", "testA", "testB"),
    **{name: (SEMANTIC_VAL_SPLIT,) for name in SEMANTIC_VAL_SETS},
}
REFCOCOM_DIR = "refer_seg/RefCOCOm"
CUSTOM_SET = "custom"
CUSTOM_FORM = f"{CUSTOM_SET}|<file>[@<image root>]"
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
    forms.append(f"{MULTI_PREFIX}<{'|'.join(MULTI_REFER_SETS.values())}>|<splitBy>|<split>")
    forms.append(CUSTOM_FORM)
    return "; ".join(forms)


def split_bys(dataset: str) -> tuple[str, ...]:
    """The splitBy values a three-field entry of `dataset` accepts (none if it has no such form)."""
    return REFER_SPLIT_BYS.get(MULTI_REFER_SETS.get(dataset, dataset), ())


def gsva_epoch_validation(val_refzom: bool) -> str:
    """The entry GSVA evaluates every epoch beside `--val_dataset`: "grefcoco|unc|val", or
    "refzom|final|test" with `--val_refzom` (GSVA `main.py:197-202`)."""
    return GSVA_REFZOM_VAL if val_refzom else GSVA_GRES_VAL


def _parse_entry(text: str) -> ValEntry:
    fields = text.strip().split(FIELD_SEPARATOR)
    error = ValueError(
        f"--val_dataset entry {text!r} is not accepted; accepted: {accepted_forms()}"
    )
    if len(fields) == 2 and fields[0] == CUSTOM_SET and fields[1].strip():
        return ValEntry(CUSTOM_SET, "", fields[1].strip())
    if len(fields) == 2 and fields[0] in TWO_FIELD_SPLITS:
        splits = TWO_FIELD_SPLITS[fields[0]]
        if not fields[1] or (splits is not None and fields[1] not in splits):
            raise error
        return ValEntry(fields[0], "", fields[1])
    if len(fields) == 3 and fields[1] in split_bys(fields[0]) and fields[2] in REFER_SPLITS:
        return ValEntry(*fields)
    raise error


def parse_val_datasets(spec: str) -> list[ValEntry]:
    """`--val_dataset` ("ReasonSeg|val||refcoco|unc|val") as entries; ValueError listing the
    accepted forms for an unknown one."""
    return [_parse_entry(text) for text in spec.split(ENTRY_SEPARATOR) if text.strip()]


def _is_empty(mask: np.ndarray | None) -> bool:
    """No ground-truth pixel: GSVA's `masks[t].sum() < 1` (masks are 0/1)."""
    return mask is None or not mask.any()


Targets = list[tuple[str, np.ndarray | None]]  # (sentence, mask; None: no target)
Conversations = list[list[tuple[str, str]]]


class ReferValidation:
    """refCOCO-family validation (LISA / MMR): per image, one conversation and one target per
    sentence, answered `answer` (`--val_answer`, one `[SEG]`)."""

    def __init__(
        self, dataset_dir: Path, entry: ValEntry, answer: str = DEFAULT_VAL_ANSWER
    ) -> None:
        self.name = str(entry)
        self.entry = entry
        self.answer = check_val_answer(answer)
        self.dataset = MULTI_REFER_SETS.get(entry.dataset, entry.dataset)
        self.index = open_refer_index(dataset_dir, self.dataset, entry.split_by)
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

    def sentence(self, sent: str) -> str:
        """A sentence as this protocol names it (LISA / MMR: `strip().lower()`)."""
        return normalised_sentence(sent)

    def _targets(self, index: int) -> tuple[np.ndarray, Path, Targets]:
        """(image, path, [(sentence, mask or None)]) of image `index`, refs and sentences in
        file order."""
        refs = self.refs_by_image[self.image_ids[index]]
        image, path = self.index.read_image(refs[0].image_id, refs[0].label)
        targets = []
        for ref in refs:
            mask = self.index.ref_mask(ref)
            targets.extend((self.sentence(sent), mask) for sent in ref.sentences)
        return image, path, targets

    def _conversations(self, targets: Targets) -> Conversations:
        return [[(validation_question(sent, False), self.answer)] for sent, _ in targets]

    def __getitem__(self, index: int) -> ValidationSample:
        image, path, targets = self._targets(index)
        shape = image.shape[:2]
        masks = [np.zeros(shape, np.uint8) if mask is None else mask for _, mask in targets]
        return ValidationSample(
            image,
            self._conversations(targets),
            stack_masks(masks, shape),
            str(path),
            f"{REFER_ROOT}/{self.dataset}",
            target_names=[sent for sent, _ in targets],
            record_id=str(self.image_ids[index]),
        )

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from self.index.check(self.entry.split, deep)


def multi_groups(count: int) -> list[range]:
    """MMR's grouping of an image's `count` sentences: consecutive runs of 6, 5, 4, 6, ...
    sentences, the last run shorter (MMR `utils/dataset.py:489-497,527-531`)."""
    groups, start = [], 0
    while start < count:
        size = MMR_MULTI_GROUP_SIZES[len(groups) % len(MMR_MULTI_GROUP_SIZES)]
        groups.append(range(start, min(start + size, count)))
        start += size
    return groups


def multi_answer(count: int) -> str:
    """MMR's answer to a group of `count` sentences: "[SEG], [SEG] and [SEG]."; one sentence
    gets "[SEG]" without the period (MMR `utils/dataset.py:523-524`, `answer[0]`)."""
    return join_names([SEG] * count) + "." if count > 1 else SEG


class MultiReferValidation(ReferValidation):
    """MMR's "multirefcoco"-style validation: an image's sentences asked several at a time
    (`multi_groups`), "What is a, b and c in this image? Please output segmentation mask."
    answered `multi_answer`; one target (mask) per sentence, in order."""

    def _conversations(self, targets: Targets) -> Conversations:
        conversations = []
        for group in multi_groups(len(targets)):
            names = [targets[i][0].strip() for i in group]
            conversations.append(
                [(validation_question(join_names(names), False), multi_answer(len(names)))]
            )
        return conversations


def gsva_expression(sent: str) -> str:
    """A referring expression as GSVA's evaluation names it: `strip().lower()`, then
    `.strip().strip('.')` (GSVA `data/dataset.py:398,496`)."""
    return normalised_sentence(sent).strip().strip(".")


class GReferValidation(ReferValidation):
    """gRefCOCO and RefZOM validation (GSVA protocol, strings as GSVA `data/dataset.py:494-511`):
    one conversation per image naming every expression, "<image>\\n What are s1, s2in this
    image? Please output segmentation masks." answered "Sure,s1:[SEG], s2:[REJ]."; an
    expression with an empty ground truth (no-target ref, or no pixel) is answered `[REJ]`."""

    def sentence(self, sent: str) -> str:
        return gsva_expression(sent)

    def _conversations(self, targets: Targets) -> Conversations:
        question = GSVA_QUESTION.format(sentences=GSVA_JOINER.join(sent for sent, _ in targets))
        parts = GSVA_JOINER.join(
            f"{sent}:{REJ if _is_empty(mask) else SEG}" for sent, mask in targets
        )
        return [[(IMAGE_PREFIX + question, f"{GSVA_ANSWER_START}{parts}.")]]


class RefCOCOmValidation:
    """RefCOCOm (part-level refCOCO): per annotation, each sentence its own conversation about
    the annotation's mask `masks/<segment_id>.png` (0/255), answered `answer` (`--val_answer`)."""

    def __init__(
        self, dataset_dir: Path, entry: ValEntry, json_name: str, answer: str = DEFAULT_VAL_ANSWER
    ) -> None:
        self.answer = check_val_answer(answer)
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
        return label, [normalised_sentence(s["sent"]) for s in sentences], image, mask

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
            [[(validation_question(sent, False), self.answer)] for sent in sentences],
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


def is_semantic(entry: ValEntry) -> bool:
    """Whether `entry` is one of the semantic-segmentation sets ("ade20k|val", ...)."""
    return entry.dataset in SEMANTIC_VAL_SETS


def semantic_chunk_size(semantic_val_chunk: int) -> int | None:
    """`--semantic_val_chunk` as `class_chunks` takes it: 0 -> None (the whole list, LaSagnA)."""
    if semantic_val_chunk < 0:
        raise ValueError(f"--semantic_val_chunk must be 0 or more, got {semantic_val_chunk}")
    return semantic_val_chunk or None


def build_validation_set(
    dataset_dir: Path,
    entry: ValEntry,
    val_json_name: str = "",
    val_answer: str = DEFAULT_VAL_ANSWER,
    semantic_val_chunk: int = 0,
) -> ValidationSet | SemanticValidation:
    """The validation set of one parsed `--val_dataset` entry; the single-target sets answer
    `val_answer` (ValueError unless it holds exactly one `[SEG]`); the semantic sets ask
    `semantic_val_chunk` class names per question (0: all)."""
    dataset_dir = Path(dataset_dir)
    if is_semantic(entry):
        chunk = semantic_chunk_size(semantic_val_chunk)
        return SemanticValidation(dataset_dir, entry.dataset, chunk)
    if entry.dataset == "ReasonSeg":
        from utils.datasets.reason_seg import ReasonSegValidation

        return ReasonSegValidation(dataset_dir, entry.split, answer=val_answer)
    if entry.dataset == "MultiPartReasonSeg":
        return MMRValidation(dataset_dir, val_json_name or MMR_VAL_JSON, entry.split)
    if entry.dataset == "RefCOCOm":
        return RefCOCOmValidation(dataset_dir, entry, val_json_name, val_answer)
    if entry.dataset == CUSTOM_SET:
        from utils.datasets.custom import CustomValidation

        return CustomValidation(dataset_dir, entry.split)
    if entry.dataset in GSVA_PROTOCOL_SETS:
        return GReferValidation(dataset_dir, entry)
    if entry.dataset in MULTI_REFER_SETS:
        return MultiReferValidation(dataset_dir, entry)
    if entry.dataset in REFER_SPLIT_BYS:
        return ReferValidation(dataset_dir, entry, val_answer)
    raise ValueError(f"unknown validation dataset {entry.dataset!r}; accepted: {accepted_forms()}")
