"""Proximal and projected gradient methods (ISTA / FISTA) for min f(x, theta) + g(x, theta).

f is smooth (the objective handed to the solver); g is convex and possibly non-smooth, known
only through its proximal operator (`bilevel.prox`) or, for the indicator of a convex set,
its projection (`bilevel.projections`).  Both solvers share the loop of the other torch solvers
(`bilevel.solvers._common.iterate`), with the gradient mapping in place of the gradient:

    G_t(x) = (x - prox_{t g}(x - t grad f(x))) / t,

which is zero exactly at the minimizers of f + g (for any t > 0) and equals grad f where g = 0.
``grad_norm`` is ||G_t|| and ``tol`` applies to it; its fixed-point equation is the solver's
``condition``, which `bilevel.implicit_root` differentiates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .._results import SolverResult
from .._types import Objective, TensorTree
from ..conditions import ProjectedFixedPoint, Projection, Prox, ProximalFixedPoint
from ..tree import check_like, ravel_batch, rowdot, rows_finite
from ._common import Oracle, Step, check_flag, check_int, check_positive, iterate
from ._messages import check_setting, explain

__all__ = ["ProjectedGradient", "ProximalGradient"]


def _check_common(who: str, cfg: Any) -> None:
    """The settings the two solvers share."""
    for name in ("step", "max_iter", "tol"):
        check_setting(who, name, getattr(cfg, name))
    check_positive(who, "step", cfg.step)
    check_int(who, "max_iter", cfg.max_iter, 0)
    check_positive(who, "tol", cfg.tol, allow_zero=True)
    for name in ("accelerated", "restart", "backtracking", "batched"):
        check_flag(who, name, getattr(cfg, name))
    s = cfg.shrink
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
        raise ValueError(f"{who}(shrink={s!r}): shrink must be in (0, 1)")
    check_int(who, "max_backtracks", cfg.max_backtracks, 1)


@dataclasses.dataclass(frozen=True)
class ProximalGradient:
    """Proximal gradient descent for min_x f(x, theta) + g(x, theta): ISTA, or FISTA with restart.

    Iterates, from y_0 = x_0 = init, with step t:

        x_{k+1} = prox_{t g}(y_k - t grad f(y_k), theta)
        y_{k+1} = x_{k+1} + beta_k (x_{k+1} - x_k)          (accelerated; else y_{k+1} = x_{k+1})

    with FISTA's momentum beta_k = (a_k - 1) / a_{k+1}, a_{k+1} = (1 + sqrt(1 + 4 a_k^2)) / 2,
    a_0 = 1.  With ``restart=True`` a problem's momentum restarts (a_k = 1) whenever
    (y_k - x_{k+1})'(x_{k+1} - x_k) > 0, the composite form of O'Donoghue & Candes' gradient
    restart: the step goes against the gradient mapping.  This keeps FISTA linearly convergent
    on strongly convex problems without knowing the modulus.

    With ``backtracking=True`` the step starts at ``step`` and is multiplied by ``shrink`` until
    the descent lemma holds at the trial x_{k+1} = z for every running problem:

        f(z) <= f(y) + grad f(y)'(z - y) + ||z - y||^2 / (2 t)       (Beck & Teboulle), or
        (grad f(z) - grad f(y))'(z - y) <= ||z - y||^2 / t,

    the second being the same test read off gradients (it implies the first for convex f, and
    equals it on quadratics): near a minimizer the first is lost in the rounding of f, the
    second is not.  The step only shrinks, and is one number for the whole batch (a prox
    receives a float step, `bilevel.conditions.Prox`): the largest step that suits every
    problem.  Each backtrack reads one value on the host; without backtracking the loop reads
    nothing but what the shared loop does.

    The answer ``x`` is the proximal step from the last iterate, prox_{t g}(y - t grad f(y)), so
    it has the structure g gives (zeros of an l1 penalty, a point of the set for an indicator);
    ``grad_norm`` = ||G_t(y)|| and ``fun`` = f(y) are measured at that last iterate y.

    Args:
        prox: ``prox(y, step, theta) -> like y``, the proximal operator of step * g(., theta)
            (`bilevel.conditions.Prox`; e.g. ``bl.prox.weighted(bl.prox.l1)`` for
            g = theta ||x||_1).  It receives trees like ``init`` (in batched mode with the
            leading batch dimension) and must return the same structure.
        step: the step t (> 0): fixed without backtracking (use 1/L, L the Lipschitz constant of
            grad f), the first trial with it.  Also the step of `condition`.
        max_iter: iteration cap (>= 0).
        tol: tolerance on ||G_t|| (>= 0), Euclidean norm over all leaves.
        accelerated: FISTA (True) or plain proximal gradient, ISTA (False).
        restart: adaptive restart of the momentum (accelerated only).
        backtracking: shrink the step until the descent lemma holds (see above).
        shrink: the backtracking factor, in (0, 1).
        max_backtracks: backtracks per iteration before a problem stops with
            ``LINE_SEARCH_FAILED`` (>= 1).
        batched: ``init`` holds B independent problems along the leading dimension of every
            leaf and the objective returns their B losses (see `GradientDescent`); each problem
            stops on its own criterion.

    Call:
        ``solver(objective, init, theta) -> SolverResult``; ``objective(x, theta)`` is the smooth
        part f.  Cost per iteration: one gradient and one prox; with backtracking one gradient
        per trial, plus (accelerated) one at the extrapolated point.  ``info``: ``step`` (the
        final step t), ``n_backtracks`` and, accelerated, ``n_restarts`` (int, or a (B,) tensor
        in batched mode).

    Raises:
        TypeError: a setting of the wrong kind (the class called as if it were a solver).
        ValueError: a setting out of its range.
        StructureError: ``prox`` returned a tree unlike its input.

    References:
        Beck & Teboulle, A fast iterative shrinkage-thresholding algorithm for linear inverse
        problems, SIAM J. Imaging Sci. 2 (2009) (FISTA, backtracking).
        O'Donoghue & Candes, Adaptive restart for accelerated gradient schemes, Found. Comput.
        Math. 15 (2015), section 3.2 (gradient restart).
    """

    prox: Prox
    step: float = 1.0
    max_iter: int = 1000
    tol: float = 1e-6
    accelerated: bool = True
    restart: bool = True
    backtracking: bool = True
    shrink: float = 0.5
    max_backtracks: int = 30
    batched: bool = False

    def __post_init__(self) -> None:
        if not callable(self.prox):
            raise TypeError(
                f"ProximalGradient(prox={self.prox!r}): prox must be callable prox(y, step, theta)"
            )
        _check_common("ProximalGradient", self)

    @property
    def condition(self) -> ProximalFixedPoint:
        """x = prox_{step g}(x - step grad f(x)): the optimality condition of the answer."""
        return ProximalFixedPoint(self.prox, float(self.step))

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        return _solve(self, "ProximalGradient", self.prox, objective, init, theta, start_in_set=False)


@dataclasses.dataclass(frozen=True)
class ProjectedGradient:
    """Projected gradient descent for min_x f(x, theta) over a convex set C(theta).

    `ProximalGradient` with g the indicator of C, whose prox is the projection P:

        x_{k+1} = P(y_k - t grad f(y_k), theta),

    from x_0 = P(init).  Every iterate without momentum, and the answer always, lies in C.
    ``grad_norm`` is the norm of the gradient mapping ||y - P(y - t grad f(y))|| / t, equal to
    ||grad f|| in the interior; see `ProximalGradient` for the step, backtracking, momentum
    and what ``info`` holds.

    Args:
        projection: ``projection(y, theta) -> like y``, the Euclidean projection onto C(theta)
            (`bilevel.conditions.Projection`; e.g. ``bl.projections.fixed(bl.projections.box,
            0.0, 1.0)`` or ``lambda y, th: bl.projections.simplex(y, th)``).
        step, max_iter, tol, restart, backtracking, shrink, max_backtracks, batched: as in
            `ProximalGradient`.
        accelerated: momentum (FISTA); off by default: plain projected gradient.

    Call:
        ``solver(objective, init, theta) -> SolverResult`` (see `ProximalGradient`).

    Raises:
        TypeError, ValueError: a setting of the wrong kind or out of its range.
        StructureError: ``projection`` returned a tree unlike its input.
    """

    projection: Projection
    step: float = 1.0
    max_iter: int = 1000
    tol: float = 1e-6
    accelerated: bool = False
    restart: bool = True
    backtracking: bool = True
    shrink: float = 0.5
    max_backtracks: int = 30
    batched: bool = False

    def __post_init__(self) -> None:
        if not callable(self.projection):
            raise TypeError(
                f"ProjectedGradient(projection={self.projection!r}): projection must be callable "
                "projection(y, theta)"
            )
        _check_common("ProjectedGradient", self)

    @property
    def condition(self) -> ProjectedFixedPoint:
        """x = P(x - step grad f(x)): the optimality condition of the answer."""
        return ProjectedFixedPoint(self.projection, float(self.step))

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        projection = self.projection

        def prox(y: TensorTree, step: float, theta: TensorTree) -> TensorTree:
            return projection(y, theta)

        return _solve(self, "ProjectedGradient", prox, objective, init, theta, start_in_set=True)


_Config = ProximalGradient | ProjectedGradient


def _solve(
    cfg: _Config,
    who: str,
    prox: Callable[[TensorTree, float, TensorTree], TensorTree],
    objective: Objective,
    init: TensorTree,
    theta: TensorTree,
    *,
    start_in_set: bool,
) -> SolverResult:
    oracle = _MappingOracle(
        objective,
        init,
        theta,
        batched=cfg.batched,
        who=who,
        need_values=cfg.backtracking,
        prox=prox,
        step=float(cfg.step),
    )
    if start_in_set:
        oracle.x0 = oracle.prox_flat(oracle.x0)
    method = _Method(cfg, oracle)
    result = iterate(oracle, method, max_iter=cfg.max_iter, tol=cfg.tol, info={})
    info: dict[str, Any] = {**result.info, "step": oracle.t, "n_backtracks": method.n_backtracks}
    if cfg.accelerated:
        info["n_restarts"] = method.restarts.cpu() if oracle.batched else int(method.restarts[0])
    return explain(
        result.replace(info=info), who, cap=("max_iter", cfg.max_iter), tol=cfg.tol, step=("step", cfg.step)
    )


class _MappingOracle(Oracle):
    """The objective's oracle whose ``value_and_grad`` returns the gradient mapping G_t.

    The shared loop reads ``value_and_grad`` for its gradient and tests ``||g|| <= tol``; here
    ``g`` is G_t(x) = (x - z) / t with z = prox_{t g}(x - t grad f(x)), which is zero exactly at
    the solutions.  The true gradient and z at the last mapped point stay for the method's step
    (``grad``, ``z``), and z is the answer (`answer`).
    """

    def __init__(
        self,
        objective: Objective,
        init: TensorTree,
        theta: TensorTree,
        *,
        batched: bool,
        who: str,
        need_values: bool,
        prox: Callable[[TensorTree, float, TensorTree], TensorTree],
        step: float,
    ) -> None:
        super().__init__(objective, init, theta, batched=batched, who=who, need_values=need_values)
        self.prox = prox
        self.t = step
        # the last mapped point, the gradient there, its proximal step, and the rows whose
        # gradient was evaluated at that point (see `answer`)
        self.at = self.x0
        self.grad = torch.zeros_like(self.x0)
        self.z = self.x0
        self.fresh = torch.zeros(self.B, dtype=torch.bool, device=self.device)

    def prox_flat(self, V: torch.Tensor) -> torch.Tensor:
        """prox_{t g}(V) on flat points (B, n), through the user's prox on trees like ``init``."""
        y = self.unflat(V)
        with torch.no_grad():
            out = self.prox(y, self.t, self.theta)
        check_like(out, y, "prox(y, step, theta)", "y")
        return ravel_batch(out, batched=self.batched)

    def gradient(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (B,) and true gradients (B, n) of f at ``X`` (one n_gev)."""
        return super().value_and_grad(X)

    def mapping(self, X: torch.Tensor, g: torch.Tensor, fresh: torch.Tensor | None = None) -> torch.Tensor:
        """G_t(X) from the gradients ``g`` at ``X``; keeps X, g and the proximal step.

        ``fresh`` marks the rows where ``g`` is the gradient at ``X`` (default: all).
        """
        z = self.prox_flat(X - self.t * g)
        self.at, self.grad, self.z = X, g, z
        self.fresh = torch.ones_like(self.fresh) if fresh is None else fresh
        return (X - z) / self.t

    def value_and_grad(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (B,) and gradient mappings G_t (B, n) at ``X`` (one n_gev, one prox)."""
        f, g = self.gradient(X)
        return f, self.mapping(X, g)

    def answer(self, X: torch.Tensor) -> TensorTree:
        """The proximal step from ``X`` where it was taken with the gradient at ``X`` (else ``X``:
        a problem stopped on a non-finite value keeps its last finite iterate)."""
        if self.at.shape == X.shape:
            same = self.fresh & (self.at == X).all(dim=1) & rows_finite(self.z)
            X = torch.where(same[:, None], self.z, X)
        return super().answer(X)


class _Method:
    """One proximal-gradient (or FISTA) iteration; the loop's x is y_k and its g is G_t(y_k)."""

    def __init__(self, cfg: _Config, oracle: _MappingOracle) -> None:
        self.cfg = cfg
        self.oracle = oracle
        self.x_prev: torch.Tensor | None = None  # x_k, the last proximal point (accelerated)
        self.a = torch.ones(oracle.B, dtype=oracle.dtype, device=oracle.device)  # FISTA's a_k
        self.restarts = torch.zeros(oracle.B, dtype=torch.int64, device=oracle.device)
        self.n_backtracks = 0

    def step(self, k: int, y: torch.Tensor, f: torch.Tensor, G: torch.Tensor, active: torch.Tensor) -> Step:
        o, cfg = self.oracle, self.cfg
        a = active[:, None]
        # the loop's state at y came from the last mapped evaluation, at y for every running problem
        g, z = o.grad, o.z
        failed: torch.Tensor | None = None
        trial: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.backtracking:
            z, fz, gz, failed = self._backtrack(y, f, g, z, active)
            trial = (fz, gz)
        x_new = torch.where(a, z, y)
        if cfg.accelerated:
            if self.x_prev is None:
                self.x_prev = y.clone()
            d = x_new - self.x_prev
            a_next = (1.0 + torch.sqrt(1.0 + 4.0 * self.a * self.a)) / 2.0
            beta = (self.a - 1.0) / a_next
            if cfg.restart:
                # the step x_{k+1} - x_k against the gradient mapping (y_k - x_{k+1}) / t
                uphill = active & (rowdot(y - x_new, d) > 0)
                beta = torch.where(uphill, torch.zeros_like(beta), beta)
                a_next = torch.where(uphill, torch.ones_like(a_next), a_next)
                self.restarts += uphill
            y_new = x_new + (beta * active)[:, None] * d
            self.x_prev = torch.where(a, x_new, self.x_prev)
            self.a = torch.where(active, a_next, self.a)
            f_new, g_new = o.gradient(y_new)
            return Step(y_new, f_new, o.mapping(y_new, g_new), failed=failed)
        if trial is not None:
            # ISTA with backtracking: the accepted trial is the next iterate, its gradient is known.
            # A stopped problem stays at y, where the kept gradient is (if it was fresh there).
            fz, gz = trial
            f_new = torch.where(active, fz, f)
            g_new = torch.where(a, gz, g)
            fresh = active | (o.fresh & (o.at == x_new).all(dim=1))
            return Step(x_new, f_new, o.mapping(x_new, g_new, fresh), failed=failed)
        f_new, g_new = o.gradient(x_new)
        return Step(x_new, f_new, o.mapping(x_new, g_new), failed=failed)

    def _backtrack(
        self, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, z: torch.Tensor, active: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Shrink the (shared) step until every running problem's trial z passes the descent test.

        Returns:
            ``(z, f(z), grad f(z), failed)``: the trials, their values and gradients, and the
            running problems that still fail after ``max_backtracks`` (``None`` if none).
        """
        o, cfg = self.oracle, self.cfg
        n = 0
        while True:
            fz, gz = o.gradient(z)
            d = z - y
            dd = rowdot(d, d)
            decrease = fz <= f + rowdot(g, d) + dd / (2.0 * o.t)
            curvature = rowdot(gz - g, d) <= dd / o.t
            bad = active & ~((decrease | curvature) & rows_finite(fz, gz))
            if not bool(bad.any()):
                return z, fz, gz, None
            if n == cfg.max_backtracks:
                return z, fz, gz, bad
            n += 1
            o.t *= cfg.shrink
            self.n_backtracks += 1
            z = o.prox_flat(y - o.t * g)
