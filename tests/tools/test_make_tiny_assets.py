"""tools/make_tiny_assets.py: every family in its real layout and format, deterministic, and
truthful (texts name what the masks cover, absent targets are absent, distractors exist)."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tools.make_tiny_assets import ROOT, make_tiny_assets, parse_image_size
from tools.tiny_assets.classes import COCO_THING_NAMES, SEMANTIC_NAMES
from tools.tiny_assets.common import AssetOptions, Context
from tools.tiny_assets.parts import PASCAL_IMAGE_DIR
from tools.tiny_assets.refer import train2014_scenes
from tools.tiny_assets.shapes_world import COLOURS, PALETTE, rasterize

MMR_SPLITS = ("train", "val", "test_obj_only", "test_part_only", "test_mixed")
REFER = "refer_seg"
EXPECTED = [
    "ade20k/images/training/*.jpg",
    "ade20k/annotations/training/*.png",
    "cocostuff/train2017/*.png",
    "coco/train2017/*.jpg",
    "mapillary/config_v2.0.json",
    "mapillary/training/v2.0/labels/*.png",
    "mapillary/training/images/*.jpg",
    "vlpart/paco/annotations/paco_lvis_v1_train.json",
    "vlpart/pascal_part/train.json",
    f"{PASCAL_IMAGE_DIR}/*.jpg",
    *[f"{REFER}/{d}/refs(unc).p" for d in ("refcoco", "refcoco+", "refclef")],
    f"{REFER}/refcocog/refs(umd).p",
    *[f"{REFER}/{d}/instances.json" for d in ("refcoco", "refcoco+", "refcocog", "refclef")],
    f"{REFER}/grefcoco/grefs(unc).json",
    f"{REFER}/grefcoco/grefs(unc).p",
    f"{REFER}/grefcoco/instances.json",
    f"{REFER}/refzom/Ref_ZOM.p",
    f"{REFER}/refzom/instances.json",
    f"{REFER}/images/mscoco/images/train2014/COCO_train2014_*.jpg",
    f"{REFER}/images/saiapr_tc-12/*/images/*.jpg",
    *[f"MMR/MMR_{split}.json" for split in MMR_SPLITS],
    f"{REFER}/images/mscoco/images/train2017/*.jpg",
    f"{REFER}/images/mscoco/images/val2017/*.jpg",
    *[f"{REFER}/RefCOCOm/annotations/refcocom_{s}.json" for s in ("val", "testA", "testB")],
    f"{REFER}/RefCOCOm/masks/*.png",
    *[f"reason_seg/ReasonSeg/{s}/*.{e}" for s in ("train", "val", "test") for e in ("jpg", "json")],
    "reason_seg/ReasonSeg/explanatory/train.json",
    "llava_dataset/llava_instruct_150k.json",
    # LaSagnA's semantic-segmentation validation sets (tools/tiny_assets/semantic_val.py)
    "ade20k/images/validation/*.jpg",
    "ade20k/annotations/validation/*.png",
    "coco/val2017/*.jpg",
    "coco/panoptic_semseg_val2017/*.png",
    "cityscapes/gtFine/cityscapes_panoptic_val.json",
    "cityscapes/gtFine/val/*/*_gtFine_labelIds.png",
    "cityscapes/leftImg8bit/val/*/*_leftImg8bit.png",
    "mapillary/config_v1.2.json",
    "mapillary/validation/v1.2/labels/*.png",
    "mapillary/validation/images/*.jpg",
]
REF_KEYS = {"ref_id", "image_id", "ann_id", "category_id", "split", "file_name", "sent_ids",
            "sentences"}  # fmt: skip
SENTENCE_KEYS = {"sent", "raw", "sent_id", "tokens"}
MMR_KEYS = {"file_name", "height", "width", "image_id", "coco_url", "not_exhaustive_category_ids",
            "neg_category_ids", "questions", "annotations", "answers", "text_answers",
            "raw_answers"}  # fmt: skip
MMR_ANN_KEYS = {"bbox", "segmentation", "image_id", "category_name", "category_id",
                "sorted_category_id"}  # fmt: skip
PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
MAX_UNION_IOU = 0.6
# the kind drawn as each COCO category / semantic class name (tools/tiny_assets/classes.py)
KIND_OF_COCO_NAME = {name: kind for kind, name in COCO_THING_NAMES.items()}
KIND_OF_CLASS = {name: kind for kind, name in SEMANTIC_NAMES.items()}
SHIPPED_LISTS = ROOT / "utils" / "datasets" / "class_lists"
MIN_DISTRACTOR_SHARE = 0.7


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """Defaults (with the tiny models), and the seconds the dataset alone took."""
    out = tmp_path_factory.mktemp("tiny_assets")
    start = time.perf_counter()
    make_tiny_assets(out / "data_only", seed=0, models=False)
    seconds = time.perf_counter() - start
    make_tiny_assets(out, seed=0)
    return out, seconds


@pytest.fixture(scope="module")
def root(assets: tuple[Path, float]) -> Path:
    return assets[0] / "dataset"


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def dominant_colour(image: np.ndarray, mask: np.ndarray) -> str:
    """The palette colour nearest to most of the masked pixels."""
    pixels = image[mask.astype(bool)].astype(np.float32)
    nearest = np.linalg.norm(pixels[:, None] - PALETTE_RGB[None], axis=-1).argmin(axis=1)
    return COLOURS[np.bincount(nearest, minlength=len(COLOURS)).argmax()]


def named_colour(text: str) -> str | None:
    return next((w for w in text.split() if w in COLOURS), None)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def load_refs(root: Path, dataset: str) -> list[dict]:
    name = "refs(umd).p" if dataset == "refcocog" else "refs(unc).p"
    with open(root / REFER / dataset / name, "rb") as handle:
        return pickle.load(handle)


def test_writes_every_reference_path_quickly(assets: tuple[Path, float], root: Path) -> None:
    out, seconds = assets
    missing = [pattern for pattern in EXPECTED if not list(root.glob(pattern))]
    assert not missing
    # the real downloads hold no class list: loaders read the shipped ones
    assert not (root / "ade20k" / "ade20k_classes.json").exists()
    assert not (root / "cocostuff" / "cocostuff_classes.txt").exists()
    assert (out / "llava_tiny" / "config.json").is_file()
    assert (out / "vision_pretrained" / "sam_tiny.pth").is_file()
    assert seconds < 15, f"the default dataset took {seconds:.1f} s"


def test_same_seed_same_bytes_other_seed_differs(assets, tmp_path: Path) -> None:
    first = file_bytes(assets[0] / "data_only" / "dataset")
    again = file_bytes(make_tiny_assets(tmp_path / "again", seed=0, models=False) / "dataset")
    other = file_bytes(make_tiny_assets(tmp_path / "other", seed=1, models=False) / "dataset")
    assert first == again
    assert first.keys() == file_bytes(assets[0] / "dataset").keys()
    changed = [name for name in first if other.get(name) != first[name]]
    assert any(name.endswith(".p") for name in changed)
    assert any(name.endswith(".jpg") for name in changed)
    assert any(name.endswith(".png") for name in changed)


def test_refer_pickles_have_the_exact_keys(root: Path) -> None:
    for dataset in ("refcoco", "refcoco+", "refcocog", "refclef"):
        refs = load_refs(root, dataset)
        splits = {"train", "val", "test"} if dataset == "refcocog" else {
            "train", "val", "testA", "testB"}  # fmt: skip
        assert {r["split"] for r in refs} == splits
        for ref in refs:
            assert set(ref) == REF_KEYS and isinstance(ref["ann_id"], int)
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            assert all(set(s) == SENTENCE_KEYS for s in ref["sentences"])
            assert all(s["tokens"] == s["sent"].split() for s in ref["sentences"])


def test_instances_decode_to_the_scene_masks(root: Path) -> None:
    coco = COCO(str(root / REFER / "refcoco" / "instances.json"))
    scenes = train2014_scenes(Context(root, AssetOptions(), seed=0))
    kinds = set()
    for image_id, scene in zip(sorted(coco.getImgIds()), scenes, strict=True):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
        assert len(anns) == len(scene.objects)
        for ann, obj in zip(anns, scene.objects, strict=True):
            kinds.add(type(ann["segmentation"]).__name__)
            assert np.array_equal(coco.annToMask(ann).astype(bool), obj.mask)
            assert KIND_OF_COCO_NAME[coco.loadCats(ann["category_id"])[0]["name"]] == obj.shape
        for crowd in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=True)):
            kinds.add(type(crowd["segmentation"]).__name__)
            shape = KIND_OF_COCO_NAME[coco.cats[crowd["category_id"]]["name"]]
            members = [obj.mask for obj in scene.objects if obj.shape == shape]
            assert len(members) > 1
            assert np.array_equal(coco.annToMask(crowd), np.logical_or.reduce(members))
    assert kinds == {"list", "dict"}
    for dataset in ("refcoco+", "refcocog", "grefcoco", "refzom"):
        assert (root / REFER / dataset / "instances.json").read_bytes() == (
            root / REFER / "refcoco" / "instances.json"
        ).read_bytes()


@pytest.mark.parametrize(
    ("path", "counts_type"),
    [
        ("vlpart/paco/annotations/paco_lvis_v1_train.json", str),
        ("vlpart/pascal_part/train.json", list),
    ],
)
def test_part_datasets_decode_with_pycocotools(root: Path, path: str, counts_type: type) -> None:
    coco = COCO(str(root / path))
    names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    assert any(":" in name for name in names)
    if "pascal" in path:
        assert all(len(name.split(":")) == 2 for name in names)
    else:
        assert "car_(automobile):wheel" in names and "house" in names
    rle_counts = set()
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(ann["image_id"])[0]
        assert coco.annToMask(ann).shape == (image["height"], image["width"])
        assert coco.annToMask(ann).sum() == ann["area"] > 0
        if isinstance(ann["segmentation"], dict):
            rle_counts.add(type(ann["segmentation"]["counts"]))
    assert rle_counts == {counts_type}


def assert_named_kind_is_absent(root: Path, coco: COCO, ref: dict) -> None:
    """A no-target ref names a (colour, shape) that no object of its image has."""
    colour, shape = ref["sentences"][0]["sent"].split()[-2:]
    image = read_rgb(
        root / REFER / "images/mscoco/images/train2014" / coco.imgs[ref["image_id"]]["file_name"]
    )
    same_shape = [
        a
        for a in coco.imgToAnns[ref["image_id"]]
        if KIND_OF_COCO_NAME[coco.cats[a["category_id"]]["name"]] == shape and not a["iscrowd"]
    ]
    assert all(dominant_colour(image, coco.annToMask(a)) != colour for a in same_shape)


def test_grefcoco_lists_no_target_and_multi_target(root: Path) -> None:
    base = root / REFER / "grefcoco"
    refs = json.loads((base / "grefs(unc).json").read_text())
    with open(base / "grefs(unc).p", "rb") as handle:
        assert pickle.load(handle) == refs
    coco = COCO(str(base / "instances.json"))
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    assert any(len(r["ann_id"]) > 1 for r in refs)
    empty = [r for r in refs if r["no_target"]]
    assert empty and all(r["ann_id"] == [-1] == r["category_id"] for r in empty)
    for ref in empty:
        assert_named_kind_is_absent(root, coco, ref)


def test_refzom_refs_as_gsva_reads_them(root: Path) -> None:
    # GSVA data/refzom.py: refer_seg/refzom/Ref_ZOM.p + instances.json; `ann_id` a list, [] for
    # no target (data/dataset.py:420); splits train / test ('refzom|final|test', main.py:201)
    base = root / REFER / "refzom"
    with open(base / "Ref_ZOM.p", "rb") as handle:
        refs = pickle.load(handle)
    coco = COCO(str(base / "instances.json"))
    assert {r["split"] for r in refs} == {"train", "test"}
    train = {r["image_id"] for r in refs if r["split"] == "train"}
    test = {r["image_id"] for r in refs if r["split"] == "test"}
    assert not train & test and len(train) == len(test) == len(coco.imgs) // 2
    for ref in refs:
        assert set(ref) == REF_KEYS | {"source"}
        assert isinstance(ref["ann_id"], list) and len(ref["ann_id"]) == len(ref["category_id"])
        assert all(coco.anns[a]["image_id"] == ref["image_id"] for a in ref["ann_id"])
        count = len(ref["ann_id"])
        assert ref["source"] == ("zero" if count == 0 else "one" if count == 1 else "many")
        if count == 0:
            assert_named_kind_is_absent(root, coco, ref)
    assert {r["source"] for r in refs} == {"zero", "one", "many"}


def test_refer_texts_name_the_masked_pixels_and_distractors_exist(root: Path) -> None:
    coco = COCO(str(root / REFER / "refcoco" / "instances.json"))
    images = root / REFER / "images/mscoco/images/train2014"
    ious, shares, checked = [], [], 0
    for ref in [r for r in load_refs(root, "refcoco") if r["split"] == "val"]:
        image = read_rgb(images / coco.imgs[ref["image_id"]]["file_name"])
        anns = [a for a in coco.imgToAnns[ref["image_id"]] if not a["iscrowd"]]
        target = coco.annToMask(coco.anns[ref["ann_id"]]).astype(bool)
        kinds = {
            a["id"]: (
                KIND_OF_COCO_NAME[coco.cats[a["category_id"]]["name"]],
                dominant_colour(image, coco.annToMask(a)),
            )
            for a in anns
        }
        for sentence in ref["sentences"]:
            if named_colour(sentence["sent"]):
                assert named_colour(sentence["sent"]) == kinds[ref["ann_id"]][1]
                checked += 1
        union = np.logical_or.reduce([coco.annToMask(a).astype(bool) for a in anns])
        ious.append(target.sum() / union.sum())
        if len(anns) > 1:
            shape, colour = kinds[ref["ann_id"]]
            others = [k for i, k in kinds.items() if i != ref["ann_id"]]
            shares.append(any(s == shape or c == colour for s, c in others))
            assert (shape, colour) not in others  # every object is named uniquely
    assert checked > 10
    assert np.mean(ious) < MAX_UNION_IOU
    assert np.mean(shares) >= MIN_DISTRACTOR_SHARE


def test_mmr_records_placeholders_and_rle(root: Path) -> None:
    for split in MMR_SPLITS:
        records = json.loads((root / "MMR" / f"MMR_{split}.json").read_text())
        assert records
        for record in records:
            assert set(record) == MMR_KEYS
            folder = "train2017/" if split == "train" else "val2017/"
            assert record["file_name"].startswith(folder)
            image = read_rgb(root / REFER / "images/mscoco/images" / record["file_name"])
            assert image.shape[:2] == (record["height"], record["width"])
            assert len(record["questions"]) == len(record["answers"]) == len(record["text_answers"])
            for answers, text in zip(record["answers"], record["text_answers"], strict=True):
                assert text.count("{seg}") == len(answers) > 0
                assert text.count("{") == text.count("}") == len(answers)
                names = {a["category_name"] for a in answers}
                parts = {":" in name for name in names}
                assert parts == {
                    "test_obj_only": {False},
                    "test_part_only": {True},
                    "test_mixed": {False, True},
                }.get(split, parts)
                for piece, ann in zip(text.split("{seg}"), answers, strict=False):
                    assert set(ann) == MMR_ANN_KEYS
                    segmentation = ann["segmentation"]
                    assert isinstance(segmentation["counts"], str)
                    mask = mask_utils.decode(segmentation)
                    assert (
                        list(mask.shape)
                        == segmentation["size"]
                        == [record["height"], record["width"]]
                    )
                    words = piece.split()
                    obj, _, part = ann["category_name"].partition(":")
                    assert obj in words and (not part or part in words)
                    if not part:  # "the red circle {seg}": the colour before the shape
                        assert words[words.index(obj) - 1] == dominant_colour(image, mask)


def test_reason_seg_jsons_and_explanations(root: Path) -> None:
    base = root / "reason_seg" / "ReasonSeg"
    labels, sentences = set(), set()
    for path in sorted(base.glob("*/*.json")):
        if path.parent.name == "explanatory":
            continue
        data = json.loads(path.read_text())
        image = read_rgb(path.with_suffix(".jpg"))
        assert (data["imageHeight"], data["imageWidth"]) == image.shape[:2]
        assert 1 <= len(data["text"]) <= 5 and all(isinstance(t, str) for t in data["text"])
        sentences.add(data["is_sentence"])
        labels |= {s["label"] for s in data["shapes"]}
        targets = [sum(s["points"], []) for s in data["shapes"] if s["label"] == "target"]
        mask = rasterize(targets, *image.shape[:2])
        if not data["is_sentence"]:
            assert named_colour(data["text"][0]) == dominant_colour(image, mask)
    assert labels == {"target", "ignore", "flag"} and sentences == {True, False}
    explanatory = json.loads((base / "explanatory" / "train.json").read_text())
    assert explanatory and all(set(e) == {"image", "query", "outputs"} for e in explanatory)
    assert all((base / "train" / e["image"]).is_file() for e in explanatory)


def test_semantic_label_maps_mean_the_shipped_classes(root: Path) -> None:
    ade = json.loads((SHIPPED_LISTS / "ade20k_classes.json").read_text())
    for label_path in (root / "ade20k/annotations/training").glob("*.png"):
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        image = read_rgb(root / "ade20k/images/training" / f"{label_path.stem}.jpg")
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        values = set(np.unique(label).tolist())
        assert 0 in values and {ade[v - 1] for v in values - {0}} <= set(KIND_OF_CLASS)
    lines = (SHIPPED_LISTS / "cocostuff_classes.txt").read_text().splitlines()
    stuff = [line.split(": ", 1)[1] for line in lines[1:]]
    for label_path in (root / "cocostuff" / "train2017").glob("*.png"):
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        assert label.shape == read_rgb(root / "coco/train2017" / f"{label_path.stem}.jpg").shape[:2]
        names = {stuff[v] for v in np.unique(label).tolist() if v != 255}
        assert names - set(KIND_OF_CLASS) == {"ground-other"}
    config = json.loads((root / "mapillary" / "config_v2.0.json").read_text())
    readable = [label["readable"].lower() for label in config["labels"]]
    for label_path in (root / "mapillary/training/v2.0/labels").glob("*.png"):
        with Image.open(label_path) as stored:  # a palette PNG: PIL keeps the label indices
            label = np.array(stored)
        assert (
            label.shape
            == read_rgb(root / "mapillary/training/images" / f"{label_path.stem}.jpg").shape[:2]
        )
        assert {readable[v] for v in np.unique(label).tolist()} <= set(KIND_OF_CLASS) | {
            "unlabeled"
        }


def test_vqa_and_refcocom_records(root: Path) -> None:
    records = json.loads((root / "llava_dataset" / "llava_instruct_150k.json").read_text())
    for record in records:
        assert set(record) == {"id", "image", "conversations"}
        assert (root / "coco" / "train2017" / record["image"]).is_file()
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].count("<image>") == 1
    base = root / REFER / "RefCOCOm"
    for split in ("val", "testA", "testB"):
        for entry in json.loads((base / "annotations" / f"refcocom_{split}.json").read_text()):
            assert entry["sentences_num"] == len(entry["sentences"]) > 0
            category, _, part = entry["cat"].partition(":")  # "clock", "car:wheel"
            kind = KIND_OF_COCO_NAME[category]
            assert all(re.search(rf"\b{kind}\b", s["sent"]) for s in entry["sentences"])
            assert not part or all(part in s["sent"] for s in entry["sentences"])
            mask = cv2.imread(
                str(base / "masks" / f"{entry['segment_id']}.png"), cv2.IMREAD_UNCHANGED
            )
            assert set(np.unique(mask).tolist()) == {0, 255}
            image = read_rgb(root / REFER / "images/mscoco/images/train2014" / entry["img_name"])
            assert mask.shape == image.shape[:2]


def test_parse_image_size() -> None:
    assert parse_image_size("96") == (96, 96)
    assert parse_image_size("640x480") == (640, 480)
    with pytest.raises(Exception, match="WxH"):
        parse_image_size("big")


def test_cli_writes_640x480(tmp_path: Path) -> None:
    script = ROOT / "tools" / "make_tiny_assets.py"
    command = [sys.executable, str(script), "--out", str(tmp_path), "--image_size", "640x480",
               "--images_per_split", "1", "--no-models"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    images = list((tmp_path / "dataset").rglob("*.jpg"))
    assert len(images) > 20
    assert all(cv2.imread(str(p)).shape == (480, 640, 3) for p in images)
    assert not (tmp_path / "llava_tiny").exists()


def test_cli_writes_a_qwen_backbone_and_sam2_in_their_released_formats(tmp_path: Path) -> None:
    """`--backbone qwen2_5_vl --segmenter sam2`: `<out>/qwen2_5_vl_tiny/` in the Hugging Face
    layout and `<out>/vision_pretrained/sam2_tiny.pt` as the released SAM 2 files hold it."""
    import torch

    from model.mask_models import load_mask_model

    script = ROOT / "tools" / "make_tiny_assets.py"
    command = [sys.executable, str(script), "--out", str(tmp_path), "--families", "reason_seg",
               "--images_per_split", "1"]  # fmt: skip
    command += ["--backbone", "qwen2_5_vl", "--segmenter", "sam2"]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    config = json.loads((tmp_path / "qwen2_5_vl_tiny" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    path = tmp_path / "vision_pretrained" / "sam2_tiny.pt"
    assert set(torch.load(path, weights_only=True)) == {"model"}
    assert type(load_mask_model(path)).__name__ == "Sam2Model"
    assert not (tmp_path / "vision_pretrained" / "sam_tiny.pth").exists()
    demo = subprocess.run([*command, "--model_preset", "demo"], capture_output=True, text=True)
    assert demo.returncode != 0
    assert "writes the tiny random models only" in demo.stderr
