"""The dataset doctor (`utils.datasets.doctor`, `tools/check_dataset.py`): errors and warnings
kept apart, a source usable unless it has errors or cannot be opened, the printed report and
the exit status, and the training-start guard."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.utils import fixtures_sem as fx
from tools.make_tiny_assets import make_tiny_assets
from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.doctor import (
    SourceReport,
    check_training_data,
    examine_training,
    format_report,
    raise_if_unusable,
)
from utils.datasets.mixer import DataConfig

PASCAL_JSON = "vlpart/pascal_part/train.json"
DEGENERATE_PART = [1, 1, 4, 4]  # two points: left out of the mask


def check_dataset_main() -> Callable[[list[str]], int]:
    """`main` of tools/check_dataset.py."""
    return importlib.import_module("tools.check_dataset").main


def run_doctor(root: Path, dataset: str, data: str) -> int:
    return check_dataset_main()(
        ["--dataset_dir", str(root), "--dataset", dataset, f"--{dataset}_data", data]
    )


def pascal_part(root: Path, first_segmentation: list | None = None) -> None:
    """The PASCAL-Part fixture, its first annotation's segmentation replaced if given."""
    fx.write_pascal_part(root)
    if first_segmentation is not None:
        path = root / PASCAL_JSON
        data = json.loads(path.read_text())
        data["annotations"][0]["segmentation"] = first_segmentation
        fx.write_json(path, data)


def examine_pascal(root: Path) -> SourceReport:
    (report,) = examine_training(root, {"sem_seg": ["pascal_part"]}, SamplingOptions())
    return report


def test_data_error_is_fatal_unless_told() -> None:
    assert DataError("f.json", 1, "bad").fatal
    assert not DataError("f.json", 1, "odd", "hint", fatal=False).fatal


def test_clean_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pascal_part(tmp_path)
    report = examine_pascal(tmp_path)
    assert report.usable and report.records == 1
    assert report.errors == [] and report.warnings == []
    assert run_doctor(tmp_path, "sem_seg", "pascal_part") == 0
    assert "[OK] sem_seg/pascal_part: 1 records, 0 errors, 0 warnings" in capsys.readouterr().out


def test_warning_only_source_is_usable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pascal_part(tmp_path, [*fx.polygon(2, 8, 2, 8), DEGENERATE_PART])
    report = examine_pascal(tmp_path)
    assert report.usable and report.errors == []
    (warning,) = report.warnings
    assert not warning.fatal and "record annotation 1: polygon 1 has 2 points" in str(warning)
    raise_if_unusable([report])  # warnings alone do not stop training
    assert run_doctor(tmp_path, "sem_seg", "pascal_part") == 0
    out = capsys.readouterr().out
    assert "[OK] sem_seg/pascal_part: 1 records, 0 errors, 1 warnings" in out
    assert "    warning: " in out and "left out of the mask" in out


def test_error_makes_the_source_unusable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pascal_part(tmp_path, [DEGENERATE_PART])
    report = examine_pascal(tmp_path)
    assert not report.usable and report.warnings == []
    (error,) = report.errors
    assert error.fatal and "no usable polygon is left" in str(error)
    assert run_doctor(tmp_path, "sem_seg", "pascal_part") == 1
    out = capsys.readouterr().out
    assert "[BAD] sem_seg/pascal_part: 1 records, 1 errors, 0 warnings" in out
    assert "    error: " in out and "record annotation 1: polygon 0 has 2 points" in out


def test_missing_files_make_the_source_unusable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (report,) = examine_training(tmp_path, {"sem_seg": ["ade20k"]}, SamplingOptions())
    assert not report.usable and isinstance(report.failure, DataError)
    assert report.name == "sem_seg/ade20k"
    assert run_doctor(tmp_path, "sem_seg", "ade20k") == 1
    out = capsys.readouterr().out
    assert "[UNUSABLE] sem_seg/ade20k: " in out and "ade20k/images/training" in out


def test_unknown_family_is_reported_unusable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (report,) = examine_training(tmp_path, {"bogus": ["x"]}, SamplingOptions())
    assert not report.usable and report.name == "bogus"
    assert "unknown --dataset family 'bogus'" in str(report.failure)
    assert check_dataset_main()(["--dataset_dir", str(tmp_path), "--dataset", "bogus"]) == 1
    assert "[UNUSABLE] bogus: unknown --dataset family" in capsys.readouterr().out


def test_raise_if_unusable_names_only_the_bad_sources(tmp_path: Path) -> None:
    pascal_part(tmp_path, [DEGENERATE_PART])
    fx.write_paco(tmp_path)
    family_data = {"sem_seg": ["pascal_part", "paco_lvis", "ade20k"]}
    reports = examine_training(tmp_path, family_data, SamplingOptions())
    assert [report.usable for report in reports] == [False, True, False]
    with pytest.raises(DataError, match="missing or broken") as error:
        raise_if_unusable(reports)
    message = str(error.value)
    assert "[BAD] sem_seg/pascal_part" in message and "[UNUSABLE] sem_seg/ade20k" in message
    assert "paco_lvis" not in message and "tools/check_dataset.py" in message
    raise_if_unusable([reports[1]])


def test_report_lists_at_most_max_listed_of_each_kind() -> None:
    report = SourceReport("sem_seg/x", records=5)
    report.add([DataError("f", i, "bad") for i in range(3)])
    report.add([DataError("f", i, "odd", fatal=False) for i in range(4)])
    lines = format_report([report], max_listed=2).splitlines()
    assert lines[0] == "[BAD] sem_seg/x: 5 records, 3 errors, 4 warnings"
    assert lines[1:] == [
        "    error: f, record 0: bad",
        "    error: f, record 1: bad",
        "    ... and 1 more errors",
        "    warning: f, record 0: odd",
        "    warning: f, record 1: odd",
        "    ... and 2 more warnings",
    ]


def test_training_start_check_passes_on_clean_data_and_names_a_missing_image(tmp_path) -> None:
    out = make_tiny_assets(tmp_path, seed=0, models=False)
    config = DataConfig(
        dataset_dir=out / "dataset",
        dataset=("refer_seg", "multi_part_reason_seg"),
        sample_rates=(1, 1),
        family_data={"refer_seg": ("refcoco", "grefcoco"), "multi_part_reason_seg": ("MMR",)},
    )
    reports = check_training_data(config)
    assert [r.name for r in reports] == [
        "refer_seg/refcoco",
        "refer_seg/grefcoco",
        "multi_part_reason_seg/MMR",
    ]
    assert all(r.usable and r.records > 0 for r in reports)
    images = sorted((out / "dataset/refer_seg/images/mscoco/images/train2017").glob("*.jpg"))
    images[0].unlink()
    with pytest.raises(DataError) as error:
        check_training_data(config)
    message = str(error.value)
    assert "multi_part_reason_seg/MMR" in message and images[0].name in message
    assert "refer_seg/refcoco" not in message
