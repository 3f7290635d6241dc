"""tools/convert_refs.py: every refs pickle of the tiny datasets (written in the real formats)
gets a JSON twin equal to it, the loaders then read the twin (the pickles are destroyed to tell),
and a pickle that would run code, or that JSON cannot hold, is reported, not converted."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from tests.utils.test_safe_pickle import touch_os_system
from tools.convert_refs import main
from tools.make_tiny_assets import make_tiny_assets
from utils.datasets.refer import open_refer_index

REFER = "refer_seg"
# dataset -> (splitBy, its pickle) as the tiny writer and the originals name them
PICKLES = {
    "refclef": ("unc", "refs(unc).p"),
    "refcoco": ("unc", "refs(unc).p"),
    "refcoco+": ("unc", "refs(unc).p"),
    "refcocog": ("umd", "refs(umd).p"),
    "grefcoco": ("unc", "grefs(unc).p"),
    "refzom": ("final", "Ref_ZOM.p"),
}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    families = ("refer_seg", "grefcoco", "refzom")
    out = make_tiny_assets(tmp_path / "assets", images_per_split=2, families=families, models=False)
    return out / "dataset"


def pickle_file(dataset: Path, name: str) -> Path:
    return dataset / REFER / name / PICKLES[name][1]


def twin(dataset: Path, name: str) -> Path:
    return pickle_file(dataset, name).with_suffix(".json")


def run(dataset: Path, capsys: pytest.CaptureFixture, *flags: str) -> tuple[int, list[str]]:
    status = main(["--dataset_dir", str(dataset), *flags])
    return status, capsys.readouterr().out.splitlines()


def test_twins_are_written_equal_and_then_read_instead_of_the_pickles(
    dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    before = {name: open_refer_index(dataset, name).refs for name in PICKLES}
    status, lines = run(dataset, capsys, "--check")
    assert status == 1 and not twin(dataset, "refcoco").exists()
    # gRefCOCO ships grefs(unc).json, which the tiny writer also pickles as grefs(unc).p
    assert sorted(line.split(" ", 1)[0] for line in lines) == ["agrees"] + ["would"] * 5
    status, lines = run(dataset, capsys)
    assert status == 0 and len(lines) == len(PICKLES)
    assert "wrote       refer_seg/refcoco/refs(unc).p -> refs(unc).json" in lines
    for name in PICKLES:
        refs = pickle.loads(pickle_file(dataset, name).read_bytes())
        assert json.loads(twin(dataset, name).read_text()) == refs
        pickle_file(dataset, name).write_bytes(b"not a pickle")
        index = open_refer_index(dataset, name)
        assert index.refs_file == twin(dataset, name) and index.refs == before[name]
    assert list((dataset / REFER).rglob("*.partial")) == []


def test_check_passes_on_equal_twins_and_reports_a_disagreement(
    dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run(dataset, capsys)[0] == 0
    status, lines = run(dataset, capsys, "--check")
    assert status == 0 and all(line.startswith("agrees") for line in lines)
    edited = json.loads(twin(dataset, "refcocog").read_text())
    edited[0]["sentences"][0]["sent"] = "edited by hand"
    twin(dataset, "refcocog").write_text(json.dumps(edited))
    for flags in ((), ("--check",)):
        status, lines = run(dataset, capsys, *flags)
        wrong = [line for line in lines if line.startswith("DISAGREES")]
        assert status == 1 and len(wrong) == 1 and "refcocog/refs(umd).p" in wrong[0]
        assert "the loaders read the JSON; delete it" in wrong[0]
    assert json.loads(twin(dataset, "refcocog").read_text()) == edited  # never overwritten


def test_a_pickle_that_would_run_code_is_reported_not_converted(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "code_ran"
    refs = pickle.loads(pickle_file(dataset, "refcoco").read_bytes())
    pickle_file(dataset, "refcoco").write_bytes(pickle.dumps([*refs, touch_os_system(marker)]))
    status, lines = run(dataset, capsys)
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert status == 1 and len(refused) == 1 and "refcoco/refs(unc).p" in refused[0]
    assert f"it would build {os.system.__module__}.system" in refused[0]
    assert not twin(dataset, "refcoco").exists() and not marker.exists()
    assert twin(dataset, "refcoco+").exists()  # the others are converted


def test_refs_json_cannot_hold_exactly_are_not_written(
    dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    refs = pickle.loads(pickle_file(dataset, "refzom").read_bytes())
    refs[0]["ann_id"] = tuple(refs[0]["ann_id"])
    pickle_file(dataset, "refzom").write_bytes(pickle.dumps(refs))
    status, lines = run(dataset, capsys)
    assert status == 1 and [line.split(" ", 1)[0] for line in lines].count("NOT") == 1
    assert not twin(dataset, "refzom").exists()


def test_no_refs_pickle_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, lines = run(tmp_path, capsys)
    assert status == 1 and lines == [f"no refs pickle under {tmp_path / REFER}/<dataset>/"]
