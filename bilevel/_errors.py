"""Typed errors and warnings raised by `bilevel`.

Every guard in the library raises one of these, so callers can catch the
family (`BilevelError`) or a specific failure.  Each message names the call,
the offending value and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "BilevelError",
    "BilevelWarning",
    "ConvergenceError",
    "LinearSolveError",
    "NegativeCurvatureError",
    "NonFiniteError",
    "OptimalityError",
    "StructureError",
]


class BilevelError(RuntimeError):
    """Base class of every error raised by `bilevel` at run time."""


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


class BilevelWarning(UserWarning):
    """Issued instead of an error where the caller asked for ``throw=False``."""
