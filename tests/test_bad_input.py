"""Bad input (issue 8): one case per row of the issue's list, run through every entry point where
it can occur, each asserting one clear message (the file, the record, what was expected) raised
by the project's own code, never a library's traceback, and never a silent wrong mask.

Entry points:
- training start: the doctor's cheap checks train_ds.py runs (`check_training_data`); what only
  decoding finds is then met reading the records as training does (`HybridDataset`);
- the dataset doctor: `tools/check_dataset.py --deep`, its report and exit status;
- evaluation: building the validation set and reading every sample.
Command-line rows go through `utils.config.parse_args` (and the doctor / the set builders), model
file rows through the loaders `build_segmenter` calls.
"""

from __future__ import annotations

import importlib
import json
import re
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from model.backbone import load_llava
from model.builder import build_segmenter
from model.mask_models import load_mask_model
from model.tiny import tiny_model_config
from tests.utils.bad_data import (
    CASES,
    MMR_TRAIN,
    PASCAL_JSON,
    Case,
    read_json,
    truncated_image_mmr,
)
from tests.utils.unsafe_checkpoints import MakesMarker
from tools.make_tiny_assets import make_tiny_assets
from utils.config import USAGE_ERROR, parse_args
from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.coco import decode_segmentation
from utils.datasets.doctor import check_training_data, examine_training
from utils.datasets.mixer import DataConfig, HybridDataset, build_sources, skipped_samples
from utils.datasets.refer_seg import build_refer_seg_sources
from utils.datasets.templates import PROMPT_STYLES, REJ, SEG
from utils.datasets.validation import build_validation_set, parse_val_datasets
from utils.evaluation import build_validation_jobs
from utils.training import training_dataset

ROOT = Path(__file__).resolve().parents[1]
IMAGES_PER_SPLIT = 2
# items read at run time: every record of a two-record source gets drawn
DRAWS = 24
TARGET_TOKEN = re.compile(r"\[SEG\]|\[REJ\]")


TRAINING_CASES = [pytest.param(c, id=name) for name, c in CASES.items() if c.train]
VALIDATION_CASES = [pytest.param(c, id=name) for name, c in CASES.items() if c.val]
ALL_CASES = [pytest.param(c, id=name) for name, c in CASES.items()]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A fresh copy of the tiny assets' data (two images per split), to corrupt."""
    return make_tiny_assets(tmp_path, images_per_split=IMAGES_PER_SPLIT, models=False) / "dataset"


def assert_clear(error: BaseException, fragments: list[str]) -> None:
    """`error` names every fragment and was raised by the project's code (its innermost frame
    is one of ours), not from deep inside a library."""
    message = str(error)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    innermost = Path(traceback.extract_tb(error.__traceback__)[-1].filename).resolve()
    assert innermost.is_relative_to(ROOT) and ".venv" not in innermost.parts, innermost


def data_config(dataset: Path, family: str, name: str) -> DataConfig:
    return DataConfig(
        dataset_dir=dataset, dataset=(family,), sample_rates=(1,), family_data={family: (name,)}
    )


def read_as_training_does(config: DataConfig, skip_bad_samples: bool = False) -> list:
    mix = HybridDataset(
        build_sources(config), config.sample_rates, DRAWS, skip_bad_samples=skip_bad_samples
    )
    return [mix[index] for index in range(DRAWS)]


def run_doctor(argv: list[str]) -> int:
    return importlib.import_module("tools.check_dataset").main(argv)


# --- The dataset rows through the three entry points ---
@pytest.mark.parametrize("case", TRAINING_CASES)
def test_training_start(case: Case, dataset: Path) -> None:
    said = case.corrupt(dataset)
    config = data_config(dataset, *case.train)
    if case.decoded:
        check_training_data(config)  # the start check does not decode images
        with pytest.raises(DataError) as error:
            read_as_training_does(config)
    else:
        with pytest.raises(DataError) as error:
            check_training_data(config)
        assert "tools/check_dataset.py" in str(error.value)
    assert_clear(error.value, said.train)


@pytest.mark.parametrize("case", ALL_CASES)
def test_dataset_doctor(case: Case, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    said = case.corrupt(dataset)
    argv = ["--dataset_dir", str(dataset), "--deep", "--dataset", ""]
    if case.train:
        family, name = case.train
        argv += ["--dataset", family, f"--{family}_data", name]
    if case.val:
        argv += ["--val_dataset", case.val[0], "--val_json_name", case.val[1]]
    assert run_doctor(argv) == 1
    report = capsys.readouterr().out
    assert "[BAD]" in report or "[UNUSABLE]" in report
    for fragment in said.train + said.val:
        assert fragment in report, f"{fragment!r} not in the report:\n{report}"


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_evaluation(case: Case, dataset: Path) -> None:
    said = case.corrupt(dataset)
    (entry,) = parse_val_datasets(case.val[0])
    with pytest.raises(DataError) as error:
        validation_set = build_validation_set(dataset, entry, case.val[1])
        for index in range(len(validation_set)):
            validation_set[index]
    assert_clear(error.value, said.val)


# --- Rows whose right outcome is not an error ---
def targets_in_order(conversations: list) -> list[str]:
    """The `[SEG]`/`[REJ]` tokens of a sample's answers, in mask-row order."""
    return [
        token
        for conversation in conversations
        for _, answer in conversation
        for token in TARGET_TOKEN.findall(answer)
    ]


def test_a_grefcoco_no_target_ref_is_rej_with_an_empty_mask_everywhere(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No-target expressions become `[REJ]` targets with all-zero masks in every prompt style
    and in GSVA's validation (never `[SEG]` with an empty mask), and the doctor finds nothing
    wrong with them."""
    for style in PROMPT_STYLES:
        options = SamplingOptions(prompt_style=style)
        (source,) = build_refer_seg_sources(dataset, ["grefcoco"], options)
        rejected = 0
        for seed in range(DRAWS):
            sample = source.sample(np.random.default_rng(seed))
            tokens = targets_in_order(sample.conversations)
            assert len(tokens) == len(sample.masks)
            for token, mask in zip(tokens, sample.masks, strict=True):
                assert mask.any() == (token == SEG), (style, token)
            rejected += tokens.count(REJ)
        assert rejected > 0, style
    (entry,) = parse_val_datasets("grefcoco|unc|val")
    validation_set = build_validation_set(dataset, entry)
    rejected = 0
    for index in range(len(validation_set)):
        sample = validation_set[index]
        tokens = targets_in_order(sample.conversations)
        for token, mask in zip(tokens, sample.masks, strict=True):
            assert mask.any() == (token == SEG), token
        rejected += tokens.count(REJ)
    assert rejected > 0
    argv = ["--dataset_dir", str(dataset), "--deep", "--dataset", "refer_seg"]
    argv += ["--refer_seg_data", "grefcoco", "--val_dataset", "grefcoco|unc|val"]
    assert run_doctor(argv) == 0
    report = capsys.readouterr().out
    assert report.count("0 errors, 0 warnings") == 2, report


def test_a_degenerate_polygon_part_is_left_out_and_reported(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A two-point part beside usable ones is left out of the mask (the COCO tools' policy) and
    reported as a warning by the doctor, so the mask is the union of the usable parts."""
    data = read_json(dataset / PASCAL_JSON)
    annotation = next(a for a in data["annotations"] if isinstance(a["segmentation"], list))
    usable = annotation["segmentation"]
    annotation["segmentation"] = [*usable, [1, 1, 4, 4]]
    (dataset / PASCAL_JSON).write_text(json.dumps(data))
    (report,) = examine_training(dataset, {"sem_seg": ["pascal_part"]}, SamplingOptions(), True)
    assert report.usable and report.errors == []
    (warning,) = report.warnings
    assert f"annotation {annotation['id']}" in str(warning)
    assert f"polygon {len(usable)} has 2 points" in str(warning)
    assert "left out of the mask" in str(warning)
    image = next(i for i in data["images"] if i["id"] == annotation["image_id"])
    shape = (image["height"], image["width"])
    file = dataset / PASCAL_JSON
    with_degenerate = decode_segmentation(annotation["segmentation"], shape, file, "a")
    assert np.array_equal(with_degenerate, decode_segmentation(usable, shape, file, "a"))
    check_training_data(data_config(dataset, "sem_seg", "pascal_part"))
    argv = ["--dataset_dir", str(dataset), "--dataset", "sem_seg", "--sem_seg_data"]
    assert run_doctor([*argv, "pascal_part", "--deep"]) == 0
    assert "1 warnings" in capsys.readouterr().out


# --- Command-line rows ---
def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error `parse_args` exits with (status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_status:
        parse_args(argv)
    assert exit_status.value.code == USAGE_ERROR
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("\n") == 1, error
    return error


def test_an_unknown_dataset_name(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = parse_error(["--dataset", "sem_seg||reasonseg", "--sample_rates", "1,1"], capsys)
    assert "error: --dataset 'sem_seg||reasonseg': unknown family 'reasonseg'" in error
    assert "choose from sem_seg, refer_seg, vqa, reason_seg, multi_part_reason_seg" in error
    assert run_doctor(["--dataset_dir", str(dataset), "--dataset", "reasonseg"]) == 1
    assert "[UNUSABLE] reasonseg: unknown --dataset family 'reasonseg'" in capsys.readouterr().out
    with pytest.raises(DataError) as start:
        check_training_data(data_config(dataset, "reasonseg", "x"))
    assert_clear(start.value, ["[UNUSABLE] reasonseg: unknown --dataset family 'reasonseg'"])


def test_an_unknown_val_dataset_name(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = parse_error(["--val_dataset", "ReasonSeg|val||refcoco|umd|val"], capsys)
    assert "error: --val_dataset entry 'refcoco|umd|val' is not accepted" in error
    assert "refcoco|<unc|google>|<val|testA|testB|test>" in error
    argv = ["--dataset_dir", str(dataset), "--dataset", "", "--val_dataset", "MMR|val"]
    assert run_doctor(argv) == 1
    out = capsys.readouterr().out
    assert "[UNUSABLE] --val_dataset MMR|val: --val_dataset entry 'MMR|val' is not accepted" in out
    with pytest.raises(ValueError) as evaluation:
        build_validation_jobs(dataset, "MMR|val")
    assert_clear(evaluation.value, ["--val_dataset entry 'MMR|val' is not accepted; accepted:"])


def test_sample_rates_that_do_not_match_the_datasets(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = parse_error(["--dataset", "refer_seg||vqa", "--sample_rates", "9,3,3,1"], capsys)
    expected = "--sample_rates has 4 values [9.0, 3.0, 3.0, 1.0] but --dataset names 2 families"
    assert expected in error and "give one rate per family" in error
    assert "is not comma-separated numbers" in parse_error(["--sample_rates", "2,9,x,6"], capsys)
    config = DataConfig(dataset_dir=dataset, dataset=("vqa",), sample_rates=(1, 2))
    with pytest.raises(ValueError) as start:
        build_sources(config)
    assert_clear(start.value, ["--sample_rates has 2 values", "--dataset names 1 families"])


def test_flags_that_a_run_does_not_use_are_not_checked() -> None:
    assert parse_args(["--eval_only", "--dataset", "nothing"]).eval_only
    assert parse_args(["--no_eval", "--val_dataset", "nothing"]).no_eval


# --- Model file rows ---
def write_wrong_sam(kind: str, directory: Path) -> Path:
    """A file (or directory) given as --vision_pretrained that is not an original SAM."""
    path = directory / f"{kind}.pth"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "llava_weights":
        path = path.with_suffix(".safetensors")
        save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(path))
    elif kind == "transformers_layout":
        torch.save({"vision_encoder.pos_embed": torch.zeros(1, 2, 2, 4)}, path)
    elif kind == "code":
        torch.save({"image_encoder.pos_embed": MakesMarker(directory / "code_ran")}, path)
    return path


SAM_CASES = {
    "missing": "does not exist",
    "directory": "is a directory",
    "text": "not a readable PyTorch or safetensors checkpoint",
    "empty": "not a readable PyTorch or safetensors checkpoint",
    "llava_weights": (
        "not a SAM or SAM 2 checkpoint (original layout): missing keys ['image_encoder."
    ),
    "transformers_layout": "not a SAM or SAM 2 checkpoint (original layout)",
    "code": "refusing to load: it holds Python objects that only code could rebuild",
}


@pytest.mark.parametrize(("kind", "expected"), SAM_CASES.items(), ids=list(SAM_CASES))
def test_a_sam_checkpoint_of_the_wrong_kind(kind: str, expected: str, tmp_path: Path) -> None:
    path = write_wrong_sam(kind, tmp_path)
    with pytest.raises((ValueError, OSError)) as error:
        load_mask_model(path)
    assert_clear(error.value, [str(path), expected, "sam_vit_h_4b8939.pth"])
    assert not (tmp_path / "code_ran").exists()


def test_a_wrong_sam_checkpoint_stops_the_model_build(tiny_dir: Path, tmp_path: Path) -> None:
    config = replace(tiny_model_config(tiny_dir), vision_pretrained=str(tmp_path / "sam.pth"))
    (tmp_path / "sam.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError) as error:
        build_segmenter(config)
    assert_clear(error.value, ["sam.pth", "not a readable PyTorch or safetensors checkpoint"])


VERSION_CASES = {
    "missing": ("is not a directory", "Nothing is downloaded"),
    "empty": ("no config.json",),
    "config only": ("no weights (*.safetensors or pytorch_model*.bin)", "randomly initialised"),
}


@pytest.mark.parametrize(("kind", "expected"), VERSION_CASES.items(), ids=list(VERSION_CASES))
def test_a_version_directory_without_weights(
    kind: str, expected: tuple[str, ...], tmp_path: Path
) -> None:
    directory = tmp_path / "llava"
    if kind != "missing":
        directory.mkdir()
    if kind == "config only":
        (directory / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        load_llava(directory, torch.float32)
    assert_clear(error.value, [str(directory), *expected])


# --- Run time: --skip_bad_samples ---
def test_skip_bad_samples_skips_and_counts_what_only_reading_finds(dataset: Path) -> None:
    """A truncated image passes the start check; reading it fails with its message, unless
    --skip_bad_samples, which draws another record (deterministically) and counts the skip."""
    said = truncated_image_mmr(dataset)
    config = data_config(dataset, *MMR_TRAIN)
    with pytest.raises(DataError) as error:
        read_as_training_does(config)
    assert_clear(error.value, said.train)
    items = read_as_training_does(config, skip_bad_samples=True)
    truncated = {name for name in said.train if name.endswith(".jpg")}
    assert not any(Path(item.image_path).name in truncated for item in items)
    counts = Counter()
    for item in items:
        counts.update(skipped_samples(item))
    assert set(counts) == {"multi_part_reason_seg/MMR"} and counts["multi_part_reason_seg/MMR"] > 0
    again = read_as_training_does(config, skip_bad_samples=True)
    assert [item.image_path for item in again] == [item.image_path for item in items]
    assert [skipped_samples(item) for item in again] == [skipped_samples(item) for item in items]
    # train_ds.py's command line reaches the mixer
    flags = [f"--dataset_dir={dataset}", "--dataset=multi_part_reason_seg", "--sample_rates=1"]
    flags += ["--multi_part_reason_seg_data=MMR_train.json", "--skip_bad_samples"]
    mix = training_dataset(parse_args([*flags, "--steps_per_epoch=4"]), None, world=1)
    assert mix.skip_bad_samples and all(skipped_samples(mix[i]) is not None for i in range(4))
    assert not training_dataset(parse_args(flags[:-1]), None, world=1).skip_bad_samples


def test_a_bad_record_met_in_a_loader_worker_keeps_its_type_and_message(dataset: Path) -> None:
    """PyTorch re-raises a worker's exception in the main process by its type when it can be
    built from one message: train_ds.py's loader workers (--workers 4) so report a DataError."""
    said = truncated_image_mmr(dataset)
    config = data_config(dataset, *MMR_TRAIN)
    mix = HybridDataset(build_sources(config), config.sample_rates, DRAWS)
    loader = DataLoader(mix, batch_size=DRAWS, num_workers=1, collate_fn=list)
    with pytest.raises(DataError) as error:
        next(iter(loader))
    for fragment in said.train:
        assert fragment in str(error.value)
