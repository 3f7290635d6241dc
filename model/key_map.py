"""Declared key mappings between an original checkpoint layout and a transformers module.

`assign_state` builds a transformers module on the meta device and fills it with a converted
state dict strictly; `tie` points tied tensors at their source. A mapping is a list of template
pairs, one per parameter family (``"blocks.{i}.norm{n}.{p}"``
<-> ``"layers.{i}.layer_norm{n}.{p}"``), read in both directions; each ``{slot}`` matches the
regex its slot table gives and is copied to the other side. SAM and SAM 2 declare theirs in
``model.sam`` and ``model.sam2``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn


def _compile(template: str, slots: Mapping[str, str]) -> re.Pattern[str]:
    """Turn a key template into a regex with one named group per ``{slot}``."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile(
        "".join(
            re.escape(part) if index % 2 == 0 else f"(?P<{part}>{slots[part]})"
            for index, part in enumerate(parts)
        )
    )


def _translate(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    return None


class KeyMap:
    """Original key <-> transformers key through template pairs (see the module docstring)."""

    def __init__(self, pairs: tuple[tuple[str, str], ...], slots: Mapping[str, str]) -> None:
        self._to_hf = [(_compile(original, slots), hf) for original, hf in pairs]
        self._to_original = [(_compile(hf, slots), original) for original, hf in pairs]

    def to_hf(self, key: str) -> str | None:
        """The transformers key of an original key; None when no template matches."""
        return _translate(key, self._to_hf)

    def to_original(self, key: str) -> str | None:
        """The original key of a transformers key; None when no template matches."""
        return _translate(key, self._to_original)


def count_numbered(sd: Mapping[str, Tensor], prefix: str) -> int:
    """Number of ``prefix.{j}.*`` sub-modules; they must be numbered 0..n-1."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = sorted({int(m.group(1)) for key in sd if (m := pattern.match(key))})
    if found != list(range(len(found))):
        raise ValueError(f"{prefix} sub-modules are not numbered 0..n-1: {found}")
    return len(found)


def tie(model: nn.Module, tied_keys: Mapping[str, str]) -> None:
    """Point every tied tensor (parameter or buffer; tied key -> source key) at its source:
    assign-loading gives each its own tensor."""
    for tied, source in tied_keys.items():
        module_path, name = tied.rsplit(".", 1)
        source_path, source_name = source.rsplit(".", 1)
        shared = getattr(model.get_submodule(source_path), source_name)
        setattr(model.get_submodule(module_path), name, shared)


def assign_state(
    model_class: type[nn.Module],
    config,
    hf_state: Mapping[str, Tensor],
    source: str,
    original_keys: Callable[[list[str]], list[str]],
    tied_keys: Mapping[str, str],
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """`model_class(config)` (eval mode, `dtype` or torch's default) holding `hf_state`, built on
    meta and filled by assignment (no throw-away random init). Strict: a shape mismatch, a
    missing or an unexpected key raises ValueError naming `source` and the keys in the file's
    own names (`original_keys` maps transformers keys back)."""
    with torch.device("meta"):
        model = model_class(config)
    try:
        result = model.load_state_dict(hf_state, strict=False, assign=True)
    except RuntimeError as err:
        raise ValueError(
            f"{source}: tensor shapes disagree with the inferred config: {err}"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        missing = sorted(set(original_keys(result.missing_keys)))
        unexpected = sorted(original_keys(result.unexpected_keys))
        raise ValueError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
    tie(model, tied_keys)
    return model.to(dtype or torch.get_default_dtype()).eval()
