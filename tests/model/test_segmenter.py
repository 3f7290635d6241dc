"""The segmenter end to end on the tiny model: losses, gradients, mask routing and alignment."""

from __future__ import annotations

import pytest
import torch

from model.losses import mask_losses
from model.segmenter import EMPTY_MASK_LOGIT
from model.tiny import build_tiny_segmenter
from model.tokens import predictor_mask
from tests.helpers import Conversation, forward_backward, make_batch, reference_mask
from utils.metrics import target_decisions

IMAGE_SIZES = [(40, 56), (48, 30)]
CONVERSATIONS = [
    Conversation(
        0, "Can you segment the red circle and the blue square?", "Sure, [SEG] and [SEG]."
    ),
    Conversation(0, "Where are the circle and the dog?", "The circle is [SEG], the dog is [REJ]."),
    Conversation(1, "Please segment the green car.", "[REJ]."),
    Conversation(1, "What is the star in this image?", "It is [SEG]."),
    Conversation(1, "Segment the tree, the cat and the house.", "[SEG], [REJ] and [SEG]."),
]
TARGET_IS_REJ = [[False, False, False, True], [True, False, False, True, False]]
# parameters that get no gradient by construction: SAM's IoU head (its output is unused)
NO_GRAD_BY_DESIGN = ("sam.mask_decoder.iou_prediction_head.",)


def ground_truth(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for (height, width), rej in zip(IMAGE_SIZES, TARGET_IS_REJ, strict=True):
        image_masks = torch.randint(0, 2, (len(rej), height, width), generator=generator).to(
            torch.uint8
        )
        image_masks[torch.tensor(rej)] = 0
        image_masks[0, :3, :3] = 255  # a few ignore pixels
        masks.append(image_masks)
    return masks


@pytest.fixture
def tiny(tiny_dir):
    model, tokenizer = build_tiny_segmenter(tiny_dir, seed=0)
    return model, tokenizer


@pytest.fixture
def batch(tiny):
    model, tokenizer = tiny
    return make_batch(model, tokenizer, IMAGE_SIZES, CONVERSATIONS, ground_truth())


def test_forward_backward_reaches_exactly_the_trainable_set(tiny, batch) -> None:
    model, _ = tiny
    output = model(batch)
    assert torch.isfinite(output.loss) and output.loss.item() > 0
    assert output.mask_bce_loss.item() > 0 and output.mask_dice_loss.item() > 0
    output.loss.backward()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, f"frozen {name} received a gradient"
        elif name.startswith(NO_GRAD_BY_DESIGN):
            assert parameter.grad is None
        else:
            assert parameter.grad is not None, f"trainable {name} received no gradient"
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for marker in (
        "lora_B",
        "embed_tokens",
        "lm_head",
        "mask_decoder.transformer",
        "text_hidden_fcs",
    ):
        assert any(marker in name and g.abs().sum() > 0 for name, g in grads.items()), marker


def test_each_image_gets_its_own_masks_in_order(tiny, batch) -> None:
    model, _ = tiny
    output = model(batch)
    assert [m.shape for m in output.pred_masks] == [
        (len(rej), height, width)
        for (height, width), rej in zip(IMAGE_SIZES, TARGET_IS_REJ, strict=True)
    ]
    assert [r.tolist() for r in output.target_is_rej] == TARGET_IS_REJ
    for masks, rej in zip(output.pred_masks, TARGET_IS_REJ, strict=True):
        assert (masks[torch.tensor(rej)] == EMPTY_MASK_LOGIT).all()
    assert [len(p) for p in output.prompt_embeddings] == [4, 5]


def reference_targets(
    model, batch, image: int, shift: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent composition: HF's own LLaVA forward (CLIP per conversation, HF's image
    merging) on each unpadded conversation, the hidden state `shift` positions before each
    [SEG], the projector, one decoder call per prompt, SAM's post-processing by hand.
    Returns (prompts [k, D], masks [k, H, W]) of the image's [SEG] targets."""
    embedding = model.sam.get_image_embeddings(batch.sam_pixels[image : image + 1])[0]
    prompts, masks = [], []
    for row in torch.nonzero(batch.conv_image == image).squeeze(1).tolist():
        ids = batch.input_ids[row][batch.attention_mask[row]]
        out = model.llava(
            input_ids=ids[None],
            pixel_values=batch.clip_pixels[image : image + 1],
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1][0]
        for position in torch.nonzero(ids == model.token_ids.seg).squeeze(1).tolist():
            prompt = model.text_hidden_fcs[0](hidden[position - shift])
            prompts.append(prompt)
            masks.append(reference_mask(model, embedding, prompt, batch, image))
    return torch.stack(prompts), torch.stack(masks)


@torch.no_grad()
def test_masks_equal_an_independent_composition(tiny, batch) -> None:
    """Fails if the projector read the hidden state AT [SEG] (not before it), if image tokens
    shifted positions, or if prompts were routed to the wrong image."""
    model, _ = tiny
    model.eval()
    output = model(batch)
    tolerance = 1e-4
    for image, rej in enumerate(TARGET_IS_REJ):
        seg = ~torch.tensor(rej)
        ours_prompts, ours_masks = (
            output.prompt_embeddings[image][seg],
            output.pred_masks[image][seg],
        )
        prompts, masks = reference_targets(model, batch, image)
        torch.testing.assert_close(ours_prompts, prompts, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(ours_masks, masks, atol=tolerance, rtol=tolerance)
        wrong_prompts, wrong_masks = reference_targets(model, batch, image, shift=0)
        assert (ours_prompts - wrong_prompts).abs().max() > 0.1 * ours_prompts.abs().max()
        assert (ours_masks - wrong_masks).abs().max() > 10 * tolerance


@torch.no_grad()
def test_logits_equal_hf_llava_per_conversation(tiny, batch) -> None:
    model, _ = tiny
    model.eval()
    output = model(batch)
    for row in range(len(CONVERSATIONS)):
        valid = batch.attention_mask[row]
        image = batch.conv_image[row]
        hf = model.llava(
            input_ids=batch.input_ids[row][valid][None],
            pixel_values=batch.clip_pixels[image : image + 1],
        ).logits[0]
        torch.testing.assert_close(output.logits[row][valid], hf, atol=1e-4, rtol=1e-4)


def test_count_mismatch_names_the_image_and_both_numbers(tiny) -> None:
    model, tokenizer = tiny
    masks = ground_truth()
    masks[1] = masks[1][:4]
    batch = make_batch(model, tokenizer, IMAGE_SIZES, CONVERSATIONS, masks)
    with pytest.raises(ValueError) as error:
        model(batch)
    message = str(error.value)
    assert "image 1 (img1.jpg)" in message
    assert "5 target tokens (3 [SEG], 2 [REJ]) but 4 ground-truth masks" in message


def test_rej_rows_are_left_out_of_the_mask_loss(tiny, batch) -> None:
    model, tokenizer = tiny
    model.eval()
    output = model(batch)
    seg_rows = [~torch.tensor(rej) for rej in TARGET_IS_REJ]
    bce, dice = mask_losses(
        [p[rows] for p, rows in zip(output.pred_masks, seg_rows, strict=True)],
        [g[rows] for g, rows in zip(batch.gt_masks, seg_rows, strict=True)],
        torch.device("cpu"),
    )
    torch.testing.assert_close(output.mask_bce_loss, bce)
    torch.testing.assert_close(output.mask_dice_loss, dice)
    torch.testing.assert_close(output.loss, 1.0 * output.ce_loss + 2.0 * bce + 0.5 * dice)
    altered = ground_truth()
    for masks, rej in zip(altered, TARGET_IS_REJ, strict=True):
        masks[torch.tensor(rej)] = 1
    output_altered = model(make_batch(model, tokenizer, IMAGE_SIZES, CONVERSATIONS, altered))
    torch.testing.assert_close(output_altered.mask_loss, output.mask_loss)


def test_encoders_run_once_per_image_not_per_conversation(tiny, batch) -> None:
    model, _ = tiny
    calls: dict[str, list[int]] = {"sam": [], "clip": []}
    hooks = [
        model.sam.vision_encoder.register_forward_hook(
            lambda module, args, out: calls["sam"].append(args[0].shape[0])
        ),
        model.llava.model.vision_tower.register_forward_hook(
            lambda module, args, out: calls["clip"].append(args[0].shape[0])
        ),
    ]
    model(batch)
    for hook in hooks:
        hook.remove()
    assert calls == {"sam": [2], "clip": [2]}


def test_batch_without_seg_still_reaches_every_trainable_parameter(tiny) -> None:
    """Ranks must reduce the same gradients: a VQA or all-[REJ] batch gives the decoder,
    projector zero gradients instead of none, and the loss value is unchanged."""
    model, tokenizer = tiny
    conversations = [
        Conversation(0, "What colour is the circle?", "It is red."),
        Conversation(0, "Where is the dog?", "The dog is [REJ]."),
    ]
    masks = [torch.zeros(1, 40, 56, dtype=torch.uint8)]
    output = model(make_batch(model, tokenizer, IMAGE_SIZES[:1], conversations, masks))
    assert output.loss.item() == pytest.approx(output.ce_loss.item())
    output.loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not name.startswith(NO_GRAD_BY_DESIGN):
            assert parameter.grad is not None, name
    assert model.sam.mask_decoder.transformer.layers[0].mlp.lin1.weight.grad.abs().sum() == 0


def test_batch_without_targets_has_zero_mask_loss(tiny) -> None:
    model, tokenizer = tiny
    conversations = [Conversation(0, "What colour is the circle?", "It is red.")]
    batch = make_batch(model, tokenizer, IMAGE_SIZES[:1], conversations, [torch.zeros(0, 40, 56)])
    output = model(batch)
    assert output.mask_loss.item() == 0.0
    assert output.loss.item() == pytest.approx(output.ce_loss.item()) and output.ce_loss.item() > 0
    assert output.pred_masks[0].shape == (0, 40, 56)


def test_early_fusion_is_trained(tiny_dir) -> None:
    model, tokenizer = build_tiny_segmenter(tiny_dir, early_fusion=True)
    assert model.early_layer == 1  # the tiny SAM's first global-attention block
    batch = make_batch(model, tokenizer, IMAGE_SIZES, CONVERSATIONS, ground_truth())
    model(batch).loss.backward()
    fusion = dict(model.early_fusion.named_parameters())
    assert set(fusion) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.values())


def test_out_dim_follows_the_sam_file_and_a_contradiction_stops(tiny_dir) -> None:
    """Without --out_dim the projector ends at the SAM's prompt width (32 for the tiny SAM,
    256 for every released one); an explicit other value stops, naming the file."""
    model, _ = build_tiny_segmenter(tiny_dir, out_dim=None)
    assert model.text_hidden_fcs[0][-1].out_features == 32
    assert model.sam.config.mask_decoder_config.hidden_size == 32
    with pytest.raises(
        ValueError, match=r"--out_dim 256 must equal the SAM prompt width 32 of .*sam_tiny\.pth"
    ):
        build_tiny_segmenter(tiny_dir, out_dim=256)


# a target-free VQA turn beside the referring ones: families and lengths mixed in one batch
VQA = Conversation(
    1,
    "Describe the picture in detail, including every shape, its colour and where it lies.",
    "There is a star near the top, a green car on the left and a small house below the tree, "
    "all drawn on a plain background.",
)


def without_dropout(model) -> None:
    """Training mode with dropout off, so two forwards are comparable."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def test_trimmed_logits_equal_the_full_path(tiny) -> None:
    model, tokenizer = tiny
    batch = make_batch(model, tokenizer, IMAGE_SIZES, [*CONVERSATIONS, VQA], ground_truth())
    without_dropout(model)
    full, full_grads = forward_backward(model, batch, full_logits=True)
    trimmed, trimmed_grads = forward_backward(model, batch, full_logits=False)
    assert trimmed.logits is None and full.logits is not None
    assert trimmed.ce_loss.item() == pytest.approx(full.ce_loss.item(), abs=1e-6)
    assert trimmed.loss.item() == pytest.approx(full.loss.item(), abs=1e-6)
    assert trimmed_grads.keys() == full_grads.keys()
    for name, grad in trimmed_grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    # the head ran on the scored positions plus one per target, not on all C x L
    scored = int((batch.labels[:, 1:] != -100).sum())
    assert trimmed.head_rows == scored + sum(len(rej) for rej in TARGET_IS_REJ)
    assert trimmed.head_rows < batch.input_ids.numel() == full.head_rows


def test_trimmed_decisions_equal_the_argmax_of_full_logits(tiny) -> None:
    model, tokenizer = tiny
    batch = make_batch(model, tokenizer, IMAGE_SIZES, [*CONVERSATIONS, VQA], ground_truth())
    without_dropout(model)
    with torch.no_grad():
        # a decisive [SEG] / [REJ] preference at some positions, so not every argmax agrees
        model.llava.lm_head.weight[model.token_ids.rej] *= 4.0
        model.full_logits = True
        full = model(batch)
        model.full_logits = False
        trimmed = model(batch)
    conv, position = torch.nonzero(
        predictor_mask(batch.input_ids, model.token_ids.seg)
        | predictor_mask(batch.input_ids, model.token_ids.rej),
        as_tuple=True,
    )
    expected = full.logits[conv, position].argmax(-1)
    got = torch.cat(trimmed.target_tokens)
    assert got.tolist() == expected.tolist() == torch.cat(full.target_tokens).tolist()
    decisions = target_decisions(
        batch.input_ids, full.logits, batch.conv_image, batch.num_images, model.token_ids
    )
    for image, tokens in enumerate(trimmed.target_tokens):
        is_rej = torch.tensor(TARGET_IS_REJ[image])
        present = torch.where(is_rej, tokens != model.token_ids.rej, tokens == model.token_ids.seg)
        assert present.tolist() == decisions[image].tolist()


def test_eval_mode_keeps_full_logits(tiny, batch) -> None:
    model, _ = tiny
    model.eval()
    with torch.no_grad():
        output = model(batch)
    assert output.logits.shape == (*batch.input_ids.shape, model.llava.lm_head.out_features)
