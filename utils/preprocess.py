"""Image transforms for the vision towers and SAM, with PIL, NumPy and OpenCV (no torchvision).

CLIP: the LLaVA directory's `preprocessor_config.json` (shortest-edge resize, centre crop,
rescale, mean/std) is read and applied exactly as transformers' PIL image processor applies it
(same PIL resampling, same size and crop arithmetic), but without its per-call overhead.
Qwen-VL (`PatchTransform`): the dynamic resolution of Qwen2-VL's image processor, from the
directory's `preprocessor_config.json` (`min_pixels`/`max_pixels` or `size`, patch, merge and
temporal patch sizes): each image resized to multiples of patch x merge pixels within the pixel
budget (`smart_resize`), normalised, and cut into flat patches [P, C * t * p * p] with its grid
(1, h / p, w / p); the number of image tokens follows the grid (`tokens`).
SAM: segment-anything's `ResizeLongestSide` (longest side -> S, `int(side * scale + 0.5)`,
PIL bilinear as the original does through torchvision's PIL path), SAM pixel mean/std on 0-255
RGB, then zero padding right/bottom to S x S after normalising.
SAM 2 (`Sam2Transform`): its `SAM2Transforms`, the whole image to float [0, 1], resized to S x S
(bilinear with antialiasing: what torchvision's tensor `Resize` runs), ImageNet mean/std; no
padding, so the image fills the input and `resized_size` is (S, S).
All take uint8 RGB [H, W, 3] arrays.
"""

from __future__ import annotations

import json
import math
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
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)
# [3, 1, 1], built once: the transform runs per sample in the data loader
SAM2_MEAN = torch.tensor(SAM2_PIXEL_MEAN)[:, None, None]
SAM2_STD = torch.tensor(SAM2_PIXEL_STD)[:, None, None]
# float32 [3, 256]: (value - mean) / std of each channel for every uint8 value, computed with
# the same float32 operations as normalising each pixel, so a lookup gives the same bits
UINT8_VALUES = np.arange(np.iinfo(np.uint8).max + 1, dtype=np.float32)
SAM_LOOKUP = (
    UINT8_VALUES[None, :] - np.asarray(SAM_PIXEL_MEAN, dtype=np.float32)[:, None]
) / np.asarray(SAM_PIXEL_STD, dtype=np.float32)[:, None]
# transformers' defaults when a preprocessor_config.json leaves a key out
DEFAULT_RESAMPLE = Image.Resampling.BICUBIC
DEFAULT_RESCALE = 1 / 255
# Qwen2-VL's image processor: its refusal of extreme aspect ratios, and its type-name prefix
MAX_ASPECT_RATIO = 200
PATCH_PROCESSOR_PREFIX = "Qwen2VLImageProcessor"


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
class Sam2Transform:
    """SAM 2 preprocessing for an S x S image encoder (S = image_size)."""

    image_size: int

    def __call__(self, image: np.ndarray | Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 RGB [H, W, 3] (or an RGB PIL image) -> (float32 [3, S, S], (S, S))."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        if pil.mode != RGB_MODE:
            raise ValueError(f"expected an RGB image, got a PIL {pil.mode} image of {pil.size}")
        pixels = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().div(255)
        side = (self.image_size, self.image_size)
        resized = torch.nn.functional.interpolate(
            pixels[None], side, mode="bilinear", align_corners=False, antialias=True
        )[0]
        return (resized - SAM2_MEAN) / SAM2_STD, side


# the input transform of each mask model (`model.mask_models.MaskModelKind.name`)
MASK_TRANSFORMS = {"sam": SamTransform, "sam2": Sam2Transform}


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's output size: both sides multiples of `factor`, as close to the aspect ratio
    as that allows, with min_pixels <= h * w <= max_pixels (Qwen2-VL `smart_resize`)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"an image of {height}x{width} px has an aspect ratio above {MAX_ASPECT_RATIO}, "
            "which Qwen-VL's image processor refuses"
        )
    resized_h = round(height / factor) * factor
    resized_w = round(width / factor) * factor
    if resized_h * resized_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_h = max(factor, math.floor(height / beta / factor) * factor)
        resized_w = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_h * resized_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_h = math.ceil(height * beta / factor) * factor
        resized_w = math.ceil(width * beta / factor) * factor
    return resized_h, resized_w


@dataclass(frozen=True)
class PatchTransform:
    """Qwen-VL preprocessing (dynamic resolution, module docstring): pixel budget, patch size p,
    merge size m (m x m patches become one image token), temporal patch size t, mean/std."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    resample: Image.Resampling
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_settings(cls, settings: dict, file: Path) -> PatchTransform:
        """From the parsed `preprocessor_config.json` (`file`, named in errors)."""
        size = settings.get("size") or {}
        try:
            min_pixels = settings.get("min_pixels", size.get("shortest_edge"))
            max_pixels = settings.get("max_pixels", size.get("longest_edge"))
            if min_pixels is None or max_pixels is None:
                raise KeyError("min_pixels/max_pixels (or size.shortest_edge/longest_edge)")
            return cls(
                min_pixels=int(min_pixels),
                max_pixels=int(max_pixels),
                patch_size=int(settings["patch_size"]),
                merge_size=int(settings["merge_size"]),
                temporal_patch_size=int(settings["temporal_patch_size"]),
                resample=Image.Resampling(settings.get("resample", DEFAULT_RESAMPLE)),
                rescale=settings.get("rescale_factor", DEFAULT_RESCALE)
                if settings.get("do_rescale", True)
                else 1.0,
                mean=tuple(settings["image_mean"]),
                std=tuple(settings["image_std"]),
            )
        except KeyError as error:
            raise ValueError(f"{file}: a Qwen-VL image processor needs {error}") from error

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the resized image, multiples of patch x merge pixels."""
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor, self.min_pixels, self.max_pixels)

    @property
    def max_tokens(self) -> int:
        """The most image tokens one image can take: max_pixels / (patch x merge)^2."""
        return self.max_pixels // (self.patch_size * self.merge_size) ** 2

    def tokens(self, grid: tuple[int, int, int]) -> int:
        """Image tokens of an image with patch grid (t, h, w): t * h * w / merge^2."""
        return grid[0] * grid[1] * grid[2] // self.merge_size**2

    def __call__(
        self, image: np.ndarray | Image.Image
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """uint8 RGB [H, W, 3] (or an RGB PIL image) -> (float32 patches [P, C * t * p * p], grid
        (1, h / p, w / p)), P = h * w / p^2, patches in Qwen-VL's order (merge blocks of m x m
        patches, row by row; each patch's pixels channel-major, repeated t times)."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        height, width = self.output_size(pil.height, pil.width)
        if (height, width) != (pil.height, pil.width):
            pil = pil.resize((width, height), self.resample)
        pixels = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) * np.float32(self.rescale)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        blocks = pixels.reshape(RGB_CHANNELS, grid_h // m, m, p, grid_w // m, m, p)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, p, p)
        repeated = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        patches = np.ascontiguousarray(repeated).reshape(grid_h * grid_w, RGB_CHANNELS * t * p * p)
        return torch.from_numpy(patches), (1, grid_h, grid_w)


def with_pixel_budget(settings: dict, min_pixels: int | None, max_pixels: int | None) -> dict:
    """Qwen-VL image settings with the pixel budget replaced (`--min_pixels`/`--max_pixels`;
    None keeps that bound), written in the keys the file uses: `min_pixels`/`max_pixels`
    (Qwen2.5-VL) or `size` {shortest_edge, longest_edge} (Qwen3-VL)."""
    updated = dict(settings)
    for key, size_key, value in (
        ("min_pixels", "shortest_edge", min_pixels),
        ("max_pixels", "longest_edge", max_pixels),
    ):
        if value is None:
            continue
        size = updated.get("size")
        if isinstance(size, dict) and size_key in size:
            updated["size"] = {**size, size_key: value}
        if key in updated or not isinstance(size, dict):
            updated[key] = value
    return updated


def write_pixel_budget(
    directory: str | Path, min_pixels: int | None, max_pixels: int | None
) -> None:
    """Rewrite `directory`'s `preprocessor_config.json` with the pixel budget (a merged
    checkpoint keeps the budget it was trained with)."""
    file = Path(directory) / PREPROCESSOR_CONFIG
    settings = with_pixel_budget(json.loads(file.read_text()), min_pixels, max_pixels)
    file.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def max_image_tokens(directory: str | Path, max_pixels: int | None = None) -> int:
    """The most image tokens one image takes with the Qwen-VL image settings of `directory`
    (its pixel budget, or `max_pixels` when given)."""
    file = Path(directory) / PREPROCESSOR_CONFIG
    settings = with_pixel_budget(json.loads(file.read_text()), None, max_pixels)
    return PatchTransform.from_settings(settings, file).max_tokens


def is_patch_processor(settings: dict) -> bool:
    """Whether a `preprocessor_config.json` describes a Qwen-VL (patch) image processor."""
    return settings.get("image_processor_type", "").startswith(PATCH_PROCESSOR_PREFIX)


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the model reads it.

    vision: the vision tower's input, float32 [3, h, w] (CLIP) or [P, D] patches (Qwen-VL).
    grid: the patch grid (t, h, w) of a patch transform, None for CLIP.
    tokens: the image tokens it takes in a conversation, None for CLIP (the model's fixed
        count, `model.backbone.image_token_count`).
    sam: float32 [3, S, S]; resized_size: (h', w') of the image inside the SAM input.
    """

    vision: torch.Tensor
    grid: tuple[int, int, int] | None
    tokens: int | None
    sam: torch.Tensor
    resized_size: tuple[int, int]


@dataclass(frozen=True)
class ImageProcessors:
    """Both transforms, built once per run and shared by the datasets (picklable for workers)."""

    clip: ClipTransform | PatchTransform
    sam: SamTransform | Sam2Transform

    @classmethod
    def from_pretrained(
        cls,
        llava_directory: str | Path,
        sam_image_size: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        mask_model: str = "sam",
    ) -> ImageProcessors:
        """Vision settings from the model directory (CLIP, or Qwen-VL's patches with the pixel
        budget `min_pixels`/`max_pixels` when given); the mask model's input transform
        (`MASK_TRANSFORMS`) at the input size of its config."""
        file = Path(llava_directory) / PREPROCESSOR_CONFIG
        mask_transform = MASK_TRANSFORMS[mask_model](sam_image_size)
        if file.is_file() and is_patch_processor(settings := json.loads(file.read_text())):
            budget = with_pixel_budget(settings, min_pixels, max_pixels)
            return cls(PatchTransform.from_settings(budget, file), mask_transform)
        if (min_pixels, max_pixels) != (None, None):
            raise ValueError(
                f"--min_pixels/--max_pixels set the image budget of Qwen-VL backbones; "
                f"{llava_directory} has CLIP's fixed-size images"
            )
        return cls(ClipTransform.from_pretrained(llava_directory), mask_transform)

    @property
    def max_tokens(self) -> int | None:
        """The most image tokens one image can take with a patch transform; None for CLIP."""
        return self.clip.max_tokens if isinstance(self.clip, PatchTransform) else None

    def __call__(self, image: np.ndarray) -> ProcessedImage:
        """uint8 RGB [H, W, 3] -> the image's vision and SAM inputs (`ProcessedImage`)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != RGB_CHANNELS:
            raise ValueError(
                f"expected a uint8 RGB [H, W, 3] image, got {image.dtype} {image.shape}"
            )
        pil = Image.fromarray(image)  # shared by both resizes
        sam_pixels, resized_size = self.sam(pil)
        if isinstance(self.clip, PatchTransform):
            patches, grid = self.clip(pil)
            return ProcessedImage(patches, grid, self.clip.tokens(grid), sam_pixels, resized_size)
        return ProcessedImage(self.clip(pil), None, None, sam_pixels, resized_size)
