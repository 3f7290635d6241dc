"""Image transforms for CLIP and SAM, with PIL, NumPy and OpenCV (no torchvision).

CLIP: the LLaVA directory's `preprocessor_config.json` (shortest-edge resize, centre crop,
rescale, mean/std) is read and applied exactly as transformers' PIL image processor applies it
(same PIL resampling, same size and crop arithmetic), but without its per-call overhead.
SAM: segment-anything's `ResizeLongestSide` (longest side -> S, `int(side * scale + 0.5)`,
PIL bilinear as the original does through torchvision's PIL path), SAM pixel mean/std on 0-255
RGB, then zero padding right/bottom to S x S after normalising.
Both take uint8 RGB [H, W, 3] arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

PREPROCESSOR_CONFIG = "preprocessor_config.json"
RGB_CHANNELS, RGB_MODE = 3, "RGB"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# float32 [3, 256]: (value - mean) / std of each channel for every uint8 value, computed with
# the same float32 operations as normalising each pixel, so a lookup gives the same bits
UINT8_VALUES = np.arange(np.iinfo(np.uint8).max + 1, dtype=np.float32)
SAM_LOOKUP = (
    UINT8_VALUES[None, :] - np.asarray(SAM_PIXEL_MEAN, dtype=np.float32)[:, None]
) / np.asarray(SAM_PIXEL_STD, dtype=np.float32)[:, None]
# transformers' defaults when a preprocessor_config.json leaves a key out
DEFAULT_RESAMPLE = Image.Resampling.BICUBIC
DEFAULT_RESCALE = 1 / 255


def _resize_setting(size: int | dict[str, int], file: Path) -> dict[str, int]:
    """`size` as a dict: an int (old files) means the shortest edge."""
    if isinstance(size, int):
        return {"shortest_edge": size}
    if "shortest_edge" in size or {"height", "width"} <= size.keys():
        return size
    raise ValueError(f"{file}: size = {size} is not supported (shortest_edge or height+width)")


def _crop_setting(crop_size: int | dict[str, int]) -> tuple[int, int]:
    """`crop_size` as (height, width): an int (old files) means a square."""
    if isinstance(crop_size, int):
        return crop_size, crop_size
    return crop_size["height"], crop_size["width"]


@dataclass(frozen=True)
class ClipTransform:
    """CLIP preprocessing. resize: {"shortest_edge": s} or {"height": h, "width": w}, or None;
    crop: (height, width) or None; mean/std per channel after rescaling."""

    resize: dict[str, int] | None
    resample: Image.Resampling
    crop: tuple[int, int] | None
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ClipTransform:
        """Read `preprocessor_config.json` of a LLaVA (or CLIP) directory."""
        file = Path(directory) / PREPROCESSOR_CONFIG
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the CLIP image settings (size, crop, mean, std) are read "
                "from the model directory"
            )
        settings = json.loads(file.read_text())
        resize = crop = None
        if settings.get("do_resize", True):
            resize = _resize_setting(settings["size"], file)
        if settings.get("do_center_crop", True):
            crop = _crop_setting(settings["crop_size"])
        do_normalize = settings.get("do_normalize", True)
        return cls(
            resize=resize,
            resample=Image.Resampling(settings.get("resample", DEFAULT_RESAMPLE)),
            crop=crop,
            rescale=settings.get("rescale_factor", DEFAULT_RESCALE)
            if settings.get("do_rescale", True)
            else 1.0,
            mean=tuple(settings["image_mean"]) if do_normalize else (0.0,) * RGB_CHANNELS,
            std=tuple(settings["image_std"]) if do_normalize else (1.0,) * RGB_CHANNELS,
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after resizing, as transformers computes it (long side truncated)."""
        if self.resize is None:
            return height, width
        if "shortest_edge" not in self.resize:
            return self.resize["height"], self.resize["width"]
        short_target = self.resize["shortest_edge"]
        if height <= width:
            return short_target, int(short_target * width / height)
        return int(short_target * height / width), short_target

    def resize_and_crop(
        self, image: np.ndarray | Image.Image, resample: Image.Resampling | None = None
    ) -> np.ndarray:
        """uint8 [H, W(, 3)] (or the same as a PIL image) -> uint8 [h, w(, 3)]: the resize and
        centre crop of `__call__` (`resample`: another filter, e.g. NEAREST for label maps)."""
        size = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
        height, width = self.output_size(*size)
        if (height, width) != size:
            filter_ = self.resample if resample is None else resample
            pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
            image = pil.resize((width, height), filter_)
        image = np.asarray(image)
        if self.crop is not None:
            crop_h, crop_w = self.crop
            if crop_h > height or crop_w > width:
                raise ValueError(
                    f"image of {height}x{width} px is smaller than the crop {self.crop}"
                )
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            image = image[top : top + crop_h, left : left + crop_w]
        return image

    def __call__(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        """uint8 RGB [H, W, 3] (or an RGB PIL image) -> float32 [3, h, w] (h, w = crop size
        when cropping)."""
        image = self.resize_and_crop(image)
        scale = np.float32(self.rescale) / np.asarray(self.std, dtype=np.float32)
        shift = np.asarray(self.mean, dtype=np.float32) / np.asarray(self.std, dtype=np.float32)
        pixels = np.empty((RGB_CHANNELS, *image.shape[:2]), dtype=np.float32)
        for channel in range(RGB_CHANNELS):  # channel planes: no strided transpose copy
            np.multiply(image[..., channel], scale[channel], out=pixels[channel], dtype=np.float32)
            pixels[channel] -= shift[channel]
        return torch.from_numpy(pixels)


def resize_longest_side(height: int, width: int, target: int) -> tuple[int, int]:
    """segment-anything's `get_preprocess_shape`: (h', w') with the longest side = target."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class SamTransform:
    """SAM preprocessing for an S x S image encoder (S = image_size)."""

    image_size: int

    def __call__(self, image: np.ndarray | Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 RGB [H, W, 3] (or an RGB PIL image) -> (float32 [3, S, S], (h', w') of the
        image inside the input)."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        if pil.mode != RGB_MODE:  # every channel of the output must be written below
            raise ValueError(f"expected an RGB image, got a PIL {pil.mode} image of {pil.size}")
        height, width = resize_longest_side(pil.height, pil.width, self.image_size)
        resized = pil.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.empty((RGB_CHANNELS, self.image_size, self.image_size), dtype=np.float32)
        pixels[:, height:] = 0
        pixels[:, :height, width:] = 0
        # each channel normalised by a table lookup written straight into the padded array,
        # from PIL's own channel planes (no strided transpose, no zeroing of what is then
        # overwritten): this runs once per sample at 1024 px
        for channel, band in enumerate(resized.split()):
            inside = pixels[channel, :height, :width]
            written = cv2.LUT(np.asarray(band), SAM_LOOKUP[channel], dst=inside)
            if not np.shares_memory(written, inside):  # OpenCV allocated instead of writing
                inside[...] = written
        return torch.from_numpy(pixels), (height, width)


@dataclass(frozen=True)
class ImageProcessors:
    """Both transforms, built once per run and shared by the datasets (picklable for workers)."""

    clip: ClipTransform
    sam: SamTransform

    @classmethod
    def from_pretrained(cls, llava_directory: str | Path, sam_image_size: int) -> ImageProcessors:
        """CLIP settings from the LLaVA directory; SAM input size from the SAM config."""
        return cls(ClipTransform.from_pretrained(llava_directory), SamTransform(sam_image_size))

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """uint8 RGB [H, W, 3] -> (clip [3, h, w], sam [3, S, S], (h', w'))."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != RGB_CHANNELS:
            raise ValueError(
                f"expected a uint8 RGB [H, W, 3] image, got {image.dtype} {image.shape}"
            )
        pil = Image.fromarray(image)  # shared by both resizes
        sam_pixels, resized_size = self.sam(pil)
        return self.clip(pil), sam_pixels, resized_size
