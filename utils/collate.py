"""Samples -> token ids, labels and pixels (`process_sample`) -> batches (`collate`).

Label masking works from the tokenizer's offset mapping: the template reports the character
span of every answer (answer text + end-of-turn token) and a token is labelled exactly when its
characters overlap such a span (or the separator space just before it, see `answer_owner`).
Nothing assumes how many tokens BOS, separators or roles take, which is what broke the original
code with other tokenizers. `<image>` is expanded in the text
to one image-token id per image feature (LLaVA's fixed `model.backbone.image_token_count`, or
the image's own count from its patch grid for Qwen-VL, `image_tokens_of`), written as the
model's own image tokens, so ids, labels and the language model's hidden states align 1:1.

The model's vocabulary (`model.tokens.VOCABULARIES`) is applied here and only here:
`model_rounds`, which every tokenized conversation passes through (training, teacher-forced
validation, generation prompts), writes the canonical `[SEG]`/`[REJ]` markers of the data
pipeline as the strings the tokenizer holds at the seg/rej ids (LaSagnA's `<ins>`/`<no_ins>`),
before the template renders the text, so answer spans and labels cover those tokens.

Too-long conversations (more tokens than `model_max_length`, counted after the image expansion,
i.e. the length the language model sees) follow `too_long`:
- "truncate" (default; LISA utils/dataset.py:138-143, MMR utils/dataset.py:161-166, GSVA
  data/dataset.py:133-139 cut the padded batch to `model_max_length - 255` columns before the
  expansion, the same bound): ids and labels keep their first `model_max_length` tokens. A
  `[SEG]`/`[REJ]` token that is cut off loses its mask (the targets that stay are the
  conversation's first ones, so their rows are the first ones of its range): masks still equal
  tokens. The reference code keeps those masks and stops on the count mismatch (LISA
  model/LISA.py:316-320, GSVA model/modeling_lisa_gsva.py:294); normally only VQA dialogues,
  which have no masks, are that long. A limit that cuts into the image tokens is an error.
  `ProcessedSample.truncated_conversations` counts the cut conversations.
- "drop": each too-long conversation is left out whole with its masks, so a `[SEG]` never loses
  its answer; `ProcessedSample.dropped_conversations` counts them, and a sample left with none
  raises AllConversationsDropped (the mixer redraws from the same family).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from model.backbone import Family, family_of, image_token_count
from model.batch import Batch
from model.tokens import (
    IGNORE_INDEX,
    REJ_TOKEN,
    SEG_TOKEN,
    TokenIds,
)
from utils.conversation import DEFAULT_CONV_TYPE, Span, Style, Template, get_template
from utils.datasets.base import IMAGE_PLACEHOLDER, TOO_LONG_CHOICES, Sample, UnusableSample
from utils.preprocess import ImageProcessors, ProcessedImage

logger = logging.getLogger(__name__)
# the papers' handling of conversations over --model_max_length (see the module docstring)
DEFAULT_TOO_LONG = "truncate"


class AllConversationsDropped(UnusableSample):
    """With too_long "drop", every conversation of a sample is longer than `model_max_length`;
    draw another sample."""


@dataclass
class ProcessedSample:
    """One image ready for `collate` (C conversations, k targets, S = SAM input size).

    clip_pixels: the vision tower's input, float32 [3, h, w] (CLIP) or [P, D] patches
        (Qwen-VL, with `image_grid` (t, h, w); None for CLIP). sam_pixels: float32 [3, S, S].
    resized_size: (h', w') inside the SAM input. original_size: (H, W).
    input_ids, labels: per conversation long [L_c] (labels IGNORE_INDEX outside the answers).
    masks: uint8 [k, H, W], one per `[SEG]`/`[REJ]` of the kept conversations, in order.
    dropped_conversations: how many too-long conversations (and their masks) were left out.
    truncated_conversations: how many too-long conversations were cut to `model_max_length`.
    skipped_samples: bad records the mixer skipped before drawing this one ({source: count};
        set by `HybridDataset` with `--skip_bad_samples`, else None).
    """

    clip_pixels: torch.Tensor
    sam_pixels: torch.Tensor
    resized_size: tuple[int, int]
    original_size: tuple[int, int]
    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    masks: torch.Tensor
    image_path: str
    source: str
    dropped_conversations: int = 0
    truncated_conversations: int = 0
    skipped_samples: dict[str, int] | None = None
    image_grid: tuple[int, int, int] | None = None


def writes_chat_format(family: Family, conv_type: str) -> bool:
    """Whether `conv_type` writes the chat format of the backbone `family` (ChatML for Qwen-VL,
    a LLaVA template for LLaVA)."""
    chatml = get_template(conv_type).style is Style.CHATML
    return chatml == (get_template(family.conv_type).style is Style.CHATML)


def check_conv_type(model, conv_type: str) -> None:
    """ValueError unless `conv_type` writes the chat format of the model's backbone family."""
    family = family_of(model.llava.config)
    if not writes_chat_format(family, conv_type):
        raise ValueError(
            f"--conv_type {conv_type} does not write the chat format of the {family.name} "
            f"backbone; use --conv_type {family.conv_type}"
        )


def backbone_conv_type(
    model, requested: str, explicit: bool, saved: str | None = None, source: str = ""
) -> str:
    """The template a run uses on `model`: `requested` when it writes the backbone's chat format
    or was given explicitly (`--conv_type`; `check_conv_type` then judges it); otherwise a
    recipe's LLaVA template on a Qwen-VL backbone (or the reverse) gives way, with a warning,
    to the checkpoint's own (`saved`, a merged directory's) or the family's."""
    family = family_of(model.llava.config)
    if explicit or writes_chat_format(family, requested):
        return requested
    chosen = saved or family.conv_type
    logger.warning(
        "%s: the %s backbone's chat format is not %s (the recipe's); using %s",
        source or "--version",
        family.name,
        requested,
        chosen,
    )
    return chosen


def template_for(tokenizer: PreTrainedTokenizerBase, conv_type: str) -> Template:
    """The `--conv_type` template with separators written as this tokenizer's BOS/EOS text."""
    return get_template(conv_type).with_special_tokens(tokenizer.bos_token, tokenizer.eos_token)


def expand_image(
    rounds: Sequence[tuple[str, str | None]],
    tokenizer: PreTrainedTokenizerBase,
    token_ids: TokenIds,
    image_tokens: int,
) -> list[tuple[str, str | None]]:
    """Rounds with IMAGE_PLACEHOLDER written as `image_tokens` image tokens, inside the image
    start/end tokens when the model uses them: the tokenizer's strings at those ids (LLaVA's
    `<image>`, `<im_start>`, `<im_end>`; Qwen-VL's `<|image_pad|>`, `<|vision_start|>`,
    `<|vision_end|>`)."""
    image = tokenizer.convert_ids_to_tokens(token_ids.image)
    expansion = image * image_tokens
    if token_ids.im_start is not None:
        start, end = tokenizer.convert_ids_to_tokens([token_ids.im_start, token_ids.im_end])
        expansion = f"{start}{expansion}{end}"
    return [(question.replace(IMAGE_PLACEHOLDER, expansion), answer) for question, answer in rounds]


def vocabulary_markers(
    rounds: Sequence[tuple[str, str | None]],
    tokenizer: PreTrainedTokenizerBase,
    token_ids: TokenIds,
) -> list[tuple[str, str | None]]:
    """Rounds with the canonical `[SEG]`/`[REJ]` written as the tokenizer's tokens at the
    seg/rej ids (the model's vocabulary; unchanged for LISA's, and for a tokenizer without
    segmentation tokens, whose ids are negative: LLaVA pretraining)."""
    if min(token_ids.seg, token_ids.rej) < 0:
        return list(rounds)
    seg, rej = tokenizer.convert_ids_to_tokens([token_ids.seg, token_ids.rej])
    if (seg, rej) == (SEG_TOKEN, REJ_TOKEN):
        return list(rounds)

    def written(text: str | None) -> str | None:
        return None if text is None else text.replace(SEG_TOKEN, seg).replace(REJ_TOKEN, rej)

    return [(written(question), written(answer)) for question, answer in rounds]


def model_rounds(
    rounds: Sequence[tuple[str, str | None]],
    tokenizer: PreTrainedTokenizerBase,
    token_ids: TokenIds,
    image_tokens: int,
) -> list[tuple[str, str | None]]:
    """Rounds as the model reads them, the one place every tokenized conversation passes:
    markers in the model's vocabulary (`vocabulary_markers`), the image expanded
    (`expand_image`)."""
    return expand_image(
        vocabulary_markers(rounds, tokenizer, token_ids), tokenizer, token_ids, image_tokens
    )


class ImageTokenCountError(ValueError):
    """A conversation's text does not encode to exactly one image's worth of image tokens."""


def encode(
    text: str, tokenizer: PreTrainedTokenizerBase, token_ids: TokenIds, image_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """text -> (ids int [L], character offsets int [L, 2]), BOS added as the tokenizer adds it;
    ImageTokenCountError unless the text holds exactly one image's worth of image tokens."""
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    found = int((ids == token_ids.image).sum())
    if found != image_tokens:
        raise ImageTokenCountError(
            f"a conversation must hold one {IMAGE_PLACEHOLDER} ({image_tokens} image tokens) but "
            f"it encodes to {found} image tokens; its text starts {text[:200]!r}"
        )
    return ids, np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def answer_owner(
    text: str, offsets: np.ndarray, spans: Sequence[Span], takes_space: bool = True
) -> np.ndarray:
    """offsets: int [L, 2] character [start, end) per token -> int [L]: the index of the answer
    span each token's characters overlap, -1 for tokens outside every answer.

    A span also takes the whitespace before it (the template's separator): tokenizers glue that
    space to the answer's first word ("▁Sure") or, before an added token, make it a token of its
    own ("▁", "[SEG]") that the model must generate after "ASSISTANT:" (as LISA labels it).
    Tokens inserted without characters (BOS at (0, 0)) count as sitting on their start character.
    Without `takes_space` (ChatML, `Template.answer_takes_space`) a span is exactly its text.
    """
    starts = offsets[:, 0]
    ends = np.maximum(offsets[:, 1], starts + 1)
    owner = np.full(len(offsets), -1, dtype=np.int64)
    for index, (span_start, span_end) in enumerate(spans):
        if takes_space:
            span_start = len(text[:span_start].rstrip())
        owner[(starts < span_end) & (ends > span_start)] = index
    return owner


def tokenize_conversation(
    rounds: Sequence[tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    token_ids: TokenIds,
    image_tokens: int,
    template: Template,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One conversation -> (input_ids long [L], labels long [L]).

    Markers are written in the model's vocabulary and IMAGE_PLACEHOLDER is expanded
    (`model_rounds`). Labels are the ids of the answer tokens
    (each answer ending with EOS), IGNORE_INDEX elsewhere. Raises ValueError when the image
    tokens or an answer's EOS do not come out as the expected ids.

    The text is tokenized with one image token, whose id is then repeated `image_tokens` times:
    tokenizers split added tokens out of the text before tokenizing the pieces between them, so
    these are the ids of the fully expanded text (tests compare the two) at a sixth of the cost.
    A text that does not hold exactly one image is tokenized expanded, for its error.
    """
    try:
        ids, labels = label_conversation(rounds, tokenizer, token_ids, 1, template)
    except ImageTokenCountError:
        ids, labels = label_conversation(rounds, tokenizer, token_ids, image_tokens, template)
    else:
        repeats = np.where(ids == token_ids.image, image_tokens, 1)
        ids, labels = np.repeat(ids, repeats), np.repeat(labels, repeats)
    return torch.from_numpy(ids), torch.from_numpy(labels)


def label_conversation(
    rounds: Sequence[tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    token_ids: TokenIds,
    image_tokens: int,
    template: Template,
) -> tuple[np.ndarray, np.ndarray]:
    """`tokenize_conversation` on the text with `image_tokens` image tokens, as int64 arrays."""
    text, spans = template.render(model_rounds(rounds, tokenizer, token_ids, image_tokens))
    ids, offsets = encode(text, tokenizer, token_ids, image_tokens)
    owner = answer_owner(text, offsets, spans, template.answer_takes_space)
    for index, (span_start, span_end) in enumerate(spans):
        members = np.flatnonzero(owner == index)
        if len(members) == 0 or ids[members[-1]] != token_ids.eos:
            raise ValueError(
                f"the answer {text[span_start:span_end]!r} does not end with the EOS id "
                f"{token_ids.eos} ({type(tokenizer).__name__}); its end-of-turn text must "
                "encode to the EOS token"
            )
    return ids, np.where(owner >= 0, ids, IGNORE_INDEX)


def tokenize_prompt(
    rounds: Sequence[tuple[str, str | None]],
    tokenizer: PreTrainedTokenizerBase,
    token_ids: TokenIds,
    image_tokens: int,
    template: Template,
) -> torch.Tensor:
    """A generation prompt (last answer None) -> input_ids long [L]; its ids are the training
    conversation's ids up to the first label of the open answer."""
    text = template.generation_prompt(model_rounds(rounds, tokenizer, token_ids, image_tokens))
    return torch.from_numpy(encode(text, tokenizer, token_ids, image_tokens)[0])


def count_targets(input_ids: torch.Tensor, token_ids: TokenIds) -> int:
    """Number of `[SEG]` plus `[REJ]` tokens in input_ids (any shape)."""
    return int(((input_ids == token_ids.seg) | (input_ids == token_ids.rej)).sum())


@dataclass
class FittedConversations:
    """The conversations of one sample within `model_max_length` (see `fit_to_length`).

    conversations: (input_ids long [L_c], labels long [L_c]) of each conversation kept, in order.
    rows: the mask rows of the targets still in them, in order.
    dropped / truncated: how many conversations were left out / cut.
    """

    conversations: list[tuple[torch.Tensor, torch.Tensor]]
    rows: list[int]
    dropped: int = 0
    truncated: int = 0


def truncate_conversation(
    ids: torch.Tensor,
    labels: torch.Tensor,
    model_max_length: int,
    token_ids: TokenIds,
    image_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, labels long [L] -> their first `model_max_length` tokens; ValueError if that cuts
    into the image tokens (the model needs all of them)."""
    cut_ids = ids[:model_max_length]
    kept_image_tokens = int((cut_ids == token_ids.image).sum())
    if kept_image_tokens != image_tokens:
        last = int(torch.nonzero(ids == token_ids.image)[-1])
        raise ValueError(
            f"--model_max_length {model_max_length} keeps {kept_image_tokens} of the "
            f"{image_tokens} image tokens of a {len(ids)}-token conversation; raise it to at "
            f"least {last + 1}"
        )
    return cut_ids, labels[:model_max_length]


def fit_to_length(
    encoded: list[tuple[torch.Tensor, torch.Tensor]],
    targets: list[int],
    model_max_length: int | None,
    too_long: str,
    token_ids: TokenIds,
    image_tokens: int,
) -> FittedConversations:
    """Conversations longer than `model_max_length` (None: no limit) cut ("truncate") or left out
    ("drop"), with the mask rows of the targets that remain.

    Conversations' targets are consecutive mask rows (`targets[c]` of them for conversation c),
    in token order, so a cut conversation keeps the first rows of its range.
    """
    fitted = FittedConversations([], [])
    offset = 0
    for (ids, labels), count in zip(encoded, targets, strict=True):
        if model_max_length is None or len(ids) <= model_max_length:
            fitted.conversations.append((ids, labels))
            fitted.rows.extend(range(offset, offset + count))
        elif too_long == "drop":
            fitted.dropped += 1
        else:
            cut = truncate_conversation(ids, labels, model_max_length, token_ids, image_tokens)
            fitted.conversations.append(cut)
            fitted.rows.extend(range(offset, offset + count_targets(cut[0], token_ids)))
            fitted.truncated += 1
        offset += count
    return fitted


def check_too_long(too_long: str) -> None:
    """ValueError unless `too_long` is one of TOO_LONG_CHOICES."""
    if too_long not in TOO_LONG_CHOICES:
        raise ValueError(f"too_long must be one of {TOO_LONG_CHOICES}, not {too_long!r}")


def image_tokens_of(image: ProcessedImage, fixed: int | None) -> int:
    """The image tokens `image` takes: its own count (Qwen-VL's dynamic resolution) or the
    model's fixed one (LLaVA)."""
    tokens = image.tokens if image.tokens is not None else fixed
    if tokens is None:
        raise ValueError("a model with a fixed image-token count needs that count (image_tokens)")
    return tokens


def process_sample(
    sample: Sample,
    tokenizer: PreTrainedTokenizerBase,
    token_ids: TokenIds,
    images: ImageProcessors,
    image_tokens: int | None,
    conv_type: str = DEFAULT_CONV_TYPE,
    model_max_length: int | None = None,
    too_long: str = DEFAULT_TOO_LONG,
) -> ProcessedSample:
    """Tokenize, label and transform one sample (each transform runs once for the image).

    image_tokens: the model's image-token count per image, None for a backbone whose count
    follows each image (Qwen-VL; `ProcessedImage.tokens`).
    model_max_length: conversations with more tokens are cut or dropped as `too_long` says (see
    the module docstring; None keeps all whole, as evaluation does). Raises ValueError naming
    the image when the `[SEG]`/`[REJ]` count differs from the number of masks or the limit cuts
    into the image tokens, and AllConversationsDropped when "drop" leaves nothing.
    """
    check_too_long(too_long)
    if not sample.conversations:
        raise ValueError(f"{sample.image_path} ({sample.source}): the sample has no conversations")
    template = template_for(tokenizer, conv_type)
    image = images(sample.image)
    image_tokens = image_tokens_of(image, image_tokens)
    encoded = [
        tokenize_conversation(rounds, tokenizer, token_ids, image_tokens, template)
        for rounds in sample.conversations
    ]
    targets = [count_targets(ids, token_ids) for ids, _ in encoded]
    image_size = tuple(sample.image.shape[:2])
    masks = sample.masks
    if sum(targets) != masks.shape[0] or tuple(masks.shape[1:]) != image_size:
        raise ValueError(
            f"{sample.image_path} ({sample.source}): the answers hold {sum(targets)} "
            f"[SEG]/[REJ] tokens but there are {masks.shape[0]} masks "
            f"(masks {tuple(masks.shape)}, image {image_size})"
        )
    try:
        fitted = fit_to_length(
            encoded, targets, model_max_length, too_long, token_ids, image_tokens
        )
    except ValueError as error:
        raise ValueError(f"{sample.image_path} ({sample.source}): {error}") from error
    report_too_long(sample, encoded, targets, fitted, model_max_length)
    return ProcessedSample(
        clip_pixels=image.vision,
        sam_pixels=image.sam,
        resized_size=image.resized_size,
        image_grid=image.grid,
        original_size=image_size,
        input_ids=[ids for ids, _ in fitted.conversations],
        labels=[labels for _, labels in fitted.conversations],
        masks=torch.from_numpy(kept_rows(masks, fitted.rows)),
        image_path=sample.image_path,
        source=sample.source,
        dropped_conversations=fitted.dropped,
        truncated_conversations=fitted.truncated,
    )


def kept_rows(masks: np.ndarray, rows: list[int]) -> np.ndarray:
    """uint8 [len(rows), H, W], C-contiguous: `masks[rows]`, without a copy when every row is
    kept in order (the usual case) and the masks are already uint8 and contiguous."""
    if rows == list(range(len(masks))):
        return np.ascontiguousarray(masks, dtype=np.uint8)
    return np.ascontiguousarray(masks[rows], dtype=np.uint8)


def report_too_long(
    sample: Sample,
    encoded: list[tuple[torch.Tensor, torch.Tensor]],
    targets: list[int],
    fitted: FittedConversations,
    model_max_length: int | None,
) -> None:
    """Debug-log what `fit_to_length` cut or dropped; AllConversationsDropped when "drop" left
    no conversation."""
    if not (fitted.dropped or fitted.truncated):
        return
    lengths = [len(ids) for ids, _ in encoded]
    logger.debug(
        "%s: %d of %d conversations longer than model_max_length %s (lengths %s): %d dropped, "
        "%d cut; %d of %d targets lost",
        sample.image_path,
        fitted.dropped + fitted.truncated,
        len(encoded),
        model_max_length,
        lengths,
        fitted.dropped,
        fitted.truncated,
        sum(targets) - len(fitted.rows),
        sum(targets),
    )
    if not fitted.conversations:
        raise AllConversationsDropped(
            f"{sample.image_path} ({sample.source}): all {len(encoded)} conversations are "
            f"longer than model_max_length {model_max_length} (token lengths {lengths}); "
            "draw another sample or raise --model_max_length"
        )


@dataclass
class SampleProcessor:
    """`process_sample` with its settings bound: built once, called per sample by datasets."""

    tokenizer: PreTrainedTokenizerBase
    token_ids: TokenIds
    images: ImageProcessors
    image_tokens: int | None
    conv_type: str = DEFAULT_CONV_TYPE
    model_max_length: int | None = None
    too_long: str = DEFAULT_TOO_LONG

    def __post_init__(self) -> None:
        check_too_long(self.too_long)

    @classmethod
    def for_model(
        cls,
        model,
        tokenizer: PreTrainedTokenizerBase,
        llava_directory: str,
        conv_type: str = DEFAULT_CONV_TYPE,
        model_max_length: int | None = None,
        too_long: str = DEFAULT_TOO_LONG,
        pixel_budget: tuple[int | None, int | None] = (None, None),
    ) -> SampleProcessor:
        """Settings read from a built Segmenter (token ids, image-token count, SAM input size)
        and its LLaVA directory (CLIP image settings); `model_max_length` and `too_long` as in
        `process_sample`. `conv_type` must be the backbone's chat format (`check_conv_type`);
        `pixel_budget`: Qwen-VL's (min_pixels, max_pixels), None for the directory's."""
        check_conv_type(model, conv_type)
        return cls(
            tokenizer=tokenizer,
            token_ids=model.token_ids,
            images=ImageProcessors.from_pretrained(
                llava_directory, model.sam_input_size, *pixel_budget, model.mask_kind.name
            ),
            image_tokens=image_token_count(model.llava.config),  # None: per image
            conv_type=conv_type,
            model_max_length=model_max_length,
            too_long=too_long,
        )

    def __call__(self, sample: Sample) -> ProcessedSample:
        return process_sample(
            sample,
            self.tokenizer,
            self.token_ids,
            self.images,
            self.image_tokens,
            self.conv_type,
            self.model_max_length,
            self.too_long,
        )


def collate(samples: Sequence[ProcessedSample], pad_id: int) -> Batch:
    """Batch N processed samples with C conversations in total, right-padded to the longest L.

    input_ids padded with pad_id, labels with IGNORE_INDEX; attention_mask marks each row's
    real length (pad_id may equal a real token id, e.g. LLaMA's unk). Images are stored once,
    and conv_image maps every conversation to its image (non-decreasing).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    rows = [
        (ids, labels, image)
        for image, sample in enumerate(samples)
        for ids, labels in zip(sample.input_ids, sample.labels, strict=True)
    ]
    length = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for row, (ids, row_labels, _) in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = row_labels
        attention_mask[row, : len(ids)] = True
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        conv_image=torch.tensor([image for _, _, image in rows], dtype=torch.long),
        clip_pixels=vision_inputs(samples),
        image_grid=image_grids(samples),
        sam_pixels=torch.stack([sample.sam_pixels for sample in samples]),
        resized_sizes=torch.tensor([sample.resized_size for sample in samples], dtype=torch.long),
        original_sizes=torch.tensor([sample.original_size for sample in samples], dtype=torch.long),
        gt_masks=[sample.masks for sample in samples],
        image_paths=[sample.image_path for sample in samples],
        sources=[sample.source for sample in samples],
        dropped_conversations=sum(sample.dropped_conversations for sample in samples),
        truncated_conversations=sum(sample.truncated_conversations for sample in samples),
        skipped_samples=sum_counts([sample.skipped_samples for sample in samples]),
    )


def vision_inputs(samples: Sequence[ProcessedSample]) -> torch.Tensor:
    """The vision tower's inputs of the samples' images: CLIP pixels stacked [N, 3, h, w], or
    patches concatenated in image order [sum P_i, D] (`image_grid` set)."""
    if samples[0].image_grid is None:
        return torch.stack([sample.clip_pixels for sample in samples])
    return torch.cat([sample.clip_pixels for sample in samples])


def image_grids(samples: Sequence[ProcessedSample]) -> torch.Tensor | None:
    """long [N, 3]: the (t, h, w) patch grid of every image, None for CLIP images."""
    grids = [sample.image_grid for sample in samples]
    if all(grid is None for grid in grids):
        return None
    if any(grid is None for grid in grids):
        raise ValueError("a batch mixes CLIP images with patch-grid images")
    return torch.tensor(grids, dtype=torch.long)


def sum_counts(counts: Sequence[dict[str, int] | None]) -> dict[str, int] | None:
    """Per-key sums of the dicts, or None when none of them was counted."""
    if all(count is None for count in counts):
        return None
    total: dict[str, int] = {}
    for count in counts:
        for key, value in (count or {}).items():
            total[key] = total.get(key, 0) + value
    return total


@dataclass(frozen=True)
class Collator:
    """`collate` as a picklable DataLoader `collate_fn`."""

    pad_id: int

    def __call__(self, samples: Sequence[ProcessedSample]) -> Batch:
        return collate(samples, self.pad_id)
