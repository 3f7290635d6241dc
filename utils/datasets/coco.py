"""COCO-format segmentations -> binary masks, for every source that stores them: the part
datasets (PACO-LVIS, PASCAL-Part), the referring datasets' `instances.json` and MMR.

A segmentation is a list of polygons (each a flat list `[x0, y0, x1, y1, ...]`), one RLE dict
`{size: [H, W], counts}` (uncompressed: counts a list; compressed: a str or bytes), or a list of
RLE dicts. Its components are summed, then binarised; RLE sizes must equal the image's (H, W).

Policy for degenerate polygon parts (fewer than 3 points, or an odd number of coordinates):
each is left out of the mask, as users of the COCO tools do (LISA keeps parts with >= 6
coordinates), and `check_segmentation` reports it as a warning (`DataError(fatal=False)`). An
annotation with no usable part left is an error: decoding raises DataError and the check reports
it. Anything else malformed (non-numeric coordinates, an RLE without size or counts, an RLE
size that differs from the image's) is an error too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from utils.datasets.base import DataError

MIN_POLYGON_COORDS = 6  # three (x, y) points enclose an area
RLE_KEYS = ("size", "counts")
SIZE_LENGTH = 2  # an RLE size is [H, W]
NOT_A_SEGMENTATION = (
    "segmentation is neither a non-empty polygon list nor an RLE {size, counts} (or a list of them)"
)


@dataclass
class ParsedSegmentation:
    """A segmentation split into the `parts` to decode (polygons or RLE dicts), the problems
    that make it unusable (`errors`) and the polygon parts left out of the mask (`dropped`)."""

    parts: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _degenerate(index: int, polygon: list) -> str | None:
    """Why polygon part `index` encloses no area (it is then left out), or None."""
    if len(polygon) < MIN_POLYGON_COORDS:
        return (
            f"polygon {index} has {len(polygon) // 2} points; at least 3 are needed "
            f"({len(polygon)} coordinates)"
        )
    if len(polygon) % 2:
        return f"polygon {index} has an odd number of coordinates ({len(polygon)})"
    return None


def _parse_polygons(polygons: list) -> ParsedSegmentation:
    parsed = ParsedSegmentation()
    for index, polygon in enumerate(polygons):
        if not all(_is_number(value) for value in polygon):
            parsed.errors.append(f"polygon {index} is not a list of numbers")
        elif problem := _degenerate(index, polygon):
            parsed.dropped.append(problem)
        else:
            parsed.parts.append(polygon)
    if not parsed.errors and not parsed.parts:
        parsed.errors.append("; ".join(parsed.dropped) + "; no usable polygon is left")
        parsed.dropped = []
    return parsed


def _rle_problem(rle: dict, shape: tuple[int, int] | None) -> str | None:
    """What is wrong with one RLE dict for an image of `shape` (H, W; None: unknown), or None."""
    if not all(key in rle for key in RLE_KEYS):
        return "RLE lacks 'size' or 'counts'"
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or len(size) != SIZE_LENGTH:
        return f"RLE size {size!r} is not [H, W]"
    if not isinstance(rle["counts"], (list, str, bytes)):
        return "RLE counts is neither a list nor a string"
    if shape is not None and list(size) != list(shape):
        return f"RLE size {list(size)} differs from the image's {list(shape)} (H, W)"
    return None


def _parse_rles(rles: list[dict], shape: tuple[int, int] | None) -> ParsedSegmentation:
    problems = [_rle_problem(rle, shape) for rle in rles]
    return ParsedSegmentation(parts=rles, errors=[p for p in problems if p is not None])


def parse_segmentation(segmentation: object, shape: tuple[int, int] | None) -> ParsedSegmentation:
    """The usable parts of a COCO segmentation for an image of `shape` (H, W; None when not
    known yet: RLE sizes are then not compared) and its problems (see the module policy)."""
    parts = [segmentation] if isinstance(segmentation, dict) else segmentation
    if not isinstance(parts, list) or not parts:
        return ParsedSegmentation(errors=[NOT_A_SEGMENTATION])
    if all(isinstance(part, list) for part in parts):
        return _parse_polygons(parts)
    if all(isinstance(part, dict) for part in parts):
        return _parse_rles(parts, shape)
    return ParsedSegmentation(errors=[NOT_A_SEGMENTATION])


def _rle(part: list | dict, height: int, width: int) -> dict:
    """One polygon or RLE part as a compressed RLE (json stores compressed counts as str)."""
    if isinstance(part, list):
        return mask_utils.frPyObjects([part], height, width)[0]
    counts = part["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(part, height, width)
    return {
        "size": [height, width],
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }


def decode_segmentation(
    segmentation: object, shape: tuple[int, int], file: str | Path, record: object
) -> np.ndarray:
    """uint8 [H, W] in {0, 1}: the union of the segmentation's usable parts; degenerate polygon
    parts are left out. DataError (naming `file` and `record`) if nothing usable is left, an RLE
    size differs from `shape` (H, W), or the segmentation is malformed."""
    parsed = parse_segmentation(segmentation, shape)
    if parsed.errors:
        raise DataError(file, record, "; ".join(parsed.errors))
    height, width = shape
    try:
        rles = [_rle(part, height, width) for part in parsed.parts]
        # the union is taken on the run-length encodings: one decode per segmentation
        union = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
        decoded = mask_utils.decode(union)
    # pycocotools raises bare Exceptions for malformed input (e.g. counts that are not RLE)
    except Exception as error:
        raise DataError(file, record, f"segmentation cannot be decoded: {error}") from error
    # pycocotools decodes column-major; OpenCV's transpose gives row-major ten times faster
    # than NumPy's copy, and row-major masks stack and slice without strided copies later
    return cv2.transpose(decoded.T)


def check_segmentation(
    segmentation: object,
    shape: tuple[int, int] | None,
    file: str | Path,
    record: object,
    deep: bool = False,
) -> list[DataError]:
    """A source check's findings about one segmentation: its errors, a warning per polygon part
    left out of the mask, and (`deep`, size known, no error yet) a failure to decode."""
    parsed = parse_segmentation(segmentation, shape)
    findings = [DataError(file, record, problem) for problem in parsed.errors]
    findings += [
        DataError(file, record, f"{problem}; left out of the mask", fatal=False)
        for problem in parsed.dropped
    ]
    if deep and shape is not None and not parsed.errors:
        try:
            decode_segmentation(segmentation, shape, file, record)
        except DataError as error:
            findings.append(error)
    return findings
