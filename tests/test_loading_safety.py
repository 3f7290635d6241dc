"""Loading safely (issue 8): nothing executes code from a checkpoint or an annotation file
handed over by a stranger.

- A scan of the project's source: every `torch.load` passes `weights_only=True`, no call turns
  `trust_remote_code` on, only the plain-data reader (utils/datasets/safe_pickle.py)
  unpickles, and library code reads tensor files only through model/tensor_files.py (the one
  door; utils.weights.weights_only_loads guards DeepSpeed's own reads).
- `--weight` files and DeepSpeed directories (whose own reader passes weights_only=False) that
  hold code are refused, and the code does not run; `torch.load` is restored afterwards.
- Pickled refs files (issue 21) build plain data only: one that would build anything else is
  refused wherever it lies, and nothing runs (more in tests/utils/test_safe_pickle.py); they
  are also only read from inside `--dataset_dir`, and splitBy names cannot point elsewhere.
  (Annotation paths resolved inside their root: tests/test_bad_input.py.)
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.utils.unsafe_checkpoints import (
    MakesMarker,
    write_unsafe_deepspeed_checkpoint,
    write_unsafe_file,
)
from tools.make_tiny_assets import make_tiny_assets
from utils.datasets.base import DataError
from utils.datasets.refer import ReferIndex, open_refer_index
from utils.datasets.safe_pickle import UnsafePickleError
from utils.weights import UnsafeCheckpointError, read_weights, weights_only_loads

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRECTORIES = {".venv", ".git", "runs", "dataset", "node_modules", "__pycache__"}
# the one library module that unpickles (refs files, plain data only)
UNPICKLING_MODULES = {Path("utils/datasets/safe_pickle.py")}
UNPICKLING_NAMES = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler")}
# this file calls torch.load(weights_only=False) on purpose, under the guard it tests
SCAN_EXCEPTIONS = {Path("tests/test_loading_safety.py")}
# the one library module that reads tensor files, and the readers it alone may call
TENSOR_DOOR = Path("model/tensor_files.py")
TENSOR_READERS = {"load_file", "safe_open", "load"}  # torch.load; safetensors' load_file, safe_open


def project_sources() -> list[Path]:
    """Every .py file of the project (not the virtual environment or run outputs)."""
    sources = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if d not in SKIPPED_DIRECTORIES]
        sources += [Path(directory) / name for name in files if name.endswith(".py")]
    return sorted(path for path in sources if path.relative_to(ROOT) not in SCAN_EXCEPTIONS)


def dotted(node: ast.AST) -> tuple[str, ...]:
    """("torch", "load") for `torch.load`; () for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return (node.id,)
    if isinstance(node, ast.Attribute):
        parent = dotted(node.value)
        return (*parent, node.attr) if parent else ()
    return ()


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def unsafe_calls(path: Path) -> list[str]:
    """Where `path` loads unsafely: torch.load without weights_only=True, trust_remote_code
    other than False, a `from torch import load`, or (library code) any use of pickle's
    loaders (a call, a subclass, an import by name) outside the plain-data reader."""
    relative = path.relative_to(ROOT)
    library = relative.parts[0] != "tests"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{relative}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            found += [f"{where} imports torch.load by name" for a in node.names if a.name == "load"]
        unpickles = library and relative not in UNPICKLING_MODULES
        if unpickles and isinstance(node, ast.ImportFrom) and node.module == "pickle":
            names = [a.name for a in node.names if ("pickle", a.name) in UNPICKLING_NAMES]
            found += [f"{where} imports pickle.{name} by name" for name in names]
        if unpickles and isinstance(node, ast.Attribute) and dotted(node) in UNPICKLING_NAMES:
            found.append(f"{where} unpickles ({'.'.join(dotted(node))})")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name == ("torch", "load") and not keyword_is(node, "weights_only", True):
            found.append(f"{where} torch.load without weights_only=True")
        if any(k.arg == "trust_remote_code" for k in node.keywords):
            if not keyword_is(node, "trust_remote_code", False):
                found.append(f"{where} trust_remote_code is not False")
    return found


def tensor_reads(path: Path) -> list[str]:
    """Where library code in `path` reads a tensor file itself (torch.load, safetensors'
    load_file / safe_open, called or imported) instead of through TENSOR_DOOR."""
    relative = path.relative_to(ROOT)
    if relative.parts[0] == "tests" or relative == TENSOR_DOOR:
        return []
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{relative}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safetensors"):
            names = [a.name for a in node.names if a.name in TENSOR_READERS]
            found += [f"{where} imports safetensors' {name}" for name in names]
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name == ("torch", "load") or (
                name[-1:] in (("load_file",), ("safe_open",)) and "safetensors" in name[:-1]
            ):
                found.append(f"{where} calls {'.'.join(name)}")
    return found


def test_tensor_files_are_read_through_one_door() -> None:
    sources = project_sources()
    assert ROOT / TENSOR_DOOR in sources
    assert [problem for path in sources for problem in tensor_reads(path)] == []


def test_the_door_scan_finds_what_it_looks_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    bad = tmp_path / "model" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "import torch, safetensors.torch\nfrom safetensors.torch import load_file, save_file\n"
        "from safetensors import safe_open\ntorch.load('a', weights_only=True)\n"
        "safetensors.torch.load_file('a')\n"
    )
    assert len(tensor_reads(bad)) == 4
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "ok.py").write_text(bad.read_text())
    assert tensor_reads(tmp_path / "tests" / "ok.py") == []


def test_the_source_never_loads_unsafely() -> None:
    sources = project_sources()
    assert len(sources) > 50 and ROOT / "utils" / "weights.py" in sources
    problems = [problem for path in sources for problem in unsafe_calls(path)]
    assert problems == []


def test_the_scan_finds_what_it_looks_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    bad = tmp_path / "utils" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "import pickle, torch\nfrom torch import load\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\npickle.loads(b'')\n"
        "from pickle import Unpickler\nclass U(pickle.Unpickler): pass\n"
    )
    assert len(unsafe_calls(bad)) == 7


def test_weights_holding_code_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    file = write_unsafe_file(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.bin: refusing to load"):
        read_weights(file)
    directory = write_unsafe_deepspeed_checkpoint(tmp_path / "ckpt_model", marker, "global_step1")
    with pytest.raises(UnsafeCheckpointError, match="_states.pt: refusing to load") as error:
        read_weights(directory)
    assert "posix.mkdir" in str(error.value) and "never code" in str(error.value)
    assert not marker.exists()


def test_weights_only_loads_forces_weights_only_and_restores_torch_load(tmp_path: Path) -> None:
    original = torch.load
    marker = tmp_path / "code_ran"
    file = write_unsafe_file(tmp_path / "state.pt", marker)
    with weights_only_loads(), pytest.raises(UnsafeCheckpointError):
        torch.load(file, weights_only=False)  # what DeepSpeed's loaders pass
    assert torch.load is original and not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with weights_only_loads():
        assert torch.equal(
            torch.load(tmp_path / "plain.pt", weights_only=False)["w"], torch.ones(2)
        )


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_tiny_assets(tmp_path / "assets", images_per_split=2, models=False) / "dataset"


def test_refs_pickles_that_would_run_code_are_refused_inside_the_dataset_dir_too(
    dataset: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "code_ran"
    refcoco = dataset / "refer_seg" / "refcoco"
    (refcoco / "refs(unc).p").write_bytes(pickle.dumps([MakesMarker(marker)]))
    with pytest.raises(UnsafePickleError) as error:
        open_refer_index(dataset, "refcoco")
    message = str(error.value)
    assert message.startswith(f"{refcoco / 'refs(unc).p'}: refusing to unpickle")
    assert f"it would build {os.mkdir.__module__}.mkdir" in message
    assert "tools/convert_refs.py" in message and not marker.exists()


def test_refs_pickles_are_only_read_from_inside_the_dataset_dir(
    dataset: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere" / "refs(unc).p"
    outside.parent.mkdir()
    refcoco = dataset / "refer_seg" / "refcoco"
    outside.write_bytes((refcoco / "refs(unc).p").read_bytes())  # plain refs, harmless
    image_dir = dataset / "refer_seg/images/mscoco/images/train2014"
    with pytest.raises(DataError) as error:
        ReferIndex(outside, refcoco / "instances.json", image_dir, dataset)
    message = str(error.value)
    assert message.startswith(f"{outside}: refusing to unpickle a file outside --dataset_dir")
    assert len(
        ReferIndex(refcoco / "refs(unc).p", refcoco / "instances.json", image_dir, dataset).refs
    )


@pytest.mark.parametrize("split_by", ["../../../elsewhere/x", "unc)/../../x", "/tmp/x"])
def test_a_split_by_cannot_name_a_file_elsewhere(dataset: Path, split_by: str) -> None:
    with pytest.raises(ValueError, match="is not a name such as 'unc'"):
        open_refer_index(dataset, "refcoco", split_by)
