"""Our merged checkpoint: LoRA folding, the files written, plain-transformers loading, and a
merged model that computes what the unmerged one computed (with and without fusion)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from model.builder import ModelConfig, build_segmenter
from model.checkpoint import (
    SEGMENTER_CONFIG_FILE,
    SEGMENTER_INDEX_FILE,
    merge_lora,
    read_segmentation_tensors,
    save_merged,
)
from model.tiny import build_tiny_segmenter
from tests.helpers import Conversation, make_batch

SIZES = [(40, 56), (48, 30)]
CONVERSATIONS = [
    Conversation(
        0, "Can you segment the red circle and the blue square?", "Sure, [SEG] and [SEG]."
    ),
    Conversation(1, "Where are the star and the dog?", "The star is [SEG], the dog is [REJ]."),
]
LORA_R, LORA_ALPHA = 4, 16


def perturb(model, seed: int = 1) -> None:
    """Give LoRA B, the projector and the decoder non-default values (as training does)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "text_hidden_fcs" in name or "mask_decoder" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def merged_config(directory: Path) -> ModelConfig:
    """Loading a merged directory: no SAM file, no LoRA, fp32, the tiny projector width."""
    return ModelConfig(
        version=str(directory),
        vision_pretrained="",
        precision="fp32",
        out_dim=32,
        gradient_checkpointing=False,
        lora_r=0,
    )


def outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch)


@pytest.fixture(params=[False, True], ids=["lisa", "m2sa_fusion"])
def merged(request, tiny_dir, tmp_path):
    """(output of the trained unmerged model, merged directory, batch)."""
    model, tokenizer = build_tiny_segmenter(
        tiny_dir, seed=0, lora_r=LORA_R, early_fusion=request.param
    )
    perturb(model)
    batch = make_batch(model, tokenizer, SIZES, CONVERSATIONS, gt_masks=None)
    before = outputs(model, batch)
    assert merge_lora(model.llava) == 2 * model.llava.config.text_config.num_hidden_layers
    directory = save_merged(
        model,
        tokenizer,
        tmp_path / "merged",
        source_version=tiny_dir / "llava_tiny",
        conv_type="llava_v1",
    )
    return before, directory, batch


@pytest.mark.parametrize("asked_fusion", [False, True], ids=["asked_lisa", "asked_fusion"])
def test_the_merged_model_computes_what_the_unmerged_one_did(merged, asked_fusion) -> None:
    """Whatever --early_fusion (or a recipe) asks, a checkpoint keeps the architecture it was
    trained with: a random fusion block added to a LISA checkpoint would corrupt it."""
    before, directory, batch = merged
    config = replace(merged_config(directory), early_fusion=asked_fusion)
    model, _ = build_segmenter(config)
    after = outputs(model, batch)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-4, rtol=1e-4)
    for first, second in zip(after.prompt_embeddings, before.prompt_embeddings, strict=True):
        torch.testing.assert_close(first, second, atol=1e-4, rtol=1e-4)
    for first, second in zip(after.pred_masks, before.pred_masks, strict=True):
        torch.testing.assert_close(first, second, atol=1e-4, rtol=1e-4)


def test_the_files_and_key_names(merged) -> None:
    _, directory, _ = merged
    names = {path.name for path in directory.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "segmenter.safetensors",
        SEGMENTER_CONFIG_FILE,
    } <= names
    keys = set(read_segmentation_tensors(directory))
    assert "model.visual_model.image_encoder.pos_embed" in keys
    assert "model.visual_model.mask_decoder.output_upscaling.0.weight" in keys
    assert {"model.text_hidden_fcs.0.0.weight", "model.text_hidden_fcs.0.2.bias"} <= keys
    fused = any(key.startswith("model.visual_model.mask_decoder.compress_vit.") for key in keys)
    saved = json.loads((directory / SEGMENTER_CONFIG_FILE).read_text())
    assert fused == (saved["early_layer"] is not None)
    assert saved["train_mask_decoder"] is True and saved["token_ids"]["seg"] > 0
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 512


def test_plain_transformers_loads_the_llava_part_with_no_key_left_over(merged) -> None:
    before, directory, batch = merged
    llava, info = LlavaForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    text = int(torch.nonzero(batch.input_ids[0] == llava.config.image_token_id)[0]) - 1
    ids = batch.input_ids[:1, :text]  # the system text before the image
    with torch.no_grad():
        logits = llava(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits, before.logits[:1, :text], atol=1e-4, rtol=1e-4)


def test_merge_lora_folds_alpha_over_r_times_b_a(tiny_dir) -> None:
    model, _ = build_tiny_segmenter(tiny_dir, seed=0, lora_r=LORA_R, lora_alpha=LORA_ALPHA)
    perturb(model)
    layer = model.llava.model.language_model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + (LORA_ALPHA / LORA_R) * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    merge_lora(model.llava)
    merged = model.llava.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(merged, torch.nn.Linear) and not hasattr(merged, "lora_A")
    torch.testing.assert_close(merged.weight, expected.detach())


def test_large_checkpoints_are_sharded_with_an_index(tiny_dir, tmp_path) -> None:
    model, tokenizer = build_tiny_segmenter(tiny_dir, seed=0, lora_r=0)
    directory = save_merged(
        model,
        tokenizer,
        tmp_path / "sharded",
        source_version=tiny_dir / "llava_tiny",
        conv_type="llava_v1",
        max_shard_size="200KB",
    )
    assert (directory / SEGMENTER_INDEX_FILE).is_file()
    assert len(list(directory.glob("segmenter-*.safetensors"))) > 1
    assert (directory / "model.safetensors.index.json").is_file()
    config = merged_config(directory)
    loaded, _ = build_segmenter(config)
    for (name, first), (_, second) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(first, second), name


def rewrite_config(directory: Path, **changes) -> None:
    path = directory / SEGMENTER_CONFIG_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_mismatched_token_ids_and_missing_weights_are_named(merged) -> None:
    _, directory, _ = merged
    config = merged_config(directory)
    saved = json.loads((directory / SEGMENTER_CONFIG_FILE).read_text())
    rewrite_config(directory, token_ids={**saved["token_ids"], "seg": 3})
    with pytest.raises(ValueError, match="trained with"):
        build_segmenter(config)
    rewrite_config(directory, token_ids=saved["token_ids"], format_version=99)
    with pytest.raises(ValueError, match="version 99"):
        build_segmenter(config)
    rewrite_config(directory, format_version=1)
    (directory / "segmenter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="segmentation weights are missing"):
        build_segmenter(config)


def test_a_damaged_segmenter_file_is_named(merged) -> None:
    _, directory, _ = merged
    (directory / "segmenter.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"segmenter\.safetensors: not a readable PyTorch or"):
        read_segmentation_tensors(directory)
