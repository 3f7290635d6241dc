"""Your own data through the real launcher: the hand-written files of tests/data/custom (the
format of docs/CUSTOM_DATA.md) train the tiny model on two CPU ranks for a few steps with
`--dataset custom` (two files with their own weights), validate on `custom|<file>` every
epoch, and `--eval_only` evaluates the run's checkpoint on it with both protocols."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.e2e import LAUNCHER_PORT, SHORT_RUN_FLAGS, python, run
from utils.evaluation import safe_name

DATA = Path(__file__).resolve().parent / "data"
TRAIN = "custom/train.jsonl@custom/images:3||custom/val.json@custom/images:1"
VAL_SET = "custom|custom/val.json@custom/images"
VAL_TARGETS = 3  # the red square, the blue square, the unicorn
RUN_FLAGS = (
    f"--dataset_dir={DATA}",
    "--dataset=custom",
    "--sample_rates=1",
    f"--custom_data={TRAIN}",
    f"--val_dataset={VAL_SET}",
    *SHORT_RUN_FLAGS,
)


def test_custom_data_trains_and_evaluates(assets: Path, tmp_path: Path) -> None:
    model = [
        f"--version={assets / 'llava_tiny'}",
        f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
    ]
    deepspeed = Path(sys.executable).parent / "deepspeed"
    launcher = [str(deepspeed), "--num_gpus", "2", "--master_port", str(LAUNCHER_PORT + 3)]
    out = [f"--log_base_dir={tmp_path}", "--exp_name=mine"]
    run([*launcher, "train_ds.py", *model, *RUN_FLAGS, *out], 900)
    run_dir = tmp_path / "mine"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "custom" and config["custom_data"] == TRAIN
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["results"]
    assert list(last) == [VAL_SET]
    assert last[VAL_SET]["targets"] == VAL_TARGETS
    assert 0.0 <= last[VAL_SET]["giou"] <= 1.0

    evaluation = [*model, *RUN_FLAGS, f"--weight={run_dir / 'ckpt_model'}", "--eval_only"]
    for protocol, suffix in (("teacher_forced", ""), ("generate", " (generate)")):
        flags = [*evaluation, f"--eval_protocol={protocol}", "--max_new_tokens=8"]
        python("train_ds.py", *flags, f"--log_base_dir={tmp_path}", f"--exp_name={protocol}")
        summary_file = tmp_path / protocol / f"eval_{safe_name(VAL_SET + suffix)}.json"
        result = json.loads(summary_file.read_text())
        assert result["records"] == VAL_TARGETS and result["samples"] == 2
    teacher_forced = json.loads(
        (tmp_path / "teacher_forced" / f"eval_{safe_name(VAL_SET)}.json").read_text()
    )["summary"]
    assert teacher_forced["giou"] == pytest.approx(last[VAL_SET]["giou"], abs=1e-5)


def test_show_samples_previews_custom_data(tmp_path: Path) -> None:
    """tools/show_samples.py draws the custom files as training does: JSON records with the
    text as written and one mask per target, and a picture per item."""
    from tools.show_samples import main

    out = tmp_path / "samples.json"
    flags = [f"--dataset_dir={DATA}", "--dataset=custom", "--sample_rates=1"]
    flags += [f"--custom_data={TRAIN}", "--num_samples=4", f"--json={out}"]
    assert main([*flags, f"--vis={tmp_path / 'vis'}"]) == 0
    records = json.loads(out.read_text())
    assert {record["source"].split("@")[0] for record in records} <= {
        "custom/custom/train.jsonl",
        "custom/custom/val.json",
    }
    for record in records:
        targets = sum(r["num_seg"] + r["num_rej"] for r in record["conversations"])
        assert record["num_masks"] == targets > 0
        assert all("{seg}" not in r["answer"] for r in record["conversations"])
    assert len(list((tmp_path / "vis").glob("sample_*.png"))) == len(records) == 4
