"""train_ds.py end to end on the tiny assets: a one-process run and its outputs, --eval_only
on the checkpoint reproducing the in-training validation (the run trains and validates with
`--packing`, the evaluation pads: the two passes agree), a run killed after its first
checkpoint resuming with the same losses, and the real DeepSpeed launcher on two CPU ranks with
the MMR README's flags (ZeRO-2; ZeRO-3 in the slow tier)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import ROOT, launch_two_ranks, run, scalars, tiny_flags

KILL_DEADLINE_S = 300
POLL_S = 0.05


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    flags = tiny_flags(assets, runs, "tiny") + [
        "--dataset=sem_seg||refer_seg||vqa||reason_seg||multi_part_reason_seg",
        "--sample_rates=1,3,1,1,3",
        "--batch_size=2",
        "--grad_accumulation_steps=2",
        "--epochs=2",
        "--steps_per_epoch=3",
        "--eval_steps=2",
        "--packing",
    ]
    run([sys.executable, "train_ds.py", *flags])
    return runs / "tiny"


def test_one_process_run_writes_every_output(trained: Path) -> None:
    for name in ("config.json", "token_ids.json", "versions.json", "tokenizer/tokenizer.json"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["steps_per_epoch"] == 3 and config["lora_r"] == 4 and config["packing"]
    checkpoint = trained / "ckpt_model"
    assert (checkpoint / "latest").read_text().strip() == "global_step6"
    assert (checkpoint / "zero_to_fp32.py").is_file() and (checkpoint / "global_step6").is_dir()
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    # --eval_steps 2 validates at steps 2 and 4; epoch ends (3, 6) validate anyway
    assert [json.loads(line)["global_step"] for line in lines] == [2, 3, 4, 6]
    results = json.loads(lines[-1])["results"]
    assert set(results) == {"grefcoco|unc|val", "MultiPartReasonSeg|val:MMR_val.json"}
    assert {"giou", "ciou", "n_acc", "t_acc"} <= set(results["grefcoco|unc|val"])
    losses = scalars(trained, "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(value) for _, value in losses)
    assert [step for step, _ in scalars(trained, "val/giou")] == [2, 3, 4, 6]
    assert (
        len(list(trained.glob("eval_*.json"))) == 2 and len(list(trained.glob("eval_*.jsonl"))) == 2
    )


def test_steps_log_throughput_flops_and_mfu(trained: Path) -> None:
    for name in ("tokens_per_s", "padding_fraction", "model_tflops_per_s", "mfu"):
        values = [value for _, value in scalars(trained, f"metrics/{name}")]
        assert len(values) == 6 and all(math.isfinite(v) and v > 0 for v in values), name
    assert all(v < 1 for _, v in scalars(trained, "metrics/padding_fraction"))
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])
    assert {"samples_per_s", "tokens_per_s", "mfu"} <= set(record["throughput"])


def test_estimate_memory_prints_one_json_object_without_weights(tmp_path: Path) -> None:
    flags = ["--version=LLaVA-7B-Lightening-v1-1", "--estimate_memory", "--json"]
    result = subprocess.run(
        [sys.executable, "train_ds.py", *flags, f"--log_base_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=KILL_DEADLINE_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["total_gb"] > plan["weights_gb"] > 0
    assert not any(tmp_path.iterdir())  # nothing written: no run directory, no lock


def test_eval_only_on_the_checkpoint_reproduces_the_in_training_validation(
    assets, trained: Path, tmp_path
) -> None:
    flags = tiny_flags(assets, tmp_path, "eval") + [
        f"--weight={trained / 'ckpt_model'}",
        "--eval_only",
    ]
    result = run([sys.executable, "train_ds.py", *flags])
    assert "giou:" in result.stdout
    in_training = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])["results"]
    for name, summary in in_training.items():
        safe = next((tmp_path / "eval").glob(f"eval_{name.split('|')[0]}*.json"))
        evaluated = json.loads(safe.read_text())["summary"]
        for metric, value in summary.items():
            if value is None:
                assert evaluated[metric] is None
            else:
                assert evaluated[metric] == pytest.approx(value, abs=1e-6), (name, metric)
    assert not (tmp_path / "eval" / "ckpt_model").exists()


# ZeRO-2 runs in the default tier (so CI runs the real launcher; the session fixture
# `launched_run` is shared with the merge tests); ZeRO-3 in the slow tier
@pytest.mark.parametrize("zero_stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_launcher_on_two_cpu_ranks(request, assets, tmp_path, zero_stage: int) -> None:
    if zero_stage == 2:
        run_dir = request.getfixturevalue("launched_run")
    else:
        run_dir = launch_two_ranks(assets, tmp_path, "M2SA", zero_stage)
    assert (run_dir / "ckpt_model" / "latest").read_text().strip() == "global_step8"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    losses = [value for _, value in scalars(run_dir, "train/loss")]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def newest_event_file(run_dir: Path) -> Path:
    return max(run_dir.glob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime_ns)


def start_and_kill_after_first_checkpoint(command: list[str], latest: Path) -> None:
    """Start a run and SIGKILL it as soon as its first checkpoint is published."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + KILL_DEADLINE_S
    while not latest.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    process.kill()
    process.wait()
    assert latest.is_file(), process.stderr.read().decode()[-3000:]


RESUME_FLAGS = [
    "--dataset=refer_seg||multi_part_reason_seg",
    "--sample_rates=1,1",
    "--batch_size=2",
    "--grad_accumulation_steps=1",
    "--epochs=2",
    "--steps_per_epoch=3",
    "--val_dataset=refcoco|unc|val",
]


def test_a_killed_run_resumes_with_the_same_losses(assets, tmp_path) -> None:
    run([sys.executable, "train_ds.py", *tiny_flags(assets, tmp_path, "whole"), *RESUME_FLAGS])
    expected = scalars(tmp_path / "whole", "train/loss")
    command = [sys.executable, "train_ds.py", *tiny_flags(assets, tmp_path, "exp"), *RESUME_FLAGS]
    start_and_kill_after_first_checkpoint(command, tmp_path / "exp" / "ckpt_model" / "latest")
    run(command)  # --auto_resume picks up runs/exp/ckpt_model
    resumed = scalars(newest_event_file(tmp_path / "exp"), "train/loss")
    assert [step for step, _ in resumed] == [4, 5, 6]
    for (step, value), (expected_step, expected_value) in zip(resumed, expected[3:], strict=True):
        assert step == expected_step and value == pytest.approx(expected_value, rel=1e-5)
