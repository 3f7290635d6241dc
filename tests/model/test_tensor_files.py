"""The one door to tensor files (`model.tensor_files`): what it reads, and what it refuses in one
line naming the file (a file holding code: the object it would build, and nothing runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.tensor_files import UnsafeCheckpointError, read_tensor_file, read_tensor_files
from tests.utils.unsafe_checkpoints import write_unsafe_file

HINT = "--flag takes a test checkpoint"


class PlainObject:
    """Unpickling this would rebuild a class of ours (a BUILD, no code of its own)."""

    def __init__(self) -> None:
        self.value = 1


def tensors() -> dict[str, torch.Tensor]:
    return {
        "a": torch.arange(6, dtype=torch.float32).view(2, 3),
        "b": torch.tensor([7], dtype=torch.int64),
    }


def assert_same(state, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value)


@pytest.mark.parametrize(
    ("name", "mmap"), [("w.safetensors", False), ("w.bin", False), ("w.pth", True), ("w.pt", True)]
)
def test_tensors_come_back_as_saved(tmp_path: Path, name: str, mmap: bool) -> None:
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(tensors(), str(path))
    else:
        torch.save(tensors(), path)
    assert_same(read_tensor_file(path, mmap=mmap), tensors())


def test_shards_are_read_into_one_dict(tmp_path: Path) -> None:
    save_file({"a": tensors()["a"]}, str(tmp_path / "1.safetensors"))
    torch.save({"b": tensors()["b"]}, tmp_path / "2.bin")
    assert_same(read_tensor_files([tmp_path / "1.safetensors", tmp_path / "2.bin"]), tensors())


@pytest.mark.parametrize("mmap", [False, True])
def test_a_file_holding_code_is_refused_in_one_line_and_never_run(tmp_path: Path, mmap) -> None:
    marker = tmp_path / "code_ran"
    path = write_unsafe_file(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        read_tensor_file(path, hint=HINT, mmap=mmap)
    assert str(error.value) == (
        f"{path}: refusing to load: it holds Python objects that only code could rebuild (it "
        f"would build {os.mkdir.__module__}.mkdir); only tensors and plain data are loaded from "
        "checkpoints, never code; if you trust the file, convert it to safetensors yourself; "
        f"{HINT}"
    )
    assert not marker.exists()


def test_a_class_outside_the_allowed_ones_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": PlainObject()}, path)
    with pytest.raises(UnsafeCheckpointError, match=rf"it would build {__name__}\.PlainObject\)"):
        read_tensor_file(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a checkpoint", "not a readable PyTorch or safetensors checkpoint (Unsupported"),
        (b"", "not a readable PyTorch or safetensors checkpoint (EOFError"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named(tmp_path: Path, content: bytes, expected) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        read_tensor_file(path, hint=HINT)
    message = str(error.value)
    assert message.startswith(f"{path}: {expected}") and message.endswith(f"; {HINT}")
    assert "\n" not in message and not isinstance(error.value, UnsafeCheckpointError)


def test_a_safetensors_file_that_is_not_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"w\.safetensors: not a readable PyTorch or safetensors"):
        read_tensor_file(path)


def test_a_pickle_that_is_no_mapping_or_no_file(tmp_path: Path) -> None:
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: expected a state dict, got list$"):
        read_tensor_file(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match=rf"absent\.bin: no such file; {HINT}$"):
        read_tensor_file(tmp_path / "absent.bin", hint=HINT)
