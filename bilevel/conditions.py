"""Optimality conditions: the equation whose root is the inner answer, as a value.

The backward pass of an implicit layer differentiates one equation F(x, theta) = 0 that
holds at the solver's answer x*.  Which equation depends on the problem, not on the
solver that found x*:

- `Stationarity`: grad_x f(x, theta) = 0, an unconstrained smooth minimum;
- `ProjectedFixedPoint`: x = P(x - eta grad_x f(x, theta), theta), a minimum of f over a
  convex set with Euclidean projection P;
- `ProximalFixedPoint`: x = prox_{eta g}(x - eta grad_x f(x, theta), theta), a minimum of
  f + g with g convex and possibly non-smooth (lasso, elastic net, indicators);
- `KKT`: the Karush-Kuhn-Tucker conditions of min f s.t. h(x, theta) = 0, g(x, theta) <= 0,
  with the active set and the multipliers recovered from the primal answer alone.

Every condition maps the objective to F: ``condition.residual(objective)`` returns
``F(x, theta) -> tree like x``, differentiable by autograd in x and theta, which is zero
exactly at the answers.  Any solver's answer (cvxpy, SciPy with bounds, a subprocess)
is differentiable once the condition is named; the torch solvers of `bilevel.solvers`
that solve constrained or composite problems carry their own (``solver.condition``).

References:
    Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022
    (the fixed-point conditions and their Jacobians).
    Fiacco, "Sensitivity analysis for nonlinear programming using penalty methods",
    Math. Programming 1976 (differentiability of a KKT point under LICQ, strict
    complementarity and the second-order condition).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ._errors import BilevelError, BilevelWarning, OptimalityError
from ._hvp import gradient_condition
from ._types import Objective, RootFn, TensorTree
from .tree import check_like, leaves, ravel, unflatten, unravel_like

#: ``projection(y, theta) -> tree like y``: the Euclidean projection onto a convex set,
#: which may depend on theta (e.g. ``lambda y, th: bl.projections.box(y, 0.0, th)``).
Projection = Callable[[TensorTree, TensorTree], TensorTree]

#: ``prox(y, step, theta) -> tree like y``: argmin_x 1/2 ||x - y||^2 + step * g(x, theta)
#: (e.g. ``lambda y, step, th: bl.prox.l1(y, step * th)`` for g = th * ||x||_1).
Prox = Callable[[TensorTree, float, TensorTree], TensorTree]

#: ``constraint(x, theta) -> Tensor``: the values of m constraints, any shape (read flattened),
#: written in torch so that autograd gives their Jacobian in x and theta.
Constraint = Callable[[TensorTree, TensorTree], torch.Tensor]


class DegenerateActiveSetError(BilevelError, ValueError):
    """The gradients of the active constraints are linearly dependent (LICQ fails).

    The multipliers are then not unique and the answer need not be differentiable in theta.
    """


@runtime_checkable
class Condition(Protocol):
    """What an optimality condition provides to an implicit layer.

    Attributes:
        symmetric: True when dF/dx is symmetric for every objective (then CG may solve the
            backward system); False selects a non-symmetric linear solver by default.
    """

    @property
    def symmetric(self) -> bool:
        """dF/dx is symmetric for every objective (read-only; a frozen dataclass field will do)."""
        ...

    def residual(self, objective: Objective) -> RootFn:
        """F(x, theta) whose roots are the answers of ``objective``'s problem."""
        ...


def _check_step(who: str, step: float) -> None:
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        raise TypeError(f"{who}(step={step!r}): step must be a positive float")
    if not step > 0.0 or step != step or step == float("inf"):
        raise ValueError(f"{who}(step={step!r}): step must be positive and finite")


def _difference(x: TensorTree, z: TensorTree, what: str) -> TensorTree:
    check_like(z, x, what, "x")
    return unflatten(x, [a - b for a, b in zip(leaves(x), leaves(z))])


def _gradient_step(objective: Objective, x: TensorTree, theta: TensorTree, step: float) -> TensorTree:
    g = gradient_condition(objective)(x, theta)
    return unflatten(x, [a - step * b for a, b in zip(leaves(x), leaves(g))])


@dataclasses.dataclass(frozen=True)
class Stationarity:
    """grad_x f(x, theta) = 0: the default of `bilevel.implicit_argmin` (dF/dx is the Hessian)."""

    symmetric: bool = dataclasses.field(default=True, init=False)

    def residual(self, objective: Objective) -> RootFn:
        return gradient_condition(objective)


@dataclasses.dataclass(frozen=True)
class ProjectedFixedPoint:
    """x - P(x - step * grad_x f(x, theta), theta) = 0: min f over a convex set.

    Any ``step > 0`` has the same fixed points; it changes only the conditioning of the
    backward system dF/dx = I - J_P (I - step * H), whose solution is the derivative of
    the answer on the face of the set it lies on.

    Args:
        projection: ``projection(y, theta) -> tree like y`` (see `Projection`); written
            in torch so that autograd gives its Jacobian (`bilevel.projections`).
        step: the gradient step eta > 0; scale it like 1 / (Lipschitz constant of grad f).
    """

    projection: Projection
    step: float = 1.0
    symmetric: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        if not callable(self.projection):
            raise TypeError(
                f"ProjectedFixedPoint(projection={self.projection!r}): projection must be callable"
            )
        _check_step("ProjectedFixedPoint", self.step)

    def residual(self, objective: Objective) -> RootFn:
        def F(x: TensorTree, theta: TensorTree) -> TensorTree:
            y = _gradient_step(objective, x, theta, self.step)
            return _difference(x, self.projection(y, theta), "projection(y, theta)")

        return F


@dataclasses.dataclass(frozen=True)
class ProximalFixedPoint:
    """x - prox_{step g}(x - step * grad_x f(x, theta), theta) = 0: min f + g, g convex.

    Args:
        prox: ``prox(y, step, theta) -> tree like y`` (see `Prox`; `bilevel.prox`).
        step: the gradient step eta > 0 passed to ``prox`` as its scale.
    """

    prox: Prox
    step: float = 1.0
    symmetric: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        if not callable(self.prox):
            raise TypeError(f"ProximalFixedPoint(prox={self.prox!r}): prox must be callable")
        _check_step("ProximalFixedPoint", self.step)

    def residual(self, objective: Objective) -> RootFn:
        def F(x: TensorTree, theta: TensorTree) -> TensorTree:
            y = _gradient_step(objective, x, theta, self.step)
            return _difference(x, self.prox(y, self.step, theta), "prox(y, step, theta)")

        return F


@dataclasses.dataclass(frozen=True)
class Multipliers:
    """The Lagrange multipliers of a KKT point, recovered by `KKT.multipliers`.

    With L = f + nu' h + lam' g, stationarity reads grad_x L = 0 and lam >= 0.

    Attributes:
        nu: the equality multipliers, shape (m_eq,) (empty without equalities).
        lam: the inequality multipliers, shape (m_ineq,), zero on inactive constraints.
        active: which inequalities are active (g_i(x) >= -active_tol), bool (m_ineq,).
        stationarity: ||grad f + J_h' nu + J_gA' lam_A||, the least-squares residual (0 at a
            KKT point; large when x is not a KKT point for this active set).
    """

    nu: torch.Tensor
    lam: torch.Tensor
    active: torch.Tensor
    stationarity: float


@dataclasses.dataclass(frozen=True)
class KKT:
    """The KKT conditions of min f(x, theta) s.t. h(x, theta) = 0, g(x, theta) <= 0.

    Only the primal answer x is needed (any solver: cvxpy, SciPy SLSQP or trust-constr,
    a subprocess).  At x the active set A = {i : g_i(x) >= -active_tol} is read, the
    multipliers mu = (nu, lam_A) of the active constraints c_A = (h, g_A) with Jacobian
    J = dc_A/dx (m_A x n) are recovered by least squares,

        mu(x, theta) = argmin_mu ||grad f + J' mu||  =  -(J J')^-1 J grad f,

    and the residual is

        F(x, theta) = grad f + J' mu(x, theta) + J' c_A(x, theta)
                    = P grad f + J' c_A        (P: projection onto the null space of J).

    Its two terms are orthogonal, so F = 0 exactly where c_A = 0 and grad_x L = 0: the
    KKT conditions with the active set held fixed.  At such a point
    dF/dx = P H_L + J'J (H_L the Hessian of the Lagrangian), invertible when J has full
    row rank (LICQ) and H_L is non-singular on the null space of J (second-order
    condition), so the implicit function theorem differentiates x*(theta) with no
    multiplier among the unknowns.  The derivative is the two-sided one when strict
    complementarity holds (lam_i > 0 on every active inequality).

    The checks run where F is evaluated at the solver's answer, before any gradient:
    an inequality violated by more than ``active_tol`` and a negative multiplier
    (below ``-multiplier_tol * scale``) raise `OptimalityError` (x is not optimal);
    an active inequality with a multiplier within ``multiplier_tol * scale`` of zero
    warns (`BilevelWarning`: strict complementarity fails, the derivative is the one
    in which that constraint stays active, one of two one-sided derivatives);
    linearly dependent active gradients raise `DegenerateActiveSetError`.
    Here scale = max(1, max_i |d f / d x_i|).  A large stationarity residual is caught
    by the layer's ``optimality_tol`` on ||F||.

    The Jacobian is formed densely, one reverse pass per active constraint, and the
    multipliers by a QR of J' (n x m_A): meant for tens to hundreds of constraints.  In
    batched mode (``batched=True``, x of shape (B, n), constraints returning (B, m)) the
    problems' constraints form one block-diagonal system, and constraint indices in
    messages count the flattened values.

    Args:
        eq: ``h(x, theta) -> Tensor`` (equalities h = 0) or ``None``.
        ineq: ``g(x, theta) -> Tensor`` (inequalities g <= 0) or ``None``.
        active_tol: an inequality with g_i(x) >= -active_tol is active (match it to the
            solver's feasibility tolerance).
        multiplier_tol: multipliers within this (times scale) of zero count as zero.
        rank_tol: the active Jacobian is degenerate where its smallest singular value is
            below ``rank_tol`` times its largest.

    Example:
        >>> cond = KKT(ineq=lambda x, th: x - th)     # x <= theta, elementwise
        >>> x = bl.implicit_argmin(f, init, theta, solver, condition=cond)
    """

    eq: Constraint | None = None
    ineq: Constraint | None = None
    active_tol: float = 1e-6
    multiplier_tol: float = 1e-6
    rank_tol: float = 1e-8
    symmetric: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        for name in ("eq", "ineq"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"KKT({name}={fn!r}): expected a function (x, theta) -> Tensor or None")
        if self.eq is None and self.ineq is None:
            raise ValueError(
                "KKT(): no constraints; give eq= and/or ineq= (an unconstrained problem is Stationarity())"
            )
        for name in ("active_tol", "multiplier_tol", "rank_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"KKT({name}={value!r}): must be a non-negative float")
            if not value >= 0.0 or value == float("inf"):
                raise ValueError(f"KKT({name}={value!r}): must be non-negative and finite")

    def residual(self, objective: Objective) -> RootFn:
        grad = gradient_condition(objective)

        def F(x: TensorTree, theta: TensorTree) -> TensorTree:
            g = ravel(grad(x, theta))
            parts = self._active(x, theta, check=True)
            if parts is None:
                return unravel_like(g, x)
            c, J, _ = parts
            mu = _least_squares_multipliers(J, g)
            self._check_multipliers(mu, parts[2], g)
            return unravel_like(g + J.mT @ (mu + c), x)

        return F

    def multipliers(self, objective: Objective, x: TensorTree, theta: TensorTree) -> Multipliers:
        """The multipliers (nu, lam) at x, recovered by least squares (no checks, no graph).

        Args:
            objective: f(x, theta) -> scalar Tensor.
            x, theta: the point (trees), e.g. a solver's answer.

        Returns:
            `Multipliers` with ``nu`` (m_eq,), ``lam`` (m_ineq,), ``active`` and the
            stationarity residual.

        Raises:
            DegenerateActiveSetError: the active constraint gradients are dependent.
        """
        with torch.enable_grad():
            xs = unflatten(x, [t.detach().requires_grad_(True) for t in leaves(x)])
            th = unflatten(theta, [t.detach() for t in leaves(theta)])
            g = ravel(gradient_condition(objective, create_graph=False)(xs, th))
            parts = self._active(xs, th, check=False)
        m_eq, m_in, active = parts[2] if parts is not None else self._sizes(xs, th)
        nu = g.new_zeros(m_eq)
        lam = g.new_zeros(m_in)
        if parts is None:
            return Multipliers(nu, lam, active, float(torch.linalg.vector_norm(g)))
        J = parts[1].detach()
        mu = _least_squares_multipliers(J, g.detach())
        lam[active] = mu[m_eq:]
        stat = float(torch.linalg.vector_norm(g.detach() + J.mT @ mu))
        return Multipliers(mu[:m_eq], lam, active, stat)

    def _sizes(self, x: TensorTree, theta: TensorTree) -> tuple[int, int, torch.Tensor]:
        m_eq = 0 if self.eq is None else self.eq(x, theta).numel()
        m_in = 0 if self.ineq is None else self.ineq(x, theta).numel()
        return m_eq, m_in, torch.zeros(m_in, dtype=torch.bool)

    def _values(self, fn: Constraint, x: TensorTree, theta: TensorTree, name: str) -> torch.Tensor:
        out = fn(x, theta)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TypeError(
                f"KKT({name}=...): returned {type(out).__name__}; expected a floating-point Tensor"
            )
        return out.reshape(-1)

    def _active(
        self, x: TensorTree, theta: TensorTree, *, check: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, torch.Tensor]] | None:
        """(c_A, J, (m_eq, m_ineq, active)) at x, J = dc_A/dx with its graph; None if none active."""
        xs = leaves(x)
        dtype = xs[0].dtype
        h = self._values(self.eq, x, theta, "eq") if self.eq is not None else xs[0].new_zeros(0)
        gi = self._values(self.ineq, x, theta, "ineq") if self.ineq is not None else xs[0].new_zeros(0)
        active = gi.detach() >= -self.active_tol
        if check and gi.numel():
            worst = float(gi.detach().max())
            if worst > self.active_tol:
                bad = torch.nonzero(gi.detach() > self.active_tol).flatten().tolist()
                raise OptimalityError(
                    f"KKT: the answer violates the inequality constraint(s) {bad[:10]} "
                    f"(max g_i(x) = {worst:.3e} > active_tol={self.active_tol:g}): x is not feasible, "
                    "so it is no solution; solve more accurately or raise active_tol"
                )
        c = torch.cat([h.to(dtype), gi[active].to(dtype)])
        sizes = (h.numel(), gi.numel(), active.cpu())
        if c.numel() == 0:
            return None
        rows = []
        for i in range(c.numel()):
            r = torch.autograd.grad(c[i], xs, retain_graph=True, create_graph=True, allow_unused=True)
            rows.append(
                torch.cat([(torch.zeros_like(t) if d is None else d).reshape(-1) for d, t in zip(r, xs)])
            )
        J = torch.stack(rows)
        self._check_rank(J.detach(), sizes)
        return c, J, sizes

    def _check_rank(self, J: torch.Tensor, sizes: tuple[int, int, torch.Tensor]) -> None:
        m_eq, _, active = sizes
        names = [f"eq[{i}]" for i in range(m_eq)] + [
            f"ineq[{i}]" for i in torch.nonzero(active).flatten().tolist()
        ]
        m, n = J.shape
        s = torch.linalg.svdvals(J)
        if m > n or float(s[-1]) <= self.rank_tol * max(float(s[0]), 0.0) or float(s[0]) == 0.0:
            raise DegenerateActiveSetError(
                f"KKT: the {m} active constraints {names[:12]} have linearly dependent gradients at the "
                f"answer (singular values of their Jacobian {s.tolist()[:6]} ..., n = {n} unknowns): "
                "LICQ fails, the multipliers are not unique and x*(theta) need not be differentiable.  "
                "Remove redundant constraints, or lower active_tol if a constraint is only nearly active"
            )

    def _check_multipliers(
        self, mu: torch.Tensor, sizes: tuple[int, int, torch.Tensor], g: torch.Tensor
    ) -> None:
        m_eq, _, active = sizes
        lam = mu.detach()[m_eq:]
        if lam.numel() == 0:
            return
        idx = torch.nonzero(active).flatten().tolist()
        tol = self.multiplier_tol * max(1.0, float(g.detach().abs().max()))
        negative = [idx[i] for i in torch.nonzero(lam < -tol).flatten().tolist()]
        if negative:
            raise OptimalityError(
                f"KKT: the inequality constraint(s) {negative[:10]} are active with negative multipliers "
                f"(min {float(lam.min()):.3e}): moving off them decreases f, so the answer is not a "
                "minimum; solve the inner problem more accurately"
            )
        weak = [idx[i] for i in torch.nonzero(lam <= tol).flatten().tolist()]
        if weak:
            warnings.warn(
                f"KKT: the inequality constraint(s) {weak[:10]} are active with multipliers ~ 0 "
                f"(<= {tol:.1e}): strict complementarity fails, x*(theta) has a kink here and the "
                "gradient returned is the one-sided derivative that keeps these constraints active",
                BilevelWarning,
                stacklevel=2,
            )


def _least_squares_multipliers(J: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """mu = argmin ||g + J' mu|| by a QR of J' (n x m, full column rank), differentiable."""
    Q, R = torch.linalg.qr(J.mT)
    return -torch.linalg.solve_triangular(R, (Q.mT @ g).unsqueeze(-1), upper=True).squeeze(-1)


__all__ = [
    "KKT",
    "Condition",
    "Constraint",
    "DegenerateActiveSetError",
    "Multipliers",
    "ProjectedFixedPoint",
    "Projection",
    "Prox",
    "ProximalFixedPoint",
    "Stationarity",
]
