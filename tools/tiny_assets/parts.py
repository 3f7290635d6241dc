"""Object-and-part families: PACO-LVIS and PASCAL-Part (COCO-style json), and the category
table they share with MMR.

Categories are the object shapes ("circle", ..., "house") and the parts of the composites
("house:roof", "car:wheel", ...). PACO-LVIS names carry LVIS disambiguation suffixes where LVIS
has them ("car_(automobile)", "car_(automobile):wheel"), which loaders strip. PASCAL-Part holds
part categories only ("obj:part"), as loaders split every name on ':' into two.

Segmentations are polygons where the polygons still describe the visible mask, otherwise RLE
(a wall behind its door, a car body behind its wheels): compressed string counts in PACO-LVIS,
plain run-length lists in PASCAL-Part, so both RLE forms are exercised.
"""

from __future__ import annotations

from pathlib import Path

from tools.tiny_assets.common import Context, coco_annotation, coco_image, write_jpeg, write_json
from tools.tiny_assets.shapes_world import OBJECT_SHAPES, PART_NAMES, Region, Scene, SceneObject

CATEGORY_NAMES = list(OBJECT_SHAPES) + [
    f"{shape}:{part}" for shape, parts in PART_NAMES.items() for part in parts
]
CATEGORY_IDS = {name: index + 1 for index, name in enumerate(CATEGORY_NAMES)}
# Position of each category in the name-sorted list (MMR's `sorted_category_id`).
SORTED_CATEGORY_IDS = {name: index for index, name in enumerate(sorted(CATEGORY_NAMES))}
LVIS_SUFFIXES = {"car": "car_(automobile)"}
PACO_FIRST_IMAGE_ID = 300001
PASCAL_FIRST_IMAGE_NUMBER = 1
PASCAL_YEAR = 2008
# LISA reads PASCAL-Part images from vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/ (its
# README shows VOCdevkit beside train.json); we write them where the originals live.
PASCAL_IMAGE_DIR = Path("vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages")


def category_of(obj: SceneObject, part: Region | None = None) -> str:
    """'house' or 'house:roof'."""
    return obj.shape if part is None else f"{obj.shape}:{part.name}"


def paco_name(category: str) -> str:
    """The PACO-LVIS spelling of a category: 'car:wheel' -> 'car_(automobile):wheel'."""
    obj, sep, part = category.partition(":")
    return LVIS_SUFFIXES.get(obj, obj) + sep + part


def coco_file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def scene_annotations(
    scene: Scene, image_id: int, first_ann_id: int, parts_only: bool, rle: str
) -> list[dict]:
    """COCO annotations of every object (unless `parts_only`) and every part of a scene."""
    annotations = []
    for obj in scene.objects:
        regions = ([] if parts_only else [(obj, None)]) + [(obj, p) for p in obj.parts]
        for owner, part in regions:
            category = CATEGORY_IDS[category_of(owner, part)]
            ann_id = first_ann_id + len(annotations)
            region = owner if part is None else part
            annotations.append(coco_annotation(ann_id, image_id, category, region, rle=rle))
    return annotations


def write_paco(ctx: Context) -> None:
    """`vlpart/paco/annotations/paco_lvis_v1_train.json`; images `coco/train2017/<id>.jpg`
    (json `file_name` = "train2017/<id>.jpg", relative to `coco/`)."""
    scenes = ctx.scenes("paco_lvis", ctx.options.images_per_split, composite_every=1)
    images, annotations = [], []
    for offset, scene in enumerate(scenes):
        image_id = PACO_FIRST_IMAGE_ID + offset
        file_name = f"train2017/{coco_file_name(image_id)}"
        write_jpeg(ctx.root / "coco" / file_name, scene.image)
        images.append(coco_image(image_id, file_name, scene))
        annotations += scene_annotations(scene, image_id, len(annotations) + 1, False, "compressed")
    categories = [
        {"id": CATEGORY_IDS[name], "name": paco_name(name), "supercategory": name.split(":")[0]}
        for name in CATEGORY_NAMES
    ]
    data = {"images": images, "annotations": annotations, "categories": categories}
    write_json(ctx.root / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json", data)


def write_pascal_part(ctx: Context) -> None:
    """`vlpart/pascal_part/train.json` (part categories only) and its JPEGImages."""
    scenes = ctx.scenes("pascal_part", ctx.options.images_per_split, composite_every=1)
    images, annotations = [], []
    for offset, scene in enumerate(scenes):
        image_id = PASCAL_FIRST_IMAGE_NUMBER + offset
        file_name = f"{PASCAL_YEAR}_{image_id:06d}.jpg"
        write_jpeg(ctx.root / PASCAL_IMAGE_DIR / file_name, scene.image)
        images.append(coco_image(image_id, file_name, scene))
        annotations += scene_annotations(
            scene, image_id, len(annotations) + 1, True, "uncompressed"
        )
    categories = [
        {"id": CATEGORY_IDS[name], "name": name, "supercategory": name.split(":")[0]}
        for name in CATEGORY_NAMES
        if ":" in name
    ]
    data = {"images": images, "annotations": annotations, "categories": categories}
    write_json(ctx.root / "vlpart" / "pascal_part" / "train.json", data)
