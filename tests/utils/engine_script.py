"""Two-rank check of utils/engine.py, run by `deepspeed --num_gpus 2` from test_engine.py.

Each rank trains the tiny segmenter on its own batch, saves, continues (the expected losses),
then a fresh engine on each rank resumes from the checkpoint and must see the same losses; then
a batch whose loss is NaN on one rank only must be skipped on both.
Rank 0 writes result.json and the trained weights at the save (for zero_to_fp32.py) into
--output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.tiny import build_tiny_segmenter  # noqa: E402
from tests.helpers import Conversation, make_batch  # noqa: E402
from utils.config import parse_args  # noqa: E402
from utils.engine import (  # noqa: E402
    checkpoint_tag,
    init_engine,
    load_checkpoint,
    save_checkpoint,
)
from utils.training import RunLogger, close_distributed, train_epoch  # noqa: E402

WORLD_SIZE = 2
STEPS_BEFORE_SAVE = 4
STEPS_AFTER_SAVE = 2
SCORE = 0.5
FLAGS = (
    "--precision fp32 --batch_size 1 --grad_accumulation_steps 1 --epochs 1 --steps_per_epoch 10"
    " --lr 0.01"
).split()


def rank_batch(model, tokenizer, rank: int):
    """A different image and answer on each rank, so the gradient reduction matters."""
    masks = [torch.full((1, 40, 56), rank, dtype=torch.uint8)]
    conversation = Conversation(0, "Can you segment the red circle?", "Sure, [SEG].")
    return make_batch(model, tokenizer, [(40, 56)], [conversation], masks, seed=rank)


def train(engine, batch, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        output = engine(batch)
        engine.backward(output.loss)
        engine.step()
        losses.append(output.loss.item())
    return losses


def skip_a_non_finite_batch_on_one_rank(engine, batch, rank: int, output: Path) -> list[int]:
    """Three micro-batches, the second NaN on rank 1 only: both ranks must skip it (one shared
    decision), so both take two optimizer steps. Returns every rank's step count after it."""
    bad = replace(batch, clip_pixels=torch.full_like(batch.clip_pixels, float("nan")))
    batches = [batch, bad if rank == 1 else batch, batch]
    logger = RunLogger(output, rank=1)  # no TensorBoard files from this check
    start = engine.global_steps
    train_epoch(
        engine, batches, device="cpu", dtype=torch.float32, logger=logger, epoch=0, progress=False
    )
    steps: list = [None] * dist.get_world_size()
    dist.all_gather_object(steps, engine.global_steps - start)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    assets = args.output / "tiny_assets"
    config = parse_args(FLAGS)

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank = dist.get_rank()
    if rank == 0:  # writes the tiny assets once; the other rank reads them
        build_tiny_segmenter(assets, seed=0)
    dist.barrier()
    model, tokenizer = build_tiny_segmenter(assets, seed=0)
    engine = init_engine(model, config, WORLD_SIZE)
    batch = rank_batch(model, tokenizer, rank)
    train(engine, batch, STEPS_BEFORE_SAVE)
    directory = args.output / "ckpt_model"
    client = {"epoch": 0, "global_step": STEPS_BEFORE_SAVE}
    save_checkpoint(engine, directory, checkpoint_tag(engine.global_steps), client, SCORE)
    trained = {
        name: parameter.detach().clone()
        for name, parameter in engine.module.named_parameters()
        if parameter.requires_grad
    }
    expected = train(engine, batch, STEPS_AFTER_SAVE)

    resumed_model, _ = build_tiny_segmenter(assets, seed=1)
    resumed = init_engine(resumed_model, config, WORLD_SIZE)
    restored = load_checkpoint(resumed, directory)
    losses = train(resumed, batch, STEPS_AFTER_SAVE)
    if losses != expected:
        raise SystemExit(f"rank {rank}: resumed losses {losses} != {expected}")
    steps = skip_a_non_finite_batch_on_one_rank(resumed, batch, rank, args.output)
    if rank == 0:
        torch.save(trained, args.output / "trained.pt")
        result = {
            "world_size": dist.get_world_size(),
            "client_state": restored,
            "expected_losses": expected,
            "resumed_losses": losses,
            "steps_after_one_rank_non_finite": steps,
        }
        (args.output / "result.json").write_text(json.dumps(result))


def run_and_exit(main: Callable[[], None]) -> None:
    """Run a launched script's `main`, destroy the process group, and after a successful run
    leave with `os._exit(0)`: the interpreter's teardown (the communication backend's threads,
    C++ statics) has aborted ranks of successful runs ("terminate called without an active
    exception") even with the process group destroyed first. A failing `main` raises as usual."""
    try:
        main()
    finally:
        close_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run_and_exit(main)
