"""Special tokens of the segmentation vocabulary, their ids, and the masks of target positions.

`[SEG]` asks for a mask of a named target; `[REJ]` says a named target is absent. Both are
added as normal tokens (as LISA and GSVA do, so their embeddings are learned like words);
`<im_start>`/`<im_end>` (when enabled) and `<image>` (when the tokenizer lacks it) are added
as special tokens. Ids are always looked up with `convert_tokens_to_ids` and checked to encode
to exactly one id: `tokenizer("[SEG]").input_ids[0]` can be the `▁` piece on LLaMA tokenizers,
which silently doubles the mask count in the original code.

With `strip_whitespace` the tokens swallow the whitespace on both sides, as every added token did
in transformers 4.31's slow LLaMA tokenizer that the LISA family trained with (`ASSISTANT: [SEG]`
-> `ASSISTANT:` `[SEG]`, `<im_end>\n What` -> `<im_end>` `What`); `<image>` never reached that
tokenizer (it was split out first), so it keeps its whitespace.
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


@dataclass(frozen=True)
class TokenIds:
    """Ids of the tokens the model and the data pipeline need (saved with every run)."""

    seg: int
    rej: int
    image: int
    pad: int
    bos: int | None
    eos: int
    im_start: int | None
    im_end: int | None

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


def add_segmentation_tokens(
    tokenizer: PreTrainedTokenizerBase, use_mm_start_end: bool, strip_whitespace: bool = False
) -> TokenIds:
    """Add `[SEG]`, `[REJ]` (and `<im_start>`, `<im_end>`, `<image>` as needed) in place.

    Also sets right padding and, when the tokenizer has no pad token, pad = unk (LLaMA
    convention used by the LISA family). `strip_whitespace`: the LISA family's tokenization
    (module docstring). Returns the verified ids.
    """
    tokenizer.add_tokens(
        [_added(token, False, strip_whitespace) for token in (SEG_TOKEN, REJ_TOKEN)],
        special_tokens=False,
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
    )


def predictor_mask(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Positions whose next token is `token_id`: the hidden states that *predict* it.

    input_ids: [C, L] -> bool [C, L]; the last column is always False. The LISA family reads
    the hidden state before each `[SEG]` (whose logits predict `[SEG]`), so do we.
    """
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, :-1] = input_ids[:, 1:] == token_id
    return mask
