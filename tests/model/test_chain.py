"""Chained decoding (`--chain_token`, CoReS's `[SEG_SEMA]`): the token's ids, the link rule,
both decoder passes against a composition by hand, gradients through the mask prompt, batching,
the static graph, the coarse-mask loss and generation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model.builder import ModelConfig, build_segmenter
from model.checkpoint import read_segmenter_config, save_merged
from model.generate import generate
from model.losses import DICE_EPS, DICE_SCALE
from model.segmenter import EMPTY_MASK_LOGIT
from model.tiny import build_tiny_segmenter, build_tiny_tokenizer
from model.tokens import (
    IMAGE_TOKEN,
    REJ_TOKEN,
    SEG_TOKEN,
    TokenIds,
    add_segmentation_tokens,
    chain_links,
)
from tests.helpers import Conversation, generation_prompts, make_batch, rig_greedy_answer

CHAIN = "[SEG_SEMA]"
CORES_ANSWER = f"It usually appears on {CHAIN}. It is [SEG]."
TOLERANCE = 1e-5
SIZES = [(40, 56), (48, 30), (32, 32)]
# chained, plain, a linked [REJ], no target, two chained and one plain target in one answer,
# two chain tokens in a row (the later one prompts), over three images
MIXED = [
    Conversation(0, "Where is the dog?", CORES_ANSWER),
    Conversation(0, "Segment the red circle.", "Sure, [SEG]."),
    Conversation(1, "Where is the cat?", f"It usually appears on {CHAIN}. It is [REJ]."),
    Conversation(1, "What colour is the circle?", "It is red."),
    Conversation(
        1, "Segment the star and the car.", f"{CHAIN} [SEG] and {CHAIN} [SEG], also [SEG]."
    ),
    Conversation(2, "Where is the house?", f"{CHAIN} {CHAIN} [SEG]."),
]
MIXED_TARGET_IS_REJ = [[False, False], [True, False, False, False], [False]]
MIXED_COARSE_SOURCE = [[0, -1], [0, 1, 2, -1], [1]]
MIXED_COARSE_COUNTS = [1, 3, 2]


@pytest.fixture
def chained(tiny_dir):
    return build_tiny_segmenter(tiny_dir, seed=0, chain_token=CHAIN)


def ground_truth(target_is_rej: list[list[bool]], sizes, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for rej, (height, width) in zip(target_is_rej, sizes, strict=True):
        image = torch.randint(0, 2, (len(rej), height, width), generator=generator)
        image[torch.tensor(rej, dtype=torch.bool)] = 0
        masks.append(image.to(torch.uint8))
    return masks


def mixed_batch(model, tokenizer, with_masks: bool = True):
    masks = ground_truth(MIXED_TARGET_IS_REJ, SIZES) if with_masks else None
    return make_batch(model, tokenizer, SIZES, MIXED, masks)


def without_dropout(model) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# --- tokens and links ---
def test_the_chain_token_is_added_after_seg_and_rej_with_one_id() -> None:
    tokenizer = build_tiny_tokenizer()
    size = len(tokenizer)
    ids = add_segmentation_tokens(tokenizer, use_mm_start_end=True, chain_token=CHAIN)
    assert (ids.seg, ids.rej, ids.chain) == (size, size + 1, size + 2)
    assert (ids.im_start, ids.im_end) == (size + 3, size + 4)
    assert tokenizer.convert_ids_to_tokens(ids.chain) == CHAIN
    assert add_segmentation_tokens(build_tiny_tokenizer(), use_mm_start_end=True).chain is None


def test_a_chain_token_already_in_the_vocabulary_keeps_its_id() -> None:
    tokenizer = build_tiny_tokenizer()
    size = len(tokenizer)
    tokenizer.add_tokens([CHAIN])
    ids = add_segmentation_tokens(tokenizer, use_mm_start_end=False, chain_token=CHAIN)
    assert (ids.chain, ids.seg, ids.rej) == (size, size + 1, size + 2)


@pytest.mark.parametrize("strip", [False, True], ids=["hf", "lisa_whitespace"])
def test_the_chain_token_is_split_out_exactly_as_seg(strip: bool) -> None:
    tokenizer = build_tiny_tokenizer()
    ids = add_segmentation_tokens(tokenizer, True, strip_whitespace=strip, chain_token=CHAIN)
    with_seg = tokenizer.encode(CORES_ANSWER.replace(CHAIN, SEG_TOKEN), add_special_tokens=False)
    with_chain = tokenizer.encode(CORES_ANSWER, add_special_tokens=False)
    first = with_seg.index(ids.seg)
    assert with_chain == [*with_seg[:first], ids.chain, *with_seg[first + 1 :]]
    lone_marker = tokenizer.convert_tokens_to_ids("\u2581")
    assert (with_chain[first - 1] == lone_marker) is not strip


@pytest.mark.parametrize("token", [SEG_TOKEN, REJ_TOKEN, IMAGE_TOKEN, "", " "])
def test_a_chain_token_that_is_reserved_or_empty_stops(token: str) -> None:
    with pytest.raises(ValueError, match=r"--chain_token .*expected a non-empty token other than"):
        add_segmentation_tokens(build_tiny_tokenizer(), True, chain_token=token)


def test_token_ids_saved_without_chain_still_load() -> None:
    saved = {"seg": 5, "rej": 6, "image": 7, "pad": 0, "bos": 1, "eos": 2}
    ids = TokenIds(**saved, im_start=None, im_end=None)
    assert ids.chain is None and ids.to_dict()["chain"] is None
    assert TokenIds(**ids.to_dict()) == ids


def test_each_target_links_to_the_last_chain_token_since_the_previous_target() -> None:
    # conversation 0: chain 3, target 5, target 8, chain 9, chain 10, target 12;
    # conversation 1: target 2, chain 4 (nothing after it); conversation 2: chain 1, target 6
    conv = torch.tensor([0, 0, 0, 1, 2])
    position = torch.tensor([5, 8, 12, 2, 6])
    chain_conv = torch.tensor([0, 0, 0, 1, 2])
    chain_position = torch.tensor([3, 9, 10, 4, 1])
    links = chain_links(conv, position, chain_conv, chain_position)
    assert links.tolist() == [0, -1, 2, -1, 4]
    assert chain_links(conv, position, chain_conv[:0], chain_position[:0]).tolist() == [-1] * 5


# --- the two passes against a composition by hand ---
def by_hand(model, batch):
    """Per image (final [SEG] masks [s_i, H, W], coarse masks [c_i, H, W]) composed with
    transformers' SAM modules called directly, conversation by conversation in token order."""
    sam, ids = model.sam, model.token_ids
    hidden = model.hidden_states(batch)
    no_mask = sam.prompt_encoder(None, None, None, None)[1]
    finals = [[] for _ in SIZES]
    coarse = [[] for _ in SIZES]

    def decode(image, state, dense):
        embedding = sam.get_image_embeddings(batch.sam_pixels[image : image + 1])
        prompt = model.text_hidden_fcs[0](state)
        low, _ = sam.mask_decoder(
            image_embeddings=embedding,
            image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=prompt[None, None, None],
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low[0, 0]  # [1, 4g, 4g]

    for row in range(len(batch.input_ids)):
        image = int(batch.conv_image[row])
        pending = None
        for position, token in enumerate(batch.input_ids[row].tolist()):
            if token == ids.chain:
                pending = decode(image, hidden[row, position - 1], no_mask)
                coarse[image].append(resize(pending, batch, image))
            elif token == ids.seg:
                dense = (
                    no_mask
                    if pending is None
                    else sam.prompt_encoder(None, None, None, pending[None])[1]
                )
                finals[image].append(
                    resize(decode(image, hidden[row, position - 1], dense), batch, image)
                )
                pending = None
            elif token == ids.rej:
                pending = None
    return [
        (torch.cat(f) if f else None, torch.cat(c) if c else None)
        for f, c in zip(finals, coarse, strict=True)
    ]


def resize(low, batch, image):
    """SAM's post-processing written out: [1, 4g, 4g] -> [1, H, W]."""
    size = batch.sam_pixels.shape[-1]
    resized_h, resized_w = batch.resized_sizes[image].tolist()
    up = F.interpolate(low[None], (size, size), mode="bilinear", align_corners=False)
    cropped = up[..., :resized_h, :resized_w]
    original = tuple(batch.original_sizes[image].tolist())
    return F.interpolate(cropped, original, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def test_the_second_pass_gets_the_first_pass_logits_of_its_chain_token(chained) -> None:
    model, tokenizer = chained
    model.eval()
    batch = mixed_batch(model, tokenizer)
    output = model(batch)
    assert [r.tolist() for r in output.target_is_rej] == MIXED_TARGET_IS_REJ
    assert [s.tolist() for s in output.coarse_source] == MIXED_COARSE_SOURCE
    assert [len(m) for m in output.coarse_masks] == MIXED_COARSE_COUNTS
    for image, (finals, coarse) in enumerate(by_hand(model, batch)):
        seg = ~output.target_is_rej[image]
        torch.testing.assert_close(output.pred_masks[image][seg], finals, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(output.coarse_masks[image], coarse, atol=TOLERANCE, rtol=0)
        assert (output.pred_masks[image][~seg] == EMPTY_MASK_LOGIT).all()
    # the mask prompt matters: the same [SEG] decoded with no mask prompt differs
    plain = replace(model.token_ids, chain=None)
    model.token_ids = plain
    unchained = model(batch)
    difference = (unchained.pred_masks[0][0] - output.pred_masks[0][0]).abs().max()
    assert difference > 100 * TOLERANCE
    torch.testing.assert_close(
        unchained.pred_masks[0][1], output.pred_masks[0][1], atol=TOLERANCE, rtol=0
    )


def single(batch, row: int):
    """Conversation `row` of a batch as a batch of its own, with its image."""
    image = int(batch.conv_image[row])
    length = int(batch.attention_mask[row].sum())
    return replace(
        batch,
        input_ids=batch.input_ids[row : row + 1, :length],
        attention_mask=batch.attention_mask[row : row + 1, :length],
        labels=batch.labels[row : row + 1, :length],
        conv_image=torch.zeros(1, dtype=torch.long),
        clip_pixels=batch.clip_pixels[image : image + 1],
        sam_pixels=batch.sam_pixels[image : image + 1],
        resized_sizes=batch.resized_sizes[image : image + 1],
        original_sizes=batch.original_sizes[image : image + 1],
        gt_masks=None,
        image_paths=batch.image_paths[image : image + 1],
    )


@torch.no_grad()
def test_a_mixed_batch_gives_what_each_conversation_gives_alone(chained) -> None:
    model, tokenizer = chained
    model.eval()
    batch = mixed_batch(model, tokenizer, with_masks=False)
    together = model(batch)
    ids = model.token_ids
    taken_targets = [0] * len(SIZES)
    taken_coarse = [0] * len(SIZES)
    for row in range(len(MIXED)):
        image = int(batch.conv_image[row])
        alone = model(single(batch, row))
        k, c = len(alone.pred_masks[0]), len(alone.coarse_masks[0])
        tokens = batch.input_ids[row].tolist()
        assert k == tokens.count(ids.seg) + tokens.count(ids.rej) and c == tokens.count(ids.chain)
        targets = slice(taken_targets[image], taken_targets[image] + k)
        coarse = slice(taken_coarse[image], taken_coarse[image] + c)
        torch.testing.assert_close(
            alone.pred_masks[0], together.pred_masks[image][targets], atol=TOLERANCE, rtol=0
        )
        torch.testing.assert_close(
            alone.coarse_masks[0], together.coarse_masks[image][coarse], atol=TOLERANCE, rtol=0
        )
        source = together.coarse_source[image][targets]
        assert torch.equal(
            alone.coarse_source[0], torch.where(source >= 0, source - coarse.start, -1)
        )
        taken_targets[image] += k
        taken_coarse[image] += c


# --- gradients ---
def chain_state_gradient(model, tokenizer, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the final-mask loss alone w.r.t. the projector's input rows [T + P + 1, H]
    (targets, chain tokens, anchor) for one conversation with one [SEG]."""
    batch = make_batch(
        model,
        tokenizer,
        SIZES[:1],
        [Conversation(0, "Where?", answer)],
        ground_truth([[False]], SIZES[:1]),
    )
    captured = []

    def keep(_module, inputs):
        inputs[0].retain_grad()
        captured.append(inputs[0])

    hook = model.text_hidden_fcs[0].register_forward_pre_hook(keep)
    model.zero_grad(set_to_none=True)
    model(batch).mask_loss.backward()
    hook.remove()
    (states,) = captured
    return states.grad, model.text_hidden_fcs[0][0].weight.grad


def test_the_final_mask_loss_reaches_the_chain_tokens_state_through_both_passes(chained) -> None:
    model, tokenizer = chained
    without_dropout(model)
    grad, projector = chain_state_gradient(model, tokenizer, CORES_ANSWER)
    assert grad.shape[0] == 3  # [SEG], [SEG_SEMA], anchor
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0 and grad[2].abs().sum() == 0
    assert projector.abs().sum() > 0
    # a chain token after the target prompts nothing: its state gets exactly no gradient
    grad, _ = chain_state_gradient(model, tokenizer, f"It is [SEG]. It usually appears on {CHAIN}.")
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0


# --- the static graph ---
def count_calls(model, batch) -> dict[str, int]:
    calls = {"projector": 0, "mask_embed": 0, "decoder": 0}
    modules = {
        "projector": model.text_hidden_fcs[0],
        "mask_embed": model.sam.prompt_encoder.mask_embed,
        "decoder": model.sam.mask_decoder,
    }
    hooks = [
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in modules.items()
    ]
    output = model(batch)
    for hook in hooks:
        hook.remove()
    output.loss.backward()
    return calls


BATCHES = {
    "mixed": (MIXED, MIXED_TARGET_IS_REJ),
    "no_chain_token": ([Conversation(0, "Segment the circle.", "Sure, [SEG].")], [[False]]),
    "no_seg": (
        [
            Conversation(0, "Where is the cat?", f"It usually appears on {CHAIN}. It is [REJ]."),
            Conversation(1, "What colour is it?", "It is red."),
        ],
        [[True], []],
    ),
    "no_target": ([Conversation(0, "What colour is it?", "It is red.")], [[]]),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_every_batch_runs_projector_once_mask_embed_once_decoder_twice(chained, name) -> None:
    model, tokenizer = chained
    without_dropout(model)
    conversations, rej = BATCHES[name]
    sizes = SIZES[: len(rej)]
    batch = make_batch(model, tokenizer, sizes, conversations, ground_truth(rej, sizes))
    assert count_calls(model, batch) == {"projector": 1, "mask_embed": 1, "decoder": 2}
    for parameter_name, parameter in model.named_parameters():
        if parameter.requires_grad and "iou_prediction_head" not in parameter_name:
            assert parameter.grad is not None, parameter_name


@pytest.mark.parametrize("name", list(BATCHES))
def test_without_a_chain_token_one_decoder_call_and_the_same_masks(chained, name) -> None:
    model, tokenizer = chained
    model.eval()
    conversations, rej = BATCHES[name]
    sizes = SIZES[: len(rej)]
    batch = make_batch(model, tokenizer, sizes, conversations, ground_truth(rej, sizes))
    with torch.no_grad():
        chained_output = model(batch)
    model.token_ids = replace(model.token_ids, chain=None)
    assert count_calls(model, batch) == {"projector": 1, "mask_embed": 0, "decoder": 1}
    with torch.no_grad():
        plain = model(batch)
    assert all(len(masks) == 0 for masks in plain.coarse_masks)
    assert all((source == -1).all() for source in plain.coarse_source)
    if name == "no_chain_token":  # no chain token in the text: the chained path changes nothing
        torch.testing.assert_close(
            plain.pred_masks, chained_output.pred_masks, atol=TOLERANCE, rtol=0
        )
        torch.testing.assert_close(plain.loss, chained_output.loss, atol=TOLERANCE, rtol=0)


# --- the coarse-mask loss ---
def bce_and_dice_by_hand(preds: list[torch.Tensor], gts: list[torch.Tensor]):
    """LISA's per-mask BCE (pixel mean) and Dice, averaged over the masks (no ignore pixels)."""
    bce, dice = [], []
    for pred, gt in zip(preds, gts, strict=True):
        target = gt.float()
        bce.append(F.binary_cross_entropy_with_logits(pred, target))
        prob = pred.sigmoid() / DICE_SCALE
        numerator = 2 * (prob * target).sum() + DICE_EPS
        dice.append(1 - numerator / (prob.sum() + target.sum() / DICE_SCALE + DICE_EPS))
    return torch.stack(bce).mean(), torch.stack(dice).mean()


@pytest.mark.parametrize("supervise_coarse", [False, True], ids=["final_only", "with_coarse"])
@torch.no_grad()
def test_supervise_coarse_adds_each_linked_coarse_mask_against_its_targets_truth(
    tiny_dir, supervise_coarse
) -> None:
    model, tokenizer = build_tiny_segmenter(
        tiny_dir, chain_token=CHAIN, supervise_coarse=supervise_coarse
    )
    model.eval()
    conversations = [MIXED[0], MIXED[1], MIXED[2]]  # chained, plain, chained [REJ]
    rej = [[False, False], [True]]
    gts = ground_truth(rej, SIZES[:2])
    output = model(make_batch(model, tokenizer, SIZES[:2], conversations, gts))
    preds, targets = [output.pred_masks[0][0], output.pred_masks[0][1]], [gts[0][0], gts[0][1]]
    if supervise_coarse:  # image 0's coarse mask prompts its first [SEG]; image 1's a [REJ]
        preds.append(output.coarse_masks[0][0])
        targets.append(gts[0][0])
    bce, dice = bce_and_dice_by_hand(preds, targets)
    torch.testing.assert_close(output.mask_bce_loss, bce, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output.mask_dice_loss, dice, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output.mask_loss, 2.0 * bce + 0.5 * dice, atol=1e-6, rtol=1e-6)


def test_supervise_coarse_without_a_chain_token_stops(tiny_dir) -> None:
    with pytest.raises(ValueError, match="supervise_coarse needs a chain token"):
        build_tiny_segmenter(tiny_dir, supervise_coarse=True)


# --- generation and checkpoints ---
def test_generation_decodes_the_chain_as_teacher_forcing_does(tmp_path) -> None:
    model, tokenizer = build_tiny_segmenter(tmp_path, seed=0, lora_r=0, chain_token=CHAIN)
    model.eval()
    questions = [Conversation(0, "Where is the dog?", ""), Conversation(1, "What is it?", "")]
    batch = generation_prompts(model, tokenizer, SIZES[:2], questions)
    ids = model.token_ids
    plan = [ids.chain, ids.seg, ids.eos]
    rig_greedy_answer(model, batch, plan)
    out = generate(model, batch, max_new_tokens=8)
    assert out.sequences[0].tolist() == plan
    assert out.coarse_conv[0].tolist() == [0] and out.coarse_source[0].tolist() == [0]
    prompt_length = int(batch.attention_mask[0].sum())
    input_ids = torch.cat([batch.input_ids[0, :prompt_length], out.sequences[0]])[None]
    forced = replace(
        single(replace(batch, labels=torch.zeros_like(batch.input_ids)), 0),
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids, dtype=torch.bool),
        labels=None,
    )
    with torch.no_grad():
        teacher = model(forced)
    torch.testing.assert_close(out.pred_masks[0], teacher.pred_masks[0], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(out.coarse_masks[0], teacher.coarse_masks[0], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        out.coarse_scores[0], teacher.coarse_scores[0], atol=TOLERANCE, rtol=0
    )


def test_a_merged_checkpoint_keeps_its_chain_token(tiny_dir, tmp_path) -> None:
    model, tokenizer = build_tiny_segmenter(tiny_dir, seed=0, lora_r=0, chain_token=CHAIN)
    directory = save_merged(
        model,
        tokenizer,
        tmp_path / "merged",
        source_version=tiny_dir / "llava_tiny",
        conv_type="llava_v1",
    )
    config = ModelConfig(
        version=str(directory),
        vision_pretrained="",
        precision="fp32",
        lora_r=0,
        gradient_checkpointing=False,
    )
    for requested in (None, CHAIN):
        loaded, _ = build_segmenter(replace(config, chain_token=requested))
        assert loaded.token_ids == model.token_ids and loaded.token_ids.chain is not None
    assert read_segmenter_config(directory).ids == model.token_ids


def test_a_merged_checkpoint_without_chaining_can_be_fine_tuned_with_a_chain(tiny_dir, tmp_path):
    model, tokenizer = build_tiny_segmenter(tiny_dir, seed=0, lora_r=0)
    directory = save_merged(
        model,
        tokenizer,
        tmp_path / "merged",
        source_version=tiny_dir / "llava_tiny",
        conv_type="llava_v1",
    )
    config = ModelConfig(
        version=str(directory),
        vision_pretrained="",
        precision="fp32",
        lora_r=0,
        gradient_checkpointing=False,
        chain_token=CHAIN,
    )
    loaded, loaded_tokenizer = build_segmenter(config)
    assert replace(loaded.token_ids, chain=None) == model.token_ids
    assert loaded.token_ids.chain == len(tokenizer) == len(loaded_tokenizer) - 1
    assert loaded.llava.get_input_embeddings().weight.shape[0] == len(loaded_tokenizer)
