"""The training-loop helpers: sampler sharding, GSVA's --no_sampling full pass over two ranks,
the epoch loop's mode, logging and callbacks, `--skip_bad_samples` counts from loader workers to
the epoch report, and non-finite losses."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.collate import Collator, ProcessedSample
from utils.datasets.base import DataError, Sample
from utils.datasets.mixer import DataConfig, HybridDataset, full_pass_batches, skipped_samples
from utils.flops import LanguageModelShape, StepFlops
from utils.training import (
    NonFiniteLossError,
    RunLogger,
    ShardSampler,
    StepWindow,
    train_epoch,
    training_dataset,
    training_loader,
)


def test_shard_sampler_splits_without_overlap_and_resumes_from_a_position() -> None:
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert shards[1] == [1, 4, 7]
    assert list(ShardSampler(10, 1, 3, start=2)) == [7]


@dataclass
class FakeOutput:
    loss: torch.Tensor
    ce_loss: torch.Tensor
    mask_bce_loss: torch.Tensor
    mask_dice_loss: torch.Tensor
    mask_loss: torch.Tensor


class FakeBatch:
    dropped_conversations = 1
    truncated_conversations = 3
    num_images = 2
    patch_count = 0  # CLIP images
    skipped_samples = None
    # two conversations of 3 and 2 real tokens padded to 4: 5 tokens in 8 slots
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)

    def to(self, device, dtype):
        return self


class FakeEngine(nn.Module):
    """Records the training mode at every forward; accumulates over `gas` micro-batches."""

    def __init__(self, gas: int) -> None:
        super().__init__()
        self.gas, self.micro_steps, self.global_steps, self.modes = gas, 0, 0, []

    def forward(self, batch) -> FakeOutput:
        self.modes.append(self.training)
        value = torch.tensor(float(self.micro_steps))
        return FakeOutput(value, value, value * 0, value * 0, value * 0)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gas == 0

    def backward(self, loss) -> None:
        pass

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [0.1]


def test_epoch_trains_in_training_mode_logs_steps_and_calls_back(tmp_path) -> None:
    engine = FakeEngine(gas=2).eval()
    logger = RunLogger(tmp_path, rank=1)  # no TensorBoard writer off rank 0
    logged, called = [], []
    logger.step = lambda step, values: logged.append((step, values))
    losses = train_epoch(
        engine,
        [FakeBatch()] * 6,
        device="cpu",
        dtype=torch.float32,
        logger=logger,
        epoch=0,
        progress=False,
        print_freq=2,
        after_step=called.append,
    )
    assert engine.modes == [True] * 6
    assert losses == [0.5, 2.5, 4.5]  # mean of micro-steps (0,1), (2,3), (4,5)
    assert [step for step, _ in logged] == [2]
    assert logged[0][1]["train/dropped_conversations"] == 2
    assert logged[0][1]["train/truncated_conversations"] == 6
    assert logged[0][1]["metrics/samples_per_s"] > 0
    assert called == [1, 2, 3]


def test_validation_log_keeps_every_set_and_tags_the_first(tmp_path) -> None:
    logger = RunLogger(tmp_path, rank=0)
    logger.validation(6, 1, {"a|val": {"giou": 0.5, "n_acc": None}, "b|val": {"giou": 0.25}})
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record == {
        "epoch": 1,
        "global_step": 6,
        "results": {"a|val": {"giou": 0.5, "n_acc": None}, "b|val": {"giou": 0.25}},
    }


# FLOPs of one FakeBatch with the LM head on 3 rows (hand-computed): per layer the matrix
# products hold 2*4*4 (q, o) + 2*4*4 (k, v) + 3*4*8 (MLP) = 160 weights; forward of n tokens
# over 2 layers = 2 * (2*160*n + 2*2*n^2*4): 2208 for n=3, 1408 for n=2; x2 with the input
# gradients = 7232; head 2*4*10*3 = 240, x3 with its gradients = 720; images 2 x 100
TOY_FLOPS = StepFlops(LanguageModelShape(4, 8, 2, 2, 2, 10), image_forward_flops=100.0)
FAKE_BATCH_FLOPS = 7232 + 720 + 200


def test_step_window_counts_tokens_padding_and_flops() -> None:
    window = StepWindow()
    output = SimpleNamespace(**{part: 1.0 for part in ("loss", "ce_loss", "mask_bce_loss")})
    output.mask_dice_loss = output.mask_loss = 0.0
    output.head_rows = 3
    window.add(output, FakeBatch(), TOY_FLOPS)
    window.add(output, FakeBatch(), TOY_FLOPS)
    assert window.flops == 2 * FAKE_BATCH_FLOPS
    values = window.throughput(elapsed=2.0, peak_flops=float(FAKE_BATCH_FLOPS))
    assert values["metrics/tokens_per_s"] == 5.0  # 10 real tokens in 2 s
    assert values["metrics/padding_fraction"] == 0.375  # 6 of 16 slots are padding
    assert values["metrics/mfu"] == 1.0
    assert values["metrics/model_tflops_per_s"] == FAKE_BATCH_FLOPS / 1e12
    assert "metrics/mfu" not in window.throughput(elapsed=2.0, peak_flops=None)


def test_throughput_of_the_steps_goes_into_the_next_validation_record(tmp_path) -> None:
    logger = RunLogger(tmp_path, rank=1)
    logger.rank = 0  # write metrics.jsonl without a TensorBoard writer
    logger.step(1, {"train/loss": 1.0, "metrics/tokens_per_s": 10.0, "metrics/mfu": 0.25})
    logger.step(2, {"train/loss": 1.0, "metrics/tokens_per_s": 30.0, "metrics/mfu": 0.75})
    logger.validation(2, 0, {"a|val": {"giou": 0.5}})
    logger.validation(3, 1, {"a|val": {"giou": 0.5}})
    first, second = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert first["throughput"] == {"tokens_per_s": 20.0, "mfu": 0.5}
    assert "throughput" not in second


# --- --skip_bad_samples: counts from loader workers to the epoch report ---
class FlakySource:
    """Records whose number is a multiple of `bad_every` fail to read (as a DataError would)."""

    def __init__(self, name: str, bad_every: int) -> None:
        self.name, self.bad_every = name, bad_every

    def __len__(self) -> int:
        return 100

    def sample(self, rng: np.random.Generator) -> Sample:
        record = int(rng.integers(100))
        if record % self.bad_every == 0:
            raise DataError(f"{self.name}.json", record, "image x.jpg does not exist")
        return Sample(
            np.zeros((4, 4, 3), np.uint8), [], np.zeros((0, 4, 4), np.uint8), str(record), self.name
        )

    def check(self, deep: bool = False):
        return iter(())


# --- GSVA --no_sampling over two simulated ranks ---
class RecordSource:
    """`size` records; a sample's image path is its record number."""

    name = "refer_seg/refcoco"

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def sample(self, rng: np.random.Generator) -> Sample:
        return self.sample_at(int(rng.integers(self.size)), rng)

    def sample_at(self, index: int, rng: np.random.Generator) -> Sample:
        image = np.zeros((4, 4, 3), np.uint8)
        return Sample(image, [], np.zeros((0, 4, 4), np.uint8), str(index), self.name)


def no_sampling_config(workers: int) -> SimpleNamespace:
    """The TrainConfig fields the training set and loader read, with --no_sampling."""
    data = DataConfig(Path("."), ("refer_seg",), (1,), {"refer_seg": ("refcoco",)}, seed=4)
    return SimpleNamespace(
        data_config=lambda: data,
        no_sampling=True,
        skip_bad_samples=False,
        batch_size=4,
        grad_accumulation_steps=2,
        steps_per_epoch=500,
        workers=workers,
    )


def test_no_sampling_visits_every_record_once_per_epoch_across_two_ranks(
    monkeypatch, caplog
) -> None:
    records, world = 23, 2  # neither a multiple of batch_size nor of world x batch_size
    monkeypatch.setattr("utils.training.build_full_pass_source", lambda data: RecordSource(23))
    with caplog.at_level("INFO", logger="utils.training"):
        dataset = training_dataset(no_sampling_config(0), tiny_processed, world, check=False)
    assert len(dataset) == records
    # ceil(23 / (2 x 4)) = 3 micro-batches per rank, / 2 accumulation steps; 500 differs
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert (
        "one pass over the 23 records of refer_seg/refcoco: 3 micro-batches per rank, "
        "1.5 optimizer steps; --steps_per_epoch 500" in warning.getMessage()
    )
    orders = []
    for epoch, workers in ((0, 0), (1, 1)):
        dataset.set_epoch(epoch)
        per_rank = [
            [
                batch.image_paths
                for batch in training_loader(
                    dataset, no_sampling_config(workers), rank, world, pad_id=0
                )
            ]
            for rank in range(world)
        ]
        assert [len(batches) for batches in per_rank] == [3, 3]
        visited = [int(path) for batches in per_rank for batch in batches for path in batch]
        assert Counter(visited) == Counter(range(records))  # each record exactly once
        orders.append(visited)
    assert orders[0] != orders[1]  # a new seeded order each epoch


def test_full_pass_batches_give_every_rank_the_same_number_of_micro_batches() -> None:
    # rounds of 2 x 2 positions; 9 leaves 1 < 2 ranks, which joins rank 0's last batch
    assert full_pass_batches(9, 2, 2) == [[[0, 1], [4, 5, 8]], [[2, 3], [6, 7]]]
    # 11 leaves 3, split 2 + 1
    assert full_pass_batches(11, 2, 2) == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10]]]
    assert full_pass_batches(3, 3, 20) == [[[0]], [[1]], [[2]]]
    with pytest.raises(ValueError, match="2 training records cannot give each of 3 ranks"):
        full_pass_batches(2, 3, 1)


def tiny_processed(sample: Sample) -> ProcessedSample:
    """A stand-in for SampleProcessor: one short conversation, tiny pixel tensors."""
    ids = torch.tensor([1, 2, 3])
    return ProcessedSample(
        clip_pixels=torch.zeros(3, 2, 2),
        sam_pixels=torch.zeros(3, 4, 4),
        resized_size=(4, 4),
        original_size=(4, 4),
        input_ids=[ids],
        labels=[ids],
        masks=torch.zeros(0, 4, 4, dtype=torch.uint8),
        image_path=sample.image_path,
        source=sample.source,
    )


def flaky_mix(skip: bool) -> HybridDataset:
    families = [("sem_seg", [FlakySource("ade20k", 5)]), ("vqa", [FlakySource("llava", 7)])]
    return HybridDataset(families, [1, 1], 24, process=tiny_processed, skip_bad_samples=skip)


def test_skipped_records_reach_the_epoch_report_from_loader_workers(tmp_path) -> None:
    mix = flaky_mix(skip=True)
    expected = Counter()
    for index in range(len(mix)):
        expected.update(skipped_samples(mix[index]))
    assert expected["ade20k"] > 0 and expected["llava"] > 0
    loader = DataLoader(mix, batch_size=4, num_workers=1, collate_fn=Collator(0))
    logger = RunLogger(tmp_path, rank=0)
    train_epoch(
        FakeEngine(gas=1),
        loader,
        device="cpu",
        dtype=torch.float32,
        logger=logger,
        epoch=3,
        progress=False,
    )
    logger.validation(6, 3, {})
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["skipped_samples"] == dict(sorted(expected.items()))
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["epoch"] == 3 and progress["global_step"] == len(loader)


def test_without_skip_bad_samples_a_bad_record_stops_with_its_message() -> None:
    with pytest.raises(
        DataError, match=r"(ade20k|llava).json, record \d+: image x.jpg does not exist"
    ):
        [flaky_mix(skip=False)[index] for index in range(24)]
    batch = Collator(0)([tiny_processed(Sample(np.zeros((4, 4, 3)), [], None, "a", "b"))])
    assert batch.skipped_samples is None  # nothing counted, nothing reported


# --- Non-finite losses ---
class NanEngine(FakeEngine):
    """FakeEngine whose loss is NaN at the given forward calls; records backward/step calls."""

    def __init__(self, gas: int, nan_at: set[int]) -> None:
        super().__init__(gas)
        self.nan_at, self.calls, self.stepped = nan_at, 0, []

    def forward(self, batch) -> FakeOutput:
        output = super().forward(batch)
        self.calls += 1
        if self.calls - 1 in self.nan_at:
            nan = torch.tensor(float("nan"))
            return FakeOutput(nan, nan, nan, nan, nan)
        return output

    def step(self) -> None:
        self.stepped.append(self.calls - 1)
        super().step()


class SourcedBatch(FakeBatch):
    sources = ["refer_seg/refcoco", "vqa/llava_instruct_150k"]


def nan_epoch(engine, batches: int, max_nonfinite: int = 3) -> list[float]:
    return train_epoch(
        engine,
        [SourcedBatch()] * batches,
        device="cpu",
        dtype=torch.float32,
        logger=RunLogger(Path("."), rank=1),
        epoch=0,
        progress=False,
        max_nonfinite=max_nonfinite,
    )


def test_a_non_finite_loss_skips_its_step_with_a_warning_naming_the_sources(caplog) -> None:
    engine = NanEngine(gas=1, nan_at={1, 3, 4})
    with caplog.at_level("WARNING", logger="utils.training"):
        losses = nan_epoch(engine, 6)
    assert engine.stepped == [0, 2, 5]  # no backward/step for the NaN micro-batches
    assert engine.global_steps == 3 and all(math.isfinite(loss) for loss in losses)
    warnings = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warnings) == 3
    assert "refer_seg/refcoco, vqa/llava_instruct_150k" in warnings[0]
    assert "skipped it (no backward, no optimizer step; 2 in a row" in warnings[2]


def test_a_skipped_micro_batch_moves_the_accumulation_boundary() -> None:
    engine = NanEngine(gas=2, nan_at={1})
    losses = nan_epoch(engine, 5)
    # micro-batches 0 and 2 make step 1, 3 and 4 step 2 (the fake's loss counts micro-steps)
    assert engine.stepped == [0, 2, 3, 4]
    assert engine.global_steps == 2 and losses == [0.5, 2.5]


def test_several_non_finite_losses_in_a_row_stop_the_run() -> None:
    engine = NanEngine(gas=1, nan_at={2, 3, 4})
    with pytest.raises(NonFiniteLossError) as error:
        nan_epoch(engine, 8)
    message = str(error.value)
    assert "3 micro-batches in a row, so the run stops" in message
    assert "refer_seg/refcoco" in message and "resume from the last one" in message
    assert engine.stepped == [0, 1] and engine.global_steps == 2
