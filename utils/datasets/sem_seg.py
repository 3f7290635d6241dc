"""Semantic and part segmentation sources (LISA's `sem_seg` task, `--sem_seg_data`).

ADE20K, COCO-Stuff and Mapillary read per-pixel class maps (here); PACO-LVIS and PASCAL-Part
read COCO-format part annotations (`utils.datasets.parts`, built by `build_sem_seg_sources` too).
A sample asks about up to `targets_to_draw(...)` distinct classes present in its image, one
`[SEG]` each (sem_seg never emits `[REJ]`). Pixels the annotation ignores (IGNORE_LABEL after the
label conventions below) follow `--ignore_pixels`: "background" (default; LISA, GSVA and MMR build
each mask as `label == class_id`, so ignored pixels are 0) or "exclude" (they stay IGNORE_LABEL
in the masks and the loss leaves them out). Class names keep the vocabulary's spelling; the
templates lower-case them where the references do. Samples are drawn and finished by
`utils.datasets.templates` (`target_count`, `finish_sample`), as for the part and referring sources.

Label conventions (REFERENCE 4.2), applied to a map's distinct stored values (one counting pass
per map on its stored uint8 / uint16 dtype, `LabelMap`); they give class indices or IGNORE_LABEL:
- ADE20K: pixel 0 ("other") -> 255, pixel v -> v - 1 (150 classes). Vocabulary:
  `<dataset_dir>/ade20k/ade20k_classes.json` (a json list of names) if the user put one there,
  else the shipped `class_lists/ade20k_classes.json` (LISA's file: the SceneParsing-150 names,
  first synonym); the ADE20K download has no such file.
- COCO-Stuff (stuffthingmaps): pixel v is the class with id v + 1 of `cocostuff_classes.txt`
  ("id: name" lines from "0: unlabeled", which no pixel takes; 255 is unlabeled):
  `<dataset_dir>/cocostuff/cocostuff_classes.txt` if present, else the shipped
  `class_lists/cocostuff_classes.txt` (LISA's file; the download has none). Classes whose name
  contains "-" ("wall-brick", "floor-other", ...) -> 255, as LISA.
- Mapillary v2.0: pixel = index into `config_v2.0.json` labels, names `readable` lower-cased.
  The label PNGs are palette images, so label maps are read by index with PIL (cv2 would expand
  the palette into colours).
- PACO-LVIS / PASCAL-Part: see `utils.datasets.parts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.datasets.base import (
    IGNORE_LABEL,
    DataError,
    Sample,
    SamplingOptions,
    Source,
    UnusableSample,
    check_record_index,
    read_image,
    read_json,
    read_label_map,
)
from utils.datasets.parts import PART_SPECS, PartSource
from utils.datasets.templates import GSVA_SEM_SEG, Target, finish_sample, target_count

UINT8_VALUES = 256
CLASS_LISTS = Path(__file__).resolve().parent / "class_lists"
ADE20K_CLASSES_FILE, COCOSTUFF_CLASSES_FILE = "ade20k_classes.json", "cocostuff_classes.txt"
COCOSTUFF_HINT = "LISA's utils/cocostuff_classes.txt: 183 lines 'id: name' from '0: unlabeled'"


def class_list(root: Path, folder: str, name: str) -> Path:
    """`root/folder/name` when the user put one there, else the shipped list of that name."""
    user = root / folder / name
    return user if user.is_file() else CLASS_LISTS / name


def parse_ade20k_classes(path: Path) -> list[str]:
    """The names of a json list of ADE20K class names (label order)."""
    names = read_json(path, "a json list of the 150 ADE20K class names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(path, None, "expected a json list of class names")
    return names


def read_ade20k_classes(root: Path) -> list[str]:
    """`<root>/ade20k/ade20k_classes.json` if present, else the shipped SceneParsing-150 list."""
    return parse_ade20k_classes(class_list(root, "ade20k", ADE20K_CLASSES_FILE))


def read_cocostuff_classes(root: Path) -> list[str]:
    """Names of ids 1.. of `cocostuff_classes.txt` (`<root>/cocostuff/` if present, else the
    shipped list), so that list index = pixel value."""
    path = class_list(root, "cocostuff", COCOSTUFF_CLASSES_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            path, None, f"is not readable UTF-8 text ({error})", COCOSTUFF_HINT
        ) from error
    lines = [line.strip() for line in text.splitlines()]
    names = []
    for number, line in enumerate(filter(None, lines)):
        key, separator, name = line.partition(": ")
        if not separator or key.strip() != str(number):
            raise DataError(
                path, f"line {number + 1}", f"expected '{number}: name'", COCOSTUFF_HINT
            )
        names.append(name.strip())
    if len(names) < 2:
        raise DataError(path, None, "has no class after '0: unlabeled'", COCOSTUFF_HINT)
    return names[1:]


# the shipped SceneParsing-150 names (tests build vocabularies of its length)
ADE20K_CLASSES = tuple(parse_ade20k_classes(CLASS_LISTS / ADE20K_CLASSES_FILE))


def read_mapillary_classes(root: Path) -> list[str]:
    path = root / "mapillary" / "config_v2.0.json"
    config = read_json(
        path, "expected Mapillary Vistas' mapillary/config_v2.0.json in --dataset_dir"
    )
    labels = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(labels, list) or not labels:
        raise DataError(path, None, "missing the 'labels' list")
    names = []
    for index, label in enumerate(labels):
        if not isinstance(label, dict) or not isinstance(label.get("readable"), str):
            raise DataError(path, f"labels[{index}]", "missing the 'readable' name")
        names.append(label["readable"].lower())
    return names


def ade20k_labels(values: np.ndarray, classes: list[str]) -> np.ndarray:
    """Stored values int64 [n] -> class indices [n]: 0 ("other") and 255 -> IGNORE_LABEL,
    v -> v - 1."""
    label = values - 1
    label[(values == 0) | (values == IGNORE_LABEL)] = IGNORE_LABEL
    return label


def cocostuff_labels(values: np.ndarray, classes: list[str]) -> np.ndarray:
    """Stored values int64 [n] -> class indices [n]: classes named "x-y" (merged or "-other"
    stuff) -> IGNORE_LABEL, as LISA; the others keep their value."""
    hyphenated = [index for index, name in enumerate(classes) if "-" in name]
    return np.where(np.isin(values, hyphenated), IGNORE_LABEL, values)


def same_labels(values: np.ndarray, classes: list[str]) -> np.ndarray:
    return values


def stored_values(raw: np.ndarray) -> np.ndarray:
    """The distinct values of a label map [H, W], sorted, as int64 [n]: one counting pass on
    the stored dtype (OpenCV's histogram for uint8, which counts in integers, np.bincount for
    uint16; other dtypes through np.unique)."""
    if raw.dtype == np.uint8:
        counts = cv2.calcHist([raw], [0], None, [UINT8_VALUES], [0, UINT8_VALUES])
        return np.flatnonzero(counts.ravel())
    if raw.dtype == np.uint16:
        return np.flatnonzero(np.bincount(raw.ravel()))
    return np.unique(raw).astype(np.int64)


@dataclass(frozen=True)
class LabelMap:
    """A label map as stored and what its values mean (a dataset's remapping applied to the
    distinct values only, never to every pixel).

    raw: [H, W] stored values (uint8 or uint16 for PNG maps). values: int64 [n], the distinct
    stored values, sorted. labels: int64 [n], the class index of each (or IGNORE_LABEL).
    """

    raw: np.ndarray
    values: np.ndarray
    labels: np.ndarray

    def present(self) -> list[int]:
        """The class indices with pixels, sorted (IGNORE_LABEL left out)."""
        return sorted({int(label) for label in self.labels if label != IGNORE_LABEL})

    def where(self, label: int) -> np.ndarray:
        """bool [H, W]: the pixels whose class index is `label` (IGNORE_LABEL: ignored ones)."""
        values = self.values[self.labels == label]
        if len(values) == 1:
            return self.raw == values[0]
        return np.isin(self.raw, values)


@dataclass(frozen=True)
class LabelMapSpec:
    """Where one label-map dataset lives (relative to --dataset_dir) and how to read it.

    `listed` ("images" or "labels") is the directory whose files define the records; the other
    file of a record has the same stem.
    """

    images: str
    labels: str
    listed: str
    read_classes: Callable[[Path], list[str]]
    remap: Callable[[np.ndarray, list[str]], np.ndarray]


LABEL_MAP_SPECS = {
    "ade20k": LabelMapSpec(
        "ade20k/images/training",
        "ade20k/annotations/training",
        "images",
        read_ade20k_classes,
        ade20k_labels,
    ),
    "cocostuff": LabelMapSpec(
        "coco/train2017", "cocostuff/train2017", "labels", read_cocostuff_classes, cocostuff_labels
    ),
    "mapillary": LabelMapSpec(
        "mapillary/training/images",
        "mapillary/training/v2.0/labels",
        "labels",
        read_mapillary_classes,
        same_labels,
    ),
}
IMAGE_SUFFIX, LABEL_SUFFIX = ".jpg", ".png"


class LabelMapSource:
    """ADE20K, COCO-Stuff or Mapillary: (image, label map) pairs and a class vocabulary."""

    def __init__(self, dataset_dir: Path, options: SamplingOptions, dataset: str) -> None:
        self.name = f"sem_seg/{dataset}"
        self.options = options
        self.spec = LABEL_MAP_SPECS[dataset]
        root = Path(dataset_dir)
        self.classes = self.spec.read_classes(root)
        self.image_dir, self.label_dir = root / self.spec.images, root / self.spec.labels
        listed_dir = self.image_dir if self.spec.listed == "images" else self.label_dir
        suffix = IMAGE_SUFFIX if self.spec.listed == "images" else LABEL_SUFFIX
        if not listed_dir.is_dir():
            hint = f"expected {self.spec.images}/*.jpg + {self.spec.labels}/*.png in --dataset_dir"
            raise DataError(listed_dir, None, "directory does not exist", hint)
        self.stems = sorted(path.stem for path in listed_dir.glob("*" + suffix))
        if not self.stems:
            raise DataError(listed_dir, None, f"has no *{suffix} files")

    def __len__(self) -> int:
        return len(self.stems)

    def paths(self, index: int) -> tuple[Path, Path]:
        """(image, label map) of record `index`."""
        stem = self.stems[index]
        return self.image_dir / (stem + IMAGE_SUFFIX), self.label_dir / (stem + LABEL_SUFFIX)

    def load(self, index: int) -> tuple[np.ndarray, LabelMap]:
        """(image uint8 [H, W, 3], its LabelMap); DataError when a value's class index (after
        the dataset's remapping) is outside the vocabulary."""
        image_path, label_path = self.paths(index)
        record = self.stems[index]
        image = read_image(image_path, label_path, record)
        raw = read_label_map(label_path, image.shape[:2], label_path, record)
        values = stored_values(raw)
        labels = self.spec.remap(values, self.classes)
        unknown = labels[(labels != IGNORE_LABEL) & ((labels < 0) | (labels >= len(self.classes)))]
        if unknown.size:
            raise DataError(
                label_path,
                record,
                f"class index {int(unknown.min())} (after the dataset's remapping) is outside the "
                f"vocabulary of {len(self.classes)} classes",
            )
        return image, LabelMap(raw, values, labels)

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """Up to `target_count` of the classes present in map `index`, drawn from `rng`;
        UnusableSample when the map has no labelled pixel (LISA and GSVA draw another image,
        `return self.__getitem__(0)`, LISA utils/sem_seg_dataset.py:264-265, GSVA
        data/sem_seg_dataset.py:293-294; the mixer does that here)."""
        image, label = self.load(check_record_index(index, len(self), self.name))
        present = label.present()
        if not present:
            raise UnusableSample(
                f"{self.name}: {self.paths(index)[1]} (record {self.stems[index]}) has no "
                "labelled pixel"
            )
        count = target_count(self.options)
        chosen = rng.choice(present, size=min(count, len(present)), replace=False)
        ignored = label.where(IGNORE_LABEL) if self.options.ignore_pixels == "exclude" else None
        targets = [
            Target(self.classes[c], False, class_mask(label.where(c), ignored)) for c in chosen
        ]
        image_path = self.paths(index)[0]
        return finish_sample(
            image, targets, self.options, rng, image_path, self.name, gsva_format=GSVA_SEM_SEG
        )

    def check(self, deep: bool = False) -> Iterator[DataError]:
        for index, stem in enumerate(self.stems):
            image_path, label_path = self.paths(index)
            try:
                if deep:
                    self.load(index)
                    continue
                for path, kind in ((image_path, "image"), (label_path, "label map")):
                    if not path.is_file():
                        raise DataError(label_path, stem, f"{kind} {path} does not exist")
            except DataError as error:
                yield error


def class_mask(inside: np.ndarray, ignored: np.ndarray | None) -> np.ndarray:
    """uint8 [H, W]: 1 inside the class, IGNORE_LABEL where `ignored` (None: nowhere), else 0."""
    mask = inside.astype(np.uint8)
    if ignored is not None:
        mask[ignored] = IGNORE_LABEL
    return mask


def build_sem_seg_sources(
    dataset_dir: str | Path, names: list[str], options: SamplingOptions
) -> list[Source]:
    """One source per `--sem_seg_data` name ("ade20k||cocostuff||..." split on "||")."""
    sources: list[Source] = []
    known = [*LABEL_MAP_SPECS, *PART_SPECS]
    for name in names:
        if name in LABEL_MAP_SPECS:
            sources.append(LabelMapSource(Path(dataset_dir), options, name))
        elif name in PART_SPECS:
            sources.append(PartSource(Path(dataset_dir), options, name))
        else:
            raise ValueError(f"unknown --sem_seg_data dataset {name!r}; known: {', '.join(known)}")
    return sources
