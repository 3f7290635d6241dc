"""utils/datasets/safe_pickle.py and the refs reader (issue 21): a refs pickle that would run
code is refused, naming the file and what it would build, and nothing runs; the real refs
layout (a list of dicts of plain values, as Python 2 and our tiny writer pickle it) loads
exactly as `pickle.load` reads it (LISA dvlab-research/LISA@3cb2d43 `utils/refer.py:68`).
"""

from __future__ import annotations

import copyreg
import json
import os
import pickle
import pickletools
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.utils import fixtures_refer as fx
from tools.tiny_assets.common import write_pickle
from tools.tiny_assets.refer import ref_record, sentence
from utils.datasets.base import DataError
from utils.datasets.refer import open_refer_index
from utils.datasets.safe_pickle import UnsafePickleError, read_plain_pickle

HINT, UNREADABLE = "the fix", "re-download"
# an extension code no library registers (copyreg reserves 1..0x7fffffff; this is arbitrary)
EXTENSION_CODE = 0x4242


class Calls:
    """Unpickling this calls `function(*args)`: what a malicious refs file would do."""

    def __init__(self, function: Callable, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


class Plain:
    """A class pickled by reference: protocol 0 builds it through copy_reg._reconstructor."""

    def __init__(self, path: str) -> None:
        self.path = path


def touch_os_system(marker: Path) -> object:
    return Calls(os.system, f"touch {marker}")


def touch_eval(marker: Path) -> object:
    return Calls(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()")


def touch_popen(marker: Path) -> object:
    return Calls(subprocess.Popen, ["touch", str(marker)])


def reconstructor(marker: Path) -> object:
    return Calls(copyreg._reconstructor, Plain, object, None)


# payload -> (writer, the global a protocol >= 3 file names, the one a protocol < 3 file names:
# Python 3 writes Python 2's module names there, and the refusal names the global as written)
PAYLOADS = {
    "os.system": (touch_os_system, *[f"{os.system.__module__}.system"] * 2),
    "builtins.eval": (touch_eval, "builtins.eval", "__builtin__.eval"),
    "subprocess.Popen": (touch_popen, "subprocess.Popen", "commands.Popen"),
    "copyreg._reconstructor": (reconstructor, "copyreg._reconstructor", "copy_reg._reconstructor"),
}
PYTHON_3_NAMES_FROM = 3


def refuses(path: Path, built: str) -> UnsafePickleError:
    with pytest.raises(UnsafePickleError) as error:
        read_plain_pickle(path, HINT, UNREADABLE)
    message = str(error.value)
    assert message.startswith(f"{path}: refusing to unpickle: it would build {built},")
    assert "can run code when loaded" in message and message.endswith(f"({HINT})")
    assert error.value.built == built and isinstance(error.value, DataError)
    return error.value


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(
    tmp_path: Path, name: str, protocol: int
) -> None:
    make, python_3_name, python_2_name = PAYLOADS[name]
    built = python_3_name if protocol >= PYTHON_3_NAMES_FROM else python_2_name
    marker = tmp_path / "code_ran"
    refs = [{"ref_id": 0, "sentences": [{"sent": "a man"}]}, make(marker)]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=protocol))
    refuses(path, built)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_the_payloads_do_run_under_plain_pickle(tmp_path: Path, name: str) -> None:
    """The control: the same bytes create the marker when `pickle.loads` reads them."""
    marker = tmp_path / "code_ran"
    (result,) = pickle.loads(pickle.dumps([PAYLOADS[name][0](marker)], protocol=2))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


def test_protocol_0_names_the_class_as_written(tmp_path: Path) -> None:
    """Python 2 spells copyreg `copy_reg`; the refusal names the global as the file has it."""
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([Plain("x")], protocol=0))
    assert b"copy_reg\n_reconstructor" in path.read_bytes()
    refuses(path, "copy_reg._reconstructor")


@pytest.mark.parametrize("protocol", [0, 2])
def test_a_persistent_id_is_refused(tmp_path: Path, protocol: int) -> None:
    class Persists(pickle.Pickler):
        def persistent_id(self, obj: object) -> str | None:
            return "outside" if obj == "refer elsewhere" else None

    path = tmp_path / "refs(unc).p"
    with path.open("wb") as handle:
        Persists(handle, protocol=protocol).dump(["refer elsewhere"])
    refuses(path, "an object from a persistent id")


def test_a_registered_extension_is_refused_even_once_cached(tmp_path: Path) -> None:
    """EXT2 names a callable registered with copyreg; after any unpickler looked it up, CPython
    takes it from copyreg's cache without calling find_class."""
    marker = tmp_path / "code_ran"
    ext2 = b"\x83" + struct.pack("<H", EXTENSION_CODE)
    attack = b"\x80\x02" + ext2 + pickle.dumps((str(marker),), protocol=2)[2:-1] + b"R."
    path = tmp_path / "refs(unc).p"
    path.write_bytes(attack)
    copyreg.add_extension("os", "mkdir", EXTENSION_CODE)
    try:
        assert pickle.loads(b"\x80\x02" + ext2 + b".") is os.mkdir  # fills copyreg's cache
        refuses(path, f"os.mkdir (copyreg extension {EXTENSION_CODE})")
        assert not marker.exists()
        pickle.loads(attack)  # the control: plain pickle runs it
        assert marker.is_dir()
        marker.rmdir()
    finally:
        copyreg.remove_extension("os", "mkdir", EXTENSION_CODE)
    # unregistered, the code is a damaged file
    with pytest.raises(DataError, match="cannot be read: unregistered extension code"):
        read_plain_pickle(path, HINT, UNREADABLE)
    assert not marker.exists()


# Python 2's pickle, which wrote the original refs files, for the opcodes plain refs use:
# ASCII str -> STRING / SHORT_BINSTRING (byte strings, read back with encoding="ASCII"), other
# str -> UNICODE / BINUNICODE (Python 2's `unicode`), lists and dicts with APPEND(S) /
# SETITEM(S), no memo.


def py2_pickle(value: object, protocol: int) -> bytes:
    """`value` as Python 2's `pickle.dumps(value, protocol)` writes it (protocol 0 or 2)."""
    if protocol == 0:
        return _py2_protocol_0(value) + b"."
    return b"\x80\x02" + _py2_protocol_2(value) + b"."


def _py2_protocol_0(value: object) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"I01\n" if value else b"I00\n"
    if isinstance(value, int):
        return f"I{value}\n".encode()
    if isinstance(value, float):
        return f"F{value!r}\n".encode()
    if isinstance(value, str) and not value.isascii():
        return b"V" + value.encode("raw-unicode-escape") + b"\n"
    if isinstance(value, str):
        return b"S" + repr(value).encode("ascii") + b"\n"
    if isinstance(value, list):
        return b"(l" + b"".join(_py2_protocol_0(item) + b"a" for item in value)
    if isinstance(value, dict):
        pairs = (_py2_protocol_0(k) + _py2_protocol_0(v) + b"s" for k, v in value.items())
        return b"(d" + b"".join(pairs)
    raise TypeError(type(value))


def _py2_protocol_2(value: object) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        if 0 <= value < 256:
            return b"K" + bytes([value])
        return b"J" + struct.pack("<i", value)
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str) and not value.isascii():
        raw = value.encode("utf-8")
        return b"X" + struct.pack("<I", len(raw)) + raw
    if isinstance(value, str):
        raw = value.encode("ascii")
        return (
            b"U" + bytes([len(raw)]) + raw
            if len(raw) < 256
            else b"T" + struct.pack("<i", len(raw)) + raw
        )
    if isinstance(value, list):
        return b"](" + b"".join(map(_py2_protocol_2, value)) + b"e"
    if isinstance(value, dict):
        pairs = (_py2_protocol_2(k) + _py2_protocol_2(v) for k, v in value.items())
        return b"}(" + b"".join(pairs) + b"u"
    raise TypeError(type(value))


def real_layout_refs() -> list[dict]:
    """Refs with every key of refCOCO's refs(unc).p (our tiny writer's `ref_record`), an
    int ann_id, a gRefCOCO list and its no-target [-1], a non-ASCII `raw`, a float."""
    first = [sentence(0, "man on left"), sentence(1, "left guy")]
    second = [sentence(2, "both dogs")]
    second[0]["raw"] = "Both dogs, café."
    refs = [
        ref_record(0, 100001, 7, 1, "train", "COCO_train2014_000000100001_0.jpg", first),
        ref_record(1, 100002, [8, 9], [18, 18], "testA", "COCO_train2014_1_1.jpg", second),
    ]
    refs[1]["no_target"] = False
    refs.append({**refs[1], "ref_id": 2, "ann_id": [-1], "no_target": True, "area": 12.5})
    return refs


def test_real_layout_refs_load_exactly_as_pickle_load(tmp_path: Path) -> None:
    refs = real_layout_refs()
    path = tmp_path / "refs(unc).p"
    written = {
        "tiny writer": lambda: write_pickle(path, refs),
        "protocol 2": lambda: path.write_bytes(pickle.dumps(refs, protocol=2)),
        "highest": lambda: path.write_bytes(pickle.dumps(refs, protocol=pickle.HIGHEST_PROTOCOL)),
        "python 2, protocol 0": lambda: path.write_bytes(py2_pickle(refs, 0)),
        "python 2, protocol 2": lambda: path.write_bytes(py2_pickle(refs, 2)),
    }
    for how, write in written.items():
        write()
        with path.open("rb") as handle:
            expected = pickle.load(handle)
        assert expected == refs, how
        assert read_plain_pickle(path, HINT, UNREADABLE) == expected, how
    opcodes = {op.name for op, _, _ in pickletools.genops(py2_pickle(refs, 2))}
    assert {"SHORT_BINSTRING", "BINUNICODE", "SETITEMS", "APPENDS"} <= opcodes
    opcodes = {op.name for op, _, _ in pickletools.genops(py2_pickle(refs, 0))}
    assert {"STRING", "UNICODE", "SETITEM", "APPEND", "FLOAT"} <= opcodes


def test_the_loader_refuses_a_refs_file_that_would_run_code(tmp_path: Path) -> None:
    directory = fx.write_refer(tmp_path)
    marker = tmp_path / "code_ran"
    refs = fx.refcoco_refs() + [touch_os_system(marker)]
    (directory / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(UnsafePickleError) as error:
        open_refer_index(tmp_path, "refcoco")
    message = str(error.value)
    assert message.startswith(f"{directory / 'refs(unc).p'}: refusing to unpickle")
    assert f"python tools/convert_refs.py --dataset_dir {tmp_path}" in message
    assert "refs(unc).json" in message and not marker.exists()


def test_a_json_twin_is_read_and_the_pickle_never_opened(tmp_path: Path) -> None:
    directory = fx.write_refer(tmp_path)
    pickled = open_refer_index(tmp_path, "refcoco").refs
    (directory / "refs(unc).json").write_text(json.dumps(fx.refcoco_refs()))
    (directory / "refs(unc).p").write_bytes(pickle.dumps([touch_os_system(tmp_path / "ran")]))
    index = open_refer_index(tmp_path, "refcoco")
    assert index.refs_file == directory / "refs(unc).json" and index.refs == pickled
    assert not (tmp_path / "ran").exists()


def test_when_twin_and_pickle_disagree_the_json_wins(tmp_path: Path) -> None:
    directory = fx.write_refer(tmp_path)
    edited = fx.refcoco_refs()
    edited[0]["sentences"][0]["sent"] = "only in the json"
    (directory / "refs(unc).json").write_text(json.dumps(edited))
    refs = open_refer_index(tmp_path, "refcoco").refs
    assert refs[0].sentences[0] == "only in the json"
    assert [ref.ref_id for ref in refs] == [ref["ref_id"] for ref in fx.refcoco_refs()]


@pytest.mark.parametrize(
    ("dataset", "split_by", "pickle_name", "twin"),
    [
        ("refcoco", "", "refs(unc).p", "refs(unc).json"),
        ("refcocog", "umd", "refs(umd).p", "refs(umd).json"),
        ("refzom", "", "Ref_ZOM.p", "Ref_ZOM.json"),
        ("grefcoco", "", "grefs(unc).p", "grefs(unc).json"),
    ],
)
def test_every_refs_pickle_has_its_twin_preferred(
    tmp_path: Path, dataset: str, split_by: str, pickle_name: str, twin: str
) -> None:
    directory = fx.write_refer(tmp_path, dataset, refs_name=pickle_name)
    assert open_refer_index(tmp_path, dataset, split_by).refs_file.name == pickle_name
    (directory / twin).write_text(json.dumps(fx.refcoco_refs()))
    assert open_refer_index(tmp_path, dataset, split_by).refs_file.name == twin


def test_the_refusal_crosses_processes_intact(tmp_path: Path) -> None:
    """The doctor's and the loaders' worker processes send it back pickled."""
    error = UnsafePickleError(tmp_path / "refs(unc).p", "posix.system", "convert it")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is UnsafePickleError and str(again) == str(error)
    assert again.built == "posix.system" and again.file == error.file
