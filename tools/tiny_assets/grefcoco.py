"""gRefCOCO (generalised referring: several or no targets) and RefCOCOm (object and part
referring with PNG masks), both on the shared COCO train2014 pool.

gRefCOCO, `refer_seg/grefcoco/grefs(unc).json` (and the same list pickled as `grefs(unc).p`)
plus `instances.json`: refs as refCOCO's but `ann_id` and `category_id` are lists. Per image:
one single-target ref per object, multi-target refs for every group of two or more objects
sharing a shape or a colour ("the circles", "the red things") and one pair ("the red circle and
the blue square"), and one no-target ref (`absent_refs` of them, each another kind) naming a
near-miss (colour, shape) that no object has (`ann_id == [-1]`, `category_id == [-1]`,
`no_target: true`).

RefCOCOm, `refer_seg/RefCOCOm/annotations/refcocom_<split>.json` for the val/testA/testB
images of the pool, one record per object and per part (`cat`: the object's COCO category name,
"clock" or "car:wheel", as `tools/tiny_assets/classes.py` maps kinds), and
`refer_seg/RefCOCOm/masks/<segment_id>.png` (0/255).
"""

from __future__ import annotations

import numpy as np

from tools.tiny_assets.classes import COCO_THING_NAMES, OBJECT_CATEGORY_IDS
from tools.tiny_assets.common import (
    Context,
    split_of,
    write_json,
    write_pickle,
    write_png,
)
from tools.tiny_assets.refer import REFER_SPLITS, ReferPool, ref_record, sentence
from tools.tiny_assets.shapes_world import Scene, SceneObject
from tools.tiny_assets.shapes_world_text import (
    absent_kind,
    mask_box,
    part_noun,
    part_phrase,
    plural,
    referring_expressions,
)

NO_TARGET = [-1]
MASK_FOREGROUND = 255
REFCOCOM_SPLITS = ("val", "testA", "testB")
SINGLE_SENTENCES = 2
GROUP_MIN = 2
ABSENT_TRIES = 10  # draws per wanted absent kind before settling for fewer


def group_phrases(scene: Scene) -> list[tuple[list[SceneObject], list[str]]]:
    """(objects, expressions) for each shape or colour shared by two or more objects."""
    groups = []
    for shape in sorted({o.shape for o in scene.objects}):
        members = [o for o in scene.objects if o.shape == shape]
        if len(members) >= GROUP_MIN:
            groups.append((members, [f"the {plural(shape)}", f"all {plural(shape)}"]))
    for colour in sorted({o.colour for o in scene.objects}):
        members = [o for o in scene.objects if o.colour == colour]
        if len(members) >= GROUP_MIN:
            groups.append((members, [f"the {colour} things", f"everything that is {colour}"]))
    return groups


def absent_kinds(scene: Scene, rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """Up to `count` distinct (shape, colour) pairs that no object has (near misses first)."""
    kinds: list[tuple[str, str]] = []
    for _ in range(count * ABSENT_TRIES):
        kind = absent_kind(scene, rng)
        if kind not in kinds:
            kinds.append(kind)
        if len(kinds) == count:
            break
    return kinds


def image_targets(
    scene: Scene, rng: np.random.Generator, absent_refs: int = 1
) -> list[tuple[list[SceneObject], list[str]]]:
    """Every gRefCOCO ref of an image as (targets, expressions); empty targets = no target.
    `absent_refs` no-target refs, each naming another absent (colour, shape)."""
    refs = [
        ([obj], referring_expressions(scene, obj, "refcoco", rng, SINGLE_SENTENCES))
        for obj in scene.objects
    ]
    refs += group_phrases(scene)
    if len(scene.objects) >= GROUP_MIN:
        first, second = rng.choice(len(scene.objects), size=GROUP_MIN, replace=False)
        a, b = scene.objects[min(first, second)], scene.objects[max(first, second)]
        refs.append(([a, b], [f"the {a.name} and the {b.name}", f"{a.name} and {b.name}"]))
    for shape, colour in absent_kinds(scene, rng, absent_refs):
        refs.append(([], [f"the {colour} {shape}", f"{colour} {shape}"]))
    return refs


def write_grefcoco(ctx: Context, pool: ReferPool) -> None:
    rng = ctx.rng("grefcoco")
    refs: list[dict] = []
    sent_count = 0
    for index, (scene, image_id, ids) in enumerate(
        zip(pool.scenes, pool.image_ids, pool.ann_ids, strict=True)
    ):
        split = split_of(index, ctx.options.images_per_split, REFER_SPLITS)
        ann_of = {id(obj): ann for obj, ann in zip(scene.objects, ids, strict=True)}
        for targets, texts in image_targets(scene, rng, ctx.options.absent_refs):
            sentences = [sentence(sent_count + j, text) for j, text in enumerate(texts)]
            sent_count += len(sentences)
            ann_ids = [ann_of[id(obj)] for obj in targets] or NO_TARGET
            categories = [OBJECT_CATEGORY_IDS[obj.shape] for obj in targets] or NO_TARGET
            stem = pool.file_names[index].removesuffix(".jpg")
            ref = ref_record(
                len(refs),
                image_id,
                ann_ids,
                categories,
                split,
                f"{stem}_{len(refs)}.jpg",
                sentences,
            )
            ref["no_target"] = not targets
            refs.append(ref)
    base = ctx.root / "refer_seg" / "grefcoco"
    write_json(base / "grefs(unc).json", refs)
    write_pickle(base / "grefs(unc).p", refs)
    write_json(base / "instances.json", pool.instances())


def refcocom_record(
    segment_id: int, category: str, mask: np.ndarray, img_name: str, texts: list[str], first: int
) -> dict:
    x0, y0, x1, y1 = mask_box(mask)
    return {
        "bbox": [float(x0), float(y0), float(x1 + 1), float(y1 + 1)],
        "cat": category,
        "segment_id": segment_id,
        "img_name": img_name,
        "sentences": [
            {"idx": j, "sent_id": first + j, "sent": text} for j, text in enumerate(texts)
        ],
        "sentences_num": len(texts),
    }


def write_refcocom(ctx: Context, pool: ReferPool) -> None:
    rng = ctx.rng("refcocom")
    base = ctx.root / "refer_seg" / "RefCOCOm"
    records: dict[str, list[dict]] = {split: [] for split in REFCOCOM_SPLITS}
    segment_id, sent_count = 1, 0
    for index, scene in enumerate(pool.scenes):
        split = split_of(index, ctx.options.images_per_split, REFER_SPLITS)
        if split not in records:
            continue
        for obj in scene.objects:
            name = COCO_THING_NAMES[obj.shape]
            targets = [(name, obj.mask, referring_expressions(scene, obj, "refcoco", rng, 2))]
            for part in obj.parts:
                texts = [part_phrase(obj, part), f"the {obj.name}'s {part_noun(obj, part)}"]
                targets.append((f"{name}:{part.name}", part.mask, texts))
            for category, mask, texts in targets:
                write_png(
                    base / "masks" / f"{segment_id}.png", mask.astype(np.uint8) * MASK_FOREGROUND
                )
                records[split].append(
                    refcocom_record(
                        segment_id, category, mask, pool.file_names[index], texts, sent_count
                    )
                )
                segment_id += 1
                sent_count += len(texts)
    for split, split_records in records.items():
        write_json(base / "annotations" / f"refcocom_{split}.json", split_records)
