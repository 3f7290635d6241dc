"""One run per run directory (utils/runlock.py) and errors reported in one line, once, with the
traceback in the run's log file (utils/run_log.py, train_ds.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import LAUNCHER_PORT, ROOT, tiny_flags
from tests.utils.bad_data import truncated_image_mmr
from tools.make_tiny_assets import make_tiny_assets
from utils.run_log import one_line
from utils.runlock import LOCK_FILE, LockOwner, RunLock, RunLockedError

LOCK_WAIT_S = 120
FIRST_RUN_STEPS = 150  # optimizer steps of the run that holds the directory
RUN_TIMEOUT_S = 600


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = LockOwner(host or socket.gethostname(), pid, "2026-01-01 00:00:00 UTC", "train_ds.py")
    (run_dir / LOCK_FILE).write_text(json.dumps(owner.__dict__))


def test_a_live_lock_stops_a_second_owner_and_release_frees_it(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    assert first.acquire() is None and (tmp_path / LOCK_FILE).is_file()
    write_lock(tmp_path, os.getpid())  # a live owner: this very process
    second = RunLock(tmp_path)
    with pytest.raises(RunLockedError, match=rf"in use by another run: pid {os.getpid()} on "):
        second.acquire()
    assert "--force_unlock" in str(pytest.raises(RunLockedError, second.acquire).value)
    assert "live lock (--force_unlock)" in second.acquire(force=True)
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_stale_and_unreadable_locks_are_taken_over_but_not_another_hosts(tmp_path: Path) -> None:
    pid = dead_pid()
    write_lock(tmp_path, pid)
    lock = RunLock(tmp_path)
    assert f"stale lock of pid {pid}" in lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / LOCK_FILE).write_text("{truncated")
    assert "stale lock of an unreadable lock" in RunLock(tmp_path).acquire()
    write_lock(tmp_path, pid, host="another-node")
    with pytest.raises(RunLockedError, match="another-node"):
        RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    lock.acquire()
    write_lock(tmp_path, os.getpid() + 1)
    lock.release()
    assert (tmp_path / LOCK_FILE).is_file()


def test_a_loader_workers_error_is_its_own_last_line() -> None:
    text = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nutils.datasets.base.DataError: a.jpg, '
        "record 3: truncated JPEG (copy it again)\n"
    )
    assert one_line(ValueError(text)) == "a.jpg, record 3: truncated JPEG (copy it again)"
    assert one_line(ValueError("two\nlines")) == "two lines"


def train_ds(*flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train_ds.py", *flags],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def short_run(assets: Path, runs: Path, *extra: str) -> list[str]:
    flags = tiny_flags(assets, runs, "shared") + ["--grad_accumulation_steps=1", "--epochs=1"]
    return [*flags, "--val_dataset=ReasonSeg|val", *extra]


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + LOCK_WAIT_S
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def assert_one_line(stderr: str, *fragments: str) -> str:
    """The error line, checking it is the only line naming an error and no traceback shows."""
    lines = [line for line in stderr.splitlines() if line.startswith(("error:", "data error:"))]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_a_second_run_into_the_same_directory_stops_and_the_first_finishes(
    assets: Path, tmp_path: Path
) -> None:
    # long enough (tens of seconds) to still hold the directory when the second has started
    first = train_ds(*short_run(assets, tmp_path, f"--steps_per_epoch={FIRST_RUN_STEPS}"))
    wait_for(tmp_path / "shared" / LOCK_FILE, first)
    second = train_ds(*short_run(assets, tmp_path, "--steps_per_epoch=6"))
    _, stderr = second.communicate(timeout=RUN_TIMEOUT_S)
    assert first.poll() is None, "the first run ended before the second started: not concurrent"
    assert second.returncode == 1
    assert_one_line(stderr, "in use by another run", f"pid {first.pid}", "--exp_name")
    _, first_err = first.communicate(timeout=RUN_TIMEOUT_S)
    assert first.returncode == 0, first_err[-3000:]
    run_dir = tmp_path / "shared"
    latest = (run_dir / "ckpt_model" / "latest").read_text().strip()
    assert latest == f"global_step{FIRST_RUN_STEPS}"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run_dir / LOCK_FILE).exists()


def test_a_stale_lock_is_reported_and_taken_over(assets: Path, tmp_path: Path) -> None:
    pid = dead_pid()
    write_lock(tmp_path / "shared", pid)
    done = train_ds(*short_run(assets, tmp_path, "--eval_only"))
    _, stderr = done.communicate(timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, stderr[-3000:]
    assert f"took over the stale lock of pid {pid}" in stderr
    assert not (tmp_path / "shared" / LOCK_FILE).exists()


def test_a_contradicting_out_dim_stops_in_one_line_with_the_traceback_in_the_log(
    assets: Path, tmp_path: Path
) -> None:
    flags = [f for f in short_run(assets, tmp_path, "--eval_only") if not f.startswith("--out_dim")]
    followed = train_ds(*flags)  # no --out_dim: the tiny SAM's 32
    assert followed.wait(timeout=RUN_TIMEOUT_S) == 0, followed.communicate()[1][-3000:]
    stopped = train_ds(*flags, "--out_dim=256")
    _, stderr = stopped.communicate(timeout=RUN_TIMEOUT_S)
    assert stopped.returncode == 1
    log = tmp_path / "shared" / "train_ds.log"
    assert_one_line(stderr, "--out_dim 256 must equal the SAM prompt width 32", str(log))
    assert "Traceback (most recent call last)" in log.read_text()


def test_a_data_error_in_a_loader_worker_surfaces_as_one_line(tmp_path: Path) -> None:
    assets = make_tiny_assets(tmp_path / "assets", images_per_split=2)
    said = truncated_image_mmr(assets / "dataset")
    flags = tiny_flags(assets, tmp_path, "bad") + [
        "--dataset=multi_part_reason_seg",
        "--sample_rates=1",
        "--workers=1",
        "--steps_per_epoch=8",
        "--grad_accumulation_steps=1",
        "--no_eval",
    ]
    done = train_ds(*flags)
    _, stderr = done.communicate(timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1
    line = assert_one_line(stderr, *said.train)
    assert line.startswith("data error:") and "DataLoader worker" not in line


def test_an_error_every_rank_meets_is_printed_once_under_the_launcher(
    assets: Path, tmp_path: Path
) -> None:
    """Two ranks both fail to build the model: rank 0 alone prints the line."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    flags = [f for f in short_run(assets, tmp_path, "--eval_only") if not f.startswith("--out_dim")]
    command = [str(deepspeed), "--num_gpus", "2", "--master_port", str(LAUNCHER_PORT + 2)]
    done = subprocess.run(
        [*command, "train_ds.py", *flags, "--out_dim=256"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode != 0
    assert_one_line(done.stdout + done.stderr, "--out_dim 256 must equal the SAM prompt width 32")
    assert "Traceback (most recent call last)" in (tmp_path / "shared" / "train_ds.log").read_text()
    assert (tmp_path / "shared" / "train_ds.rank1.log").is_file()
