"""Status values of inner solvers and linear solves, with messages that say what to do."""

from __future__ import annotations

import enum

__all__ = ["LinearStatus", "SolverStatus"]


class SolverStatus(enum.Enum):
    """Why an inner solver stopped.  `message` says what to do about it."""

    CONVERGED = "converged: gradient norm below tol"
    MAX_ITER = "inner solver hit max_iter: raise max_iter or loosen tol"
    LINE_SEARCH_FAILED = (
        "line search found no step with sufficient decrease: the objective may be "
        "non-smooth or badly scaled; try a smaller initial step or more backtracking steps"
    )
    NONFINITE = "a NaN or infinity appeared: lower the step size or check the objective"
    NEGATIVE_CURVATURE = (
        "negative curvature met: the objective is not convex here; use a solver with a "
        "line search or add regularization"
    )
    FAILED = "the external solver reported failure: see its message in `info`"
    UNKNOWN = "the solver reported no status: convergence was not checked by the solver"

    @property
    def message(self) -> str:
        return self.value


class LinearStatus(enum.Enum):
    """Why a linear solve stopped.  `message` says what to do about it."""

    CONVERGED = "converged: residual below max(rtol * ||b||, atol)"
    MAX_ITER = "linear solve hit max_iter before its tolerance: raise max_iter or loosen rtol/atol"
    NEGATIVE_CURVATURE = (
        "CG met non-positive curvature p'Ap <= 0: the Hessian is not positive definite at "
        "this point (solve the inner problem more accurately, add damping, or use MINRES)"
    )
    BREAKDOWN = "the Krylov method broke down (a zero denominator): try another linear solver"
    NONFINITE = "a NaN or infinity appeared in the linear solve: check the HVP and the right-hand side"

    @property
    def message(self) -> str:
        return self.value
