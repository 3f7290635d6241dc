"""Semantic-segmentation families: ADE20K, COCO-Stuff and Mapillary, with their vocabularies.

Classes are the colour-independent object shapes ("circle", ..., "house", "car", "tree").
In each vocabulary the k-th shape sits at index SHAPE_INDEX_STEP * (k + 1) and every index
between holds a filler name, so a loader that is off by one lands on a filler, not on another
shape. Index = the class's position in the vocabulary = its training class id:

- ADE20K: `ade20k/ade20k_classes.json` (150 names); label pixel = index + 1, 0 = other/ignore.
- COCO-Stuff: `cocostuff/cocostuff_classes.txt`, 183 lines "id: name" with `0: unlabeled` first,
  so pixel p is line `p + 1`; background pixels are "ground-other" (contains '-', so loaders
  ignore it) and the one-pixel image frame is 255 (unlabeled), as stuffthingmaps have.
- Mapillary: `mapillary/config_v2.0.json` labels (readable names capitalised); pixel = index;
  the last label is "Unlabeled" and covers the background, as in the real data.
"""

from __future__ import annotations

import numpy as np

from tools.tiny_assets.common import Context, write_jpeg, write_json, write_png
from utils.datasets.base import IGNORE_LABEL
from utils.shapes_world import OBJECT_SHAPES, Scene

SHAPE_INDEX_STEP = 10
SHAPE_INDEX = {shape: SHAPE_INDEX_STEP * (k + 1) for k, shape in enumerate(OBJECT_SHAPES)}
ADE20K_CLASSES = 150
ADE20K_OTHER = 0
COCOSTUFF_CLASSES = 182
COCOSTUFF_BACKGROUND = "ground-other"
COCOSTUFF_BACKGROUND_INDEX = 150
MAPILLARY_LABELS = 124
MAPILLARY_UNLABELED = "Unlabeled"
# Mapillary's config gives every label a display colour; ours is a fixed function of the index.
COLOUR_MULTIPLIERS = (37, 91, 151)
COLOUR_LEVELS = 256
FRAME_WIDTH = 1
MAPILLARY_KEY_LENGTH = 22
MAPILLARY_KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


def vocabulary(size: int, filler: str) -> list[str]:
    """`size` names: the shapes at SHAPE_INDEX, `filler.format(i)` elsewhere."""
    names = [filler.format(i) for i in range(size)]
    for shape, index in SHAPE_INDEX.items():
        names[index] = shape
    return names


def ade20k_label(scene: Scene) -> np.ndarray:
    """uint8 [H, W]: shape index + 1 on objects, 0 elsewhere."""
    shifted = {shape: index + 1 for shape, index in SHAPE_INDEX.items()}
    return scene.class_map(shifted, ADE20K_OTHER)


def write_ade20k(ctx: Context) -> None:
    """`ade20k/images/training/ADE_train_*.jpg` + `annotations/training/*.png` + classes."""
    base = ctx.root / "ade20k"
    write_json(base / "ade20k_classes.json", vocabulary(ADE20K_CLASSES, "unused {}"))
    scenes = ctx.scenes("ade20k", ctx.options.images_per_split)
    for index, scene in enumerate(scenes, start=1):
        stem = f"ADE_train_{index:08d}"
        write_jpeg(base / "images" / "training" / f"{stem}.jpg", scene.image)
        write_png(base / "annotations" / "training" / f"{stem}.png", ade20k_label(scene))


def cocostuff_names() -> list[str]:
    names = vocabulary(COCOSTUFF_CLASSES, "unused-{}")
    names[COCOSTUFF_BACKGROUND_INDEX] = COCOSTUFF_BACKGROUND
    return names


def cocostuff_label(scene: Scene) -> np.ndarray:
    """uint8 [H, W]: shape index on objects, "ground-other" elsewhere, 255 on the frame."""
    label = scene.class_map(SHAPE_INDEX, COCOSTUFF_BACKGROUND_INDEX)
    label[:FRAME_WIDTH, :] = label[-FRAME_WIDTH:, :] = IGNORE_LABEL
    label[:, :FRAME_WIDTH] = label[:, -FRAME_WIDTH:] = IGNORE_LABEL
    return label


def write_cocostuff(ctx: Context, scenes: list[Scene], image_ids: list[int]) -> None:
    """`cocostuff/train2017/<id>.png` label maps of the COCO 2017 images (written by the
    caller under `coco/train2017/`) and `cocostuff/cocostuff_classes.txt`."""
    base = ctx.root / "cocostuff"
    lines = ["0: unlabeled"] + [f"{i + 1}: {name}" for i, name in enumerate(cocostuff_names())]
    base.mkdir(parents=True, exist_ok=True)
    (base / "cocostuff_classes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for image_id, scene in zip(image_ids, scenes, strict=True):
        write_png(base / "train2017" / f"{image_id:012d}.png", cocostuff_label(scene))


def label_colour(index: int) -> list[int]:
    return [(index * m) % COLOUR_LEVELS for m in COLOUR_MULTIPLIERS]


def mapillary_config() -> dict:
    """The `labels` list of config_v2.0.json (readable, name, color, instances, evaluate)."""
    readable = [name.capitalize() for name in vocabulary(MAPILLARY_LABELS, "unused {}")]
    readable[-1] = MAPILLARY_UNLABELED
    labels = []
    for index, name in enumerate(readable):
        is_shape = name.lower() in SHAPE_INDEX
        labels.append(
            {
                "name": f"object--{name.lower().replace(' ', '-')}",
                "readable": name,
                "color": label_colour(index),
                "instances": is_shape,
                "evaluate": is_shape,
            }
        )
    return {"labels": labels, "version": "2.0"}


def mapillary_keys(ctx: Context, count: int) -> list[str]:
    """Mapillary-like image keys (22 characters, URL-safe alphabet), distinct and seeded."""
    rng = ctx.rng("mapillary keys")
    keys: list[str] = []
    while len(keys) < count:
        key = "".join(rng.choice(list(MAPILLARY_KEY_ALPHABET), size=MAPILLARY_KEY_LENGTH))
        if key not in keys:
            keys.append(key)
    return keys


def write_mapillary(ctx: Context) -> None:
    """`mapillary/config_v2.0.json`, `training/images/*.jpg`, `training/v2.0/labels/*.png`."""
    base = ctx.root / "mapillary"
    write_json(base / "config_v2.0.json", mapillary_config())
    scenes = ctx.scenes("mapillary", ctx.options.images_per_split)
    unlabeled = MAPILLARY_LABELS - 1
    for key, scene in zip(mapillary_keys(ctx, len(scenes)), scenes, strict=True):
        write_jpeg(base / "training" / "images" / f"{key}.jpg", scene.image)
        label = scene.class_map(SHAPE_INDEX, unlabeled)
        write_png(base / "training" / "v2.0" / "labels" / f"{key}.png", label)
