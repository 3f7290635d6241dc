"""Writers of tiny referring, gRefCOCO, RefZOM, MMR and RefCOCOm datasets in their real file
formats.

The masks the writers encode are module constants (ANN_MASKS, MMR_MASKS, REFCOCOM_MASKS), so
tests compare pixel-exactly. Images are H x W = 24 x 32; masks uint8 [H, W] in {0, 1}.
`tiny_dataset_dir` writes `tools/make_tiny_assets.py`'s output once per session.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

H, W = 24, 32
COCO_DIR = "refer_seg/images/mscoco/images"
TRAIN2014 = f"{COCO_DIR}/train2014"


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """uint8 [H, W] with rows y0:y1, columns x0:x1 set."""
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def box_polygon(y0: int, y1: int, x0: int, x1: int) -> list[float]:
    """The COCO polygon that rasterises exactly to `box(y0, y1, x0, x1)`."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rle(mask: np.ndarray) -> dict:
    """Compressed RLE as stored in json: {size [H, W], counts str}."""
    encoded = coco_mask.encode(np.asfortranarray(mask))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


def write_image(path: Path, shape: tuple[int, int] = (H, W), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)
    cv2.imwrite(str(path), pixels)


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


# ann id -> (image id, segmentation kind, mask)
ANN_MASKS = {
    11: box(2, 10, 3, 12),
    12: np.pad(np.eye(8, dtype=np.uint8), ((12, 4), (20, 4))),
    21: box(1, 5, 1, 6) | box(10, 20, 15, 30),
    31: box(4, 20, 4, 28),
}
ANN_IMAGES = {11: 1, 12: 1, 21: 2, 31: 3}


def instances(extra_anns: list[dict] = (), extra_images: list[dict] = ()) -> dict:
    """instances.json: ann 11 polygon, 12 RLE, 21 two polygons, 31 RLE; images 1, 2, 3."""
    images = [
        {"id": i, "file_name": coco_name(i), "height": H, "width": W} for i in (1, 2, 3)
    ] + list(extra_images)
    segmentations = {
        11: [box_polygon(2, 10, 3, 12)],
        12: rle(ANN_MASKS[12]),
        21: [box_polygon(1, 5, 1, 6), box_polygon(10, 20, 15, 30)],
        31: [rle(ANN_MASKS[31])],
    }
    annotations = [
        {"id": a, "image_id": ANN_IMAGES[a], "segmentation": s, "category_id": 1}
        for a, s in segmentations.items()
    ] + list(extra_anns)
    return {"images": images, "annotations": annotations, "categories": [{"id": 1}]}


def ref(ref_id: int, image_id: int, ann_id: object, split: str, sents: list[str]) -> dict:
    return {
        "ref_id": ref_id,
        "image_id": image_id,
        "ann_id": ann_id,
        "category_id": 1,
        "split": split,
        "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
        "sent_ids": list(range(len(sents))),
        "sentences": [
            {"sent": s, "raw": s, "sent_id": i, "tokens": s.split()} for i, s in enumerate(sents)
        ],
    }


# sentence -> ann id, for the refcoco fixture's training refs
REFCOCO_TRAIN_SENTENCES = {
    "the red box": 11,
    "left box": 11,
    "round blob": 12,
    "two parts": 21,
}


def refcoco_refs() -> list[dict]:
    return [
        ref(100, 1, 11, "train", ["the red box", "left box"]),
        ref(101, 1, 12, "train", ["round blob"]),
        ref(200, 2, 21, "train", ["two parts"]),
        ref(300, 3, 31, "val", ["val thing", "the val object"]),
        ref(301, 3, 31, "testA", ["test thing"]),
        ref(302, 2, 21, "testB", ["held out parts"]),
    ]


def write_images(dataset_dir: Path, folder: str = TRAIN2014) -> None:
    for image_id in (1, 2, 3):
        write_image(dataset_dir / folder / coco_name(image_id), seed=image_id)


def write_refer(
    dataset_dir: Path,
    dataset: str = "refcoco",
    refs: list[dict] | None = None,
    refs_name: str = "refs(unc).p",
    instances_json: dict | None = None,
    images: bool = True,
) -> Path:
    """refer_seg/<dataset>/<refs_name> (pickle, or json if it ends .json) + instances.json."""
    directory = dataset_dir / "refer_seg" / dataset
    directory.mkdir(parents=True, exist_ok=True)
    refs = refcoco_refs() if refs is None else refs
    if refs_name.endswith(".json"):
        (directory / refs_name).write_text(json.dumps(refs))
    else:
        (directory / refs_name).write_bytes(pickle.dumps(refs))
    content = instances() if instances_json is None else instances_json
    (directory / "instances.json").write_text(json.dumps(content))
    if images:
        write_images(dataset_dir)
    return directory


def grefcoco_refs() -> list[dict]:
    """Multi-target (500), no-target ([-1] + no_target, 501), single (502); val 503, 504."""
    refs = [
        ref(500, 1, [11, 12], "train", ["both things"]),
        ref(501, 1, [-1], "train", ["the purple cat"]),
        ref(502, 2, [21], "train", ["parts"]),
        ref(503, 3, [31], "val", ["val thing"]),
        ref(504, 3, [-1], "val", ["nothing here"]),
    ]
    for item in refs:
        item["no_target"] = item["ann_id"] == [-1]
    return refs


# an annotation of image 1 whose RLE holds no pixel (GSVA answers such a target `[REJ]`)
EMPTY_ANN_ID = 13


def empty_annotation() -> dict:
    return {
        "id": EMPTY_ANN_ID,
        "image_id": 1,
        "segmentation": rle(np.zeros((H, W), np.uint8)),
        "category_id": 1,
    }


def refzom_refs() -> list[dict]:
    """Ref_ZOM.p refs: many (600), zero (601, `ann_id == []`), one (602) in train; one (603)
    and zero (604) in test; `source` as Ref-ZOM writes it."""
    refs = [
        ref(600, 1, [11, 12], "train", ["both things"]),
        ref(601, 1, [], "train", ["the purple cat"]),
        ref(602, 2, [21], "train", ["parts"]),
        ref(603, 3, [31], "test", ["The Test Thing."]),
        ref(604, 3, [], "test", ["nothing here"]),
    ]
    for item in refs:
        item["source"] = {0: "zero", 1: "one"}.get(len(item["ann_id"]), "many")
    return refs


# MMR: one record whose three questions have 1, 2 and 3 `{seg}`s and distinct masks
MMR_MASKS = [
    [box(0, 4, 0, 4)],
    [box(5, 9, 0, 4), box(10, 14, 0, 4)],
    [box(0, 4, 10, 14), box(5, 9, 10, 14), box(15, 20, 10, 14)],
]
MMR_QUESTIONS = ["What holds the food?", "Which parts carry it?", "What is on the table?"]
MMR_TEXT_ANSWERS = [
    "The {seg} holds the food",
    "The {seg} and the {seg} carry it.",
    "A {seg}, a {seg} and a {seg} are on the table",
]


def mmr_ann(mask: np.ndarray, name: str) -> dict:
    return {
        "bbox": [0, 0, 1, 1],
        "segmentation": rle(mask),
        "image_id": 9,
        "category_name": name,
        "category_id": 1,
        "sorted_category_id": 1,
    }


def mmr_record(file_name: str = "train2017/000000000009.jpg", image_id: int = 9) -> dict:
    answers = [
        [mmr_ann(m, f"obj{k}:part{j}") for j, m in enumerate(masks)]
        for k, masks in enumerate(MMR_MASKS)
    ]
    return {
        "file_name": file_name,
        "height": H,
        "width": W,
        "image_id": image_id,
        "coco_url": "",
        "not_exhaustive_category_ids": [],
        "neg_category_ids": [],
        "questions": list(MMR_QUESTIONS),
        "annotations": [a for group in answers for a in group],
        "answers": answers,
        "text_answers": list(MMR_TEXT_ANSWERS),
        "raw_answers": list(MMR_TEXT_ANSWERS),
    }


def write_mmr(
    dataset_dir: Path, json_name: str = "MMR_train.json", records: list | None = None
) -> Path:
    """MMR/<json_name> and the images of its records."""
    records = [mmr_record()] if records is None else records
    path = dataset_dir / "MMR" / json_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    for record in records:
        if isinstance(record, dict) and ".." not in str(record.get("file_name", "..")):
            write_image(dataset_dir / COCO_DIR / record["file_name"])
    return path


REFCOCOM_MASKS = {"7001": box(3, 9, 2, 10), "7002": box(12, 22, 5, 25)}


def refcocom_records() -> list[dict]:
    return [
        {
            "bbox": [2, 3, 10, 9],
            "cat": 1,
            "segment_id": "7001",
            "img_name": coco_name(1),
            "sentences": [
                {"idx": 0, "sent_id": 1, "sent": "the handle of the cup"},
                {"idx": 1, "sent_id": 2, "sent": "cup handle"},
            ],
            "sentences_num": 2,
        },
        {
            "bbox": [5, 12, 25, 22],
            "cat": 1,
            "segment_id": "7002",
            "img_name": coco_name(2),
            "sentences": [{"idx": 0, "sent_id": 3, "sent": "the left wheel"}],
            "sentences_num": 1,
        },
    ]


def write_refcocom(
    dataset_dir: Path, json_name: str = "refcocom_val.json", records: list | None = None
) -> Path:
    """refer_seg/RefCOCOm/annotations/<json_name>, masks/<segment_id>.png (0/255), images."""
    root = dataset_dir / "refer_seg" / "RefCOCOm"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / json_name
    path.write_text(json.dumps(refcocom_records() if records is None else records))
    for segment_id, mask in REFCOCOM_MASKS.items():
        cv2.imwrite(str(root / "masks" / f"{segment_id}.png"), mask * 255)
    write_images(dataset_dir)
    return path


TINY_FAMILIES = ("refer_seg", "grefcoco", "refzom", "refcocom", "mmr")


def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tools/make_tiny_assets.py` output (referring, gRefCOCO, RefCOCOm, MMR; no models),
    written once per test session and shared by the modules' `tiny_dataset` fixtures."""
    from tools.make_tiny_assets import make_tiny_assets

    out = tmp_path_factory.getbasetemp() / "tiny_refer_assets"
    if not out.is_dir():
        make_tiny_assets(out, seed=0, families=TINY_FAMILIES, models=False)
    return out / "dataset"


def answer_tokens(conversations: list[list[tuple[str, str]]]) -> list[str]:
    """The `[SEG]`/`[REJ]` tokens of all answers, in mask order."""
    return [
        token
        for conversation in conversations
        for _, answer in conversation
        for token in re.findall(r"\[(?:SEG|REJ)\]", answer)
    ]
