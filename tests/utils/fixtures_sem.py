"""Fixture writers for the sem_seg tests: tiny datasets in the real formats (a few 24 x 32 images
whose classes are known rectangles and circles), each returning the masks a loader must produce
(label maps: as `--ignore_pixels exclude` gives them, IGNORE_LABEL where the annotation ignores;
under "background" a mask is its pixels equal to 1); plus image/json writers and question
parsers shared with the vqa and reason_seg tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from utils.datasets.base import IGNORE_LABEL
from utils.datasets.sem_seg import ADE20K_CLASSES
from utils.datasets.templates import (
    EXPANDED_LONG_QUESTIONS,
    EXPANDED_SHORT_QUESTIONS,
    IMAGE_PREFIX,
    REJ,
    SEG,
)

H, W = 24, 32
RNG_SEEDS = range(40)


def write_jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    cv2.imwrite(str(path), image)


def write_png(path: Path, label: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette:
        # colours unrelated to the indices, so a colour-expanding reader gets wrong classes
        image = image.convert("P")
        image.putpalette([(i * 37) % 256 for i in range(768)])
    image.save(path)


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def rectangle(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """bool [H, W], rows y0..y1-1 and columns x0..x1-1."""
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def circle(cy: int, cx: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def expected(inside: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    mask = inside.astype(np.uint8)
    mask[ignored] = IGNORE_LABEL
    return mask


def write_ade20k(root: Path, with_empty: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """ADE20K record "a": raw 1 (wall) rectangle, 3 (sky) circle, 255 block, 0 elsewhere;
    "b": only 0 (no usable class). Returns {stem: {class name: expected mask}}."""
    raw = np.zeros((H, W), np.uint8)
    wall, sky, void = rectangle(2, 10, 3, 13), circle(16, 22, 5), rectangle(20, 24, 0, 4)
    raw[wall], raw[sky], raw[void] = 1, 3, 255
    ignored = (raw == 0) | (raw == 255)
    stems = {"a": raw, "b": np.zeros((H, W), np.uint8)} if with_empty else {"a": raw}
    for index, (stem, label) in enumerate(stems.items()):
        write_jpeg(root / "ade20k/images/training" / f"{stem}.jpg", index)
        write_png(root / "ade20k/annotations/training" / f"{stem}.png", label)
    return {"a": {"wall": expected(wall, ignored), "sky": expected(sky, ignored)}}


def write_cocostuff(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """Vocabulary person / wall-brick / grass; pixel 0 person, 1 wall-brick, 2 grass, 255
    frame. Images under coco/train2017."""
    lines = ["0: unlabeled", "1: person", "2: wall-brick", "3: grass"]
    (root / "cocostuff").mkdir(parents=True, exist_ok=True)
    (root / "cocostuff/cocostuff_classes.txt").write_text("\n".join(lines) + "\n")
    raw = np.full((H, W), 2, np.uint8)
    person, brick = rectangle(4, 14, 4, 12), rectangle(4, 20, 20, 28)
    raw[person], raw[brick] = 0, 1
    raw[0, :] = raw[-1, :] = 255
    ignored = brick | (raw == 255)
    stem = "000000000001"
    write_png(root / "cocostuff/train2017" / f"{stem}.png", raw)
    write_jpeg(root / "coco/train2017" / f"{stem}.jpg")
    grass = raw == 2
    return {stem: {"person": expected(person, ignored), "grass": expected(grass, ignored)}}


def write_mapillary(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """Labels Car / Road / Sky as a palette PNG: 0 car rectangle, 1 road bottom, 2 sky top."""
    readable = ("Car", "Road", "Sky")
    config = {"labels": [{"readable": name, "name": name.lower()} for name in readable]}
    write_json(root / "mapillary/config_v2.0.json", config)
    raw = np.full((H, W), 2, np.uint8)
    road, car = rectangle(12, 24, 0, W), rectangle(8, 16, 5, 15)
    raw[road], raw[car] = 1, 0
    no_ignore = np.zeros((H, W), bool)
    write_png(root / "mapillary/training/v2.0/labels/k1.png", raw, palette=True)
    write_jpeg(root / "mapillary/training/images/k1.jpg")
    return {"k1": {name.lower(): expected(raw == v, no_ignore) for v, name in enumerate(readable)}}


def many_class_names(count: int) -> list[str]:
    """`count` mixed-case class names without ',' or ' and ' (so joined names stay readable)."""
    return [f"Kind{index} Thing" for index in range(count)]


def write_ade20k_many(root: Path, count: int) -> dict[str, np.ndarray]:
    """ADE20K record "m" with `count` (<= W / 2) classes of a 150-name `ade20k_classes.json`
    whose first names are `many_class_names(count)`: class k (raw k + 1) fills columns 2k, 2k+1
    below row 0; row 0 and the other columns are raw 0 ("other", ignored). Returns {class name:
    its inside, bool [H, W]}."""
    stripe = 2
    raw = np.zeros((H, W), np.uint8)
    names = many_class_names(count)
    inside = {}
    for k, name in enumerate(names):
        inside[name] = rectangle(1, H, stripe * k, stripe * (k + 1))
        raw[inside[name]] = k + 1
    vocabulary = names + [f"unused {i}" for i in range(len(ADE20K_CLASSES) - count)]
    write_json(root / "ade20k/ade20k_classes.json", vocabulary)
    write_jpeg(root / "ade20k/images/training/m.jpg")
    write_png(root / "ade20k/annotations/training/m.png", raw)
    return inside


def polygon(y0: int, y1: int, x0: int, x1: int) -> list[list[float]]:
    """A COCO polygon that pycocotools rasterises as `rectangle(y0, y1, x0, x1)`."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's list form: run lengths over the column-major pixels, starting with zeros."""
    counts, current, run = [], 0, 0
    for value in mask.astype(np.uint8).flatten(order="F"):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    return {"size": [H, W], "counts": [*counts, run]}


def write_paco(root: Path) -> dict[str, dict[tuple[str, str | None], list[np.ndarray]]]:
    """PACO-LVIS json with one image: "dog" (two instances, one polygon annotation each),
    "dog:ear" (compressed RLE), "bag_(container)" (uncompressed RLE) and
    "mug_(drinking_vessel):handle" (polygon). Returns {file_name: {(obj, part): the masks of its
    annotations, in file order}}."""
    dog_a, dog_b = rectangle(2, 8, 2, 10), rectangle(10, 14, 4, 8)
    ear, bag, handle = rectangle(2, 4, 2, 5), circle(18, 24, 4), rectangle(16, 22, 2, 6)
    categories = ["dog", "dog:ear", "bag_(container)", "mug_(drinking_vessel):handle"]
    segmentations = [polygon(2, 8, 2, 10), polygon(10, 14, 4, 8)]
    segmentations += [compressed_rle(ear), uncompressed_rle(bag), polygon(16, 22, 2, 6)]
    category_ids = [1, 1, 2, 3, 4]
    file_name = "train2017/000000000011.jpg"
    data = coco_json(categories, [(file_name, segmentations, category_ids)])
    write_json(root / "vlpart/paco/annotations/paco_lvis_v1_train.json", data)
    write_jpeg(root / "coco" / file_name)
    masks = {("dog", None): [dog_a, dog_b], ("dog", "ear"): [ear], ("bag", None): [bag]}
    masks[("mug", "handle")] = [handle]
    return {file_name: {key: [m.astype(np.uint8) for m in ms] for key, ms in masks.items()}}


def write_pascal_part(root: Path) -> dict[str, dict[tuple[str, str | None], list[np.ndarray]]]:
    """PASCAL-Part json: one image with "dog:head" and "dog:torso" polygons (one each)."""
    head, torso = rectangle(2, 8, 2, 8), rectangle(8, 20, 2, 20)
    file_name = "2008_000001.jpg"
    data = coco_json(
        ["dog:head", "dog:torso"],
        [(file_name, [polygon(2, 8, 2, 8), polygon(8, 20, 2, 20)], [1, 2])],
    )
    write_json(root / "vlpart/pascal_part/train.json", data)
    write_jpeg(root / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages" / file_name)
    masks = {("dog", "head"): [head], ("dog", "torso"): [torso]}
    return {file_name: {key: [m.astype(np.uint8) for m in ms] for key, ms in masks.items()}}


def coco_json(categories: list[str], images: list[tuple[str, list, list[int]]]) -> dict:
    """A COCO json; images = [(file_name, segmentations, category ids)]."""
    data: dict = {"categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}
    data["images"], data["annotations"] = [], []
    for image_id, (file_name, segmentations, category_ids) in enumerate(images, start=1):
        data["images"].append({"id": image_id, "file_name": file_name, "height": H, "width": W})
        for segmentation, category_id in zip(segmentations, category_ids, strict=True):
            ann_id = len(data["annotations"]) + 1
            data["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                }
            )
    return data


def template_pattern(template: str, field: str) -> re.Pattern:
    return re.compile(re.escape(IMAGE_PREFIX + template).replace(re.escape(field), "(.+)"))


SHORT_PATTERNS = [
    template_pattern(t, "{class_name}") for t in dict.fromkeys(EXPANDED_SHORT_QUESTIONS)
]
LONG_PATTERNS = [template_pattern(t, "{sent}") for t in EXPANDED_LONG_QUESTIONS]


def asked_name(question: str, long: bool = False) -> str:
    """The class name (or sentence) a LISA-style question asks about."""
    for pattern in LONG_PATTERNS if long else SHORT_PATTERNS:
        match = pattern.fullmatch(question)
        if match:
            return match.group(1)
    raise AssertionError(f"not a template question: {question!r}")


def token_count(conversations: list[list[tuple[str, str]]]) -> tuple[int, int]:
    """([SEG] count, [REJ] count) over every answer."""
    answers = [answer for conversation in conversations for _, answer in conversation]
    return sum(a.count(SEG) for a in answers), sum(a.count(REJ) for a in answers)
