"""Each recipe's whole training mix, drawn from the tiny assets as training draws it: every
sem_seg and referring question and answer, and every ReasonSeg / MMR question, is one its
reference loader could write (templates as data in tests/utils/reference_templates.py, cited
there), every MMR-style question holds 1..--num_classes_per_question targets, and every CoReS
segmentation answer holds one [SEG_SEMA] before its one target token."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.utils import reference_templates as ref
from utils.config import TrainConfig, parse_args
from utils.datasets.mixer import HybridDataset, build_sources

DRAWS = 300
TOKEN = r"\[(?:SEG|REJ)\]"
CHAIN = r"\[SEG_SEMA\]"
WILDCARD = ".+"


def alternatives(templates: list[str], token: str = TOKEN) -> str:
    """One regex matching any of `templates`, each placeholder any text, [SEG] either token."""
    options = []
    for template in templates:
        text = re.escape(template)
        for field in ("class_name", "sent", "seg", "x"):
            text = text.replace(re.escape("{" + field + "}"), WILDCARD)
        options.append(text.replace(re.escape("[SEG]"), token))
    return "(?:" + "|".join(options) + ")"


def prefixed(templates: list[str]) -> list[str]:
    return [t if t.startswith("<image>") else "<image>\n" + t for t in templates]


def gsva_answer() -> str:
    parts = alternatives(ref.GSVA_ANSWER_LIST_MODE4_TEMPLATE)
    starts = alternatives(ref.GSVA_ANSWER_LIST_MODE4_START)
    return rf"{starts} {parts}(?:, ?{parts})*\."


def mmr_answer() -> str:
    items = alternatives(ref.MMR_SINGLE_ANSWER_LIST)
    separate = rf"{items}(?:, {items})*(?: and {items})?\.?"
    single = alternatives(ref.MMR_ANSWER_LIST)
    return f"(?:{single}|{alternatives(ref.MMR_MULTI_ANSWER_LIST)}|{separate})"


# (question, answer) patterns per recipe and family; None: the answer is free text (ReasonSeg
# explanations) or a record's own answer (MMR's text_answers)
SEG_QUESTIONS = {
    "lisa": alternatives(prefixed(ref.LISA_SHORT_QUESTION_LIST)),
    "cores": alternatives(prefixed(ref.LISA_SHORT_QUESTION_LIST)),
    "gsva": alternatives(ref.GSVA_SHORT_QUESTION_LIST_MODE4),
    "m2sa": alternatives(prefixed(ref.MMR_EXPANDED_SHORT_DRAW_LIST)),
}
SEG_ANSWERS = {
    "lisa": alternatives(ref.LISA_ANSWER_LIST),
    "cores": alternatives(ref.CORES_ANSWER_LIST),
    "gsva": gsva_answer(),
    "m2sa": mmr_answer(),
}
LONG_QUESTIONS = {
    "lisa": alternatives(prefixed(ref.LISA_LONG_QUESTION_LIST)),
    "cores": alternatives(prefixed(ref.LISA_LONG_QUESTION_LIST)),
    "gsva": alternatives(prefixed(ref.LISA_LONG_QUESTION_LIST)),
    "m2sa": alternatives(prefixed(ref.MMR_EXPANDED_LONG_DRAW_LIST)),
}
EXPLANATORY = alternatives(ref.LISA_EXPLANATORY_QUESTION_LIST)
# ReasonSeg's short queries (is_sentence false) take LISA's short templates in every recipe
REASON_SHORT = alternatives(prefixed(ref.LISA_SHORT_QUESTION_LIST))
# ReasonSeg's answers: LISA's ANSWER_LIST, CoReS's in CoReS (its loader is LISA's with its list)
REASON_ANSWERS = {recipe: SEG_ANSWERS["lisa"] for recipe in ("lisa", "gsva", "m2sa")}
REASON_ANSWERS["cores"] = SEG_ANSWERS["cores"]


def reason_seg_question(recipe: str, answer: str) -> str:
    """LISA utils/reason_seg_dataset.py:147-178 (CoReS's is the same): a template question
    answered from ANSWER_LIST; "<image>\n" + text + an explanatory question when an explanation
    follows the answer; the bare text when the explanation alone answers (no token)."""
    if not re.search(TOKEN, answer):
        return "<image>\n.+"
    if re.fullmatch(REASON_ANSWERS[recipe], answer):
        return f"(?:{LONG_QUESTIONS[recipe]}|{REASON_SHORT})"
    assert re.fullmatch(rf"{REASON_ANSWERS[recipe]} .+", answer, re.DOTALL), answer
    return rf"<image>\n.+ {EXPLANATORY}"


def draws(recipe: str, dataset_dir: Path) -> tuple[list, TrainConfig]:
    config = parse_args(["--recipe", recipe, f"--dataset_dir={dataset_dir}", "--seed=1"])
    data = config.data_config()
    mix = HybridDataset(build_sources(data), data.sample_rates, DRAWS, data.seed)
    return [mix[index] for index in range(DRAWS)], config


@pytest.mark.parametrize("recipe", ["lisa", "gsva", "m2sa", "cores"])
def test_every_drawn_string_is_one_the_reference_writes(assets: Path, recipe: str) -> None:
    samples, config = draws(recipe, assets / "dataset")
    families = {sample.source.split("/")[0] for sample in samples}
    assert families == set(config.datasets)
    for sample in samples:
        family = sample.source.split("/")[0]
        for conversation in sample.conversations:
            question, answer = conversation[0]
            where = (sample.source, question, answer)
            if family in ("sem_seg", "refer_seg"):
                assert re.fullmatch(SEG_QUESTIONS[recipe], question, re.DOTALL), where
                assert re.fullmatch(SEG_ANSWERS[recipe], answer, re.DOTALL), where
            elif family == "reason_seg":
                assert re.fullmatch(reason_seg_question(recipe, answer), question, re.DOTALL)
            elif family == "multi_part_reason_seg":
                assert re.fullmatch(LONG_QUESTIONS[recipe], question, re.DOTALL), where
            if recipe == "m2sa" and family in ("sem_seg", "refer_seg"):
                targets = len(re.findall(TOKEN, answer))
                assert 1 <= targets <= config.num_classes_per_question, where
            if recipe == "cores" and re.search(TOKEN, answer):
                # one chain token, then one target token, per conversation
                chain, target = re.findall(f"{CHAIN}|{TOKEN}", answer)
                assert re.fullmatch(CHAIN, chain) and re.fullmatch(TOKEN, target), where
