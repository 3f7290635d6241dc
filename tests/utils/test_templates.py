"""Templates and their draw rules against the reference code: the lists equal LISA's, MMR's,
GSVA's and CoReS's (tests/utils/reference_templates.py, cited), every drawn sem_seg question and
answer is one the reference loaders can write for the same targets (composed here from the
upstream code), MMR's draw probabilities and once-per-question "separate" template, GSVA's answer
formats, MMR's per-question cap and group-size distribution (`allocate_class`, re-implemented
below), CoReS's uniform answer draw, and the `--val_answer` rules."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.utils import fixtures_sem as fx
from tests.utils import reference_templates as ref
from utils.datasets.base import SamplingOptions
from utils.datasets.sem_seg import LabelMapSource
from utils.datasets.templates import (
    ANSWERS,
    CORES_ANSWERS,
    CORES_CHAIN_TOKEN,
    CORES_VALIDATION_ANSWER,
    DEFAULT_VAL_ANSWER,
    EXPANDED_LONG_QUESTIONS,
    EXPANDED_SHORT_QUESTIONS,
    EXPLANATORY_QUESTIONS,
    GSVA_ENDS,
    GSVA_PARTS,
    GSVA_QUESTIONS,
    GSVA_SEM_SEG,
    GSVA_STARTS,
    IMAGE_PREFIX,
    LONG_QUESTIONS,
    MMR_EXPAND_LONG_QUESTIONS,
    MMR_EXPAND_QUESTIONS,
    MMR_MULTI_ANSWERS,
    MMR_SINGLE_ANSWERS,
    REJ,
    SEG,
    SHORT_QUESTIONS,
    Target,
    build_conversations,
    check_val_answer,
    finish_sample,
    mmr_answer,
    question,
    split_into_questions,
    val_answer_problem,
)

# Per-bin tolerance of the frequency comparisons, in standard errors of the sampling error: a
# bin of a correct implementation strays this far with probability < 1e-5.
Z_TOLERANCE = 4.5
DRAWS = 10_000
MANY_CLASSES = 12  # >= 3 questions x 3 targets, so MMR-style samples draw 9 targets
FEW_CLASSES = 4  # 4 targets over 3 questions: single-target questions occur


def prefixed(templates: tuple[str, ...]) -> list[str]:
    return [IMAGE_PREFIX + template for template in templates]


def test_lists_equal_the_reference_lists() -> None:
    assert prefixed(SHORT_QUESTIONS) == ref.LISA_SHORT_QUESTION_LIST
    assert prefixed(LONG_QUESTIONS) == ref.LISA_LONG_QUESTION_LIST
    assert list(EXPLANATORY_QUESTIONS) == ref.LISA_EXPLANATORY_QUESTION_LIST
    assert list(ANSWERS) == ref.LISA_ANSWER_LIST
    assert list(ANSWERS) == [answer.format(seg=SEG) for answer in ref.MMR_ANSWER_LIST]
    assert prefixed(MMR_EXPAND_QUESTIONS) == ref.MMR_EXPAND_QUESTION_LIST
    assert prefixed(MMR_EXPAND_LONG_QUESTIONS) == ref.MMR_EXPAND_LONG_QUESTION_LIST
    assert list(MMR_SINGLE_ANSWERS) == ref.MMR_SINGLE_ANSWER_LIST
    assert list(MMR_MULTI_ANSWERS) == ref.MMR_MULTI_ANSWER_LIST
    # the lists drawn from with --use_expand_question_list, duplicates (draw weights) included
    assert prefixed(EXPANDED_SHORT_QUESTIONS) == ref.MMR_EXPANDED_SHORT_DRAW_LIST
    assert prefixed(EXPANDED_LONG_QUESTIONS) == ref.MMR_EXPANDED_LONG_DRAW_LIST
    as_gsva = [IMAGE_PREFIX + q.format(x="{class_name}") for q in GSVA_QUESTIONS]
    assert as_gsva == ref.GSVA_SHORT_QUESTION_LIST_MODE4
    assert list(GSVA_STARTS) == ref.GSVA_ANSWER_LIST_MODE4_START
    assert [p.format(x="{class_name}") for p in GSVA_PARTS] == ref.GSVA_ANSWER_LIST_MODE4_TEMPLATE
    assert list(GSVA_ENDS) == ref.GSVA_ANSWER_LIST_MODE4_END
    assert list(CORES_ANSWERS) == ref.CORES_ANSWER_LIST and len(CORES_ANSWERS) == 18
    assert CORES_VALIDATION_ANSWER == ref.CORES_VALIDATION_ANSWER
    assert DEFAULT_VAL_ANSWER == "[SEG]."  # LISA utils/dataset.py ValDataset


# ---- the reference compositions, written from the upstream code --------------------------


def mmr_join(items: list[str]) -> str:
    """MMR utils/sem_seg_dataset.py:438-457: 'a', 'a and b', 'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def mmr_questions(names: list[str], draw_list: list[str]) -> set[str]:
    """MMR utils/sem_seg_dataset.py:459-460: `template.format(class_name=target.lower())`; LISA
    (one name, utils/sem_seg_dataset.py:282-283) is the same with one name."""
    return {template.format(class_name=mmr_join(names).lower()) for template in draw_list}


def mmr_answers(names: list[str], tokens: list[str]) -> dict[str, set[str]]:
    """Every answer MMR's sem_seg loader writes for one question (utils/sem_seg_dataset.py:
    461-484; refer_seg_dataset.py:204-227 is the same), mapped to how it was made: ANSWER_LIST
    for one target; else one SINGLE_ANSWER_LIST template formatted per target, its '.' cut
    (`[:-1]`), joined, plus '.'; or a MULTI_ANSWER_LIST template with the lower-cased names."""
    made: dict[str, set[str]] = {}
    if len(names) == 1:
        for k, template in enumerate(ref.MMR_ANSWER_LIST):
            made.setdefault(template.format(seg=tokens[0]), set()).add(f"single {k}")
        return made
    for k, template in enumerate(ref.MMR_SINGLE_ANSWER_LIST):
        items = [
            template.format(class_name=n, seg=s)[:-1] for n, s in zip(names, tokens, strict=True)
        ]
        made.setdefault(mmr_join(items) + ".", set()).add(f"separate {k}")
    for k, template in enumerate(ref.MMR_MULTI_ANSWER_LIST):
        answer = template.format(class_name=mmr_join(names).lower(), seg=mmr_join(tokens))
        made.setdefault(answer, set()).add(f"multi {k}")
    return made


def gsva_questions(names: list[str]) -> set[str]:
    """GSVA data/sem_seg_dataset.py:310,323 and refer_seg_dataset.py:262,269."""
    joined = ", ".join(names).lower()
    return {template.format(class_name=joined) for template in ref.GSVA_SHORT_QUESTION_LIST_MODE4}


def gsva_answers(names: list[str], tokens: list[str], joiner: str) -> dict[str, int]:
    """GSVA data/sem_seg_dataset.py:324-333 (joiner ",") and refer_seg_dataset.py:270-285
    (joiner ", "): one index for start, part template and end; "SEG" -> "REJ" per part."""
    made = {}
    for k, start in enumerate(ref.GSVA_ANSWER_LIST_MODE4_START):
        template = ref.GSVA_ANSWER_LIST_MODE4_TEMPLATE[k]
        parts = [
            template.format(class_name=n).replace("SEG", token.strip("[]"))
            for n, token in zip(names, tokens, strict=True)
        ]
        made[start + " " + joiner.join(parts) + ref.GSVA_ANSWER_LIST_MODE4_END[k]] = k
    return made


# ---- sem_seg draws in every prompt style --------------------------------------------------


def many_class_source(tmp_path: Path, count: int, options: SamplingOptions):
    """A LabelMapSource over `fx.write_ade20k_many(count)` and a lookup mask bytes -> name."""
    inside = fx.write_ade20k_many(tmp_path, count)
    names_by_mask = {mask.astype(np.uint8).tobytes(): name for name, mask in inside.items()}
    return LabelMapSource(tmp_path, options, "ade20k"), names_by_mask


def conversations_with_names(source, names_by_mask: dict, seeds: range):
    """(question, answer, names of its masks in token order) of every conversation drawn."""
    for seed in seeds:
        sample = source.sample(np.random.default_rng(seed))
        row = 0
        for conversation in sample.conversations:
            ((asked, answer),) = conversation
            count = answer.count(SEG) + answer.count(REJ)
            names = [names_by_mask[m.tobytes()] for m in sample.masks[row : row + count]]
            row += count
            yield asked, answer, names
        assert row == len(sample.masks)


def test_lisa_style_draws_are_lisa_templates(tmp_path: Path) -> None:
    options = SamplingOptions(3, prompt_style="lisa", use_expand_question_list=False)
    source, names_by_mask = many_class_source(tmp_path, MANY_CLASSES, options)
    questions, answers = Counter(), Counter()
    for asked, answer, names in conversations_with_names(source, names_by_mask, range(300)):
        assert len(names) == 1
        assert asked in mmr_questions(names, ref.LISA_SHORT_QUESTION_LIST)
        assert answer in ref.LISA_ANSWER_LIST
        questions[asked.replace(names[0].lower(), "{class_name}")] += 1
        answers[answer] += 1
    assert set(questions) == set(ref.LISA_SHORT_QUESTION_LIST)
    assert set(answers) == set(ref.LISA_ANSWER_LIST)


@pytest.mark.parametrize("expand", [False, True])
@pytest.mark.parametrize("classes", [FEW_CLASSES, MANY_CLASSES])
def test_mmr_style_draws_are_mmr_templates(tmp_path: Path, expand: bool, classes: int) -> None:
    options = SamplingOptions(3, 3, expand, "mmr")
    source, names_by_mask = many_class_source(tmp_path, classes, options)
    draw_list = ref.MMR_EXPANDED_SHORT_DRAW_LIST if expand else ref.LISA_SHORT_QUESTION_LIST
    templates_seen, answers_seen = set(), set()
    for asked, answer, names in conversations_with_names(source, names_by_mask, range(200)):
        assert 1 <= len(names) <= options.num_classes_per_question
        assert asked in mmr_questions(names, draw_list), asked
        made = mmr_answers(names, [SEG] * len(names))
        assert answer in made, (answer, names)
        answers_seen |= made[answer]
        templates_seen |= {
            t for t in draw_list if asked == t.format(class_name=mmr_join(names).lower())
        }
    assert templates_seen == set(draw_list)
    if classes == FEW_CLASSES:  # 4 targets: one question of 2 and two of 1
        expected = {f"single {k}" for k in range(len(ref.MMR_ANSWER_LIST))}
    else:  # 9 targets: always 3 questions of 3
        expected = set()
    expected |= {f"separate {k}" for k in range(len(ref.MMR_SINGLE_ANSWER_LIST))}
    expected |= {f"multi {k}" for k in range(len(ref.MMR_MULTI_ANSWER_LIST))}
    assert answers_seen == expected


def test_gsva_style_sem_seg_answers_join_with_a_bare_comma(tmp_path: Path) -> None:
    options = SamplingOptions(3, prompt_style="gsva")
    source, names_by_mask = many_class_source(tmp_path, MANY_CLASSES, options)
    indices, questions = set(), set()
    for seed in range(200):
        sample = source.sample(np.random.default_rng(seed))
        ((asked, answer),) = sample.conversations[0]
        assert len(sample.conversations) == 1 and len(sample.masks) == 3
        names = [names_by_mask[m.tobytes()] for m in sample.masks]
        assert asked in gsva_questions(names)
        made = gsva_answers(names, [SEG] * len(names), ",")
        assert answer in made, answer
        # the names keep their case in the answer and are lower-cased in the question
        assert all(n in answer and n.lower() in asked and n not in asked for n in names)
        indices.add(made[answer])
        questions |= {asked.replace(", ".join(names).lower(), "{class_name}")}
    assert indices == set(range(len(ref.GSVA_ANSWER_LIST_MODE4_START)))
    assert questions == set(ref.GSVA_SHORT_QUESTION_LIST_MODE4)


# ---- MMR draw probabilities and the once-per-question "separate" template -----------------


def assert_frequencies(
    counts: Counter, expected: dict[str, float], draws: int, z: float = Z_TOLERANCE
) -> None:
    """Observed shares within z binomial standard errors of the expected probabilities."""
    assert set(counts) == set(expected)
    for key, probability in expected.items():
        error = np.sqrt(probability * (1 - probability) / draws)
        assert abs(counts[key] / draws - probability) <= z * error, (key, counts[key], draws)


@pytest.mark.parametrize(
    "is_sentence, draw_list",
    [(False, ref.MMR_EXPANDED_SHORT_DRAW_LIST), (True, ref.MMR_EXPANDED_LONG_DRAW_LIST)],
)
def test_expanded_lists_are_drawn_as_mmr_draws_them(is_sentence: bool, draw_list) -> None:
    rng = np.random.default_rng(0)
    field = "sent" if is_sentence else "class_name"
    counts = Counter(question(["x"], is_sentence, rng, expand=True) for _ in range(DRAWS))
    weights = Counter(template.format(**{field: "x"}) for template in draw_list)
    assert_frequencies(counts, {q: n / len(draw_list) for q, n in weights.items()}, DRAWS)
    if not is_sentence:  # MMR's originals are 4 of 32 entries, 12.5 % of the draws
        originals = {t.format(class_name="x") for t in ref.LISA_SHORT_QUESTION_LIST}
        share = sum(counts[q] for q in originals) / DRAWS
        assert abs(share - 4 / 32) <= Z_TOLERANCE * np.sqrt(4 / 32 * 28 / 32 / DRAWS)


def test_separate_template_is_drawn_once_per_question() -> None:
    targets = [Target(name, False, np.ones((2, 2), np.uint8)) for name in ("Cat", "dog", "Sky")]
    made = mmr_answers(["Cat", "dog", "Sky"], [SEG] * 3)
    counts = Counter(mmr_answer(targets, np.random.default_rng(seed)) for seed in range(3000))
    # per-item templates would write mixed answers ("Cat is [SEG], [SEG] and ...") 2/3 of the
    # time a "separate" answer is drawn; none may appear
    assert set(counts) == set(made)
    separate = sum(n for a, n in counts.items() if any("separate" in m for m in made[a]))
    assert separate > 0 and "Cat is [SEG], dog is [SEG] and Sky is [SEG]." in counts
    assert "Sure, the segmentation result of cat, dog and sky are [SEG], [SEG] and [SEG]." in counts


def test_absent_targets_get_rej_in_lisa_and_mmr_answers() -> None:
    targets = [Target("cat", False, None), Target("dog", False, np.ones((2, 2), np.uint8))]
    made = mmr_answers(["cat", "dog"], [REJ, SEG])
    for seed in range(200):
        assert mmr_answer(targets, np.random.default_rng(seed)) in made
    conversations, masks = build_conversations(
        targets[:1], "lisa", np.random.default_rng(0), (2, 2)
    )
    assert conversations[0][0][1] in {a.replace(SEG, REJ) for a in ref.LISA_ANSWER_LIST}
    assert not masks.any()


# ---- CoReS: LISA's composition with CoReS's answer list -----------------------------------


def test_cores_style_draws_are_lisa_questions_with_cores_answers(tmp_path: Path) -> None:
    """CoReS utils/sem_seg_dataset.py:289-300 (@296ee1f): per class a SHORT_QUESTION_LIST
    question and one `random.choice(ANSWER_LIST)`, one target per conversation, as LISA."""
    options = SamplingOptions(3, prompt_style="cores", use_expand_question_list=False)
    source, names_by_mask = many_class_source(tmp_path, MANY_CLASSES, options)
    questions, answers = Counter(), Counter()
    for asked, answer, names in conversations_with_names(source, names_by_mask, range(300)):
        assert len(names) == 1 and answer.count(CORES_CHAIN_TOKEN) == 1
        assert asked in mmr_questions(names, ref.LISA_SHORT_QUESTION_LIST)
        assert answer in ref.CORES_ANSWER_LIST
        questions[asked.replace(names[0].lower(), "{class_name}")] += 1
        answers[answer] += 1
    assert set(questions) == set(ref.LISA_SHORT_QUESTION_LIST)
    assert set(answers) == set(ref.CORES_ANSWER_LIST)


def test_cores_answers_are_drawn_uniformly() -> None:
    """One `random.choice` of the 18 templates per answer: each 1/18."""
    target = [Target("cat", False, np.ones((2, 2), np.uint8))]
    rng = np.random.default_rng(0)
    counts = Counter(
        build_conversations(target, "cores", rng, (2, 2))[0][0][0][1] for _ in range(DRAWS)
    )
    assert_frequencies(counts, {a: 1 / 18 for a in ref.CORES_ANSWER_LIST}, DRAWS)


def test_absent_targets_get_rej_and_keep_the_chain_token_in_cores_answers() -> None:
    targets = [Target("cat", False, None), Target("dog", False, np.ones((2, 2), np.uint8))]
    rejected = {a.replace("[SEG]", "[REJ]") for a in ref.CORES_ANSWER_LIST}
    for seed in range(100):
        conversations, masks = build_conversations(
            targets, "cores", np.random.default_rng(seed), (2, 2)
        )
        assert len(conversations) == 2
        assert (
            conversations[0][0][1] in rejected and conversations[1][0][1] in ref.CORES_ANSWER_LIST
        )
        assert not masks[0].any() and masks[1].all()


@pytest.mark.parametrize(
    ("answer", "chain_token", "message"),
    [
        ("[SEG].", "", None),
        ("[SEG].", "[SEG_SEMA]", None),  # chaining trained, plain validation: allowed
        ("It usually appears on [SEG_SEMA]. It is [SEG].", "[SEG_SEMA]", None),
        ("It is [SEG] and [SEG].", "", "holds 2 [SEG] and 0 [REJ]"),
        ("Sure.", "", "holds 0 [SEG] and 0 [REJ]"),
        ("[REJ] [SEG].", "", "holds 1 [SEG] and 1 [REJ]"),
        ("It usually appears on [SEG_SEMA]. It is [SEG].", "", "one token only with"),
        ("On [SEG_SEMA]. It is [SEG].", "[CHAIN]", "--chain_token [SEG_SEMA]"),
        ("It is [SEG]. On [SEG_SEMA].", "[SEG_SEMA]", "at most once, before its [SEG]"),
        ("[SEG_SEMA] [SEG_SEMA] [SEG].", "[SEG_SEMA]", "at most once, before its [SEG]"),
    ],
)
def test_val_answer_rules(answer: str, chain_token: str, message: str | None) -> None:
    problem = val_answer_problem(answer, chain_token)
    if message is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(f"--val_answer {answer!r}")
        assert message in problem


def test_check_val_answer_counts_targets_only() -> None:
    assert check_val_answer(CORES_VALIDATION_ANSWER) == CORES_VALIDATION_ANSWER
    with pytest.raises(ValueError, match=r"--val_answer '\[SEG\], \[SEG\]\.' holds 2 \[SEG\]"):
        check_val_answer("[SEG], [SEG].")


# ---- GSVA answer formats ------------------------------------------------------------------


def refer_targets() -> tuple[list[Target], list[np.ndarray]]:
    """Three sentences: one with pixels, one with an empty mask, one absent (mask None)."""
    box = np.zeros((4, 4), np.uint8)
    box[1:3, 1:3] = 1
    empty = np.zeros((4, 4), np.uint8)
    targets = [
        Target(" The Red Box. ", False, box),
        Target("Left one", False, empty),
        Target("purple cat.", False, None),
    ]
    return targets, [box, empty, empty]


def test_gsva_refer_format_strips_keeps_case_and_rejects_empty_masks() -> None:
    targets, masks = refer_targets()
    # GSVA refer_seg_dataset.py:264-268: sentences `.strip()` then `.strip('.')`
    names = ["The Red Box", "Left one", "purple cat"]
    made = gsva_answers(names, [SEG, REJ, REJ], ", ")
    indices = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        conversations, drawn_masks = build_conversations(targets, "gsva", rng, (4, 4))
        ((asked, answer),) = conversations[0]
        assert asked in gsva_questions(names) and answer in made, answer
        np.testing.assert_array_equal(drawn_masks, np.stack(masks))
        indices.add(made[answer])
    assert indices == set(range(len(ref.GSVA_ANSWER_LIST_MODE4_START)))


@pytest.mark.parametrize(
    "gsva_format, names, tokens, joiner",
    [
        # finish_sample's default: the referring format (refer_seg.py's call)
        (None, ["The Red Box", "Left one", "purple cat"], [SEG, REJ, REJ], ", "),
        # sem_seg's format: names as given, "," between parts, an empty mask stays [SEG]
        (GSVA_SEM_SEG, [" The Red Box. ", "Left one", "purple cat."], [SEG, SEG, REJ], ","),
    ],
)
def test_finish_sample_gsva_formats(tmp_path: Path, gsva_format, names, tokens, joiner) -> None:
    targets, masks = refer_targets()
    image = np.zeros((4, 4, 3), np.uint8)
    options = SamplingOptions(prompt_style="gsva")
    keywords = {} if gsva_format is None else {"gsva_format": gsva_format}
    made = gsva_answers(names, tokens, joiner)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        sample = finish_sample(image, targets, options, rng, tmp_path / "i.jpg", "x", **keywords)
        ((asked, answer),) = sample.conversations[0]
        assert asked in gsva_questions(names) and answer in made, answer
        np.testing.assert_array_equal(sample.masks, np.stack(masks))


def test_colon_answer_form_words_every_answer_in_gsvas_second_form(tmp_path: Path) -> None:
    """`--gsva_answer_form colon`: GSVA's "Sure, they are x:[SEG]" form for every answer, with
    the same question and the same draws after it as GSVA's own draw of the form."""
    targets, _ = refer_targets()
    image = np.zeros((4, 4, 3), np.uint8)
    colon = SamplingOptions(prompt_style="gsva", gsva_answer_form="colon")
    drawn = SamplingOptions(prompt_style="gsva")
    expected = "Sure, they are The Red Box:[SEG], Left one:[REJ], purple cat:[REJ]."
    for seed in range(20):
        made = {}
        for name, options in (("colon", colon), ("drawn", drawn)):
            rng = np.random.default_rng(seed)
            sample = finish_sample(image, targets, options, rng, tmp_path / "i.jpg", "x")
            made[name] = (*sample.conversations[0][0], rng.random())
        assert made["colon"][1] == expected
        assert made["colon"][0] == made["drawn"][0] and made["colon"][2] == made["drawn"][2]


# ---- MMR's per-question cap and allocate_class --------------------------------------------


def mmr_allocate_class(
    sampled_ann_classes: list, max_question_num: int, max_class_per_question: int, random
) -> list[list]:
    """MMR utils/sem_seg_dataset.py:533-555 `allocate_class` (refer_seg_dataset.py:341-362 is
    the same), line for line, with numpy's global generator passed in as `random`."""
    if len(sampled_ann_classes) < max_question_num:
        max_question_num = len(sampled_ann_classes)
    sample_num = len(sampled_ann_classes)
    class_counts = np.arange(max_question_num) * 0
    new_sampled_ann_classes = [[] for _ in range(max_question_num)]
    sample_ids = np.arange(sample_num)
    random.shuffle(sample_ids)
    for i in range(sample_num):
        if 0 in class_counts:
            choose_id = random.choice(np.where(class_counts == 0)[0], size=1)[0]
        else:
            choose_id = random.choice(np.where(class_counts < max_class_per_question)[0], size=1)[0]
        class_counts[choose_id] += 1
        new_sampled_ann_classes[choose_id].append(sampled_ann_classes[sample_ids[i]])
    return new_sampled_ann_classes


def size_distribution(allocate: Callable[[], list[list[int]]], count: int) -> Counter:
    """Counts of the ordered per-question sizes over DRAWS allocations of `count` items; each
    allocation must use every item once."""
    sizes = Counter()
    for _ in range(DRAWS):
        groups = allocate()
        assert sorted(i for group in groups for i in group) == list(range(count))
        sizes[tuple(len(group) for group in groups)] += 1
    return sizes


def same_distribution(ours: Counter, theirs: Counter) -> bool:
    """Two-sample per-bin test: every bin's shares within Z_TOLERANCE standard errors."""
    for key in set(ours) | set(theirs):
        pooled = (ours[key] + theirs[key]) / (2 * DRAWS)
        error = np.sqrt(pooled * (1 - pooled) * 2 / DRAWS)
        if abs(ours[key] - theirs[key]) / DRAWS > Z_TOLERANCE * error:
            return False
    return True


@pytest.mark.parametrize("count, questions, cap", [(5, 3, 3), (7, 3, 3), (9, 3, 3), (9, 4, 3)])
def test_group_sizes_follow_allocate_class(count: int, questions: int, cap: int) -> None:
    rng, legacy = np.random.default_rng(count), np.random.RandomState(count)
    ours = size_distribution(lambda: split_into_questions(count, questions, rng, cap), count)
    theirs = size_distribution(
        lambda: mmr_allocate_class(list(range(count)), questions, cap, legacy), count
    )
    assert set(ours) <= set(theirs) and max(max(key) for key in ours) <= cap
    assert same_distribution(ours, theirs), (ours, theirs)
    if count > questions * (cap - 1):  # the comparison tells an uncapped split apart
        uncapped = size_distribution(lambda: split_into_questions(count, questions, rng), count)
        assert not same_distribution(uncapped, theirs)


def question_sizes(conversations: list[list[tuple[str, str]]]) -> list[int]:
    return [answer.count(SEG) + answer.count(REJ) for ((_, answer),) in conversations]


@pytest.mark.parametrize("per_sample, per_question", [(3, 3), (4, 2)])
def test_mmr_sem_seg_questions_never_exceed_the_cap(
    tmp_path: Path, per_sample: int, per_question: int
) -> None:
    options = SamplingOptions(per_sample, per_question, prompt_style="mmr")
    source, _ = many_class_source(tmp_path, MANY_CLASSES, options)
    for seed in range(DRAWS // 2):
        sample = source.sample(np.random.default_rng(seed))
        sizes = question_sizes(sample.conversations)
        assert len(sizes) == per_sample and sum(sizes) == len(sample.masks)
        assert 1 <= min(sizes) and max(sizes) <= per_question, sizes


def test_mmr_refer_like_questions_never_exceed_the_cap() -> None:
    options = SamplingOptions(3, 3, prompt_style="mmr")
    mask = np.ones((2, 2), np.uint8)
    rng = np.random.default_rng(0)
    seen = Counter()
    for _ in range(DRAWS):
        count = int(rng.integers(1, 10))
        targets = [Target(f"the man number {k}", False, mask) for k in range(count)]
        sample = finish_sample(np.zeros((2, 2, 3), np.uint8), targets, options, rng, Path("i"), "x")
        sizes = question_sizes(sample.conversations)
        assert len(sizes) == min(count, 3) and sum(sizes) == count == len(sample.masks)
        assert 1 <= min(sizes) and max(sizes) <= 3, sizes
        seen[max(sizes)] += 1
    assert set(seen) == {1, 2, 3}
