"""The cycle after training, end to end on the tiny assets: a run of the real launcher on two
CPU ranks is merged (from its ZeRO directory and from zero_to_fp32.py's output), the merged
checkpoint evaluates and segments exactly like the unmerged model, chat.py answers (single,
batch, interactive) with mask and overlay PNGs, and --eval_protocol generate reports its
matching counts."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.builder import ModelConfig, build_segmenter
from tests.e2e import ROOT, consolidate, python
from tests.helpers import rig_merged_checkpoint
from utils.collate import collate
from utils.evaluation import build_validation_jobs, evaluate
from utils.inference import Segmentation
from utils.weights import load_weights

EVAL_SETS = "grefcoco|unc|val||MultiPartReasonSeg|val"
QUESTION = "Please segment the red circle in this image."
OTHER_QUESTION = "What is the blue square? Please output segmentation mask."


def eval_flags(assets: Path, runs: Path, exp_name: str) -> list[str]:
    return [
        f"--dataset_dir={assets / 'dataset'}",
        f"--log_base_dir={runs}",
        f"--exp_name={exp_name}",
        f"--val_dataset={EVAL_SETS}",
        "--val_json_name=MMR_val.json",
        "--precision=fp32",
        "--out_dim=32",
        "--workers=0",
        "--eval_only",
    ]


@pytest.fixture(scope="module")
def merged(assets, launched_run, tmp_path_factory) -> Path:
    """The README merge line on the run's ZeRO directory (no zero_to_fp32.py step)."""
    save_path = tmp_path_factory.mktemp("merged") / "M2SA-7B"
    python(
        "merge_lora_weights_and_save_hf_model.py",
        f"--version={assets / 'llava_tiny'}",
        f"--weight={launched_run / 'ckpt_model'}",
        f"--save_path={save_path}",
    )
    return save_path


def test_zero_to_fp32_output_merges_to_the_same_weights(launched_run, merged, tmp_path) -> None:
    checkpoint = launched_run / "ckpt_model"
    consolidated = tmp_path / "pytorch_model"
    consolidate(checkpoint, consolidated)
    assert any(consolidated.iterdir())
    again = tmp_path / "again"
    python(
        "merge_lora_weights_and_save_hf_model.py",
        f"--weight={consolidated}",
        f"--save_path={again}",
        f"--run_config={launched_run / 'config.json'}",
    )
    for name in ("model.safetensors", "segmenter.safetensors"):
        first, second = load_file(merged / name), load_file(again / name)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), (name, key)


def summaries(run_dir: Path) -> dict[str, dict]:
    return {
        json.loads(path.read_text())["name"]: json.loads(path.read_text())["summary"]
        for path in run_dir.glob("eval_*.json")
    }


def test_eval_only_on_the_merged_checkpoint_equals_the_unmerged_model(
    assets, launched_run, merged, tmp_path
) -> None:
    python("train_ds.py", f"--version={merged}", *eval_flags(assets, tmp_path, "merged"))
    python(
        "train_ds.py",
        f"--version={assets / 'llava_tiny'}",
        f"--vision_pretrained={assets / 'vision_pretrained' / 'sam_tiny.pth'}",
        "--lora_r=4",
        f"--weight={launched_run / 'ckpt_model'}",
        *eval_flags(assets, tmp_path, "unmerged"),
    )
    from_merged, from_weight = summaries(tmp_path / "merged"), summaries(tmp_path / "unmerged")
    assert from_merged.keys() == from_weight.keys() and len(from_merged) == 2
    for name, summary in from_merged.items():
        for metric, value in summary.items():
            expected = from_weight[name][metric]
            assert value == pytest.approx(expected, abs=1e-6), (name, metric)


def test_merged_masks_equal_the_unmerged_masks_on_the_same_inputs(
    assets, launched_run, merged
) -> None:
    base = ModelConfig(
        version=str(assets / "llava_tiny"),
        vision_pretrained=str(assets / "vision_pretrained" / "sam_tiny.pth"),
        precision="fp32",
        out_dim=32,
        lora_r=4,
        gradient_checkpointing=False,
        early_fusion=True,  # the launched run follows the default m2sa recipe
    )
    unmerged, tokenizer = build_segmenter(base)
    load_weights(unmerged, launched_run / "ckpt_model")
    merged_model, _ = build_segmenter(replace(base, version=str(merged), lora_r=0))
    from utils.collate import SampleProcessor

    processor = SampleProcessor.for_model(unmerged, tokenizer, base.version)
    job = build_validation_jobs(assets / "dataset", "MultiPartReasonSeg|val", "MMR_val.json")[0]
    batch = collate([processor(job.dataset[index]) for index in range(3)], tokenizer.pad_token_id)
    with torch.no_grad():
        first, second = unmerged.eval()(batch), merged_model.eval()(batch)
    assert sum(len(masks) for masks in first.pred_masks) > 0
    for a, b in zip(first.pred_masks, second.pred_masks, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def first_image(assets: Path, split: str = "val") -> Path:
    return sorted((assets / "dataset" / "reason_seg" / "ReasonSeg" / split).glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def rigged(assets, merged, tmp_path_factory) -> tuple[Path, Path]:
    """The merged checkpoint with its LM head edited so that QUESTION on first_image gets the
    answer `[SEG] [REJ] </s>`; returns (checkpoint, image)."""
    image = first_image(assets)
    directory = rig_merged_checkpoint(
        merged, image, QUESTION, ["seg", "rej", "eos"], tmp_path_factory.mktemp("rigged") / "ckpt"
    )
    return directory, image


def read_mask(path: str) -> np.ndarray:
    return cv2.imread(path, cv2.IMREAD_GRAYSCALE)


def test_chat_answers_with_a_mask_an_overlay_and_a_rejection(rigged, tmp_path) -> None:
    checkpoint, image = rigged
    vis = tmp_path / "vis"
    result = python(
        "chat.py",
        f"--version={checkpoint}",
        "--precision=fp32",
        f"--image={image}",
        f"--prompt={QUESTION}",
        f"--vis_save_path={vis}",
    )
    assert "[SEG] 0: mask of" in result.stdout and "[REJ] 1: not present" in result.stdout
    mask = read_mask(str(vis / f"000_{image.stem}_mask_0.png"))
    overlay = cv2.imread(str(vis / f"000_{image.stem}_overlay_0.png"))
    original = cv2.imread(str(image))
    assert mask.shape == original.shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == original.shape and not np.array_equal(overlay, original)
    expected = Segmentation.load(str(checkpoint), precision="fp32", device="cpu").answer(
        [(image, QUESTION)]
    )[0]
    assert np.array_equal(mask > 0, expected.targets[0].mask)
    assert not list(vis.glob("*_mask_1.png"))  # the [REJ] has no mask


def test_batch_mode_answers_each_line_as_a_single_request_would(assets, rigged, tmp_path) -> None:
    checkpoint, image = rigged
    other = first_image(assets, "train")
    requests = [(image, QUESTION), (other, OTHER_QUESTION), (image, QUESTION)]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        "".join(json.dumps({"image": str(i), "prompt": p}) + "\n" for i, p in requests)
    )
    output = tmp_path / "out.jsonl"
    python(
        "chat.py",
        f"--version={checkpoint}",
        "--precision=fp32",
        f"--input_jsonl={inputs}",
        f"--output_jsonl={output}",
        "--batch_size=2",
        f"--vis_save_path={tmp_path / 'vis'}",
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["image"] for r in records] == [str(i) for i, _ in requests]
    first, _, third = records
    assert [t["present"] for t in first["targets"]] == [True, False]
    assert first["text"] == third["text"]  # batched with another prompt, and alone-ish
    assert first["targets"][0]["score"] == pytest.approx(third["targets"][0]["score"], abs=1e-5)
    assert np.array_equal(
        read_mask(first["targets"][0]["mask"]), read_mask(third["targets"][0]["mask"])
    )
    single = Segmentation.load(str(checkpoint), precision="fp32", device="cpu")
    answer = single.answer([requests[1]], max_new_tokens=512)[0]
    assert records[1]["text"] == answer.text


def test_interactive_chat_reads_prompt_and_image_until_an_empty_prompt(rigged) -> None:
    checkpoint, image = rigged
    result = subprocess.run(
        [
            sys.executable,
            "chat.py",
            f"--version={checkpoint}",
            "--precision=fp32",
            f"--vis_save_path={checkpoint}/vis",
        ],
        cwd=ROOT,
        input=f"{QUESTION}\n{image}\n\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Please input your prompt:" in result.stdout and "[REJ] 1: not present" in result.stdout


def test_generate_protocol_reports_matching_counts_beside_teacher_forcing(
    assets, rigged, tmp_path
) -> None:
    checkpoint, _ = rigged
    flags = eval_flags(assets, tmp_path, "gen")
    python(
        "train_ds.py",
        f"--version={checkpoint}",
        *flags,
        "--eval_protocol=generate",
        "--max_new_tokens=6",
    )
    results = summaries(tmp_path / "gen")
    assert set(results) == {
        "grefcoco|unc|val (generate)",
        "MultiPartReasonSeg|val:MMR_val.json (generate)",
    }
    for summary in results.values():
        assert {"missing_targets", "extra_targets", "answers"} <= set(summary)
        assert 0 <= summary["missing_targets"] <= summary["targets"]
    grefcoco = json.loads((tmp_path / "gen" / "eval_grefcoco_unc_val_generate.json").read_text())
    assert grefcoco["summary"]["answers"] == grefcoco["samples"]  # one question per image
    files = {path.name for path in (tmp_path / "gen").glob("eval_*")}
    assert "eval_grefcoco_unc_val_generate.json" in files
    # the same evaluation in-process, with a direct check of the counts' meaning
    segmentation = Segmentation.load(str(checkpoint), precision="fp32", device="cpu")
    from utils.collate import SampleProcessor

    processor = SampleProcessor.for_model(
        segmentation.model, segmentation.tokenizer, str(checkpoint)
    )
    job = build_validation_jobs(assets / "dataset", "grefcoco|unc|val")[0]
    result = evaluate(
        segmentation.model,
        job,
        processor,
        device="cpu",
        dtype=torch.float32,
        rank=0,
        world_size=1,
        protocol="generate",
        max_new_tokens=6,
    )
    assert result.summary["targets"] == len(result.records)
    assert result.summary == pytest.approx(results["grefcoco|unc|val (generate)"])
