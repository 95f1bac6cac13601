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
        info: solver-specific extras (a SciPy message, the HVP backend, ...).
            Read-only mapping.
        problem_status: batched mode only (``None`` otherwise): each problem's status,
            a tuple of B `SolverStatus`; ``status`` is then the worst of them.
        problem_n_iter: batched mode: iterations per problem, int64 (B,); ``n_iter`` is
            their maximum.
        problem_grad_norm: batched mode: ||grad_phi G_b|| per problem, float64 (B,);
            ``grad_norm`` is the norm of the whole gradient.
        problem_fun: batched mode: objective value per problem, float64 (B,) (NaN where
            the objective returned only the sum); ``fun`` is their sum.
        message: the solver's own account of why it stopped and what to do, in terms of
            its settings ("NewtonCG stopped at newton_iters=3 with ||grad|| = ...: raise
            newton_iters ..."), or the cause of a failure (an external program that could
            not start); ``""`` where the generic ``status.message`` says it all.  Read
            `reason`, which falls back to ``status.message``.
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
    problem_status: tuple[SolverStatus, ...] | None = None
    problem_n_iter: torch.Tensor | None = None
    problem_grad_norm: torch.Tensor | None = None
    problem_fun: torch.Tensor | None = None
    message: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.status, SolverStatus):
            raise TypeError(f"SolverResult(status={self.status!r}): expected a SolverStatus")
        if not isinstance(self.message, str):
            raise TypeError(f"SolverResult(message={self.message!r}): expected a str")

    @property
    def converged(self) -> bool:
        return self.status is SolverStatus.CONVERGED

    @property
    def reason(self) -> str:
        """Why the solver stopped and what to do: `message` where the solver gave one, else
        ``status.message``.  What error messages and warnings about this result should quote."""
        return self.message or self.status.message

    @property
    def problem_converged(self) -> torch.Tensor | None:
        """Batched mode: bool (B,), True where that problem converged; ``None`` otherwise."""
        if self.problem_status is None:
            return None
        return torch.tensor([s is SolverStatus.CONVERGED for s in self.problem_status])

    def __repr__(self) -> str:
        batch = "" if self.problem_status is None else f", B={len(self.problem_status)}"
        return (
            f"SolverResult(status={self.status.name}, n_iter={self.n_iter}, "
            f"grad_norm={self.grad_norm:.3e}, fun={self.fun:.6g}{batch})"
        )

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
        residual_norm: ||A x - b|| at the returned ``x`` (in batched mode over all problems).
        b_norm: ||b||, so the relative residual is ``residual_norm / b_norm``.
        problem_status: batched mode only (``b`` of shape (B, n); ``None`` otherwise): each
            problem's status, a tuple of B `LinearStatus`; ``status`` is the worst of them.
        problem_n_iter: batched mode: iterations per problem, int64 (B,) (each problem
            stops on its own; ``n_iter`` is the largest).
        problem_residual_norm: batched mode: ||A_b x_b - b_b|| per problem, shape (B,).
        problem_b_norm: batched mode: ||b_b|| per problem, shape (B,).
        problem_curvature: CG only: p'Ap of the direction on which a problem met
            non-positive curvature, NaN for the others; shape (B,) in batched mode, (1,)
            otherwise; ``None`` for other solvers.
        problem_decrease: CG with a trust-region radius only: the decrease of CG's quadratic
            model, q(0) - q(x) with q(x) = x'Ax / 2 - b'x, at the returned ``x``, shape (B,),
            tracked by the recursion (no extra matvec): a trust-region method's predicted
            reduction; ``None`` otherwise.
    """

    x: torch.Tensor
    status: LinearStatus
    n_iter: int
    n_matvec: int
    residual_norm: float
    b_norm: float
    problem_status: tuple[LinearStatus, ...] | None = None
    problem_n_iter: torch.Tensor | None = None
    problem_residual_norm: torch.Tensor | None = None
    problem_b_norm: torch.Tensor | None = None
    problem_curvature: torch.Tensor | None = None
    problem_decrease: torch.Tensor | None = None

    @property
    def converged(self) -> bool:
        return self.status is LinearStatus.CONVERGED

    @property
    def relative_residual(self) -> float:
        return self.residual_norm / self.b_norm if self.b_norm > 0 else self.residual_norm

    def status_mask(self, *statuses: LinearStatus) -> torch.Tensor:
        """Bool mask on ``x``'s device: the problems whose status is one of ``statuses``, shape (B,)
        in batched mode, (1,) otherwise (one host-built tensor; the statuses are already on the host)."""
        per = self.problem_status if self.problem_status is not None else (self.status,)
        return torch.tensor([s in statuses for s in per], dtype=torch.bool, device=self.x.device)

    def failed_problems(self) -> list[int]:
        """Indices of the problems that did not converge (batched mode; ``[0]`` or ``[]`` otherwise)."""
        if self.problem_status is None:
            return [] if self.converged else [0]
        return [i for i, s in enumerate(self.problem_status) if s is not LinearStatus.CONVERGED]

    def __repr__(self) -> str:
        batch = "" if self.problem_status is None else f", B={len(self.problem_status)}"
        return (
            f"LinearSolveResult(status={self.status.name}, n_iter={self.n_iter}, n_matvec={self.n_matvec}, "
            f"residual_norm={self.residual_norm:.3e}, b_norm={self.b_norm:.3e}{batch})"
        )
