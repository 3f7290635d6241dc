"""LaSagnA's semantic-segmentation sequence format (congvvc/LaSagnA @897cbbe; arXiv 2404.08506).

A question names a candidate class list; the answer writes one item per candidate class, a
present class as its name followed by `<ins>` (the mask token: the k-th `<ins>` prompts the k-th
mask), an absent one followed by `<no_ins>` (no mask, language-model loss only):

    question: "<image>\\n<semantic>Segment this image.<cat_start> wall, sky, person <cat_end>"
    answer:   "wall<ins>sky<no_ins>person<ins>"

No separators, no lead-in phrase and no final period (LaSagnA `utils/sem_seg_dataset.py:509-520`;
its SEG_ANSWER_LIST lead-ins are commented out in training, the test parser still strips them).
Every string here is copied from LaSagnA `utils/utils.py` and `test_sem.py`.

Our samples write the pipeline's canonical markers, `[SEG]` for `<ins>` and `[REJ]` for
`<no_ins>` ("wall[SEG]sky[REJ]person[SEG]"), with one mask row per marker as every family (an
absent class's row is all zeros); `--vocabulary lasagna` turns the markers into LaSagnA's
strings when a conversation is tokenized. The parser reads either spelling.

Training draw (`get_sample_classes`, LaSagnA `utils/sem_seg_dataset.py:250-287`): the positives
are every class with pixels, the negatives every other vocabulary class; a vocabulary shorter
than `num_all_classes` uses all of them; at least `num_all_classes` positives ("maybe not
happen") draws 40 positives and 20 negatives; otherwise all positives plus
`num_all_classes - #positives` negatives. The drawn list, shuffled, is the answer order.
The question lists (LaSagnA :497-507): closed-set label-map datasets (ADE20K, COCO-Stuff,
Mapillary, Cityscapes) the whole vocabulary, shuffled on its own; open-set ones (OpenImage) the
drawn classes re-shuffled ("question random differ from answer"). So the answer order does not
follow the question order in the released code; we do the same.

Deviation (LaSagnA defect, not copied): its COCO-Stuff training filter keeps a label value only if
it is a key of COCO_ID_MAP (the original stuffthingmaps ids) while the values are the 171
contiguous train ids, so 11 present classes (train ids 11, 25, 28, 29, 44, 65, 67, 68, 70, 82,
90: stop sign ... ceiling) are never positives and may be drawn as negatives while present.
Here every class with pixels is a positive.

Parsing generated text (`parse_semantic_answer`, LaSagnA `test_sem.py:get_class_name`): LaSagnA
strips the lead-ins anywhere, removes newlines, keeps the text after "ASSISTANT:" (none: no
class), removes "</s>" and every ".", captures the text before each `<ins>` and then REMOVES
EVERY SPACE ("traffic light" -> "trafficlight") before fuzzy matching. Ours returns one entry per
`<ins>` / `<no_ins>` token (or `[SEG]` / `[REJ]` marker) in order (so the k-th present entry is
the k-th mask even when a name is empty), strips a lead-in only at the start, takes the text
after the first "ASSISTANT:" when there is one (else the whole text, for decoded answers alone)
and keeps inner spaces (whitespace runs folded to one space, ends stripped); `lasagna_name` gives
LaSagnA's spelling.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.tokens import CAT_END_TOKEN, CAT_START_TOKEN, INS_TOKEN, NO_INS_TOKEN, SEMANTIC_TOKEN
from utils.datasets.base import IGNORE_LABEL, IMAGE_PLACEHOLDER, Sample, stack_masks
from utils.datasets.sem_seg import LabelMap, class_mask
from utils.datasets.templates import REJ, SEG, Target

# LaSagnA utils/utils.py SEG_INPUT_LIST, in its order: the instruction sentences
SEMANTIC_INSTRUCTIONS = (
    "Segment this image.",
    "Please segment this image.",
    "Can you segment this image?",
    "What are in this image? Please respond with segmentation mask.",
    "What are in this image? Please output segmentation mask.",
    "What are in this image? Please give segmentation result.",
    "What are in this image? Please visualize segmentation mask.",
    "What are in this image? Please respond with segmentation result.",
    "What are in this image? Please output segmentation result.",
    "Segment all the objects in this image.",
    "Please segment all the objects in this image.",
    "Can you segment all the objects in this image?",
    "What are in this image? Please respond with segmentation mask of all the objects.",
    "What are in this image? Please output segmentation mask of all the objects.",
    "What are in this image? Please give segmentation result of all the objects.",
    "What are in this image? Please visualize segmentation mask of all the objects.",
    "What are in this image? Please respond with segmentation result of all the objects.",
    "What are in this image? Please output segmentation result of all the objects.",
)
SEMANTIC_QUESTIONS = tuple(
    f"{IMAGE_PLACEHOLDER}\n{SEMANTIC_TOKEN}{sentence}{CAT_START_TOKEN}"
    + f" {{all_class}} {CAT_END_TOKEN}"
    for sentence in SEMANTIC_INSTRUCTIONS
)
VALIDATION_TEMPLATE = 0  # test_sem_seg_dataset.py asks with SEG_INPUT_LIST[0]
CLASS_JOINER = ", "
# LaSagnA's SEG_INS_OUTPUT / SEG_NO_INS_OUTPUT with the canonical markers in place of its tokens
PRESENT_ITEM, ABSENT_ITEM = "{class_name}" + SEG, "{class_name}" + REJ
PRESENT_MARKERS = (INS_TOKEN, SEG)

# LaSagnA train_ds.py `--num_all_classes` default (its README command passes 80 too; the
# dataset class's own default, 100, is overridden by train_ds.py)
DEFAULT_NUM_ALL_CLASSES = 80
# get_sample_classes' hard-coded draw when the positives alone fill the list
MANY_POSITIVES_DRAWN, MANY_POSITIVES_NEGATIVES = 40, 20

# the label-map datasets whose question lists the whole vocabulary; others (OpenImage) list the
# drawn classes
CLOSED_SET_FAMILIES = ("ade20k", "cocostuff", "mapillary", "cityscapes")

# test_sem.py get_class_name's lead-ins, in its order (the longer "Sure, ..." before "Sure, ")
ANSWER_LEAD_INS = (
    "The segmentation results are ",
    "The segmentations are ",
    "Sure, the results are ",
    "Sure, the segmentation results are ",
    "Sure, the segmentations are ",
    "The results are ",
    "Sure, ",
)
ASSISTANT_MARK = "ASSISTANT:"
END_OF_SEQUENCE = "</s>"
PERIOD = "."
ITEM_MARKERS = (INS_TOKEN, NO_INS_TOKEN, SEG, REJ)
ITEM_PATTERN = re.compile(
    r"([^<>]*?)(" + "|".join(re.escape(marker) for marker in ITEM_MARKERS) + ")"
)
WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ClassDraw:
    """One training draw: `classes` in answer order, and which of them are `positives`
    (present) and `negatives` (absent), each in the order drawn."""

    classes: list[str]
    positives: list[str]
    negatives: list[str]


@dataclass(frozen=True)
class LasagnaSample:
    """A semantic-segmentation conversation's parts: the question, the answer and its targets
    (one per answer item, in answer order; `mask` None for `<no_ins>` items)."""

    question: str
    answer: str
    targets: list[Target]


def semantic_question(class_names: Sequence[str], template: int = VALIDATION_TEMPLATE) -> str:
    """SEMANTIC_QUESTIONS[template] with the names joined ", " and lower-cased."""
    joined = CLASS_JOINER.join(class_names).lower()
    return SEMANTIC_QUESTIONS[template].format(all_class=joined)


def semantic_answer(items: Sequence[tuple[str, bool]]) -> str:
    """ "wall[SEG]sky[REJ]..." (LaSagnA's "wall<ins>sky<no_ins>...") from (name, present) items
    in answer order (names lower-cased, as LaSagnA writes them)."""
    return "".join(
        (PRESENT_ITEM if present else ABSENT_ITEM).format(class_name=name.lower())
        for name, present in items
    )


def get_sample_classes(
    vocabulary: Sequence[str],
    positives: Sequence[str],
    num_all_classes: int,
    rng: np.random.Generator,
) -> ClassDraw:
    """LaSagnA's random class list (see the module docstring); `positives` are the classes
    with pixels, in vocabulary order; the negatives are the other vocabulary names."""
    if num_all_classes < 1:
        raise ValueError(f"--num_all_classes must be at least 1, got {num_all_classes}")
    present = set(positives)
    negatives = [name for name in vocabulary if name not in present]
    drawn_pos, drawn_neg = list(positives), negatives
    if len(vocabulary) >= num_all_classes:
        if len(positives) >= num_all_classes:
            drawn_pos = _draw(positives, MANY_POSITIVES_DRAWN, rng)
            drawn_neg = _draw(negatives, MANY_POSITIVES_NEGATIVES, rng)
        else:
            drawn_neg = _draw(negatives, num_all_classes - len(positives), rng)
    classes = drawn_pos + drawn_neg
    order = rng.permutation(len(classes))
    return ClassDraw([classes[i] for i in order], drawn_pos, drawn_neg)


def _draw(names: Sequence[str], count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct names (np.random.choice without replacement); ValueError naming both
    numbers when there are fewer (LaSagnA would raise too)."""
    if count > len(names):
        raise ValueError(f"cannot draw {count} distinct classes from {len(names)}")
    return [names[i] for i in rng.choice(len(names), size=count, replace=False)]


def question_classes(
    family: str, vocabulary: Sequence[str], draw: ClassDraw, rng: np.random.Generator
) -> list[str]:
    """The question's class list: the whole vocabulary shuffled (closed-set families) or the
    drawn classes shuffled again (others), each shuffle independent of the answer order."""
    names = list(vocabulary) if family in CLOSED_SET_FAMILIES else list(draw.classes)
    return [names[i] for i in rng.permutation(len(names))]


def semantic_targets(
    family: str,
    vocabulary: Sequence[str],
    label: LabelMap,
    rng: np.random.Generator,
    num_all_classes: int = DEFAULT_NUM_ALL_CLASSES,
    ignore_pixels: str = "background",
) -> LasagnaSample:
    """A training sample's question, answer and targets from a label map whose class indices
    index `vocabulary`: present classes get the union of their pixels (uint8 [H, W], 1 inside),
    absent ones no mask. One template drawn uniformly from the 18. ignore_pixels: as
    `--ignore_pixels`, "background" (LaSagnA: `label == class_id`, ignored pixels are 0) or
    "exclude" (they are IGNORE_LABEL in every mask)."""
    positives = [vocabulary[index] for index in label.present()]
    draw = get_sample_classes(vocabulary, positives, num_all_classes, rng)
    asked = question_classes(family, vocabulary, draw, rng)
    template = int(rng.integers(len(SEMANTIC_QUESTIONS)))
    present = set(draw.positives)
    index_of = {name: index for index, name in enumerate(vocabulary)}
    ignored = label.where(IGNORE_LABEL) if ignore_pixels == "exclude" else None
    targets = [
        Target(name, False, class_mask(label.where(index_of[name]), ignored))
        if name in present
        else Target(name, False, None)
        for name in draw.classes
    ]
    answer = semantic_answer([(t.name, t.mask is not None) for t in targets])
    return LasagnaSample(semantic_question(asked, template), answer, targets)


def lasagna_sample(
    image: np.ndarray, drawn: LasagnaSample, image_path: str | Path, source: str
) -> Sample:
    """One conversation (question, answer); masks uint8 [n, H, W], one per answer item in
    answer order: a present class's mask (`[SEG]`), all zeros for an absent one (`[REJ]`, which
    prompts no decoder call)."""
    empty = np.zeros(image.shape[:2], dtype=np.uint8)
    masks = [empty if target.mask is None else target.mask for target in drawn.targets]
    return Sample(
        image,
        [[(drawn.question, drawn.answer)]],
        stack_masks(masks, image.shape[:2]),
        str(image_path),
        source,
    )


def parse_semantic_answer(text: str) -> list[tuple[str, bool]]:
    """Generated text -> [(name, present)], one per `<ins>` / `<no_ins>` (or `[SEG]` / `[REJ]`)
    marker in order (see the module docstring for how this differs from LaSagnA's parser)."""
    if ASSISTANT_MARK in text:
        text = text.split(ASSISTANT_MARK, 1)[1]
    text = text.replace(END_OF_SEQUENCE, "").replace(PERIOD, "").strip()
    for lead_in in sorted(ANSWER_LEAD_INS, key=len, reverse=True):
        if text.startswith(lead_in):
            text = text[len(lead_in) :]
            break
    return [
        (WHITESPACE.sub(" ", name).strip(), token in PRESENT_MARKERS)
        for name, token in ITEM_PATTERN.findall(text)
    ]


def lasagna_name(name: str) -> str:
    """A parsed name as LaSagnA's parser leaves it: every space removed."""
    return name.replace(" ", "")
