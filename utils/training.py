"""Helpers of the train_ds.py recipe: distributed set-up, the run directory that describes
itself, the training set and its per-rank sampler (the weighted mix, or GSVA's `--no_sampling`
full pass), step logging (TensorBoard with a global step, metrics.jsonl, a progress heartbeat;
samples/s, tokens/s, padding fraction, model FLOP/s and MFU from `utils.flops`) and one
training epoch, which skips micro-batches with a non-finite loss and reports the bad
records `--skip_bad_samples` skipped.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from utils.collate import Collator
from utils.datasets.doctor import check_training_data
from utils.datasets.mixer import (
    FullPassBatchSampler,
    FullPassDataset,
    HybridDataset,
    SeededDataset,
    build_full_pass_source,
    build_sources,
    check_single_source,
    full_pass_batches,
)
from utils.engine import samples_per_epoch
from utils.flops import StepFlops

LOGGER = logging.getLogger(__name__)
PACKAGES = ("torch", "transformers", "peft", "deepspeed", "tokenizers", "numpy")
LOSS_PARTS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "mask_loss")
# batch counts of conversations over --model_max_length, logged per step as train/<name>
LENGTH_COUNTS = ("dropped_conversations", "truncated_conversations")
PROGRESS_FILE = "progress.json"
# step values averaged since the last validation into its metrics.jsonl record ("throughput")
THROUGHPUT_PREFIX = "metrics/"
TERA = 1e12
# non-finite losses in a row (micro-batches, all ranks agreeing) after which the run stops
MAX_NONFINITE_IN_A_ROW = 3


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (0 for a plain `python` run), known
    before the process group exists."""
    return int(os.environ.get("RANK", "0"))


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


def close_distributed() -> None:
    """Destroy the process group before the interpreter exits. Left to interpreter shutdown,
    the communication backend's threads can be torn down in the wrong order and abort the
    process ("terminate called without an active exception") after a successful run."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def training_dataset(config, processor, world: int, check: bool = True) -> SeededDataset:
    """The training set of `config`, each item processed by `processor`: the weighted mix with
    `samples_per_epoch` items per epoch, or with `--no_sampling` one pass over the records of
    its one source (`full_pass_dataset`). With `check`, the doctor's cheap checks run first and
    stop on bad data. With `--skip_bad_samples`, records that fail to read later are skipped
    and counted."""
    data = config.data_config()
    if config.no_sampling:
        return full_pass_dataset(config, processor, world, check)
    if check:
        check_training_data(data)
    return HybridDataset(
        build_sources(data),
        data.sample_rates,
        samples_per_epoch(config, world),
        data.seed,
        process=processor,
        skip_bad_samples=config.skip_bad_samples,
    )


def full_pass_dataset(config, processor, world: int, check: bool = True) -> FullPassDataset:
    """GSVA's `--no_sampling` (main.py:85, data/dataset.py:265-283, solver.py:43-99): every
    record of the one `--dataset` source once per epoch, in a seeded order, instead of
    `samples_per_epoch` weighted draws. An epoch then has ceil(records / (world x batch_size))
    micro-batches per rank (`FullPassBatchSampler`) and that number / grad_accumulation_steps
    optimizer steps (a partial accumulation continues into the next epoch), as in GSVA;
    `--steps_per_epoch` keeps only its other uses (GSVA: the LR schedule's length, epochs x
    steps_per_epoch). Logs both numbers, with a warning when they differ. (GSVA's own loop reads
    `args.distributed`, which main.py never sets (solver.py:79), so the released code stops
    with an AttributeError at its first log line; the loop here logs as usual.)"""
    data = config.data_config()
    check_single_source(data)
    if check:
        check_training_data(data)
    source = build_full_pass_source(data)
    dataset = FullPassDataset(
        source, data.seed, process=processor, skip_bad_samples=config.skip_bad_samples
    )
    micro_batches = len(full_pass_batches(len(dataset), world, config.batch_size)[0])
    steps = micro_batches / config.grad_accumulation_steps
    message = (
        "--no_sampling: each epoch is one pass over the %d records of %s: %d micro-batches per "
        "rank, %.1f optimizer steps; --steps_per_epoch %d still sets the LR schedule's length "
        "(epochs x steps_per_epoch)"
    )
    level = logging.INFO if math.isclose(steps, config.steps_per_epoch) else logging.WARNING
    LOGGER.log(
        level, message, len(dataset), source.name, micro_batches, steps, config.steps_per_epoch
    )
    return dataset


def training_loader(dataset, config, rank: int, world: int, pad_id: int) -> DataLoader:
    """The rank's loader: `ShardSampler` over the mix, `FullPassBatchSampler` with
    `--no_sampling`."""
    workers = {
        "num_workers": config.workers,
        "collate_fn": Collator(pad_id),
        "persistent_workers": False,
        "pin_memory": False,
    }
    if config.no_sampling:
        batches = FullPassBatchSampler(len(dataset), rank, world, config.batch_size)
        return DataLoader(dataset, batch_sampler=batches, **workers)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        **workers,
    )


class RunLogger:
    """TensorBoard (rank 0) with a global step that never restarts, metrics.jsonl, and the
    `progress.json` heartbeat."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.rank = rank
        self.run_dir = run_dir
        self.writer = None
        self.pending_skips: tuple[int, dict[str, int]] | None = None
        self.throughput: dict[str, list[float]] = {}
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir))

    def step(self, global_step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars; `metrics/*` values are also kept for the next validation's
        metrics.jsonl record."""
        for name, value in values.items():
            if name.startswith(THROUGHPUT_PREFIX):
                self.throughput.setdefault(name[len(THROUGHPUT_PREFIX) :], []).append(value)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, global_step)

    def take_throughput(self) -> dict[str, float]:
        """The mean of each `metrics/*` value logged since the last call."""
        means = {name: sum(vals) / len(vals) for name, vals in self.throughput.items()}
        self.throughput = {}
        return means

    def progress(self, epoch: int, global_step: int) -> None:
        """Rank 0 rewrites `progress.json` ({epoch, global_step, time}) after every optimizer
        step: a heartbeat that a cluster watchdog (or a test) reads while the run goes on."""
        if self.rank != 0:
            return
        record = {"epoch": epoch, "global_step": global_step, "time": time.time()}
        write_atomically(self.run_dir / PROGRESS_FILE, json.dumps(record))

    def skipped(self, epoch: int, global_step: int, counts: dict[str, int]) -> None:
        """`--skip_bad_samples`: the bad records skipped in `epoch` ({source: count}, all ranks):
        a log line, TensorBoard `train/skipped_samples`, and a `skipped_samples` entry in the
        epoch's metrics.jsonl record."""
        if self.rank != 0:
            return
        total = sum(counts.values())
        listed = ", ".join(f"{source}: {count}" for source, count in sorted(counts.items()))
        if total:
            LOGGER.warning("epoch %d: skipped %d bad records (%s)", epoch, total, listed)
        else:
            LOGGER.info("epoch %d: no bad record skipped", epoch)
        self.step(global_step, {"train/skipped_samples": total})
        self.pending_skips = (epoch, dict(sorted(counts.items())))

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
        throughput = self.take_throughput()
        if throughput:
            record["throughput"] = throughput
        if self.pending_skips is not None and self.pending_skips[0] == epoch:
            record["skipped_samples"] = self.pending_skips[1]
            self.pending_skips = None
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_atomically(path: Path, text: str) -> None:
    """Write a small file by renaming a complete one over it (readers never see half of it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_over_ranks(
    means: dict[str, float], sums: dict[str, int], device
) -> tuple[dict[str, float], dict[str, int]]:
    """`means` averaged and `sums` summed over ranks, in one all-reduce of a small vector (same
    keys on every rank)."""
    if _world_size() == 1:
        return means, sums
    vector = torch.tensor([*means.values(), *sums.values()], dtype=torch.float64, device=device)
    dist.all_reduce(vector)
    reduced = vector.tolist()
    world = dist.get_world_size()
    averaged = {key: value / world for key, value in zip(means, reduced, strict=False)}
    summed = {key: round(value) for key, value in zip(sums, reduced[len(means) :], strict=True)}
    return averaged, summed


def sum_counts_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """{key: count} summed over ranks (keys may differ between ranks)."""
    if _world_size() == 1:
        return dict(counts)
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: Counter[str] = Counter()
    for rank_counts in gathered:
        total.update(rank_counts)
    return dict(total)


# --- Non-finite losses ---
class NonFiniteLossError(RuntimeError):
    """The loss was not finite for `max_nonfinite` micro-batches in a row: the run stops."""


def all_ranks_finite(loss: torch.Tensor, device) -> bool:
    """Whether the loss is finite on every rank: one decision all ranks share, so they all skip
    the same micro-batches and DeepSpeed's step counters stay in lockstep."""
    flag = torch.isfinite(loss.detach()).all().reshape(1).to(device=device, dtype=torch.float32)
    if _world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def nonfinite_sources(loss: torch.Tensor, batch) -> list[str]:
    """The sources of the batches whose loss is not finite, over all ranks (a collective)."""
    local = [] if bool(torch.isfinite(loss.detach()).all()) else list(getattr(batch, "sources", []))
    if _world_size() == 1:
        return local
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, local)
    return [source for rank_sources in gathered for source in rank_sources]


def handle_nonfinite(loss, batch, epoch: int, global_step: int, in_a_row: int, limit: int) -> None:
    """Warn that this micro-batch is skipped, naming its sources; raise NonFiniteLossError on
    every rank when it is the `limit`-th in a row."""
    sources = ", ".join(sorted(set(nonfinite_sources(loss, batch)))) or "unknown sources"
    message = (
        f"epoch {epoch}, after optimizer step {global_step}: the loss is not finite on a batch "
        f"from {sources}"
    )
    if in_a_row >= limit:
        raise NonFiniteLossError(
            f"{message}; {in_a_row} micro-batches in a row, so the run stops. The checkpoints "
            "it wrote are intact: resume from the last one with a lower --lr, or check those "
            "sources with tools/check_dataset.py"
        )
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    LOGGER.warning(
        "%s; skipped it (no backward, no optimizer step; %d in a row, the run stops at %d)",
        message,
        in_a_row,
        limit,
    )


# --- One epoch ---
@dataclass
class StepWindow:
    """What one optimizer step accumulates over its micro-batches, for its log line."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_PARTS, 0.0))
    micro: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LENGTH_COUNTS, 0))
    images: int = 0
    tokens: int = 0
    slots: int = 0
    flops: float = 0.0
    data_time: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, output, batch, flops: StepFlops | None = None) -> None:
        for part in LOSS_PARTS:
            self.sums[part] += float(torch.as_tensor(getattr(output, part)).detach())
        self.micro += 1
        for name in LENGTH_COUNTS:
            self.counts[name] += getattr(batch, name)
        self.images += batch.num_images
        lengths = batch.attention_mask.sum(dim=1).tolist()
        self.tokens += sum(lengths)
        self.slots += batch.attention_mask.numel()
        if flops is not None:
            rows = getattr(output, "head_rows", 0)
            self.flops += flops.micro_batch(lengths, rows, batch.num_images, batch.patch_count)

    def throughput(self, elapsed: float, peak_flops: float | None) -> dict[str, float]:
        """This rank's tokens/s, padding fraction, model TFLOP/s and MFU (when known)."""
        values = {
            "metrics/tokens_per_s": self.tokens / elapsed,
            "metrics/padding_fraction": 1 - self.tokens / max(self.slots, 1),
        }
        if self.flops:
            values["metrics/model_tflops_per_s"] = self.flops / elapsed / TERA
            if peak_flops:
                values["metrics/mfu"] = self.flops / elapsed / peak_flops
        return values

    def values(self, engine, device, peak_flops: float | None = None) -> dict[str, float]:
        """The step's logged values: mean losses over micro-batches and ranks, conversations
        dropped or cut for `--model_max_length` summed over ranks, lr, timing, and this rank's
        throughput."""
        losses = {f"train/{part}": total / self.micro for part, total in self.sums.items()}
        counts = {f"train/{name}": n for name, n in self.counts.items()}
        values, counts = reduce_over_ranks(losses, counts, device)
        elapsed = time.perf_counter() - self.start
        values.update(counts)
        values.update(
            {
                "train/lr": engine.get_lr()[0],
                "metrics/total_secs_per_batch": elapsed / self.micro,
                "metrics/data_secs_per_batch": self.data_time / self.micro,
                "metrics/samples_per_s": self.images / elapsed,
                **self.throughput(elapsed, peak_flops),
            }
        )
        return values


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
    max_nonfinite: int = MAX_NONFINITE_IN_A_ROW,
    flops: StepFlops | None = None,
    peak_flops: float | None = None,
):
    """One pass over `loader`: forward, backward, step (DeepSpeed accumulates over GAS
    micro-batches). Every `print_freq`-th optimizer step is logged; `after_step(global_step)`
    runs after each optimizer step (e.g. `--eval_steps` validation). Returns the per-step mean
    losses of every step.

    A micro-batch whose loss is not finite on any rank is skipped on every rank (no backward, no
    step: the optimizer step then takes the next finite micro-batches), with a warning naming
    its sources; `max_nonfinite` in a row raise NonFiniteLossError before anything is saved.
    With `--skip_bad_samples` the records skipped this epoch are reported per source. With
    `flops` (and `peak_flops`, FLOP/s) each step logs model FLOP/s (and MFU)."""
    # from_pretrained returns eval mode, and validation may run in between: without this,
    # LoRA dropout and gradient checkpointing (only active in training mode) would be off
    engine.train()
    counting = bool(getattr(getattr(loader, "dataset", None), "skip_bad_samples", False))
    skipped: Counter[str] = Counter()
    window, step_losses, in_a_row = StepWindow(), [], 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not progress, leave=False)
    waited = time.perf_counter()
    for batch in loader:
        window.data_time += time.perf_counter() - waited
        skipped.update(batch.skipped_samples or {})
        boundary = engine.is_gradient_accumulation_boundary()
        output = engine(batch.to(device, dtype))
        bar.update()
        if not all_ranks_finite(output.loss, device):
            in_a_row += 1
            handle_nonfinite(
                output.loss, batch, epoch, engine.global_steps, in_a_row, max_nonfinite
            )
            waited = time.perf_counter()
            continue
        in_a_row = 0
        engine.backward(output.loss)
        engine.step()
        window.add(output, batch, flops)
        if boundary:
            values = window.values(engine, device, peak_flops)
            if engine.global_steps % print_freq == 0:
                logger.step(engine.global_steps, values)
            logger.progress(epoch, engine.global_steps)
            step_losses.append(values["train/loss"])
            bar.set_postfix(loss=f"{values['train/loss']:.4f}")
            if after_step is not None:
                after_step(engine.global_steps)
            window = StepWindow()
        waited = time.perf_counter()
    bar.close()
    if counting:
        logger.skipped(epoch, engine.global_steps, sum_counts_over_ranks(skipped))
    return step_losses
