"""MMR (multi-target, multi-granularity reasoning): `MMR/MMR_{train,val,test_obj_only,
test_part_only,test_mixed}.json`, images under `refer_seg/images/mscoco/images/<file_name>`.

Each image record asks reasoning questions whose answers name every target that fits, object
or part ("Which part of the house keeps the rain out?" -> "The roof of the red house {seg}
keeps the rain out."). `text_answers[i]` holds one `{seg}` per entry of `answers[i]`, in the
same order, and no other braces; `raw_answers[i]` writes each placeholder as "[category]".
The test files hold object-only, part-only and mixed (object and part) questions; train and
val mix all three kinds. Train images are "train2017/...", the others "val2017/...".
"""

from __future__ import annotations

import numpy as np

from tools.tiny_assets.common import Context, bbox_xywh, compressed_rle, write_jpeg, write_json
from tools.tiny_assets.parts import CATEGORY_IDS, SORTED_CATEGORY_IDS, category_of
from tools.tiny_assets.refer import REFER_IMAGES
from tools.tiny_assets.shapes_world import Region, Scene, SceneObject
from tools.tiny_assets.shapes_world_text import (
    FACTS_BY_CATEGORY,
    capitalise,
    categories_present,
    fact_targets,
    target_phrase,
)

SEG = "{seg}"
MMR_FILES = {
    "train": ("train2017", ("object", "part", "mixed")),
    "val": ("val2017", ("object", "part", "mixed")),
    "test_obj_only": ("val2017", ("object",)),
    "test_part_only": ("val2017", ("part",)),
    "test_mixed": ("val2017", ("mixed",)),
}
MMR_FIRST_IMAGE_ID = 400001
IMAGE_ID_STRIDE = 10000
MAX_QUESTIONS = 3
COCO_URL = "http://images.cocodataset.org/{file_name}"

Target = tuple[SceneObject, Region | None]


def mmr_annotation(image_id: int, obj: SceneObject, part: Region | None) -> dict:
    """An MMR ann: bbox, compressed-RLE segmentation, category name/id/sorted id."""
    region = obj if part is None else part
    category = category_of(obj, part)
    return {
        "bbox": bbox_xywh(region.mask),
        "segmentation": compressed_rle(region.mask),
        "image_id": image_id,
        "category_name": category,
        "category_id": CATEGORY_IDS[category],
        "sorted_category_id": SORTED_CATEGORY_IDS[category],
    }


def fact_answer(scene: Scene, category: str) -> tuple[str, list[Target]]:
    """(answer clause with a placeholder per target, targets) for a category's fact."""
    targets = fact_targets(scene, category)
    items = [f"{target_phrase(obj, part)} {SEG}" for obj, part in targets]
    return FACTS_BY_CATEGORY[category].answer(items), targets


def make_question(
    scene: Scene, kind: str, rng: np.random.Generator, used: set[str]
) -> tuple[str, str, list[Target]] | None:
    """(question, text answer, targets) of a kind ("object", "part", "mixed") about categories
    not in `used`, or None when the scene has none left."""
    objects, parts = categories_present(scene)
    objects = [c for c in objects if c not in used]
    parts = [c for c in parts if c not in used]
    if (kind != "part" and not objects) or (kind != "object" and not parts):
        return None
    chosen = [objects[int(rng.integers(len(objects)))]] if kind != "part" else []
    chosen += [parts[int(rng.integers(len(parts)))]] if kind != "object" else []
    used.update(chosen)
    clauses, targets = zip(*(fact_answer(scene, c) for c in chosen), strict=True)
    questions = [FACTS_BY_CATEGORY[c].question for c in chosen]
    if len(chosen) == 1:
        return questions[0], capitalise(clauses[0]) + ".", list(targets[0])
    question = questions[0].rstrip("?") + ", and " + questions[1][0].lower() + questions[1][1:]
    answer = capitalise(clauses[0]) + ", and " + clauses[1] + "."
    return question, answer, [*targets[0], *targets[1]]


def raw_answer(text: str, targets: list[Target]) -> str:
    """The text answer with each placeholder written as '[category]'."""
    pieces = text.split(SEG)
    names = [f"[{category_of(obj, part)}]" for obj, part in targets]
    return "".join(p + n for p, n in zip(pieces, [*names, ""], strict=True))


def image_record(
    scene: Scene, image_id: int, file_name: str, kinds: tuple[str, ...], rng: np.random.Generator
) -> dict:
    everything = [(o, None) for o in scene.objects] + [
        (o, p) for o in scene.objects for p in o.parts
    ]
    present = {category_of(o, p) for o, p in everything}
    record = {
        "file_name": file_name,
        "height": scene.size[0],
        "width": scene.size[1],
        "image_id": image_id,
        "coco_url": COCO_URL.format(file_name=file_name),
        "not_exhaustive_category_ids": [],
        "neg_category_ids": sorted(i for c, i in CATEGORY_IDS.items() if c not in present),
        "questions": [],
        "annotations": [mmr_annotation(image_id, o, p) for o, p in everything],
        "answers": [],
        "text_answers": [],
        "raw_answers": [],
    }
    used: set[str] = set()
    for _ in range(int(rng.integers(1, MAX_QUESTIONS + 1))):
        made = make_question(scene, kinds[int(rng.integers(len(kinds)))], rng, used)
        if made is None:
            continue
        question, text, targets = made
        record["questions"].append(question)
        record["answers"].append([mmr_annotation(image_id, o, p) for o, p in targets])
        record["text_answers"].append(text)
        record["raw_answers"].append(raw_answer(text, targets))
    return record


def write_mmr(ctx: Context) -> None:
    for index, (split, (folder, kinds)) in enumerate(MMR_FILES.items()):
        rng = ctx.rng(f"mmr {split}")
        scenes = ctx.scenes(f"mmr {split} images", ctx.options.images_per_split, 1)
        records = []
        for offset, scene in enumerate(scenes):
            image_id = MMR_FIRST_IMAGE_ID + index * IMAGE_ID_STRIDE + offset
            file_name = f"{folder}/{image_id:012d}.jpg"
            write_jpeg(ctx.root / REFER_IMAGES / "mscoco" / "images" / file_name, scene.image)
            record = image_record(scene, image_id, file_name, kinds, rng)
            if record["questions"]:
                records.append(record)
        write_json(ctx.root / "MMR" / f"MMR_{split}.json", records)
