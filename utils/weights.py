"""Reading trained weights for `--weight`: a DeepSpeed checkpoint directory (`ckpt_model`, read
without running zero_to_fp32.py first), a `zero_to_fp32.py` output file (`pytorch_model.bin` or
`.safetensors`), or the directory newer DeepSpeed versions write instead (possibly sharded, with
an index). Loading is strict: missing and unexpected keys are listed and stop the load.

Nothing executes code from a checkpoint: files are read with safetensors or
`torch.load(weights_only=True)`. DeepSpeed's own loaders (its engine's resume, its
zero_to_fp32 reader) pass `weights_only=False`; `weights_only_loads()` runs them with
`weights_only=True` forced and only DeepSpeed's few plain-data classes allowed, so a checkpoint
from a stranger that holds anything else is refused (`UnsafeCheckpointError`) instead of run.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

DEEPSPEED_LATEST = "latest"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# how torch's weights-only unpickler words a refusal, and the detail it gives
UNSAFE_PICKLE_MARK = "Weights only load failed"
UNSAFE_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)")
UNSAFE_OBJECT = re.compile(r"global|reduce|build", re.IGNORECASE)  # else: not a pickle at all
TORCH_ADVICE = ". Please use"  # torch's advice to allowlist the refused class: not ours to give
SAFE_HINT = (
    "only tensors and plain data are loaded from checkpoints, never code; if you trust the file, "
    "convert it to safetensors yourself"
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds Python objects that only running code could rebuild."""


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers (loss
    scalers, the ZeRO stage enum, fragment addresses): plain data, rebuilt without running any
    code from the file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def refusal(path: object, error: pickle.UnpicklingError) -> ValueError:
    """The error to raise for a file torch's weights-only unpickler refused: one holding
    objects only code could rebuild (UnsafeCheckpointError), or one that is no pickle at all."""
    found = UNSAFE_DETAIL.search(str(error))
    detail = (found.group(1) if found else str(error)).split(TORCH_ADVICE)[0].strip()
    if UNSAFE_PICKLE_MARK in str(error) and UNSAFE_OBJECT.search(detail):
        return UnsafeCheckpointError(
            f"{path}: refusing to load: it holds Python objects that only code could rebuild "
            f"({detail}); {SAFE_HINT}"
        )
    return ValueError(f"{path}: not a readable PyTorch checkpoint ({detail})")


@contextmanager
def weights_only_loads(allowed: Sequence[type] = ()) -> Iterator[None]:
    """Inside, every `torch.load` runs with weights_only=True whatever its caller passes, with
    `allowed` classes (plus DeepSpeed's, see `deepspeed_safe_globals`) accepted; a refused file
    raises `UnsafeCheckpointError` naming it. Not thread-safe: it swaps `torch.load` for the
    duration (DeepSpeed calls `torch.load` directly and offers no option)."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise refusal(f, error) from error

    torch.load = load
    try:
        with torch.serialization.safe_globals([*deepspeed_safe_globals(), *allowed]):
            yield
    finally:
        torch.load = original


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of one file (safetensors or weights-only torch), errors naming it."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise refusal(path, error) from error
    # torch.load and safetensors raise many types for a file that is not a checkpoint
    except Exception as error:
        raise ValueError(
            f"{path}: not a readable PyTorch or safetensors checkpoint "
            f"({type(error).__name__}: {error})"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    # DeepSpeed's own model-state files nest the weights under "module"
    return state["module"] if isinstance(state.get("module"), dict) else state


def read_directory(path: Path) -> dict[str, torch.Tensor]:
    """A DeepSpeed checkpoint directory, or a (sharded) consolidated directory."""
    if (path / DEEPSPEED_LATEST).is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(path))
    for index_name in INDEX_FILES:
        if (path / index_name).is_file():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_file(path / shard))
            return state
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return read_file(path / name)
    raise FileNotFoundError(
        f"{path}: neither a DeepSpeed checkpoint (no '{DEEPSPEED_LATEST}') nor a consolidated "
        f"directory ({', '.join(INDEX_FILES + SINGLE_FILES)})"
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored at `path` (any of the layouts in the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return read_directory(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weight {path} does not exist")
    return read_file(path)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load `path` into `model` strictly (in the model's dtypes); errors list the keys."""
    from model.checkpoint import load_into
    from model.legacy import is_lisa_family_state_dict, translate_lisa_family_state_dict

    state = read_weights(path)
    if is_lisa_family_state_dict(state):  # GSVA / LISA training-time names, mapped to ours
        state = translate_lisa_family_state_dict(state, model, f"--weight {path}")
    load_into(
        model,
        state,
        f"--weight {path} does not match the model built from --version",
        hint=" (check --lora_r, --lora_target_modules, --early_fusion and --version against "
        "the training run; the default m2sa recipe turns early fusion on, --recipe lisa|gsva or "
        "--no-early_fusion turn it off)",
    )
