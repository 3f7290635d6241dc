"""utils/engine.py: the pure DeepSpeed config against the reference run behaviour, RNG state,
the checkpoint layout and its atomicity, and real single-process DeepSpeed engines on CPU
(save, resume, identical continuation, non-finite losses skipped). A two-rank launcher run is in
the slow tier."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.batch import Batch
from tests.utils.engine_script import train
from tests.utils.unsafe_checkpoints import write_unsafe_deepspeed_checkpoint
from utils import engine as engine_module
from utils.config import parse_args
from utils.engine import (
    BEST_FILE,
    CLIENT_KEY,
    LATEST_FILE,
    STAGING_DIR,
    checkpoint_tag,
    deepspeed_config,
    find_resume_directory,
    init_engine,
    load_checkpoint,
    param_groups,
    read_best,
    read_latest,
    restore_rng_state,
    rng_state,
    samples_per_epoch,
    save_checkpoint,
    warmup_steps,
)
from utils.training import NonFiniteLossError, RunLogger, train_epoch
from utils.weights import UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[2]
# A short fp32 run: two warm-up steps at lr 0 (DeepSpeed's 2-step minimum, starting at 0),
# then visible updates.
SHORT_RUN = (
    "--precision fp32 --batch_size 1 --grad_accumulation_steps 1 --epochs 1 --steps_per_epoch 10"
    " --lr 0.01"
).split()
STEPS_BEFORE_SAVE = 4
STEPS_AFTER_SAVE = 2


# --- The pure config ---
def test_default_flags_give_the_reference_config() -> None:
    config = deepspeed_config(parse_args([]), world_size=8)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 10
    assert config["train_batch_size"] == 2 * 10 * 8
    assert config["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.0, "torch_adam": True},
    }
    assert config["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {
            "total_num_steps": 10 * 500,
            "warmup_min_lr": 0,
            "warmup_max_lr": 3e-4,
            "warmup_num_steps": 100,
            "warmup_type": "linear",
        },
    }
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {
        "stage": 2,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 500_000_000,
        "allgather_bucket_size": 500_000_000,
    }
    assert config["steps_per_print"] >= 10**6


def test_gsva_command_line() -> None:
    gsva = parse_args(["--batch_size", "20", "--grad_accumulation_steps", "1", "--lr", "1e-4"])
    config = deepspeed_config(gsva, world_size=4)
    assert config["train_batch_size"] == 80 and config["gradient_accumulation_steps"] == 1
    assert config["scheduler"]["params"]["warmup_max_lr"] == 1e-4


@pytest.mark.parametrize(
    ("precision", "fp16", "bf16"),
    [("fp32", False, False), ("fp16", True, False), ("bf16", False, True)],
)
def test_precision(precision: str, fp16: bool, bf16: bool) -> None:
    config = deepspeed_config(parse_args(["--precision", precision]), world_size=1)
    assert config["fp16"]["enabled"] is fp16 and config["bf16"]["enabled"] is bf16


def test_zero_stage_3() -> None:
    zero = deepspeed_config(parse_args(["--zero_stage", "3"]), world_size=2)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["overlap_comm"] and zero["contiguous_gradients"]
    assert "reduce_scatter" not in zero and "offload_optimizer" not in zero


def test_offload_optimizer_uses_deepspeed_cpu_adam() -> None:
    config = deepspeed_config(parse_args(["--offload_optimizer"]), world_size=1)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    # without torch_adam DeepSpeed picks its compiled CPU Adam for offloaded states
    assert "torch_adam" not in config["optimizer"]["params"]


def test_config_is_pure_and_serialisable() -> None:
    flags = parse_args([])
    assert deepspeed_config(flags, 2) == deepspeed_config(flags, 2)
    assert json.loads(json.dumps(deepspeed_config(flags, 2))) == deepspeed_config(flags, 2)
    with pytest.raises(ValueError, match="world_size"):
        deepspeed_config(flags, 0)


def test_group_rates_give_each_optimizer_group_its_own_peak() -> None:
    config = parse_args(["--lr", "0.002", "--group_lr", "lora=0.0002"])
    scheduler = deepspeed_config(config, 2, [0.002, 0.0002])["scheduler"]["params"]
    assert scheduler["warmup_max_lr"] == [0.002, 0.0002] and scheduler["warmup_min_lr"] == 0
    # one group (or none given) keeps DeepSpeed's scalar, the reference config
    assert deepspeed_config(config, 2, [0.002]) == deepspeed_config(
        parse_args(["--lr", "0.002"]), 2
    )


def test_warmup_steps() -> None:
    assert warmup_steps(5000) == 100 and warmup_steps(101) == 100
    # runs not longer than the warm-up reach their peak lr early (DeepSpeed's minimum is 2)
    assert warmup_steps(100) == 10 and warmup_steps(10) == 2


def test_samples_per_epoch() -> None:
    assert samples_per_epoch(parse_args([]), world_size=8) == 2 * 10 * 500 * 8
    short = parse_args(SHORT_RUN)
    assert samples_per_epoch(short, world_size=2) == 1 * 1 * 10 * 2


# --- RNG state ---
def draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    state = rng_state()
    expected = draw()
    torch.save(state, tmp_path / "rng.pt")
    draw()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    python, numpy, tensor = draw()
    assert (python, numpy) == expected[:2] and torch.equal(tensor, expected[2])


# --- Resume directory ---
def test_find_resume_directory(tmp_path: Path) -> None:
    base = ["--log_base_dir", str(tmp_path), "--exp_name", "exp"]
    assert find_resume_directory(parse_args(base)) is None
    directory = tmp_path / "exp" / "ckpt_model"
    directory.mkdir(parents=True)
    assert find_resume_directory(parse_args(base)) is None  # no `latest` yet
    (directory / LATEST_FILE).write_text("global_step500")
    assert find_resume_directory(parse_args(base)) == directory
    assert find_resume_directory(parse_args([*base, "--no-auto_resume"])) is None
    assert find_resume_directory(parse_args([*base, "--eval_only"])) is None
    other = tmp_path / "other"
    with pytest.raises(FileNotFoundError, match="latest"):
        find_resume_directory(parse_args([*base, "--resume", str(other)]))
    assert find_resume_directory(parse_args([*base, "--resume", str(directory)])) == directory


# --- Checkpoint layout (a stand-in engine that writes DeepSpeed's files) ---
class FileWritingEngine:
    """Writes what DeepSpeed's save_checkpoint writes: tag files and the recovery script."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # `latest` is ours to write, last
        (Path(save_dir) / tag).mkdir()
        torch.save(client_state, Path(save_dir) / tag / "mp_rank_00_model_states.pt")
        (Path(save_dir) / "zero_to_fp32.py").write_text("# script")


def tag_directories(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir() if path.is_dir()}


def test_layout_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    directory, engine = tmp_path / "ckpt_model", FileWritingEngine()
    steps = [(10, 0.5, True), (20, 0.4, False), (30, None, False), (40, 0.6, True)]
    kept = [{"global_step10"}, {"global_step10", "global_step20"}]
    kept += [{"global_step10", "global_step30"}, {"global_step40"}]
    for (step, score, is_best), expected in zip(steps, kept, strict=True):
        assert save_checkpoint(engine, directory, checkpoint_tag(step), {}, score) is is_best
        assert read_latest(directory) == checkpoint_tag(step)
        assert tag_directories(directory) == expected
    assert read_best(directory) == {"tag": "global_step40", "score": 0.6}
    assert (directory / "zero_to_fp32.py").is_file()
    assert not (directory / STAGING_DIR).exists()


def test_resaving_a_tag_replaces_it(tmp_path: Path) -> None:
    directory, engine = tmp_path / "ckpt_model", FileWritingEngine()
    save_checkpoint(engine, directory, "global_step5", {"epoch": 0})
    save_checkpoint(engine, directory, "global_step5", {"epoch": 1})
    saved = torch.load(directory / "global_step5" / "mp_rank_00_model_states.pt", weights_only=True)
    assert saved[CLIENT_KEY]["epoch"] == 1 and tag_directories(directory) == {"global_step5"}


# --- Real DeepSpeed engines on CPU (one process, gloo) ---
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def single_rank():
    """The environment the launcher would give rank 0 of 1; torch.distributed is initialised
    once by the first engine and stays up for the session (it cannot be re-initialised)."""
    env = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.setenv("MASTER_PORT", os.environ.get("MASTER_PORT", str(free_port())))
        yield


@pytest.fixture(scope="module")
def training_batch(tiny_dir):
    from model.tiny import build_tiny_segmenter
    from tests.helpers import Conversation, make_batch

    model, tokenizer = build_tiny_segmenter(tiny_dir, seed=0)
    masks = [torch.ones(1, 40, 56, dtype=torch.uint8), torch.zeros(1, 48, 30, dtype=torch.uint8)]
    conversations = [
        Conversation(0, "Can you segment the red circle?", "Sure, [SEG]."),
        Conversation(1, "Please segment the green car.", "It is [SEG]."),
    ]
    return make_batch(model, tokenizer, [(40, 56), (48, 30)], conversations, masks)


def new_engine(tiny_dir: Path, seed: int, *flags: str):
    from model.tiny import build_tiny_segmenter

    model, _ = build_tiny_segmenter(tiny_dir, seed=seed)
    return init_engine(model, parse_args([*SHORT_RUN, *flags]), world_size=1)


def test_group_lr_trains_each_trainable_group_at_its_rate(
    single_rank, tiny_dir, training_batch
) -> None:
    from model.tiny import build_tiny_segmenter

    flags = parse_args([*SHORT_RUN, "--group_lr", "lora=0.001,lm_head=0.001"])
    model, _ = build_tiny_segmenter(tiny_dir, seed=0)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    slow = {name for name in trainable if ".lora_" in name or name.startswith("llava.lm_head.")}
    groups = param_groups(model, flags)
    assert [group["lr"] for group in groups] == [0.01, 0.001]
    assert {names[id(p)] for p in groups[1]["params"]} == slow
    assert {names[id(p)] for p in groups[0]["params"]} == trainable - slow
    assert any("mask_decoder" in name for name in trainable - slow) and len(slow) > 2
    engine = init_engine(model, flags, world_size=1)
    train(engine, training_batch, 4)
    fast_lr, slow_lr = engine.get_lr()
    assert fast_lr > 0 and slow_lr == pytest.approx(fast_lr / 10)
    assert [g["lr"] for g in engine.optimizer.param_groups] == [fast_lr, slow_lr]


def trainable_state(engine) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters (gathered from their ZeRO-3 partitions)."""
    import deepspeed

    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([parameter for _, parameter in trainable]):
        return {name: parameter.detach().clone() for name, parameter in trainable}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize(
    ("zero_stage", "persistence_threshold"),
    [("2", None), ("3", None), ("3", 0)],
    ids=["zero2", "zero3", "zero3-all-partitioned"],
)
def test_resume_continues_exactly_like_the_uninterrupted_run(
    single_rank, tiny_dir, training_batch, tmp_path, monkeypatch, zero_stage, persistence_threshold
) -> None:
    if persistence_threshold is not None:
        # the tiny model's parameters are all below the threshold: partition them anyway
        monkeypatch.setattr(
            engine_module, "STAGE3_PARAM_PERSISTENCE_THRESHOLD", persistence_threshold
        )
    directory = tmp_path / "ckpt_model"
    client = {"epoch": 0, "global_step": STEPS_BEFORE_SAVE, "best_score": 0.25, "sampler": 7}
    first = new_engine(tiny_dir, 0, "--zero_stage", zero_stage)
    if persistence_threshold is not None:
        assert any(parameter.numel() == 0 for parameter in first.module.parameters())
    losses = train(first, training_batch, STEPS_BEFORE_SAVE)
    assert losses[-1] != losses[0]  # the run learns before the save
    tag = checkpoint_tag(first.global_steps)
    assert save_checkpoint(first, directory, tag, client, score=0.25)
    saved_params, saved_scheduler = trainable_state(first), first.lr_scheduler.state_dict()
    after_save = torch.rand(4)  # the RNG stream the continuation sees (LoRA dropout)
    expected_losses = train(first, training_batch, STEPS_AFTER_SAVE)

    torch.manual_seed(1234)  # a resumed process starts elsewhere in every respect
    resumed = new_engine(tiny_dir, 1, "--zero_stage", zero_stage)
    before_load = trainable_state(resumed)
    assert any(not torch.equal(before_load[name], saved_params[name]) for name in saved_params)
    assert load_checkpoint(resumed, directory) == client
    assert torch.equal(torch.rand(4), after_save)
    assert_same_tensors(trainable_state(resumed), saved_params)
    assert resumed.global_steps == STEPS_BEFORE_SAVE
    # AdamW's step count in every state (ZeRO's flat partitions)
    steps = {int(state["step"]) for state in resumed.optimizer.optimizer.state.values()}
    assert steps == {STEPS_BEFORE_SAVE}
    assert resumed.lr_scheduler.state_dict() == saved_scheduler
    assert train(resumed, training_batch, STEPS_AFTER_SAVE) == expected_losses
    assert_same_tensors(trainable_state(resumed), trainable_state(first))


def test_no_checkpoint_loads_as_none(single_rank, tiny_dir, tmp_path) -> None:
    engine = new_engine(tiny_dir, 0)
    assert load_checkpoint(engine, tmp_path / "ckpt_model") is None
    with pytest.raises(FileNotFoundError, match="global_step9"):
        load_checkpoint(engine, tmp_path, tag="global_step9")


def test_fp16_on_a_cpu_fails_before_deepspeed(single_rank, tiny_dir) -> None:
    from deepspeed.accelerator import get_accelerator

    # CPUs with AVX512-FP16 (oneDNN fp16) support it, as GPUs do
    if get_accelerator().is_fp16_supported():
        pytest.skip("fp16 is supported by this accelerator")
    with pytest.raises(ValueError, match="fp16"):
        new_engine(tiny_dir, 0, "--precision", "fp16")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "optimizer"),
    [(["--offload_optimizer"], "DeepSpeedCPUAdam"), (["--precision", "bf16"], "AdamW")],
    ids=["offload", "bf16"],
)
def test_offload_and_bf16_train(single_rank, tiny_dir, training_batch, flags, optimizer) -> None:
    """Offload compiles DeepSpeed's CPU Adam on first use (about a minute)."""
    engine = new_engine(tiny_dir, 0, *flags)
    assert type(engine.basic_optimizer).__name__ == optimizer
    losses = train(engine, training_batch, STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("killed_in", ["_move_into_place", "_write_atomically"])
def test_a_save_killed_part_way_leaves_the_previous_checkpoint(
    single_rank, tiny_dir, training_batch, tmp_path, monkeypatch, killed_in
) -> None:
    directory = tmp_path / "ckpt_model"
    engine = new_engine(tiny_dir, 0)
    train(engine, training_batch, STEPS_BEFORE_SAVE)
    save_checkpoint(engine, directory, checkpoint_tag(engine.global_steps), {"epoch": 0}, 0.1)
    saved_params = trainable_state(engine)
    train(engine, training_batch, 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(engine_module, killed_in, killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(engine, directory, checkpoint_tag(engine.global_steps), {"epoch": 1}, 0.2)
    monkeypatch.undo()
    assert read_latest(directory) == checkpoint_tag(STEPS_BEFORE_SAVE)
    assert read_best(directory)["tag"] == checkpoint_tag(STEPS_BEFORE_SAVE)

    resumed = new_engine(tiny_dir, 1)
    assert load_checkpoint(resumed, directory) == {"epoch": 0}
    assert resumed.global_steps == STEPS_BEFORE_SAVE
    assert_same_tensors(trainable_state(resumed), saved_params)
    # the next save clears what the killed one left behind
    save_checkpoint(resumed, directory, "global_step99", {"epoch": 2})
    assert tag_directories(directory) == {checkpoint_tag(STEPS_BEFORE_SAVE), "global_step99"}


def test_resuming_from_a_checkpoint_that_holds_code_refuses_it(single_rank, tiny_dir, tmp_path):
    """DeepSpeed unpickles with weights_only=False; load_checkpoint forces weights-only loads."""
    marker = tmp_path / "code_ran"
    directory = write_unsafe_deepspeed_checkpoint(tmp_path / "ckpt_model", marker, "global_step1")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_checkpoint(new_engine(tiny_dir, 0), directory)
    assert not marker.exists()


# --- Non-finite losses on a real engine ---
def poisoned(batch: Batch) -> Batch:
    """`batch` with NaN CLIP pixels: its loss is NaN (as after a bad sample or an overflow)."""
    return replace(batch, clip_pixels=torch.full_like(batch.clip_pixels, float("nan")))


def epoch_of(engine, batches: list, logs: Path, **options) -> list[float]:
    return train_epoch(
        engine,
        batches,
        device="cpu",
        dtype=torch.float32,
        logger=RunLogger(logs, rank=1),
        epoch=0,
        progress=False,
        **options,
    )


def dropout_free_engine(tiny_dir: Path, zero_stage: str):
    """train_epoch trains in training mode: without LoRA dropout, runs are exactly comparable."""
    from model.tiny import build_tiny_segmenter

    model, _ = build_tiny_segmenter(tiny_dir, seed=0, lora_dropout=0.0)
    return init_engine(model, parse_args([*SHORT_RUN, "--zero_stage", zero_stage]), world_size=1)


@pytest.mark.parametrize("zero_stage", ["2", "3"], ids=["zero2", "zero3"])
def test_non_finite_batches_are_skipped_cleanly_and_a_run_of_them_stops(
    single_rank, tiny_dir, training_batch, tmp_path, zero_stage
) -> None:
    good, bad = training_batch, poisoned(training_batch)
    clean = epoch_of(dropout_free_engine(tiny_dir, zero_stage), [good] * 3, tmp_path)
    engine = dropout_free_engine(tiny_dir, zero_stage)
    skipping = epoch_of(engine, [good, bad, good, bad, good], tmp_path)
    # the NaN forwards left no trace: same steps, same losses as without them
    assert engine.global_steps == 3 and skipping == clean
    directory = tmp_path / "ckpt_model"
    save_checkpoint(engine, directory, checkpoint_tag(engine.global_steps), {"epoch": 0})
    saved = trainable_state(engine)
    with pytest.raises(NonFiniteLossError, match="3 micro-batches in a row"):
        epoch_of(engine, [bad] * 3 + [good], tmp_path)
    assert engine.global_steps == 3
    assert all(tensor.isfinite().all() for tensor in trainable_state(engine).values())
    resumed = new_engine(tiny_dir, 1, "--zero_stage", zero_stage)
    assert load_checkpoint(resumed, directory) == {"epoch": 0}
    assert_same_tensors(trainable_state(resumed), saved)


# --- Two CPU ranks through the real launcher ---
@pytest.mark.slow
def test_two_ranks_resume_and_consolidate(tmp_path: Path) -> None:
    """`deepspeed --num_gpus 2` runs tests/utils/engine_script.py: train, save, continue,
    resume in fresh engines on both ranks; zero_to_fp32.py then rebuilds the trained weights."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher is not None, "the deepspeed launcher is not installed in this environment"
    script = ROOT / "tests" / "utils" / "engine_script.py"
    command = [launcher, *f"--num_gpus 2 --master_port {free_port()} {script}".split()]
    command += ["--output", str(tmp_path)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["resumed_losses"] == result["expected_losses"]
    assert result["steps_after_one_rank_non_finite"] == [2, 2]
    assert result["client_state"] == {"epoch": 0, "global_step": STEPS_BEFORE_SAVE}
    directory = tmp_path / "ckpt_model"
    assert (directory / LATEST_FILE).read_text() == checkpoint_tag(STEPS_BEFORE_SAVE)
    assert json.loads((directory / BEST_FILE).read_text())["score"] == 0.5
    consolidated = tmp_path / "consolidated"
    recovery = [sys.executable, str(directory / "zero_to_fp32.py"), str(directory)]
    subprocess.run([*recovery, str(consolidated)], check=True, cwd=ROOT)
    weights = {}  # pytorch_model.bin, or shards of it for a large model (REFERENCE 3.4)
    for shard in consolidated.glob("*.bin"):
        weights.update(torch.load(shard, weights_only=True))
    trained = torch.load(tmp_path / "trained.pt", weights_only=True)
    for name, tensor in trained.items():
        assert torch.equal(weights[name], tensor), name


CHAIN_RUN_TIMEOUT_S = 300


@pytest.mark.parametrize("segmenter", ["sam", "sam2"])
def test_two_ranks_chain_when_only_one_batch_holds_a_chain(segmenter: str, tmp_path: Path) -> None:
    """`deepspeed --num_gpus 2` runs tests/utils/chain_engine_script.py: ZeRO-3 with a chain
    token and every parameter partitioned, one rank's batch chained and the other's without any
    chain token or [SEG] (then a plain [SEG] against a chained [REJ]), with SAM and with SAM 2.
    Every rank must run the same module calls, else the parameter gathers never match and the
    run fails or hangs until the timeout."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert launcher is not None, "the deepspeed launcher is not installed in this environment"
    script = ROOT / "tests" / "utils" / "chain_engine_script.py"
    command = [launcher, *f"--num_gpus 2 --master_port {free_port()} {script}".split()]
    command += ["--output", str(tmp_path), "--partition_all", "--segmenter", segmenter]
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=CHAIN_RUN_TIMEOUT_S
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    for rank in result["ranks"]:
        assert all(np.isfinite(loss) for phase in rank["losses"] for loss in phase)
        assert rank["partitioned"] > 0
