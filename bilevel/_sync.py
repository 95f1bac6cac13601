"""When a computation may read device values on the host.

A solver loop can skip work by reading a device value (``bool(active.all())``: every problem
still moves, so no masked copy is needed).  On the CPU that read is free.  On an accelerator it
waits until every queued kernel has run, which leaves the device idle while Python launches the
next ones, and under ``torch.compile`` it breaks the captured graph.  There the loops keep their
per-problem masks and read nothing until they return.

What remains after a loop are its checks (finite inputs and answers, the statuses a solve ended
with) and its results' host values.  Results read theirs on first access (`SolverResult`,
`LinearSolveResult`); inside `deferred_checks` the checks wait for the end of the block, so a
fixed-budget computation (a meta-step) reads nothing on the host until it is complete.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

__all__ = ["defer_check", "deferred_checks", "host_checks"]

# The checks queued by the innermost `deferred_checks` block of this thread or task (None: none).
_QUEUE: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "bilevel_deferred_checks", default=None
)


def host_checks(x: torch.Tensor) -> bool:
    """Whether a loop over tensors like ``x`` may read their values on the host to skip work."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def defer_check(check: Callable[[], None]) -> None:
    """Run ``check`` (which reads device values and raises or warns if they are wrong) now, or,
    inside `deferred_checks`, when that block ends."""
    queue = _QUEUE.get()
    if queue is None:
        check()
    else:
        queue.append(check)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Postpone the checks that read device values on the host to the end of the block.

    Inside the block the checks of `bilevel.implicit_argmin` (and `implicit_root`,
    `fixed_point`) and of the torch inner solvers are queued instead of run: finite theta, init,
    answers and gradients, the inner solver's and the backward solve's statuses, the optimality
    residual (which `ImplicitInfo.residual_norm` then reports from the end of the block).  They
    run in order when the block ends and raise (or warn) exactly as they would have at once.
    With results that read their host values on first access, a fixed-budget computation in the
    block (`bilevel.metalearn.meta_gradient` with ``diagnostics=False``) reads nothing on the host
    until it ends: on an accelerator, Python keeps launching kernels while earlier ones run.

    Values computed after a failed check are computed from the failed values (NaN, a solve that
    did not converge) until the block ends, which then raises the first failed check's error.  An
    exception raised inside the block runs the queued checks first: if one fails, its error is
    raised, chained to the exception (the earlier failure usually explains the later one).
    Blocks nest: an inner block's checks run at the end of the outermost one.

    The queued checks hold what they read (statuses, norms, masks, names), not the answers,
    backward solutions or graphs of the calls, so a block adds no memory that grows with what it
    computes.  An implicit layer's error carries the call's `ImplicitInfo` where the caller still
    holds it (``return_info=True``), else a stand-in with the checks' figures (residual, failed
    problems, the results without their solutions).
    """
    if _QUEUE.get() is not None:
        yield
        return
    queue: list[Callable[[], None]] = []
    token = _QUEUE.set(queue)
    try:
        yield
    except Exception as exc:
        _QUEUE.reset(token)
        try:
            _run(queue)
        except Exception as err:
            raise err from exc
        raise
    except BaseException:
        _QUEUE.reset(token)
        raise
    _QUEUE.reset(token)
    _run(queue)


def _run(queue: list[Callable[[], None]]) -> None:
    while queue:
        queue.pop(0)()
