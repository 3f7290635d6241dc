"""The run's log file and how train_ds.py reports the errors that explain themselves.

Every rank writes its log records to `<run dir>/train_ds.log` (rank 0) or
`train_ds.rank<r>.log`. An error that says what is wrong and what to do (a bad flag or file, a
model/SAM mismatch, a data error, a locked run directory) is printed as one line, once: by rank 0
when every rank meets it at the same point (setup), by the rank that met it during training (a
record one rank's loader read); its full traceback goes to that rank's log file. A data error
re-raised from a DataLoader worker carries the worker's traceback in its message: the one line
is the worker's own last line.
"""

from __future__ import annotations

import logging
import re
import traceback
from pathlib import Path

from utils.datasets.base import DataError

LOG_FILE, RANK_LOG_FILE = "train_ds.log", "train_ds.rank{rank}.log"
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"
# DataLoader re-raises a worker's error as "Caught X in DataLoader worker process N.\nOriginal
# Traceback ...\n<module>.X: message"; the last line is the error as the worker raised it
WORKER_TRACEBACK = "Original Traceback"
EXCEPTION_PREFIX = re.compile(r"^[\w.]+(Error|Exception): ")


def log_path(run_dir: str | Path, rank: int) -> Path:
    name = LOG_FILE if rank == 0 else RANK_LOG_FILE.format(rank=rank)
    return Path(run_dir) / name


def attach_run_log(run_dir: str | Path, rank: int) -> Path:
    """Send every log record of this process to its log file in the run directory too."""
    path = log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return path


def one_line(error: BaseException) -> str:
    """The error's message on one line (a loader worker's error: the worker's message)."""
    text = str(error)
    if WORKER_TRACEBACK in text:
        lines = [line for line in text.splitlines() if line.strip()]
        text = EXCEPTION_PREFIX.sub("", lines[-1].strip())
    return " ".join(text.split())


def report_error(
    error: BaseException, log_file: Path | None, rank: int, met_alone: bool
) -> str | None:
    """Append the traceback to `log_file` (when the run has one) and return the line to print,
    or None when another rank prints it (every rank met it, and this is not rank 0)."""
    if log_file is not None:
        with log_file.open("a", encoding="utf-8") as handle:
            handle.write("".join(traceback.format_exception(error)))
    if rank != 0 and not met_alone:
        return None
    kind = "data error" if isinstance(error, DataError) else "error"
    where = f" (traceback in {log_file})" if log_file is not None else ""
    return f"{kind}: {one_line(error)}{where}"
