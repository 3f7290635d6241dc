"""LoRA targets and the trainable set."""

from __future__ import annotations

import pytest
import torch

from model.backbone import load_llava
from model.lora import apply_lora, lora_target_names, trainable_parameter_counts
from model.tiny import TINY_TEXT, build_tiny_segmenter, tiny_model_config


def test_default_targets_are_exactly_the_language_model_q_and_v_projections(tiny_dir) -> None:
    llava = load_llava(tiny_model_config(tiny_dir).version, torch.float32)
    names = lora_target_names(llava, ["q_proj", "v_proj"])
    expected = [
        f"model.language_model.layers.{layer}.self_attn.{proj}_proj"
        for layer in range(TINY_TEXT["num_hidden_layers"])
        for proj in ("q", "v")
    ]
    assert names == expected
    # CLIP also has q_proj/v_proj: they must never be targeted
    assert any("vision_tower" in n and n.endswith("q_proj") for n, _ in llava.named_modules())


def test_unknown_target_fails_and_zero_rank_injects_nothing(tiny_dir) -> None:
    llava = load_llava(tiny_model_config(tiny_dir).version, torch.float32)
    with pytest.raises(ValueError, match="matches no Linear layer"):
        lora_target_names(llava, ["query"])
    assert apply_lora(llava, 0, 16, 0.05, ["q_proj"]) == []
    assert not any("lora_" in name for name, _ in llava.named_parameters())


def test_trainable_set_and_counts(tiny_dir) -> None:
    model, tokenizer = build_tiny_segmenter(tiny_dir)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if ".lora_" in name}
    hidden, r = TINY_TEXT["hidden_size"], tiny_model_config(tiny_dir).lora_r
    layers = TINY_TEXT["num_hidden_layers"]
    assert len(lora) == layers * 2 * 2  # q and v, A and B
    assert all(".self_attn.q_proj." in n or ".self_attn.v_proj." in n for n in lora)
    counts = trainable_parameter_counts(model)
    assert counts["lora"] == layers * 2 * (r * hidden + hidden * r)
    vocab = len(tokenizer)
    assert counts["embed_tokens"] == counts["lm_head"] == vocab * hidden
    assert counts["mask_decoder"] == sum(p.numel() for p in model.sam.mask_decoder.parameters())
    assert counts["text_hidden_fcs"] == sum(p.numel() for p in model.text_hidden_fcs.parameters())
    assert counts["mm_projector"] == counts["early_fusion"] == 0
    assert counts.get("other", 0) == 0
    frozen_prefixes = (
        "llava.model.vision_tower.",
        "llava.model.multi_modal_projector.",
        "sam.vision_encoder.",
        "sam.prompt_encoder.",
        "sam.shared_image_embedding.",
    )
    for name, parameter in model.named_parameters():
        if name.startswith(frozen_prefixes) or name.endswith("base_layer.weight"):
            assert not parameter.requires_grad, name
    total = sum(p.numel() for p in model.parameters())
    assert counts["total"] + counts["frozen"] == total


def test_flags_open_the_projector_and_close_the_decoder(tiny_dir) -> None:
    model, _ = build_tiny_segmenter(tiny_dir, train_mm_projector=True, train_mask_decoder=False)
    counts = trainable_parameter_counts(model)
    assert counts["mm_projector"] == sum(
        p.numel() for p in model.llava.model.multi_modal_projector.parameters()
    )
    assert counts["mask_decoder"] == 0
