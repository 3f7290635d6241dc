"""One run per run directory: `runs/<exp_name>/run.lock`, taken before anything is written there.

Two launches of one command (a second terminal, a scheduler retry) would otherwise write
checkpoints into one `ckpt_model/` and resume from each other's files. The lock file is created
atomically (O_CREAT | O_EXCL) and holds the owner's host, pid, start time and command line; it is
removed when the run ends. A lock whose owner is gone (same host, pid no longer alive) is stale:
it is reported and taken over. A live owner, or one on another host (whose pids cannot be
checked), stops the second run with a message naming it, unless `--force_unlock` is given.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
    """The run directory belongs to another run; the message says which and what to do."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run directory."""

    host: str
    pid: int
    started: str
    command: str

    @classmethod
    def this_process(cls) -> LockOwner:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            command=" ".join(sys.argv),
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_owner(path: Path) -> LockOwner | None:
    """The owner written in a lock file, or None when it is unreadable (a crash mid-write)."""
    try:
        return LockOwner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_stale(owner: LockOwner | None) -> bool:
    """An unreadable lock, or one whose owner ran on this host and no longer exists."""
    return owner is None or (owner.host == socket.gethostname() and not pid_alive(owner.pid))


class RunLock:
    """The lock of one run directory: `acquire()` before writing, `release()` at the end."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.owner = LockOwner.this_process()
        self.held = False

    def acquire(self, force: bool = False) -> str | None:
        """Take the lock. Returns a note when a stale (or, with `force`, a live) lock was taken
        over, else None; RunLockedError when another run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        if self.path.exists():
            other = read_owner(self.path)
            if not (force or is_stale(other)):
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run: "
                    f"{other.describe() if other else 'unknown owner'}; use another --exp_name "
                    f"(or --log_base_dir), or, if that run is gone, --force_unlock"
                )
            who = other.describe() if other else "an unreadable lock"
            kind = "live lock (--force_unlock)" if other and not is_stale(other) else "stale lock"
            note = f"took over the {kind} of {who} in {self.path}"
            self.path.unlink(missing_ok=True)
        self._create()
        self.held = True
        return note

    def _create(self) -> None:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError as error:  # another run created it between our check and now
            other = read_owner(self.path)
            raise RunLockedError(
                f"{self.path.parent} was just taken by another run: "
                f"{other.describe() if other else 'unknown owner'}; use another --exp_name"
            ) from error
        with os.fdopen(descriptor, "w") as handle:
            json.dump(asdict(self.owner), handle)

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if self.held and read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self.held = False
