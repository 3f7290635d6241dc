"""COCO segmentation decoding (`utils.datasets.coco`): every stored form gives the expected binary
mask, and the one policy: degenerate polygon parts are left out and reported as warnings, an
annotation with no usable part or a wrongly sized RLE is an error."""

from __future__ import annotations

import numpy as np
import pytest

from tests.utils import fixtures_sem as fx
from utils.datasets.base import DataError
from utils.datasets.coco import check_segmentation, decode_segmentation

SHAPE = (fx.H, fx.W)
FILE, RECORD = "instances.json", "annotation 7"
BOX = fx.rectangle(2, 8, 3, 12)
OTHER = fx.rectangle(6, 20, 10, 30)  # overlaps BOX
TWO_POINTS = [1, 1, 5, 1]
ODD = [1, 1, 5, 1, 5, 5, 1]


def decode(segmentation: object) -> np.ndarray:
    return decode_segmentation(segmentation, SHAPE, FILE, RECORD)


def bytes_rle(mask: np.ndarray) -> dict:
    rle = fx.compressed_rle(mask)
    return {**rle, "counts": rle["counts"].encode()}


@pytest.mark.parametrize(
    ("segmentation", "expected"),
    [
        (fx.polygon(2, 8, 3, 12), BOX),
        (fx.polygon(2, 8, 3, 12) + fx.polygon(6, 20, 10, 30), BOX | OTHER),
        (fx.uncompressed_rle(BOX), BOX),
        (fx.compressed_rle(BOX), BOX),
        (bytes_rle(BOX), BOX),
        ([fx.compressed_rle(BOX), fx.uncompressed_rle(OTHER)], BOX | OTHER),
    ],
    ids=["polygon", "polygons", "uncompressed", "compressed-str", "compressed-bytes", "rle-list"],
)
def test_every_form_decodes_to_a_binary_mask(segmentation: object, expected: np.ndarray) -> None:
    mask = decode(segmentation)
    assert mask.dtype == np.uint8 and mask.shape == SHAPE
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))  # overlaps stay 1, not 2
    assert check_segmentation(segmentation, SHAPE, FILE, RECORD, deep=True) == []


@pytest.mark.parametrize(
    ("part", "problem"),
    [
        (TWO_POINTS, "polygon 1 has 2 points; at least 3 are needed (4 coordinates)"),
        (ODD, "polygon 1 has an odd number of coordinates (7)"),
        ([], "polygon 1 has 0 points"),
    ],
)
def test_degenerate_part_is_left_out_and_warned(part: list, problem: str) -> None:
    segmentation = [*fx.polygon(2, 8, 3, 12), part]
    np.testing.assert_array_equal(decode(segmentation), BOX.astype(np.uint8))
    (finding,) = check_segmentation(segmentation, SHAPE, FILE, RECORD)
    assert not finding.fatal
    assert f"{FILE}, record {RECORD}: {problem}" in str(finding)
    assert "left out of the mask" in str(finding)


def test_no_usable_part_is_an_error() -> None:
    segmentation = [TWO_POINTS, ODD]
    with pytest.raises(DataError, match="polygon 0 has 2 points.*no usable polygon") as error:
        decode(segmentation)
    assert error.value.fatal and error.value.record == RECORD
    (finding,) = check_segmentation(segmentation, SHAPE, FILE, RECORD)
    assert finding.fatal and "polygon 1 has an odd number" in str(finding)


def test_rle_size_must_match_the_image() -> None:
    segmentation = {**fx.compressed_rle(BOX), "size": [fx.H + 1, fx.W]}
    message = rf"RLE size \[{fx.H + 1}, {fx.W}\] differs from the image's \[{fx.H}, {fx.W}\]"
    with pytest.raises(DataError, match=message):
        decode(segmentation)
    (finding,) = check_segmentation(segmentation, SHAPE, FILE, RECORD)
    assert finding.fatal
    assert check_segmentation(segmentation, None, FILE, RECORD) == []  # size not known yet


@pytest.mark.parametrize(
    ("segmentation", "problem"),
    [
        ([[1, 1, "a", 4, 4, 4]], "polygon 0 is not a list of numbers"),
        ([[1, 1, True, 4, 4, 4]], "polygon 0 is not a list of numbers"),
        ({"size": list(SHAPE)}, "RLE lacks 'size' or 'counts'"),
        ({"size": list(SHAPE), "counts": 3}, "neither a list nor a string"),
        ({"size": fx.H, "counts": "abc"}, "is not [H, W]"),
        ([], "neither a non-empty polygon list nor an RLE"),
        ("polygon", "neither a non-empty polygon list nor an RLE"),
        ([fx.polygon(2, 8, 3, 12)[0], fx.compressed_rle(BOX)], "neither a non-empty polygon"),
    ],
)
def test_malformed_segmentations_are_errors(segmentation: object, problem: str) -> None:
    with pytest.raises(DataError) as error:
        decode(segmentation)
    assert problem in str(error.value)
    (finding,) = check_segmentation(segmentation, SHAPE, FILE, RECORD)
    assert finding.fatal and problem in str(finding)


def test_deep_check_finds_undecodable_counts() -> None:
    segmentation = {"size": list(SHAPE), "counts": "abc"}
    assert check_segmentation(segmentation, SHAPE, FILE, RECORD) == []
    (finding,) = check_segmentation(segmentation, SHAPE, FILE, RECORD, deep=True)
    assert finding.fatal and "cannot be decoded" in str(finding)
