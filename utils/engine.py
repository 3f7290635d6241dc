"""The DeepSpeed engine behind a few calls: its config (a pure function of the flags), its
initialisation, and atomic checkpoint save / resume.

The training loop uses three engine calls, plus `save_checkpoint` / `load_checkpoint` here:

    output = engine(batch)        # the wrapped Segmenter's forward (a SegmenterOutput)
    engine.backward(output.loss)  # scaled, accumulated, reduced across ranks by DeepSpeed
    engine.step()                 # optimizer + lr-scheduler step every GAS micro-batches

The scheduler lives in the engine (`engine.get_lr()`); `engine.global_steps` counts steps.

Checkpoint layout of `runs/<exp>/ckpt_model/` (the original's, plus a best pointer):

    latest            text: the tag of the newest checkpoint, e.g. "global_step1500"
    best.json         {"tag": "global_step1000", "score": 0.61}: the best-scoring checkpoint
    zero_to_fp32.py   DeepSpeed's consolidation script (and zero_to_torch.py)
    global_step1500/  the newest checkpoint (DeepSpeed's per-tag files)
    global_step1000/  the best one, kept while it differs from the newest

Other `global_step*` directories are removed after a successful save. `python
ckpt_model/zero_to_fp32.py ckpt_model OUT` consolidates the newest; `-t <best tag>` the best.

Saves are atomic: every rank writes into `ckpt_model/.staging/`, then rank 0 renames the tag
directory into place, writes `best.json` and finally `latest` (each by an atomic rename), and only
then prunes old tags. A process killed at any point leaves `latest` naming a complete checkpoint
(tests/test_crashes.py kills real processes at each stage). The checkpoint directory must be on
a filesystem that all ranks share (as DeepSpeed assumes).

Resuming reads DeepSpeed's files with `torch.load(weights_only=True)` forced
(`utils.weights.weights_only_loads`): a checkpoint holding anything but tensors and plain data
is refused rather than unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.lora import parameter_group
from utils.config import TrainConfig
from utils.weights import weights_only_loads

LOGGER = logging.getLogger(__name__)

# Reference run behaviour (LISA / MMR): 100 linear warm-up steps (--warmup_steps), 5e8-element
# ZeRO buckets, gradient-norm clipping at 1.0, no weight decay.
WARMUP_STEPS = 100
# Runs not longer than their warm-up (tests, the demo) would never reach the peak lr; they warm
# up over this fraction of their steps instead, at least DeepSpeed's minimum of 2.
SHORT_RUN_WARMUP_FRACTION = 0.1
MIN_WARMUP_STEPS = 2
ZERO_BUCKET_SIZE = int(5e8)
GRADIENT_CLIPPING = 1.0
WEIGHT_DECAY = 0.0
# We log through TensorBoard ourselves; DeepSpeed's own step print is pushed out of the way.
STEPS_PER_PRINT = 10**9
# ZeRO-3: prefetch ahead in 5e7-element buckets, keep parameters under 1e5 elements (biases,
# norms) unpartitioned, and gather full 16-bit weights when a model is saved.
STAGE3_PREFETCH_BUCKET_SIZE = int(5e7)
STAGE3_PARAM_PERSISTENCE_THRESHOLD = int(1e5)

# Embedding tables up to this size are gathered with their parent module under ZeRO-3 (see
# register_zero3_external_parameters): SAM's tokens, not an LLM vocabulary.
EXTERNAL_EMBEDDING_MAX_ELEMENTS = int(1e6)

CHECKPOINT_DIR_NAME = "ckpt_model"
TAG_PREFIX = "global_step"
LATEST_FILE = "latest"
BEST_FILE = "best.json"
STAGING_DIR = ".staging"
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
# DeepSpeed mixes its own entries (ds_config, buffer_names, ...) into the client state it
# returns, so ours travels under one key.
CLIENT_KEY = "client_state"
RNG_KEY = "rng_states"
# Test-only: a save stops at this stage ("started", "staged", "moved", "best", "latest") for
# tests/test_crashes.py to kill the process there; see _crash_point. Unset in real runs.
CRASH_POINT_ENV = "M2SA_TEST_CRASH_POINT"
CRASH_POINTS = ("started", "staged", "moved", "best", "latest")
CRASH_POINT_MARKER = ".crash_point"
CRASH_POINT_SLEEP_S = 600


# --- Config ---
def warmup_steps(total_steps: int, warmup: int = WARMUP_STEPS) -> int:
    """`warmup`, or a SHORT_RUN_WARMUP_FRACTION of a run that is not longer than that."""
    if total_steps > warmup:
        return warmup
    return max(MIN_WARMUP_STEPS, math.ceil(total_steps * SHORT_RUN_WARMUP_FRACTION))


def optimizer_config(config: TrainConfig) -> dict[str, Any]:
    """AdamW without weight decay. torch's AdamW runs on every device (DeepSpeed's FusedAdam
    needs CUDA); with the optimizer offloaded DeepSpeed picks its compiled CPU Adam instead."""
    params: dict[str, Any] = {
        "lr": config.lr,
        "betas": [config.beta1, config.beta2],
        "weight_decay": WEIGHT_DECAY,
    }
    if not config.offload_optimizer:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups {"params", "lr"}: each parameter at its
    trainable group's `--group_lr` rate, or at --lr; --lr's group first, then by rate, and no
    empty group (DeepSpeed's ZeRO partitions every group it gets)."""
    overrides = config.group_lrs
    by_rate: dict[float, list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            rate = overrides.get(parameter_group(name) or "", config.lr)
            by_rate.setdefault(rate, []).append(parameter)
    order = sorted(by_rate, key=lambda rate: (rate != config.lr, rate))
    return [{"params": by_rate[rate], "lr": rate} for rate in order]


def scheduler_config(config: TrainConfig, rates: list[float] | None = None) -> dict[str, Any]:
    """WarmupDecayLR: linear 0 -> lr, then linear decay to 0 at epochs * steps_per_epoch; with
    `rates` (one per optimizer group, `param_groups`) each group rises to its own peak on the
    same steps."""
    total = config.epochs * config.steps_per_epoch
    rates = rates or [config.lr]
    return {
        "type": "WarmupDecayLR",
        "params": {
            "total_num_steps": total,
            "warmup_min_lr": 0,
            "warmup_max_lr": rates if len(rates) > 1 else config.lr,
            "warmup_num_steps": warmup_steps(total, config.warmup_steps),
            "warmup_type": "linear",
        },
    }


def zero_config(config: TrainConfig) -> dict[str, Any]:
    """ZeRO stage 2 as the reference, or stage 3; optional optimizer-state offload to CPU."""
    zero: dict[str, Any] = {
        "stage": config.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_bucket_size": ZERO_BUCKET_SIZE,
    }
    if config.zero_stage == 2:
        zero.update(reduce_scatter=True, allgather_bucket_size=ZERO_BUCKET_SIZE)
    else:
        zero.update(
            stage3_prefetch_bucket_size=STAGE3_PREFETCH_BUCKET_SIZE,
            stage3_param_persistence_threshold=STAGE3_PARAM_PERSISTENCE_THRESHOLD,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(
    config: TrainConfig, world_size: int, rates: list[float] | None = None
) -> dict[str, Any]:
    """The DeepSpeed config of a run (pure: flags and world size in, dict out); `rates`: the
    peak learning rate of each optimizer group when they differ (`param_groups`)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    micro, accumulation = config.batch_size, config.grad_accumulation_steps
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "optimizer": optimizer_config(config),
        "scheduler": scheduler_config(config, rates),
        "fp16": {"enabled": config.precision == "fp16"},
        "bf16": {"enabled": config.precision == "bf16"},
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": zero_config(config),
        "steps_per_print": STEPS_PER_PRINT,
    }


def samples_per_epoch(config: TrainConfig, world_size: int) -> int:
    """Training samples one epoch draws over all ranks (the length of the training set)."""
    return config.batch_size * config.grad_accumulation_steps * config.steps_per_epoch * world_size


def register_zero3_external_parameters(model: nn.Module) -> int:
    """Register small embedding tables as ZeRO-3 external parameters of their parent.

    transformers' SAM mask decoder reads `iou_token.weight` / `mask_tokens.weight` without
    calling those nn.Embedding modules, so ZeRO-3 never gathers them and backward fails on a
    size-0 parameter. Large tables (an LLM vocabulary) are called as modules and would only stay
    gathered for the parent's whole forward. Returns how many were registered."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    tables = [
        (parent, child.weight)
        for parent in model.modules()
        for child in parent.children()
        if isinstance(child, nn.Embedding)
        and child.weight.numel() <= EXTERNAL_EMBEDDING_MAX_ELEMENTS
    ]
    for parent, weight in tables:
        register_external_parameter(parent, weight)
    return len(tables)


def init_engine(model: nn.Module, config: TrainConfig, world_size: int):
    """Wrap `model` in a DeepSpeed engine (optimizer and lr scheduler inside) over its
    trainable parameters. Initialises torch.distributed from the launcher's environment when
    nobody has yet (gloo on CPU, NCCL on CUDA: the accelerator's backend)."""
    import deepspeed  # heavy; imported where it is used
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if config.precision == "fp16" and not accelerator.is_fp16_supported():
        raise ValueError(
            f"--precision fp16 is not supported on {accelerator.device_name()}; use bf16 or fp32"
        )
    if config.zero_stage == 3:
        register_zero3_external_parameters(model)
    groups = param_groups(model, config)
    if not groups:
        raise ValueError("the model has no trainable parameters; check the LoRA/freeze flags")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=deepspeed_config(config, world_size, [group["lr"] for group in groups]),
    )
    return engine


# --- RNG state ---
def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and accelerator RNG states, in types that
    `torch.load(weights_only=True)` accepts (numpy's key array becomes a list)."""
    from deepspeed.accelerator import get_accelerator

    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
        "accelerator": get_accelerator().get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    from deepspeed.accelerator import get_accelerator

    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))
    name, key, *position = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *position))
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (DeepSpeed writes client state from rank 0 only)."""
    if not _distributed():
        return [rng_state()]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


# --- Checkpoints ---
def checkpoint_tag(global_step: int) -> str:
    """The tag DeepSpeed and the original scripts use: 'global_step{N}'."""
    return f"{TAG_PREFIX}{global_step}"


def checkpoint_directory(config: TrainConfig) -> Path:
    """runs/<exp_name>/ckpt_model."""
    return config.log_dir / CHECKPOINT_DIR_NAME


def read_latest(directory: Path) -> str | None:
    """The tag in `directory/latest`, or None."""
    path = Path(directory) / LATEST_FILE
    return path.read_text().strip() if path.is_file() else None


def read_best(directory: Path) -> dict[str, Any] | None:
    """`{"tag": ..., "score": ...}` of the best checkpoint, or None."""
    path = Path(directory) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_atomically(path: Path, text: str) -> None:
    """Write a small file by renaming a complete one over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _move_into_place(staging: Path, directory: Path, tag: str) -> None:
    """Rename the staged tag directory (and recovery scripts) into `directory`.

    Re-saving an existing tag (same global step, hence same weights) moves the old copy aside
    first, because a directory cannot be renamed over a non-empty one."""
    target = directory / tag
    if target.exists():
        os.replace(target, staging / f"{tag}.old")
    os.replace(staging / tag, target)
    for script in RECOVERY_SCRIPTS:
        if (staging / script).is_file():
            os.replace(staging / script, directory / script)


def _beats_best(directory: Path, score: float | None) -> bool:
    """Whether `score` beats the recorded best (higher is better; None never does)."""
    best = read_best(directory)
    return score is not None and (best is None or score > best["score"])


def _prune(directory: Path) -> None:
    """Remove every tag directory but the newest and the best, and the staging area."""
    keep = {read_latest(directory)}
    best = read_best(directory)
    if best is not None:
        keep.add(best["tag"])
    for path in directory.glob(f"{TAG_PREFIX}*"):
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path)
    shutil.rmtree(directory / STAGING_DIR, ignore_errors=True)


def _publish(staging: Path, directory: Path, tag: str, score: float | None) -> None:
    """Rank 0's commit: tag directory into place, then best.json, then `latest`, then prune."""
    _move_into_place(staging, directory, tag)
    _crash_point("moved", directory)
    if score is not None:
        _write_atomically(directory / BEST_FILE, json.dumps({"tag": tag, "score": float(score)}))
    _crash_point("best", directory)
    _write_atomically(directory / LATEST_FILE, tag)
    _crash_point("latest", directory)
    _prune(directory)


def _crash_point(stage: str, directory: Path) -> None:
    """Test-only (tests/test_crashes.py): when CRASH_POINT_ENV names `stage`, write
    CRASH_POINT_MARKER into `directory` and sleep there, so the test can SIGKILL a real process
    at that point of a save. Does nothing unless that variable is set."""
    if os.environ.get(CRASH_POINT_ENV) != stage:
        return
    (directory / CRASH_POINT_MARKER).write_text(stage)
    time.sleep(CRASH_POINT_SLEEP_S)


def save_checkpoint(
    engine,
    directory: Path,
    tag: str,
    client_state: dict[str, Any],
    score: float | None = None,
) -> bool:
    """Save the engine (module, optimizer, scheduler) and `client_state` under
    `directory/tag`, atomically, on every rank (all ranks must call it).

    `client_state` is the loop's own state (epoch, global_step, best_score, sampler position);
    it is stored under CLIENT_KEY, next to every rank's RNG state under RNG_KEY. `score`
    (higher is better, e.g. gIoU) makes the checkpoint the best one when it beats the recorded
    best. Returns whether it did.
    """
    directory, staging = Path(directory), Path(directory) / STAGING_DIR
    # every rank decides before rank 0 may rewrite best.json
    is_best = _beats_best(directory, score)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save killed part-way
        staging.mkdir(parents=True)
        _crash_point("started", directory)
    _barrier()
    state = {CLIENT_KEY: dict(client_state), RNG_KEY: _gather_rng_states()}
    engine.save_checkpoint(str(staging), tag=tag, client_state=state, save_latest=False)
    if _rank() == 0:
        _crash_point("staged", directory)
        _publish(staging, directory, tag, score if is_best else None)
    _barrier()
    return is_best


def load_checkpoint(engine, directory: Path, tag: str | None = None) -> dict[str, Any] | None:
    """Load module, optimizer and scheduler state from `directory` (tag: `latest` when None),
    restore this rank's RNG state, and return the client state; None when `directory` holds
    no checkpoint. A checkpoint that exists but does not load raises."""
    directory = Path(directory)
    tag = tag or read_latest(directory)
    if tag is None:
        return None
    if not (directory / tag).is_dir():
        raise FileNotFoundError(f"checkpoint {directory / tag} does not exist")
    # DeepSpeed unpickles with weights_only=False; a checkpoint from elsewhere must not run code
    with weights_only_loads():
        load_path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {directory / tag}")
    saved = client_state or {}
    if CLIENT_KEY not in saved:
        raise KeyError(f"{directory / tag} was not written by utils.engine.save_checkpoint")
    rng_states = saved.get(RNG_KEY)
    if rng_states:
        # a run resumed on another number of ranks gets the saved states round robin
        restore_rng_state(rng_states[_rank() % len(rng_states)])
    LOGGER.info("loaded checkpoint %s", directory / tag)
    return saved[CLIENT_KEY]


def find_resume_directory(config: TrainConfig) -> Path | None:
    """Where to resume from: `--resume` if given (it must hold a checkpoint), else
    runs/<exp>/ckpt_model when `--auto_resume` and it has a `latest`; never with --eval_only
    (evaluation loads weights with --version/--weight, not a training state)."""
    if config.eval_only:
        return None
    if config.resume:
        directory = Path(config.resume)
        if read_latest(directory) is None:
            raise FileNotFoundError(f"--resume {directory}: no '{LATEST_FILE}' file in it")
        return directory
    directory = checkpoint_directory(config)
    if config.auto_resume and read_latest(directory) is not None:
        return directory
    return None
