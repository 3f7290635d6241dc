"""LoRA target selection, the trainable set, and trainable-parameter reporting.

LoRA goes only on `nn.Linear` layers of the language model whose last name component is one of
`--lora_target_modules` (q_proj, v_proj by default); never on the vision tower, the multimodal
projector, SAM or `text_hidden_fcs`. Adapters are injected in place (peft's
`inject_adapter_in_model`), so parameter names stay those of the model plus
`.base_layer` / `.lora_A.default` / `.lora_B.default`.

The trainable set is declared as data (`TRAINABLE_GROUPS`): the same table enables parameters
and reports their counts, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

LANGUAGE_MODEL_PREFIX = "model.language_model."

# group name -> substrings of the parameter names (relative to the Segmenter) in that group;
# the multimodal projector is LLaVA's `multi_modal_projector`, Qwen-VL's patch merger(s)
TRAINABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "lora": (".lora_",),
    "embed_tokens": ("embed_tokens.",),
    "lm_head": ("lm_head.",),
    "mask_decoder": ("sam.mask_decoder.",),
    "text_hidden_fcs": ("text_hidden_fcs.",),
    "early_fusion": ("early_fusion.",),
    "mm_projector": (
        "multi_modal_projector.",
        "visual.merger.",
        "visual.deepstack_merger_list.",
    ),
}
ALWAYS_TRAINED = ("lora", "embed_tokens", "lm_head", "text_hidden_fcs", "early_fusion")


def lora_target_names(llava: nn.Module, targets: Iterable[str]) -> list[str]:
    """Full names of the language model's Linear layers whose last component is in `targets`."""
    wanted = set(targets)
    names = [
        name
        for name, module in llava.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith(LANGUAGE_MODEL_PREFIX)
        and name.rsplit(".", 1)[-1] in wanted
    ]
    if not names:
        raise ValueError(
            f"--lora_target_modules {sorted(wanted)} matches no Linear layer of the language "
            f"model (looked under {LANGUAGE_MODEL_PREFIX!r})"
        )
    return names


def apply_lora(
    llava: nn.Module, r: int, alpha: int, dropout: float, targets: Iterable[str]
) -> list[str]:
    """Inject LoRA adapters into `llava` in place; returns the adapted module names.

    r == 0 injects nothing (the language model then stays frozen apart from the embeddings
    and the LM head).
    """
    if r < 0:
        raise ValueError(f"--lora_r must be >= 0, got {r}")
    if r == 0:
        return []
    names = lora_target_names(llava, targets)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none"
    )
    inject_adapter_in_model(config, llava)
    return names


def parameter_group(name: str) -> str | None:
    """The trainable group a parameter name belongs to, or None."""
    for group, markers in TRAINABLE_GROUPS.items():
        if any(marker in name for marker in markers):
            return group
    return None


def set_trainable(model: nn.Module, train_mask_decoder: bool, train_mm_projector: bool) -> None:
    """Freeze everything, then enable the declared trainable groups.

    Frozen: CLIP, SAM image and prompt encoders, the base LLM weights, and (unless asked) the
    multimodal projector and the mask decoder.
    """
    enabled = set(ALWAYS_TRAINED)
    if train_mask_decoder:
        enabled.add("mask_decoder")
    if train_mm_projector:
        enabled.add("mm_projector")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_group(name) in enabled)


def trainable_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts per group, plus "total" and "frozen"."""
    counts = dict.fromkeys(TRAINABLE_GROUPS, 0)
    counts.update(total=0, frozen=0)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            counts["frozen"] += parameter.numel()
            continue
        group = parameter_group(name) or "other"
        counts[group] = counts.get(group, 0) + parameter.numel()
        counts["total"] += parameter.numel()
    return counts
