"""What a run shows while it works: a start-up banner, progress, results.

`Console` writes to standard error (standard output stays for results): a tqdm bar where the
stream is a terminal and tqdm is installed, plain lines otherwise (a log file, a pipe, a batch
job, ``--no-progress``), or nothing.  Plain lines appear every ``every`` updates and when a
bar closes (at most one per ``min_interval`` seconds, so that a log does not fill with them),
so a run without a terminal still says where it is.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Literal, TextIO, Union

__all__ = ["Console", "Progress", "ProgressMode"]

#: ``auto``: a bar on a terminal (with tqdm), plain lines otherwise; ``bar``: a bar where tqdm is
#: installed; ``lines``: plain lines; ``none``: nothing.  ``True`` means ``auto``, ``False`` ``none``.
ProgressMode = Union[bool, Literal["auto", "bar", "lines", "none"]]

_MODES = ("auto", "bar", "lines", "none")


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """One counted activity (meta-steps, evaluated tasks): a tqdm bar or plain lines.

    Use `Console.progress` to make one; `update` it, `close` it (or use it as a context manager).
    """

    def __init__(
        self, console: Console, total: int, desc: str, *, unit: str, initial: int = 0, every: int = 1
    ) -> None:
        self.console = console
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.every = max(1, every)
        self.postfix = ""
        self.t0 = time.perf_counter()
        self.last: float | None = None  # when the last plain line was written
        self.n0 = initial
        self.bar: Any = None
        if console.mode == "bar":
            tqdm = _tqdm()
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                dynamic_ncols=True,
                file=console.stream,
                leave=True,
            )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Count ``n`` more; ``postfix`` values (``loss="0.41"``) are shown beside the count."""
        self.n += n
        if postfix:
            self.postfix = "  ".join(f"{k} {v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.console.mode == "lines" and self.n % self.every == 0 and self.n < self.total:
            if self.last is None or time.perf_counter() - self.last >= self.console.min_interval:
                self._line()

    def _line(self) -> None:
        dt = time.perf_counter() - self.t0
        done = self.n - self.n0
        rate = f", {dt / done:.2f} s/{self.unit}" if done > 0 else ""
        extra = f"  {self.postfix}" if self.postfix else ""
        self.console.line(f"{self.desc}: {self.n}/{self.total} {self.unit}s{extra} [{dt:.0f} s{rate}]")
        self.last = time.perf_counter()

    def close(self) -> None:
        """End the activity (a plain line with the final count in ``lines`` mode)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.console.mode == "lines":
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Console:
    """Where the banner, progress and periodic results go.

    Args:
        mode: a `ProgressMode`.
        stream: where to write (default: standard error).
        min_interval: seconds between two plain progress lines of one activity (``lines`` mode).

    Raises:
        ValueError: an unknown ``mode``.
    """

    def __init__(
        self, mode: ProgressMode = "auto", stream: TextIO | None = None, *, min_interval: float = 10.0
    ) -> None:
        self.min_interval = min_interval
        if mode is True:
            mode = "auto"
        elif mode is False:
            mode = "none"
        if mode not in _MODES:
            raise ValueError(f"progress={mode!r}: choose True, False or one of {', '.join(_MODES)}")
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.hint = ""
        if mode == "auto":
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
            mode = "bar" if tty and _tqdm() is not None else "lines"
            if tty and _tqdm() is None:
                self.hint = "(no progress bar: tqdm is not installed; pip install bilevel[progress])"
        elif mode == "bar" and _tqdm() is None:
            mode = "lines"
            self.hint = "(no progress bar: tqdm is not installed; pip install bilevel[progress])"
        self.mode: str = mode

    @property
    def quiet(self) -> bool:
        """Nothing is shown."""
        return self.mode == "none"

    def line(self, text: str) -> None:
        """Print one line (above an open tqdm bar, without breaking it)."""
        if self.quiet:
            return
        tqdm = _tqdm() if self.mode == "bar" else None
        if tqdm is not None:
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def progress(self, total: int, desc: str, *, unit: str, initial: int = 0, every: int = 1) -> Progress:
        """A `Progress` of ``total`` units (plain lines every ``every`` units in ``lines`` mode)."""
        return Progress(self, total, desc, unit=unit, initial=initial, every=every)
