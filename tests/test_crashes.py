"""Crashes and resume (issue 8), with real processes killed by SIGKILL.

- A process killed inside `save_checkpoint`, at each stage of the save (`CRASH_POINTS`), leaves
  `latest` naming a complete checkpoint; resuming from it continues with the losses of the
  uninterrupted run. Two stages run in the default tier, the others in the slow tier.
- `train_ds.py` on two CPU ranks under the real DeepSpeed launcher, killed (every rank) at a
  seeded random optimizer step, resumes by itself: the steps after the resume give the losses
  of an uninterrupted run (slow tier: three launcher runs).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train_ds import newest_event_file, run, scalars, tiny_flags
from tests.utils.crash_script import EXPECTED_FILE, STEPS_AFTER_SAVE, TRAINED_FILE
from tests.utils.engine_script import FLAGS, rank_batch, train
from tests.utils.test_engine import (  # noqa: F401 (single_rank is a fixture)
    assert_same_tensors,
    free_port,
    single_rank,
    trainable_state,
)
from utils.config import parse_args
from utils.engine import (
    CRASH_POINT_MARKER,
    CRASH_POINTS,
    init_engine,
    load_checkpoint,
    read_latest,
)
from utils.training import PROGRESS_FILE

ROOT = Path(__file__).resolve().parents[1]
CRASH_SCRIPT = ROOT / "tests" / "utils" / "crash_script.py"
DEADLINE_S = 300
POLL_S = 0.05
# stages before `latest` is rewritten must leave the previous checkpoint as the newest
PUBLISHED_AT = "latest"
DEFAULT_TIER_POINTS = ("staged", "best")
EPOCHS, STEPS_PER_EPOCH = 3, 2
KILL_SEED = 7  # kills at step 3: mid-epoch, after the first checkpoint
RUN_FLAGS = [
    "--dataset=refer_seg||multi_part_reason_seg",
    "--sample_rates=1,1",
    "--batch_size=2",
    "--grad_accumulation_steps=1",
    f"--epochs={EPOCHS}",
    f"--steps_per_epoch={STEPS_PER_EPOCH}",
    "--no_eval",
]
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    """Poll `condition()` until true; fail (with the process's stderr) if the process ends or
    DEADLINE_S passes first."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _, stderr = process.communicate()
            pytest.fail(f"{what} never happened:\n{stderr.decode()[-4000:]}")
        time.sleep(POLL_S)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (the launcher's ranks)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so kill_group reaches every rank
    )


# --- SIGKILL inside save_checkpoint ---
CRASH_POINT_PARAMS = [
    pytest.param(point, marks=() if point in DEFAULT_TIER_POINTS else pytest.mark.slow)
    for point in CRASH_POINTS
]


@pytest.mark.usefixtures("single_rank")
@pytest.mark.parametrize("crash_point", CRASH_POINT_PARAMS)
def test_a_process_killed_while_saving_leaves_a_loadable_checkpoint(
    tiny_dir: Path, tmp_path: Path, crash_point: str
) -> None:
    command = [sys.executable, str(CRASH_SCRIPT), "--tiny_dir", str(tiny_dir)]
    command += ["--output", str(tmp_path), "--crash_point", crash_point]
    directory = tmp_path / "ckpt_model"
    marker = directory / CRASH_POINT_MARKER
    process = start(command, {"MASTER_PORT": str(free_port())})
    wait_for(marker.is_file, process, f"a save stopping at {crash_point!r}")
    kill_group(process)
    assert process.returncode == -signal.SIGKILL and marker.read_text() == crash_point
    expected = json.loads((tmp_path / EXPECTED_FILE).read_text())

    from model.tiny import build_tiny_segmenter

    model, tokenizer = build_tiny_segmenter(tiny_dir, seed=1)
    resumed = init_engine(model, parse_args(FLAGS), world_size=1)
    client = load_checkpoint(resumed, directory)  # what --auto_resume does
    if crash_point == PUBLISHED_AT:  # `latest` already names the new, complete checkpoint
        assert read_latest(directory) == expected["tag_b"] and client == {"epoch": 1}
        trained = torch.load(tmp_path / TRAINED_FILE, weights_only=True)
        assert_same_tensors(trainable_state(resumed), trained)
        return
    assert read_latest(directory) == expected["tag_a"] and client == {"epoch": 0}
    losses = train(resumed, rank_batch(model, tokenizer, rank=0), STEPS_AFTER_SAVE)
    assert losses == expected["losses_after_a"]


# --- Two ranks killed at a random step ---
def launcher_command(assets: Path, runs: Path, exp_name: str) -> list[str]:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    flags = [*tiny_flags(assets, runs, exp_name), *RUN_FLAGS]
    return [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "train_ds.py"] + (
        flags
    )


def progress_step(run_dir: Path) -> int:
    path = run_dir / PROGRESS_FILE
    return json.loads(path.read_text())["global_step"] if path.is_file() else 0


@pytest.mark.slow
def test_two_ranks_killed_at_a_random_step_resume_with_the_same_losses(
    assets: Path, tmp_path: Path
) -> None:
    run(launcher_command(assets, tmp_path, "whole"), timeout=900)
    expected = dict(scalars(tmp_path / "whole", "train/loss"))
    assert sorted(expected) == list(range(1, TOTAL_STEPS + 1))
    kill_at = random.Random(KILL_SEED).randint(1, TOTAL_STEPS - 1)
    run_dir = tmp_path / "killed"
    process = start(launcher_command(assets, tmp_path, "killed"))
    wait_for(lambda: progress_step(run_dir) >= kill_at, process, f"step {kill_at}")
    kill_group(process)
    run(launcher_command(assets, tmp_path, "killed"), timeout=900)  # --auto_resume
    resumed = scalars(newest_event_file(run_dir), "train/loss")
    # the resume starts after the last checkpoint written before the kill took effect
    restart = resumed[0][0] - 1
    assert restart % STEPS_PER_EPOCH == 0 and restart <= kill_at + 1, (kill_at, restart)
    assert [step for step, _ in resumed] == list(range(restart + 1, TOTAL_STEPS + 1))
    for step, value in resumed:
        assert value == pytest.approx(expected[step], rel=1e-5), step
