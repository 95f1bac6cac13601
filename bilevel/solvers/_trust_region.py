"""Trust-region Newton-CG (Steihaug): Hessian-free Newton that uses negative curvature, not fears it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .._linear_solve import cg_solve
from .._results import SolverResult
from .._status import LinearStatus
from .._types import Objective, TensorTree
from ..tree import rownorm, rows_finite
from ._common import Oracle, Step, check_flag, check_int, check_positive, iterate
from ._messages import check_setting, explain
from ._newton_cg import forcing_tolerance

__all__ = ["TrustRegionNewtonCG"]


@dataclasses.dataclass(frozen=True)
class TrustRegionNewtonCG:
    """Trust-region Newton-CG (Steihaug-Toint), per problem: Hessian-free Newton for nonconvex G.

    Each iteration approximately minimizes the quadratic model m(d) = f + g'd + d'Hd / 2
    (H = d2G/dphi2 at the current point) over the ball ||d|| <= radius by Steihaug's CG (the
    library's one CG, `bilevel._linear_solve.cg_solve` with a radius): at most ``cg_iters``
    HVPs, stopping on the forcing rule ||H d + g|| <= min(0.5, sqrt(||g||)) ||g||, on the
    boundary, or, where it meets p'Hp <= 0, on the boundary along that direction of negative
    curvature -- so an indefinite H (a saddle, a point far from the argmin) gives a long step
    downhill instead of the truncated, short one of a line-search Newton-CG (`NewtonCG`).
    The step is taken if the actual decrease is at least ``eta`` times the model's
    (rho = (f(x) - f(x + d)) / (m(0) - m(d)) > eta); the radius shrinks to a quarter of the step
    where rho < 1/4 and doubles (up to ``max_radius``) where rho > 3/4 and the step reached
    the boundary (Nocedal & Wright, Algorithms 4.1 and 7.2).  Where the predicted decrease is
    below the rounding of f (100 eps (1 + |f|)), rho is taken as 1 if the step lowers ||g||
    and as rejected otherwise, so that a solve to a tight ``tol`` does not fail on noise.

    Args:
        newton_iters: iteration cap (>= 0); a rejected step counts as an iteration.
        cg_iters: Steihaug-CG iterations (HVPs) per iteration (>= 1).
        radius: the initial trust-region radius (> 0), in the units of the flattened unknowns
            (Euclidean norm over every leaf), the same for every problem; each problem then
            keeps its own.
        max_radius: the largest radius (>= radius).
        eta: acceptance threshold on rho, in [0, 1/4).
        tol: gradient-norm tolerance (>= 0; 0: a fixed budget of ``newton_iters``).
        batched: as in `GradientDescent`: B independent problems, the objective giving the
            per-problem losses (shape (B,), or a `BatchedObjective`).

    Call:
        ``solver(objective, init, theta) -> SolverResult``.  Cost per iteration: up to
        ``cg_iters`` HVPs (one gradient with its graph, then one backward pass each, as in
        `NewtonCG`) and one gradient (at the trial point, which is the next iterate's
        gradient if the step is taken).  ``info``: ``n_negative_curvature`` (iterations whose
        CG met p'Hp <= 0), ``n_boundary`` (steps that ended on the boundary, negative
        curvature included), ``n_rejected`` (steps with rho <= eta), ``radius`` (each problem's
        final radius) -- (B,) tensors in batched mode, numbers otherwise -- plus
        ``cg_iters_per_step`` as in `NewtonCG`.  Negative curvature is
        not a failure here: it is what the boundary step uses.  A problem whose radius
        shrinks below the rounding of its iterate (eps (1 + ||x||)) without an accepted step
        stops with ``LINE_SEARCH_FAILED``.

    Raises:
        TypeError: a setting is not a number, or is a function or tensor (the class called as
            if it were a solver).
        ValueError: a setting is out of range.

    References:
        Steihaug, The conjugate gradient method and trust regions in large scale optimization,
        SIAM J. Numer. Anal. 20 (1983).  Nocedal & Wright, Numerical Optimization, 2nd ed.,
        Algorithms 4.1 and 7.2.
    """

    newton_iters: int = 3
    cg_iters: int = 5
    radius: float = 1.0
    max_radius: float = 1e3
    eta: float = 0.1
    tol: float = 1e-6
    batched: bool = False

    def __post_init__(self) -> None:
        for name in ("newton_iters", "cg_iters", "radius"):
            check_setting("TrustRegionNewtonCG", name, getattr(self, name))
        check_int("TrustRegionNewtonCG", "newton_iters", self.newton_iters, 0)
        check_flag("TrustRegionNewtonCG", "batched", self.batched)
        check_int("TrustRegionNewtonCG", "cg_iters", self.cg_iters, 1)
        check_positive("TrustRegionNewtonCG", "radius", self.radius)
        check_positive("TrustRegionNewtonCG", "max_radius", self.max_radius)
        check_positive("TrustRegionNewtonCG", "tol", self.tol, allow_zero=True)
        check_positive("TrustRegionNewtonCG", "eta", self.eta, allow_zero=True)
        if self.max_radius < self.radius:
            raise ValueError(
                f"TrustRegionNewtonCG(radius={self.radius!r}, max_radius={self.max_radius!r}): "
                "max_radius must be >= radius"
            )
        if not self.eta < 0.25:
            raise ValueError(f"TrustRegionNewtonCG(eta={self.eta!r}): eta must be in [0, 0.25)")

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        oracle = Oracle(
            objective, init, theta, batched=self.batched, who="TrustRegionNewtonCG", need_values=True
        )
        method = _TrustRegionMethod(self, oracle)
        result = iterate(oracle, method, max_iter=self.newton_iters, tol=self.tol, info={})
        result = result.replace(info={**result.info, **method.info()})
        return explain(
            result,
            "TrustRegionNewtonCG",
            cap=("newton_iters", self.newton_iters),
            tol=self.tol,
            trust_region=True,
        )


class _TrustRegionMethod:
    def __init__(self, cfg: TrustRegionNewtonCG, oracle: Oracle) -> None:
        self.cfg = cfg
        self.oracle = oracle
        B, dev = oracle.B, oracle.device
        self.radius = torch.full((B,), float(cfg.radius), dtype=oracle.dtype, device=dev)
        self.n_negcurv = torch.zeros(B, dtype=torch.int64, device=dev)
        self.n_boundary = torch.zeros(B, dtype=torch.int64, device=dev)
        self.n_rejected = torch.zeros(B, dtype=torch.int64, device=dev)
        self.cg_counts: list[int] = []

    def step(self, k: int, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> Step:
        cfg, oracle = self.cfg, self.oracle
        gn = rownorm(g)
        res = cg_solve(
            oracle.linearize(x),
            -g * active[:, None],
            max_iter=cfg.cg_iters,
            tol=forcing_tolerance(gn.to(g.dtype)),
            check_residual=False,
            radius=self.radius,
            name="TrustRegionNewtonCG",
        )
        assert res.problem_decrease is not None
        self.cg_counts.append(res.n_iter)
        negcurv = res.status_mask(LinearStatus.NEGATIVE_CURVATURE)
        boundary = res.status_mask(LinearStatus.NEGATIVE_CURVATURE, LinearStatus.BOUNDARY)
        d = res.x * active[:, None]
        pred = res.problem_decrease
        x_new = x + d
        f_new, g_new = oracle.value_and_grad(x_new)
        fine = rows_finite(f_new, g_new) & (pred > 0)
        # rho = actual / predicted decrease; a non-finite trial or no predicted decrease: rejected
        rho = torch.where(fine, (f - f_new) / torch.where(pred > 0, pred, 1.0), -math.inf)
        # Where the predicted decrease is lost in the rounding of f, differences of f say nothing:
        # judge the step by the gradient norm instead (as Nocedal & Wright advise, rho := 1).
        eps = torch.finfo(x.dtype).eps
        noise = fine & (pred <= 100.0 * eps * (1.0 + f.abs())) & (rownorm(g_new) < gn)
        rho = torch.where(noise, 1.0, rho)
        accept = active & (rho > cfg.eta)
        dn = rownorm(d).to(x.dtype)
        shrunk = 0.25 * torch.where(dn > 0, torch.minimum(dn, self.radius), self.radius)
        grown = torch.clamp(2.0 * self.radius, max=cfg.max_radius)
        new_radius = torch.where(rho < 0.25, shrunk, torch.where((rho > 0.75) & boundary, grown, self.radius))
        self.radius = torch.where(active, new_radius, self.radius)
        self.n_negcurv += active & negcurv
        self.n_boundary += active & boundary
        self.n_rejected += active & ~accept
        # below the rounding of x no step can be resolved: the problem cannot progress
        stuck = active & ~accept & (self.radius < eps * (1.0 + rownorm(x).to(x.dtype)))
        a = accept[:, None]
        return Step(
            torch.where(a, x_new, x),
            torch.where(accept, f_new, f),
            torch.where(a, g_new, g),
            failed=stuck,
        )

    def info(self) -> dict[str, Any]:
        def out(t: torch.Tensor) -> Any:
            return t.cpu() if self.oracle.batched else t[0].item()

        return {
            "n_negative_curvature": out(self.n_negcurv),
            "n_boundary": out(self.n_boundary),
            "n_rejected": out(self.n_rejected),
            "radius": out(self.radius),
            "cg_iters_per_step": tuple(self.cg_counts),
        }
