"""Immutable results returned by inner solvers and linear solves."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ._status import LinearStatus, SolverStatus
from ._types import TensorTree

__all__ = ["LinearSolveResult", "SolverResult"]


@dataclasses.dataclass(frozen=True)
class SolverResult:
    """What an inner solver returns.

    Attributes:
        x: the solution, with the structure, shapes, dtypes and devices of ``init``.
        status: why the solver stopped.
        n_iter: iterations taken (the solver's own unit: GD steps, Newton steps, ...).
        grad_norm: Euclidean norm of grad_phi G at ``x`` as measured by the solver,
            or NaN where the solver does not report it.
        n_fev: objective evaluations.
        n_gev: gradient evaluations.
        n_hvp: Hessian-vector products.
        fun: objective value at ``x`` (NaN if unknown).
        info: solver-specific extras (a SciPy message, a per-problem batch of
            diagnostics, ...).  Read-only mapping.
    """

    x: TensorTree
    status: SolverStatus
    n_iter: int = 0
    grad_norm: float = float("nan")
    n_fev: int = 0
    n_gev: int = 0
    n_hvp: int = 0
    fun: float = float("nan")
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return self.status is SolverStatus.CONVERGED

    @property
    def gradient_equivalents(self) -> float:
        """Work in units of one gradient: gradients + objective values/2 + HVPs*2.

        The weights follow the usual cost model (Griewank): f costs about half a
        gradient and an HVP about two.
        """
        return self.n_gev + 0.5 * self.n_fev + 2.0 * self.n_hvp


@dataclasses.dataclass(frozen=True)
class LinearSolveResult:
    """What a linear solve returns.

    Attributes:
        x: the solution, a 1-D tensor like the right-hand side ``b``.
        status: why the solve stopped.
        n_iter: iterations taken.
        n_matvec: matrix-vector products (HVPs) spent, the final residual check included.
        residual_norm: ||A x - b|| at the returned ``x``.
        b_norm: ||b||, so the relative residual is ``residual_norm / b_norm``.
    """

    x: torch.Tensor
    status: LinearStatus
    n_iter: int
    n_matvec: int
    residual_norm: float
    b_norm: float

    @property
    def converged(self) -> bool:
        return self.status is LinearStatus.CONVERGED

    @property
    def relative_residual(self) -> float:
        return self.residual_norm / self.b_norm if self.b_norm > 0 else self.residual_norm
