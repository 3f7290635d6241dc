"""The one door to tensor files: every weight file the package reads comes through here.

`read_tensor_file` reads safetensors with safetensors and any other file (`.bin`, `.pth`, `.pt`)
with `torch.load(weights_only=True)`, memory-mapped when asked; nothing from a file ever runs.
A file holding Python objects that only code could rebuild is refused with
`UnsafeCheckpointError`, in one line naming the file and the object it would build. Any other
unreadable file is a one-line `ValueError` naming the file; callers may add a `hint` (what the
file should have been).

`utils.weights.weights_only_loads` uses `refusal` for the files DeepSpeed's own readers open.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

SAFETENSORS_SUFFIX = ".safetensors"
# how torch's weights-only unpickler words a refusal, and the detail it gives
UNSAFE_PICKLE_MARK = "Weights only load failed"
UNPICKLER_LINE = re.compile(
    r"(?:WeightsUnpickler error:\s*)?((?:Unsupported|Trying to load|Can only|Only) .+)"
)
UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
UNSAFE_OBJECT = re.compile(r"global|reduce|build", re.IGNORECASE)  # else: not a pickle at all
TORCH_ADVICE = ". Please use"  # torch's advice to allowlist the refused class: not ours to give
SAFE_HINT = (
    "only tensors and plain data are loaded from checkpoints, never code; if you trust the file, "
    "convert it to safetensors yourself"
)
UNREADABLE = "not a readable PyTorch or safetensors checkpoint"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds Python objects that only running code could rebuild."""


def _with_hint(message: str, hint: str) -> str:
    return f"{message}; {hint}" if hint else message


def _unpickler_detail(error: pickle.UnpicklingError) -> str:
    """The unpickler's own one-line reason, without torch's surrounding advice."""
    text = str(error)
    for line in text.splitlines():
        if found := UNPICKLER_LINE.search(line):
            return found.group(1).split(TORCH_ADVICE)[0].strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)


def refusal(path: object, error: pickle.UnpicklingError, hint: str = "") -> ValueError:
    """The error to raise for a file torch's weights-only unpickler refused: one holding
    objects only code could rebuild (UnsafeCheckpointError), or one that is no pickle at all."""
    detail = _unpickler_detail(error)
    if UNSAFE_PICKLE_MARK in str(error) and UNSAFE_OBJECT.search(detail):
        built = UNSAFE_GLOBAL.search(detail)
        what = f"it would build {built.group(1)}" if built else detail
        return UnsafeCheckpointError(
            _with_hint(
                f"{path}: refusing to load: it holds Python objects that only code could "
                f"rebuild ({what}); {SAFE_HINT}",
                hint,
            )
        )
    return ValueError(_with_hint(f"{path}: {UNREADABLE} ({detail})", hint))


def read_tensor_file(path: str | Path, hint: str = "", mmap: bool = False) -> Mapping[str, Any]:
    """The mapping stored in one file (name -> tensor; a `torch.load` file may nest mappings).

    mmap: memory-map a `torch.load` file (zip format) instead of reading it whole. Errors name
    the file, then `hint`: FileNotFoundError, UnsafeCheckpointError, or ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_with_hint(f"{path}: no such file", hint))
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise refusal(path, error, hint) from error
    # torch.load and safetensors raise many types for a file that is not a checkpoint
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            _with_hint(f"{path}: {UNREADABLE} ({type(error).__name__}: {reason})", hint)
        ) from error
    if not isinstance(state, Mapping):
        found = type(state).__name__
        raise ValueError(_with_hint(f"{path}: expected a state dict, got {found}", hint))
    return state


def read_tensor_files(paths: Iterable[Path], hint: str = "") -> dict[str, Tensor]:
    """The tensors of several files (the shards of one checkpoint) in one dict."""
    state: dict[str, Tensor] = {}
    for path in paths:
        state.update(read_tensor_file(path, hint))
    return state
