"""Reading trained weights for `--weight`: a DeepSpeed checkpoint directory (`ckpt_model`, read
without running zero_to_fp32.py first), a `zero_to_fp32.py` output file (`pytorch_model.bin` or
`.safetensors`), or the directory newer DeepSpeed versions write instead (possibly sharded, with
an index). Loading is strict: missing and unexpected keys are listed and stop the load.
Files are read with `torch.load(weights_only=True)` or safetensors, never by unpickling code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

DEEPSPEED_LATEST = "latest"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_LISTED_KEYS = 10


def read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    # DeepSpeed's own model-state files nest the weights under "module"
    return state["module"] if isinstance(state.get("module"), dict) else state


def read_directory(path: Path) -> dict[str, torch.Tensor]:
    """A DeepSpeed checkpoint directory, or a (sharded) consolidated directory."""
    if (path / DEEPSPEED_LATEST).is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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
    state = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"--weight {path} does not match the model built from --version: "
            f"{len(missing)} missing keys {missing[:MAX_LISTED_KEYS]}, {len(unexpected)} "
            f"unexpected keys {unexpected[:MAX_LISTED_KEYS]} (check --lora_r, "
            "--lora_target_modules, --early_fusion and --version against the training run)"
        )
    converted = {key: value.to(expected[key].dtype) for key, value in state.items()}
    model.load_state_dict(converted, strict=True)
