"""Greedy generation with masks: the model writes its answer and every generated `[SEG]` gets a
mask decoded from the hidden state that predicted it.

With the KV cache (the default) each step feeds only the new token; the hidden state whose
logits chose a `[SEG]` or `[REJ]` is captured at that step, which is the state teacher-forced
training projects (the one *before* the token). LISA instead re-ran the whole sequence, vision
tower included, at every step and scanned the last step's hidden states; `use_cache=False` does
that (same tokens, same masks; kept for the benchmark and the equality test).

Prompts arrive right-padded (as `utils.collate.collate` builds them) and are left-padded here,
with explicit position ids, so that all rows append their new tokens in the same column.
After generation the projector and the mask decoder run once for the whole batch (twice with a
chain token, whose predicting states are captured like `[SEG]`'s and linked to the targets as
in training), through `Segmenter.project` and `Segmenter.decode` (the same code as training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from model.backbone import (
    image_features,
    language_model_step,
    next_positions,
    per_conversation,
    prompt_positions,
)
from model.batch import Batch
from model.segmenter import Segmenter, Targets, find_chains


@dataclass
class Generation:
    """Greedy answers of a batch of C prompts on N images.

    sequences: per conversation long [n_c], the generated ids (ending with EOS when reached).
    target_conv: per image long [k_i], the conversation of each generated `[SEG]`/`[REJ]`,
        targets in order (conversation by conversation, then as generated).
    target_is_rej: per image bool [k_i].
    pred_masks: per image float32 [k_i, H_i, W_i] mask logits at the original size
        (`[REJ]` rows hold `EMPTY_MASK_LOGIT`).
    mask_scores: per image float32 [k_i], SAM's predicted IoU (0 for `[REJ]`).
    steps: decoding steps run (the longest answer, or max_new_tokens).
    coarse_masks: per image float32 [c_i, H_i, W_i], the generated chain tokens' mask logits at
        the original size, in order ([0, H_i, W_i] without chaining).
    coarse_scores: per image float32 [c_i], SAM's predicted IoU of each coarse mask.
    coarse_source: per image long [k_i], the index of the image's coarse mask that prompted each
        target, -1 for a plain target.
    coarse_conv: per image long [c_i], the conversation of each coarse mask.
    """

    sequences: list[torch.Tensor]
    target_conv: list[torch.Tensor]
    target_is_rej: list[torch.Tensor]
    pred_masks: list[torch.Tensor]
    mask_scores: list[torch.Tensor]
    steps: int
    coarse_masks: list[torch.Tensor] = field(default_factory=list)
    coarse_scores: list[torch.Tensor] = field(default_factory=list)
    coarse_source: list[torch.Tensor] = field(default_factory=list)
    coarse_conv: list[torch.Tensor] = field(default_factory=list)


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
    """Right-padded [C, L] ids and mask -> left-padded ids, mask and position ids [C, L]."""
    lengths = attention_mask.sum(dim=1)
    shift = (input_ids.shape[1] - lengths)[:, None]
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    source = (columns - shift) % input_ids.shape[1]
    padded_mask = columns >= shift
    padded_ids = torch.where(padded_mask, input_ids.gather(1, source), pad_id)
    positions = (columns - shift).clamp(min=0)
    return padded_ids, padded_mask, positions


@dataclass
class _Decoding:
    """Loop state: ids so far [C, L + t], their mask, positions of all columns ([C, L + t], or
    [3, C, L + t] for multimodal rotary positions), captures, and an anchor state [H] (the
    prompt's first position) for batches without any `[SEG]`."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    finished: torch.Tensor
    generated: list[list[int]]
    captured: list[tuple[int, int, torch.Tensor]]
    anchor: torch.Tensor


def _greedy_step(model: Segmenter, state: _Decoding, hidden_last: torch.Tensor, step: int):
    """Choose each unfinished row's next token from its last hidden state [C, H]; capture the
    states that predict `[SEG]`/`[REJ]` (and the chain token). Returns the tokens fed next [C]."""
    ids = model.token_ids
    captured_tokens = (ids.seg, ids.rej) if ids.chain is None else (ids.seg, ids.rej, ids.chain)
    tokens = model.llava.lm_head(hidden_last).argmax(dim=-1)
    tokens = torch.where(state.finished, ids.eos, tokens)
    for row in torch.nonzero(~state.finished).squeeze(1).tolist():
        token = int(tokens[row])
        state.generated[row].append(token)
        if token in captured_tokens:
            state.captured.append((row, step, hidden_last[row]))
    state.finished |= tokens == ids.eos
    return tokens


def _decode_tokens(
    model: Segmenter,
    batch: Batch,
    max_new_tokens: int,
    use_cache: bool,
    any_rank_unfinished: Callable[[bool], bool],
) -> tuple[_Decoding, int]:
    """The autoregressive loop; returns its final state and the number of steps run."""
    llava = model.llava
    ids, mask, positions = left_pad(batch.input_ids, batch.attention_mask, model.token_ids.pad)
    grids = None if batch.image_grid is None else batch.image_grid[batch.conv_image]
    positions = prompt_positions(llava, ids, mask, positions, grids)
    features = per_conversation(
        image_features(llava, batch.clip_pixels, batch.image_grid), batch.conv_image
    )
    hidden, cache = language_model_step(llava, ids, mask, features, positions, None, use_cache)
    state = _Decoding(
        ids=ids,
        mask=mask,
        positions=positions,
        finished=torch.zeros(len(ids), dtype=torch.bool, device=ids.device),
        generated=[[] for _ in range(len(ids))],
        captured=[],
        anchor=hidden[0, 0],
    )
    steps = 0
    while True:
        tokens = _greedy_step(model, state, hidden[:, -1], steps)
        steps += 1
        if steps >= max_new_tokens or not any_rank_unfinished(not bool(state.finished.all())):
            break
        state.ids = torch.cat([state.ids, tokens[:, None]], dim=1)
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(ids), 1)], dim=1)
        new_positions = next_positions(state.positions)
        state.positions = torch.cat([state.positions, new_positions], dim=-1)
        if use_cache:
            hidden, cache = language_model_step(
                llava, tokens[:, None], state.mask, None, new_positions, cache, True
            )
        else:
            # the old way re-ran everything, the vision tower included, at every step
            features = per_conversation(
                image_features(llava, batch.clip_pixels, batch.image_grid), batch.conv_image
            )
            hidden, _ = language_model_step(llava, state.ids, state.mask, features, state.positions)
    return state, steps


def _positions(captured: list[tuple[int, int, torch.Tensor]], state: _Decoding, device):
    """Captures (conversation, step, state [H]) -> conv long [n], step long [n], states [n, H]."""
    conv = torch.tensor([row for row, _, _ in captured], dtype=torch.long, device=device)
    step = torch.tensor([s for _, s, _ in captured], dtype=torch.long, device=device)
    # stacked with the anchor, then dropped: an empty capture still gives [0, H]
    states = torch.stack([hidden for _, _, hidden in captured] + [state.anchor])[:-1]
    return conv, step, states


def _targets(state: _Decoding, batch: Batch, model: Segmenter):
    """Captured states ordered by (conversation, step) -> (Targets, states [T, H], chain
    states [P, H] or None without a chain token)."""
    ids = model.token_ids
    captured = sorted(state.captured, key=lambda capture: capture[:2])
    token = [state.generated[row][step] for row, step, _ in captured]
    targets = [c for c, t in zip(captured, token, strict=True) if t in (ids.seg, ids.rej)]
    chained = [c for c, t in zip(captured, token, strict=True) if t == ids.chain]
    device = batch.conv_image.device
    conv, step, states = _positions(targets, state, device)
    is_rej = torch.tensor(
        [state.generated[row][s] == ids.rej for row, s, _ in targets],
        dtype=torch.bool,
        device=device,
    )
    counts = torch.bincount(batch.conv_image[conv], minlength=batch.num_images).tolist()
    if ids.chain is None:
        return Targets(conv, step, is_rej, counts), states, None
    chain_conv, chain_step, chain_states = _positions(chained, state, device)
    chains = find_chains(batch.conv_image, batch.num_images, conv, step, chain_conv, chain_step)
    return Targets(conv, step, is_rej, counts, chains), states, chain_states


def generate(
    model: Segmenter,
    batch: Batch,
    max_new_tokens: int = 512,
    use_cache: bool = True,
    any_rank_unfinished: Callable[[bool], bool] = bool,
    decode_rejected: bool = False,
) -> Generation:
    """Greedy answers and masks for a batch of generation prompts (no labels, no GT masks).

    At least one token is generated per row; rows stop at EOS or after `max_new_tokens`.

    batch.input_ids end each row with the prompt (e.g. "... ASSISTANT:"), right-padded.
    any_rank_unfinished: given whether this rank still generates, whether any rank does; the
    default (this rank alone) suits one process, evaluation passes a collective so that every
    rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
    decode_rejected: also decode a mask from the state that predicted each `[REJ]` (GSVA's
    gRefCOCO protocol scores every target's mask; that state is the one a `[SEG]` in its
    place would have had, as attention is causal).
    """
    with torch.no_grad():
        state, steps = _decode_tokens(model, batch, max_new_tokens, use_cache, any_rank_unfinished)
        targets, states, chain_states = _targets(state, batch, model)
        embeddings = model.encode_images(batch.sam_pixels)
        # one projector call, as in training (the anchor row is Segmenter.forward's)
        prompts, chain_prompts, anchor = model.project(states, chain_states, state.anchor)
        decoding = replace(targets, is_rej=torch.zeros_like(targets.is_rej))
        decoded = model.decode(
            embeddings,
            prompts,
            chain_prompts,
            anchor,
            decoding if decode_rejected else targets,
            replace(batch, gt_masks=None),
        )
    counts = targets.counts
    chains = targets.chains
    return Generation(
        sequences=[torch.tensor(tokens, dtype=torch.long) for tokens in state.generated],
        target_conv=list(targets.conv.split(counts)),
        target_is_rej=list(targets.is_rej.split(counts)),
        pred_masks=decoded.masks,
        mask_scores=decoded.scores,
        steps=steps,
        coarse_masks=decoded.coarse_masks,
        coarse_scores=decoded.coarse_scores,
        coarse_source=decoded.coarse_source,
        coarse_conv=(
            [conv[:0] for conv in targets.conv.split(counts)]
            if chains is None
            else list(chains.conv.split(chains.counts))
        ),
    )
