"""The four semantic-segmentation validation sets (utils/datasets/semantic_val.py) read back from
the tiny assets (tools/tiny_assets/semantic_val.py) to exactly what was drawn, their class
lists, the question, chunking, and one clear error per bad record or class list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.make_tiny_assets import make_tiny_assets
from tools.tiny_assets.classes import SEMANTIC_NAMES
from tools.tiny_assets.common import AssetOptions, Context, jpeg_round_trip
from tools.tiny_assets.semantic_val import MAPILLARY_V12_INDEX
from utils.datasets.base import IGNORE_LABEL, DataError
from utils.datasets.lasagna import semantic_question
from utils.datasets.sem_seg import ADE20K_CLASSES
from utils.datasets.semantic_val import (
    SEMANTIC_VAL_SETS,
    SemanticValidation,
    label_folder,
    parse_semantic_val,
)

IMAGES = 2
SEED = 0
# LaSagnA utils/test_sem_seg_dataset.py CITYSCAPES_classes
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
              "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
              "bus", "train", "motorcycle", "bicycle"]  # fmt: skip
# what the tiny assets draw each kind as (tools/tiny_assets/semantic_val.py); None: not scored
CITYSCAPES_KINDS = {
    "circle": "traffic sign",
    "square": "traffic light",
    "star": "person",
    "house": "building",
    "car": "car",
    "tree": "vegetation",
    "triangle": None,
}
STREAMS = {s: f"{s} val" for s in SEMANTIC_VAL_SETS}
FRAME = 1


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("semantic_val")
    make_tiny_assets(
        out, seed=SEED, images_per_split=IMAGES, families=["semantic_val"], models=False
    )
    return out / "dataset"


@pytest.fixture
def root(clean_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_root, tmp_path / "dataset"))


def scenes(root: Path, dataset: str) -> list:
    return Context(root, AssetOptions(images_per_split=IMAGES), SEED).scenes(
        STREAMS[dataset], IMAGES
    )


def drawn_label(scene, class_of: dict[str, int | None], background: int) -> np.ndarray:
    label = np.full(scene.size, background, dtype=np.uint8)
    for obj in scene.objects:
        value = class_of[obj.shape]
        label[obj.mask] = IGNORE_LABEL if value is None else value
    return label


def frame(label: np.ndarray) -> np.ndarray:
    label[:FRAME, :] = label[-FRAME:, :] = label[:, :FRAME] = label[:, -FRAME:] = IGNORE_LABEL
    return label


def expected_labels(dataset: str, classes: list[str], scene) -> np.ndarray:
    if dataset == "ade20k":
        class_of = {kind: classes.index(name) for kind, name in SEMANTIC_NAMES.items()}
        return drawn_label(scene, class_of, IGNORE_LABEL)
    if dataset == "cocostuff":
        class_of = {kind: classes.index(name) for kind, name in SEMANTIC_NAMES.items()}
        return frame(drawn_label(scene, class_of, classes.index("ground")))
    if dataset == "cityscapes":
        class_of = {k: None if n is None else classes.index(n) for k, n in CITYSCAPES_KINDS.items()}
        return frame(drawn_label(scene, class_of, classes.index("road")))
    return drawn_label(scene, MAPILLARY_V12_INDEX, IGNORE_LABEL)


@pytest.mark.parametrize("dataset", SEMANTIC_VAL_SETS)
def test_tiny_assets_read_back_to_what_was_drawn(clean_root: Path, dataset: str) -> None:
    val = SemanticValidation(clean_root, dataset)
    assert val.name == f"{dataset}|val" and len(val) == IMAGES
    for index, scene in enumerate(scenes(clean_root, dataset)):
        sample = val[index]
        np.testing.assert_array_equal(sample.label, expected_labels(dataset, val.classes, scene))
        image = scene.image if dataset == "cityscapes" else jpeg_round_trip(scene.image)
        np.testing.assert_array_equal(sample.image, image)
        assert sample.questions == [semantic_question(val.classes)]
        assert sample.classes == val.classes
    assert list(val.check(deep=True)) == []


def test_class_lists(clean_root: Path) -> None:
    lists = {d: SemanticValidation(clean_root, d).classes for d in SEMANTIC_VAL_SETS}
    assert lists["ade20k"] == list(ADE20K_CLASSES)
    assert lists["cityscapes"] == CITYSCAPES
    coco = lists["cocostuff"]
    assert len(coco) == 171 and len(set(coco)) == 171
    # trainId order, suffixes "-other", "-stuff", "-merged" stripped, others kept
    assert (coco[0], coco[79], coco[80], coco[84], coco[90], coco[91]) == (
        "person", "toothbrush", "banner", "building", "ceiling", "ceiling-tile"
    )  # fmt: skip
    assert (coco[98], coco[161], coco[170]) == ("desk", "wall", "wood")
    mapillary = lists["mapillary"]
    assert len(mapillary) == 65 and mapillary[16] == "book" and mapillary[0] == "unused 0"


def test_cityscapes_without_the_panoptic_json_reads_the_shipped_list(root: Path) -> None:
    (root / "cityscapes/gtFine/cityscapes_panoptic_val.json").unlink()
    assert SemanticValidation(root, "cityscapes").classes == CITYSCAPES


def test_ade20k_under_the_downloads_own_folder_name(root: Path) -> None:
    (root / "ade20k").rename(root / "ADEChallengeData2016")
    val = SemanticValidation(root, "ade20k")
    assert len(val) == IMAGES and label_folder(root, "ade20k") == (
        "ADEChallengeData2016/annotations/validation"
    )


def test_chunks_split_the_list_in_order(clean_root: Path) -> None:
    val = SemanticValidation(clean_root, "ade20k", chunk_size=60)
    chunks = [60, 60, 30]
    assert val.questions == [
        semantic_question(list(ADE20K_CLASSES[start : start + size]))
        for start, size in zip((0, 60, 120), chunks, strict=True)
    ]


def test_a_value_outside_the_vocabulary_is_one_clear_error(root: Path) -> None:
    label_path = sorted((root / "coco/panoptic_semseg_val2017").glob("*.png"))[0]
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[2, 2] = 200
    cv2.imwrite(str(label_path), label)
    val = SemanticValidation(root, "cocostuff")
    with pytest.raises(DataError, match="label value 200 is neither one of the 171 classes"):
        val[0]
    (error,) = val.check(deep=True)
    assert error.file == str(label_path) and error.record == label_path.stem


def test_a_label_of_the_wrong_size_is_found(root: Path) -> None:
    label_path = sorted((root / "cityscapes/gtFine/val/frankfurt").glob("*.png"))[1]
    cv2.imwrite(str(label_path), np.zeros((5, 7), np.uint8))
    (error,) = SemanticValidation(root, "cityscapes").check(deep=True)
    assert "is 7x5 but its image is 96x72" in str(error)
    assert list(SemanticValidation(root, "cityscapes").check(deep=False)) == []


def test_a_missing_image_is_found_without_decoding(root: Path) -> None:
    image = sorted((root / "mapillary/validation/images").glob("*.jpg"))[0]
    image.unlink()
    (error,) = SemanticValidation(root, "mapillary").check(deep=False)
    assert f"image {image} does not exist" in str(error)


def test_class_list_files_of_the_wrong_length_are_refused(root: Path) -> None:
    user = root / "coco" / "cocostuff171_classes.json"
    user.write_text(json.dumps({"names": ["a", "b", "c"]}))
    with pytest.raises(DataError, match="holds 3 class names, expected 171"):
        SemanticValidation(root, "cocostuff")
    config = root / "mapillary" / "config_v1.2.json"
    labels = json.loads(config.read_text())["labels"][:10]
    config.write_text(json.dumps({"labels": labels}))
    with pytest.raises(DataError, match="has 10 labels, expected at least 65"):
        SemanticValidation(root, "mapillary")


def test_an_absent_set_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no validation label maps"):
        SemanticValidation(tmp_path, "ade20k")


def test_entries() -> None:
    assert [parse_semantic_val(f"{d}|val") for d in SEMANTIC_VAL_SETS] == list(SEMANTIC_VAL_SETS)
    with pytest.raises(ValueError, match="accepted: ade20k|val, cocostuff|val"):
        parse_semantic_val("ade20k|train")
