"""Question and answer templates of the LISA, MMR and GSVA families, and the one function that
turns a list of named targets into conversations plus masks in `[SEG]`/`[REJ]` order
(`build_conversations`; `finish_sample` wraps it into a Sample for every training source, and
`target_count` says how many targets a source draws).

Every string is copied from the reference code (LISA `utils/utils.py`, MMR `utils/utils.py`,
GSVA `model/llava/constants.py`, CoReS `utils/utils.py`); nothing here is our own wording.

Prompt styles (`--prompt_style`):
- "lisa": one target per conversation, a short (class name) or long (sentence) question and one
  of LISA's five answers.
- "mmr": several targets per question (1..`--num_classes_per_question`, MMR's
  `allocate_class`). One target: LISA's answers. Several, 50/50: one SINGLE_ANSWER_LIST template
  drawn per question and applied to every target ("a is [SEG], b is [SEG] and c is [SEG].",
  "separate"), or a MULTI_ANSWER_LIST template listing all the tokens ("multi").
- "cores": as "lisa" (one target per conversation, LISA's questions), answered with one of
  CoReS's 18 templates (CORES_ANSWERS), each "<where it appears> [SEG_SEMA]. <it is> [SEG].":
  the chain token `[SEG_SEMA]` (CORES_CHAIN_TOKEN, `--chain_token`) before the target. CoReS's
  loaders are LISA's with that list, one `random.choice` per answer, as here.
- "gsva": all targets of the image in one conversation, "Sure, a:[SEG], b:[REJ]." style; the
  answer's joiner, name cleaning and empty-mask rule differ between GSVA's sem_seg and refer_seg
  loaders (`GsvaAnswerFormat`). `--gsva_answer_form colon` (ours; "drawn" in every recipe) words
  every answer in the second of GSVA's five forms, "Sure, they are a:[SEG], b:[REJ]."
Names are lower-cased in questions and in the "multi" answers and keep their case elsewhere, as
the references do. A target whose mask is None (the source says the named thing is not in the
image) is answered `[REJ]` in every style ("cores": in place of `[SEG]`, `[SEG_SEMA]` kept).

`--use_expand_question_list` reproduces MMR's draw probabilities: MMR's SemSegDataset and
ReferSegDataset each `extend` the shared module-level SHORT_QUESTION_LIST with the 14 expanded
questions (MMR `utils/sem_seg_dataset.py:167-168`, `utils/refer_seg_dataset.py:57-58`), so with
its default mix the list holds 4 + 14 + 14 entries (each original drawn 1/32, each expanded one
2/32); the MultiPartReasonSegDataset extends LONG_QUESTION_LIST once (2 + 5 entries).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.datasets.base import (
    GSVA_ANSWER_FORM_CHOICES,
    IMAGE_PLACEHOLDER,
    Sample,
    SamplingOptions,
)

SEG = "[SEG]"
REJ = "[REJ]"
LISA_STYLE, CORES_STYLE = "lisa", "cores"
PROMPT_STYLES = (LISA_STYLE, "mmr", "gsva", CORES_STYLE)
# CoReS's chain token: its state's mask prompts the next [SEG] (`--chain_token`)
CORES_CHAIN_TOKEN = "[SEG_SEMA]"
IMAGE_PREFIX = IMAGE_PLACEHOLDER + "\n"

# LISA utils/utils.py (MMR and GSVA carry the same lists)
SHORT_QUESTIONS = (
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTIONS = (
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
)
EXPLANATORY_QUESTIONS = (
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
)
ANSWERS = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)

# CoReS utils/utils.py:39-58 ANSWER_LIST (baoxiaoyi/CoReS @296ee1f), in its order
CORES_ANSWERS = tuple(
    template.replace("{chain}", CORES_CHAIN_TOKEN)
    for template in (
        "It appears on {chain}. It is [SEG].",
        "It usually appears on {chain}. It is [SEG].",
        "It typically appears on {chain}. It is [SEG].",
        "We can usually find it on {chain}. It is [SEG].",
        "It is usually found on {chain}. It is [SEG].",
        "It appears on {chain}. The segmentation result is [SEG].",
        "It usually appears on {chain}. The segmentation result is [SEG].",
        "It typically appears on {chain}. The segmentation result is [SEG].",
        "We can usually find it on {chain}. The segmentation result is [SEG].",
        "Sure, we can usually find it on {chain}. It is [SEG].",
        "Sure, it usually appears on {chain}. It is [SEG].",
        "Sure, it typically appears on {chain}. It is [SEG].",
        "Sure, it appears on {chain}. It is [SEG].",
        "Sure, it is typically found on {chain}. It is [SEG].",
        "Sure, we can usually find it on {chain}. The segmentation result is [SEG].",
        "Sure, it usually appears on {chain}. The segmentation result is [SEG].",
        "Sure, it typically appears on {chain}. The segmentation result is [SEG].",
        "Sure, it appears on {chain}. The segmentation result is [SEG].",
    )
)
# CoReS utils/dataset.py:482,493 (ValDataset): the one answer of every validation conversation
CORES_VALIDATION_ANSWER = f"It usually appears on {CORES_CHAIN_TOKEN}. It is {SEG}."
# LISA, MMR and GSVA validation: "[SEG]." (`--val_answer` default)
DEFAULT_VAL_ANSWER = SEG + "."

# MMR utils/utils.py: EXPAND_QUESTION_LIST, EXPAND_LONG_QUESTION_LIST, SINGLE_ANSWER_LIST,
# MULTI_ANSWER_LIST (typos such as "asegment" are MMR's own)
MMR_EXPAND_QUESTIONS = (
    "Could you identify the {class_name} in this picture?",
    "Are you able to delineate the {class_name} in the image?",
    "Can you pinpoint the {class_name} in this photo?",
    "Is it possible for you to highlight the {class_name} in this image?",
    "Can you discern the {class_name} in the given picture?",
    "Can you provide me with asegment of the {class_name}?",
    "Please perform image segmentation to isolate the {class_name} in this image.",
    "Help me segment the {class_name}.",
    "Would you be willing to segment the {class_name}?",
    "Can you identify {class_name} in this picture? Please provide a segmentation mask.",
    "Could you point out {class_name} in this image and show it with a segmentation mask?",
    "In this image, where is {class_name}? I'd appreciate a segmentation mask.",
    "Please highlight {class_name} in this image using a segmentation mask.",
    "In the picture provided, can you show where {class_name} is with a segmentation mask?",
)
MMR_EXPAND_LONG_QUESTIONS = (
    "{sent} Provide the segmentation mask.",
    "{sent} Output the segmentation mask.",
    "{sent} Please show the segmentation mask.",
    "{sent} I'd appreciate segmentation masks.",
    "{sent} Please highlight the segmentation mask.",
)
MMR_SINGLE_ANSWERS = (
    "{class_name} is {seg}.",
    "The segmentation result of {class_name} is {seg}.",
    "{seg}.",
)
MMR_MULTI_ANSWERS = (
    "{class_name} are {seg}, separately.",
    "{class_name} are {seg}.",
    "Sure, {class_name} are {seg}, separately.",
    "Sure, {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}, separately.",
    "Sure, the segmentation result of {class_name} are {seg}.",
    "Sure, the segmentation result of {class_name} are {seg}, separately.",
    "Sure, they are {seg}.",
    "They are {seg}.",
    "{seg}.",
)
# How many times MMR's default mix extends the shared short list (sem_seg and refer_seg).
MMR_SHORT_EXTENSIONS = 2
EXPANDED_SHORT_QUESTIONS = SHORT_QUESTIONS + MMR_EXPAND_QUESTIONS * MMR_SHORT_EXTENSIONS
EXPANDED_LONG_QUESTIONS = LONG_QUESTIONS + MMR_EXPAND_LONG_QUESTIONS
SEPARATE_ANSWER_PROBABILITY = 0.5  # MMR: `separate_answer = random.randint(0, 1)`

# GSVA model/llava/constants.py: SHORT_QUESTION_LIST_MODE4 and ANSWER_LIST_MODE4_START /
# _TEMPLATE / _END, drawn with one shared index
GSVA_QUESTIONS = (
    "Can you segment {x} in this image?",
    "Please segment {x} in this image.",
    "What are {x} in this image? Please respond with segmentation masks.",
    "What are {x} in this image? Please output segmentation masks.",
)
GSVA_STARTS = ("The segmentation results are", "Sure, they are", "Sure,", "Sure,", "Sure,")
GSVA_PARTS = (
    "{x} [SEG]",
    "{x}:[SEG]",
    "the mask of {x} is [SEG]",
    "the segmentation of {x} is [SEG]",
    "the referred {x} is [SEG]",
)
GSVA_ENDS = (".", ".", ".", ".", ".")
# `--gsva_answer_form` (ours): "drawn", GSVA's loaders; "colon", always "Sure, they are a:[SEG]."
DRAWN_FORM, COLON_FORM = GSVA_ANSWER_FORM_CHOICES
GSVA_FORM_INDEX = {COLON_FORM: 1}
GSVA_QUESTION_JOINER = ", "


@dataclass
class Target:
    """A named target: a class name or a referring sentence, and its mask (None if absent).

    mask: uint8 [H, W] in {0, 1, 255}; None means the source says the target is not in the image.
    """

    name: str
    is_sentence: bool
    mask: np.ndarray | None


@dataclass(frozen=True)
class GsvaAnswerFormat:
    """How one of GSVA's loaders writes its answer (GSVA `data/sem_seg_dataset.py:323-333`,
    `data/refer_seg_dataset.py:263-285`).

    joiner: between the answer's parts ("," in sem_seg, ", " in refer_seg).
    clean_names: names `.strip().strip('.')` before the question and the answer (refer_seg).
    reject_empty: a target whose mask is all zero (`masks[t].sum() < 1`) is answered `[REJ]`
        (refer_seg; sem_seg's targets are always `[SEG]`).
    """

    joiner: str
    clean_names: bool
    reject_empty: bool


GSVA_SEM_SEG = GsvaAnswerFormat(joiner=",", clean_names=False, reject_empty=False)
GSVA_REFER_SEG = GsvaAnswerFormat(joiner=", ", clean_names=True, reject_empty=True)


def join_names(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """One of `options`, uniformly (Python's `random.choice`)."""
    return options[int(rng.integers(len(options)))]


def question(
    target_names: list[str], is_sentence: bool, rng: np.random.Generator, expand: bool
) -> str:
    """A LISA/MMR segmentation question: a long template with the sentence, or a short one with
    the names joined 'a, b and c' and lower-cased."""
    if is_sentence:
        template = choose(rng, EXPANDED_LONG_QUESTIONS if expand else LONG_QUESTIONS)
        return IMAGE_PREFIX + template.format(sent=" ".join(target_names))
    template = choose(rng, EXPANDED_SHORT_QUESTIONS if expand else SHORT_QUESTIONS)
    return IMAGE_PREFIX + template.format(class_name=join_names(target_names).lower())


def token_of(target: Target) -> str:
    """`[REJ]` for an absent target (mask None), else `[SEG]`."""
    return REJ if target.mask is None else SEG


def single_target_answers(style: str) -> tuple[str, ...]:
    """The answer list of one-target conversations: CoReS's for "cores", else LISA's."""
    return CORES_ANSWERS if style == CORES_STYLE else ANSWERS


def lisa_answer(target: Target, rng: np.random.Generator, style: str = LISA_STYLE) -> str:
    """One answer of `style`'s one-target list, `[REJ]` in place of `[SEG]` for an absent
    target (a "cores" answer keeps its chain token)."""
    return choose(rng, single_target_answers(style)).replace(SEG, token_of(target))


def mmr_answer(targets: list[Target], rng: np.random.Generator) -> str:
    """MMR's answer to one question (MMR `utils/sem_seg_dataset.py:463-484`): LISA's answers for
    one target; else "separate" (one SINGLE_ANSWER_LIST template for every target, each without
    its '.', joined 'x, y and z.') or "multi" (lower-cased names, tokens joined 'a, b and c')."""
    if len(targets) == 1:
        return lisa_answer(targets[0], rng)
    tokens = [token_of(t) for t in targets]
    if rng.random() < SEPARATE_ANSWER_PROBABILITY:
        template = choose(rng, MMR_SINGLE_ANSWERS)
        items = [
            template.format(class_name=t.name, seg=token).removesuffix(".")
            for t, token in zip(targets, tokens, strict=True)
        ]
        return join_names(items) + "."
    names = join_names([t.name for t in targets])
    return choose(rng, MMR_MULTI_ANSWERS).format(class_name=names.lower(), seg=join_names(tokens))


def gsva_conversation(
    targets: list[Target],
    rng: np.random.Generator,
    answer_format: GsvaAnswerFormat,
    answer_form: str = DRAWN_FORM,
) -> tuple[str, str]:
    """One GSVA-style round naming every target: the question lists the names lower-cased, the
    answer keeps their case, one start/part/end index for the whole answer: GSVA's draw
    (`answer_form` "drawn"), or the form GSVA_FORM_INDEX names ("colon"), the index still drawn
    so that the sample's other draws stay as they were."""
    names = [t.name.strip().strip(".") if answer_format.clean_names else t.name for t in targets]
    question_text = choose(rng, GSVA_QUESTIONS).format(x=GSVA_QUESTION_JOINER.join(names).lower())
    index = int(rng.integers(len(GSVA_STARTS)))
    if answer_form != DRAWN_FORM:
        index = GSVA_FORM_INDEX[answer_form]
    parts = []
    for name, target in zip(names, targets, strict=True):
        # masks are non-negative, so GSVA's `sum() < 1` means "all zero"
        empty = target.mask is not None and not target.mask.any()
        token = REJ if empty and answer_format.reject_empty else token_of(target)
        parts.append(GSVA_PARTS[index].format(x=name).replace(SEG, token))
    answer = GSVA_STARTS[index] + " " + answer_format.joiner.join(parts) + GSVA_ENDS[index]
    return IMAGE_PREFIX + question_text, answer


def split_into_questions(
    count: int, num_questions: int, rng: np.random.Generator, cap: int | None = None
) -> list[list[int]]:
    """Spread `count` shuffled item indices over `num_questions` questions as MMR's
    `allocate_class` does: each item goes to a random question that has none yet, else to a
    random question below `cap` items (no cap when None), so every question gets 1..cap.

    ValueError when `count` items cannot fit (count > num_questions * cap)."""
    if cap is not None and count > num_questions * cap:
        raise ValueError(f"{count} targets do not fit {num_questions} questions of {cap}")
    order = rng.permutation(count).tolist()
    groups: list[list[int]] = [[] for _ in range(num_questions)]
    for item in order:
        sizes = np.array([len(group) for group in groups])
        empty = np.flatnonzero(sizes == 0)
        open_ = empty if len(empty) else np.flatnonzero(sizes < (cap or count))
        groups[int(open_[int(rng.integers(len(open_)))])].append(item)
    return groups


def build_conversations(
    targets: list[Target],
    style: str,
    rng: np.random.Generator,
    shape: tuple[int, int],
    num_classes_per_sample: int = 3,
    expand: bool = False,
    num_classes_per_question: int | None = None,
    gsva_format: GsvaAnswerFormat = GSVA_REFER_SEG,
    gsva_answer_form: str = DRAWN_FORM,
) -> tuple[list[list[tuple[str, str]]], np.ndarray]:
    """Conversations about `targets` in `style`, and their masks in token order.

    Returns (conversations, masks uint8 [k, H, W]); absent targets contribute zero masks.
    For "mmr", the targets are spread over min(len, num_classes_per_sample) questions of
    1..num_classes_per_question targets each (`split_into_questions`). `gsva_format` says how
    the "gsva" answer is written (GSVA_REFER_SEG or GSVA_SEM_SEG), `gsva_answer_form` in which
    of GSVA's forms (`--gsva_answer_form`).
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"--prompt_style must be one of {PROMPT_STYLES}, not {style!r}")
    if style == "gsva":
        groups = [list(range(len(targets)))]
    elif style == "mmr":
        groups = split_into_questions(
            len(targets),
            min(len(targets), num_classes_per_sample),
            rng,
            num_classes_per_question,
        )
    else:
        groups = [[index] for index in range(len(targets))]
    conversations, ordered = [], []
    for group in groups:
        chosen = [targets[i] for i in group]
        if style == "gsva":
            conversations.append([gsva_conversation(chosen, rng, gsva_format, gsva_answer_form)])
        else:
            is_sentence = all(t.is_sentence for t in chosen)
            names = [t.name for t in chosen]
            asked = question(names, is_sentence, rng, expand)
            answer = (
                mmr_answer(chosen, rng) if style == "mmr" else lisa_answer(chosen[0], rng, style)
            )
            conversations.append([(asked, answer)])
        ordered.extend(chosen)
    masks = [t.mask if t.mask is not None else np.zeros(shape, np.uint8) for t in ordered]
    return conversations, np.stack(masks).astype(np.uint8) if masks else np.zeros(
        (0, *shape), np.uint8
    )


def targets_to_draw(style: str, num_classes_per_sample: int, num_classes_per_question: int) -> int:
    """How many targets a training sample draws: per_sample x per_question for "mmr"."""
    return (
        num_classes_per_sample * num_classes_per_question
        if style == "mmr"
        else num_classes_per_sample
    )


def target_count(options: SamplingOptions) -> int:
    """How many distinct targets a training sample asks about at most."""
    return targets_to_draw(
        options.prompt_style, options.num_classes_per_sample, options.num_classes_per_question
    )


def finish_sample(
    image: np.ndarray,
    targets: list[Target],
    options: SamplingOptions,
    rng: np.random.Generator,
    image_path: Path,
    source: str,
    *,
    gsva_format: GsvaAnswerFormat = GSVA_REFER_SEG,
) -> Sample:
    """Conversations about `targets` in the configured prompt style, as a Sample.

    image: uint8 [H, W, 3]. gsva_format: how the "gsva" style writes its answer; GSVA_REFER_SEG
    (", " between parts, sentences stripped of '.', empty masks answered `[REJ]`) for referring
    sources, GSVA_SEM_SEG ("," between parts) for semantic and part sources.
    """
    conversations, masks = build_conversations(
        targets,
        options.prompt_style,
        rng,
        image.shape[:2],
        options.num_classes_per_sample,
        options.use_expand_question_list,
        options.num_classes_per_question,
        gsva_format,
        options.gsva_answer_form,
    )
    return Sample(image, conversations, masks, str(image_path), source)


def target_count_problem(answer: str) -> str | None:
    """None when `answer` holds exactly one `[SEG]` and no `[REJ]`, else what it holds."""
    seg, rej = answer.count(SEG), answer.count(REJ)
    if seg == 1 and not rej:
        return None
    return f"holds {seg} {SEG} and {rej} {REJ}; it needs exactly one {SEG} and no {REJ}"


def check_val_answer(answer: str) -> str:
    """`answer` if it can answer a single-target validation conversation (`--val_answer`: one
    `[SEG]`, no `[REJ]`), else ValueError naming the flag."""
    problem = target_count_problem(answer)
    if problem:
        raise ValueError(f"--val_answer {answer!r} {problem}")
    return answer


def val_answer_problem(answer: str, chain_token: str = "") -> str | None:
    """What makes `answer` unfit as `--val_answer` beside `--chain_token`, or None: besides
    `target_count_problem`, the chain token (if any) at most once and before the `[SEG]`;
    CoReS's `[SEG_SEMA]` only when it is the chain token (else the tokenizer splits it into
    word pieces)."""
    problem = target_count_problem(answer)
    misplaced = answer.count(chain_token) > 1 or answer.find(chain_token) > answer.find(SEG)
    if problem is None and CORES_CHAIN_TOKEN in answer and chain_token != CORES_CHAIN_TOKEN:
        problem = (
            f"holds {CORES_CHAIN_TOKEN}, which is one token only with --chain_token "
            f"{CORES_CHAIN_TOKEN} (else it is split into word pieces)"
        )
    elif problem is None and chain_token and misplaced:
        problem = f"must hold --chain_token {chain_token} at most once, before its {SEG}"
    return None if problem is None else f"--val_answer {answer!r} {problem}"


def validation_question(sentence: str, is_sentence: bool) -> str:
    """LISA/MMR validation prompt (note the space after the newline, as the originals)."""
    if is_sentence:
        return IMAGE_PREFIX + f" {sentence} Please output segmentation mask."
    return IMAGE_PREFIX + f" What is {sentence} in this image? Please output segmentation mask."
