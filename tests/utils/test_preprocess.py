"""CLIP and SAM transforms: equal to transformers' CLIP processor and to SAM's ResizeLongestSide."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from model.tiny import CLIP_MEAN, CLIP_STD, TINY_VISION, tiny_model_config
from utils.preprocess import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    ClipTransform,
    ImageProcessors,
    Sam2Transform,
    SamTransform,
    resize_longest_side,
)

CLIP_TOLERANCE = 1e-2
REAL_CLIP_SIZE = 224
# (H, W): landscape, portrait, square, and smaller than the CLIP input (upscaled)
IMAGE_SIZES = [(300, 451), (427, 640), (224, 224), (17, 29), (640, 180)]


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def hf_pixels(processor, image: np.ndarray) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_clip_equals_the_tiny_directory_processor(tiny_dir, size: tuple[int, int]) -> None:
    directory = tiny_model_config(tiny_dir).version
    ours = ClipTransform.from_pretrained(directory)(random_image(*size))
    theirs = hf_pixels(AutoImageProcessor.from_pretrained(directory), random_image(*size))
    tiny_size = TINY_VISION["image_size"]
    assert ours.shape == (3, tiny_size, tiny_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=CLIP_TOLERANCE, rtol=0)


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_clip_equals_the_real_clip_settings(tmp_path, size: tuple[int, int]) -> None:
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": REAL_CLIP_SIZE},
        crop_size={"height": REAL_CLIP_SIZE, "width": REAL_CLIP_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor.save_pretrained(tmp_path)
    ours = ClipTransform.from_pretrained(tmp_path)(random_image(*size, seed=1))
    assert ours.shape == (3, REAL_CLIP_SIZE, REAL_CLIP_SIZE)
    torch.testing.assert_close(
        ours, hf_pixels(processor, random_image(*size, seed=1)), atol=CLIP_TOLERANCE, rtol=0
    )


def test_clip_reads_the_legacy_openai_file(tmp_path) -> None:
    """openai/clip-vit-large-patch14 (what LISA loads) writes `size` and `crop_size` as ints."""
    settings = {
        "crop_size": REAL_CLIP_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
        "size": REAL_CLIP_SIZE,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    image = random_image(300, 451, seed=3)
    ours = ClipTransform.from_pretrained(tmp_path)(image)
    theirs = hf_pixels(AutoImageProcessor.from_pretrained(tmp_path), image)
    torch.testing.assert_close(ours, theirs, atol=CLIP_TOLERANCE, rtol=0)


def test_clip_settings_come_from_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ClipTransform.from_pretrained(tmp_path)
    CLIPImageProcessorPil(
        size={"shortest_edge": 48}, crop_size={"height": 40, "width": 44}
    ).save_pretrained(tmp_path)
    transform = ClipTransform.from_pretrained(tmp_path)
    assert transform.crop == (40, 44) and transform.resize == {"shortest_edge": 48}
    assert transform(random_image(60, 100)).shape == (3, 40, 44)


@pytest.mark.parametrize(
    ("size", "target", "expected"),
    [
        ((480, 640), 1024, (768, 1024)),
        ((640, 427), 1024, (1024, 683)),  # 427 * 1.6 = 683.2
        ((333, 500), 1024, (682, 1024)),  # 333 * 2.048 = 681.98 rounds up
        ((40, 56), 64, (46, 64)),  # 40 * 64 / 56 = 45.71
        ((48, 30), 64, (64, 40)),
        ((1, 1000), 1024, (1, 1024)),
        ((64, 64), 64, (64, 64)),
    ],
)
def test_sam_resize_longest_side_sizes(size, target, expected) -> None:
    assert resize_longest_side(*size, target) == expected
    pixels, resized = SamTransform(target)(random_image(*size))
    assert resized == expected and pixels.shape == (3, target, target)


def test_sam_pixels_equal_segment_anything_preprocessing() -> None:
    """Reference: PIL bilinear resize, (x - mean) / std on 0-255 RGB, then zero padding."""
    target, image = 64, random_image(40, 56, seed=2)
    pixels, (height, width) = SamTransform(target)(image)
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    reference = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float()
    mean, std = (
        torch.tensor(SAM_PIXEL_MEAN)[:, None, None],
        torch.tensor(SAM_PIXEL_STD)[:, None, None],
    )
    reference = F.pad((reference - mean) / std, (0, target - width, 0, target - height))
    torch.testing.assert_close(pixels, reference)
    assert (pixels[:, height:] == 0).all() and (pixels[:, :, width:] == 0).all()


@pytest.mark.parametrize("size", [(768, 1024), (1024, 683), (40, 56), (48, 30), (1, 70)])
def test_sam_pixels_are_bit_equal_to_normalising_each_pixel(size) -> None:
    """The lookup-table normalisation gives exactly float32 (x - mean) / std per pixel."""
    target, image = max(*size, 64), random_image(*size, seed=3)
    pixels, (height, width) = SamTransform(target)(image)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    mean = np.asarray(SAM_PIXEL_MEAN, dtype=np.float32)
    std = np.asarray(SAM_PIXEL_STD, dtype=np.float32)
    expected = np.zeros((3, target, target), np.float32)
    expected[:, :height, :width] = ((resized.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    np.testing.assert_array_equal(pixels.numpy(), expected)


def test_sam_refuses_an_image_that_is_not_rgb() -> None:
    with pytest.raises(ValueError, match="expected an RGB image, got a PIL L image"):
        SamTransform(64)(random_image(40, 56)[..., 0])
    with pytest.raises(ValueError, match="got a PIL RGBA image"):
        SamTransform(64)(Image.fromarray(random_image(40, 56)).convert("RGBA"))


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_clip_pixels_are_bit_equal_to_rescaling_each_pixel(size) -> None:
    clip = ClipTransform(
        resize={"shortest_edge": REAL_CLIP_SIZE},
        resample=Image.Resampling.BICUBIC,
        crop=(REAL_CLIP_SIZE, REAL_CLIP_SIZE),
        rescale=1 / 255,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )
    image = random_image(*size, seed=4)
    cropped = clip.resize_and_crop(image)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    scale, shift = np.float32(1 / 255) / std, np.asarray(CLIP_MEAN, dtype=np.float32) / std
    expected = (cropped.astype(np.float32) * scale - shift).transpose(2, 0, 1)
    np.testing.assert_array_equal(clip(image).numpy(), expected)
    np.testing.assert_array_equal(clip(Image.fromarray(image)).numpy(), expected)


def test_image_processors_run_both_transforms(tiny_dir) -> None:
    processors = ImageProcessors.from_pretrained(tiny_model_config(tiny_dir).version, 64)
    image = processors(random_image(48, 30))
    assert image.vision.shape == (3, TINY_VISION["image_size"], TINY_VISION["image_size"])
    assert image.sam.shape == (3, 64, 64) and image.resized_size == (64, 40)
    assert image.grid is None and image.tokens is None
    with pytest.raises(ValueError, match="uint8 RGB"):
        processors(random_image(48, 30).astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        processors(random_image(48, 30)[..., 0])


def test_label_maps_follow_the_clip_geometry_without_new_values(tiny_dir) -> None:
    """resize_and_crop with NEAREST: a label map lands where the image's pixels land (here a
    labelled left half) and keeps only its own values."""
    transform = ClipTransform.from_pretrained(tiny_dir / "llava_tiny")
    labels = np.zeros((72, 96), dtype=np.uint8)
    labels[:, :48] = 7  # the left half
    out = transform.resize_and_crop(labels, Image.Resampling.NEAREST)
    crop_h, crop_w = transform.crop
    assert out.shape == (crop_h, crop_w) and set(np.unique(out)) == {0, 7}
    image = np.zeros((72, 96, 3), dtype=np.uint8)
    image[:, :48] = 255
    bright = transform.resize_and_crop(image)[..., 0] > 127
    assert np.array_equal(out == 7, bright)


def test_sam2_pixels_follow_sam2_transforms() -> None:
    """SAM2Transforms: [0, 1] pixels, ImageNet mean/std, the whole image at S x S (no padding,
    resized_size (S, S)); values by hand where no resampling happens. Resampling itself is
    checked against the official path in tests/model/test_qwen_vl.py."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    image = random_image(32, 32)
    pixels, resized = Sam2Transform(32)(image)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert resized == (32, 32)
    by_hand = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(pixels, (by_hand - mean) / std)
    uniform, resized = Sam2Transform(32)(np.full((50, 70, 3), 200, dtype=np.uint8))
    assert resized == (32, 32)
    torch.testing.assert_close(uniform, (torch.full((3, 32, 32), 200 / 255) - mean) / std)
    with pytest.raises(ValueError, match="expected an RGB image"):
        Sam2Transform(32)(Image.fromarray(image).convert("L"))
