"""Padding-free packing (`--packing`, model.packing): the pack plan on hand cases, and the packed
language-model pass equal to the padded one (losses, hidden states at every non-padding position,
[SEG] states, masks, gradients) on a real collated batch of the tiny assets that mixes families
and lengths: a VQA dialogue, chained CoReS answers, several conversations per image."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model.backbone import (
    attention_layout,
    image_features,
    language_model_step,
    per_conversation,
)
from model.packing import (
    BOUNDS,
    VARLEN_SDPA,
    loaded_attn_implementation,
    pack,
    packing_enabled,
    plan_packing,
    row_capacity,
    unpack,
)
from model.tiny import build_tiny_segmenter
from model.tokens import predictor_mask
from tests.helpers import forward_backward
from utils.collate import SampleProcessor, collate
from utils.config import parse_args
from utils.datasets.mixer import HybridDataset, build_sources

ATOL = 1e-5
DRAWS = 4  # draws of each recipe in the batch (seed 1: VQA, chained answers, multi-conversation)
PAD = -1


@pytest.mark.parametrize(
    ("lengths", "capacity", "rows", "offsets", "width"),
    [
        ([3, 2, 4, 1], 5, [[0, 1], [2, 3]], [0, 3, 0, 4], 5),  # rows filled exactly
        ([4, 3, 2], 6, [[0, 2], [1]], [0, 0, 4], 6),  # first fit, not next fit
        ([3, 3, 3], 6, [[0, 1], [2]], [0, 3, 0], 6),  # the bound caps a row
        ([2, 7, 3, 1], 5, [[0, 2], [1], [3]], [0, 0, 2, 0], 7),  # 7 > bound: alone in its row
    ],
)
def test_plan_is_first_fit_in_order(lengths, capacity, rows, offsets, width) -> None:
    plan = plan_packing(lengths, capacity)
    assert plan.rows == rows and plan.offsets == offsets and plan.width == width


def test_pack_restarts_positions_and_unpack_inverts() -> None:
    input_ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9], [10, 0, 0, 0]])
    mask = input_ids != 0
    packed = pack(input_ids, mask, PAD, "eager")  # rows of L = 4 tokens: 3 + 2 does not fit
    assert packed.input_ids.tolist() == [[1, 2, 3, 10], [4, 5, PAD, PAD], [6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 3]]
    assert packed.order.tolist() == [0, 3, 1, 2]
    hidden = packed.input_ids.float().unsqueeze(-1)  # [R, W, 1]
    expected = torch.where(mask, input_ids, 0).float().unsqueeze(-1)
    assert torch.equal(unpack(hidden, packed, *input_ids.shape), expected)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_packs_into_one_row(implementation: str) -> None:
    """transformers' flash-attention takes the varlen path only for a batch of one row (with
    several rows it would attend across conversations), so everything goes into one row."""
    input_ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    packed = pack(input_ids, input_ids != 0, PAD, implementation)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert row_capacity([3, 2, 4], 4, implementation) == 9
    assert row_capacity([3, 2, 4], 4, VARLEN_SDPA) == 9
    assert row_capacity([3, 2, 4], 4, "eager") == 4


def test_sdpa_models_pack_into_one_row_with_the_conversation_bounds() -> None:
    """sdpa models are loaded with VARLEN_SDPA, whose packed row carries where each
    conversation starts (and the row's end) down to the attention."""
    assert loaded_attn_implementation("sdpa") == VARLEN_SDPA
    assert loaded_attn_implementation("eager") == "eager"
    input_ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    packed = pack(input_ids, input_ids != 0, PAD, VARLEN_SDPA)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert packed.attention_kwargs == {BOUNDS: (0, 3, 5, 9)}
    assert pack(input_ids, input_ids != 0, PAD, "eager").attention_kwargs == {}


def test_unset_packing_is_on_for_the_varlen_implementations() -> None:
    assert packing_enabled(None, "flash_attention_2") and packing_enabled(None, "sdpa")
    assert not packing_enabled(None, "eager")
    assert packing_enabled(True, "sdpa") and not packing_enabled(False, "flash_attention_2")


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def cores_batch(assets: Path, request):
    """The tiny segmenter (each attention implementation) with CoReS's chain token, train mode
    without dropout, and one collated batch of CoReS recipe draws (long: an in-context example)
    and VQA / semantic draws of the default template (short enough to share rows)."""
    common = [f"--dataset_dir={assets / 'dataset'}", "--seed=1"]
    config = parse_args(["--recipe", "cores", *common])
    model, tokenizer = build_tiny_segmenter(
        assets, chain_token=config.chain_token, attn_implementation=request.param
    )
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    processor = SampleProcessor.for_model(
        model, tokenizer, str(assets / "llava_tiny"), config.conv_type, config.model_max_length
    )
    plain = SampleProcessor.for_model(model, tokenizer, str(assets / "llava_tiny"))
    processed, sources = [], []
    short = parse_args([*common, "--dataset=vqa||sem_seg", "--sample_rates=1,1"])
    for recipe, process in ((config, processor), (short, plain)):
        data = recipe.data_config()
        mix = HybridDataset(build_sources(data), data.sample_rates, DRAWS, data.seed)
        samples = [mix[index] for index in range(DRAWS)]
        processed += [process(sample) for sample in samples]
        sources += [sample.source for sample in samples]
    return model, collate(processed, model.token_ids.pad), sources


def test_the_batch_mixes_what_packing_must_handle(cores_batch) -> None:
    model, batch, sources = cores_batch
    lengths = batch.attention_mask.sum(dim=1)
    assert any(source.startswith("vqa/") for source in sources)
    assert bool((batch.input_ids == model.token_ids.chain).any())
    assert int(torch.bincount(batch.conv_image).max()) > 1
    assert int(lengths.min()) < int(lengths.max())
    plan = plan_packing(lengths.tolist(), batch.input_ids.shape[1])
    assert len(plan.rows) < batch.input_ids.shape[0]  # something is actually packed


def forward_backward_states(model, batch, packing: bool):
    """(output, gradients, hidden states [C, L, H]) of one path."""
    output, grads = forward_backward(model, batch, packing=packing)
    with torch.no_grad():
        hidden = model.hidden_states(batch)
    return output, grads, hidden


def test_packed_forward_backward_equals_padded(cores_batch) -> None:
    model, batch, _ = cores_batch
    padded, padded_grads, padded_hidden = forward_backward_states(model, batch, packing=False)
    packed, packed_grads, packed_hidden = forward_backward_states(model, batch, packing=True)
    model.packing = False
    for name in ("loss", "ce_loss", "mask_loss"):
        assert getattr(packed, name).item() == pytest.approx(getattr(padded, name).item(), abs=ATOL)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(packed_hidden[real], padded_hidden[real], rtol=0, atol=ATOL)
    assert not packed_hidden[~real].any()
    seg = predictor_mask(batch.input_ids, model.token_ids.seg)
    assert int(seg.sum()) > 0
    torch.testing.assert_close(packed_hidden[seg], padded_hidden[seg], rtol=0, atol=ATOL)
    for ours, theirs in zip(packed.pred_masks, padded.pred_masks, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=0, atol=ATOL, msg=name)


def row_states(
    model, batch, features, contiguous: bool, bounds: bool = True, layout: str = ""
) -> torch.Tensor:
    """Packed hidden states [C, L, H] with the rows `pack` cuts for the attention
    implementation `layout` (default: the model's); `contiguous` numbers each row's positions
    0..W-1 instead of restarting them per conversation; `bounds=False` leaves out the
    conversation bounds a VARLEN_SDPA row carries (with `contiguous`: one causal sequence per
    row, the control)."""
    layout = layout or attention_layout(model.llava)
    packed = pack(batch.input_ids, batch.attention_mask, model.token_ids.pad, layout)
    positions = packed.position_ids
    if contiguous:
        positions = torch.arange(positions.shape[1]).expand_as(positions)
    hidden, _ = language_model_step(
        model.llava,
        packed.input_ids,
        None,
        per_conversation(features, packed.order),
        positions,
        attention_kwargs=packed.attention_kwargs if bounds else None,
    )
    return unpack(hidden, packed, *batch.input_ids.shape)


@torch.no_grad()
def test_attention_never_crosses_conversations(cores_batch) -> None:
    """Rewriting the text of the first conversation of a shared row leaves the states of the
    conversations after it in that row bit-identical; the control, the same rows as one causal
    sequence each, changes them, so the check would catch attention across conversations.
    sdpa's one row confines the attention by its conversation bounds (even where the positions
    run on), eager's rows by the restarting positions (its block-diagonal mask)."""
    model, batch, _ = cores_batch  # dropout is off: the states are deterministic
    lengths = batch.attention_mask.sum(dim=1).tolist()
    capacity = row_capacity(lengths, batch.input_ids.shape[1], attention_layout(model.llava))
    shared = next(r for r in plan_packing(lengths, capacity).rows if len(r) > 1)
    first, later = shared[0], shared[1:]
    rewritten = batch.input_ids.clone()
    text = batch.attention_mask[first].bool() & (rewritten[first] != model.token_ids.image)
    rewritten[first, text] = rewritten[first, text].flip(0)
    assert not torch.equal(rewritten[first], batch.input_ids[first])
    changed = dataclasses.replace(batch, input_ids=rewritten)
    features = per_conversation(image_features(model.llava, batch.clip_pixels), batch.conv_image)
    cases = [(False, True, False), (True, False, True)]  # (contiguous, bounds, crosses)
    if attention_layout(model.llava) == VARLEN_SDPA:
        cases.append((True, True, False))
    for contiguous, bounds, crosses in cases:
        before = row_states(model, batch, features, contiguous, bounds)[later]
        after = row_states(model, changed, features, contiguous, bounds)[later]
        assert torch.equal(before, after) != crosses


@torch.no_grad()
def test_the_one_row_layout_of_flash_attention_equals_the_padded_pass(cores_batch) -> None:
    """flash-attention's layout (every conversation in one row) run through this model's
    attention (a block-diagonal mask, no conversation bounds): image features, positions and
    unpacking line up."""
    model, batch, _ = cores_batch
    features = per_conversation(image_features(model.llava, batch.clip_pixels), batch.conv_image)
    packed = pack(batch.input_ids, batch.attention_mask, model.token_ids.pad, "flash_attention_2")
    assert packed.input_ids.shape[0] == 1
    one_row = row_states(model, batch, features, contiguous=False, layout="flash_attention_2")
    padded, _ = language_model_step(model.llava, batch.input_ids, batch.attention_mask, features)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(one_row[real], padded[real], rtol=0, atol=ATOL)
