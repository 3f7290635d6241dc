"""The training-loop helpers: sampler sharding, the epoch loop's mode, logging and callbacks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from utils.training import RunLogger, ShardSampler, train_epoch


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
    num_images = 2

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
