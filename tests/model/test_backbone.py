"""Backbone: derived image-token counts, clear errors, attention and checkpointing switches."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from model.backbone import check_attn_implementation, check_model_directory, image_token_count
from model.tiny import build_tiny_segmenter, tiny_model_config
from tests.helpers import make_batch
from tests.model.test_segmenter import CONVERSATIONS, IMAGE_SIZES, ground_truth


@pytest.mark.parametrize(
    ("image_size", "patch", "strategy", "expected"),
    [
        (224, 14, "default", 256),
        (336, 14, "default", 576),
        (224, 14, "full", 257),
        (32, 8, "default", 16),
    ],
)
def test_image_token_count_is_derived_from_the_vision_config(
    image_size, patch, strategy, expected
) -> None:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(),
        vision_feature_select_strategy=strategy,
    )
    assert image_token_count(config) == expected


def test_missing_directory_and_missing_weights_fail_with_the_path(tiny_dir, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        check_model_directory(tmp_path / "nowhere")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model_config(tiny_dir).version, no_weights)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"no_weights: no weights"):
        check_model_directory(no_weights)


def test_attention_implementation_is_validated() -> None:
    with pytest.raises(ValueError, match="must be one of"):
        check_attn_implementation("xformers")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="optional flash-attn package"):
            check_attn_implementation("flash_attention_2")


def loss_grads_and_layer_calls(tiny_dir, **overrides):
    """Train-mode loss, gradients, and how often the first LLM layer's attention ran (2x when
    the layer is recomputed in backward; transformers checkpoints `forward`, so a hook on the
    layer itself would fire once either way)."""
    model, tokenizer = build_tiny_segmenter(tiny_dir, lora_dropout=0.0, **overrides)
    model.train()
    calls = []
    layer = model.llava.model.language_model.layers[0].self_attn
    hook = layer.register_forward_hook(lambda *args: calls.append(1))
    batch = make_batch(model, tokenizer, IMAGE_SIZES, CONVERSATIONS, ground_truth())
    output = model(batch)
    output.loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), grads, len(calls)


def test_eager_attention_and_gradient_checkpointing_give_the_same_loss_and_grads(tiny_dir) -> None:
    loss, grads, calls = loss_grads_and_layer_calls(tiny_dir)
    assert calls == 1
    for overrides, expected_calls in (
        ({"attn_implementation": "eager"}, 1),
        ({"gradient_checkpointing": True}, 2),
    ):
        other_loss, other_grads, other_calls = loss_grads_and_layer_calls(tiny_dir, **overrides)
        assert other_calls == expected_calls
        torch.testing.assert_close(other_loss, loss, atol=1e-5, rtol=1e-5)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
