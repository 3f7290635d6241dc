"""utils/evaluation.py on the tiny assets with the tiny model: summaries and records of refCOCO,
gRefCOCO and MMR, batch-size invariance, a real two-rank gloo run (including an empty shard),
GSVA's second pass for gRefCOCO, the output files, and the restored training modes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from model.tiny import build_tiny_segmenter
from tests.helpers import evaluate_on_cpu
from utils.collate import SampleProcessor, collate
from utils.evaluation import (
    ValidationJob,
    build_validation_jobs,
    decode_batch,
    reject_as_segment,
    safe_name,
    write_eval_outputs,
)
from utils.metrics import RECORD_KEYS

SETS = {
    "refcoco|unc|val": ("refcoco|unc|val", ""),
    "grefcoco|unc|val": ("grefcoco|unc|val", ""),
    "MultiPartReasonSeg|val:MMR_val.json": ("MultiPartReasonSeg|val", "MMR_val.json"),
}
METRIC_KEYS = {
    "refcoco|unc|val": {"giou", "ciou"},
    "grefcoco|unc|val": {"giou", "ciou", "n_acc", "t_acc"},
    "MultiPartReasonSeg|val:MMR_val.json": {"giou", "ciou"},
}
WORLD_SIZE = 2
TOLERANCE = 1e-6
DECISION_BIAS = 1.0e4  # added to one token's logits so that argmax picks it everywhere


@pytest.fixture(scope="module")
def tiny(assets):
    model, tokenizer = build_tiny_segmenter(assets)
    model.eval()  # pass_two_areas runs it directly
    processor = SampleProcessor.for_model(model, tokenizer, str(assets / "llava_tiny"))
    return model, processor


@pytest.fixture(scope="module")
def jobs(assets) -> dict[str, ValidationJob]:
    built = {}
    for name, (spec, json_name) in SETS.items():
        [job] = build_validation_jobs(assets / "dataset", spec, json_name)
        assert job.name == name
        built[name] = job
    assert set(built) == set(SETS)
    return built


@pytest.fixture(scope="module")
def results(tiny, jobs) -> dict:
    model, processor = tiny
    return {name: evaluate_on_cpu(model, job, processor) for name, job in jobs.items()}


def record_key(record: dict) -> str:
    return f"{record['record_id']}|{record['target']}|{record['intersection']}|{record['union']}"


def assert_same(got, want) -> None:
    """Same summary (within TOLERANCE) and the same records in any order."""
    assert got.summary.keys() == want.summary.keys()
    for key, value in want.summary.items():
        if value is None:
            assert got.summary[key] is None, key
        else:
            assert got.summary[key] == pytest.approx(value, abs=TOLERANCE), key
    assert len(got.records) == len(want.records)
    for a, b in zip(
        sorted(got.records, key=record_key), sorted(want.records, key=record_key), strict=True
    ):
        assert a.keys() == b.keys()
        assert a["iou"] == pytest.approx(b["iou"], abs=TOLERANCE)
        assert {k: v for k, v in a.items() if k != "iou"} == {
            k: v for k, v in b.items() if k != "iou"
        }


# --- Jobs and names ---
def test_job_names_include_the_json_file(assets) -> None:
    names = [
        job.name
        for job in build_validation_jobs(
            assets / "dataset", "refcoco|unc|val||MultiPartReasonSeg|val", "MMR_test_obj_only.json"
        )
    ]
    assert names == ["refcoco|unc|val", "MultiPartReasonSeg|val:MMR_test_obj_only.json"]
    [default] = build_validation_jobs(assets / "dataset", "MultiPartReasonSeg|val", "")
    assert default.name == "MultiPartReasonSeg|val:MMR_val.json"
    assert safe_name("MultiPartReasonSeg|val:MMR_val.json") == "MultiPartReasonSeg_val_MMR_val"
    assert safe_name("refcoco+|unc|testA") == "refcoco+_unc_testA"


# --- Summaries and records ---
@pytest.mark.parametrize("name", sorted(SETS))
def test_summary_and_records_cover_every_target(results, jobs, name) -> None:
    result, dataset = results[name], jobs[name].dataset
    assert result.name == name and result.samples == len(dataset) > 0
    assert set(result.summary) == METRIC_KEYS[name] | {"targets"}
    for key in METRIC_KEYS[name]:
        value = result.summary[key]
        assert value is None or 0.0 <= value <= 1.0, (key, value)
    samples = [dataset[index] for index in range(len(dataset))]
    targets = sum(sample.masks.shape[0] for sample in samples)
    assert len(result.records) == targets == result.summary["targets"]
    assert {r["record_id"] for r in result.records} == {s.record_id for s in samples}
    assert all(tuple(record) == RECORD_KEYS for record in result.records)
    names = sorted(name for sample in samples for name in sample.target_names)
    assert sorted(record["target"] for record in result.records) == names
    assert result.seconds > 0


def test_grefcoco_has_empty_targets(results) -> None:
    records = results["grefcoco|unc|val"].records
    assert any(r["empty_gt"] for r in records) and not all(r["empty_gt"] for r in records)


@pytest.mark.parametrize("name", sorted(SETS))
def test_batch_size_does_not_change_results(tiny, jobs, results, name) -> None:
    model, processor = tiny
    assert_same(evaluate_on_cpu(model, jobs[name], processor, batch_size=3), results[name])


# --- Two ranks (real gloo process group) ---
class FirstItems:
    """The first `count` samples of a validation set (a set smaller than the world size)."""

    def __init__(self, dataset, count: int) -> None:
        self.dataset, self.count = dataset, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.dataset[index]


def small_job(job: ValidationJob) -> ValidationJob:
    return ValidationJob(f"{job.name} (first)", job.entry, FirstItems(job.dataset, 1))


class CountingModel(nn.Module):
    """Counts forward passes: ranks must run the same number (ZeRO-3 gathers collectively)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, batch):
        self.calls += 1
        return self.model(batch)


def rank_worker(rank: int, assets, init_file: str, shared: dict) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    try:
        model, tokenizer = build_tiny_segmenter(assets)
        processor = SampleProcessor.for_model(model, tokenizer, str(assets / "llava_tiny"))
        counting = CountingModel(model)
        for job in build_validation_jobs(assets / "dataset", "grefcoco|unc|val||refcoco|unc|val"):
            for each in (job, small_job(job)):  # shards of 4 and 4 images, then of 1 and 0
                before = counting.calls
                shared[rank, each.name] = evaluate_on_cpu(
                    counting, each, processor, rank, WORLD_SIZE, 2
                )
                shared[rank, each.name, "forwards"] = counting.calls - before
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(assets, tiny, jobs, results, tmp_path) -> None:
    model, processor = tiny
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(
            rank_worker,
            args=(assets, str(tmp_path / "init"), shared),
            nprocs=WORLD_SIZE,
            join=True,
        )
        per_rank = dict(shared)
    for name in ("grefcoco|unc|val", "refcoco|unc|val"):
        small = small_job(jobs[name])
        expected_small = evaluate_on_cpu(model, small, processor)
        for rank in range(WORLD_SIZE):
            assert_same(per_rank[rank, name], results[name])
            assert_same(per_rank[rank, small.name], expected_small)
        for each in (name, small.name):
            forwards = [per_rank[rank, each, "forwards"] for rank in range(WORLD_SIZE)]
            assert forwards[0] == forwards[1] > 0, (each, forwards)


# --- GSVA's second pass ---
class ForcedDecision(nn.Module):
    """The tiny model with one token's logits raised everywhere, so that every target is decided
    as that token; counts its forward passes."""

    def __init__(self, model: nn.Module, token: int) -> None:
        super().__init__()
        self.model, self.token, self.calls = model, token, 0

    def forward(self, batch):
        self.calls += 1
        output = self.model(batch)
        output.logits[..., self.token] += DECISION_BIAS
        return output


def pass_two_areas(model, processor, dataset) -> tuple[float, float, float]:
    """Directly: (sum I, sum U over non-empty targets, predicted area of empty targets) with
    every `[REJ]` of each image's input written as `[SEG]`."""
    intersection = union = false_area = 0.0
    for index in range(len(dataset)):
        batch = collate([processor(dataset[index])], processor.token_ids.pad)
        batch.input_ids = reject_as_segment(batch.input_ids, processor.token_ids)
        batch.labels = None
        with torch.no_grad():
            [pred] = model(batch).pred_masks
        for mask, gt in zip(pred > 0, batch.gt_masks[0], strict=True):
            target = gt == 1
            if target.any():
                intersection += float((mask & target).sum())
                union += float((mask | target).sum())
            else:
                false_area += float(mask.sum())
    return intersection, union, false_area


def test_grefcoco_scores_pass_two_masks_of_rejected_targets(tiny, jobs) -> None:
    model, processor = tiny
    job = jobs["grefcoco|unc|val"]
    always_seg = ForcedDecision(model, processor.token_ids.seg)
    result = evaluate_on_cpu(always_seg, job, processor, batch_size=2)
    intersection, union, false_area = pass_two_areas(model, processor, job.dataset)
    assert false_area > 0, "the tiny model should predict some area for absent targets"
    # every target called SEG: absent ones add their pass-2 mask area to the union
    assert result.summary["ciou"] == pytest.approx(intersection / (union + false_area), rel=1e-9)
    assert result.summary["n_acc"] == 0.0 and result.summary["t_acc"] == 1.0
    empty = [r for r in result.records if r["empty_gt"]]
    assert sum(r["union"] for r in empty) == false_area
    assert all(r["predicted_present"] and r["iou"] == 0.0 for r in empty)
    # pass 2 only for the batches whose input holds a [REJ] (an empty ground truth)
    has_rej = [bool(r["empty_gt"]) for r in result.records]
    images = [job.dataset[index] for index in range(len(job.dataset))]
    with_rej = [any((mask == 0).all() for mask in sample.masks) for sample in images]
    batches = [with_rej[start : start + 2] for start in range(0, len(images), 2)]
    assert any(has_rej) and always_seg.calls == len(batches) + sum(map(any, batches))


def test_rejected_targets_called_absent_leave_the_union(tiny, jobs) -> None:
    model, processor = tiny
    job = jobs["grefcoco|unc|val"]
    always_rej = ForcedDecision(model, processor.token_ids.rej)
    result = evaluate_on_cpu(always_rej, job, processor)
    intersection, union, _ = pass_two_areas(model, processor, job.dataset)
    assert result.summary["ciou"] == pytest.approx(intersection / union, rel=1e-9)
    assert result.summary["n_acc"] == 1.0 and result.summary["t_acc"] == 0.0
    assert all(r["iou"] == 1.0 for r in result.records if r["empty_gt"])


def test_second_pass_only_when_the_input_holds_a_rej(tiny, jobs) -> None:
    model, processor = tiny
    counting = ForcedDecision(model, processor.token_ids.seg)
    for name, calls in (("refcoco|unc|val", 1), ("grefcoco|unc|val", 2)):
        dataset = jobs[name].dataset
        batch = collate([processor(dataset[0])], processor.token_ids.pad)
        has_rej = bool((batch.input_ids == processor.token_ids.rej).any())
        assert has_rej == (calls == 2)
        counting.calls = 0
        with torch.no_grad():
            decode_batch(counting, batch, processor.token_ids, second_pass=True)
        assert counting.calls == calls, name


def test_no_second_pass_outside_grefcoco(tiny, jobs) -> None:
    model, processor = tiny
    job = jobs["refcoco|unc|val"]
    counting = ForcedDecision(model, processor.token_ids.seg)
    evaluate_on_cpu(counting, job, processor)
    assert counting.calls == len(job.dataset)


# --- Outputs, modes, progress ---
def test_write_eval_outputs(results, tmp_path) -> None:
    result = results["MultiPartReasonSeg|val:MMR_val.json"]
    summary_path, records_path = write_eval_outputs(tmp_path / "eval", result)
    assert summary_path.name == "eval_MultiPartReasonSeg_val_MMR_val.json"
    assert records_path.name == "eval_MultiPartReasonSeg_val_MMR_val.jsonl"
    written = json.loads(summary_path.read_text())
    assert written["name"] == result.name and written["summary"] == result.summary
    assert written["records"] == len(result.records) and written["samples"] == result.samples
    lines = records_path.read_text().splitlines()
    assert len(lines) == len(result.records)
    assert [json.loads(line) for line in lines] == result.records


def test_training_modes_are_restored(tiny, jobs) -> None:
    model, processor = tiny
    model.train()
    model.sam.eval()  # a frozen part kept in eval mode while the rest trains
    before = {name: module.training for name, module in model.named_modules()}
    try:
        evaluate_on_cpu(model, jobs["MultiPartReasonSeg|val:MMR_val.json"], processor)
        assert {name: module.training for name, module in model.named_modules()} == before
    finally:
        model.eval()


def test_progress_bar_on_rank_zero_only(tiny, jobs, capsys) -> None:
    model, processor = tiny
    job = jobs["MultiPartReasonSeg|val:MMR_val.json"]
    evaluate_on_cpu(model, job, processor, rank=1, world_size=WORLD_SIZE, progress=True)
    assert "eval MultiPartReasonSeg" not in capsys.readouterr().err
    evaluate_on_cpu(model, job, processor, rank=0, world_size=WORLD_SIZE, progress=True)
    assert "eval MultiPartReasonSeg" in capsys.readouterr().err
