"""The generate protocol of evaluation (`--eval_protocol generate`): the model writes its own
answer to each validation question, and its generated `[SEG]`/`[REJ]` tokens are matched, in
order, to the question's ground-truth targets.

Matching per conversation: the j-th generated target token answers the j-th ground-truth target.
A generated `[SEG]` gives its decoded mask and a "present" decision, a generated `[REJ]` an
"absent" decision (and, for gRefCOCO, the mask its state decodes, as GSVA's second pass does).
A ground-truth target left without a generated token is scored as an empty "absent" prediction
and counted in `missing_targets`; generated tokens beyond the targets are counted in
`extra_targets`. Both counts are part of the result, which is reported under its own name
(never mixed with the teacher-forced numbers of the same set).

Class sequences (the semantic sets, LaSagnA's "wall<ins>sky<no_ins>"): `class_items` reads a
generated sequence by token ids, whatever strings the model's vocabulary writes for `[SEG]` /
`[REJ]`: the k-th target's class name is the text decoded between the previous target token (or
the start of the answer) and it; present for `[SEG]`, absent for `[REJ]`. Names are cleaned
only at their ends (whitespace runs folded, separators " ,.;:" stripped, one of LaSagnA's
lead-ins such as "Sure, " dropped from the first).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from model.batch import Batch
from model.generate import Generation, generate
from model.segmenter import EMPTY_MASK_LOGIT
from model.tokens import IGNORE_INDEX, TokenIds, predictor_mask
from utils.datasets.lasagna import ANSWER_LEAD_INS

PROTOCOL_SUFFIX = " (generate)"
NAME_SEPARATORS = " ,.;:"
WHITESPACE = re.compile(r"\s+")
LEAD_INS = sorted((p.strip() for p in ANSWER_LEAD_INS), key=len, reverse=True)


@dataclass
class MatchCounts:
    """Targets without a generated token, generated tokens without a target, and answers."""

    missing_targets: int = 0
    extra_targets: int = 0
    answers: int = 0

    def add(self, other: MatchCounts) -> None:
        self.missing_targets += other.missing_targets
        self.extra_targets += other.extra_targets
        self.answers += other.answers

    def as_tensor(self, device: torch.device | str) -> torch.Tensor:
        values = [self.missing_targets, self.extra_targets, self.answers]
        return torch.tensor(values, dtype=torch.long, device=device)


def prompt_lengths(batch: Batch) -> torch.Tensor:
    """long [C]: where each conversation's answer starts (its first labelled token).

    Raises ValueError for a conversation whose labels are not one contiguous answer (several
    rounds: the protocol generates the single answer of a question)."""
    labelled = batch.labels != IGNORE_INDEX
    if not bool(labelled.any(dim=1).all()):
        raise ValueError("every validation conversation needs an answer to cut the prompt at")
    starts = labelled.int().argmax(dim=1)
    runs = (labelled[:, 1:] & ~labelled[:, :-1]).sum(dim=1) + labelled[:, 0].long()
    if bool((runs > 1).any()):
        row = int(torch.nonzero(runs > 1)[0])
        image = int(batch.conv_image[row])
        raise ValueError(
            f"{batch.describe_image(image)}: conversation {row} has {int(runs[row])} answers; "
            "the generate protocol needs one question and one answer per conversation"
        )
    return starts


def prompt_batch(batch: Batch) -> Batch:
    """The batch with each conversation cut before its answer (right-padded, no labels)."""
    starts = prompt_lengths(batch)
    length = int(starts.max())
    columns = torch.arange(length, device=batch.input_ids.device)[None]
    attention = columns < starts[:, None]
    input_ids = batch.input_ids[:, :length].masked_fill(~attention, 0)
    return replace(batch, input_ids=input_ids, attention_mask=attention, labels=None)


def ground_truth_kinds(batch: Batch, token_ids: TokenIds) -> list[torch.Tensor]:
    """Per conversation bool [n_c]: whether each ground-truth target is `[REJ]`, in order."""
    is_seg = predictor_mask(batch.input_ids, token_ids.seg)
    is_rej = predictor_mask(batch.input_ids, token_ids.rej)
    return [rej[seg | rej] for seg, rej in zip(is_seg, is_rej, strict=True)]


CoarseMasks = list[list[torch.Tensor | None]]


def linked_coarse(coarse_masks: torch.Tensor, coarse_source: torch.Tensor) -> list:
    """Per target, the coarse (chain-token) mask logits [H, W] that prompted it, or None.

    coarse_masks: float32 [c, H, W] of one image; coarse_source: long [k], an index into them or
    -1 (a plain target)."""
    return [coarse_masks[index] if index >= 0 else None for index in coarse_source.tolist()]


def match_targets(
    batch: Batch, generation: Generation, token_ids: TokenIds
) -> tuple[list[torch.Tensor], list[torch.Tensor], CoarseMasks, MatchCounts]:
    """(decisions bool [k_i], mask logits float32 [k_i, H_i, W_i], coarse mask per target
    (`linked_coarse`; None for a missing target), counts) per image, in the ground-truth target
    order of `batch` (conversation by conversation)."""
    kinds = ground_truth_kinds(batch, token_ids)
    counts = MatchCounts(answers=len(kinds))
    decisions, masks, coarse = [], [], []
    for image in range(batch.num_images):
        height, width = batch.original_sizes[image].tolist()
        image_decisions, image_masks = [], []
        image_coarse = linked_coarse(
            generation.coarse_masks[image], generation.coarse_source[image]
        )
        matched_coarse = []
        for conv in torch.nonzero(batch.conv_image == image).squeeze(1).tolist():
            rows = torch.nonzero(generation.target_conv[image] == conv).squeeze(1).tolist()
            wanted = len(kinds[conv])
            counts.missing_targets += max(0, wanted - len(rows))
            counts.extra_targets += max(0, len(rows) - wanted)
            for index in range(wanted):
                if index < len(rows):
                    row = rows[index]
                    image_decisions.append(not bool(generation.target_is_rej[image][row]))
                    image_masks.append(generation.pred_masks[image][row])
                    matched_coarse.append(image_coarse[row])
                else:
                    image_decisions.append(False)
                    matched_coarse.append(None)
                    image_masks.append(
                        torch.full(
                            (height, width), EMPTY_MASK_LOGIT, device=batch.sam_pixels.device
                        )
                    )
        decisions.append(torch.tensor(image_decisions, dtype=torch.bool))
        coarse.append(matched_coarse)
        masks.append(
            torch.stack(image_masks)
            if image_masks
            else torch.zeros(0, height, width, device=batch.sam_pixels.device)
        )
    return decisions, masks, coarse, counts


def generate_batch(
    model,
    batch: Batch,
    token_ids: TokenIds,
    max_new_tokens: int,
    decode_rejected: bool,
    any_rank_unfinished: Callable[[bool], bool] = bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], CoarseMasks, MatchCounts]:
    """Generate the answers of a validation batch and match them to its targets."""
    segmenter = getattr(model, "module", model)
    generation = generate(
        segmenter,
        prompt_batch(batch),
        max_new_tokens=max_new_tokens,
        any_rank_unfinished=any_rank_unfinished,
        decode_rejected=decode_rejected,
    )
    return match_targets(batch, generation, token_ids)


def _clean_name(text: str, first: bool) -> str:
    name = WHITESPACE.sub(" ", text).strip(NAME_SEPARATORS)
    if first:
        lead_in = next((p for p in LEAD_INS if name.startswith(p)), None)
        name = name[len(lead_in) :].strip(NAME_SEPARATORS) if lead_in else name
    return name


def class_items(
    tokens: Sequence[int], token_ids: TokenIds, decode: Callable[[list[int]], str]
) -> list[tuple[str, bool]]:
    """[(class name, present)] of a generated class sequence, one per `[SEG]`/`[REJ]` id in
    order (see the module docstring); `decode` turns ids into text (special tokens dropped).
    Text after the last target token (EOS, a period) names nothing."""
    items, start = [], 0
    for position, token in enumerate(tokens):
        if token in (token_ids.seg, token_ids.rej):
            name = _clean_name(decode(list(tokens[start:position])), not items)
            items.append((name, token == token_ids.seg))
            start = position + 1
    return items
