"""The refCOCO family: refcoco, refcoco+ and refclef (`refs(unc).p`) and refcocog
(`refs(umd).p`), each with its COCO-style `instances.json`.

refcoco, refcoco+, refcocog (and gRefCOCO, RefCOCOm) share one pool of COCO train2014 images
under `refer_seg/images/mscoco/images/train2014/COCO_train2014_<id:012d>.jpg`, as the originals
do; the pool holds `images_per_split` images per split of refcoco. refclef has its own pool
under `refer_seg/images/saiapr_tc-12/<NN>/images/<id>.jpg` (NN = id // 1000, two digits, the
layout of the saiapr_tc-12 archive); its `file_name` is that relative path.

`instances.json` follows COCO's rule: an object (`iscrowd: 0`) is a list of polygons, one per
region (a composite's parts; their union is the object's mask), and a crowd (`iscrowd: 1`) is an
uncompressed RLE `{"size": [H, W], "counts": [...]}` as COCO writes crowds. Each image holds a
crowd annotation for every class with two or more objects in it, covering all of them (COCO
marks a group of one class so); no ref names a crowd, as in refCOCO. Categories are COCO's 80
things, each kind drawn as a fixed one (`tools/tiny_assets/classes.py`).
A ref's own `file_name` carries a suffix ("..._<k>.jpg") as in the originals; images are found
through `instances.json`. Every expression names its object alone (see shapes_world_text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.tiny_assets.classes import OBJECT_CATEGORY_IDS, coco_categories
from tools.tiny_assets.common import (
    Context,
    annotation_record,
    coco_image,
    split_of,
    uncompressed_rle,
    write_jpeg,
    write_json,
    write_pickle,
)
from tools.tiny_assets.shapes_world import Scene, SceneObject
from tools.tiny_assets.shapes_world_text import capitalise, referring_expressions

REFER_SPLITS = ("train", "val", "testA", "testB")
REFCOCOG_SPLITS = ("train", "val", "test")
REFER_IMAGES = Path("refer_seg/images")
TRAIN2014_DIR = REFER_IMAGES / "mscoco/images/train2014"
SAIAPR_DIR = REFER_IMAGES / "saiapr_tc-12"
TRAIN2014_FIRST_ID = 100001
REFCLEF_FIRST_ID = 1001
SAIAPR_FOLDER_SIZE = 1000
COMPOSITE_EVERY = 2
# Expressions per ref: (fewest, most); refcocog's are longer and fewer.
SENTENCES_PER_REF = {"refcoco": (1, 3), "refcoco+": (1, 3), "refcocog": (1, 2), "refclef": (1, 2)}
CROWD_MIN_OBJECTS = 2  # objects of one class that make a crowd annotation


@dataclass
class ReferPool:
    """Scenes with their COCO image ids, `file_name`s and object annotation ids."""

    scenes: list[Scene]
    image_ids: list[int]
    file_names: list[str]
    ann_ids: list[list[int]]

    def instances(self) -> dict:
        """instances.json: every object as polygons (`iscrowd: 0`), then the crowds
        (`iscrowd: 1`, uncompressed RLE; their ids follow the objects')."""
        images, objects, crowds = [], [], []
        next_crowd_id = 1 + max((max(ids, default=0) for ids in self.ann_ids), default=0)
        for scene, image_id, file_name, ids in zip(
            self.scenes, self.image_ids, self.file_names, self.ann_ids, strict=True
        ):
            images.append(coco_image(image_id, file_name, scene))
            for obj, ann_id in zip(scene.objects, ids, strict=True):
                objects.append(object_annotation(ann_id, image_id, obj, file_name))
            for crowd in crowd_annotations(scene, image_id, next_crowd_id):
                crowds.append(crowd)
                next_crowd_id += 1
        return {
            "images": images,
            "annotations": objects + crowds,
            "categories": coco_categories(),
        }


def object_annotation(ann_id: int, image_id: int, obj: SceneObject, file_name: str) -> dict:
    """An `iscrowd: 0` record: the object's polygons, which rasterise to its mask (objects
    never overlap, so no region of one is hidden by another object)."""
    if not obj.polygons_exact:
        raise ValueError(
            f"{file_name}: the polygons of the {obj.name} do not rasterise to its mask; an "
            "iscrowd 0 object must be a polygon list"
        )
    return annotation_record(
        ann_id, image_id, OBJECT_CATEGORY_IDS[obj.shape], obj.polygons, obj.mask
    )


def crowd_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict]:
    """`iscrowd: 1` records, one per class with CROWD_MIN_OBJECTS or more objects in the scene
    (in kind order): the union of their masks as an uncompressed RLE."""
    crowds = []
    for shape in sorted({obj.shape for obj in scene.objects}):
        members = [obj.mask for obj in scene.objects if obj.shape == shape]
        if len(members) >= CROWD_MIN_OBJECTS:
            mask = np.logical_or.reduce(members)
            crowds.append(
                annotation_record(
                    first_id + len(crowds),
                    image_id,
                    OBJECT_CATEGORY_IDS[shape],
                    uncompressed_rle(mask),
                    mask,
                    iscrowd=1,
                )
            )
    return crowds


def make_pool(scenes: list[Scene], first_id: int, file_name: Callable[[int], str]) -> ReferPool:
    """Number the scenes' images and objects (annotation ids run on across images)."""
    image_ids = [first_id + offset for offset in range(len(scenes))]
    ann_ids, next_id = [], 1
    for scene in scenes:
        ann_ids.append(list(range(next_id, next_id + len(scene.objects))))
        next_id += len(scene.objects)
    return ReferPool(scenes, image_ids, [file_name(image_id) for image_id in image_ids], ann_ids)


def train2014_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def saiapr_name(image_id: int) -> str:
    return f"{image_id // SAIAPR_FOLDER_SIZE:02d}/images/{image_id}.jpg"


def train2014_scenes(ctx: Context) -> list[Scene]:
    """The scenes of the shared COCO train2014 pool: `images_per_split` per refcoco split;
    every COMPOSITE_EVERY-th holds a composite, so RefCOCOm has parts to refer to."""
    count = ctx.options.images_per_split * len(REFER_SPLITS)
    return ctx.scenes("train2014", count, composite_every=COMPOSITE_EVERY)


def train2014_pool(ctx: Context) -> ReferPool:
    """The shared COCO train2014 pool, its images written to disk."""
    pool = make_pool(train2014_scenes(ctx), TRAIN2014_FIRST_ID, train2014_name)
    for scene, file_name in zip(pool.scenes, pool.file_names, strict=True):
        write_jpeg(ctx.root / TRAIN2014_DIR / file_name, scene.image)
    return pool


def sentence(sent_id: int, text: str) -> dict:
    """A refs sentence: `sent` lower-case without punctuation, `raw` as typed, `tokens`."""
    return {"sent": text, "raw": capitalise(text) + ".", "sent_id": sent_id, "tokens": text.split()}


def ref_record(
    ref_id: int,
    image_id: int,
    ann_id,
    category_id,
    split: str,
    file_name: str,
    sentences: list[dict],
) -> dict:
    """One ref with the keys of refs(unc).p (ann_id/category_id are lists in gRefCOCO)."""
    return {
        "ref_id": ref_id,
        "image_id": image_id,
        "ann_id": ann_id,
        "category_id": category_id,
        "split": split,
        "file_name": file_name,
        "sent_ids": [s["sent_id"] for s in sentences],
        "sentences": sentences,
    }


def write_refs(ctx: Context, dataset: str, pool: ReferPool, splits_file: str) -> list[dict]:
    """Write `refer_seg/<dataset>/{refs(<splits_file>).p, instances.json}`: one ref per object,
    with `SENTENCES_PER_REF[dataset]` expressions in the dataset's style. Returns the refs."""
    rng = ctx.rng(f"refs {dataset}")
    fewest, most = SENTENCES_PER_REF[dataset]
    splits = REFCOCOG_SPLITS if dataset == "refcocog" else REFER_SPLITS
    refs: list[dict] = []
    sent_count = 0
    for index, (scene, image_id, ids) in enumerate(
        zip(pool.scenes, pool.image_ids, pool.ann_ids, strict=True)
    ):
        split = split_of(index, ctx.options.images_per_split, splits)
        stem = pool.file_names[index].rsplit("/", 1)[-1].removesuffix(".jpg")
        for k, (obj, ann_id) in enumerate(zip(scene.objects, ids, strict=True)):
            count = int(rng.integers(fewest, most + 1))
            texts = referring_expressions(scene, obj, dataset, rng, count)
            sentences = [sentence(sent_count + j, text) for j, text in enumerate(texts)]
            sent_count += len(sentences)
            category = OBJECT_CATEGORY_IDS[obj.shape]
            refs.append(
                ref_record(
                    len(refs), image_id, ann_id, category, split, f"{stem}_{k}.jpg", sentences
                )
            )
    base = ctx.root / "refer_seg" / dataset
    write_pickle(base / f"refs({splits_file}).p", refs)
    write_json(base / "instances.json", pool.instances())
    return refs


def write_refer_family(ctx: Context, pool: ReferPool) -> None:
    """refcoco, refcoco+, refcocog on the train2014 pool; refclef on its own saiapr pool."""
    write_refs(ctx, "refcoco", pool, "unc")
    write_refs(ctx, "refcoco+", pool, "unc")
    write_refs(ctx, "refcocog", pool, "umd")
    per_split = ctx.options.images_per_split
    scenes = ctx.scenes("saiapr_tc-12", per_split * len(REFER_SPLITS))
    clef = make_pool(scenes, REFCLEF_FIRST_ID, saiapr_name)
    for scene, file_name in zip(clef.scenes, clef.file_names, strict=True):
        write_jpeg(ctx.root / SAIAPR_DIR / file_name, scene.image)
    write_refs(ctx, "refclef", clef, "unc")
