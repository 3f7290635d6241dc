"""Shared pieces of the tiny-asset writers: options, seeded scene pools, deterministic file
writers (fixed JPEG quality, sorted JSON, fixed pickle protocol) and COCO annotation records.

Every family draws from its own random stream, seeded from (seed, stream name), so adding or
resizing one family never changes the bytes another family writes.
"""

from __future__ import annotations

import json
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from tools.tiny_assets.shapes_world import Region, Scene, SceneObject, generate_scene

JPEG_QUALITY = 95
PICKLE_PROTOCOL = 4


@dataclass(frozen=True)
class AssetOptions:
    """What to write: image size (W x H, each image shrunk by up to `size_jitter` of it),
    images per split (or per source), objects per scene (inclusive range), and gRefCOCO
    no-target refs per image (`absent_refs`, each naming a different absent shape)."""

    width: int = 96
    height: int = 72
    images_per_split: int = 8
    min_objects: int = 2
    max_objects: int = 5
    size_jitter: float = 0.0
    absent_refs: int = 1


@dataclass(frozen=True)
class Context:
    """Where a writer writes (`root` = the dataset directory), with what options and seed."""

    root: Path
    options: AssetOptions
    seed: int

    def rng(self, stream: str) -> np.random.Generator:
        """A generator of its own for each named stream (crc32 is stable across runs)."""
        return np.random.default_rng([self.seed, zlib.crc32(stream.encode())])

    def scenes(self, stream: str, count: int, composite_every: int = 0) -> list[Scene]:
        """`count` scenes of a pool; every `composite_every`-th one (from the first; 0: none)
        is sure to hold a house, car or tree."""
        rng, options = self.rng(stream), self.options
        scenes = []
        for index in range(count):
            shrink = 1.0 - rng.uniform(0.0, options.size_jitter, size=2)
            width, height = (np.array([options.width, options.height]) * shrink).astype(int)
            composite = composite_every > 0 and index % composite_every == 0
            objects = (options.min_objects, options.max_objects)
            scenes.append(generate_scene(rng, int(width), int(height), objects, composite))
        return scenes


JPEG_PARAMS = [
    cv2.IMWRITE_JPEG_QUALITY,
    JPEG_QUALITY,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
]


def write_jpeg(path: Path, image: np.ndarray) -> None:
    """Write uint8 RGB [H, W, 3] as JPEG (fixed quality, no chroma subsampling: colours stay
    true at the edges of small shapes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), JPEG_PARAMS):
        raise OSError(f"could not write {path}")


def jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> the same image as `write_jpeg` then reading it back gives."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), JPEG_PARAMS)
    if not ok:
        raise OSError("could not encode a JPEG")
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a single-channel uint8 array [H, W] as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def write_palette_png(path: Path, array: np.ndarray, colours: list[list[int]]) -> None:
    """Write a uint8 index array [H, W] as a palette ("P" mode) PNG whose entry i is
    `colours[i]` (RGB), as Mapillary Vistas stores its labels: the pixel values are the indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    image.putpalette([channel for colour in colours for channel in colour])
    image.save(path, format="PNG")


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def write_pickle(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data, protocol=PICKLE_PROTOCOL))


def compressed_rle(mask: np.ndarray) -> dict:
    """{"size": [H, W], "counts": str}: pycocotools' compressed RLE of a bool mask [H, W]."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """{"size": [H, W], "counts": [int]}: COCO's plain RLE (column-major runs, zeros first)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def bbox_xywh(mask: np.ndarray) -> list[float]:
    """COCO box [x, y, w, h] of a bool mask [H, W] (as pycocotools computes it)."""
    box = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
    return [float(v) for v in box]


def segmentation(region: SceneObject | Region, as_polygons: bool, rle: str = "compressed"):
    """COCO segmentation of an object or part: its polygons when `as_polygons` and they still
    rasterise to its visible mask, otherwise that mask as RLE ("compressed": string counts,
    "uncompressed": a list of run lengths)."""
    if as_polygons and region.polygons_exact:
        return region.polygons
    if rle == "uncompressed":
        return uncompressed_rle(region.mask)
    return compressed_rle(region.mask)


def coco_annotation(
    ann_id: int,
    image_id: int,
    category_id: int,
    region: SceneObject | Region,
    as_polygons: bool = True,
    rle: str = "compressed",
) -> dict:
    """A COCO `annotations` record of an object or a part (see `segmentation`)."""
    return annotation_record(
        ann_id, image_id, category_id, segmentation(region, as_polygons, rle), region.mask
    )


def annotation_record(
    ann_id: int,
    image_id: int,
    category_id: int,
    segmentation: list | dict,
    mask: np.ndarray,
    iscrowd: int = 0,
) -> dict:
    """A COCO `annotations` record; area and bbox from the bool mask [H, W] it decodes to."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": int(mask.sum()),
        "bbox": bbox_xywh(mask),
        "iscrowd": iscrowd,
    }


def coco_image(image_id: int, file_name: str, scene: Scene) -> dict:
    height, width = scene.size
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def split_of(index: int, per_split: int, splits: tuple[str, ...]) -> str:
    """The split of the index-th image of a pool holding `per_split` images per split (the
    last split takes any remainder)."""
    return splits[min(index // max(per_split, 1), len(splits) - 1)]
