"""The LaSagnA recipe's whole cycle under the real launcher: `--recipe lasagna` (its mix, its
`<ins>`/`<no_ins>` vocabulary) trains on two CPU ranks with in-training validation on
`ade20k|val` (class sequences generated and scored as semantic segmentation: mIoU, pixel
accuracy and the per-class table printed and written), the merge keeps the vocabulary,
`--eval_only` on the merged checkpoint reproduces the in-training figures, and `chat.py`
answers in LaSagnA's tokens (the merged checkpoint's LM head rigged to write `<ins> <no_ins>`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.e2e import LAUNCHER_PORT, python, run
from tests.helpers import rig_merged_checkpoint
from utils.datasets.semantic_val import NUM_CLASSES

SEED, STEPS, WORLD = 42, 4, 2
VAL_SET = "ade20k|val"
NEW_TOKENS = 12  # generated per validation image: enough for a few class items, quick on CPU
QUESTION = "What is the red circle in this image? Please output segmentation mask."


def flags(assets: Path, runs: Path, exp_name: str) -> list[str]:
    return [
        "--recipe=lasagna",
        f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={runs}",
        f"--exp_name={exp_name}",
        "--precision=fp32",
        "--lora_r=4",
        "--workers=0",
        "--no-gradient_checkpointing",
        f"--val_dataset={VAL_SET}",
        f"--max_new_tokens={NEW_TOKENS}",
        f"--seed={SEED}",
    ]


def test_lasagna_trains_validates_on_ade20k_merges_evaluates_and_chats(
    assets: Path, tmp_path: Path
) -> None:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    launcher = [str(deepspeed), "--num_gpus", str(WORLD), "--master_port", str(LAUNCHER_PORT + 4)]
    train = [
        f"--version={assets / 'llava_tiny'}",
        "--batch_size=1",
        "--grad_accumulation_steps=1",
        "--epochs=1",
        f"--steps_per_epoch={STEPS}",
        "--lr=0.001",
    ]
    result = run([*launcher, "train_ds.py", *train, *flags(assets, tmp_path, "lasagna")], 900)
    run_dir = tmp_path / "lasagna"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["recipe"], config["vocabulary"]) == ("lasagna", "lasagna")
    assert config["dataset"].split("||")[0] == "lasagna_sem_seg"
    in_training = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["results"]
    summary = in_training[VAL_SET]
    assert {"miou", "pixel_accuracy", "unmatched_names"} <= set(summary)
    written = json.loads((run_dir / "eval_ade20k_val.json").read_text())
    per_class = written["per_class_iou"]
    assert len(per_class) == NUM_CLASSES["ade20k"]
    scored = [iou for iou in per_class.values() if iou is not None and not math.isnan(iou)]
    if scored:  # mIoU is the mean over the classes in the ground truth or the prediction
        assert summary["miou"] == pytest.approx(sum(scored) / len(scored), abs=1e-6)
    table = result.stdout + result.stderr + (run_dir / "train_ds.log").read_text()
    assert "wall" in table and "mIoU" in table  # the per-class table, class 0 of ADE20K

    merged = tmp_path / "lasagna-merged"
    python(
        "merge_lora_weights_and_save_hf_model.py",
        f"--version={assets / 'llava_tiny'}",
        f"--weight={run_dir / 'ckpt_model'}",
        f"--save_path={merged}",
    )
    saved = json.loads((merged / "segmenter_config.json").read_text())
    assert saved["vocabulary"] == "lasagna"

    python("train_ds.py", f"--version={merged}", "--eval_only", *flags(assets, tmp_path, "eval"))
    evaluated = json.loads((tmp_path / "eval" / "eval_ade20k_val.json").read_text())
    for metric, value in summary.items():
        expected = pytest.approx(value, abs=1e-5) if value is not None else None
        assert evaluated["summary"][metric] == expected, metric
    records = (tmp_path / "eval" / "eval_ade20k_val.jsonl").read_text().splitlines()
    assert records and all("texts" in json.loads(line) for line in records)

    image = sorted((assets / "dataset" / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))[0]
    rigged = rig_merged_checkpoint(merged, image, QUESTION, ["seg", "rej", "eos"], tmp_path / "r")
    chat = python(
        "chat.py",
        f"--version={rigged}",
        "--precision=fp32",
        f"--image={image}",
        f"--prompt={QUESTION}",
        f"--vis_save_path={tmp_path / 'vis'}",
    )
    assert "<ins><no_ins>" in chat.stdout.replace(" ", "")
    assert (tmp_path / "vis" / f"000_{image.stem}_mask_0.png").is_file()
