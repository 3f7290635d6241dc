"""Conversation templates: exact LLaVA strings, answer spans, generation prompts."""

from __future__ import annotations

import pytest

from utils.conversation import (
    TEMPLATES,
    get_template,
    render_conversation,
    render_generation_prompt,
)

V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
ROUNDS = [("<image>\nWhat is this?", "A red circle."), ("Segment it.", "Sure, [SEG].")]


def answers_in(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[start:end] for start, end in spans]


def test_llava_v1_text_and_spans() -> None:
    text, spans = render_conversation(ROUNDS, "llava_v1")
    assert text == (
        f"{V1_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>"
        "USER: Segment it. ASSISTANT: Sure, [SEG].</s>"
    )
    assert answers_in(text, spans) == ["A red circle.</s>", "Sure, [SEG].</s>"]


def test_llava_llama_2_text_and_spans() -> None:
    text, spans = render_conversation(ROUNDS, "llava_llama_2")
    assert text == (
        f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is this? [/INST] "
        "A red circle. </s><s>[INST] Segment it. [/INST] Sure, [SEG]. </s>"
    )
    assert answers_in(text, spans) == ["A red circle. </s>", "Sure, [SEG]. </s>"]


def test_llama_2_uses_its_own_separators() -> None:
    """MMR's `conv_type == "llava_v1" or "chatml"` gave every template llava_v1's separators."""
    v1, _ = render_conversation(ROUNDS, "llava_v1")
    llama_2, _ = render_conversation(ROUNDS, "llava_llama_2")
    assert "ASSISTANT:" in v1 and "[INST]" not in v1
    assert "ASSISTANT:" not in llama_2 and llama_2.count("[/INST]") == len(ROUNDS)


@pytest.mark.parametrize(
    ("conv_type", "ending"), [("llava_v1", "ASSISTANT:"), ("llava_llama_2", "[/INST]")]
)
def test_generation_prompt_is_the_conversation_up_to_the_open_answer(
    conv_type: str, ending: str
) -> None:
    prompt = render_generation_prompt([ROUNDS[0], (ROUNDS[1][0], None)], conv_type)
    assert prompt.endswith(ending)
    full, spans = render_conversation(ROUNDS, conv_type)
    # the prompt is the full text up to the separator space before the last answer
    assert full.startswith(prompt) and full[len(prompt) : spans[-1][0]] == " "
    single = render_generation_prompt([("<image>\nHi", None)], conv_type)
    assert single.endswith(ending) and single.count(ending) == 1


def test_special_tokens_replace_the_separators() -> None:
    text, spans = (
        get_template("llava_llama_2")
        .with_special_tokens(bos="<|bos|>", eos="<|eos|>")
        .render(ROUNDS)
    )
    assert "</s>" not in text and "<s>" not in text
    assert answers_in(text, spans) == ["A red circle. <|eos|>", "Sure, [SEG]. <|eos|>"]
    assert "<|eos|><|bos|>[INST] Segment it." in text
    v1_text, _ = (
        get_template("llava_v1").with_special_tokens(bos=None, eos="<|eos|>").render(ROUNDS)
    )
    assert v1_text.endswith("ASSISTANT: Sure, [SEG].<|eos|>")


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="llava_llama_2"):
        get_template("chatml")
    with pytest.raises(ValueError, match="every answer"):
        render_conversation([("q", None)])
    with pytest.raises(ValueError, match="answer None"):
        render_generation_prompt(ROUNDS)
    with pytest.raises(ValueError, match="only the last"):
        render_generation_prompt([("q", None), ("q2", None)])
    with pytest.raises(ValueError, match="at least one round"):
        render_conversation([])
    assert sorted(TEMPLATES) == ["llava_llama_2", "llava_v1"]
