"""Checkpoint files a stranger could hand over: loading them with plain `pickle` / `torch.load
(weights_only=False)` would run code (here: create a marker directory, so a test can tell)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"


class MakesMarker:
    """Unpickling this calls `os.mkdir(path)`: what a malicious checkpoint's code would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def write_unsafe_file(path: Path, marker: Path) -> Path:
    """A torch.save file whose "weights" run code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"weight": MakesMarker(marker)}}, path)
    return path


def write_unsafe_deepspeed_checkpoint(directory: Path, marker: Path, tag: str) -> Path:
    """A DeepSpeed checkpoint directory (`latest`, `<tag>/` with model and optimizer states)
    whose files run code when unpickled."""
    for name in (MODEL_STATES, OPTIM_STATES):
        write_unsafe_file(directory / tag / name, marker)
    (directory / "latest").write_text(tag)
    return directory
