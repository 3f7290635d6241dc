"""RefZOM (Ref-ZOM, "one-to-zero/one/many" referring) on the shared COCO train2014 pool, in the
layout GSVA reads (`data/refzom.py`, `data/dataset.py:318-342`): `refer_seg/refzom/Ref_ZOM.p`
(a pickled list of refs) plus `refer_seg/refzom/instances.json`, images found under
`refer_seg/images/mscoco/images/train2014/` through `instances.json`.

A ref has the refCOCO keys with `ann_id` and `category_id` as lists (`[]` for a ref without
target, GSVA's `ann_id == []`) and `source` ("zero", "one" or "many", the key Ref-ZOM's own
loader reads). Splits: "train" and "test" (GSVA evaluates "refzom|final|test"), the first half
of the pool's images train, the rest test. The refs per image are gRefCOCO's kinds (one per
object, groups, a pair and `absent_refs` no-target refs), drawn from RefZOM's own stream.
"""

from __future__ import annotations

from tools.tiny_assets.classes import OBJECT_CATEGORY_IDS
from tools.tiny_assets.common import (
    Context,
    split_of,
    write_json,
    write_pickle,
)
from tools.tiny_assets.grefcoco import image_targets
from tools.tiny_assets.refer import ReferPool, ref_record, sentence

REFZOM_SPLITS = ("train", "test")
# "zero" / "one" / "many" targets, by the number of target objects
SOURCES = {0: "zero", 1: "one"}
MANY = "many"


def source_of(target_count: int) -> str:
    """Ref-ZOM's `source` of a ref with `target_count` target objects."""
    return SOURCES.get(target_count, MANY)


def write_refzom(ctx: Context, pool: ReferPool) -> None:
    """`refer_seg/refzom/Ref_ZOM.p` and `instances.json` over the train2014 pool."""
    rng = ctx.rng("refzom")
    per_split = -(-len(pool.scenes) // len(REFZOM_SPLITS))  # ceil: train gets any odd image
    refs: list[dict] = []
    sent_count = 0
    for index, (scene, image_id, ids) in enumerate(
        zip(pool.scenes, pool.image_ids, pool.ann_ids, strict=True)
    ):
        split = split_of(index, per_split, REFZOM_SPLITS)
        ann_of = {id(obj): ann for obj, ann in zip(scene.objects, ids, strict=True)}
        stem = pool.file_names[index].removesuffix(".jpg")
        for targets, texts in image_targets(scene, rng, ctx.options.absent_refs):
            sentences = [sentence(sent_count + j, text) for j, text in enumerate(texts)]
            sent_count += len(sentences)
            ref = ref_record(
                len(refs),
                image_id,
                [ann_of[id(obj)] for obj in targets],
                [OBJECT_CATEGORY_IDS[obj.shape] for obj in targets],
                split,
                f"{stem}_{len(refs)}.jpg",
                sentences,
            )
            ref["source"] = source_of(len(targets))
            refs.append(ref)
    base = ctx.root / "refer_seg" / "refzom"
    write_pickle(base / "Ref_ZOM.p", refs)
    # the same instances.json as the other referring datasets of the pool
    write_json(base / "instances.json", pool.instances())
