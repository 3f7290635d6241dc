"""The tiny assets read by the real ecosystem's own conventions (issue 23, item 3).

Referring datasets: pycocotools' `COCO` API and the REFER API's decoding (`getMask` of
refer.py / grefer.py, as every LISA-family repository ships it), written here from those
conventions, must find COCO's `iscrowd` rule kept and every mask equal to what our loader yields.
ADE20K and COCO-Stuff: the label values under each drawn object must be, through the class
lists shipped at utils/datasets/class_lists/ (LISA's files), the real class the documented
mapping names (tools/tiny_assets/classes.py; the table is written out here by hand).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tools.make_tiny_assets import ROOT, make_tiny_assets
from tools.tiny_assets.common import AssetOptions, Context
from utils.datasets.coco import decode_segmentation
from utils.datasets.refer import open_refer_index
from utils.datasets.sem_seg import read_ade20k_classes, read_cocostuff_classes

REFER = "refer_seg"
REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco", "refzom")
SHIPPED = ROOT / "utils" / "datasets" / "class_lists"
# the documented mapping, kind -> real class (COCO things; ADE20K-150 and COCO-Stuff share names)
COCO_THING = {"circle": "clock", "square": "book", "triangle": "kite", "star": "teddy bear",
              "house": "refrigerator", "car": "car", "tree": "potted plant"}  # fmt: skip
SEMANTIC = {"circle": "clock", "square": "book", "triangle": "tent", "star": "flower",
            "house": "house", "car": "car", "tree": "tree"}  # fmt: skip
COCO_THING_COUNT = 80
COCO_UNLABELED = 255
MIN_POLYGON_COORDS = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("oracle"), seed=0, models=False) / "dataset"


def refer_get_mask(ann: dict, image: dict) -> np.ndarray:
    """uint8 [H, W]: an annotation decoded as the REFER API does: polygons through
    `frPyObjects` and `merge`, an RLE (crowd, uncompressed counts) through `frPyObjects`."""
    height, width = image["height"], image["width"]
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):  # REFER: type(ann["segmentation"][0]) == list
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        rle = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(rle).astype(np.uint8)


def load_refs(base: Path) -> list[dict]:
    name = next(p for p in base.iterdir() if p.suffix == ".p")
    with open(name, "rb") as handle:
        return pickle.load(handle)


def ref_ann_ids(ref: dict) -> list[int]:
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    return [i for i in ids if i != -1]


def test_shipped_cocostuff_list_holds_cocos_thing_ids_and_names(root: Path) -> None:
    coco = COCO(str(root / REFER / "refcoco" / "instances.json"))
    lines = (SHIPPED / "cocostuff_classes.txt").read_text().splitlines()
    by_id = dict(line.split(": ", 1) for line in lines)
    assert len(coco.cats) == COCO_THING_COUNT
    assert all(by_id[str(cat_id)] == cat["name"] for cat_id, cat in coco.cats.items())
    assert {name: coco.getCatIds(catNms=[name]) for name in ("person", "car", "clock")} == {
        "person": [1],
        "car": [3],
        "clock": [85],
    }


@pytest.mark.parametrize("dataset", REFER_DATASETS)
def test_refer_instances_keep_cocos_iscrowd_rule(root: Path, dataset: str) -> None:
    data = json.loads((root / REFER / dataset / "instances.json").read_text())
    images = {image["id"]: image for image in data["images"]}
    crowds = 0
    for ann in data["annotations"]:
        image = images[ann["image_id"]]
        segmentation = ann["segmentation"]
        if ann["iscrowd"] == 0:
            assert isinstance(segmentation, list) and segmentation, ann["id"]
            for polygon in segmentation:
                assert isinstance(polygon, list) and len(polygon) >= MIN_POLYGON_COORDS
                assert len(polygon) % 2 == 0
                assert all(isinstance(v, (int, float)) for v in polygon)
        else:
            assert ann["iscrowd"] == 1 and isinstance(segmentation, dict), ann["id"]
            assert segmentation["size"] == [image["height"], image["width"]]
            assert all(isinstance(c, int) for c in segmentation["counts"])
            assert sum(segmentation["counts"]) == image["height"] * image["width"]
            crowds += 1
    assert 0 < crowds < len(data["annotations"])


@pytest.mark.parametrize("dataset", REFER_DATASETS)
def test_refer_masks_equal_ours_and_refs_name_no_crowd(root: Path, dataset: str) -> None:
    base = root / REFER / dataset
    coco = COCO(str(base / "instances.json"))
    for ann in coco.anns.values():
        image = coco.imgs[ann["image_id"]]
        expected = refer_get_mask(ann, image)
        ours = decode_segmentation(ann["segmentation"], expected.shape, "oracle", ann["id"])
        assert np.array_equal(ours, expected), (dataset, ann["id"])
        assert np.array_equal(coco.annToMask(ann), expected)
        assert int(expected.sum()) == ann["area"]
    index = open_refer_index(root, dataset)
    raw_refs = {ref["ref_id"]: ref for ref in load_refs(base)}
    for ref in index.refs:
        ids = ref_ann_ids(raw_refs[ref.ref_id])
        # LISA's refer_seg_dataset takes the polygon path for every target it decodes
        assert all(coco.anns[i]["iscrowd"] == 0 for i in ids)
        assert all(isinstance(coco.anns[i]["segmentation"][0], list) for i in ids)
        ours = index.ref_mask(ref)
        if not ids:
            assert ours is None
            continue
        image = coco.imgs[ref.image_id]
        union = np.logical_or.reduce([refer_get_mask(coco.anns[i], image) for i in ids])
        assert np.array_equal(ours, union.astype(np.uint8)), (dataset, ref.ref_id)


@pytest.mark.parametrize("dataset", ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco"))
def test_refer_categories_are_the_kinds_the_texts_name(root: Path, dataset: str) -> None:
    base = root / REFER / dataset
    coco = COCO(str(base / "instances.json"))
    kind_of = {name: kind for kind, name in COCO_THING.items()}
    refs = json.loads((base / "grefs(unc).json").read_text()) if dataset == "grefcoco" else None
    checked = 0
    for ref in refs or load_refs(base):
        ids = ref_ann_ids(ref)
        categories = ref["category_id"] if isinstance(ref["category_id"], list) else [
            ref["category_id"]]  # fmt: skip
        if len(ids) != 1:
            continue
        assert categories == [coco.anns[ids[0]]["category_id"]]
        kind = kind_of[coco.cats[categories[0]]["name"]]
        for sentence in ref["sentences"]:
            assert kind in sentence["sent"].split(), (dataset, sentence["sent"])
            checked += 1
    assert checked > 0


def label_names(label: np.ndarray, mask: np.ndarray, names: list[str], offset: int) -> set[str]:
    """The class names of the label values under a bool mask [H, W] (value - offset indexes
    `names`), COCO-Stuff's unlabeled frame left out."""
    values = set(np.unique(label[mask]).tolist()) - {COCO_UNLABELED}
    return {names[value - offset] for value in values}


def test_ade20k_and_cocostuff_values_mean_the_mapped_real_classes(root: Path) -> None:
    assert not (root / "ade20k" / "ade20k_classes.json").exists()
    assert not (root / "cocostuff" / "cocostuff_classes.txt").exists()
    ade = json.loads((SHIPPED / "ade20k_classes.json").read_text())  # LISA reads it so
    stuff = [line.split(": ", 1)[1] for line in (SHIPPED / "cocostuff_classes.txt").read_text()
             .splitlines()[1:]]  # fmt: skip
    assert read_ade20k_classes(root) == ade and read_cocostuff_classes(root) == stuff
    ctx = Context(root, AssetOptions(), seed=0)
    ade_labels = sorted((root / "ade20k" / "annotations" / "training").glob("*.png"))
    stuff_labels = sorted((root / "cocostuff" / "train2017").glob("*.png"))
    sources = (
        (ctx.scenes("ade20k", len(ade_labels)), ade_labels, ade, 1, {0}),
        (ctx.scenes("coco train2017", len(stuff_labels)), stuff_labels, stuff, 0, {125}),
    )
    seen = set()
    for scenes, paths, names, offset, background in sources:
        for scene, path in zip(scenes, paths, strict=True):
            label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            covered = np.zeros(label.shape, bool)
            for obj in scene.objects:
                assert label_names(label, obj.mask, names, offset) == {SEMANTIC[obj.shape]}
                seen.add(obj.shape)
                covered |= obj.mask
            rest = set(np.unique(label[~covered]).tolist()) - {COCO_UNLABELED}
            assert rest == background, path
    assert stuff[125] == "ground-other" and len(seen) > len(SEMANTIC) // 2


def test_mapillary_labels_are_palette_pngs_coloured_as_the_config(root: Path) -> None:
    """Mapillary Vistas v2.0 stores labels as palette PNGs: the pixel values are label indices
    and palette entry i is the colour `config_v2.0.json` gives label i."""
    from PIL import Image

    base = root / "mapillary"
    colours = [
        label["color"] for label in json.loads((base / "config_v2.0.json").read_text())["labels"]
    ]
    paths = sorted((base / "training" / "v2.0" / "labels").glob("*.png"))
    assert paths
    for path in paths:
        with Image.open(path) as stored:
            assert stored.mode == "P"
            palette = np.array(stored.getpalette()[: 3 * len(colours)]).reshape(-1, 3)
            values = np.unique(np.array(stored))
        assert palette.tolist() == colours
        assert values.max() < len(colours)
