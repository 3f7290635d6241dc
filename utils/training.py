"""Helpers of the train_ds.py recipe: distributed set-up, the run directory that describes
itself, the per-rank sampler, step logging (TensorBoard with a global step, metrics.jsonl) and
one training epoch.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from utils.collate import Collator
from utils.datasets.doctor import check_training_data
from utils.datasets.mixer import HybridDataset, build_sources
from utils.engine import samples_per_epoch

LOGGER = logging.getLogger(__name__)
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "tokenizers", "numpy")
LOSS_PARTS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss")


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (launcher env, or a 1-process group for
    plain `python train_ds.py`). Returns (rank, world_size)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    """Same seed on every rank, so randomly initialised parts start identical."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in PACKAGES}


def describe_run(run_dir: Path, config, token_ids, tokenizer) -> None:
    """Write what merge and evaluation read back: the resolved flags, token ids, package
    versions and the tokenizer with its added tokens."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    (run_dir / "token_ids.json").write_text(json.dumps(token_ids.to_dict(), indent=2))
    (run_dir / "versions.json").write_text(json.dumps(package_versions(), indent=2))
    tokenizer.save_pretrained(run_dir / "tokenizer")


class ShardSampler(Sampler[int]):
    """Rank r of w takes items r, r + w, r + 2w, ... of `length`, from its `start`-th on.

    Items are drawn by (seed, epoch, index) in HybridDataset, so this sharding gives every rank
    different samples and a resumed run the same ones as an uninterrupted run.
    """

    def __init__(self, length: int, rank: int, world_size: int, start: int = 0) -> None:
        self.indices = list(range(rank, length, world_size))[start:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def training_dataset(config, processor, world: int, check: bool = True) -> HybridDataset:
    """The weighted mix of `config`, `samples_per_epoch` items per epoch, each processed by
    `processor`; with `check`, the doctor's cheap checks run first and stop on bad data."""
    data = config.data_config()
    if check:
        check_training_data(data)
    return HybridDataset(
        build_sources(data),
        data.sample_rates,
        samples_per_epoch(config, world),
        data.seed,
        process=processor,
    )


def training_loader(dataset, config, rank: int, world: int, pad_id: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=config.workers,
        collate_fn=Collator(pad_id),
        persistent_workers=False,
        pin_memory=False,
    )


class RunLogger:
    """TensorBoard (rank 0) with a global step that never restarts, and metrics.jsonl."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.rank = rank
        self.run_dir = run_dir
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir))

    def step(self, global_step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, global_step)

    def validation(self, global_step: int, epoch: int, summaries: dict[str, dict]) -> None:
        """`val/<metric>` of the first set (LISA's tags) plus `val/<set>/<metric>` of each."""
        if self.rank != 0:
            return
        for index, (name, summary) in enumerate(summaries.items()):
            for metric, value in summary.items():
                if value is None:
                    continue
                self.step(global_step, {f"val/{name}/{metric}": value})
                if index == 0:
                    self.step(global_step, {f"val/{metric}": value})
        record = {"epoch": epoch, "global_step": global_step, "results": summaries}
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """Average logged values over ranks (one all-reduce of a small vector)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    vector = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(vector)
    vector /= dist.get_world_size()
    return dict(zip(values, vector.tolist(), strict=True))


def train_epoch(
    engine,
    loader,
    *,
    device,
    dtype,
    logger: RunLogger,
    epoch: int,
    progress: bool,
    print_freq: int = 1,
    after_step: Callable[[int], None] | None = None,
):
    """One pass over `loader`: forward, backward, step (DeepSpeed accumulates over GAS
    micro-batches). Every `print_freq`-th optimizer step is logged; `after_step(global_step)`
    runs after each optimizer step (e.g. `--eval_steps` validation). Returns the per-step mean
    losses of every step."""
    # from_pretrained returns eval mode, and validation may run in between: without this,
    # LoRA dropout and gradient checkpointing (only active in training mode) would be off
    engine.train()
    sums = dict.fromkeys(LOSS_PARTS, 0.0)
    micro, dropped, images, data_time, step_losses = 0, 0, 0, 0.0, []
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not progress, leave=False)
    start = waited = time.perf_counter()
    for batch in loader:
        data_time += time.perf_counter() - waited
        boundary = engine.is_gradient_accumulation_boundary()
        output = engine(batch.to(device, dtype))
        engine.backward(output.loss)
        engine.step()
        for part in LOSS_PARTS:
            sums[part] += float(getattr(output, part))
        micro, dropped = micro + 1, dropped + batch.dropped_conversations
        images += batch.num_images
        bar.update()
        if boundary:
            values = {f"train/{part}": total / micro for part, total in sums.items()}
            values = mean_over_ranks(values, device)
            elapsed = time.perf_counter() - start
            values.update(
                {
                    "train/lr": engine.get_lr()[0],
                    "train/dropped_conversations": dropped,
                    "metrics/total_secs_per_batch": elapsed / micro,
                    "metrics/data_secs_per_batch": data_time / micro,
                    "metrics/samples_per_s": images / elapsed,
                }
            )
            if engine.global_steps % print_freq == 0:
                logger.step(engine.global_steps, values)
            step_losses.append(values["train/loss"])
            bar.set_postfix(loss=f"{values['train/loss']:.4f}")
            sums = dict.fromkeys(LOSS_PARTS, 0.0)
            if after_step is not None:
                after_step(engine.global_steps)
            micro, dropped, images, data_time, start = 0, 0, 0, 0.0, time.perf_counter()
        waited = time.perf_counter()
    bar.close()
    return step_losses
