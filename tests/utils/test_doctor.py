"""The dataset doctor (`utils.datasets.doctor`, `tools/check_dataset.py`): errors and warnings
kept apart, a source usable unless it has errors or cannot be opened, the printed report and
the exit status, the training-start guard; and (issue 21) what it checks by default: every
training source and validation set of the run the same flags describe, every image and mask
decoded, in worker processes, `--all` for every dataset under --dataset_dir, `--quick` for the
existence-and-annotation checks training start runs."""

from __future__ import annotations

import importlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.utils import fixtures_sem as fx
from tools.make_tiny_assets import make_tiny_assets
from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.doctor import (
    MAX_LISTED_PROBLEMS,
    SourceReport,
    check_training_data,
    examine_training,
    format_report,
    raise_if_unusable,
)
from utils.datasets.mixer import DataConfig

PASCAL_JSON = "vlpart/pascal_part/train.json"
DEGENERATE_PART = [1, 1, 4, 4]  # two points: left out of the mask
IN_PROCESS = ["--workers", "1"]
USAGE_ERROR = 2  # argparse's exit status
TRUNCATED_BYTES = 100
REFCOCO = "refer_seg/refcoco"
TRAIN2014 = "refer_seg/images/mscoco/images/train2014"
MMR_VAL = "MMR/MMR_val.json"
REASON_SEG_TEST = "reason_seg/ReasonSeg/test"
# what the m2sa recipe (configs/m2sa.yaml; the MMR README's train line) reads: its --dataset
# families with their --<family>_data names, then --val_dataset with --val_json_name
M2SA_READS = [
    *(f"sem_seg/{n}" for n in ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary")),
    *(f"refer_seg/{n}" for n in ("refclef", "refcoco", "refcoco+", "refcocog")),
    "vqa/llava_instruct_150k",
    "multi_part_reason_seg/MMR",
    "MultiPartReasonSeg|val (MMR_val.json)",
]
# LISA's train_ds.py: reason_seg instead of MMR, validation on ReasonSeg|val
LISA_READS = [*M2SA_READS[:10], "reason_seg/ReasonSeg|train", "ReasonSeg|val"]
# the tiny assets' refs files hold these splits (tools/tiny_assets/refer.py, grefcoco.py, refzom.py)
TINY_REFER_SPLITS = {
    "refclef|unc": ("testA", "testB", "train", "val"),
    "refcoco|unc": ("testA", "testB", "train", "val"),
    "refcoco+|unc": ("testA", "testB", "train", "val"),
    "refcocog|umd": ("test", "train", "val"),
    "grefcoco|unc": ("testA", "testB", "train", "val"),
    "refzom|final": ("test", "train"),
}
EVERYTHING = [
    *(f"sem_seg/{n}" for n in ("ade20k", "cocostuff", "mapillary", "paco_lvis", "pascal_part")),
    *(f"{refs}|{split}" for refs, splits in TINY_REFER_SPLITS.items() for split in splits),
    "vqa/llava_instruct_150k",
    "ReasonSeg|test",
    "reason_seg/ReasonSeg|train",
    "ReasonSeg|val",
    *(f"MultiPartReasonSeg|test (MMR_test_{n}.json)" for n in ("mixed", "obj_only", "part_only")),
    "multi_part_reason_seg/MMR",
    "MultiPartReasonSeg|val (MMR_val.json)",
    *(f"RefCOCOm|{s} (refcocom_{s}.json)" for s in ("testA", "testB", "val")),
    *(f"{n}|val" for n in ("ade20k", "cocostuff", "cityscapes", "mapillary")),
]


def check_dataset_main() -> Callable[[list[str]], int]:
    """`main` of tools/check_dataset.py."""
    return importlib.import_module("tools.check_dataset").main


def run_doctor(root: Path, dataset: str, data: str) -> int:
    """The doctor on one training sub-dataset (`--no_eval`: the run reads no validation set)."""
    argv = ["--dataset_dir", str(root), "--dataset", dataset, f"--{dataset}_data", data]
    return check_dataset_main()([*argv, "--no_eval", *IN_PROCESS])


def doctor(dataset: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    """(exit status, printed report) of `check_dataset.py --dataset_dir dataset *flags`."""
    capsys.readouterr()
    status = check_dataset_main()(["--dataset_dir", str(dataset), *flags])
    return status, capsys.readouterr().out


def source_names(report: str) -> list[str]:
    """The source of each status line, in order."""
    return [
        line.split("] ", 1)[1].split(": ", 1)[0]
        for line in report.splitlines()
        if line.startswith(("[OK] ", "[BAD] ", "[UNUSABLE] "))
    ]


def status_line(report: str, name: str) -> str:
    (line,) = [line for line in report.splitlines() if line.split(": ", 1)[0].endswith(f" {name}")]
    return line


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny assets' dataset (two images per split), written once; tests corrupt copies."""
    out = make_tiny_assets(tmp_path_factory.mktemp("doctor"), images_per_split=2, models=False)
    return out / "dataset"


@pytest.fixture
def dataset(clean_dataset: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny dataset, to corrupt."""
    return Path(shutil.copytree(clean_dataset, tmp_path / "dataset"))


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
    assert "[OK] sem_seg/pascal_part: 1 records, 0 errors, 0 warnings; decoded\n" in (
        capsys.readouterr().out
    )


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
    argv = ["--dataset_dir", str(tmp_path), "--dataset", "bogus", "--no_eval", *IN_PROCESS]
    assert check_dataset_main()(argv) == 1
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
    assert lines[0] == "[BAD] sem_seg/x: 5 records, 3 errors, 4 warnings; quick (not decoded)"
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


def test_max_listed_zero_lists_every_finding() -> None:
    count = MAX_LISTED_PROBLEMS + 1
    report = SourceReport("sem_seg/x", records=5, decoded=True)
    report.add([DataError("f", i, "bad") for i in range(count)])
    lines = format_report([report], max_listed=0).splitlines()
    assert lines[0] == f"[BAD] sem_seg/x: 5 records, {count} errors, 0 warnings; decoded"
    assert lines[1:] == [f"    error: f, record {i}: bad" for i in range(count)]


# --- issue 21: what the doctor reads by default, --all, --quick, --workers ---
def refcoco_train_image(root: Path) -> tuple[Path, str]:
    """(image file, ref label) of the first refCOCO training ref, read from the refs pickle
    and instances.json themselves (not through the loaders)."""
    refs = pickle.loads((root / REFCOCO / "refs(unc).p").read_bytes())
    ref = next(ref for ref in refs if ref["split"] == "train")
    images = json.loads((root / REFCOCO / "instances.json").read_text())["images"]
    (name,) = [image["file_name"] for image in images if image["id"] == ref["image_id"]]
    return root / TRAIN2014 / name, f"ref_id {ref['ref_id']}"


def truncate(path: Path, size: int = TRUNCATED_BYTES) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_the_run_of_the_flags_is_checked_decoded_and_clean(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No flags: the default (m2sa) recipe's training mix and its validation set, each decoded;
    --recipe lisa: LISA's; --eval_only / --no_eval: what such a run reads."""
    status, report = doctor(dataset, capsys)
    assert status == 0 and source_names(report) == M2SA_READS
    for name in M2SA_READS:
        assert status_line(report, name).endswith(" 0 errors, 0 warnings; decoded"), report
    assert report.splitlines()[-1] == (
        f"{len(M2SA_READS)} sources: {len(M2SA_READS)} OK, 0 with errors, 0 unusable; "
        "0 errors and 0 warnings in all"
    )
    status, report = doctor(dataset, capsys, "--recipe", "lisa", *IN_PROCESS)
    assert status == 0 and source_names(report) == LISA_READS
    status, report = doctor(dataset, capsys, "--recipe", "gsva", "--eval_only", *IN_PROCESS)
    assert status == 0 and source_names(report) == ["grefcoco|unc|val", "ReasonSeg|val"]
    status, report = doctor(dataset, capsys, "--no_eval", *IN_PROCESS)
    assert status == 0 and source_names(report) == M2SA_READS[:-1]


def test_label_map_sources_need_no_class_list_in_the_dataset(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ADE20K and COCO-Stuff downloads hold no class list; the shipped ones are read."""
    for vocabulary in ("ade20k/ade20k_classes.json", "cocostuff/cocostuff_classes.txt"):
        (dataset / vocabulary).unlink(missing_ok=True)
    flags = ["--dataset", "sem_seg", "--sem_seg_data", "ade20k||cocostuff", "--no_eval"]
    status, report = doctor(dataset, capsys, *flags, *IN_PROCESS)
    assert status == 0 and source_names(report) == ["sem_seg/ade20k", "sem_seg/cocostuff"]
    for name in ("sem_seg/ade20k", "sem_seg/cocostuff"):
        assert status_line(report, name).endswith(" 0 errors, 0 warnings; decoded"), report


def test_a_truncated_refcoco_image_is_found_by_default_and_missed_by_quick(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, ref = refcoco_train_image(dataset)
    truncate(image)
    status, report = doctor(dataset, capsys)
    assert status == 1
    assert status_line(report, "refer_seg/refcoco").startswith("[BAD] refer_seg/refcoco: 2 records")
    expected = f"    error: {dataset / REFCOCO / 'refs(unc).p'}, record {ref}: image {image} is "
    assert f"{expected}not a readable image ({TRUNCATED_BYTES} bytes" in report, report
    status, report = doctor(dataset, capsys, "--quick", *IN_PROCESS)
    assert status == 0 and "not a readable image" not in report
    assert status_line(report, "refer_seg/refcoco").endswith("; quick (not decoded)")
    image.unlink()
    status, report = doctor(dataset, capsys, "--quick", *IN_PROCESS)
    assert status == 1
    assert f"record {ref}: image {image} does not exist" in report


def test_a_text_file_named_jpg_is_found(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((dataset / "ade20k/images/training").glob("*.jpg"))[0]
    text = b"not an image\n"
    image.write_bytes(text)
    status, report = doctor(dataset, capsys, *IN_PROCESS)
    assert status == 1
    assert status_line(report, "sem_seg/ade20k").startswith(
        "[BAD] sem_seg/ade20k: 2 records, 1 errors"
    )
    assert (
        f"record {image.stem}: image {image} is not a readable image ({len(text)} bytes" in report
    )
    assert doctor(dataset, capsys, "--quick", *IN_PROCESS)[0] == 0


def test_a_cocostuff_label_of_the_wrong_size_is_found(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    label = sorted((dataset / "cocostuff/train2017").glob("*.png"))[0]
    stored = np.array(Image.open(label))
    height, width = stored.shape
    Image.fromarray(np.zeros((height, width + 1), stored.dtype)).save(label)
    status, report = doctor(dataset, capsys, *IN_PROCESS)
    assert status == 1 and status_line(report, "sem_seg/cocostuff").startswith("[BAD]")
    expected = f"label map {label} is {width + 1}x{height} but its image is {width}x{height}"
    assert expected in report, report
    assert doctor(dataset, capsys, "--quick", *IN_PROCESS)[0] == 0


def test_semantic_validation_sets_are_checked_by_their_entries(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LaSagnA's sets ("<name>|val"): class lists read, a label value outside them found."""
    sets = "ade20k|val||cocostuff|val||cityscapes|val||mapillary|val"
    flags = ["--val_dataset", f"{sets}||ReasonSeg|val", "--eval_only", *IN_PROCESS]
    status, report = doctor(dataset, capsys, *flags)
    assert status == 0 and source_names(report) == [*sets.split("||"), "ReasonSeg|val"]
    label = sorted((dataset / "mapillary/validation/v1.2/labels").glob("*.png"))[0]
    stored = Image.open(label)
    values = np.array(stored)
    values[0, 0] = 64  # a class (65 classes, 65 and above ignored): still fine
    Image.fromarray(values, mode="P").save(label)
    assert doctor(dataset, capsys, *flags)[0] == 0
    label = sorted((dataset / "ade20k/annotations/validation").glob("*.png"))[0]
    values = np.array(Image.open(label))
    values[0, 0] = 151  # ADE20K has 150 classes: values 1..150, 0 ignored
    Image.fromarray(values).save(label)
    status, report = doctor(dataset, capsys, *flags)
    assert status == 1 and status_line(report, "ade20k|val").startswith("[BAD] ade20k|val")
    assert "label value 151 is neither one of the 150 classes' values" in report
    assert doctor(dataset, capsys, *flags[:2], "--eval_only", "--quick", *IN_PROCESS)[0] == 0


def test_a_truncated_mmr_val_json_is_found(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = dataset / MMR_VAL
    truncate(path, path.stat().st_size // 2)
    status, report = doctor(dataset, capsys, *IN_PROCESS)
    assert status == 1
    line = status_line(report, "MultiPartReasonSeg|val")
    assert line.startswith(f"[UNUSABLE] MultiPartReasonSeg|val: {path}: is not valid json")
    assert report.count("[OK] ") == len(M2SA_READS) - 1


def test_mmr_val_records_escaping_the_root_or_with_a_wrong_rle_size_are_found(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = dataset / MMR_VAL
    records = json.loads(path.read_text())
    records[0]["file_name"] = "../../../outside.jpg"
    rle = records[1]["answers"][0][0]["segmentation"]
    height, width = rle["size"]
    rle["size"] = [height + 1, width]
    path.write_text(json.dumps(records))
    status, report = doctor(dataset, capsys, *IN_PROCESS)
    assert status == 1
    line = status_line(report, "MultiPartReasonSeg|val (MMR_val.json)")
    assert line.startswith("[BAD] MultiPartReasonSeg|val (MMR_val.json): 2 records, 2 errors")
    assert "path '../../../outside.jpg' escapes the dataset root" in report
    expected = f"RLE size {[height + 1, width]} differs from the image's {[height, width]} (H, W)"
    assert expected in report and "answers[0][0]" in report, report


def test_a_reason_seg_test_problem_outside_the_recipes_is_found_only_with_all(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = sorted((dataset / REASON_SEG_TEST).glob("*.jpg"))[0]
    truncate(image, image.stat().st_size * 4 // 5)  # inside its scan: OpenCV fills in grey
    for flags in ([], ["--recipe", "lisa"]):
        status, report = doctor(dataset, capsys, *flags, *IN_PROCESS)
        assert status == 0 and "ReasonSeg|test" not in report
    status, report = doctor(dataset, capsys, "--all", *IN_PROCESS)
    assert status == 1 and source_names(report) == EVERYTHING
    assert status_line(report, "ReasonSeg|test").startswith(
        "[BAD] ReasonSeg|test: 2 records, 1 errors"
    )
    assert f"record {image.name}: image {image} is a truncated JPEG" in report
    assert report.count("[OK] ") == len(EVERYTHING) - 1


def test_all_lists_what_it_did_not_find_and_fails_on_an_empty_directory(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder in ("ade20k", "vlpart/paco", "refer_seg/refzom", "refer_seg/RefCOCOm"):
        shutil.rmtree(dataset / folder)
    status, report = doctor(dataset, capsys, "--all", *IN_PROCESS)
    assert status == 0
    assert report.splitlines()[-2] == (
        f"not found under {dataset}, not checked: ade20k, vlpart/paco, refer_seg/refzom, "
        "refer_seg/RefCOCOm, ade20k/annotations/validation"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    status, report = doctor(empty, capsys, "--all", *IN_PROCESS)
    assert status == 1 and report.startswith(f"nothing to check: no dataset found under {empty}")


def test_an_index_problem_is_reported_once_for_all_splits(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--all reads each refs file once for all its splits; what the index itself could not
    read is reported with the first split only."""
    path = dataset / REFCOCO / "instances.json"
    instances = json.loads(path.read_text())
    instances["images"].append({"id": 999})
    path.write_text(json.dumps(instances))
    status, report = doctor(dataset, capsys, "--all", *IN_PROCESS)
    position = len(instances["images"]) - 1
    finding = (
        f"{path}, record entry {position}: lacks one of ('id', 'file_name', 'height', 'width')"
    )
    assert status == 1 and report.count(finding) == 1
    assert status_line(report, "refcoco|unc|testA").startswith("[BAD]")
    for split in ("testB", "train", "val"):
        assert status_line(report, f"refcoco|unc|{split}").startswith("[OK]")


def test_workers_give_the_same_report(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truncate(refcoco_train_image(dataset)[0])
    (sorted((dataset / "ade20k/images/training").glob("*.jpg"))[0]).write_text("text")
    truncate(dataset / MMR_VAL, TRUNCATED_BYTES)
    truncate(sorted((dataset / REASON_SEG_TEST).glob("*.jpg"))[0])
    one = doctor(dataset, capsys, "--all", "--workers", "1")
    two = doctor(dataset, capsys, "--all", "--workers", "2")
    assert one == two and one[0] == 1
    assert sum(line.startswith(("[BAD]", "[UNUSABLE]")) for line in one[1].splitlines()) >= 4


def test_a_check_that_breaks_is_reported_and_the_others_still_run(
    dataset: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from utils.datasets.vqa import VqaSource

    def broken(self: object, deep: bool = False) -> None:
        raise TypeError("boom")

    monkeypatch.setattr(VqaSource, "check", broken)
    status, report = doctor(dataset, capsys, *IN_PROCESS)
    assert status == 1
    line = status_line(report, "vqa/llava_instruct_150k")
    assert line.startswith(
        "[UNUSABLE] vqa/llava_instruct_150k: its check stopped on TypeError: boom"
    )
    assert "test_doctor.py:" in line and report.count("[OK] ") == len(M2SA_READS) - 1


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (
            ["--all", "--recipe", "lisa"],
            "--all checks every dataset under --dataset_dir, so --recipe",
        ),
        (["--all", "--val_dataset", "ReasonSeg|val"], "so --val_dataset (which choose"),
        (["--quick", "--deep"], "argument --deep: not allowed with argument --quick"),
        (["--workers", "0"], "--workers 0: give at least 1"),
        (["--print_config"], "--print_config is train_ds.py's"),
        (["--deeep"], "unrecognized arguments: --deeep"),
        (["--recipe", "no_such_recipe"], "no_such_recipe"),
    ],
)
def test_flags_the_doctor_cannot_honour_stop_with_one_line(
    flags: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        check_dataset_main()(["--dataset_dir", str(tmp_path), *flags])
    assert stopped.value.code == USAGE_ERROR
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("check_dataset.py: error: ") and said in error, error


def test_deep_is_accepted_with_a_note_and_changes_nothing(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert doctor(dataset, capsys, "--deep", *IN_PROCESS) == doctor(dataset, capsys, *IN_PROCESS)
    check_dataset_main()(["--dataset_dir", str(dataset), "--deep", "--no_eval", *IN_PROCESS])
    assert "--deep is the default now" in capsys.readouterr().err


# --- the custom family (your own files, utils/datasets/custom.py) ---------------------------------
CUSTOM_DATA = Path(__file__).resolve().parents[1] / "data" / "custom"
CUSTOM_TRAIN = "custom/train.jsonl@custom/images"
CUSTOM_VAL = "custom/val.json@custom/images"


def custom_doctor(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    flags = ["--dataset", "custom", "--sample_rates", "1", "--custom_data", CUSTOM_TRAIN]
    return doctor(root, capsys, *flags, "--val_dataset", f"custom|{CUSTOM_VAL}", *IN_PROCESS)


def test_custom_files_are_checked_like_any_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example files are clean; a record whose answer lacks a mask and a missing image are
    each named with file, record (and JSONL line) and field."""
    root = tmp_path / "data"
    shutil.copytree(CUSTOM_DATA, root / "custom")
    status, report = custom_doctor(root, capsys)
    names = [f"custom/{CUSTOM_TRAIN}", f"custom|{CUSTOM_VAL}"]
    assert status == 0 and source_names(report) == names, report
    assert status_line(report, names[0]).endswith(": 3 records, 0 errors, 0 warnings; decoded")
    assert status_line(report, names[1]).endswith(": 2 records, 0 errors, 0 warnings; decoded")

    train = root / "custom" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[0] = lines[0].replace("It is {seg}.", "It is {seg} and {seg}.")
    train.write_text("\n".join(lines) + "\n")
    (root / "custom" / "images" / "blue.png").unlink()
    status, report = custom_doctor(root, capsys)
    assert status == 1
    assert f"error: {train}, record 0 (line 1): conversations[0][0].answer: placeholder 2" in report
    assert f"error: {train}, record 1 (line 2): image " in report
    assert "blue.png does not exist" in report
    assert status_line(report, names[1]).endswith(": 2 records, 1 errors, 0 warnings; decoded")
