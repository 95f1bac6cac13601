"""Status values of inner solvers and linear solves, with messages that say what to do."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TypeVar, Union

__all__ = ["LINEAR_SEVERITY", "SOLVER_SEVERITY", "LinearStatus", "SolverStatus", "severity", "worst"]


class SolverStatus(enum.Enum):
    """Why an inner solver stopped.  `message` says what to do about it, in general terms.

    A solver's own account, naming its settings (``newton_iters`` rather than ``max_iter``)
    and the cause of a failure, is `bilevel.SolverResult.reason`.
    """

    CONVERGED = "converged: gradient norm below tol"
    BUDGET = (
        "ran the fixed number of iterations it was given (tol = 0: no convergence test was asked "
        "for); set tol > 0 (or optimality_tol in the implicit layers) to have convergence checked"
    )
    MAX_ITER = "inner solver hit its iteration cap (max_iter): raise the cap or loosen tol"
    LINE_SEARCH_FAILED = (
        "line search found no step with sufficient decrease: the objective may be "
        "non-smooth, or tol is below what the rounding of the objective's values allows"
    )
    NONFINITE = "a NaN or infinity appeared: lower the step size or check the objective"
    NEGATIVE_CURVATURE = (
        "negative curvature met: the objective is not convex here; use a solver with a "
        "line search or add regularization"
    )
    FAILED = "the solver reported failure and returned no answer: its cause is the result's `reason`"
    UNKNOWN = "the solver reported no status: convergence was not checked by the solver"

    @property
    def message(self) -> str:
        return self.value


class LinearStatus(enum.Enum):
    """Why a linear solve stopped.  `message` says what to do about it."""

    CONVERGED = "converged: residual below max(rtol * ||b||, atol)"
    BUDGET = (
        "ran the fixed number of iterations it was given (rtol = atol = 0: no tolerance to meet); "
        "its residual is in the result"
    )
    MAX_ITER = "linear solve hit max_iter before its tolerance: raise max_iter or loosen rtol/atol"
    NEGATIVE_CURVATURE = (
        "CG met non-positive curvature p'Ap <= 0: the Hessian is not positive definite at "
        "this point (solve the inner problem more accurately, add damping, or use MINRES)"
    )
    INDEFINITE_PRECONDITIONER = (
        "the preconditioner is not positive definite: r'M(r) <= 0 for a nonzero residual r "
        "(check M: a zero or negative diagonal, or a recipe estimated from an indefinite matrix)"
    )
    BOUNDARY = (
        "CG reached the trust-region radius (Steihaug): the step ends on the boundary, as a "
        "trust-region method asks; not a solution of the system"
    )
    BREAKDOWN = "the Krylov method broke down (a zero denominator): try another linear solver"
    NONFINITE = "a NaN or infinity appeared in the linear solve: check the HVP and the right-hand side"

    @property
    def message(self) -> str:
        return self.value


#: Inner-solver statuses from the mildest to the worst.
SOLVER_SEVERITY: tuple[SolverStatus, ...] = (
    SolverStatus.CONVERGED,
    SolverStatus.BUDGET,
    SolverStatus.UNKNOWN,
    SolverStatus.MAX_ITER,
    SolverStatus.NEGATIVE_CURVATURE,
    SolverStatus.LINE_SEARCH_FAILED,
    SolverStatus.FAILED,
    SolverStatus.NONFINITE,
)

#: Linear-solve statuses from the mildest to the worst (also the codes of
#: `bilevel.LinearSolveResult.problem_codes`: a status's index here).
LINEAR_SEVERITY: tuple[LinearStatus, ...] = (
    LinearStatus.CONVERGED,
    LinearStatus.BUDGET,
    LinearStatus.BOUNDARY,
    LinearStatus.MAX_ITER,
    LinearStatus.NEGATIVE_CURVATURE,
    LinearStatus.INDEFINITE_PRECONDITIONER,
    LinearStatus.BREAKDOWN,
    LinearStatus.NONFINITE,
)

# The one severity table: a status's rank within its family.
_RANK: dict[Union[SolverStatus, LinearStatus], int] = {
    **{s: i for i, s in enumerate(SOLVER_SEVERITY)},
    **{s: i for i, s in enumerate(LINEAR_SEVERITY)},
}

S = TypeVar("S", SolverStatus, LinearStatus)


def severity(status: SolverStatus | LinearStatus) -> int:
    """The rank of ``status`` among its family's statuses, 0 for ``CONVERGED`` (mildest)."""
    return _RANK[status]


def worst(statuses: Iterable[S]) -> S:
    """The most severe status of a batch: ``CONVERGED`` only if every problem converged."""
    return max(statuses, key=severity)
