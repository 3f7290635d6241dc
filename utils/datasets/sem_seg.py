"""Semantic and part segmentation sources (LISA's `sem_seg` task, `--sem_seg_data`).

ADE20K, COCO-Stuff and Mapillary read per-pixel class maps (here); PACO-LVIS and PASCAL-Part
read COCO-format part annotations (`utils.datasets.parts`, built by `build_sem_seg_sources` too).
A sample asks about up to `targets_to_draw(...)` distinct classes present in its image, one
`[SEG]` each (sem_seg never emits `[REJ]`). Pixels the annotation ignores (IGNORE_LABEL after the
label conventions below) follow `--ignore_pixels`: "background" (default; LISA, GSVA and MMR build
each mask as `label == class_id`, so ignored pixels are 0) or "exclude" (they stay IGNORE_LABEL
in the masks and the loss leaves them out). Class names keep the vocabulary's spelling; the
templates lower-case them where the references do. `target_count` and `finish_sample` are
shared with the part and referring sources.

Label conventions (REFERENCE 4.2); after them a map holds class indices or IGNORE_LABEL:
- ADE20K: pixel 0 ("other") -> 255, pixel v -> v - 1 (150 classes). Vocabulary:
  `ade20k/ade20k_classes.json` (a json list of names) if present, else ADE20K_CLASSES below (the
  SceneParsing-150 names, first synonym, as LISA's `utils/ade20k_classes.json`).
- COCO-Stuff (stuffthingmaps): pixel v is the class with id v + 1 of `cocostuff_classes.txt`
  ("id: name" lines from "0: unlabeled", which no pixel takes; 255 is unlabeled); classes whose
  name contains "-" ("wall-brick", "floor-other", ...) -> 255, as LISA.
- Mapillary v2.0: pixel = index into `config_v2.0.json` labels, names `readable` lower-cased.
  The label PNGs are palette images, so label maps are read by index with PIL (cv2 would expand
  the palette into colours).
- PACO-LVIS / PASCAL-Part: see `utils.datasets.parts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
from utils.datasets.templates import (
    GSVA_REFER_SEG,
    GSVA_SEM_SEG,
    GsvaAnswerFormat,
    Target,
    build_conversations,
    targets_to_draw,
)

ADE20K_CLASSES = tuple(
    (
        "wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, "
        "sidewalk, person, earth, door, table, mountain, plant, curtain, chair, car, water, "
        "painting, sofa, shelf, house, sea, mirror, rug, field, armchair, seat, fence, desk, "
        "rock, wardrobe, lamp, bathtub, railing, cushion, base, box, column, signboard, "
        "chest of drawers, counter, sand, sink, skyscraper, fireplace, refrigerator, "
        "grandstand, path, stairs, runway, case, pool table, pillow, screen door, stairway, "
        "river, bridge, bookcase, blind, coffee table, toilet, flower, book, hill, bench, "
        "countertop, stove, palm, kitchen island, computer, swivel chair, boat, bar, "
        "arcade machine, hovel, bus, towel, light, truck, tower, chandelier, awning, "
        "streetlight, booth, television receiver, airplane, dirt track, apparel, pole, land, "
        "bannister, escalator, ottoman, bottle, buffet, poster, stage, van, ship, fountain, "
        "conveyer belt, canopy, washer, plaything, swimming pool, stool, barrel, basket, "
        "waterfall, tent, bag, minibike, cradle, oven, ball, food, step, tank, trade name, "
        "microwave, pot, animal, bicycle, lake, dishwasher, screen, blanket, sculpture, hood, "
        "sconce, vase, traffic light, tray, ashcan, fan, pier, crt screen, plate, monitor, "
        "bulletin board, shower, radiator, glass, clock, flag"
    ).split(", ")
)


def read_ade20k_classes(root: Path) -> list[str]:
    path = root / "ade20k" / "ade20k_classes.json"
    if not path.is_file():
        return list(ADE20K_CLASSES)
    names = read_json(path, "a json list of the 150 ADE20K class names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(path, None, "expected a json list of class names")
    return names


def read_cocostuff_classes(root: Path) -> list[str]:
    """Names of ids 1.. of `cocostuff_classes.txt`, so that list index = pixel value."""
    path = root / "cocostuff" / "cocostuff_classes.txt"
    hint = "LISA's utils/cocostuff_classes.txt: 183 lines 'id: name' from '0: unlabeled'"
    if not path.is_file():
        raise DataError(path, None, "file does not exist", hint)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = []
    for number, line in enumerate(filter(None, lines)):
        key, separator, name = line.partition(": ")
        if not separator or key.strip() != str(number):
            raise DataError(path, f"line {number + 1}", f"expected '{number}: name'", hint)
        names.append(name.strip())
    if len(names) < 2:
        raise DataError(path, None, "has no class after '0: unlabeled'", hint)
    return names[1:]


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


def ade20k_labels(raw: np.ndarray, classes: list[str]) -> np.ndarray:
    """Pixel 0 ("other") and 255 -> IGNORE_LABEL, v -> v - 1."""
    label = raw - 1
    label[(raw == 0) | (raw == IGNORE_LABEL)] = IGNORE_LABEL
    return label


def cocostuff_labels(raw: np.ndarray, classes: list[str]) -> np.ndarray:
    """Classes named "x-y" (merged or "-other" stuff) -> IGNORE_LABEL, as LISA."""
    hyphenated = [index for index, name in enumerate(classes) if "-" in name]
    return np.where(np.isin(raw, hyphenated), IGNORE_LABEL, raw)


def same_labels(raw: np.ndarray, classes: list[str]) -> np.ndarray:
    return raw


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

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3], label int64 [H, W] of class indices or IGNORE_LABEL)."""
        image_path, label_path = self.paths(index)
        record = self.stems[index]
        image = read_image(image_path, label_path, record)
        label = self.spec.remap(
            read_label_map(label_path, image.shape[:2], label_path, record), self.classes
        )
        values = np.unique(label)
        unknown = values[(values != IGNORE_LABEL) & ((values < 0) | (values >= len(self.classes)))]
        if unknown.size:
            raise DataError(
                label_path,
                record,
                f"class index {int(unknown[0])} (after the dataset's remapping) is outside the "
                f"vocabulary of {len(self.classes)} classes",
            )
        return image, label

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """Up to `target_count` of the classes present in map `index`, drawn from `rng`;
        UnusableSample when the map has no labelled pixel (LISA and GSVA draw another image,
        `return self.__getitem__(0)`, LISA utils/sem_seg_dataset.py:264-265, GSVA
        data/sem_seg_dataset.py:293-294; the mixer does that here)."""
        image, label = self.load(check_record_index(index, len(self), self.name))
        present = [int(v) for v in np.unique(label) if v != IGNORE_LABEL]
        if not present:
            raise UnusableSample(
                f"{self.name}: {self.paths(index)[1]} (record {self.stems[index]}) has no "
                "labelled pixel"
            )
        count = target_count(self.options)
        chosen = rng.choice(present, size=min(count, len(present)), replace=False)
        ignored = label == IGNORE_LABEL if self.options.ignore_pixels == "exclude" else None
        targets = [Target(self.classes[c], False, class_mask(label == c, ignored)) for c in chosen]
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


def target_count(options: SamplingOptions) -> int:
    """How many distinct classes a sample asks about at most."""
    return targets_to_draw(
        options.prompt_style, options.num_classes_per_sample, options.num_classes_per_question
    )


def finish_sample(
    image: np.ndarray,
    targets: list[Target],
    options: SamplingOptions,
    rng: np.random.Generator,
    image_path: Path,
    source: str,
    *,
    gsva_format: GsvaAnswerFormat = GSVA_REFER_SEG,
) -> Sample:
    """Conversations about `targets` in the configured prompt style, as a Sample.

    gsva_format: how the "gsva" style writes its answer; GSVA_REFER_SEG (", " between parts,
    sentences stripped of '.', empty masks answered `[REJ]`) for referring sources, GSVA_SEM_SEG
    ("," between parts) for semantic and part sources.
    """
    conversations, masks = build_conversations(
        targets,
        options.prompt_style,
        rng,
        image.shape[:2],
        options.num_classes_per_sample,
        options.use_expand_question_list,
        options.num_classes_per_question,
        gsva_format,
    )
    return Sample(image, conversations, masks, str(image_path), source)


def build_sem_seg_sources(
    dataset_dir: str | Path, names: list[str], options: SamplingOptions
) -> list[Source]:
    """One source per `--sem_seg_data` name ("ade20k||cocostuff||..." split on "||")."""
    # deferred: utils.datasets.parts imports this module's sampling helpers
    from utils.datasets.parts import PART_SPECS, PartSource

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
