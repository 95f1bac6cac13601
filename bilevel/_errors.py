"""Typed errors and warnings raised by `bilevel`.

Every guard in the library raises one of these, so callers can catch the
family (`BilevelError`) or a specific failure.  Each message names the call,
the offending value and what to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BilevelError",
    "BilevelWarning",
    "CheckpointError",
    "ConvergenceError",
    "LinearSolveError",
    "NegativeCurvatureError",
    "NonFiniteError",
    "OptimalityError",
    "StructureError",
]


class BilevelError(RuntimeError):
    """Base class of every error raised by `bilevel` at run time.

    Args:
        *args: the message (as for any exception).
        info: diagnostics of the failed call, reachable from the error where the call raised
            before it could return them: for the implicit layers the `bilevel.ImplicitInfo`,
            whose ``solver_result`` holds the inner solver's status, ``reason`` and ``info``.
            ``None`` where there are none.
    """

    def __init__(self, *args: object, info: Any = None) -> None:
        super().__init__(*args)
        self.info = info


class NonFiniteError(BilevelError, FloatingPointError):
    """A NaN or infinity appeared in an input, a solver answer or a gradient."""


class StructureError(BilevelError, ValueError):
    """Two trees of tensors differ in structure, shape, dtype or device."""


class ConvergenceError(BilevelError):
    """An inner solver stopped before reaching its tolerance."""


class OptimalityError(BilevelError):
    """The optimality residual at the returned solution exceeds the threshold.

    The implicit gradient is exact only where the optimality condition holds;
    far from it the gradient can be arbitrarily wrong.
    """


class LinearSolveError(BilevelError):
    """A linear solve in the backward pass missed its tolerance or broke down."""


class NegativeCurvatureError(LinearSolveError):
    """CG met a direction of non-positive curvature: the system is not positive definite."""


class CheckpointError(BilevelError, ValueError):
    """A checkpoint cannot be used: missing, damaged, not written by this library, or of another run.

    The message names the file and what is wrong with it (truncated, empty, a foreign
    ``state_dict``, a configuration that differs from the run being resumed, ...).
    """


class BilevelWarning(UserWarning):
    """Issued instead of an error where the caller asked for ``throw=False``."""
