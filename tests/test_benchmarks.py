"""The benchmarks run and print the JSON they promise (small settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_json(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_train_step_benchmark_reports_the_split() -> None:
    report = run_json("benchmarks/train_step.py", "--steps", "2", "--workers", "0")
    parts = report["seconds_per_step_by_part"]
    assert set(parts) == {"data", "forward", "backward", "step"}
    assert report["seconds_per_step"] > 0 and 0 <= report["data_wait_fraction"] < 1
    assert (
        report["seconds_per_step"] == sum(parts.values())
        or abs(report["seconds_per_step"] - sum(parts.values())) < 1e-9
    )


def test_data_throughput_benchmark_covers_every_source() -> None:
    report = run_json(
        "benchmarks/data_throughput.py",
        "--image_size",
        "96x72",
        "--samples",
        "3",
        "--workers",
        "0",
        "--memory_samples",
        "0",
    )
    assert len(report["sources"]) == 13
    assert all(entry["samples_per_s"] > 0 for entry in report["sources"].values())
    assert report["mix_samples_per_s"]["0"] > 0


def test_generate_benchmark_compares_cached_and_rerun_paths() -> None:
    report = run_json("benchmarks/generate.py", "--new_tokens", "4,8", "--batch_sizes", "1,2")
    runs = report["runs"]
    assert [(r["batch_size"], r["new_tokens"]) for r in runs] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    for entry in runs:
        assert entry["identical_output"] is True
        assert entry["cached_tokens_per_s"] > 0 and entry["rerun_tokens_per_s"] > 0
        assert entry["speedup"] == pytest.approx(
            entry["rerun_seconds_per_answer"] / entry["cached_seconds_per_answer"]
        )
