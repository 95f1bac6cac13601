"""Stopping meta-training from outside: SIGTERM (a batch system's notice) or SIGINT (Ctrl-C).

A signal does not interrupt a meta-step; it ends meta-training after the current one, and the run
is then checkpointed and evaluated as if it had reached ``meta_steps``.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["StopSignal", "exit_on_sigterm"]


class StopSignal:
    """Whether SIGTERM or SIGINT arrived; a context manager that installs and restores the handlers.

    Outside the main thread no handler can be installed: the run then stops by ``time_limit`` only.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[signal.Signals, Any] = {}

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __call__(self) -> bool:
        """Whether a stop was requested."""
        return self.requested

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._request)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Inside, SIGTERM raises ``SystemExit(143)`` where it would otherwise kill the process outright.

    Python's default SIGTERM ends the process without unwinding, so no ``finally`` runs and a run
    folder's lock (`bilevel.metalearn.training.runlock.RunLock`) would stay behind.  A handler
    installed by someone else is kept; `StopSignal`, entered inside, replaces this one while
    meta-training runs (a stop after the current step) and restores it.  Outside the main thread
    nothing is installed.
    """
    installed = False
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _exit)
            installed = True
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
