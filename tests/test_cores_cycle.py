"""The CoReS recipe's whole cycle under the real launcher: `--recipe cores` trains with ZeRO-3 on
two CPU ranks through steps where one rank's batch holds a chained answer ("... [SEG_SEMA]. It
is [SEG].") and the other's only a VQA dialogue (no chain token, no `[SEG]`) - the mask decoder
must still run twice on both ranks or ZeRO-3 waits forever -, the merge keeps the chain token
and the CoReS template, `--eval_only` on the merged checkpoint reproduces the in-training
ReasonSeg validation and writes each target's `[SEG_SEMA]` mask to the JSONL, and `chat.py`
draws both masks of a chained answer (the merged checkpoint's LM head rigged to write one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.e2e import LAUNCHER_PORT, python, run
from tests.helpers import rig_merged_checkpoint
from utils.datasets.mixer import check_rates
from utils.inference import Segmentation

FAMILIES, RATES = ("vqa", "reason_seg"), (1.0, 1.0)
SEED, STEPS, WORLD = 42, 4, 2
CHAIN = "[SEG_SEMA]"
QUESTION = "What is the red circle in this image? Please output segmentation mask."


def family_of_item(index: int, epoch: int = 0) -> str:
    """The family HybridDataset draws for item `index` (its first draw from the item's
    generator, `utils.datasets.mixer.HybridDataset.draws`)."""
    rng = np.random.default_rng([SEED, epoch, index])
    return FAMILIES[int(rng.choice(len(FAMILIES), p=check_rates(FAMILIES, RATES)))]


def flags(assets: Path, runs: Path, exp_name: str) -> list[str]:
    return [
        f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={runs}",
        f"--exp_name={exp_name}",
        "--precision=fp32",
        "--lora_r=4",
        "--workers=0",
        "--no-gradient_checkpointing",
        "--val_dataset=ReasonSeg|val",
        f"--seed={SEED}",
    ]


def test_cores_trains_under_zero3_merges_evaluates_and_chats(assets: Path, tmp_path: Path) -> None:
    # batch size 1: step s gives rank 0 item 2s and rank 1 item 2s + 1 (ShardSampler)
    steps = [(family_of_item(WORLD * s), family_of_item(WORLD * s + 1)) for s in range(STEPS)]
    assert any(set(pair) == set(FAMILIES) for pair in steps), steps
    deepspeed = Path(sys.executable).parent / "deepspeed"
    launcher = [str(deepspeed), "--num_gpus", str(WORLD), "--master_port", str(LAUNCHER_PORT + 3)]
    train = [
        "--recipe=cores",
        f"--version={assets / 'llava_tiny'}",
        f"--dataset={'||'.join(FAMILIES)}",
        f"--sample_rates={','.join(str(int(rate)) for rate in RATES)}",
        "--zero_stage=3",
        "--batch_size=1",
        "--grad_accumulation_steps=1",
        "--epochs=1",
        f"--steps_per_epoch={STEPS}",
        "--lr=0.001",
    ]
    run([*launcher, "train_ds.py", *train, *flags(assets, tmp_path, "cores")], 900)
    run_dir = tmp_path / "cores"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["recipe"], config["chain_token"], config["prompt_style"]) == (
        "cores",
        CHAIN,
        "cores",
    )
    in_training = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["results"]

    merged = tmp_path / "cores-merged"
    python(
        "merge_lora_weights_and_save_hf_model.py",
        f"--version={assets / 'llava_tiny'}",
        f"--weight={run_dir / 'ckpt_model'}",
        f"--save_path={merged}",
    )
    saved = json.loads((merged / "segmenter_config.json").read_text())
    assert saved["conv_type"] == config["conv_type"] and saved["token_ids"]["chain"] is not None

    evaluation = ["--recipe=cores", f"--version={merged}", "--eval_only"]
    python("train_ds.py", *evaluation, *flags(assets, tmp_path, "eval"))
    evaluated = json.loads((tmp_path / "eval" / "eval_ReasonSeg_val.json").read_text())
    for metric, value in in_training["ReasonSeg|val"].items():
        expected = pytest.approx(value, abs=1e-5) if value is not None else None
        assert evaluated["summary"][metric] == expected, metric
    records = [
        json.loads(line)
        for line in (tmp_path / "eval" / "eval_ReasonSeg_val.jsonl").read_text().splitlines()
    ]
    assert records and all("coarse_mask" in record for record in records)
    for record in records:  # the RLE reads back with pycocotools, at the image's size
        rle = {**record["coarse_mask"], "counts": record["coarse_mask"]["counts"].encode()}
        decoded = mask_utils.decode(rle)
        assert decoded.shape == tuple(record["coarse_mask"]["size"])
        assert record["coarse_iou"] is None or 0.0 <= record["coarse_iou"] <= 1.0

    image = sorted((assets / "dataset" / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))[0]
    rigged = rig_merged_checkpoint(
        merged, image, QUESTION, ["chain", "seg", "eos"], tmp_path / "rigged"
    )
    vis = tmp_path / "vis"
    result = python(
        "chat.py",
        f"--version={rigged}",
        "--precision=fp32",
        f"--image={image}",
        f"--prompt={QUESTION}",
        f"--vis_save_path={vis}",
    )
    assert "prompted by the coarse mask of its chain token" in result.stdout
    expected = Segmentation.load(str(rigged), precision="fp32", device="cpu").answer(
        [(image, QUESTION)]
    )[0]
    assert expected.text.count(CHAIN) == 1 and len(expected.targets) == 1
    target = expected.targets[0]
    assert target.present and target.coarse is not None
    stem = f"000_{image.stem}"
    for name, mask in (("mask", target.mask), ("coarse_mask", target.coarse)):
        written = cv2.imread(str(vis / f"{stem}_{name}_0.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(written > 0, mask), name
    original = cv2.imread(str(image))
    coarse_overlay = cv2.imread(str(vis / f"{stem}_coarse_overlay_0.png"))
    assert coarse_overlay.shape == original.shape

    # generative evaluation of the rigged model on ReasonSeg's short-query test split: each
    # generated chain's coarse mask lands in the JSONL beside the [SEG] mask it prompted
    generate = ["--recipe=cores", f"--version={rigged}", "--eval_only", "--eval_protocol=generate"]
    python(
        "train_ds.py",
        *generate,
        *flags(assets, tmp_path, "generated"),
        "--val_dataset=ReasonSeg|test_short",
        "--max_new_tokens=4",
    )
    (summary_path,) = (tmp_path / "generated").glob("eval_*_generate.json")
    generated = json.loads(summary_path.read_text())
    assert generated["name"] == "ReasonSeg|test_short (generate)"
    assert generated["summary"]["missing_targets"] == 0  # the rigged answer generalises
    lines = summary_path.with_suffix(".jsonl").read_text().splitlines()
    assert len(lines) == generated["records"] > 0
    assert all("coarse_mask" in json.loads(line) for line in lines)
