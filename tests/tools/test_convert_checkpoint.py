"""tools/convert_checkpoint.py: a LLaVA-v1 base becomes a plain transformers LLaVA directory
with the same weights and tokenization; a LISA / M2SA directory becomes our merged checkpoint
that computes exactly what the original does."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from model.checkpoint import is_merged_checkpoint
from model.layouts import EMBED_KEY, LM_HEAD_KEY, Layout, detect_layout, uses_lisa_tokenization
from tests.model import test_layouts
from tests.model.test_layouts import SP_VOCAB, TOL, batch_for, build
from tools.convert_checkpoint import main

legacy_assets = test_layouts.legacy_assets  # the session fixture writing the legacy layouts

LISA_PROMPT = "A chat. USER: <im_start><image><im_end>\n What is it? ASSISTANT: It is [SEG].</s>"


def convert(assets, source: Path, output: Path, *flags: str) -> Path:
    clip = str(assets.clip)
    assert (
        main(["--input", str(source), "--vision-tower", clip, "--output", str(output), *flags]) == 0
    )
    return output


def pieces(tokenizer) -> list[str]:
    """A LISA prompt as token strings (ids differ where the copy added `<image>` first)."""
    return tokenizer.convert_ids_to_tokens(tokenizer(LISA_PROMPT).input_ids)


def test_a_llava_v1_base_becomes_a_plain_transformers_llava(legacy_assets, tmp_path) -> None:
    output = convert(legacy_assets, legacy_assets.llava_v1.directory, tmp_path / "llava-v1-hf")
    llava, info = LlavaForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not any(info.values()), info
    assert llava.dtype == torch.float16  # as stored
    assert llava.config.projector_hidden_act == "linear"
    assert detect_layout(output) is Layout.HF_LLAVA
    assert filecmp.cmp(
        legacy_assets.clip / "preprocessor_config.json", output / "preprocessor_config.json"
    )
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.convert_tokens_to_ids("<image>") == llava.config.image_token_id == SP_VOCAB
    assert uses_lisa_tokenization(tokenizer)

    # both in fp16: the converted copy holds CLIP in the stored dtype too
    converted, converted_tokenizer = build(legacy_assets, output, precision="fp16")
    direct, direct_tokenizer = build(
        legacy_assets, legacy_assets.llava_v1.directory, precision="fp16"
    )
    ours, theirs = converted.llava.state_dict(), direct.llava.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if ".lora_" in key:  # fresh adapters, initialised per build
            continue
        rows = slice(None, SP_VOCAB) if key.endswith((EMBED_KEY, LM_HEAD_KEY)) else slice(None)
        torch.testing.assert_close(value[rows], theirs[key][rows], rtol=0, atol=0)
    assert pieces(converted_tokenizer) == pieces(direct_tokenizer)


@pytest.mark.parametrize("name", ["lisa", "m2sa"])
def test_a_lisa_family_directory_becomes_our_merged_checkpoint(
    legacy_assets, tmp_path, name
) -> None:
    source = getattr(legacy_assets, name).directory
    output = convert(legacy_assets, source, tmp_path / f"{name}-merged", "--precision", "fp32")
    assert is_merged_checkpoint(output) and detect_layout(output) is Layout.MERGED
    _, info = LlavaForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not any(info.values()), info

    converted, converted_tokenizer = build(legacy_assets, output, vision_tower=None)
    original, original_tokenizer = build(legacy_assets, source, vision_pretrained="")
    assert converted.token_ids == original.token_ids
    assert pieces(converted_tokenizer) == pieces(original_tokenizer)
    batch = batch_for(original, converted_tokenizer)
    with torch.no_grad():
        expected, got = original(batch), converted(batch)
    torch.testing.assert_close(got.logits, expected.logits, **TOL)
    for ours, theirs in zip(
        got.pred_masks + got.prompt_embeddings,
        expected.pred_masks + expected.prompt_embeddings,
        strict=True,
    ):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_a_directory_already_in_our_formats_is_left_alone(
    legacy_assets, tiny_dir, tmp_path
) -> None:
    with pytest.raises(ValueError, match="already a hf-llava directory"):
        convert(legacy_assets, tiny_dir / "llava_tiny", tmp_path / "out")
