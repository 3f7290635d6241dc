"""Special tokens of the segmentation vocabulary, their ids, and the masks of target positions.

`[SEG]` asks for a mask of a named target; `[REJ]` says a named target is absent. An optional
chain token (`--chain_token`, CoReS's `[SEG_SEMA]`) asks for a coarse mask that prompts the next
target of its conversation (model.segmenter). All three are added as normal tokens (as LISA
and GSVA do, so their embeddings are learned like words); `<im_start>`/`<im_end>` (when
enabled) and `<image>` (when the tokenizer lacks it) are added as special tokens. Ids are
always looked up with `convert_tokens_to_ids` and checked to encode to exactly one id:
`tokenizer("[SEG]").input_ids[0]` can be the `▁` piece on LLaMA tokenizers, which silently
doubles the mask count in the original code.

With `strip_whitespace` the tokens swallow the whitespace on both sides, as every added token did
in transformers 4.31's slow LLaMA tokenizer that the LISA family trained with (`ASSISTANT: [SEG]`
-> `ASSISTANT:` `[SEG]`, `<im_end>\n What` -> `<im_end>` `What`; the chain token alike);
`<image>` never reached that tokenizer (it was split out first), so it keeps its whitespace.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AddedToken, PreTrainedTokenizerBase

SEG_TOKEN = "[SEG]"
REJ_TOKEN = "[REJ]"
IMAGE_TOKEN = "<image>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
IGNORE_INDEX = -100
# tokens with a fixed role that a chain token must not double as
RESERVED_TOKENS = (SEG_TOKEN, REJ_TOKEN, IMAGE_TOKEN, IM_START_TOKEN, IM_END_TOKEN)


@dataclass(frozen=True)
class TokenIds:
    """Ids of the tokens the model and the data pipeline need (saved with every run).

    chain: the chain token's id, None without chaining (last, so that saved dicts without it
    still load as `TokenIds(**saved)`).
    """

    seg: int
    rej: int
    image: int
    pad: int
    bos: int | None
    eos: int
    im_start: int | None
    im_end: int | None
    chain: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


def _single_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The one id `token` encodes to; raises if it splits or maps to the unknown token."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if token_id is None or token_id == tokenizer.unk_token_id or encoded != [token_id]:
        pieces = tokenizer.convert_ids_to_tokens(encoded)
        raise ValueError(
            f"token {token!r} must encode to exactly one id, but the tokenizer "
            f"({type(tokenizer).__name__}) gives ids {encoded} = {pieces} and "
            f"convert_tokens_to_ids gives {token_id}; the [SEG]/[REJ] positions would be wrong."
        )
    return token_id


def _added(token: str, special: bool, strip_whitespace: bool) -> str | AddedToken:
    """`token` as handed to `add_tokens`; re-adding an existing token updates its stripping."""
    if not strip_whitespace:
        return token
    return AddedToken(token, lstrip=True, rstrip=True, special=special, normalized=False)


def _check_chain_token(chain_token: str | None) -> None:
    if chain_token is not None and (not chain_token.strip() or chain_token in RESERVED_TOKENS):
        raise ValueError(
            f"--chain_token {chain_token!r}: expected a non-empty token other than "
            f"{', '.join(RESERVED_TOKENS)} (e.g. CoReS's [SEG_SEMA])"
        )


def add_segmentation_tokens(
    tokenizer: PreTrainedTokenizerBase,
    use_mm_start_end: bool,
    strip_whitespace: bool = False,
    chain_token: str | None = None,
) -> TokenIds:
    """Add `[SEG]`, `[REJ]`, the chain token when given (and `<im_start>`, `<im_end>`,
    `<image>` as needed) in place; tokens already present keep their ids.

    Also sets right padding and, when the tokenizer has no pad token, pad = unk (LLaMA
    convention used by the LISA family). `strip_whitespace`: the LISA family's tokenization
    (module docstring); `chain_token` must differ from RESERVED_TOKENS. Returns the verified ids.
    """
    _check_chain_token(chain_token)
    normal = (SEG_TOKEN, REJ_TOKEN) if chain_token is None else (SEG_TOKEN, REJ_TOKEN, chain_token)
    tokenizer.add_tokens(
        [_added(token, False, strip_whitespace) for token in normal], special_tokens=False
    )
    special = [] if IMAGE_TOKEN in tokenizer.get_vocab() else [IMAGE_TOKEN]
    if use_mm_start_end:
        special += [
            _added(token, True, strip_whitespace) for token in (IM_START_TOKEN, IM_END_TOKEN)
        ]
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is None:
            raise ValueError("the tokenizer has neither a pad nor an unk token to pad with")
        tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; answers must end with one")
    return TokenIds(
        seg=_single_id(tokenizer, SEG_TOKEN),
        rej=_single_id(tokenizer, REJ_TOKEN),
        image=_single_id(tokenizer, IMAGE_TOKEN),
        pad=tokenizer.pad_token_id,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        im_start=_single_id(tokenizer, IM_START_TOKEN) if use_mm_start_end else None,
        im_end=_single_id(tokenizer, IM_END_TOKEN) if use_mm_start_end else None,
        chain=None if chain_token is None else _single_id(tokenizer, chain_token),
    )


def predictor_mask(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Positions whose next token is `token_id`: the hidden states that *predict* it.

    input_ids: [C, L] -> bool [C, L]; the last column is always False. The LISA family reads
    the hidden state before each `[SEG]` (whose logits predict `[SEG]`), so do we.
    """
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, :-1] = input_ids[:, 1:] == token_id
    return mask


def chain_links(
    conv: torch.Tensor,
    position: torch.Tensor,
    chain_conv: torch.Tensor,
    chain_position: torch.Tensor,
) -> torch.Tensor:
    """For each target, the chain token that prompts it: the last chain token of its
    conversation after the conversation's previous target (or its start) and before it.

    conv, position: long [T], targets sorted by (conversation, position); chain_conv,
    chain_position: long [P], chain tokens sorted alike. Returns long [T], an index into the P
    chain tokens, -1 for a plain target (no chain token since the previous target). A chain
    token followed by another before any target prompts nothing.
    """
    link = torch.full_like(conv, -1)
    if len(chain_conv) == 0 or len(conv) == 0:
        return link
    same_conv = torch.zeros_like(conv, dtype=torch.bool)
    same_conv[1:] = conv[1:] == conv[:-1]
    previous = torch.full_like(position, -1)
    previous[1:] = position[:-1]
    previous = torch.where(same_conv, previous, -1)
    between = (
        (chain_conv[None] == conv[:, None])
        & (chain_position[None] < position[:, None])
        & (chain_position[None] > previous[:, None])
    )  # [T, P]
    index = torch.arange(len(chain_conv), device=conv.device)
    return torch.where(between, index[None], link[:, None]).max(dim=1).values
