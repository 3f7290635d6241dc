"""The real class each shapes-world kind is drawn as, per dataset vocabulary.

The tiny datasets label their objects with real classes, so that the label values and category
ids mean to any reader (LISA's loaders, the COCO API, the shipped class lists) what our texts say
the object is. The mapping is fixed and one-to-one per vocabulary (two kinds never share a
class, so "the circles" are exactly the objects of one class):

| kind     | COCO thing (refer families) | ADE20K-150      | COCO-Stuff-182 |
|----------|-----------------------------|-----------------|----------------|
| circle   | clock (85)                  | clock (148)     | clock (84)     |
| square   | book (84)                   | book (67)       | book (83)      |
| triangle | kite (38)                   | tent (114)      | tent (165)     |
| star     | teddy bear (88)             | flower (66)     | flower (118)   |
| house    | refrigerator (82)           | house (25)      | house (127)    |
| car      | car (3)                     | car (20)        | car (2)        |
| tree     | potted plant (64)           | tree (4)        | tree (168)     |

COCO thing ids are COCO's category ids (1..90 with gaps); COCO has no house or tree "thing",
so the nearest things with a box-with-a-door and a trunk-with-leaves outline stand in. ADE20K
numbers are class indexes in `utils/datasets/class_lists/ade20k_classes.json` (the label value
is index + 1; 0 is "other"); COCO-Stuff numbers are stuffthingmaps pixel values (pixel p is line
p + 1 of `cocostuff_classes.txt`, i.e. COCO id p + 1). The semantic vocabularies share the
names, so a class asked about in ADE20K is the same word in COCO-Stuff. Texts keep describing
what the object looks like ("the red circle"), as refCOCO's expressions describe a "person".
"""

from __future__ import annotations

import json
from pathlib import Path

from tools.tiny_assets.shapes_world import OBJECT_SHAPES

CLASS_LISTS = Path(__file__).resolve().parents[2] / "utils" / "datasets" / "class_lists"
ADE20K_CLASS_LIST = CLASS_LISTS / "ade20k_classes.json"
COCOSTUFF_CLASS_LIST = CLASS_LISTS / "cocostuff_classes.txt"

COCO_THING_NAMES = {
    "circle": "clock",
    "square": "book",
    "triangle": "kite",
    "star": "teddy bear",
    "house": "refrigerator",
    "car": "car",
    "tree": "potted plant",
}
SEMANTIC_NAMES = {
    "circle": "clock",
    "square": "book",
    "triangle": "tent",
    "star": "flower",
    "house": "house",
    "car": "car",
    "tree": "tree",
}
# COCO-Stuff's background: a real stuff class whose name holds "-", so loaders ignore it.
COCOSTUFF_BACKGROUND_NAME = "ground-other"

# COCO 2017's 80 thing categories (instances_*.json): id, name, supercategory.
COCO_SUPERCATEGORIES = {
    "person": ("person",),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    "outdoor": ("traffic light", "fire hydrant", "stop sign", "parking meter", "bench"),
    "animal": (
        "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    ),
    "accessory": ("backpack", "umbrella", "handbag", "tie", "suitcase"),
    "sports": (
        "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
        "skateboard", "surfboard", "tennis racket",
    ),
    "kitchen": ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"),
    "food": (
        "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
        "donut", "cake",
    ),
    "furniture": ("chair", "couch", "potted plant", "bed", "dining table", "toilet"),
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"),
}  # fmt: skip
COCO_THING_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip


def coco_categories() -> list[dict]:
    """COCO's 80 thing categories in id order, as instances.json lists them."""
    names = [name for group in COCO_SUPERCATEGORIES.values() for name in group]
    supercategory = {name: sup for sup, group in COCO_SUPERCATEGORIES.items() for name in group}
    return [
        {"supercategory": supercategory[name], "id": cat_id, "name": name}
        for cat_id, name in zip(COCO_THING_IDS, names, strict=True)
    ]


COCO_CATEGORY_IDS = {cat["name"]: cat["id"] for cat in coco_categories()}
# The COCO category id of each kind, in every COCO-style instances.json.
OBJECT_CATEGORY_IDS = {shape: COCO_CATEGORY_IDS[COCO_THING_NAMES[shape]] for shape in OBJECT_SHAPES}


def ade20k_class_names() -> list[str]:
    """The 150 ADE20K class names of the shipped list (index = label value - 1)."""
    return json.loads(ADE20K_CLASS_LIST.read_text(encoding="utf-8"))


def cocostuff_class_names() -> list[str]:
    """The 182 COCO-Stuff names of the shipped list (index = pixel value)."""
    lines = COCOSTUFF_CLASS_LIST.read_text(encoding="utf-8").splitlines()[1:]  # 0: unlabeled
    return [line.split(": ", 1)[1] for line in lines]


def class_indexes(names: list[str], wanted: dict[str, str]) -> dict[str, int]:
    """{kind: index of its class name in `names`}; ValueError naming a missing class."""
    missing = sorted(set(wanted.values()) - set(names))
    if missing:
        raise ValueError(f"class list lacks {missing}; the kind -> class mapping is stale")
    return {kind: names.index(name) for kind, name in wanted.items()}
