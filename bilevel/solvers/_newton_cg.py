"""Hessian-free Newton: truncated CG directions and a backtracking line search (iMAML-HF)."""

from __future__ import annotations

import dataclasses

import torch

from .._linear_solve import cg_solve
from .._results import SolverResult
from .._status import LinearStatus
from .._types import Objective, TensorTree
from ..tree import rowdot, rownorm
from ._common import Oracle, Step, check_flag, check_int, check_positive, iterate
from ._line_search import Armijo
from ._messages import check_setting, explain

__all__ = ["NewtonCG", "forcing_tolerance"]


@dataclasses.dataclass(frozen=True)
class NewtonCG:
    """Line-search Newton-CG (Hessian-free Newton), as iMAML-HF's inner solver.

    Each Newton iteration approximately solves H d = -g (H = d2G/dphi2, g = grad_phi G
    at the current point) by at most ``cg_iters`` conjugate-gradient iterations, each
    one Hessian-vector product, then takes phi + t d with t from the line search.
    The CG stops early on the forcing rule ||H d + g|| <= min(0.5, sqrt(||g||)) ||g||
    (superlinear local convergence).  On non-positive curvature p'Hp <= 0 inside CG the
    direction is truncated as in Nocedal & Wright's Algorithm 7.1: the last CG iterate,
    or, at the first CG iteration, steepest descent -g scaled by ||g||^2 / |g'Hg|.  Such events are counted in
    ``info["n_negative_curvature"]``; a run that stops at the iteration cap right after
    one reports ``NEGATIVE_CURVATURE`` instead of ``MAX_ITER``.

    The defaults (3 Newton steps of 5 CG iterations, a line search on the objective)
    are iMAML-HF's (Rajeswaran et al. 2019, Section 4); they rarely reach a tight
    ``tol``, and the status then says ``MAX_ITER``: raise ``newton_iters`` for an
    accurate argmin.

    Args:
        newton_iters: Newton iteration cap (>= 0).
        cg_iters: CG iterations (HVPs) per Newton step (>= 1).
        line_search: `Armijo` from the unit step, or ``None`` for unit steps.
        tol: gradient-norm tolerance (>= 0).
        batched: as in `GradientDescent`; the objective must give per-problem losses,
            shape (B,) (or be a `BatchedObjective`), for the per-problem line search.
            Each problem has its own CG and its own step.

    Call:
        ``solver(objective, init, theta) -> SolverResult``.  Cost per Newton step: one
        gradient with its graph (counted in ``n_gev``), then up to ``cg_iters`` HVPs, each
        one backward pass through that graph (reverse-over-reverse, see
        `Oracle.linearize`), and one gradient per line-search trial (usually one).
        ``info``: ``n_negative_curvature`` (Newton steps whose CG met p'Hp <= 0; a
        (B,) tensor in batched mode), ``cg_iters_per_step`` (CG iterations of each
        Newton step, the most over the batch), plus the ``problem_*`` fields of batched
        mode.  Unless it converged, ``message``
        (`SolverResult.reason`) says why in terms of ``newton_iters``, ``tol`` and the line
        search (the cap is ``newton_iters``, not ``max_iter``).

    Raises:
        TypeError: a setting is not a number, or is a function or tensor (the class called
            as if it were a solver: create it first, ``NewtonCG(...)``).

    References:
        Nocedal & Wright, Numerical Optimization, 2nd ed., Algorithm 7.1.
        Martens, Deep learning via Hessian-free optimization (ICML 2010).
    """

    newton_iters: int = 3
    cg_iters: int = 5
    line_search: Armijo | None = dataclasses.field(default_factory=Armijo)
    tol: float = 1e-6
    batched: bool = False

    def __post_init__(self) -> None:
        for name in ("newton_iters", "cg_iters", "line_search"):
            check_setting("NewtonCG", name, getattr(self, name))
        check_int("NewtonCG", "newton_iters", self.newton_iters, 0)
        check_flag("NewtonCG", "batched", self.batched)
        check_int("NewtonCG", "cg_iters", self.cg_iters, 1)
        check_positive("NewtonCG", "tol", self.tol, allow_zero=True)
        if self.line_search is not None and not isinstance(self.line_search, Armijo):
            raise TypeError(f"NewtonCG(line_search={self.line_search!r}): expected Armijo or None")

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        oracle = Oracle(
            objective,
            init,
            theta,
            batched=self.batched,
            who="NewtonCG",
            need_values=self.line_search is not None,
        )
        method = _NewtonMethod(self, oracle)
        result = iterate(oracle, method, max_iter=self.newton_iters, tol=self.tol, info={})
        result = result.replace(info={**result.info, "cg_iters_per_step": tuple(method.cg_counts)})
        return explain(
            result,
            "NewtonCG",
            cap=("newton_iters", self.newton_iters),
            tol=self.tol,
            line_search=self.line_search,
        )


def forcing_tolerance(gnorm: torch.Tensor) -> torch.Tensor:
    """The inexact-Newton forcing rule's tolerance on ||H d + g||: min(0.5, sqrt(||g||)) ||g||, per
    problem, from the gradient norms (B,) (superlinear local convergence; Nocedal & Wright, 7.1)."""
    return torch.minimum(torch.full_like(gnorm, 0.5), gnorm.sqrt()) * gnorm


def truncated_cg(
    oracle: Oracle, x: torch.Tensor, g: torch.Tensor, active: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Approximate Newton directions d ~ -H^-1 g, per problem (Nocedal & Wright, Alg. 7.1).

    The library's one CG (`bilevel._linear_solve.cg_solve`) on H d = -g from d = 0, each
    problem stopping on the forcing rule ||H d + g|| <= min(0.5, sqrt(||g||)) ||g||.

    Args:
        oracle: linearized once at ``x`` (`Oracle.linearize`); the CG's products reuse it.
        x: points, shape (B, n).
        g: gradients at ``x``, shape (B, n).
        active: problems to solve for (the others get d = 0).
        max_iter: CG iterations cap.

    Returns:
        ``(d, negative_curvature, iterations)``: directions (B, n), a bool (B,) mask of
        the problems whose CG met p'Hp <= 0, and the CG iterations run (= HVPs).
    """
    gnorm = rownorm(g).to(g.dtype)
    res = cg_solve(
        oracle.linearize(x),
        -g * active[:, None],
        max_iter=max_iter,
        tol=forcing_tolerance(gnorm),
        check_residual=False,
        name="NewtonCG",
    )
    assert res.problem_status is not None and res.problem_curvature is not None
    negcurv = res.status_mask(LinearStatus.NEGATIVE_CURVATURE)
    # Truncated at the first iteration (no iterate yet): steepest descent, scaled by
    # ||g||^2 / |g'Hg| (as SciPy's newton-cg does) rather than taken unscaled (Nocedal &
    # Wright), so that the line search starts near the step a quadratic model of
    # |curvature| would take.
    first = negcurv & (res.problem_n_iter.to(g.device) == 1)  # type: ignore[union-attr]
    curv = res.problem_curvature.abs().clamp_min(torch.finfo(g.dtype).tiny)
    scale = torch.where(res.problem_curvature < 0, gnorm * gnorm / curv, torch.ones_like(curv))
    d = torch.where(first[:, None], -scale[:, None] * g, res.x)
    return d * active[:, None], negcurv & active, res.n_iter


class _NewtonMethod:
    reports_negative_curvature = True

    def __init__(self, cfg: NewtonCG, oracle: Oracle) -> None:
        self.cfg = cfg
        self.oracle = oracle
        self.cg_counts: list[int] = []

    def step(self, k: int, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> Step:
        d, negcurv, n_cg = truncated_cg(self.oracle, x, g, active, self.cfg.cg_iters)
        self.cg_counts.append(n_cg)
        # Safeguard: CG from zero yields descent directions in exact arithmetic; rounding
        # on a nearly singular H can break that, and then steepest descent is used.
        not_descent = active & ~(rowdot(g, d) < 0)
        d = torch.where(not_descent[:, None], -g, d)
        ls = self.cfg.line_search
        if ls is None:
            x_new = x + d
            f_new, g_new = self.oracle.value_and_grad(x_new)
            return Step(x_new, f_new, g_new, negative_curvature=negcurv)
        _, ok, x_new, f_new, g_new = ls.search(self.oracle, x, f, g, d, torch.ones_like(f), active)
        return Step(x_new, f_new, g_new, failed=active & ~ok, negative_curvature=negcurv)
