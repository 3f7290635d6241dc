"""The Qwen-VL backbones' whole cycle under the real launcher: `--version` is a tiny Qwen2.5-VL
directory with SAM 2 (Qwen3-VL with SAM in the slow tier) in their released formats (the
Hugging Face directory, the original `sam2.1_hiera_*.pt` / `sam_vit_*.pth`). Two CPU ranks train
with ZeRO-2 (ZeRO-3 for Qwen3-VL) on images of different sizes, so different image-token
counts per conversation; a second launch resumes the run from its checkpoint for another
epoch, `zero_to_fp32.py` consolidates it, the merge writes a directory that plain
transformers loads with the family's own class and the logits of the trained model,
`--eval_only` on it reproduces the in-training validation (with the run's `--max_pixels` and
template, which the merged directory keeps) and scores a semantic set from generated class
sequences, and `chat.py` answers as the Python API does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from model.backbone import directory_family
from model.builder import build_segmenter
from model.tiny import TINY_BACKBONES, TINY_SEGMENTERS, tiny_model_config
from tests.e2e import LAUNCHER_PORT, consolidate, python, run, scalars
from utils.inference import Segmentation
from utils.preprocess import PatchTransform
from utils.weights import load_weights

WORLD, STEPS = 2, 2
MAX_PIXELS = 6272  # below the tiny directories' budgets: the run's own, kept by the merge
QUESTION = "Can you segment the red circle in this image?"


def flags(
    assets: Path, version: Path, runs: Path, exp_name: str, vision: Path | None = None
) -> list[str]:
    """`vision`: the --vision_pretrained of a base --version; None for a merged one."""
    return [
        f"--version={version}",
        f"--conv_type={directory_family(version).conv_type}",
        *([] if vision is None else [f"--vision_pretrained={vision}"]),
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={runs}",
        f"--exp_name={exp_name}",
        "--precision=fp32",
        "--out_dim=32",
        "--lora_r=4",
        "--workers=0",
        "--no-gradient_checkpointing",
        "--val_dataset=ReasonSeg|val",
    ]


def train_flags(epochs: int, zero_stage: int) -> list[str]:
    return [
        "--dataset=refer_seg||vqa||multi_part_reason_seg",
        "--sample_rates=2,1,2",
        "--batch_size=2",
        "--grad_accumulation_steps=1",
        f"--epochs={epochs}",
        f"--steps_per_epoch={STEPS}",
        "--lr=0.001",
        f"--zero_stage={zero_stage}",
        f"--max_pixels={MAX_PIXELS}",
        "--packing",  # validation packs too; --eval_only below pads
    ]


def newest_event_file(run_dir: Path) -> Path:
    return max(run_dir.glob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime_ns)


@pytest.mark.parametrize(
    ("backbone", "segmenter", "zero_stage"),
    [("qwen2_5_vl", "sam2", 2), pytest.param("qwen3_vl", "sam", 3, marks=pytest.mark.slow)],
)
def test_qwen_vl_trains_resumes_merges_evaluates_and_chats(
    backbone: str, segmenter: str, zero_stage: int, assets: Path, tmp_path: Path
) -> None:
    version = TINY_BACKBONES[backbone](tmp_path / f"{backbone}_tiny", 0)
    file_name, write_segmenter = TINY_SEGMENTERS[segmenter]
    sam = write_segmenter(tmp_path / "vision_pretrained" / file_name, 0)
    deepspeed = Path(sys.executable).parent / "deepspeed"
    launcher = [str(deepspeed), "--num_gpus", str(WORLD), "--master_port", str(LAUNCHER_PORT + 5)]
    # M2SA's fusion (the default recipe's) reads a SAM ViT block, which SAM 2 has not
    fusion = segmenter == "sam"
    fusion_flag = "--early_fusion" if fusion else "--no-early_fusion"
    common = [*flags(assets, version, tmp_path, "qwen", sam), fusion_flag]
    run([*launcher, "train_ds.py", *common, *train_flags(1, zero_stage), "--no_eval"], 900)
    run_dir, checkpoint = tmp_path / "qwen", tmp_path / "qwen" / "ckpt_model"
    assert (checkpoint / "latest").read_text().strip() == f"global_step{STEPS}"
    # a second launch with one more epoch resumes from the checkpoint, and validates
    run([*launcher, "train_ds.py", *common, *train_flags(2, zero_stage)], 900)
    assert (checkpoint / "latest").read_text().strip() == f"global_step{2 * STEPS}"
    resumed = scalars(newest_event_file(run_dir), "train/loss")
    assert [step for step, _ in resumed] == [STEPS + 1, 2 * STEPS]
    in_training = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["results"]

    consolidated = tmp_path / "pytorch_model"
    consolidate(checkpoint, consolidated)
    merged = tmp_path / "qwen-merged"
    python(
        "merge_lora_weights_and_save_hf_model.py",
        f"--version={version}",
        f"--weight={consolidated}",
        f"--save_path={merged}",
        f"--run_config={run_dir / 'config.json'}",
    )
    image_settings = merged / "preprocessor_config.json"
    budget = PatchTransform.from_settings(json.loads(image_settings.read_text()), image_settings)
    assert budget.max_pixels == MAX_PIXELS
    saved = json.loads((merged / "segmenter_config.json").read_text())
    assert saved["conv_type"] == directory_family(version).conv_type

    # plain transformers loads the merged LLM with the trained (LoRA) model's logits
    config = tiny_model_config(tmp_path, backbone, segmenter, out_dim=32, early_fusion=fusion)
    trained, _ = build_segmenter(config)
    load_weights(trained, str(consolidated))
    plain = directory_family(version).model_class.from_pretrained(merged).eval()
    assert type(plain).__name__.startswith("Qwen")
    ids = torch.tensor([[5, 17, 42, 99, 7, trained.token_ids.seg]])
    with torch.no_grad():
        expected = trained.eval().llava(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

    # no --conv_type: the default recipe's llava_v1 gives way to the merged checkpoint's own;
    # a semantic set too (generated class sequences: always the generative protocol)
    no_template = [
        flag for flag in flags(assets, merged, tmp_path, "eval") if "conv_type" not in flag
    ]
    python("train_ds.py", *no_template, "--eval_only", "--val_dataset=ReasonSeg|val||ade20k|val")
    assert json.loads((tmp_path / "eval" / "config.json").read_text())["conv_type"] == (
        directory_family(version).conv_type
    )
    evaluated = json.loads((tmp_path / "eval" / "eval_ReasonSeg_val.json").read_text())
    for metric, value in in_training["ReasonSeg|val"].items():
        expected_value = pytest.approx(value, abs=1e-5) if value is not None else None
        assert evaluated["summary"][metric] == expected_value, metric
    semantic = json.loads((tmp_path / "eval" / "eval_ade20k_val.json").read_text())
    assert semantic["name"] == "ade20k|val" and "miou" in semantic["summary"]

    image = sorted((assets / "dataset" / "reason_seg" / "ReasonSeg" / "val").glob("*.jpg"))[0]
    answer = python(
        "chat.py",
        f"--version={merged}",
        "--precision=fp32",
        f"--image={image}",
        f"--prompt={QUESTION}",
        "--max_new_tokens=6",
        f"--vis_save_path={tmp_path / 'vis'}",
    ).stdout
    expected_answer = Segmentation.load(str(merged), precision="fp32", device="cpu").answer(
        [(image, QUESTION)], max_new_tokens=6
    )[0]
    assert expected_answer.text.strip() and expected_answer.text.strip() in answer
