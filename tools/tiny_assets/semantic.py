"""Semantic-segmentation families: ADE20K, COCO-Stuff and Mapillary.

ADE20K and COCO-Stuff label maps mean the real classes (`tools/tiny_assets/classes.py` maps each
kind to one), read through the class lists shipped at `utils/datasets/class_lists/`; as in the
real downloads, no vocabulary file is written into the dataset folder:

- ADE20K: label value = class index in `ade20k_classes.json` + 1 on objects, 0 ("other")
  elsewhere.
- COCO-Stuff: stuffthingmaps pixel value p = line p + 1 of `cocostuff_classes.txt` on objects;
  the background is "ground-other" (a real stuff class; its '-' makes loaders ignore it) and the
  one-pixel image frame is 255 (unlabeled), as stuffthingmaps have.
- Mapillary ships its vocabulary, so `mapillary/config_v2.0.json` is written: the kinds'
  classes at SHAPE_INDEX (readable names capitalised), fillers between, pixel = label index in
  palette PNGs whose palette holds the config's colours (as the real v2.0 labels are);
  the last label is "Unlabeled" and covers the background, as in the real data.
"""

from __future__ import annotations

import numpy as np

from tools.tiny_assets.classes import (
    COCOSTUFF_BACKGROUND_NAME,
    SEMANTIC_NAMES,
    ade20k_class_names,
    class_indexes,
    cocostuff_class_names,
)
from tools.tiny_assets.common import Context, write_jpeg, write_json, write_palette_png, write_png
from tools.tiny_assets.shapes_world import OBJECT_SHAPES, Scene
from utils.datasets.base import IGNORE_LABEL

ADE20K_OTHER = 0
ADE20K_LABEL_OFFSET = 1  # label value = class index + 1
# Mapillary: the k-th kind at index SHAPE_INDEX_STEP * (k + 1), fillers between, so a loader
# that is off by one lands on a filler, not on another kind.
SHAPE_INDEX_STEP = 10
SHAPE_INDEX = {shape: SHAPE_INDEX_STEP * (k + 1) for k, shape in enumerate(OBJECT_SHAPES)}
MAPILLARY_LABELS = 124
MAPILLARY_UNLABELED = "Unlabeled"
# Mapillary's config gives every label a display colour; ours is a fixed function of the index.
COLOUR_MULTIPLIERS = (37, 91, 151)
COLOUR_LEVELS = 256
FRAME_WIDTH = 1
MAPILLARY_KEY_LENGTH = 22
MAPILLARY_KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"


def ade20k_label(scene: Scene) -> np.ndarray:
    """uint8 [H, W]: the kind's ADE20K class index + 1 on objects, 0 ("other") elsewhere."""
    indexes = class_indexes(ade20k_class_names(), SEMANTIC_NAMES)
    shifted = {shape: index + ADE20K_LABEL_OFFSET for shape, index in indexes.items()}
    return scene.class_map(shifted, ADE20K_OTHER)


def write_ade20k(ctx: Context) -> None:
    """`ade20k/images/training/ADE_train_*.jpg` + `annotations/training/*.png`."""
    base = ctx.root / "ade20k"
    scenes = ctx.scenes("ade20k", ctx.options.images_per_split)
    for index, scene in enumerate(scenes, start=1):
        stem = f"ADE_train_{index:08d}"
        write_jpeg(base / "images" / "training" / f"{stem}.jpg", scene.image)
        write_png(base / "annotations" / "training" / f"{stem}.png", ade20k_label(scene))


def cocostuff_label(scene: Scene) -> np.ndarray:
    """uint8 [H, W]: the kind's COCO-Stuff pixel value on objects, "ground-other" elsewhere,
    255 on the frame."""
    names = cocostuff_class_names()
    indexes = class_indexes(names, SEMANTIC_NAMES)
    label = scene.class_map(indexes, names.index(COCOSTUFF_BACKGROUND_NAME))
    label[:FRAME_WIDTH, :] = label[-FRAME_WIDTH:, :] = IGNORE_LABEL
    label[:, :FRAME_WIDTH] = label[:, -FRAME_WIDTH:] = IGNORE_LABEL
    return label


def write_cocostuff(ctx: Context, scenes: list[Scene], image_ids: list[int]) -> None:
    """`cocostuff/train2017/<id>.png` label maps of the COCO 2017 images (written by the
    caller under `coco/train2017/`)."""
    base = ctx.root / "cocostuff"
    for image_id, scene in zip(image_ids, scenes, strict=True):
        write_png(base / "train2017" / f"{image_id:012d}.png", cocostuff_label(scene))


def vocabulary(size: int, filler: str) -> list[str]:
    """`size` names: the kinds' semantic classes at SHAPE_INDEX, `filler.format(i)` elsewhere."""
    names = [filler.format(i) for i in range(size)]
    for shape, index in SHAPE_INDEX.items():
        names[index] = SEMANTIC_NAMES[shape]
    return names


def label_colour(index: int) -> list[int]:
    return [(index * m) % COLOUR_LEVELS for m in COLOUR_MULTIPLIERS]


def mapillary_config() -> dict:
    """The `labels` list of config_v2.0.json (readable, name, color, instances, evaluate)."""
    readable = [name.capitalize() for name in vocabulary(MAPILLARY_LABELS, "unused {}")]
    readable[-1] = MAPILLARY_UNLABELED
    classes = set(SEMANTIC_NAMES.values())
    labels = []
    for index, name in enumerate(readable):
        is_shape = name.lower() in classes
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


def mapillary_keys(ctx: Context, count: int, stream: str = "mapillary keys") -> list[str]:
    """Mapillary-like image keys (22 characters, URL-safe alphabet), distinct and seeded by the
    random stream `stream` (the validation images have their own)."""
    rng = ctx.rng(stream)
    keys: list[str] = []
    while len(keys) < count:
        key = "".join(rng.choice(list(MAPILLARY_KEY_ALPHABET), size=MAPILLARY_KEY_LENGTH))
        if key not in keys:
            keys.append(key)
    return keys


def write_mapillary(ctx: Context) -> None:
    """`mapillary/config_v2.0.json`, `training/images/*.jpg`, `training/v2.0/labels/*.png`."""
    base = ctx.root / "mapillary"
    config = mapillary_config()
    write_json(base / "config_v2.0.json", config)
    colours = [label["color"] for label in config["labels"]]
    scenes = ctx.scenes("mapillary", ctx.options.images_per_split)
    unlabeled = MAPILLARY_LABELS - 1
    for key, scene in zip(mapillary_keys(ctx, len(scenes)), scenes, strict=True):
        write_jpeg(base / "training" / "images" / f"{key}.jpg", scene.image)
        label = scene.class_map(SHAPE_INDEX, unlabeled)
        write_palette_png(base / "training" / "v2.0" / "labels" / f"{key}.png", label, colours)
