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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from model.tensor_files import UnsafeCheckpointError as UnsafeCheckpointError  # re-exported
from model.tensor_files import read_tensor_file, refusal

DEEPSPEED_LATEST = "latest"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and containers (loss
    scalers, the ZeRO stage enum, fragment addresses): plain data, rebuilt without running any
    code from the file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


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
    """The state dict of one file (`model.tensor_files`), unwrapping DeepSpeed's nesting."""
    state = read_tensor_file(path)
    # DeepSpeed's own model-state files nest the weights under "module"
    return state["module"] if isinstance(state.get("module"), Mapping) else state


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
    from model.layouts import is_lisa_family_state_dict, translate_lisa_family_state_dict

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
