"""Conversation templates: exact LLaVA and CoReS strings, answer spans, generation prompts."""

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
    assert sorted(TEMPLATES) == [
        "llava_llama_2",
        "llava_llama_2_cores",
        "llava_v1",
        "llava_v1_cores",
        "qwen2_vl",
        "qwen3_vl",
    ]


# ChatML as Qwen2-VL / Qwen2.5-VL's chat template renders string contents ("<|im_start|>{role}
# \n{content}<|im_end|>\n" per turn, its default system turn first unless one is given, and
# "<|im_start|>assistant\n" as the generation prompt); Qwen3-VL's writes no default system turn
QWEN_SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QWEN_TURNS = (
    "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
    "<|im_start|>assistant\nA red circle.<|im_end|>\n"
    "<|im_start|>user\nSegment it.<|im_end|>\n"
    "<|im_start|>assistant\nSure, [SEG].<|im_end|>\n"
)


@pytest.mark.parametrize(
    ("conv_type", "system"), [("qwen2_vl", QWEN_SYSTEM_TURN), ("qwen3_vl", "")]
)
def test_chatml_text_spans_and_generation_prompt(conv_type: str, system: str) -> None:
    text, spans = render_conversation(ROUNDS, conv_type)
    assert text == system + QWEN_TURNS
    assert answers_in(text, spans) == ["A red circle.<|im_end|>", "Sure, [SEG].<|im_end|>"]
    prompt = render_generation_prompt([*ROUNDS[:1], (ROUNDS[1][0], None)], conv_type)
    assert prompt == text[: spans[1][0]] and prompt.endswith("<|im_start|>assistant\n")
    assert not get_template(conv_type).answer_takes_space


# CoReS @296ee1f (baoxiaoyi/CoReS) model/llava/conversation.py: the strings below are the output
# of its own `conv_templates[name].copy()` + `append_message` + `get_prompt()` (lines 60-128;
# systems at 335-339 and 392-397, EXAMPLE_QA_LIST[0] at 7), run on that file and pasted here;
# the question and answer are the ones its ValDataset writes (utils/dataset.py:480-493).
CORES_QUESTION = "<image>\n What is the dog in this image? Please output segmentation mask."
CORES_ANSWER = "It usually appears on [SEG_SEMA]. It is [SEG]."
CORES_REFERENCE = {
    "llava_v1_cores": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. To realize "
        "segmentation, the assistant guesses all possible object it typically appears on and its "
        "distinct appearance. USER: What is the blade in this image? Please output segmentation "
        "mask. ASSISTANT: It is usually found on a knife or propeller. It is the flat, cutting or "
        "propelling surface.  USER: <image>\n What is the dog in this image? Please output "
        "segmentation mask. ASSISTANT: It usually appears on [SEG_SEMA]. It is [SEG].</s>"
    ),
    "llava_llama_2_cores": (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to "
        "understand the visual content that the user provides, and assist the user with a variety "
        "of tasks using natural language. To realize segmentation, you guess all possible object "
        "it typically appears on and its distinct appearance. USER: What is the blade in this "
        "image? Please output segmentation mask. ASSISTANT: It is usually found on a knife or "
        "propeller. It is the flat, cutting or propelling surface. \n<</SYS>>\n\n<image>\n What is "
        "the dog in this image? Please output segmentation mask. [/INST] It usually appears on "
        "[SEG_SEMA]. It is [SEG]. </s>"
    ),
}
# the same get_prompt() on a two-round dialogue (CoReS's VQA loader renders them so)
CORES_DIALOGUE = [("<image>\nWhat colour is it?", "Red."), ("How many?", "Two.")]
CORES_DIALOGUE_ENDINGS = {
    "llava_v1_cores": (
        "surface.  USER: <image>\nWhat colour is it? ASSISTANT: Red.</s>USER: How many? "
        "ASSISTANT: Two.</s>"
    ),
    "llava_llama_2_cores": (
        "surface. \n<</SYS>>\n\n<image>\nWhat colour is it? [/INST] Red. </s><s>[INST] How "
        "many? [/INST] Two. </s>"
    ),
}


@pytest.mark.parametrize("conv_type", sorted(CORES_REFERENCE))
def test_cores_templates_render_as_cores_get_prompt(conv_type: str) -> None:
    text, spans = render_conversation([(CORES_QUESTION, CORES_ANSWER)], conv_type)
    assert text == CORES_REFERENCE[conv_type]
    gap = " " if "llama_2" in conv_type else ""
    assert answers_in(text, spans) == [f"{CORES_ANSWER}{gap}</s>"]
    dialogue, dialogue_spans = render_conversation(CORES_DIALOGUE, conv_type)
    assert dialogue.endswith(CORES_DIALOGUE_ENDINGS[conv_type])
    assert answers_in(dialogue, dialogue_spans) == [f"Red.{gap}</s>", f"Two.{gap}</s>"]


@pytest.mark.parametrize(
    ("conv_type", "ending"), [("llava_v1_cores", "ASSISTANT:"), ("llava_llama_2_cores", "[/INST]")]
)
def test_cores_generation_prompt_keeps_the_example(conv_type: str, ending: str) -> None:
    """CoReS's get_prompt() with the answer None ends at the open role, the example kept."""
    prompt = render_generation_prompt([(CORES_QUESTION, None)], conv_type)
    reference = CORES_REFERENCE[conv_type]
    assert prompt.endswith(ending) and reference.startswith(prompt)
    assert "It is usually found on a knife or propeller." in prompt
