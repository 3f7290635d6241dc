"""The memory planner: model states against DeepSpeed's own estimators, activations against
hand counts, and the 7B recipe planned on the meta device without weights."""

from __future__ import annotations

import json

import pytest
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
)
from deepspeed.runtime.zero.stage_1_and_2 import (
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
)

from model.sam2 import to_original_state_dict
from train_ds import main
from utils.config import parse_args
from utils.memory_plan import (
    GIB,
    ActivationShape,
    ParameterCounts,
    StepGradients,
    activation_bytes,
    layer_activation_bytes,
    meta_segmenter,
    mlp_backward_bytes,
    model_state_bytes,
)

TOTAL, LARGEST = 123_456_789, 4_567_890
ALL_TRAINABLE = ParameterCounts(total=TOTAL, trainable=TOTAL, largest_layer=LARGEST)
BF16 = 2
# LLaMA-7B with its 32000-token vocabulary and an untied LM head: 6.74B parameters
LLAMA_7B_PARAMETERS = 6_738_415_616


def states_gb(stage: int, offload: bool, gpus: int) -> float:
    return sum(model_state_bytes(ALL_TRAINABLE, stage, offload, gpus, BF16).values()) / GIB


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeed(gpus: int, offload: bool, capsys) -> None:
    states = model_state_bytes(ALL_TRAINABLE, 2, offload, gpus, BF16)
    _, expected = estimate_zero2_model_states_mem_needs(TOTAL, gpus, 1, cpu_offload=offload)
    assert sum(states.values()) == expected
    estimate_zero2_model_states_mem_needs_all_cold(TOTAL, num_gpus_per_node=gpus)
    assert f"| {states_gb(2, offload, gpus):6.2f}GB |" in capsys.readouterr().out


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_zero3_model_states_equal_deepspeed(gpus: int, offload: bool, capsys) -> None:
    states = model_state_bytes(ALL_TRAINABLE, 3, offload, gpus, BF16)
    # our offload is the optimizer's only: parameters stay on the GPUs
    _, expected, _ = estimate_zero3_model_states_mem_needs(
        TOTAL, LARGEST, gpus, 1, cpu_offload=offload, cpu_offload_params=False
    )
    assert sum(states.values()) == expected
    estimate_zero3_model_states_mem_needs_all_cold(TOTAL, LARGEST, num_gpus_per_node=gpus)
    assert f"| {states_gb(3, offload, gpus):6.2f}GB |" in capsys.readouterr().out


def test_frozen_parameters_cost_only_their_16bit_weights() -> None:
    counts = ParameterCounts(total=1000, trainable=100, largest_layer=50)
    states = model_state_bytes(counts, 2, False, 2, BF16)
    # 2 bytes x 1000 weights; 18 bytes x 100 trainable over 2 GPUs = 900 (300 gradients)
    assert states == {"weights": 2000, "gradients": 300, "optimizer": 600}
    zero3 = model_state_bytes(counts, 3, False, 2, BF16)
    assert zero3["weights"] == 4 * 50 + 2 * 900 // 2


SHAPE = ActivationShape(
    hidden_size=4,
    kv_width=4,
    intermediate_size=8,
    num_layers=3,
    vocab_size=10,
    lora_targets=2,
    lora_dropout=True,
    bytes_per_value=BF16,
)


def test_layer_activations_by_hand() -> None:
    # norms 2 x 4 x 4 fp32 = 32; LoRA 2 x 4 x (2 + 1 mask) = 24; q, k rotated 2 x 8, v 2 x 4,
    # attention output 2 x 4 = 32; SwiGLU 3 x 2 x 8 = 48
    assert layer_activation_bytes(SHAPE) == 32 + 24 + 32 + 48 == 136
    # the MLP's backward: gradients of gate and up (2 x 2 x 8) and of two hidden states (2 x 2 x 4)
    assert mlp_backward_bytes(SHAPE) == 32 + 16 == 48


TOKENS, ROWS = 7, 5
# bf16 embeddings of 7 tokens: 2 x 4 x 7; logits 5 x 10 = 50 values
EMBEDDINGS, LOGITS = 56, 50


def test_checkpointing_peaks_in_the_first_layer_backward() -> None:
    kept = 3 * EMBEDDINGS + EMBEDDINGS  # each layer's input and the embeddings
    moments = {
        "forward end": kept + LOGITS * (2 + 4),  # bf16 logits and fp32 log-softmax
        "head backward": kept + LOGITS * (2 + 4) + 2 * 4 * LOGITS,  # and its two gradients
        # one layer recomputed (136 x 7), its MLP's backward (48 x 7), the logits held
        "layer backward": kept + 136 * TOKENS + 48 * TOKENS + 2 * LOGITS,
    }
    assert moments == {"forward end": 524, "head backward": 924, "layer backward": 1612}
    assert activation_bytes(SHAPE, TOKENS, ROWS, checkpointing=True) == 1612


def test_trimmed_logits_are_freed_before_the_layers_backward() -> None:
    # the trimmed path's output holds no logits: the layer backward without its 2 x LOGITS
    kept = 3 * EMBEDDINGS + EMBEDDINGS
    trimmed = activation_bytes(SHAPE, TOKENS, ROWS, True, output_holds_logits=False)
    assert trimmed == kept + 136 * TOKENS + 48 * TOKENS == 1512
    gradients = StepGradients(head=1000, total=5000)  # the end of the backward: no logits
    end = activation_bytes(
        SHAPE, TOKENS, ROWS, True, gradients=gradients, output_holds_logits=False
    )
    assert end == 5000


def test_without_checkpointing_the_head_backward_peaks() -> None:
    kept = 3 * 136 * TOKENS + EMBEDDINGS
    head_backward = kept + LOGITS * (2 + 4) + 2 * 4 * LOGITS
    assert head_backward == 3612 > kept + 48 * TOKENS + 2 * LOGITS
    assert activation_bytes(SHAPE, TOKENS, ROWS, checkpointing=False) == 3612
    # full logits over every position: 7 rows instead of 5
    assert activation_bytes(SHAPE, TOKENS, 7, checkpointing=False) == kept + 7 * 10 * 14


def test_mask_losses_and_gradients_can_set_the_peak() -> None:
    # 8 fp32 values per target pixel at the end of the forward: 100 pixels add 3200
    pixels = activation_bytes(SHAPE, TOKENS, ROWS, checkpointing=True, target_pixels=100)
    assert pixels == 524 + 3200
    # a plain backward's gradients: the head's during the layers' backward, all at the end
    gradients = StepGradients(head=1000, total=5000)
    assert activation_bytes(SHAPE, TOKENS, ROWS, True, gradients=gradients) == 5000 + 2 * LOGITS
    small = StepGradients(head=1000, total=1100)
    assert activation_bytes(SHAPE, TOKENS, ROWS, True, gradients=small) == 1612 + 1000


def test_7b_recipe_is_planned_on_meta_without_weights(capsys) -> None:
    flags = ["--recipe=m2sa", "--version=LLaVA-7B-Lightening-v1-1", "--estimate_memory"]
    model = meta_segmenter(parse_args(flags))
    language = model.llava.model.language_model
    base = sum(p.numel() for n, p in language.named_parameters() if "lora_" not in n)
    assert base + model.llava.lm_head.weight.numel() == LLAMA_7B_PARAMETERS
    assert all(p.is_meta for p in model.parameters())
    result = main([*flags, "--json", "--gpu_memory_gb=24"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["total_gb"] == pytest.approx(result["total_gb"])
    parts = ("weights", "gradients", "optimizer", "activations", "runtime")
    assert printed["total_gb"] == pytest.approx(sum(printed[f"{p}_gb"] for p in parts))
    assert printed["zero_stage"] == 2 and printed["gradient_checkpointing"] is True
    # bf16 weights of ~7.7B parameters (LLaMA-7B, CLIP-L, SAM ViT-H, LoRA, projector)
    assert 14.0 < printed["weights_gb"] < 14.8
    assert printed["fits"] is (printed["total_gb"] <= 24)
    assert len(printed["settings"]) == 8


# tensor elements of the official SAM2Base's state dict built from sam2.1_hiera_l.yaml / _t.yaml,
# its video-tracking parts excluded (counted with the official `sam2` package)
SAM2_IMAGE_ELEMENTS = {"hiera_large": 216_925_121, "hiera_tiny": 31_440_977}


@pytest.mark.parametrize("size", sorted(SAM2_IMAGE_ELEMENTS))
def test_a_sam2_file_name_plans_sam2_of_its_size(size: str) -> None:
    """`--vision_pretrained sam2.1_<size>.pt` plans SAM 2 of that size (no file is read),
    without M2SA's fusion, which SAM 2 has no block for."""
    flags = [
        "--recipe=qwen2_5_vl",
        "--version=LLaVA-7B-Lightening-v1-1",
        f"--vision_pretrained=./vision_pretrained/sam2.1_{size}.pt",
        "--conv_type=llava_v1",
    ]
    model = meta_segmenter(parse_args(flags))
    assert type(model.sam).__name__ == "Sam2Model" and model.early_fusion is None
    original = to_original_state_dict(model.sam.state_dict())
    assert sum(t.numel() for t in original.values()) == SAM2_IMAGE_ELEMENTS[size]
