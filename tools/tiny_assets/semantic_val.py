"""The four semantic-segmentation validation sets LaSagnA scores, in their real layouts
(`utils.datasets.semantic_val` reads them): ADE20K, COCO-Stuff (171), Cityscapes, Mapillary v1.2.

Each kind of shape is one real class of each vocabulary (`tools/tiny_assets/classes.py` for
ADE20K and COCO-Stuff; below for Cityscapes and Mapillary), so a label value means what it
would in the real data:
- ADE20K: `ade20k/images/validation/ADE_val_*.jpg` + `annotations/validation/*.png`, label =
  class index + 1 on objects, 0 ("other") elsewhere (as the training split).
- COCO-Stuff: `coco/val2017/<id>.jpg` + `coco/panoptic_semseg_val2017/<id>.png`, label = index
  in the 171-name list on objects, "ground" (a real stuff class, scored) elsewhere, 255
  (unlabeled) on a one-pixel frame.
- Cityscapes: `cityscapes/leftImg8bit/val/<city>/*_leftImg8bit.png` (PNG images, as the real
  ones) + `gtFine/val/<city>/*_gtFine_labelIds.png` and `gtFine/cityscapes_panoptic_val.json`
  (the 19 categories, as cityscapesScripts writes them): labelIds, road (7) in the background,
  ego vehicle (1) on the frame, the triangle as parking (9: a labelId of no evaluated class).
- Mapillary: `mapillary/config_v1.2.json` (66 labels, the last "Unlabeled") +
  `validation/images/*.jpg` + `validation/v1.2/labels/*.png` (palette PNGs, pixel = label
  index): the kinds at MAPILLARY_V12_INDEX (fillers elsewhere), "Unlabeled" in the background.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tools.tiny_assets.classes import (
    SEMANTIC_NAMES,
    class_indexes,
)
from tools.tiny_assets.common import Context, write_jpeg, write_json, write_palette_png, write_png
from tools.tiny_assets.semantic import (
    FRAME_WIDTH,
    ade20k_label,
    label_colour,
    mapillary_keys,
)
from tools.tiny_assets.shapes_world import OBJECT_SHAPES, Scene
from utils.datasets.base import IGNORE_LABEL
from utils.datasets.semantic_val import (
    NUM_CLASSES,
    SHIPPED_CITYSCAPES_CLASSES,
    SHIPPED_COCOSTUFF_CLASSES,
    parse_cityscapes_categories,
    parse_cocostuff_classes,
)

COCO_VAL_FIRST_ID = 300001
COCOSTUFF_VAL_BACKGROUND = "ground"  # "ground-other" with its suffix stripped: a class here
CITYSCAPES_CITY = "frankfurt"
CITYSCAPES_SEQUENCE = "000000"
# cityscapesScripts labels.py labelIds
CITYSCAPES_ROAD, CITYSCAPES_EGO_VEHICLE, CITYSCAPES_PARKING = 7, 1, 9
CITYSCAPES_KINDS = {
    "circle": "traffic sign",
    "square": "traffic light",
    "star": "person",
    "house": "building",
    "car": "car",
    "tree": "vegetation",
}
CITYSCAPES_UNSCORED_KIND = "triangle"  # drawn as parking: no evaluated class
MAPILLARY_V12_LABELS = NUM_CLASSES["mapillary"] + 1  # 65 classes + "Unlabeled"
MAPILLARY_INDEX_STEP = 8  # kinds at 8, 16, ..., 56: all below 65
MAPILLARY_V12_INDEX = {
    shape: MAPILLARY_INDEX_STEP * (k + 1) for k, shape in enumerate(OBJECT_SHAPES)
}
MAPILLARY_UNLABELED = "Unlabeled"


def write_ade20k_val(ctx: Context) -> None:
    base = ctx.root / "ade20k"
    for index, scene in enumerate(ctx.scenes("ade20k val", ctx.options.images_per_split), 1):
        stem = f"ADE_val_{index:08d}"
        write_jpeg(base / "images" / "validation" / f"{stem}.jpg", scene.image)
        write_png(base / "annotations" / "validation" / f"{stem}.png", ade20k_label(scene))


def framed(label: np.ndarray, frame_value: int) -> np.ndarray:
    """`label` with its one-pixel border set to `frame_value`."""
    label[:FRAME_WIDTH, :] = label[-FRAME_WIDTH:, :] = frame_value
    label[:, :FRAME_WIDTH] = label[:, -FRAME_WIDTH:] = frame_value
    return label


def cocostuff_val_label(scene: Scene) -> np.ndarray:
    """uint8 [H, W]: the kind's index in the 171-name list, "ground" elsewhere, 255 frame."""
    names = parse_cocostuff_classes(SHIPPED_COCOSTUFF_CLASSES).names
    indexes = class_indexes(names, SEMANTIC_NAMES)
    return framed(scene.class_map(indexes, names.index(COCOSTUFF_VAL_BACKGROUND)), IGNORE_LABEL)


def write_cocostuff_val(ctx: Context) -> None:
    base = ctx.root / "coco"
    for offset, scene in enumerate(ctx.scenes("cocostuff val", ctx.options.images_per_split)):
        stem = f"{COCO_VAL_FIRST_ID + offset:012d}"
        write_jpeg(base / "val2017" / f"{stem}.jpg", scene.image)
        write_png(base / "panoptic_semseg_val2017" / f"{stem}.png", cocostuff_val_label(scene))


def cityscapes_label(scene: Scene) -> np.ndarray:
    """uint8 [H, W] labelIds: the kinds' classes' ids, parking for the triangle, road in the
    background, ego vehicle on the frame."""
    vocabulary = parse_cityscapes_categories(SHIPPED_CITYSCAPES_CLASSES)
    ids = dict(zip(vocabulary.names, vocabulary.values, strict=True))
    label_ids = {kind: ids[name] for kind, name in CITYSCAPES_KINDS.items()}
    label_ids[CITYSCAPES_UNSCORED_KIND] = CITYSCAPES_PARKING
    return framed(scene.class_map(label_ids, CITYSCAPES_ROAD), CITYSCAPES_EGO_VEHICLE)


def write_rgb_png(path: Path, image: np.ndarray) -> None:
    """uint8 RGB [H, W, 3] as a PNG (Cityscapes' leftImg8bit images are PNGs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def cityscapes_panoptic_json() -> dict:
    """The `categories` of gtFine/cityscapes_panoptic_val.json (id = labelId, name, ...)."""
    vocabulary = parse_cityscapes_categories(SHIPPED_CITYSCAPES_CLASSES)
    categories = [
        {"id": value, "name": name, "color": label_colour(value), "isthing": 0}
        for name, value in zip(vocabulary.names, vocabulary.values, strict=True)
    ]
    return {"images": [], "annotations": [], "categories": categories}


def write_cityscapes_val(ctx: Context) -> None:
    base = ctx.root / "cityscapes"
    write_json(base / "gtFine" / "cityscapes_panoptic_val.json", cityscapes_panoptic_json())
    for index, scene in enumerate(ctx.scenes("cityscapes val", ctx.options.images_per_split)):
        stem = f"{CITYSCAPES_CITY}_{CITYSCAPES_SEQUENCE}_{index:06d}"
        city = f"val/{CITYSCAPES_CITY}"
        write_rgb_png(base / "leftImg8bit" / city / f"{stem}_leftImg8bit.png", scene.image)
        write_png(base / "gtFine" / city / f"{stem}_gtFine_labelIds.png", cityscapes_label(scene))


def mapillary_v12_config() -> dict:
    """config_v1.2.json's `labels`: the kinds' classes at MAPILLARY_V12_INDEX, fillers
    elsewhere, "Unlabeled" last."""
    readable = [f"Unused {index}" for index in range(MAPILLARY_V12_LABELS)]
    for shape, index in MAPILLARY_V12_INDEX.items():
        readable[index] = SEMANTIC_NAMES[shape].capitalize()
    readable[-1] = MAPILLARY_UNLABELED
    labels = [
        {
            "name": f"object--{name.lower().replace(' ', '-')}",
            "readable": name,
            "color": label_colour(index),
            "instances": False,
            "evaluate": index < NUM_CLASSES["mapillary"],
        }
        for index, name in enumerate(readable)
    ]
    return {"labels": labels, "version": "1.2"}


def write_mapillary_v12(ctx: Context, split: str, scenes: str, keys: str) -> None:
    """`mapillary/config_v1.2.json` and `<split>/images/<key>.jpg` with
    `<split>/v1.2/labels/<key>.png` (pixel = v1.2 label index), from the random streams
    `scenes` and `keys` (the training images reuse the `mapillary` family's)."""
    base = ctx.root / "mapillary"
    config = mapillary_v12_config()
    write_json(base / "config_v1.2.json", config)
    colours = [label["color"] for label in config["labels"]]
    drawn = ctx.scenes(scenes, ctx.options.images_per_split)
    unlabeled = MAPILLARY_V12_LABELS - 1
    for key, scene in zip(mapillary_keys(ctx, len(drawn), keys), drawn, strict=True):
        write_jpeg(base / split / "images" / f"{key}.jpg", scene.image)
        label = scene.class_map(MAPILLARY_V12_INDEX, unlabeled)
        write_palette_png(base / split / "v1.2" / "labels" / f"{key}.png", label, colours)


def write_semantic_val(ctx: Context) -> None:
    """The four validation sets."""
    write_ade20k_val(ctx)
    write_cocostuff_val(ctx)
    write_cityscapes_val(ctx)
    write_mapillary_v12(ctx, "validation", "mapillary val", "mapillary val keys")
