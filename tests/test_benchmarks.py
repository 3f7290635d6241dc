"""The benchmarks run and print the JSON they promise (small settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_json(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_train_step_benchmark_reports_the_split_and_the_packing_comparison() -> None:
    flags = ("--steps", "2", "--workers", "0", "--compare_packing")
    report = run_json("benchmarks/train_step.py", *flags)
    assert not report["packing"] and report["packed"]["packing"]
    assert report["packing_speedup"] == pytest.approx(
        report["packed"]["samples_per_s"] / report["samples_per_s"]
    )
    for timed in (report, report["packed"]):
        parts = timed["seconds_per_step_by_part"]
        assert set(parts) == {"data", "forward", "backward", "step"}
        assert timed["seconds_per_step"] > 0 and 0 <= timed["data_wait_fraction"] < 1
        assert timed["seconds_per_step"] == pytest.approx(sum(parts.values()), abs=1e-9)
    # the memory planner within 10 % of the live-tensor peak of each plain step (issue 19)
    planner = report["planner"]
    assert len(planner["planned_over_tensor_peak_by_batch"]) == 3
    for ratio in planner["planned_over_tensor_peak_by_batch"]:
        assert 0.9 <= ratio <= 1.1


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


FAKE_LISA_DATASET = """
import time


class {name}:
    def __init__(self, base_image_dir, tokenizer, vision_tower, image_size, **data):
        assert tokenizer is None and image_size == 1024
        self.data = data

    def __getitem__(self, index):
        if self.data.get("refer_seg_data") == "refcoco":
            raise KeyError(0)  # LISA on a bare RLE dict
        time.sleep({seconds})
        return "sample"
"""
FAKE_LISA = {
    "sem_seg_dataset": "SemSegDataset",
    "refer_seg_dataset": "ReferSegDataset",
    "vqa_dataset": "VQADataset",
    "reason_seg_dataset": "ReasonSegDataset",
}
FAKE_MS = 10  # per item of the fake LISA loaders


def fake_lisa_checkout(root: Path) -> Path:
    """A directory shaped like a LISA checkout whose dataset classes sleep FAKE_MS per item
    (refcoco's always raise, as LISA's own do on bare RLE dicts)."""
    for module, name in FAKE_LISA.items():
        path = root / "utils" / f"{module}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_LISA_DATASET.format(name=name, seconds=FAKE_MS / 1000))
    return root


def test_data_throughput_benchmark_pairs_ours_with_lisas_loaders(tmp_path: Path) -> None:
    report = run_json(
        "benchmarks/data_throughput.py",
        *("--image_size", "96x72", "--samples", "2", "--rounds", "2", "--workers", "0"),
        *("--memory_samples", "0", "--sources", "ade20k,refcoco,llava_instruct_150k,MMR"),
        *("--lisa_repo", str(fake_lisa_checkout(tmp_path / "lisa"))),
    )
    assert sorted(report["sources"]) == [
        "multi_part_reason_seg/MMR",
        "refer_seg/refcoco",
        "sem_seg/ade20k",
        "vqa/llava_instruct_150k",
    ]
    lisa = report["lisa"]
    assert lisa["rounds"] == 2 and lisa["samples"] == 2
    assert lisa["sources"]["multi_part_reason_seg/MMR"] == {"lisa_loader": None}
    refcoco = lisa["sources"]["refer_seg/refcoco"]
    assert refcoco["lisa_failures"] == 4 and refcoco["lisa_error"] == "KeyError: 0"
    assert "ratio" not in refcoco
    for name in ("sem_seg/ade20k", "vqa/llava_instruct_150k"):
        entry = lisa["sources"][name]
        assert entry["lisa_failures"] == 0 and entry["lisa_ms_per_sample"] >= FAKE_MS
        assert entry["ratio_of_means"] == pytest.approx(
            entry["lisa_ms_per_sample"] / entry["ours_ms_per_sample"], rel=0.01
        )
        assert len(entry["round_ratios"]) == 2
        assert entry["ratio"] == pytest.approx(float(np.median(entry["round_ratios"])), abs=1e-3)
    assert lisa["min_ratio"] == min(
        lisa["sources"][name]["ratio"] for name in ("sem_seg/ade20k", "vqa/llava_instruct_150k")
    )


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


@pytest.mark.slow
def test_small_preset_compares_packed_trimmed_with_padded_full_logits() -> None:
    report = run_json(
        "benchmarks/train_step.py", "--preset", "small", "--batches", "2", "--compare", "both"
    )
    assert report["compare"] == "both" and report["batches"] == 2
    # the default: VQA dialogues as long as LLaVA-Instruct-150K's (about 286 text tokens)
    assert report["vqa_lengths"] == "llava_instruct" and report["vqa_text_tokens_mean"] > 250
    baseline, candidate = report["padded_full"], report["packed_trimmed"]
    assert report["speedup"] == pytest.approx(
        candidate["samples_per_s"] / baseline["samples_per_s"]
    )
    assert report["max_abs_loss_diff"] < 1e-4
    assert 0 < report["packed_rows"] <= report["conversations"]
    # trimmed logits hold less at the peak (live tensors, not the allocator's resident memory)
    assert 0 < candidate["peak_tensor_memory_gb"] < baseline["peak_tensor_memory_gb"]
    for path in (baseline, candidate):
        assert path["planned_over_tensor_peak"] == pytest.approx(
            path["planned_memory_gb"] / path["peak_tensor_memory_gb"]
        )
        for ratio in path["planned_over_tensor_peak_by_batch"]:
            assert 0.9 <= ratio <= 1.1


def test_peak_tensors_counts_live_storages_and_not_views() -> None:
    """PeakTensors by hand: 4000 bytes alive at most (a 1000-float tensor and its 250-float
    sum of a view), a view of a weight counts nothing, a freed tensor leaves the count."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.train_step import PeakTensors

    weight = torch.ones(50, 20)
    with PeakTensors() as tensors:
        big = torch.zeros(1000)  # 4000 bytes
        transposed = weight.t()  # a view: nothing new
        part = big.view(4, 250).sum(dim=0)  # the view nothing, the sum 1000 bytes
        del big
        small = part * 2  # 1000 bytes; `big` freed by now
    assert tensors.peak == 4000 + 1000
    assert tensors.bytes == 2000 and transposed.shape == (20, 50) and small.shape == (250,)


class WordTokenizer:
    """One token per space-separated word (the lengthening only counts tokens)."""

    def __call__(self, text: str, add_special_tokens: bool = True):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=text.split())


def test_small_preset_lengthens_vqa_answers_with_their_own_text() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.train_step import lengthen_answers

    turns = [
        {"from": "human", "value": "<image>\nHow many? please"},  # 4 words ("<image>" is one)
        {"from": "gpt", "value": "Two red."},  # 2
        {"from": "human", "value": "Colour?"},  # 1
        {"from": "gpt", "value": "It is blue."},  # 3
    ]
    assert lengthen_answers(turns, WordTokenizer(), target=14) == 15
    # 10 words, then one answer's copy at a time, in turn: +2 (12), +3 (15)
    assert [t["value"] for t in turns] == [
        "<image>\nHow many? please",
        "Two red. Two red.",
        "Colour?",
        "It is blue. It is blue.",
    ]
    assert lengthen_answers(turns, WordTokenizer(), target=5) == 15  # already longer: unchanged
    assert turns[1]["value"] == "Two red. Two red."


def test_small_preset_vqa_lengths_follow_llava_instruct_parts(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks import train_step

    # conversation_58k: 126 MB over 58,000 records at 5 bytes per token
    assert train_step.llava_instruct_text_tokens("conversation_58k") == pytest.approx(
        126e6 / 58_000 / 5
    )
    path = tmp_path / train_step.VQA_JSON
    path.parent.mkdir(parents=True)
    record = {"id": "1", "image": "a.jpg"}
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    path.write_text(json.dumps([{**record, "conversations": turns}] * 200))
    tokens = train_step.lengthen_vqa(tmp_path, WordTokenizer(), seed=0)
    low, high = train_step.LENGTH_SPREAD
    means = [train_step.llava_instruct_text_tokens(p) for p in train_step.LLAVA_INSTRUCT_PARTS]
    # a dialogue overshoots its target by less than one copy of its answer (2 words)
    assert min(means) * low <= min(tokens) and max(tokens) <= max(means) * high + 2
    # the parts' means weighted by their record counts: about 286 tokens
    counts = [records for records, _ in train_step.LLAVA_INSTRUCT_PARTS.values()]
    expected = sum(m * c for m, c in zip(means, counts, strict=True)) / sum(counts)
    assert sum(tokens) / len(tokens) == pytest.approx(expected, rel=0.1)
    written = json.loads(path.read_text())
    # the written dialogues hold the returned tokens: the answer's words and the question's 2
    assert [len(r["conversations"][1]["value"].split()) + 2 for r in written] == tokens
    assert all(r["conversations"][0]["value"] == "<image>\nWhat?" for r in written)
