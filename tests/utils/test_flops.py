"""FLOP accounting against hand-computed figures and the peak table."""

from __future__ import annotations

import pytest
import torch

from utils.flops import LanguageModelShape, StepFlops, measured_matmul_peak, peak_bf16_flops

LLAMA_7B = LanguageModelShape(4096, 11008, 32, 32, 32, 32000)


def test_llama_7b_layer_weights_and_forward_flops() -> None:
    # 4 attention matrices of 4096^2 and 3 MLP matrices of 4096 x 11008: LLaMA-7B's 202.4M
    assert LLAMA_7B.layer_matmul_params == 4 * 4096**2 + 3 * 4096 * 11008 == 202_375_168
    n = 512
    expected = 32 * (2 * 202_375_168 * n + 4 * n * n * 4096)
    assert LLAMA_7B.forward_flops(n) == expected


def test_grouped_query_attention_shrinks_k_and_v() -> None:
    shape = LanguageModelShape(8, 16, 1, 4, 1, 10)  # one kv head of width 2
    assert shape.kv_width == 2
    assert shape.layer_matmul_params == 2 * 64 + 2 * 8 * 2 + 3 * 8 * 16


def test_micro_batch_counts_real_tokens_head_rows_and_images() -> None:
    flops = StepFlops(LanguageModelShape(4, 8, 2, 2, 2, 10), image_forward_flops=100.0)
    # see tests/utils/test_training.py: 7232 (layers, forward and input gradients) + 720 (head)
    assert flops.micro_batch([3, 2], head_rows=3, num_images=2) == 7232 + 720 + 200
    # a padded slot adds nothing: only the real lengths are passed
    assert flops.micro_batch([3], 0, 0) == 2 * 2 * (2 * 160 * 3 + 2 * 2 * 9 * 4)


def test_a_qwen_vision_tower_is_counted_per_patch(tmp_path) -> None:
    """Qwen-VL: SAM per image, the vision tower 2 x its parameters per patch of the batch
    (its image-token count follows each image); LLaVA's CLIP stays a per-image cost."""
    from model.backbone import vision_tower
    from model.tiny import build_tiny_segmenter

    model, _ = build_tiny_segmenter(tmp_path, backbone="qwen2_5_vl")
    flops = StepFlops.from_segmenter(model)
    tower = sum(p.numel() for p in vision_tower(model.llava).parameters())
    sam = sum(p.numel() for p in model.sam.vision_encoder.parameters())
    vision = model.sam.config.vision_config
    sam_tokens = (vision.image_size // vision.patch_size) ** 2
    assert flops.patch_forward_flops == 2 * tower
    assert flops.image_forward_flops == 2 * sam * sam_tokens
    none = flops.micro_batch([5], 0, num_images=2, patches=0)
    assert flops.micro_batch([5], 0, num_images=2, patches=60) - none == 60 * 2 * tower


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("Tesla T4", None),
    ],
)
def test_peak_table_by_device_name(name: str, peak: float | None) -> None:
    assert peak_bf16_flops(name) == peak


def test_cpu_matmul_peak_is_measured_without_touching_the_global_rng() -> None:
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert measured_matmul_peak(size=128, repeats=2) > 1e6
    assert torch.equal(torch.rand(4), expected)


def test_sam2_encoder_flops_follow_each_stages_grid(tmp_path) -> None:
    """SAM 2 (tiny: 128 px, blocks (1, 1, 2, 1)): each Hiera block 2 x its parameters per token
    of its stage's grid (32, 16, 8, 4 per side), the patch embedding per token of the first,
    each neck convolution per token of its level (4, 8, 16, 32 per side, deepest first)."""
    from model.backbone import image_token_count, vision_tower
    from model.tiny import build_tiny_segmenter

    model, _ = build_tiny_segmenter(tmp_path, segmenter="sam2")
    trunk = model.sam.vision_encoder.backbone

    def params(module) -> int:
        return sum(p.numel() for p in module.parameters())

    grids = [32, 16, 8, 8, 4]
    expected = sum(params(block) * side**2 for block, side in zip(trunk.blocks, grids, strict=True))
    expected += params(trunk.patch_embed) * 32**2
    convs = model.sam.vision_encoder.neck.convs
    expected += sum(
        params(conv) * side**2 for conv, side in zip(convs, [4, 8, 16, 32], strict=True)
    )
    tower = params(vision_tower(model.llava)) * image_token_count(model.llava.config)
    assert StepFlops.from_segmenter(model).image_forward_flops == 2 * (expected + tower)
