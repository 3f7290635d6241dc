"""ReasonSeg: `reason_seg/ReasonSeg/{train,val,test}/<name>.jpg` with a LabelMe-style
`<name>.json` ({text, is_sentence, shapes: [{label, points, ...}], image size fields}), and
`reason_seg/ReasonSeg/explanatory/train.json` = [{image, query, outputs}] for half the train
images.

Even images ask a reasoning sentence (`is_sentence` true): a fact question whose target is every
object of a shape ("Which shape in this picture has no corners at all?") or a likeness question
naming one object ("Which circle has the colour of a ripe strawberry?"). Odd images give short
names (`is_sentence` false: "the red circle"). Targets are written as one "target" polygon per
region. Every IGNORE_EVERY-th image with a composite target marks its last part "ignore"
(smaller shapes are filled last, so the part wins); every FLAG_EVERY-th image carries a small
"flag" shape, which loaders skip.
"""

from __future__ import annotations

import numpy as np

from tools.tiny_assets.common import Context, write_jpeg, write_json
from tools.tiny_assets.shapes_world import Scene, SceneObject
from tools.tiny_assets.shapes_world_text import (
    COLOUR_LIKENESS,
    FACTS_BY_CATEGORY,
    capitalise,
    pick,
)

REASON_SPLITS = ("train", "val", "test")
IGNORE_EVERY = 3
FLAG_EVERY = 4
FACT_P = 0.5
MAX_SHORT_TEXTS = 2
# Flickr-like names "<number>_<10 hex digits>_o", numbers apart per split.
HEX_NAME_RANGE = 16**10
NAME_SPLIT_STRIDE = 100000
# The flag is a small triangle in the top-left corner, FLAG_SIZE pixels wide.
FLAG_SIZE = 4.0
LABELME_VERSION = "4.5.6"
NAME_FIRST_NUMBER = 10000000
MAX_TEXTS = 3


def candidates(scene: Scene, composite_only: bool) -> list[SceneObject]:
    return [o for o in scene.objects if o.is_composite or not composite_only]


def reasoning_texts(
    scene: Scene, rng: np.random.Generator, composite_only: bool
) -> tuple[list[str], list[SceneObject], str]:
    """(1-3 reasoning sentences, targets, explanation) about one scene's objects (only its
    composites if `composite_only`)."""
    objects = candidates(scene, composite_only)
    if rng.random() < FACT_P:
        shape = pick(rng, sorted({o.shape for o in objects}))
        fact = FACTS_BY_CATEGORY[shape]
        targets = [o for o in scene.objects if o.shape == shape]
        explanation = capitalise(fact.answer([f"the {o.name}" for o in targets])) + "."
        return [fact.question], targets, explanation
    obj = pick(rng, objects)
    thing = COLOUR_LIKENESS[obj.colour]
    texts = [
        f"Which {obj.shape} has the colour of {thing}?",
        f"Find the {obj.shape} that is the same colour as {thing}.",
        f"Something in this picture has the colour of {thing} and the shape of a {obj.shape}. "
        "What is it?",
    ]
    count = int(rng.integers(1, MAX_TEXTS + 1))
    explanation = f"The {obj.name} is a {obj.shape} with the colour of {thing}."
    return texts[:count], [obj], explanation


def short_texts(
    scene: Scene, rng: np.random.Generator, composite_only: bool
) -> tuple[list[str], list[SceneObject]]:
    """(1-2 names of one object, [that object])."""
    obj = pick(rng, candidates(scene, composite_only))
    return [f"the {obj.name}", obj.name][: int(rng.integers(1, MAX_SHORT_TEXTS + 1))], [obj]


def labelme_shape(label: str, polygon: list[float]) -> dict:
    points = [[polygon[i], polygon[i + 1]] for i in range(0, len(polygon), 2)]
    return {
        "label": label,
        "points": points,
        "group_id": None,
        "shape_type": "polygon",
        "flags": {},
    }


def shapes_for(targets: list[SceneObject], with_ignore: bool, with_flag: bool) -> list[dict]:
    """LabelMe shapes: every region of every target, the smallest part of the first composite
    target as 'ignore' when asked, and a flag triangle when asked."""
    composites = [o for o in targets if o.is_composite]
    ignored = None
    if with_ignore and composites:
        ignored = min(composites[0].parts, key=lambda part: part.mask.sum())
    shapes = []
    for obj in targets:
        for region in obj.regions:
            label = "ignore" if region is ignored else "target"
            shapes += [labelme_shape(label, polygon) for polygon in region.polygons]
    if with_flag:
        shapes.append(labelme_shape("flag", [0.0, 0.0, FLAG_SIZE, 0.0, 0.0, FLAG_SIZE]))
    return shapes


def write_reason_seg(ctx: Context) -> None:
    base = ctx.root / "reason_seg" / "ReasonSeg"
    explanatory = []
    for split_index, split in enumerate(REASON_SPLITS):
        rng = ctx.rng(f"reason_seg {split}")
        count = ctx.options.images_per_split
        scenes = ctx.scenes(f"reason_seg {split} images", count, composite_every=IGNORE_EVERY)
        for index, scene in enumerate(scenes):
            number = NAME_FIRST_NUMBER + split_index * NAME_SPLIT_STRIDE + index
            name = f"{number}_{rng.integers(HEX_NAME_RANGE):010x}_o"
            is_sentence, with_ignore = index % 2 == 0, index % IGNORE_EVERY == 0
            if is_sentence:
                texts, targets, explanation = reasoning_texts(scene, rng, with_ignore)
            else:
                (texts, targets), explanation = short_texts(scene, rng, with_ignore), ""
            height, width = scene.size
            annotation = {
                "version": LABELME_VERSION,
                "flags": {},
                "text": texts,
                "is_sentence": is_sentence,
                "shapes": shapes_for(targets, with_ignore, index % FLAG_EVERY == 0),
                "imagePath": f"{name}.jpg",
                "imageData": None,
                "imageHeight": height,
                "imageWidth": width,
            }
            write_jpeg(base / split / f"{name}.jpg", scene.image)
            write_json(base / split / f"{name}.json", annotation)
            if split == "train" and explanation:
                explanatory.append(
                    {"image": f"{name}.jpg", "query": texts[0], "outputs": explanation}
                )
    write_json(base / "explanatory" / "train.json", explanatory)
