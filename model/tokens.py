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

Vocabularies (`--vocabulary`, `VOCABULARIES`): the data pipeline always writes the canonical
markers `[SEG]`/`[REJ]`; a model's vocabulary names the strings those two roles are in its
tokenizer ("lisa": `[SEG]`, `[REJ]`; "lasagna": LaSagnA's `<ins>`, `<no_ins>`, plus its
`<cat_start>`, `<cat_end>`, `<semantic>` special tokens, added first as LaSagnA's train_ds.py
adds them). The roles keep their names (`TokenIds.seg`, `TokenIds.rej`), so every id-based path
is the same for both; `utils.collate` writes the markers as the vocabulary's strings.
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
# LaSagnA's vocabulary (congvvc/LaSagnA utils/utils.py)
INS_TOKEN = "<ins>"
NO_INS_TOKEN = "<no_ins>"
CAT_START_TOKEN = "<cat_start>"
CAT_END_TOKEN = "<cat_end>"
SEMANTIC_TOKEN = "<semantic>"
DEFAULT_VOCABULARY = "lisa"


@dataclass(frozen=True)
class Vocabulary:
    """The strings a model's tokenizer holds for the segmentation roles.

    seg, rej: the tokens of the `[SEG]` / `[REJ]` roles (added as normal tokens).
    extras: special tokens added before them, in this order (LaSagnA's task and class-list
    markers); the model has no role for them beyond their text.
    """

    seg: str
    rej: str
    extras: tuple[str, ...] = ()

    @property
    def tokens(self) -> tuple[str, ...]:
        return (*self.extras, self.seg, self.rej)


VOCABULARIES: dict[str, Vocabulary] = {
    "lisa": Vocabulary(SEG_TOKEN, REJ_TOKEN),
    "lasagna": Vocabulary(
        INS_TOKEN, NO_INS_TOKEN, (CAT_START_TOKEN, CAT_END_TOKEN, SEMANTIC_TOKEN)
    ),
}


@dataclass(frozen=True)
class ImageTokens:
    """A backbone family's image tokens: the one repeated per image feature, and the two that
    wrap an image's tokens; `always_wrapped` when the family's format always writes them
    (Qwen-VL), else only with `use_mm_start_end` (LLaVA)."""

    image: str
    start: str
    end: str
    always_wrapped: bool = False


LLAVA_IMAGE_TOKENS = ImageTokens(IMAGE_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
QWEN_VL_IMAGE_TOKENS = ImageTokens(
    "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", always_wrapped=True
)


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


def vocabulary_for(name: str) -> Vocabulary:
    """The declared vocabulary `name` (`--vocabulary`); ValueError naming the choices."""
    if name not in VOCABULARIES:
        raise ValueError(f"--vocabulary must be one of {sorted(VOCABULARIES)}, not {name!r}")
    return VOCABULARIES[name]


def vocabulary_name(tokenizer: PreTrainedTokenizerBase, token_ids: TokenIds) -> str:
    """The name of the vocabulary whose seg/rej strings the tokenizer holds at the role ids."""
    strings = tuple(tokenizer.convert_ids_to_tokens([token_ids.seg, token_ids.rej]))
    for name, vocabulary in VOCABULARIES.items():
        if strings == (vocabulary.seg, vocabulary.rej):
            return name
    known = ", ".join(f"{name} ({v.seg}, {v.rej})" for name, v in VOCABULARIES.items())
    raise ValueError(
        f"the tokenizer holds {strings} at the seg/rej ids ({token_ids.seg}, {token_ids.rej}), "
        f"which is none of the vocabularies {known}"
    )


def _check_chain_token(chain_token: str | None, vocabulary: Vocabulary) -> None:
    reserved = tuple(dict.fromkeys((*RESERVED_TOKENS, *vocabulary.tokens)))
    if chain_token is not None and (not chain_token.strip() or chain_token in reserved):
        raise ValueError(
            f"--chain_token {chain_token!r}: expected a non-empty token other than "
            f"{', '.join(reserved)} (e.g. CoReS's [SEG_SEMA])"
        )


def add_segmentation_tokens(
    tokenizer: PreTrainedTokenizerBase,
    use_mm_start_end: bool,
    strip_whitespace: bool = False,
    chain_token: str | None = None,
    vocabulary: str = DEFAULT_VOCABULARY,
    image_tokens: ImageTokens = LLAVA_IMAGE_TOKENS,
) -> TokenIds:
    """Add the vocabulary's extras (special), its seg and rej tokens (`[SEG]`, `[REJ]` for
    "lisa"), the chain token when given (and the family's image tokens as needed, LLaVA's
    `<im_start>`, `<im_end>`, `<image>`) in place, in that order; tokens already present keep
    their ids. `use_mm_start_end` is implied for a family whose images are always wrapped.

    Also sets right padding and, when the tokenizer has no pad token, pad = unk (LLaMA
    convention used by the LISA family). `strip_whitespace`: the LISA family's tokenization
    (module docstring); `chain_token` must differ from RESERVED_TOKENS and the vocabulary's
    tokens. Returns the verified ids (every extra is verified to encode to one id too).
    """
    chosen = vocabulary_for(vocabulary)
    _check_chain_token(chain_token, chosen)
    if chosen.extras:
        tokenizer.add_tokens(
            [_added(token, True, strip_whitespace) for token in chosen.extras], special_tokens=True
        )
    roles = (chosen.seg, chosen.rej)
    normal = roles if chain_token is None else (*roles, chain_token)
    tokenizer.add_tokens(
        [_added(token, False, strip_whitespace) for token in normal], special_tokens=False
    )
    vocab = tokenizer.get_vocab()
    special = [] if image_tokens.image in vocab else [image_tokens.image]
    wrapped = use_mm_start_end or image_tokens.always_wrapped
    if wrapped:
        special += [
            _added(token, True, strip_whitespace)
            for token in (image_tokens.start, image_tokens.end)
            if not (image_tokens.always_wrapped and token in vocab)
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
    for token in chosen.extras:
        _single_id(tokenizer, token)
    return TokenIds(
        seg=_single_id(tokenizer, chosen.seg),
        rej=_single_id(tokenizer, chosen.rej),
        image=_single_id(tokenizer, image_tokens.image),
        pad=tokenizer.pad_token_id,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        im_start=_single_id(tokenizer, image_tokens.start) if wrapped else None,
        im_end=_single_id(tokenizer, image_tokens.end) if wrapped else None,
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
