"""Part-segmentation sources of LISA's `sem_seg` task: PACO-LVIS and PASCAL-Part, COCO-format
jsons of images, categories and annotations (`--sem_seg_data paco_lvis||pascal_part`).

Category names are "obj" or "obj:part", each with any "_(...)" suffix stripped; a part is asked
as "obj part" or "the part of the obj" (50/50, drawn per target, as LISA, GSVA and MMR).
Targets follow `--part_targets`:
- "instance" (default; LISA `utils/sem_seg_dataset.py:216-236,305-310`, GSVA and MMR alike): up
  to `target_count` of the image's annotations drawn without replacement, each its own target
  with its own mask, so one name can be asked twice with different instance masks.
- "category": up to `target_count` distinct categories, each mask the union of the image's
  annotations of that category.
Masks are decoded by `utils.datasets.coco` (whose policy drops degenerate polygon parts,
reported by `check` as warnings). Names keep the json's spelling; the templates lower-case them
where the references do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.datasets.base import (
    DataError,
    Sample,
    SamplingOptions,
    UnusableSample,
    check_image,
    check_record_index,
    read_image,
    read_json,
    resolve_inside,
)
from utils.datasets.coco import check_segmentation, decode_segmentation
from utils.datasets.templates import GSVA_SEM_SEG, Target, finish_sample, target_count

PART_NAME_PROBABILITY = 0.5  # "obj part" rather than "the part of the obj"
COCO_LISTS = ("images", "annotations", "categories")

PartKey = tuple[str, str | None]


@dataclass(frozen=True)
class PartSpec:
    """A COCO-format part dataset: its json and the folder its `file_name`s are relative to."""

    annotations: str
    images: str


PART_SPECS = {
    "paco_lvis": PartSpec("vlpart/paco/annotations/paco_lvis_v1_train.json", "coco"),
    "pascal_part": PartSpec(
        "vlpart/pascal_part/train.json", "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"
    ),
}


def part_name(category: str) -> PartKey:
    """("obj", "part") of "obj_(x):part_(y)"; part None for an object category."""
    pieces = [piece.split("_(")[0] for piece in category.strip().split(":")]
    if len(pieces) > 2:
        raise ValueError(f"category {category!r} has more than one ':'")
    return pieces[0], pieces[1] if len(pieces) == 2 else None


def render_name(key: PartKey, rng: np.random.Generator) -> str:
    """ "obj", or a part as "obj part" / "the part of the obj" (50/50, as LISA)."""
    obj, part = key
    if part is None:
        return obj
    return f"{obj} {part}" if rng.random() < PART_NAME_PROBABILITY else f"the {part} of the {obj}"


def hashable_id(value: object) -> int | str | None:
    """A json id usable as a dict key (int or str, not bool), else None."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def read_categories(file: Path, categories: list) -> dict[int | str, PartKey]:
    """Category id -> (obj, part); DataError naming the first malformed category."""
    names: dict[int | str, PartKey] = {}
    for position, category in enumerate(categories):
        try:
            key = hashable_id(category["id"])
            if key is None:
                raise TypeError(f"id {category['id']!r} is not an int or a string")
            names[key] = part_name(category["name"])
        except (TypeError, KeyError, ValueError, AttributeError) as error:
            raise DataError(file, f"categories[{position}]", f"bad category ({error})") from error
    return names


class PartSource:
    """PACO-LVIS or PASCAL-Part: COCO-format images, categories and annotations."""

    def __init__(self, dataset_dir: Path, options: SamplingOptions, dataset: str) -> None:
        spec = PART_SPECS[dataset]
        self.name, self.options = f"sem_seg/{dataset}", options
        self.file = Path(dataset_dir) / spec.annotations
        self.image_dir = Path(dataset_dir) / spec.images
        data = read_json(
            self.file, f"expected the COCO-format json {spec.annotations} in --dataset_dir"
        )
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in COCO_LISTS):
            raise DataError(self.file, None, f"expected a COCO json with lists {COCO_LISTS}")
        self.names = read_categories(self.file, data["categories"])
        self.images: list = data["images"]
        self.annotations: dict[int | str, list[dict]] = {}
        self.orphans: list[DataError] = []
        self.index_annotations(data["annotations"])

    def index_annotations(self, annotations: list) -> None:
        """Group annotations by image id; those naming no image of the json are orphans."""
        image_ids = {hashable_id(info.get("id")) for info in self.images if isinstance(info, dict)}
        for position, ann in enumerate(annotations):
            image_id = hashable_id(ann.get("image_id")) if isinstance(ann, dict) else None
            if image_id is None or image_id not in image_ids:
                problem = "has no image_id naming an image of the json"
                self.orphans.append(DataError(self.file, f"annotations[{position}]", problem))
                continue
            self.annotations.setdefault(image_id, []).append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> tuple[str, Path]:
        """(record name, image path) of image `index`; DataError if its record is malformed."""
        info = self.images[index]
        if not isinstance(info, dict) or hashable_id(info.get("id")) is None:
            raise DataError(self.file, f"images[{index}]", "missing field 'id'")
        record = f"image {info['id']}"
        if not isinstance(info.get("file_name"), str):
            raise DataError(self.file, record, "missing field 'file_name'")
        return record, resolve_inside(self.image_dir, info["file_name"], self.file, record)

    def category(self, ann: dict) -> PartKey:
        """The (obj, part) of an annotation; DataError if its category is not in the json."""
        key = hashable_id(ann.get("category_id"))
        if key not in self.names:
            problem = f"category_id {ann.get('category_id')!r} is not a category of the json"
            raise DataError(self.file, f"annotation {ann.get('id')}", problem)
        return self.names[key]

    def annotation_mask(self, ann: dict, shape: tuple[int, int]) -> np.ndarray:
        """uint8 [H, W] in {0, 1}: the segmentation of one annotation."""
        record = f"annotation {ann.get('id')}"
        return decode_segmentation(ann.get("segmentation"), shape, self.file, record)

    def union_mask(self, anns: list[dict], shape: tuple[int, int]) -> np.ndarray:
        """uint8 [H, W] union of the segmentations of `anns`."""
        mask = np.zeros(shape, np.uint8)
        for ann in anns:
            mask |= self.annotation_mask(ann, shape)
        return mask

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(len(self))), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        """Targets of image `index` as `--part_targets` says, drawn from `rng`; UnusableSample
        when the image has no annotation (LISA and GSVA draw another image,
        `return self.__getitem__(0)`, LISA utils/sem_seg_dataset.py:217-218, GSVA
        data/sem_seg_dataset.py:242-243; the mixer does that here)."""
        record, path = self.image_path(check_record_index(index, len(self), self.name))
        anns = self.annotations.get(self.images[index]["id"], [])
        if not anns:
            raise UnusableSample(f"{self.name}: {self.file}, {record} has no annotation")
        image = read_image(path, self.file, record)
        if self.options.part_targets == "instance":
            targets = self.instance_targets(anns, image.shape[:2], rng)
        else:
            targets = self.category_targets(anns, image.shape[:2], rng)
        return finish_sample(
            image, targets, self.options, rng, path, self.name, gsva_format=GSVA_SEM_SEG
        )

    def instance_targets(
        self, anns: list[dict], shape: tuple[int, int], rng: np.random.Generator
    ) -> list[Target]:
        """Up to `target_count` annotations, each a target with its own uint8 [H, W] mask."""
        chosen = rng.choice(len(anns), min(target_count(self.options), len(anns)), replace=False)
        return [
            Target(
                render_name(self.category(anns[k]), rng),
                False,
                self.annotation_mask(anns[k], shape),
            )
            for k in chosen
        ]

    def category_targets(
        self, anns: list[dict], shape: tuple[int, int], rng: np.random.Generator
    ) -> list[Target]:
        """Up to `target_count` distinct categories, each the union of its annotations."""
        groups: dict[PartKey, list[dict]] = {}
        for ann in anns:
            groups.setdefault(self.category(ann), []).append(ann)
        keys = list(groups)
        chosen = rng.choice(len(keys), min(target_count(self.options), len(keys)), replace=False)
        return [
            Target(render_name(keys[k], rng), False, self.union_mask(groups[keys[k]], shape))
            for k in chosen
        ]

    def check(self, deep: bool = False) -> Iterator[DataError]:
        yield from self.orphans
        for index in range(len(self.images)):
            yield from self.check_image(index, deep)

    def check_image(self, index: int, deep: bool) -> Iterator[DataError]:
        """Findings of image `index` and of each of its annotations (deep: decode them all)."""
        try:
            record, path = self.image_path(index)
            image = check_image(path, self.file, record, deep)
        except DataError as error:
            yield error
            return
        shape = image.shape[:2] if image is not None else self.declared_shape(index)
        for ann in self.annotations.get(self.images[index]["id"], []):
            try:
                self.category(ann)
            except DataError as error:
                yield error
                continue
            segmentation, where = ann.get("segmentation"), f"annotation {ann.get('id')}"
            yield from check_segmentation(segmentation, shape, self.file, where, deep)

    def declared_shape(self, index: int) -> tuple[int, int] | None:
        """(height, width) the json declares for image `index`, None if it declares none."""
        info = self.images[index]
        shape = (info.get("height"), info.get("width"))
        return shape if all(isinstance(v, int) for v in shape) else None
