"""Gradient descent with a fixed step or a backtracking line search."""

from __future__ import annotations

import dataclasses

import torch

from .._results import SolverResult
from .._types import Objective, TensorTree
from ._common import Oracle, Step, check_flag, check_int, check_positive, iterate
from ._line_search import Armijo, StepHalving
from ._messages import check_setting, explain

__all__ = ["GradientDescent"]


@dataclasses.dataclass(frozen=True)
class GradientDescent:
    """Gradient descent: phi_{k+1} = phi_k - lr * grad_phi G(phi_k, theta).

    Stops when ||grad_phi G|| <= tol (status ``CONVERGED``) or after ``max_iter``
    steps (status ``MAX_ITER``); a NaN or infinity stops it with ``NONFINITE`` and
    the last finite iterate.  For an L-smooth, mu-strongly convex G, ``lr = 1/L``
    reaches ||phi - phi*|| <= delta in about kappa * log(||phi_0 - phi*|| / delta)
    steps, kappa = L / mu.

    Args:
        lr: step size (> 0); with a line search, the first trial step of the first
            iteration.  Later searches start from the step accepted last, so the step
            can only shrink: starting each search from a large ``lr`` would let steps
            beyond 2/L through wherever changes of f are below rounding, and the
            iterates would drift there instead of converging.
        max_iter: iteration cap (>= 0).
        tol: gradient-norm tolerance (>= 0), Euclidean norm over all leaves of phi.
        line_search: ``None`` for fixed steps, `Armijo()` to backtrack until each step
            decreases G enough, or `StepHalving()` for one trial per step (a failed trial
            halves that problem's step and leaves it in place): one evaluation of a batch
            per step.
        batched: ``init`` holds B independent problems along the leading dimension
            of every leaf and the objective returns their losses, shape (B,) (or a
            `BatchedObjective`; without a line search a scalar sum works too).
            Every problem stops on its own criterion; see the ``problem_*`` fields of
            `SolverResult`.
        differentiable: run under autograd and keep the graph of every step
            (``create_graph=True``), so that the answer is differentiable in ``theta``
            and ``init``: unrolled differentiation (MAML), the alternative to
            `bilevel.implicit_argmin`.  Memory and backward time grow with ``max_iter``.
            Not with a line search (its accepted steps are data-dependent).

    Call:
        ``solver(objective, init, theta) -> SolverResult`` with ``x`` like ``init``.
        Cost per step: one gradient (``n_gev``); with a line search, one gradient
        per trial.  ``max_iter`` steps cost ``max_iter + 1`` gradients (the last one
        measures ||grad|| at the answer), except with ``tol=0`` and no line search: a
        fixed budget of ``max_iter`` gradients, status ``BUDGET``, and ``grad_norm`` /
        ``fun`` NaN (nothing measured at the answer; the implicit layers measure it).
        In batched mode the per-problem values are
        in ``problem_status``, ``problem_n_iter``, ``problem_grad_norm`` and
        ``problem_fun``; ``status`` is the worst problem's, ``grad_norm`` the norm of
        the whole gradient.  Unless it converged, ``message`` (`SolverResult.reason`) says
        why it stopped in terms of ``max_iter``, ``lr``, ``tol`` and the line search.

    Raises:
        TypeError: a setting is not a number, or is a function or tensor (the class called
            as if it were a solver: create it first, ``GradientDescent(lr=...)``).
    """

    lr: float
    max_iter: int = 1000
    tol: float = 1e-6
    line_search: Armijo | StepHalving | None = None
    batched: bool = False
    differentiable: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "max_iter", "tol"):
            check_setting("GradientDescent", name, getattr(self, name))
        check_positive("GradientDescent", "lr", self.lr)
        check_flag("GradientDescent", "batched", self.batched)
        check_int("GradientDescent", "max_iter", self.max_iter, 0)
        check_positive("GradientDescent", "tol", self.tol, allow_zero=True)
        if self.line_search is not None and not isinstance(self.line_search, (Armijo, StepHalving)):
            raise TypeError(
                f"GradientDescent(line_search={self.line_search!r}): expected Armijo, StepHalving or None"
            )
        if self.differentiable and self.line_search is not None:
            raise ValueError(
                "GradientDescent(differentiable=True, line_search=...): a line search's accepted steps "
                "are data-dependent and cannot be unrolled; use a fixed lr, or implicit differentiation"
            )

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        oracle = Oracle(
            objective,
            init,
            theta,
            batched=self.batched,
            who="GradientDescent",
            need_values=self.line_search is not None,
            differentiable=self.differentiable,
        )
        result = iterate(oracle, _GDMethod(self, oracle), max_iter=self.max_iter, tol=self.tol, info={})
        return explain(
            result,
            "GradientDescent",
            cap=("max_iter", self.max_iter),
            tol=self.tol,
            step=("lr", self.lr),
            line_search=self.line_search,
        )


class _GDMethod:
    def __init__(self, cfg: GradientDescent, oracle: Oracle) -> None:
        self.cfg = cfg
        self.oracle = oracle
        self.t = torch.full((oracle.B,), cfg.lr, dtype=oracle.dtype, device=oracle.device)

    def step(self, k: int, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> Step:
        ls = self.cfg.line_search
        if ls is None:
            # inactive problems must not move: the mask rides in the one fused pass of the update
            # (their g is finite: a rejected step keeps the last finite gradient)
            x_new = torch.addcmul(x, g, active[:, None].to(g.dtype), value=-self.cfg.lr)
            if self.cfg.tol == 0 and k == self.cfg.max_iter - 1:
                # The last step of a fixed budget: the gradient there could not stop the
                # solver and nothing reads it (grad_norm and fun are reported as NaN).
                return Step(x_new, None, None)
            f_new, g_new = self.oracle.value_and_grad(x_new)
            return Step(x_new, f_new, g_new)
        d = -g * active[:, None]
        t, ok, x_new, f_new, g_new = ls.search(self.oracle, x, f, g, d, self.t, active)
        if not ls.stops_on_failure:  # StepHalving: a failed trial shrinks the step, nothing stops
            self.t = t
            return Step(x_new, f_new, g_new)
        self.t = torch.where(ok, t, self.t)
        return Step(x_new, f_new, g_new, failed=active & ~ok)
