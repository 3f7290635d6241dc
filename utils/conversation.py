"""Conversation templates of LLaVA (`--conv_type`): rendering rounds into the model's text.

Two templates written exactly as LLaVA writes them,

- `llava_v1`: `{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>`
- `llava_llama_2`:
  `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] {a2} </s>`

Qwen2-VL's ChatML (`qwen2_vl`; Qwen3-VL's `qwen3_vl` has no system turn):
`<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n`,
and CoReS's two (`llava_v1_cores`, `llava_llama_2_cores`): the same with CoReS's system prompt,
LLaVA's plus one sentence, followed by the fixed in-context example that CoReS's `get_prompt()`
appends to every prompt (`EXAMPLE_QA_LIST[0]`, CoReS model/llava/conversation.py @296ee1f).
The example ends with a space and llava_v1 writes its separator after the system prompt, so two
spaces precede the first "USER:"; the example's own "ASSISTANT:" text is system prompt, never a
labelled answer.

Rendering returns the text together with the character span of every assistant answer,
including its end-of-turn token, so label masking can be computed from a tokenizer's offset
mapping instead of from assumed token counts (which broke the original code on other
tokenizers). The original MMR code picked separators with `conv_type == "llava_v1" or "chatml"`
(always true), so llama-2 never got its own separators; here each template owns its separators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

DEFAULT_CONV_TYPE = "llava_v1"

Round = tuple[str, str]
PromptRound = tuple[str, str | None]
Span = tuple[int, int]


class Style(Enum):
    """How rounds are joined (LLaVA's `SeparatorStyle` members we support, and ChatML)."""

    TWO = "two"
    LLAMA_2 = "llama_2"
    CHATML = "chatml"


@dataclass(frozen=True)
class Template:
    """A conversation template.

    sep: llava_v1 - the space after the system prompt and each question; llama_2 - the BOS
        string that opens every round after the first; chatml - the line break after each turn.
    sep2: the end-of-turn string written after each answer (the EOS token's text).
    roles: (user, assistant) role names, written by the TWO and CHATML styles.
    """

    name: str
    system: str
    roles: tuple[str, str]
    style: Style
    sep: str
    sep2: str

    def with_special_tokens(self, bos: str | None, eos: str) -> Template:
        """The template with the end-of-turn (and llama_2's round-opening BOS) written as the
        tokenizer's own token strings, so they encode to its EOS/BOS ids."""
        if self.style is Style.LLAMA_2 and bos is not None:
            return replace(self, sep=bos, sep2=eos)
        return replace(self, sep2=eos)

    def render(self, rounds: Sequence[Round]) -> tuple[str, list[Span]]:
        """Render complete (question, answer) rounds.

        Returns (text, spans): spans[i] = [start, end) of answer i in `text`, covering the answer
        and its end-of-turn string (llama_2 also covers the space written before it).
        """
        if any(answer is None for _, answer in rounds):
            raise ValueError("render() needs every answer; use generation_prompt() to end open")
        return self._render(rounds)

    def generation_prompt(self, rounds: Sequence[PromptRound]) -> str:
        """Render rounds whose last answer is None, ending where the assistant starts to speak
        ("ASSISTANT:" for llava_v1, "[/INST]" for llama_2)."""
        if not rounds or rounds[-1][1] is not None:
            raise ValueError("the last round of a generation prompt must have answer None")
        if any(answer is None for _, answer in rounds[:-1]):
            raise ValueError("only the last round of a generation prompt may lack an answer")
        return self._render(rounds)[0]

    def _render(self, rounds: Sequence[PromptRound]) -> tuple[str, list[Span]]:
        if not rounds:
            raise ValueError("a conversation needs at least one round")
        if self.style is Style.TWO:
            return self._render_two(rounds)
        if self.style is Style.CHATML:
            return self._render_chatml(rounds)
        return self._render_llama_2(rounds)

    @property
    def answer_takes_space(self) -> bool:
        """Whether the whitespace written before an answer is the answer's first token (LLaVA's
        " " after "ASSISTANT:"), so labelled; ChatML's line break after the role is prompt."""
        return self.style is not Style.CHATML

    def _render_two(self, rounds: Sequence[PromptRound]) -> tuple[str, list[Span]]:
        user, assistant = self.roles
        text, spans = self.system + self.sep, []
        for question, answer in rounds:
            text += f"{user}: {question}{self.sep}{assistant}:"
            if answer is not None:
                text += " "
                start = len(text)
                text += answer + self.sep2
                spans.append((start, len(text)))
        return text, spans

    def _render_chatml(self, rounds: Sequence[PromptRound]) -> tuple[str, list[Span]]:
        user, assistant = self.roles
        text, spans = "", []
        if self.system:  # Qwen3-VL's template writes no system turn unless given one
            text = f"{CHATML_START}system\n{self.system}{self.sep2}{self.sep}"
        for question, answer in rounds:
            text += f"{CHATML_START}{user}\n{question}{self.sep2}{self.sep}"
            text += f"{CHATML_START}{assistant}\n"
            if answer is not None:
                start = len(text)
                text += answer + self.sep2
                spans.append((start, len(text)))
                text += self.sep
        return text, spans

    def _render_llama_2(self, rounds: Sequence[PromptRound]) -> tuple[str, list[Span]]:
        text, spans = "", []
        for index, (question, answer) in enumerate(rounds):
            if index == 0:
                question = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{question}"
                text += f"[INST] {question} [/INST]"
            else:
                text += f"{self.sep}[INST] {question} [/INST]"
            if answer is not None:
                text += " "
                start = len(text)
                text += f"{answer} {self.sep2}"
                spans.append((start, len(text)))
        return text, spans


LLAVA_V1 = Template(
    name="llava_v1",
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
    style=Style.TWO,
    sep=" ",
    sep2="</s>",
)
LLAVA_LLAMA_2 = Template(
    name="llava_llama_2",
    system="You are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks "
    "using natural language.",
    roles=("USER", "ASSISTANT"),
    style=Style.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

# ChatML as Qwen2-VL / Qwen2.5-VL's chat template writes it (their default system prompt; the
# turn-opening token is a fixed string of the format, the end of turn the tokenizer's EOS)
CHATML_START = "<|im_start|>"
QWEN2_VL = Template(
    name="qwen2_vl",
    system="You are a helpful assistant.",
    roles=("user", "assistant"),
    style=Style.CHATML,
    sep="\n",
    sep2="<|im_end|>",
)
QWEN3_VL = replace(QWEN2_VL, name="qwen3_vl", system="")

# CoReS model/llava/conversation.py @296ee1f: the sentence its conv_llava_v1 (:392-397) and
# conv_llava_llama_2 (:335-339) add to LLaVA's system prompts, and EXAMPLE_QA_LIST[0] (:7),
# which get_prompt() (:60-64, 88, 119) appends to the system prompt of every conversation.
CORES_V1_GUIDANCE = (
    "To realize segmentation, the assistant guesses all possible object it typically appears "
    "on and its distinct appearance. "
)
CORES_LLAMA_2_GUIDANCE = (
    "To realize segmentation, you guess all possible object it typically appears on and its "
    "distinct appearance. "
)
CORES_IN_CONTEXT_EXAMPLE = (
    "USER: What is the blade in this image? Please output segmentation mask. ASSISTANT: It is "
    "usually found on a knife or propeller. It is the flat, cutting or propelling surface. "
)
CORES_SUFFIX = "_cores"


def with_in_context_guidance(base: Template, guidance: str) -> Template:
    """`base` with CoReS's system prompt: LLaVA's, a space, `guidance` and the in-context
    example (CoReS's `self.system + context_template`)."""
    system = f"{base.system} {guidance}{CORES_IN_CONTEXT_EXAMPLE}"
    return replace(base, name=base.name + CORES_SUFFIX, system=system)


TEMPLATES = {
    template.name: template
    for template in (
        LLAVA_V1,
        LLAVA_LLAMA_2,
        QWEN2_VL,
        QWEN3_VL,
        with_in_context_guidance(LLAVA_V1, CORES_V1_GUIDANCE),
        with_in_context_guidance(LLAVA_LLAMA_2, CORES_LLAMA_2_GUIDANCE),
    )
}


def get_template(conv_type: str = DEFAULT_CONV_TYPE) -> Template:
    """The template named by `--conv_type`; ValueError listing the known names otherwise."""
    if conv_type not in TEMPLATES:
        raise ValueError(f"--conv_type must be one of {sorted(TEMPLATES)}, not {conv_type!r}")
    return TEMPLATES[conv_type]


def render_conversation(
    rounds: Sequence[Round], conv_type: str = DEFAULT_CONV_TYPE
) -> tuple[str, list[Span]]:
    """(text, answer spans) of complete rounds with the named template (see Template.render)."""
    return get_template(conv_type).render(rounds)


def render_generation_prompt(
    rounds: Sequence[PromptRound], conv_type: str = DEFAULT_CONV_TYPE
) -> str:
    """The prompt for generating the last round's answer (its answer is None)."""
    return get_template(conv_type).generation_prompt(rounds)
