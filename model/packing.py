"""Padding-free packing of the language model pass (`--packing`).

The C right-padded conversations [C, L] are placed first-fit, in order, into R rows (a
conversation is never split). Position ids restart at 0 for every conversation, and with
`attention_mask=None` and no KV cache the attention is confined to each conversation:
- flash-attention (`modeling_flash_attention_utils._is_packed_sequence`): the varlen kernel, but
  only for a batch of ONE row; with several rows it would attend across conversations. So every
  conversation goes into one row of sum(lengths) tokens, which the varlen kernel handles at no
  quadratic cost.
- sdpa: the model is loaded with VARLEN_SDPA, transformers' sdpa with one addition: given the
  one row's conversation bounds (BOUNDS, which `PackedBatch.attention_kwargs` passes down), it runs
  sdpa causally on each conversation's own slice, so a conversation costs its own length
  squared and nothing is padded. Without those bounds (every unpacked pass) it is transformers'
  sdpa unchanged. Its mask is sdpa's (a packed row's is block-diagonal, [1, 1, N, N] booleans,
  correct in any row layout; with the bounds the attention does not read it).
- eager (`masking_utils.find_packed_sequence_indices`): a new sequence starts wherever the
  position id does not grow by one, in every row, and the mask is block-diagonal causal. Its
  cost is quadratic in the row's width, so rows hold at most L tokens (the padded length).
A row's unused tail gets position ids 0, 1, ... too, so it is a separate sequence that no
conversation attends to. Qwen-VL's multimodal rotary positions are computed per conversation
and packed the same way, behind the restarting text positions (`pack_rope_positions`: the
[4, R, W] layout its models read). Image features follow the packed
order (LLaVA scatters them into the image tokens in row-major order). The hidden states are then
unpacked to [C, L, H], zero at padding positions (downstream reads only non-padding positions).
Generation (KV cache) never packs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

FLASH_ATTENTION_PREFIX = "flash_attention"
SDPA = "sdpa"
# the name the models are loaded with for `--attn_implementation sdpa` (module docstring)
VARLEN_SDPA = "sdpa_varlen"
# the language model's keyword argument carrying a VARLEN_SDPA row's conversation bounds down to
# its attention (transformers passes unknown keyword arguments through to the attention function)
BOUNDS = "conversation_bounds"


def packing_enabled(choice: bool | None, attn_implementation: str) -> bool:
    """`--packing`/`--no-packing` as given; unset (None): on for flash-attention and sdpa, whose
    one varlen row removes the padding's work (sdpa's runs one sdpa call per conversation: on
    CPU 1.23x the padded pass's speed at 18 % padding, not yet measured on a GPU), off for
    eager (rows bounded by L seldom hold two conversations that carry image tokens)."""
    if choice is None:
        return attn_implementation.startswith(FLASH_ATTENTION_PREFIX) or attn_implementation == SDPA
    return choice


def one_row(attn_implementation: str) -> bool:
    """Whether the implementation the model was loaded with packs everything into one varlen
    row (flash-attention, VARLEN_SDPA) rather than rows of at most L tokens (eager)."""
    return attn_implementation.startswith(FLASH_ATTENTION_PREFIX) or (
        attn_implementation == VARLEN_SDPA
    )


def row_capacity(lengths: list[int], padded_length: int, attn_implementation: str) -> int:
    """Tokens per packed row: all of them in one row for a varlen implementation (`one_row`),
    else the padded length L (see the module docstring)."""
    if one_row(attn_implementation):
        return sum(lengths)
    return padded_length


def loaded_attn_implementation(name: str) -> str:
    """The implementation a model is loaded with for `--attn_implementation name`: VARLEN_SDPA
    (registered with transformers here) for sdpa, else `name`."""
    if name != SDPA:
        return name
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    return VARLEN_SDPA


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [1, heads, N, D], key and value
    [1, kv_heads, N, D] of one packed row whose conversations start at BOUNDS (a tuple of S + 1
    ints, N last) -> ([1, N, heads, D], None), each conversation attending causally to itself.
    Without BOUNDS: transformers' sdpa."""
    edges = kwargs.pop(BOUNDS, None)
    if edges is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    parts = [
        functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
        )
        for start, end in zip(edges[:-1], edges[1:], strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


@dataclass(frozen=True)
class PackPlan:
    """Where each conversation sits: rows[r] lists conversation indices; offsets[c] its start."""

    rows: list[list[int]]
    row_of: list[int]
    offsets: list[int]
    lengths: list[int]
    width: int

    def offsets_in_order(self) -> list[int]:
        """Each conversation's start in its row, in packed (row-major) order."""
        return [self.offsets[index] for members in self.rows for index in members]


def plan_packing(lengths: list[int], capacity: int) -> PackPlan:
    """First-fit in order: each conversation goes to the first row with room, else a new row.

    A conversation longer than `capacity` sits alone in its own row; width = longest row.
    """
    rows: list[list[int]] = []
    fill: list[int] = []
    row_of, offsets = [], []
    for index, length in enumerate(lengths):
        row = next((r for r, used in enumerate(fill) if used + length <= capacity), len(rows))
        if row == len(rows):
            rows.append([])
            fill.append(0)
        row_of.append(row)
        offsets.append(fill[row])
        rows[row].append(index)
        fill[row] += length
    return PackPlan(rows, row_of, offsets, list(lengths), max(fill, default=0))


@dataclass(frozen=True)
class PackedBatch:
    """The packed language-model inputs and how to undo them.

    input_ids, position_ids: [R, W]; order: [C] conversation indices in packed (row-major) order;
    source, target: [N] flat indices (into R*W and C*L) of the N non-padding tokens;
    attention_kwargs: what the language model passes to its attention (BOUNDS for VARLEN_SDPA).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    order: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    attention_kwargs: dict[str, tuple[int, ...]]


def pack(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, attn_implementation: str
) -> PackedBatch:
    """Pack right-padded conversations input_ids, attention_mask [C, L] into rows of
    `row_capacity` tokens for the language model's attention implementation."""
    conversations, padded_length = input_ids.shape
    lengths = attention_mask.sum(dim=1).tolist()
    plan = plan_packing(lengths, row_capacity(lengths, padded_length, attn_implementation))
    device = input_ids.device
    packed = torch.full((len(plan.rows), plan.width), pad_id, dtype=input_ids.dtype, device=device)
    positions = torch.arange(plan.width, device=device).repeat(len(plan.rows), 1)
    sources, targets = [], []
    for index in range(conversations):
        row, start, length = plan.row_of[index], plan.offsets[index], plan.lengths[index]
        packed[row, start : start + length] = input_ids[index, :length]
        steps = torch.arange(length, device=device)
        positions[row, start : start + length] = steps
        sources.append(row * plan.width + start + steps)
        targets.append(index * padded_length + steps)
    for row, members in enumerate(plan.rows):
        end = plan.offsets[members[-1]] + plan.lengths[members[-1]]
        positions[row, end:] = torch.arange(plan.width - end, device=device)
    order = torch.tensor([index for members in plan.rows for index in members], device=device)
    kwargs = {}
    if attn_implementation == VARLEN_SDPA:
        kwargs[BOUNDS] = (*plan.offsets_in_order(), plan.width)
    return PackedBatch(packed, positions, order, torch.cat(sources), torch.cat(targets), kwargs)


def pack_rope_positions(positions: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Multimodal rotary positions [3, C, L] of the padded conversations -> [4, R, W] for the
    packed rows: row 0 the restarting text positions (from which transformers' Qwen-VL models
    build the block-diagonal mask), rows 1-3 each token's (t, h, w) positions; a row's unused
    tail keeps its text positions on all four."""
    rows, width = packed.position_ids.shape
    planes = packed.position_ids.reshape(1, -1).repeat(positions.shape[0], 1)
    planes[:, packed.source] = positions.reshape(positions.shape[0], -1)[:, packed.target]
    return torch.cat([packed.position_ids[None], planes.reshape(-1, rows, width)])


def unpack(
    hidden: torch.Tensor, packed: PackedBatch, conversations: int, length: int
) -> torch.Tensor:
    """Packed hidden states [R, W, H] -> [C, L, H], zero at padding positions."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = flat.new_zeros(conversations * length, hidden.shape[-1])
    out = out.index_copy(0, packed.target, flat[packed.source])
    return out.reshape(conversations, length, hidden.shape[-1])
