"""Question and answer templates of the LISA, MMR and GSVA families, and the one function that
turns a list of named targets into conversations plus masks in `[SEG]`/`[REJ]` order.

Prompt styles (`--prompt_style`):
- "lisa": one target per conversation, one `[SEG]` per answer.
- "mmr": several targets per question (`--num_classes_per_question`), answers naming each
  target with its own token ("separate") or listing the tokens ("multi"), 50/50.
- "gsva": all targets of the image in one conversation, "Sure, a:[SEG], b:[REJ]." style.
Absent targets (the source says the named thing is not in the image) get `[REJ]` in every style.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.datasets.base import IMAGE_PLACEHOLDER

SEG = "[SEG]"
REJ = "[REJ]"
PROMPT_STYLES = ("lisa", "mmr", "gsva")
IMAGE_PREFIX = IMAGE_PLACEHOLDER + "\n"

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
EXPANDED_SHORT_QUESTIONS = SHORT_QUESTIONS + (
    "Could you identify the {class_name} in this picture?",
    "Where is the {class_name} in this image? Please give its segmentation mask.",
    "Please find the {class_name} in this picture and segment it.",
    "Segment the {class_name} shown in this image.",
    "Can you highlight the {class_name} in this image with a mask?",
    "Show me the segmentation of the {class_name} in this image.",
    "Which region of this image is the {class_name}? Please output a segmentation mask.",
    "Please mark the {class_name} in this image with a segmentation mask.",
    "Could you outline the {class_name} in this picture?",
    "I need a mask of the {class_name} in this image.",
)
EXPANDED_LONG_QUESTIONS = LONG_QUESTIONS + (
    "{sent} Provide the segmentation mask.",
    "{sent} Please answer with a segmentation mask.",
    "{sent} Show the answer as a segmentation mask.",
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
MMR_SEPARATE_ITEMS = (
    "{class_name} is {seg}",
    "The segmentation result of {class_name} is {seg}",
    "{seg}",
)
MMR_MULTI_ANSWERS = (
    "Sure, the segmentation result of {class_name} are {seg}, separately.",
    "Sure, {class_name} are {seg}, separately.",
    "The segmentation results of {class_name} are {seg}, respectively.",
)
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


@dataclass
class Target:
    """A named target: a class name or a referring sentence, and its mask (None if absent).

    mask: uint8 [H, W] in {0, 1, 255}; None means the source says the target is not in the image.
    """

    name: str
    is_sentence: bool
    mask: np.ndarray | None


def join_names(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def question(
    target_names: list[str], is_sentence: bool, rng: np.random.Generator, expand: bool
) -> str:
    """A segmentation question about one or several names (LISA/MMR templates)."""
    if is_sentence:
        template = choose(rng, EXPANDED_LONG_QUESTIONS if expand else LONG_QUESTIONS)
        return IMAGE_PREFIX + template.format(sent=" ".join(target_names))
    template = choose(rng, EXPANDED_SHORT_QUESTIONS if expand else SHORT_QUESTIONS)
    return IMAGE_PREFIX + template.format(class_name=join_names(target_names))


def token_of(target: Target) -> str:
    return REJ if target.mask is None else SEG


def lisa_answer(target: Target, rng: np.random.Generator) -> str:
    return choose(rng, ANSWERS).replace(SEG, token_of(target))


def mmr_answer(targets: list[Target], rng: np.random.Generator) -> str:
    """'A is [SEG], B is [REJ] and C is [SEG].' or 'Sure, ... of A, B and C are [SEG], ...'."""
    if len(targets) == 1:
        return lisa_answer(targets[0], rng)
    names = [t.name for t in targets]
    tokens = [token_of(t) for t in targets]
    if rng.random() < 0.5:
        items = [
            choose(rng, MMR_SEPARATE_ITEMS).format(class_name=n, seg=s)
            for n, s in zip(names, tokens, strict=True)
        ]
        return join_names(items) + "."
    return choose(rng, MMR_MULTI_ANSWERS).format(
        class_name=join_names(names), seg=join_names(tokens)
    )


def gsva_conversation(targets: list[Target], rng: np.random.Generator) -> tuple[str, str]:
    """One GSVA-style round naming every target."""
    names = [t.name.lower().rstrip(".") for t in targets]
    index = int(rng.integers(len(GSVA_STARTS)))
    parts = [
        GSVA_PARTS[index].format(x=n).replace(SEG, token_of(t))
        for n, t in zip(names, targets, strict=True)
    ]
    return (
        IMAGE_PREFIX + choose(rng, GSVA_QUESTIONS).format(x=", ".join(names)),
        GSVA_STARTS[index] + " " + ", ".join(parts) + ".",
    )


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
) -> tuple[list[list[tuple[str, str]]], np.ndarray]:
    """Conversations about `targets` in `style`, and their masks in token order.

    Returns (conversations, masks uint8 [k, H, W]); absent targets contribute zero masks.
    For "mmr", the targets are spread over min(len, num_classes_per_sample) questions of
    1..num_classes_per_question targets each (`split_into_questions`).
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
            conversations.append([gsva_conversation(chosen, rng)])
        else:
            is_sentence = all(t.is_sentence for t in chosen)
            names = [t.name for t in chosen]
            answer = lisa_answer(chosen[0], rng) if style == "lisa" else mmr_answer(chosen, rng)
            conversations.append([(question(names, is_sentence, rng, expand), answer)])
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


def validation_question(sentence: str, is_sentence: bool) -> str:
    """LISA/MMR validation prompt (note the space after the newline, as the originals)."""
    if is_sentence:
        return IMAGE_PREFIX + f" {sentence} Please output segmentation mask."
    return IMAGE_PREFIX + f" What is {sentence} in this image? Please output segmentation mask."
