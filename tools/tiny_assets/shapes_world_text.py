"""Truthful text about a shapes-world scene: names, referring expressions, absent targets,
reasoning facts (MMR / ReasonSeg) and visual question answering.

Every function reads the scene's objects, so what a text says holds in the image: "the circle on
the left" is only said of the leftmost of several circles, "to the left of the blue square" only
when the boxes say so, and an absent target is a (colour, shape) that no object of the scene has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tools.tiny_assets.shapes_world import COLOURS, OBJECT_SHAPES, Region, Scene, SceneObject

PLURALS = {"leaves": "leaves"}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOWELS = "aeiou"
# "on the left" needs the object's centre in the outer SIDE_FRACTION of the image width;
# "the circle on the left" needs it EXTREME_MARGIN (fraction of the width) beyond the others.
SIDE_FRACTION = 0.4
EXTREME_MARGIN = 0.1


def plural(noun: str) -> str:
    return PLURALS.get(noun, noun + "s")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in VOWELS else "a ") + phrase


def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def pick(rng: np.random.Generator, options: list | tuple):
    return options[int(rng.integers(len(options)))]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive pixel bounds of a non-empty bool mask [H, W]."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def side_of(scene: Scene, obj: SceneObject) -> str | None:
    """'left' or 'right' when the object's centre lies in that outer part of the image."""
    x = obj.centre[0] / scene.size[1]
    if x < SIDE_FRACTION:
        return "left"
    if x > 1 - SIDE_FRACTION:
        return "right"
    return None


def extreme_phrases(scene: Scene, obj: SceneObject) -> list[str]:
    """'the circle on the left' etc., for an object clearly beyond the others of its shape."""
    same = [o for o in scene.objects if o.shape == obj.shape and o is not obj]
    if not same:
        return []
    height, width = scene.size
    phrases = []
    for axis, low, high, extent in (
        (0, "on the left", "on the right", width),
        (1, "at the top", "at the bottom", height),
    ):
        mine, others = obj.centre[axis], [o.centre[axis] for o in same]
        if mine + EXTREME_MARGIN * extent < min(others):
            phrases.append(f"the {obj.shape} {low}")
        if mine - EXTREME_MARGIN * extent > max(others):
            phrases.append(f"the {obj.shape} {high}")
    return phrases


def relation_phrase(scene: Scene, obj: SceneObject) -> str | None:
    """'to the left of the blue square' (boxes apart along that axis) for the nearest object."""
    x0, y0, x1, y1 = mask_box(obj.mask)
    best = None
    for other in scene.objects:
        if other is obj:
            continue
        a0, b0, a1, b1 = mask_box(other.mask)
        relation = (
            "to the left of"
            if x1 < a0
            else "to the right of"
            if a1 < x0
            else "above"
            if y1 < b0
            else "below"
            if b1 < y0
            else None
        )
        distance = np.hypot(*np.subtract(obj.centre, other.centre))
        if relation and (best is None or distance < best[0]):
            best = (distance, f"{relation} the {other.name}")
    return best[1] if best else None


def part_detail_phrases(scene: Scene, obj: SceneObject) -> list[str]:
    """'the house with the white roof' when no other house has a white roof."""
    phrases = []
    for part in obj.parts:
        if part.colour == obj.colour:
            continue
        rivals = [
            o
            for o in scene.objects
            if o.shape == obj.shape
            and o is not obj
            and any(p.name == part.name and p.colour == part.colour for p in o.parts)
        ]
        if not rivals:
            many = sum(p.name == part.name for p in obj.parts) > 1
            noun = f"{part.colour} {plural(part.name) if many else part.name}"
            phrases.append(f"the {obj.shape} with {noun if many else with_article(noun)}")
    return list(dict.fromkeys(phrases))


def part_noun(obj: SceneObject, part: Region) -> str:
    """'roof'; a repeated part by its position: 'left wheel'."""
    same = [p for p in obj.parts if p.name == part.name]
    if len(same) == 1:
        return part.name
    order = sorted(same, key=lambda p: np.nonzero(p.mask)[1].mean())
    position = "left" if order[0] is part else "right" if order[-1] is part else "middle"
    return f"{position} {part.name}"


def part_phrase(obj: SceneObject, part: Region) -> str:
    """'the roof of the red house', 'the left wheel of the red car'."""
    return f"the {part_noun(obj, part)} of the {obj.name}"


def referring_expressions(
    scene: Scene, obj: SceneObject, style: str, rng: np.random.Generator, count: int
) -> list[str]:
    """Up to `count` distinct expressions naming `obj` alone, in a dataset's style:
    "refcoco" (short, location words allowed), "refcoco+" (no location words),
    "refcocog" (longer, relations), "refclef" (very short)."""
    name = obj.name
    if style == "refcoco+":
        options = [name, f"the {name}", f"the {obj.shape} that is {obj.colour}"]
        options += [
            p.replace(f"the {obj.shape}", f"the {name}") for p in part_detail_phrases(scene, obj)
        ]
    elif style == "refcocog":
        relation = relation_phrase(scene, obj)
        options = [f"the {name} {relation}", f"a {name} that is {relation}"] if relation else []
        options += [f"{p} in the picture" for p in part_detail_phrases(scene, obj)]
        options = options or [f"the {name} in the picture"]
    elif style == "refclef":
        options = [name] + [p.removeprefix("the ") for p in extreme_phrases(scene, obj)]
    else:
        side = side_of(scene, obj)
        options = [name, f"the {name}"] + extreme_phrases(scene, obj)
        options += [f"{name} on the {side}"] if side else []
    order = rng.permutation(len(options))[:count]
    return [options[i] for i in sorted(order)]


def absent_kind(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(shape, colour) that no object has, preferring a near miss: the colour of one object
    with the shape of another."""
    near = [
        (b.shape, a.colour)
        for a in scene.objects
        for b in scene.objects
        if not scene.has(a.colour, b.shape)
    ]
    if near:
        return pick(rng, sorted(set(near)))
    every = [(s, c) for s in OBJECT_SHAPES for c in COLOURS if not scene.has(c, s)]
    return pick(rng, every)


@dataclass(frozen=True)
class Fact:
    """A reasoning question about a category ("circle" or "house:roof") and its answer
    templates; `{targets}` takes the joined target names (with any placeholders)."""

    category: str
    question: str
    singular: str
    plural: str

    def answer(self, items: list[str]) -> str:
        template = self.singular if len(items) == 1 else self.plural
        return template.format(targets=join_words(items))


FACTS = (
    Fact(
        "circle",
        "Which shape in this picture has no corners at all?",
        "{targets} has no corners",
        "{targets} have no corners",
    ),
    Fact(
        "square",
        "Which shape has four equal sides and four right angles?",
        "{targets} has four equal sides",
        "{targets} have four equal sides",
    ),
    Fact(
        "triangle",
        "Which shape has exactly three corners?",
        "{targets} has exactly three corners",
        "{targets} have exactly three corners",
    ),
    Fact(
        "star",
        "Which shape looks like what twinkles in the night sky?",
        "{targets} looks like a star at night",
        "{targets} look like stars at night",
    ),
    Fact(
        "house",
        "Where could a family live in this picture?",
        "a family could live in {targets}",
        "a family could live in {targets}",
    ),
    Fact(
        "car",
        "What could someone drive to work?",
        "someone could drive {targets} to work",
        "someone could drive {targets} to work",
    ),
    Fact(
        "tree",
        "What could give shade on a sunny day?",
        "{targets} could give shade on a sunny day",
        "{targets} could give shade on a sunny day",
    ),
    Fact(
        "house:roof",
        "Which part of the house keeps the rain out?",
        "{targets} keeps the rain out",
        "{targets} keep the rain out",
    ),
    Fact(
        "house:wall",
        "Which part of the house holds up the roof?",
        "{targets} holds up the roof",
        "{targets} hold up the roofs",
    ),
    Fact(
        "house:door",
        "Where would someone walk into the house?",
        "someone would walk in through {targets}",
        "someone would walk in through {targets}",
    ),
    Fact(
        "car:body",
        "Which part of the car carries the passengers?",
        "{targets} carries the passengers",
        "{targets} carry the passengers",
    ),
    Fact(
        "car:wheel",
        "Which parts of the car touch the road?",
        "{targets} touches the road",
        "{targets} touch the road",
    ),
    Fact(
        "tree:trunk",
        "Which part of the tree holds it up?",
        "{targets} holds the tree up",
        "{targets} hold the trees up",
    ),
    Fact(
        "tree:leaves",
        "Which part of the tree changes colour in autumn?",
        "{targets} change colour in autumn",
        "{targets} change colour in autumn",
    ),
)
FACTS_BY_CATEGORY = {fact.category: fact for fact in FACTS}
COLOUR_LIKENESS = {
    "red": "a ripe strawberry",
    "green": "fresh grass",
    "blue": "a clear summer sky",
    "yellow": "a ripe banana",
    "purple": "a bunch of grapes",
    "orange": "a pumpkin",
    "pink": "a flamingo",
    "brown": "milk chocolate",
    "white": "fresh snow",
    "black": "the night sky",
}


def fact_targets(scene: Scene, category: str) -> list[tuple[SceneObject, Region | None]]:
    """Every (object, part) of a category: objects of a shape, or that part of each object."""
    shape, _, part_name = category.partition(":")
    found = []
    for obj in scene.objects:
        if obj.shape != shape:
            continue
        if not part_name:
            found.append((obj, None))
        found += [(obj, part) for part in obj.parts if part.name == part_name]
    return found


def target_phrase(obj: SceneObject, part: Region | None) -> str:
    return f"the {obj.name}" if part is None else part_phrase(obj, part)


def categories_present(scene: Scene) -> tuple[list[str], list[str]]:
    """(object categories, part categories) that have at least one target in the scene."""
    objects = sorted({o.shape for o in scene.objects})
    parts = sorted({f"{o.shape}:{p.name}" for o in scene.objects for p in o.parts})
    return objects, parts
