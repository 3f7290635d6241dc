"""LaSagnA's extra training layouts (`utils.datasets.lasagna_sem_seg`), beside the LISA ones:

- Mapillary v1.2 training labels, as the v2.0 download carries them: `mapillary/config_v1.2.json`
  and `training/v1.2/labels/<key>.png` (palette PNGs, pixel = v1.2 label index: the kinds at
  MAPILLARY_V12_INDEX, "Unlabeled" in the background) for the same images (`training/images/`,
  the same scenes and keys as the `mapillary` family writes, written again identically).
- Cityscapes train: `cityscapes/leftImg8bit/train/<city>/*_leftImg8bit.png` +
  `gtFine/train/<city>/*_gtFine_labelIds.png` and `gtFine/cityscapes_panoptic_val.json` (labelIds
  as the validation split: road in the background, ego vehicle on the frame, the triangle as
  parking, a labelId of no evaluated class).
"""

from __future__ import annotations

from tools.tiny_assets.common import Context, write_json, write_png
from tools.tiny_assets.semantic_val import (
    CITYSCAPES_SEQUENCE,
    cityscapes_label,
    cityscapes_panoptic_json,
    write_mapillary_v12,
    write_rgb_png,
)

CITYSCAPES_TRAIN_CITY = "aachen"


def write_cityscapes_train(ctx: Context) -> None:
    base = ctx.root / "cityscapes"
    write_json(base / "gtFine" / "cityscapes_panoptic_val.json", cityscapes_panoptic_json())
    city = f"train/{CITYSCAPES_TRAIN_CITY}"
    for index, scene in enumerate(ctx.scenes("cityscapes train", ctx.options.images_per_split)):
        stem = f"{CITYSCAPES_TRAIN_CITY}_{CITYSCAPES_SEQUENCE}_{index:06d}"
        write_rgb_png(base / "leftImg8bit" / city / f"{stem}_leftImg8bit.png", scene.image)
        write_png(base / "gtFine" / city / f"{stem}_gtFine_labelIds.png", cityscapes_label(scene))


def write_lasagna_train(ctx: Context) -> None:
    """Both of LaSagnA's extra training layouts."""
    write_mapillary_v12(ctx, "training", "mapillary", "mapillary keys")
    write_cityscapes_train(ctx)
