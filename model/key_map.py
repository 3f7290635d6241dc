"""Declared key mappings between an original checkpoint layout and a transformers module.

A mapping is a list of template pairs, one per parameter family (``"blocks.{i}.norm{n}.{p}"``
<-> ``"layers.{i}.layer_norm{n}.{p}"``), read in both directions; each ``{slot}`` matches the
regex its slot table gives and is copied to the other side. SAM and SAM 2 declare theirs in
``model.sam`` and ``model.sam2``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor


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
