"""One run per folder: the lock a training run holds on its ``--out`` for its whole lifetime.

The lock is the file ``<out>/run.lock``, created atomically (``O_CREAT | O_EXCL``: of two runs that
start together, exactly one creates it) and holding the owner's pid, host and a token.  It is
removed when the run ends, whether it finishes, raises, or is stopped by Ctrl-C or SIGTERM
(`bilevel.metalearn.training.signals.exit_on_sigterm`).  A lock left by a killed run (SIGKILL, a
crashed machine) names a pid that no longer runs on this host: the next run replaces it and warns.
A lock of another host cannot be checked from here and is never replaced.  (Two runs that find the
same stale lock at the same instant can both replace it: the window is the few microseconds between
one's unlink and create; a lock held by a live run is never replaced.)

Without it, two trainings into one folder both ran: the check for an existing run looks for
``checkpoint.pt``, which is first written after ``checkpoint_every`` steps.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from ... import BilevelError, BilevelWarning
from .signals import exit_on_sigterm

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

#: The lock's file name inside the run folder.
LOCK_NAME = "run.lock"


class RunLockedError(BilevelError):
    """Another run holds the folder's lock: the message names the folder and the holder."""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return True  # cannot tell: treat as alive, never take a live run's folder
    return True


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's record, or ``None`` where it is unreadable (being written, or damaged)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _describe(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "an unreadable lock (a run starting this instant, or a damaged file)"
    return f"pid {rec.get('pid')} on {rec.get('host')} (since {rec.get('started')})"


class RunLock:
    """The lock of a run folder; a context manager that holds it from entry to exit.

    Entry creates the folder (if missing) and the lock; exit removes the lock (only if it is still
    this run's) and the folder where entry created it and nothing else was written there.  Inside,
    SIGTERM exits the process by ``SystemExit`` (so the lock is released) wherever no other handler
    was installed.

    Args:
        folder: the run folder (``--out``).

    Raises:
        RunLockedError: on entry, where a live run holds the folder (or a run on another host, or
            an unreadable lock): the message names the folder, the holder and what to do.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._token = secrets.token_hex(8)
        self._made_folder = False
        self._sigterm: Any = None

    def _create(self) -> bool:
        """Create the lock file with this run's record; ``False`` where it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": self._token,
        }
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True

    def acquire(self) -> None:
        """Take the lock (see the class).

        Raises:
            RunLockedError: the folder is held by another run.
        """
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._create():
            return
        rec = _holder(self.path)
        stale = (
            rec is not None
            and rec.get("host") == socket.gethostname()
            and isinstance(rec.get("pid"), int)
            and not _alive(rec["pid"])
        )
        if stale:
            warnings.warn(
                f"{self.folder}: replacing the stale lock {self.path} of {_describe(rec)}, a process that no "
                "longer runs (a run killed before it could release it)",
                BilevelWarning,
                stacklevel=3,
            )
            self.path.unlink(missing_ok=True)
            if self._create():
                return
            rec = _holder(self.path)  # another run replaced it first: it holds the folder now
        raise RunLockedError(
            f"{self.folder} is in use by another run: {self.path} is held by {_describe(rec)}; wait for "
            f"that run to end or choose another --out (delete {self.path} only if no run is using the folder)"
        )

    def release(self) -> None:
        """Remove the lock if it is still this run's, and a folder entry created that stayed empty."""
        rec = _holder(self.path)
        if rec is not None and rec.get("token") == self._token:
            self.path.unlink(missing_ok=True)
        if self._made_folder:
            try:
                self.folder.rmdir()  # only where empty: a refused run leaves no folder behind
            except OSError:
                pass

    @property
    def held(self) -> bool:
        """Whether the lock file exists and is this run's."""
        rec = _holder(self.path)
        return rec is not None and rec.get("token") == self._token

    def __enter__(self) -> RunLock:
        self.acquire()
        self._sigterm = exit_on_sigterm()
        self._sigterm.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._sigterm.__exit__(kind, err, tb)
        finally:
            self.release()
