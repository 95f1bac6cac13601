"""Stopping meta-training from outside: SIGTERM (a batch system's notice) or SIGINT (Ctrl-C).

A signal does not interrupt a meta-step; it ends meta-training after the current one, and the run
is then checkpointed and evaluated as if it had reached ``meta_steps``.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

__all__ = ["StopSignal"]


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
