"""The shapes world: synthetic scenes of coloured shapes with exact instance and part masks.

A scene is a background (a muted colour with a gradient and noise) holding a few objects: simple
shapes (circle, square, triangle, star) and composite objects made of named parts (a house = wall
+ roof + door, a car = body + two wheels, a tree = trunk + leaves). Every colour comes from a
named palette, so a text that says "the red circle" can be checked against the pixels.

Every outline is a polygon in pixel coordinates, and every mask is that polygon rasterised by
pycocotools, so a COCO writer that stores the polygon (or the RLE of the visible mask) gives back
exactly the scene's mask. Later-painted regions hide earlier ones; a region's `mask` is what stays
visible, and `polygons_exact` says whether its polygons alone still describe it.

Scenes are sampled with distractors: most objects share their colour or their shape with another
object of the same scene, and no two objects share both, so "the red circle" names one object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from pycocotools import mask as mask_utils

RGB = tuple[int, int, int]

PALETTE: dict[str, RGB] = {
    "red": (215, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 210),
    "yellow": (235, 215, 40),
    "purple": (135, 60, 170),
    "orange": (245, 135, 30),
    "pink": (245, 140, 190),
    "brown": (120, 70, 35),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
# Muted backgrounds, each at least ~75 RGB units from every palette colour, so object pixels
# stay nearest to their own palette colour even after noise and JPEG.
BACKGROUNDS: tuple[RGB, ...] = ((110, 125, 140), (190, 180, 150), (150, 165, 130), (140, 140, 140))
BACKGROUND_GRADIENT = 15.0
PIXEL_NOISE = 6

SIMPLE_SHAPES = ("circle", "square", "triangle", "star")


@dataclass(frozen=True)
class PartSpec:
    """One part of a composite: its primitive drawn inside a sub-box of the object's box.

    box: (x0, y0, x1, y1) as fractions of the object's box. colour_rule: "main" (the object's
    colour), "contrast" (another palette colour), "wheel" or "trunk" (fixed, see `part_colour`).
    """

    name: str
    primitive: str
    box: tuple[float, float, float, float]
    colour_rule: str


@dataclass(frozen=True)
class CompositeSpec:
    """A composite object: box aspect (width / height) and parts in painting order."""

    aspect: float
    parts: tuple[PartSpec, ...]


COMPOSITES: dict[str, CompositeSpec] = {
    "house": CompositeSpec(
        1.0,
        (
            PartSpec("wall", "rect", (0.1, 0.45, 0.9, 1.0), "main"),
            PartSpec("roof", "triangle", (0.0, 0.0, 1.0, 0.45), "contrast"),
            PartSpec("door", "rect", (0.38, 0.66, 0.62, 1.0), "contrast"),
        ),
    ),
    "car": CompositeSpec(
        1.8,
        (
            PartSpec("body", "rect", (0.0, 0.15, 1.0, 0.75), "main"),
            PartSpec("wheel", "circle", (0.08, 0.5, 0.33, 1.0), "wheel"),
            PartSpec("wheel", "circle", (0.67, 0.5, 0.92, 1.0), "wheel"),
        ),
    ),
    "tree": CompositeSpec(
        0.75,
        (
            PartSpec("trunk", "rect", (0.4, 0.5, 0.6, 1.0), "trunk"),
            PartSpec("leaves", "circle", (0.0, 0.0, 1.0, 0.75), "main"),
        ),
    ),
}
COMPOSITE_SHAPES = tuple(COMPOSITES)
OBJECT_SHAPES = SIMPLE_SHAPES + COMPOSITE_SHAPES
PART_NAMES: dict[str, tuple[str, ...]] = {
    shape: tuple(dict.fromkeys(part.name for part in spec.parts))
    for shape, spec in COMPOSITES.items()
}
# Simple shapes are drawn more often than composites, so most scenes mix both kinds.
SIMPLE_WEIGHT, COMPOSITE_WEIGHT = 3.0, 2.0
# How a new object relates to one already in the scene: same colour, same shape, or neither.
SAME_COLOUR_P, SAME_SHAPE_P = 0.4, 0.4
KIND_TRIES = 20

CIRCLE_VERTICES = 32
STAR_POINTS = 5
STAR_INNER_RATIO = 0.45
COORD_DECIMALS = 2
# Object size: the side of an aspect-1 object as a fraction of the image's shorter side;
# composites are drawn larger so that their small parts (doors, wheels) stay a few pixels wide.
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.2, 0.32
COMPOSITE_SIZE_SCALE = 1.3
PLACEMENT_TRIES = 60
SHRINK_STEPS, SHRINK_FACTOR = 3, 0.8
# Pixels kept free between objects and at the image border (so masks never touch).
OBJECT_GAP, BORDER_MARGIN = 3, 2


@dataclass
class Region:
    """A painted, named region: a simple shape, or one part of a composite.

    polygons: flat [x1, y1, x2, y2, ...] lists in pixels. mask: bool [H, W] visible pixels.
    polygons_exact: whether rasterising `polygons` gives `mask` (False once occluded).
    """

    name: str
    colour: str
    polygons: list[list[float]]
    mask: np.ndarray
    polygons_exact: bool = True


@dataclass
class SceneObject:
    """An object: its shape name, its colour (a composite's main part), its regions in painting
    order (one for a simple shape), and its visible mask (bool [H, W])."""

    shape: str
    colour: str
    regions: list[Region]
    mask: np.ndarray = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def is_composite(self) -> bool:
        return self.shape in COMPOSITES

    @property
    def parts(self) -> list[Region]:
        """The named parts of a composite (empty for a simple shape)."""
        return self.regions if self.is_composite else []

    @property
    def polygons(self) -> list[list[float]]:
        return [polygon for region in self.regions for polygon in region.polygons]

    @property
    def polygons_exact(self) -> bool:
        """Whether the union of the regions' polygons rasterises to the visible mask."""
        return all(region.polygons_exact for region in self.regions) or np.array_equal(
            rasterize(self.polygons, *self.mask.shape), self.mask
        )

    @cached_property
    def centre(self) -> tuple[float, float]:
        """(x, y) centroid of the visible mask."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())


@dataclass
class Scene:
    """A rendered scene: image uint8 [H, W, 3] RGB and its objects (no two share colour+shape)."""

    image: np.ndarray
    objects: list[SceneObject]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.image.shape[0], self.image.shape[1]

    def has(self, colour: str, shape: str) -> bool:
        return any(o.colour == colour and o.shape == shape for o in self.objects)

    def class_map(self, class_index: dict[str, int], background: int) -> np.ndarray:
        """uint8 [H, W]: `class_index[shape]` on each object's pixels, `background` elsewhere."""
        label = np.full(self.size, background, dtype=np.uint8)
        for obj in self.objects:
            label[obj.mask] = class_index[obj.shape]
        return label


def rasterize(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """bool [H, W]: the union of the polygons, rasterised exactly as pycocotools decodes them."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _rounded(points: list[tuple[float, float]]) -> list[float]:
    return [round(float(v), COORD_DECIMALS) for point in points for v in point]


def primitive_polygon(primitive: str, box: tuple[float, float, float, float]) -> list[float]:
    """Flat polygon of a primitive ("rect", "square", "triangle", "circle", "star") inside the
    pixel box (x0, y0, x1, y1); round ones are centred with radius min(w, h) / 2."""
    x0, y0, x1, y1 = box
    cx, cy, radius = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    if primitive in ("rect", "square"):
        return _rounded([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
    if primitive == "triangle":
        return _rounded([(x0, y1), (x1, y1), (cx, y0)])
    if primitive == "circle":
        angles = [2 * math.pi * k / CIRCLE_VERTICES for k in range(CIRCLE_VERTICES)]
        return _rounded([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles])
    if primitive == "star":
        points = []
        for k in range(2 * STAR_POINTS):
            r = radius if k % 2 == 0 else radius * STAR_INNER_RATIO
            angle = -math.pi / 2 + math.pi * k / STAR_POINTS  # first point straight up
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return _rounded(points)
    raise ValueError(f"unknown primitive {primitive!r}")


def part_colour(rule: str, main: str, rng: np.random.Generator) -> str:
    """The colour of a part from its rule (see `PartSpec`), never the main colour unless 'main'."""
    if rule == "main":
        return main
    if rule == "wheel":
        return "black" if main != "black" else "white"
    if rule == "trunk":
        return "brown" if main != "brown" else "black"
    others = [c for c in COLOURS if c != main]
    return others[int(rng.integers(len(others)))]


def _random_shape(rng: np.random.Generator, exclude: str | None = None) -> str:
    shapes = [s for s in OBJECT_SHAPES if s != exclude]
    weights = np.array([SIMPLE_WEIGHT if s in SIMPLE_SHAPES else COMPOSITE_WEIGHT for s in shapes])
    return shapes[int(rng.choice(len(shapes), p=weights / weights.sum()))]


def _random_colour(rng: np.random.Generator, exclude: str | None = None) -> str:
    colours = [c for c in COLOURS if c != exclude]
    return colours[int(rng.integers(len(colours)))]


def sample_kinds(
    rng: np.random.Generator, count: int, require_composite: bool = False
) -> list[tuple[str, str]]:
    """`count` distinct (shape, colour) pairs; each new one shares the colour or the shape of an
    earlier one with probability SAME_COLOUR_P + SAME_SHAPE_P (the distractors)."""
    first = (
        COMPOSITE_SHAPES[int(rng.integers(len(COMPOSITE_SHAPES)))] if require_composite else None
    )
    kinds = [(first or _random_shape(rng), _random_colour(rng))]
    for _ in range(count - 1):
        for _ in range(KIND_TRIES):
            base_shape, base_colour = kinds[int(rng.integers(len(kinds)))]
            draw = rng.random()
            if draw < SAME_COLOUR_P:
                kind = (_random_shape(rng, exclude=base_shape), base_colour)
            elif draw < SAME_COLOUR_P + SAME_SHAPE_P:
                kind = (base_shape, _random_colour(rng, exclude=base_colour))
            else:
                kind = (_random_shape(rng), _random_colour(rng))
            if kind not in kinds:
                kinds.append(kind)
                break
    return kinds


def _box_size(shape: str, side: float) -> tuple[float, float]:
    """(w, h) of an object's box whose area is side**2 (scaled up for composites)."""
    if shape not in COMPOSITES:
        return side, side
    aspect, side = COMPOSITES[shape].aspect, side * COMPOSITE_SIZE_SCALE
    return side * math.sqrt(aspect), side / math.sqrt(aspect)


def _free(box: tuple[float, float, float, float], taken: list) -> bool:
    x0, y0, x1, y1 = box
    return all(
        x1 + OBJECT_GAP < a0 or a1 + OBJECT_GAP < x0 or y1 + OBJECT_GAP < b0 or b1 + OBJECT_GAP < y0
        for a0, b0, a1, b1 in taken
    )


def place_boxes(
    rng: np.random.Generator, shapes: list[str], width: int, height: int
) -> list[tuple[float, float, float, float] | None]:
    """Non-overlapping pixel boxes (x0, y0, x1, y1) for the shapes, or None where none fits."""
    taken: list[tuple[float, float, float, float]] = []
    boxes: list[tuple[float, float, float, float] | None] = []
    short = min(width, height)
    for shape in shapes:
        side = rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) * short
        placed = None
        for _ in range(SHRINK_STEPS):
            w, h = _box_size(shape, side)
            x_room, y_room = width - w - 2 * BORDER_MARGIN, height - h - 2 * BORDER_MARGIN
            for _ in range(PLACEMENT_TRIES if min(x_room, y_room) > 0 else 0):
                x0 = BORDER_MARGIN + rng.uniform(0, x_room)
                y0 = BORDER_MARGIN + rng.uniform(0, y_room)
                if _free((x0, y0, x0 + w, y0 + h), taken):
                    placed = (x0, y0, x0 + w, y0 + h)
                    break
            if placed:
                break
            side *= SHRINK_FACTOR
        if placed:
            taken.append(placed)
        boxes.append(placed)
    return boxes


def _region_specs(
    shape: str, colour: str, box: tuple[float, float, float, float], rng: np.random.Generator
) -> list[tuple[str, str, list[float]]]:
    """(name, colour, polygon) of each region of one object, in painting order."""
    if shape not in COMPOSITES:
        return [(shape, colour, primitive_polygon(shape, box))]
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    regions, colours = [], {}
    for part in COMPOSITES[shape].parts:
        # both wheels of a car (same name and rule) share one colour
        key = (part.name, part.colour_rule)
        colours.setdefault(key, part_colour(part.colour_rule, colour, rng))
        fx0, fy0, fx1, fy1 = part.box
        sub = (x0 + fx0 * w, y0 + fy0 * h, x0 + fx1 * w, y0 + fy1 * h)
        regions.append((part.name, colours[key], primitive_polygon(part.primitive, sub)))
    return regions


def build_objects(
    kinds: list[tuple[str, str]],
    boxes: list,
    height: int,
    width: int,
    rng: np.random.Generator,
) -> list[SceneObject]:
    """Rasterise every region and keep what later regions leave visible."""
    drawn: list[tuple[int, str, str, list[float], np.ndarray]] = []
    placed = [(kind, box) for kind, box in zip(kinds, boxes, strict=True) if box is not None]
    for index, ((shape, colour), box) in enumerate(placed):
        for name, region_colour, polygon in _region_specs(shape, colour, box, rng):
            drawn.append((index, name, region_colour, polygon, rasterize([polygon], height, width)))
    covered = np.zeros((height, width), dtype=bool)
    regions: list[list[Region]] = [[] for _ in placed]
    for index, name, region_colour, polygon, raster in reversed(drawn):
        visible = raster & ~covered
        covered |= raster
        exact = bool(np.array_equal(visible, raster))
        regions[index].insert(0, Region(name, region_colour, [polygon], visible, exact))
    objects = []
    for ((shape, colour), _), object_regions in zip(placed, regions, strict=True):
        mask = np.logical_or.reduce([r.mask for r in object_regions])
        objects.append(SceneObject(shape, colour, object_regions, mask))
    return [obj for obj in objects if obj.mask.any()]


def render(
    rng: np.random.Generator, objects: list[SceneObject], height: int, width: int
) -> np.ndarray:
    """uint8 [H, W, 3]: a background with a linear gradient, the regions, and pixel noise."""
    base = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    # a ramp from -1/2 to 1/2 along each axis, mixed by the angle: a gradient in any direction
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32) * math.cos(angle)
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32) * math.sin(angle)
    ramp = np.rint(base + (2 * BACKGROUND_GRADIENT * (ys[:, None] + xs[None, :]))[..., None])
    image = ramp.astype(np.int16)
    for obj in objects:
        for region in obj.regions:
            image[region.mask] = PALETTE[region.colour]
    # uniform integer noise: as good a texture as Gaussian noise, and far cheaper at 640x480
    image += rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, np.iinfo(np.uint8).max).astype(np.uint8)


def generate_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    num_objects: tuple[int, int] = (2, 5),
    require_composite: bool = False,
) -> Scene:
    """A random scene of `num_objects` (inclusive range) objects, fewer if they do not fit.

    require_composite: the first object (always placed) is a house, car or tree.
    """
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    kinds = sample_kinds(rng, count, require_composite)
    boxes = place_boxes(rng, [shape for shape, _ in kinds], width, height)
    objects = build_objects(kinds, boxes, height, width, rng)
    if not objects:
        raise ValueError(f"no object fits a {width}x{height} image; use a larger --image_size")
    return Scene(render(rng, objects, height, width), objects)
