"""LLaVA-Instruct-style VQA: `llava_dataset/llava_instruct_150k.json` = [{id, image,
conversations: [{from: "human" | "gpt", value}]}] about the COCO 2017 images (`coco/train2017/`).

Questions and answers are read off the scene: counts by colour, colours of a shape, whether a
(colour, shape) is present (half the time a near miss that is not), the leftmost object and the
colour of a part. As in the original data, `<image>` opens the first human turn in most
records and closes it ("...?\\n<image>") in every IMAGE_LAST_EVERY-th one.
"""

from __future__ import annotations

import numpy as np

from tools.tiny_assets.common import Context, write_json
from tools.tiny_assets.parts import coco_file_name
from tools.tiny_assets.shapes_world import Scene
from tools.tiny_assets.shapes_world_text import (
    EXTREME_MARGIN,
    NUMBER_WORDS,
    absent_kind,
    join_words,
    part_noun,
    pick,
    plural,
    side_of,
    with_article,
)

IMAGE_TOKEN = "<image>"
IMAGE_LAST_EVERY = 3
MIN_ROUNDS, MAX_ROUNDS = 2, 3
ABSENT_P = 0.5

Round = tuple[str, str] | None


def count_round(scene: Scene, rng: np.random.Generator) -> Round:
    colour = pick(rng, sorted({o.colour for o in scene.objects}))
    shapes = [with_article(o.shape) for o in scene.objects if o.colour == colour]
    question = f"How many {colour} objects are there in the image?"
    if len(shapes) == 1:
        return question, f"There is one {colour} object: {shapes[0]}."
    count = NUMBER_WORDS[len(shapes)]
    return question, f"There are {count} {colour} objects: {join_words(shapes)}."


def colour_round(scene: Scene, rng: np.random.Generator) -> Round:
    shape = pick(rng, sorted({o.shape for o in scene.objects}))
    colours = [o.colour for o in scene.objects if o.shape == shape]
    if len(colours) == 1:
        return f"What colour is the {shape}?", f"The {shape} is {colours[0]}."
    ones = join_words([with_article(f"{c} one") for c in colours])
    answer = f"There are {NUMBER_WORDS[len(colours)]} {plural(shape)}: {ones}."
    return f"What colours are the {plural(shape)}?", answer


def presence_round(scene: Scene, rng: np.random.Generator) -> Round:
    if rng.random() < ABSENT_P:
        shape, colour = absent_kind(scene, rng)
        question = f"Is there {with_article(f'{colour} {shape}')} in the image?"
        return question, f"No, there is no {colour} {shape} in the image."
    obj = pick(rng, scene.objects)
    side = side_of(scene, obj)
    where = f" on the {side} side of the image" if side else ""
    question = f"Is there {with_article(obj.name)} in the image?"
    return question, f"Yes, there is {with_article(obj.name)}{where}."


def leftmost_round(scene: Scene, rng: np.random.Generator) -> Round:
    """Only asked when one object is clearly further left than every other."""
    ordered = sorted(scene.objects, key=lambda o: o.centre[0])
    margin = EXTREME_MARGIN * scene.size[1]
    if len(ordered) < 2 or ordered[0].centre[0] + margin > ordered[1].centre[0]:
        return None
    answer = f"The leftmost object is {with_article(ordered[0].name)}."
    return "What is the leftmost object in the image?", answer


def part_round(scene: Scene, rng: np.random.Generator) -> Round:
    parts = [(o, p) for o in scene.objects for p in o.parts if p.colour != o.colour]
    if not parts:
        return None
    obj, part = pick(rng, parts)
    noun = part_noun(obj, part)
    question = f"What colour is the {noun} of the {obj.name}?"
    return question, f"The {noun} of the {obj.name} is {part.colour}."


ROUNDS = (count_round, colour_round, presence_round, leftmost_round, part_round)


def conversation(scene: Scene, rng: np.random.Generator, image_last: bool) -> list[dict]:
    """2-3 question/answer rounds as LLaVA turns, `<image>` in the first human turn."""
    wanted = int(rng.integers(MIN_ROUNDS, MAX_ROUNDS + 1))
    rounds = []
    for index in rng.permutation(len(ROUNDS)):
        made = ROUNDS[index](scene, rng)
        if made is not None:
            rounds.append(made)
        if len(rounds) == wanted:
            break
    turns = []
    for question, answer in rounds:
        if not turns:
            question = f"{question}\n{IMAGE_TOKEN}" if image_last else f"{IMAGE_TOKEN}\n{question}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def write_vqa(ctx: Context, scenes: list[Scene], image_ids: list[int]) -> None:
    """Records about the COCO 2017 images written by the caller under `coco/train2017/`."""
    rng = ctx.rng("llava_instruct")
    records = []
    for index, (scene, image_id) in enumerate(zip(scenes, image_ids, strict=True)):
        image_last = index % IMAGE_LAST_EVERY == IMAGE_LAST_EVERY - 1
        records.append(
            {
                "id": f"{image_id:012d}",
                "image": coco_file_name(image_id),
                "conversations": conversation(scene, rng, image_last),
            }
        )
    write_json(ctx.root / "llava_dataset" / "llava_instruct_150k.json", records)
