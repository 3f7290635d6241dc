"""FLOP accounting of a training step, from the model's shapes and the batch's real tokens.

Model FLOPs count the work a step needs, padding excluded, recomputation (gradient
checkpointing) excluded, each matrix product of [m, k] x [k, n] as 2 m k n:
- language model, per conversation of n real tokens and per layer: the projections and MLP,
  2 x P_layer x n forward (P_layer: q, k, v, o and the three SwiGLU matrices, grouped-query
  k/v included), plus attention scores and values, 2 x 2 x n^2 x H forward (the PaLM count,
  causality not halved). Backward: the input gradients, 1 x forward (the layers are frozen
  but LoRA and the embeddings are trained, so gradients flow through all of them); weight
  gradients of LoRA are negligible and not counted.
- LM head, on the rows it ran on (the scored and deciding positions, or all with full
  logits): 2 x H x V per row forward, 2 x that backward (input and weight gradients: it is
  trained).
- frozen image encoders, forward only, once per image: 2 x parameters x tokens for CLIP and
  the SAM image encoder (their attention-score products are left out: under 10 % at CLIP's
  and SAM's sizes); a Qwen-VL vision tower, whose tokens follow each image, 2 x parameters per
  patch of the batch (`Batch.patch_count`).

MFU divides the FLOP/s by the accelerator's dense bf16 peak (`PEAK_BF16_FLOPS`, by device
name; unknown devices get none) or, on CPU, by a matmul peak measured once
(`measured_matmul_peak`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

FLOPS_PER_MAC = 2
# attention: Q K^T and (scores) V, each 2 n^2 H
ATTENTION_PRODUCTS = 2
# backward multiples of the forward FLOPs: input gradients only (frozen layers) or input and
# weight gradients (trained layers)
FROZEN_BACKWARD = 1
TRAINED_BACKWARD = 2
SWIGLU_MATRICES = 3

# Dense bf16 peak FLOP/s (no sparsity) by a substring of the device name, the first match
# wins, so more specific names come first (NVIDIA data sheets).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
)
# the CPU matmul peak probe: a square fp32 product of this size, best of a few repeats
CPU_PROBE_SIZE = 1024
CPU_PROBE_REPEATS = 5


@dataclass(frozen=True)
class LanguageModelShape:
    """The dimensions of a decoder-only language model (LLaMA / Qwen style, SwiGLU MLP)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> LanguageModelShape:
        """From a transformers text config (`LlamaConfig`, `Qwen2Config`, ...)."""
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab_size=config.vocab_size,
        )

    @property
    def kv_width(self) -> int:
        return self.hidden_size * self.num_kv_heads // self.num_heads

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matrix products: q and o [H, H], k and v [H, H_kv], MLP."""
        h = self.hidden_size
        return 2 * h * h + 2 * h * self.kv_width + SWIGLU_MATRICES * h * self.intermediate_size

    def forward_flops(self, length: int) -> float:
        """Forward FLOPs of the layers over one sequence of `length` real tokens."""
        dense = FLOPS_PER_MAC * self.layer_matmul_params * length
        attention = ATTENTION_PRODUCTS * FLOPS_PER_MAC * length * length * self.hidden_size
        return float(self.num_layers * (dense + attention))

    def head_forward_flops(self, rows: int) -> float:
        return float(FLOPS_PER_MAC * self.hidden_size * self.vocab_size * rows)


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of training micro-batches (see the module docstring)."""

    language: LanguageModelShape
    image_forward_flops: float
    patch_forward_flops: float = 0.0

    @classmethod
    def from_segmenter(cls, model) -> StepFlops:
        """From a built `Segmenter` (its backbone config and encoder parameter counts)."""
        from model.backbone import image_token_count, vision_tower

        llava = model.llava
        tower_params = sum(p.numel() for p in vision_tower(llava).parameters())
        image = FLOPS_PER_MAC * model.mask_kind.encoder_macs(model.sam)
        tower_tokens = image_token_count(llava.config)
        if tower_tokens is None:  # the tower's work follows each image's patches
            patch = FLOPS_PER_MAC * tower_params
        else:
            image, patch = image + FLOPS_PER_MAC * tower_params * tower_tokens, 0.0
        text = LanguageModelShape.from_config(llava.config.text_config)
        return cls(text, float(image), float(patch))

    def micro_batch(
        self, lengths: list[int], head_rows: int, num_images: int, patches: int = 0
    ) -> float:
        """FLOPs of one micro-batch: conversations of `lengths` real tokens, the LM head on
        `head_rows` rows, `num_images` images through the frozen encoders (and `patches`
        patches through a Qwen-VL vision tower)."""
        layers = sum(self.language.forward_flops(n) for n in lengths) * (1 + FROZEN_BACKWARD)
        head = self.language.head_forward_flops(head_rows) * (1 + TRAINED_BACKWARD)
        images = self.image_forward_flops * num_images + self.patch_forward_flops * patches
        return layers + head + images


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of an accelerator named `device_name`; None when unknown."""
    for marker, peak in PEAK_BF16_FLOPS:
        if marker.lower() in device_name.lower():
            return peak
    return None


def measured_matmul_peak(
    size: int = CPU_PROBE_SIZE, repeats: int = CPU_PROBE_REPEATS, device: str = "cpu"
) -> float:
    """FLOP/s of the best of `repeats` fp32 [size, size] products on `device` (one warm-up).
    Draws from its own generator: the global RNG (dropout, a resumed run's state) is untouched."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return FLOPS_PER_MAC * size**3 / best


def device_peak(device: torch.device | str) -> tuple[float | None, str]:
    """(peak FLOP/s, what it is) for MFU on `device`: the table's bf16 peak of a CUDA device,
    a measured matmul peak on CPU, (None, why) for a device the table lacks."""
    device = torch.device(device)
    if device.type == "cpu":
        return measured_matmul_peak(), "the measured fp32 matmul peak of this CPU"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = peak_bf16_flops(name)
    if peak is None:
        return None, f"no bf16 peak is known for {name!r}, so MFU is not logged"
    return peak, f"the dense bf16 peak of {name}"
