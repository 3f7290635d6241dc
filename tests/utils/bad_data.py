"""The bad inputs of issue 8's list, made in a fresh copy of the tiny assets: each corruption
rewrites the real on-disk files and returns what the messages about it must name (`Said`);
`CASES` says which entry points (training, evaluation) read each. Used by
tests/test_bad_input.py."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from tests.utils.unsafe_checkpoints import MakesMarker

MMR_DIR, MSCOCO = "MMR", "refer_seg/images/mscoco/images"
REFCOCO = "refer_seg/refcoco"
TRAIN2014 = "refer_seg/images/mscoco/images/train2014"
GREFS = "refer_seg/grefcoco/grefs(unc).json"
REASON_SEG = "reason_seg/ReasonSeg"
PASCAL_JSON = "vlpart/pascal_part/train.json"
VQA_JSON = "llava_dataset/llava_instruct_150k.json"
ADE_LABELS = "ade20k/annotations/training"
REFCOCOM = "refer_seg/RefCOCOm"
WRONG_SIZE = [10, 10]
ABSENT_ANN_ID = 999999
ESCAPING = "../../../../../../outside.jpg"


# --- Reading and rewriting the tiny assets ---
def read_json(path: Path) -> object:
    return json.loads(path.read_text())


def edit_json(path: Path, change: Callable[[object], None]) -> None:
    data = read_json(path)
    change(data)
    path.write_text(json.dumps(data))


def edit_pickle(path: Path, change: Callable[[list], None]) -> None:
    data = pickle.loads(path.read_bytes())
    change(data)
    path.write_bytes(pickle.dumps(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rle_of_size(size: list[int]) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(np.ones(size, np.uint8)))
    return {"size": size, "counts": encoded["counts"].decode()}


@dataclass
class Said:
    """What each entry point's message must contain: `train` (training start and the doctor's
    training report) and `val` (evaluation and the doctor's validation report)."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)


def mmr_record(dataset: Path, split: str) -> tuple[str, dict]:
    name = f"MMR_{split}.json"
    return name, read_json(dataset / MMR_DIR / name)[0]


def mmr_label(record: dict) -> str:
    return f"record #0 (image_id {record['image_id']})"


def edit_first_mmr_records(dataset: Path, change: Callable[[dict], list[str]]) -> Said:
    """Apply `change` to record 0 of MMR_train.json and MMR_val.json; what each must name."""
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        name, record = mmr_record(dataset, split)
        found += [name, mmr_label(record)]

        def apply(records: list, found: list[str] = found) -> None:
            found.extend(change(records[0]))

        edit_json(dataset / MMR_DIR / name, apply)
    return said


def refcoco_ref(dataset: Path, split: str) -> tuple[dict, dict]:
    """The first ref of `split` and its image's instances.json entry."""
    ref = next(
        r
        for r in pickle.loads((dataset / REFCOCO / "refs(unc).p").read_bytes())
        if r["split"] == split
    )
    images = read_json(dataset / REFCOCO / "instances.json")["images"]
    return ref, next(image for image in images if image["id"] == ref["image_id"])


def reason_seg_image(dataset: Path, split: str) -> Path:
    return sorted((dataset / REASON_SEG / split).glob("*.jpg"))[0]


# --- The dataset rows: corruptions, each returning what the messages must name ---
def missing_image_mmr(dataset: Path) -> Said:
    def change(record: dict) -> list[str]:
        (dataset / MSCOCO / record["file_name"]).unlink()
        return [Path(record["file_name"]).name, "does not exist"]

    return edit_first_mmr_records(dataset, change)


def missing_image_refcoco(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        ref, image = refcoco_ref(dataset, split)
        (dataset / TRAIN2014 / image["file_name"]).unlink()
        found += ["refs(unc).p", f"ref_id {ref['ref_id']}", image["file_name"], "does not exist"]
    return said


def truncated_image_mmr(dataset: Path) -> Said:
    def change(record: dict) -> list[str]:
        truncate(dataset / MSCOCO / record["file_name"])
        return [Path(record["file_name"]).name, "truncated JPEG"]

    return edit_first_mmr_records(dataset, change)


def non_image_reason_seg(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        image = reason_seg_image(dataset, split)
        image.write_text("this is not an image")
        found += [image.with_suffix(".json").name, f"record {image.name}", "not a readable image"]
    return said


def missing_image_reason_seg(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        image = reason_seg_image(dataset, split)
        image.unlink()
        found += [split, "without their .jpg image", image.with_suffix(".json").name]
    return said


def code_running_refs_refcoco(dataset: Path) -> Said:
    """refs(unc).p replaced by a pickle that would create a directory when unpickled: it is
    refused by name (the marker is checked in tests/utils/test_safe_pickle.py)."""
    refs = dataset / REFCOCO / "refs(unc).p"
    refs.write_bytes(pickle.dumps([MakesMarker(dataset / "MARKER")], protocol=2))
    named = ["refs(unc).p", "posix.mkdir", "tools/convert_refs.py"]
    return Said(train=list(named), val=list(named))


def empty_json_mmr(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        (dataset / MMR_DIR / f"MMR_{split}.json").write_text("")
        found += [f"MMR_{split}.json", "is empty (0 bytes), expected json"]
    return said


def malformed_json_refcoco(dataset: Path) -> Said:
    (dataset / REFCOCO / "instances.json").write_text('{"images": [')
    expected = ["refcoco/instances.json", "is not valid json"]
    return Said(list(expected), list(expected))


def malformed_json_reason_seg(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        annotation = reason_seg_image(dataset, split).with_suffix(".json")
        annotation.write_text('{"text": ["the car"], "shapes": [')
        found += [annotation.name, "is not valid json"]
    return said


def missing_field_mmr(dataset: Path) -> Said:
    def change(record: dict) -> list[str]:
        del record["text_answers"]
        return ["missing required field(s) ['text_answers']"]

    return edit_first_mmr_records(dataset, change)


def missing_field_refcoco(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        ref, _ = refcoco_ref(dataset, split)

        def change(refs: list, ref_id: int = ref["ref_id"]) -> None:
            del next(r for r in refs if r["ref_id"] == ref_id)["sentences"]

        edit_pickle(dataset / REFCOCO / "refs(unc).p", change)
        found += [
            "refs(unc).p",
            f"ref_id {ref['ref_id']}",
            "missing required field(s) ['sentences']",
        ]
    return said


def missing_field_vqa(dataset: Path) -> Said:
    record = read_json(dataset / VQA_JSON)[0]

    def change(records: list) -> None:
        del records[0]["image"]

    edit_json(dataset / VQA_JSON, change)
    return Said(["llava_instruct_150k.json", f"record 0 (id {record['id']})", "'image'"])


def rle_size_mmr(dataset: Path) -> Said:
    def change(record: dict) -> list[str]:
        record["answers"][0][0]["segmentation"] = rle_of_size(WRONG_SIZE)
        shape = [record["height"], record["width"]]
        return ["answers[0][0]", f"RLE size {WRONG_SIZE} differs from the image's {shape}"]

    return edit_first_mmr_records(dataset, change)


def rle_size_refcoco(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        ref, image = refcoco_ref(dataset, split)

        def change(data: dict, ann_id: int = ref["ann_id"]) -> None:
            annotation = next(a for a in data["annotations"] if a["id"] == ann_id)
            annotation["segmentation"] = rle_of_size(WRONG_SIZE)

        edit_json(dataset / REFCOCO / "instances.json", change)
        shape = [image["height"], image["width"]]
        found += [
            "instances.json",
            f"ref_id {ref['ref_id']}, annotation id {ref['ann_id']}",
            f"RLE size {WRONG_SIZE} differs from the image's {shape}",
        ]
    return said


def short_polygon_pascal(dataset: Path) -> Said:
    data = read_json(dataset / PASCAL_JSON)
    annotation = next(a for a in data["annotations"] if isinstance(a["segmentation"], list))
    annotation["segmentation"] = [[1, 1, 4, 4]]
    (dataset / PASCAL_JSON).write_text(json.dumps(data))
    return Said(
        [
            "pascal_part/train.json",
            f"record annotation {annotation['id']}",
            "polygon 0 has 2 points; at least 3 are needed",
        ]
    )


def short_polygon_reason_seg(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        image = reason_seg_image(dataset, split)

        def change(data: dict) -> None:
            data["shapes"][0]["points"] = [[1.0, 1.0], [4.0, 4.0]]

        edit_json(image.with_suffix(".json"), change)
        found += [
            image.with_suffix(".json").name,
            f"{image.name} shape 0",
            "polygon has 2 points; at least 3 are needed",
        ]
    return said


def seg_count_mmr(dataset: Path) -> Said:
    def change(record: dict) -> list[str]:
        record["text_answers"][0] += " And {seg}."
        seg = record["text_answers"][0].count("{seg}")
        answers = len(record["answers"][0])
        return [f"text_answers[0] has {seg} {{seg}} but answers[0] has {answers} annotations"]

    return edit_first_mmr_records(dataset, change)


def absent_annotation_refcoco(dataset: Path) -> Said:
    said = Said()
    refs_file = dataset / REFCOCO / "refs(unc).p"
    for split, found in (("train", said.train), ("val", said.val)):
        ref, _ = refcoco_ref(dataset, split)

        def change(refs: list, ref_id: int = ref["ref_id"]) -> None:
            next(r for r in refs if r["ref_id"] == ref_id)["ann_id"] = ABSENT_ANN_ID

        edit_pickle(refs_file, change)
        found += [
            "refs(unc).p",
            f"ref_id {ref['ref_id']}",
            f"ann_id {ABSENT_ANN_ID} is not in instances.json",
        ]
    return said


def contradictory_no_target_grefcoco(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        refs = read_json(dataset / GREFS)
        target = next(r for r in refs if r["split"] == split and not r["no_target"])

        def change(refs: list, ref_id: int = target["ref_id"]) -> None:
            next(r for r in refs if r["ref_id"] == ref_id)["no_target"] = True

        edit_json(dataset / GREFS, change)
        found += [
            "grefs(unc).json",
            f"ref_id {target['ref_id']}",
            f"no_target is true but ann_id {target['ann_id']} names annotations",
        ]
    return said


def label_map_size_ade20k(dataset: Path) -> Said:
    label = sorted((dataset / ADE_LABELS).glob("*.png"))[0]
    with Image.open(label) as stored:
        width, height = stored.size
        stored.resize((width // 2, height // 2), Image.NEAREST).save(label)
    return Said(
        [
            label.name,
            f"record {label.stem}",
            f"is {width // 2}x{height // 2} but its image is {width}x{height}",
        ]
    )


def label_map_size_refcocom(dataset: Path) -> Said:
    record = read_json(dataset / REFCOCOM / "annotations/refcocom_val.json")[0]
    mask = dataset / REFCOCOM / "masks" / f"{record['segment_id']}.png"
    with Image.open(mask) as stored:
        width, height = stored.size
        stored.resize((width // 2, height // 2), Image.NEAREST).save(mask)
    return Said(
        val=[
            "refcocom_val.json",
            f"record #0 (segment_id {record['segment_id']})",
            f"is {width // 2}x{height // 2} but its image is {width}x{height}",
        ]
    )


def escaping_path_mmr(dataset: Path) -> Said:
    def change(record: dict) -> list[str]:
        record["file_name"] = ESCAPING
        return [f"path {ESCAPING!r} escapes the dataset root"]

    return edit_first_mmr_records(dataset, change)


def escaping_path_refcoco(dataset: Path) -> Said:
    said = Said()
    for split, found in (("train", said.train), ("val", said.val)):
        ref, image = refcoco_ref(dataset, split)

        def change(data: dict, image_id: int = image["id"]) -> None:
            next(i for i in data["images"] if i["id"] == image_id)["file_name"] = ESCAPING

        edit_json(dataset / REFCOCO / "instances.json", change)
        found += ["refs(unc).p", f"ref_id {ref['ref_id']}", f"path {ESCAPING!r} escapes"]
    return said


def escaping_path_vqa(dataset: Path) -> Said:
    def change(records: list) -> None:
        records[0]["image"] = ESCAPING

    edit_json(dataset / VQA_JSON, change)
    return Said(["llava_instruct_150k.json", "record 0", f"path {ESCAPING!r} escapes"])


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, and which entry points meet it.

    train: (family, sub-dataset) training reads, or None; val: (--val_dataset,
    --val_json_name) evaluation reads, or None. decoded: only decoding finds it, so the training
    start check passes and training meets it when it reads the record.
    """

    corrupt: Callable[[Path], Said]
    train: tuple[str, str] | None
    val: tuple[str, str] | None
    decoded: bool = False


MMR_TRAIN = ("multi_part_reason_seg", "MMR_train.json")
MMR_VAL = ("MultiPartReasonSeg|val", "MMR_val.json")
REFCOCO_TRAIN, REFCOCO_VAL = ("refer_seg", "refcoco"), ("refcoco|unc|val", "")
REASON_TRAIN, REASON_VAL = ("reason_seg", "ReasonSeg|train"), ("ReasonSeg|val", "")
# issue row -> cases
CASES = {
    "missing image (MMR)": Case(missing_image_mmr, MMR_TRAIN, MMR_VAL),
    "missing image (refCOCO)": Case(missing_image_refcoco, REFCOCO_TRAIN, REFCOCO_VAL),
    "truncated image (MMR)": Case(truncated_image_mmr, MMR_TRAIN, MMR_VAL, decoded=True),
    "non-image file (ReasonSeg)": Case(non_image_reason_seg, REASON_TRAIN, REASON_VAL, True),
    "missing image (ReasonSeg)": Case(missing_image_reason_seg, REASON_TRAIN, REASON_VAL),
    "code-running refs pickle (refCOCO)": Case(
        code_running_refs_refcoco, REFCOCO_TRAIN, REFCOCO_VAL
    ),
    "empty json (MMR)": Case(empty_json_mmr, MMR_TRAIN, MMR_VAL),
    "malformed json (refCOCO instances)": Case(malformed_json_refcoco, REFCOCO_TRAIN, REFCOCO_VAL),
    "malformed json (ReasonSeg record)": Case(malformed_json_reason_seg, REASON_TRAIN, REASON_VAL),
    "missing field (MMR)": Case(missing_field_mmr, MMR_TRAIN, MMR_VAL),
    "missing field (refCOCO pickle)": Case(missing_field_refcoco, REFCOCO_TRAIN, REFCOCO_VAL),
    "missing field (VQA)": Case(missing_field_vqa, ("vqa", "llava_instruct_150k"), None),
    "RLE size (MMR)": Case(rle_size_mmr, MMR_TRAIN, MMR_VAL),
    "RLE size (refCOCO)": Case(rle_size_refcoco, REFCOCO_TRAIN, REFCOCO_VAL),
    "polygon < 3 points (PASCAL-Part)": Case(
        short_polygon_pascal, ("sem_seg", "pascal_part"), None
    ),
    "polygon < 3 points (ReasonSeg)": Case(short_polygon_reason_seg, REASON_TRAIN, REASON_VAL),
    "{seg} count (MMR)": Case(seg_count_mmr, MMR_TRAIN, MMR_VAL),
    "absent annotation id (refCOCO)": Case(absent_annotation_refcoco, REFCOCO_TRAIN, REFCOCO_VAL),
    "contradictory no-target ref (gRefCOCO)": Case(
        contradictory_no_target_grefcoco, ("refer_seg", "grefcoco"), ("grefcoco|unc|val", "")
    ),
    "label map size (ADE20K)": Case(
        label_map_size_ade20k, ("sem_seg", "ade20k"), None, decoded=True
    ),
    "label map size (RefCOCOm)": Case(
        label_map_size_refcocom, None, ("RefCOCOm|val", "refcocom_val.json")
    ),
    "escaping path (MMR)": Case(escaping_path_mmr, MMR_TRAIN, MMR_VAL),
    "escaping path (refCOCO)": Case(escaping_path_refcoco, REFCOCO_TRAIN, REFCOCO_VAL),
    "escaping path (VQA)": Case(escaping_path_vqa, ("vqa", "llava_instruct_150k"), None),
}
