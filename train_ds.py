"""Train or evaluate the segmenter: `deepspeed [--num_gpus N] train_ds.py [flags]`.

The recipe: resolve the flags over a paper's recipe (`--recipe lisa|gsva|m2sa|PATH`, default
m2sa; `configs/`) into a TrainConfig, build the model and data, run the visible loop, validate
every epoch, save a checkpoint. Plain `python train_ds.py ...` runs one process. With
`--eval_only` it evaluates `--version` on every `--val_dataset` entry and exits (no training
data, no optimizer, no resume). `--print_config` prints the resolved configuration as JSON and
exits. Outputs go to `<log_base_dir>/<exp_name>/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

# DeepSpeed's logger writes to the stdout it finds when first imported (and logs the accelerator
# it detects right then); binding it to stderr keeps stdout for what this script prints itself
# (the --print_config JSON, the metrics table)
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from model.builder import build_segmenter
from model.checkpoint import read_segmenter_config
from model.layouts import LEGACY_LAYOUTS, Layout, detect_layout, image_settings_directory
from model.packing import packing_enabled
from utils.collate import SampleProcessor, backbone_conv_type
from utils.config import FROM_COMMAND_LINE, ResolvedConfig, TrainConfig, resolve_config
from utils.datasets.base import DataError
from utils.engine import (
    checkpoint_directory,
    checkpoint_tag,
    find_resume_directory,
    init_engine,
    load_checkpoint,
    save_checkpoint,
)
from utils.evaluation import build_validation_jobs, evaluate, write_eval_outputs
from utils.flops import StepFlops, device_peak
from utils.memory_plan import print_memory_plan, split_json_flag
from utils.metrics import MIOU, format_table
from utils.run_log import LOG_FORMAT, attach_run_log, report_error
from utils.runlock import RunLock, RunLockedError
from utils.semantic_eval import PER_CLASS_IOU, format_class_table
from utils.training import (
    NonFiniteLossError,
    RunLogger,
    close_distributed,
    describe_run,
    init_distributed,
    launcher_rank,
    seed_everything,
    train_epoch,
    training_dataset,
    training_loader,
)
from utils.weights import UnsafeCheckpointError, load_weights

LOGGER = logging.getLogger("train_ds")
SCORE_METRIC = "giou"
SEMANTIC_SCORE_METRIC = MIOU  # a semantic set (ade20k|val, ...) first: the best by its mIoU
# errors that explain themselves (bad flags or files, model/SAM mismatches, data errors, a
# locked run directory): reported in one line (utils.run_log.report_error)
EXPLAINED_ERRORS = (
    DataError,
    UnsafeCheckpointError,
    NonFiniteLossError,
    RunLockedError,
    ValueError,
    OSError,
)


def validate(model, jobs, processor, config: TrainConfig, rank: int, world: int) -> dict:
    """Evaluate every validation set; rank 0 writes eval_<set>.json/.jsonl and the table."""
    device, dtype = get_accelerator().current_device_name(), config.model_config().dtype
    summaries = {}
    for job in jobs:
        result = evaluate(
            model,
            job,
            processor,
            device=device,
            dtype=dtype,
            rank=rank,
            world_size=world,
            batch_size=config.val_batch_size,
            progress=rank == 0,
            protocol=config.eval_protocol,
            max_new_tokens=config.max_new_tokens,
            lasagna_miou_compat=config.lasagna_miou_compat,
        )
        summaries[result.name] = result.summary
        if rank == 0:
            write_eval_outputs(config.log_dir, result)
            if PER_CLASS_IOU in result.details:
                table = {**result.details, **result.summary}
                print(f"{result.name}\n{format_class_table(table)}", flush=True)
    if rank == 0:
        print(format_table(summaries), flush=True)
    return summaries


def first_set_score(summaries: dict[str, dict]) -> float | None:
    """The best-checkpoint score: the first set's gIoU, or its mIoU for a semantic set."""
    if not summaries:
        return None
    first = next(iter(summaries.values()))
    return first.get(SCORE_METRIC, first.get(SEMANTIC_SCORE_METRIC))


def evaluate_only(model, jobs, processor, config: TrainConfig, rank: int, world: int) -> dict:
    """`--eval_only`: the model as loaded, on every validation set; prints `giou: x, ciou: y`
    (`miou: x` when the first set is a semantic one)."""
    model.to(get_accelerator().current_device_name(), config.model_config().dtype)
    summaries = validate(model, jobs, processor, config, rank, world)
    if rank == 0 and summaries:
        first = next(iter(summaries.values()))
        if SCORE_METRIC in first:
            print(f"giou: {first.get('giou')}, ciou: {first.get('ciou')}", flush=True)
        else:
            print(f"miou: {first.get(SEMANTIC_SCORE_METRIC)}", flush=True)
    return summaries


def step_validation(model, jobs, processor, config: TrainConfig, logger, epoch, rank, world):
    """`--eval_steps N`: validate every N optimizer steps within an epoch (None when off); an
    epoch's last step is left to the end-of-epoch validation. `evaluate` restores every
    module's training mode afterwards."""
    if not config.eval_steps or config.no_eval:
        return None

    def after_step(global_step: int) -> None:
        epoch_end = global_step % config.steps_per_epoch == 0
        if global_step % config.eval_steps == 0 and not epoch_end:
            logger.validation(
                global_step, epoch, validate(model, jobs, processor, config, rank, world)
            )

    return after_step


def report_chainless_validation(config: TrainConfig, model, tokenizer) -> None:
    """Warn when a model with a chain token (a CoReS checkpoint) is validated with answers that
    hold none: its `[SEG]` masks are then decoded without their coarse prompts."""
    chain = model.token_ids.chain
    validates = config.eval_only or not config.no_eval
    if chain is not None and validates:
        token = tokenizer.convert_ids_to_tokens(chain)
        if token not in config.val_answer:
            LOGGER.warning(
                "%s has the chain token %s but --val_answer %r holds none: each [SEG] is "
                "decoded without its coarse mask (CoReS checkpoints: --recipe cores)",
                config.version,
                token,
                config.val_answer,
            )


def report_unused_flags(config: TrainConfig, model, layout: Layout) -> None:
    """Say which model flags the loaded files (of `layout`) override (nothing is fetched from a
    hub)."""
    if layout in LEGACY_LAYOUTS:
        LOGGER.info(
            "--vision-tower %s: the CLIP tower of the %s checkpoint %s, which keeps it outside",
            config.vision_tower,
            layout.value,
            config.version,
        )
    else:
        LOGGER.info(
            "--vision-tower %s is unused: the vision tower and its image settings come from %s",
            config.vision_tower,
            config.version,
        )
    if config.image_size != model.sam_input_size:
        LOGGER.warning(
            "--image_size %d differs from the SAM checkpoint's input size %d; using %d",
            config.image_size,
            model.sam_input_size,
            model.sam_input_size,
        )


def train(model, tokenizer, jobs, processor, config: TrainConfig, rank: int, world: int):
    """The training loop: epochs of `steps_per_epoch` optimizer steps, validation, checkpoints."""
    dataset = training_dataset(config, processor, world)
    engine = init_engine(model, config, world)
    resume = find_resume_directory(config)
    state = (load_checkpoint(engine, resume) if resume else None) or {}
    start_epoch, best = state.get("epoch", config.start_epoch - 1) + 1, state.get("best_score")
    logger = RunLogger(config.log_dir, rank)
    device, dtype = get_accelerator().current_device_name(), config.model_config().dtype
    flops, (peak, peak_note) = StepFlops.from_segmenter(model), device_peak(device)
    if rank == 0:
        LOGGER.info("MFU is measured against %s", peak_note)
    history = []
    for epoch in range(start_epoch, config.epochs):
        dataset.set_epoch(epoch)
        loader = training_loader(dataset, config, rank, world, model.token_ids.pad)
        history += train_epoch(
            engine,
            loader,
            device=device,
            dtype=dtype,
            logger=logger,
            epoch=epoch,
            progress=rank == 0,
            print_freq=config.print_freq,
            after_step=step_validation(model, jobs, processor, config, logger, epoch, rank, world),
            flops=flops,
            peak_flops=peak,
        )
        summaries = {} if config.no_eval else validate(model, jobs, processor, config, rank, world)
        logger.validation(engine.global_steps, epoch, summaries)
        score = first_set_score(summaries)
        best = score if score is not None and (best is None or score > best) else best
        save_checkpoint(
            engine,
            checkpoint_directory(config),
            checkpoint_tag(engine.global_steps),
            {"epoch": epoch, "global_step": engine.global_steps, "best_score": best},
            score=score,
        )
    logger.close()
    return history


def report_recipe(resolved: ResolvedConfig) -> None:
    """Say which recipe the run follows and which of its settings the command line changed."""
    changed = [
        f"{name}={getattr(resolved.config, name)!r}"
        for name, source in resolved.sources.items()
        if source == "command line" and name in resolved.recipe.values
    ]
    LOGGER.info(
        "recipe %s (%s); overridden on the command line: %s",
        resolved.recipe.name,
        resolved.recipe.path,
        ", ".join(changed) or "nothing",
    )


@dataclass
class RunState:
    """What reporting an error needs: the rank, its log file once there is one, and whether the
    training loop had started (from then on an error may be met by one rank alone)."""

    rank: int
    log_file: Path | None = None
    training: bool = False


def take_run_lock(lock: RunLock, force: bool, rank: int) -> None:
    """Rank 0 locks the run directory before the process group exists (a second run into the
    same directory stops before it binds a port); a refusal ends rank 0, and the launcher then
    ends the other ranks."""
    if rank == 0:
        note = lock.acquire(force)
        if note:
            LOGGER.warning("%s", note)


def run(resolved: ResolvedConfig, state: RunState, world: int):
    """Build the model and data, then train or evaluate (the run directory is locked)."""
    config, rank = resolved.config, state.rank
    state.log_file = attach_run_log(config.log_dir, rank)
    seed_everything(config.seed)
    layout = detect_layout(config.version)  # once per run, handed on
    model, tokenizer = build_segmenter(config.model_config(), layout)
    saved = read_segmenter_config(config.version).conv_type if layout is Layout.MERGED else None
    explicit = resolved.sources["conv_type"] == FROM_COMMAND_LINE
    conv_type = backbone_conv_type(model, config.conv_type, explicit, saved, config.version)
    config = replace(config, conv_type=conv_type)
    model.full_logits = config.full_logits
    model.packing = packing_enabled(config.packing, config.attn_implementation)
    if config.weight:
        load_weights(model, config.weight)
    # CLIP's image settings: --version's own, or --vision-tower's for the legacy layouts
    images = image_settings_directory(config.version, config.vision_tower, layout)
    budget = (config.min_pixels, config.max_pixels)
    processor = SampleProcessor.for_model(
        model,
        tokenizer,
        images,
        config.conv_type,
        config.model_max_length,
        config.too_long,
        budget,
    )
    eval_processor = SampleProcessor.for_model(
        model, tokenizer, images, config.conv_type, pixel_budget=budget
    )
    if rank == 0:
        describe_run(config.log_dir, config, model.token_ids, tokenizer)
        report_recipe(resolved)
        LOGGER.info("configuration: %s", config)
        report_unused_flags(config, model, layout)
        report_chainless_validation(config, model, tokenizer)
    needs_validation = config.eval_only or not config.no_eval
    jobs = (
        build_validation_jobs(
            config.dataset_dir,
            config.val_dataset,
            config.val_json_name,
            config.val_answer,
            config.semantic_val_chunk,
        )
        if needs_validation
        else []
    )
    if config.eval_only:
        return evaluate_only(model, jobs, eval_processor, config, rank, world)
    state.training = True
    return train(model, tokenizer, jobs, processor, config, rank, world)


def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    as_json, argv = split_json_flag(sys.argv[1:] if argv is None else argv)
    resolved = resolve_config(argv)
    config = resolved.config
    if config.print_config:
        print(json.dumps(resolved.to_json(), indent=2), flush=True)
        return None
    if config.estimate_memory:
        return print_memory_plan(config, as_json)
    if as_json:
        raise SystemExit("train_ds.py: --json goes with --estimate_memory")
    state, lock = RunState(launcher_rank()), RunLock(config.log_dir)
    try:
        take_run_lock(lock, config.force_unlock, state.rank)
        state.rank, world = init_distributed()
        result = run(resolved, state, world)
        dist.barrier()
        return result
    # errors that say what is wrong and what to do: one line, once; the traceback goes to the
    # run's log file
    except EXPLAINED_ERRORS as error:
        line = report_error(error, state.log_file, state.rank, met_alone=state.training)
        if line:  # on a line of its own, below any progress bar
            tqdm.write(line, file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        close_distributed()
        lock.release()


if __name__ == "__main__":
    main(sys.argv[1:])
