"""Optimality conditions: the equation whose root is the inner answer, as a value.

The backward pass of an implicit layer differentiates one equation F(x, theta) = 0 that
holds at the solver's answer x*.  Which equation depends on the problem, not on the
solver that found x*:

- `Stationarity`: grad_x f(x, theta) = 0, an unconstrained smooth minimum;
- `ProjectedFixedPoint`: x = P(x - eta grad_x f(x, theta), theta), a minimum of f over a
  convex set with Euclidean projection P;
- `ProximalFixedPoint`: x = prox_{eta g}(x - eta grad_x f(x, theta), theta), a minimum of
  f + g with g convex and possibly non-smooth (lasso, elastic net, indicators).

Every condition maps the objective to F: ``condition.residual(objective)`` returns
``F(x, theta) -> tree like x``, differentiable by autograd in x and theta, which is zero
exactly at the answers.  Any solver's answer (cvxpy, SciPy with bounds, a subprocess)
is differentiable once the condition is named; the torch solvers of `bilevel.solvers`
that solve constrained or composite problems carry their own (``solver.condition``).

References:
    Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022
    (the fixed-point conditions and their Jacobians).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ._hvp import gradient_condition
from ._types import Objective, RootFn, TensorTree
from .tree import check_like, leaves, unflatten

#: ``projection(y, theta) -> tree like y``: the Euclidean projection onto a convex set,
#: which may depend on theta (e.g. ``lambda y, th: bl.projections.box(y, 0.0, th)``).
Projection = Callable[[TensorTree, TensorTree], TensorTree]

#: ``prox(y, step, theta) -> tree like y``: argmin_x 1/2 ||x - y||^2 + step * g(x, theta)
#: (e.g. ``lambda y, step, th: bl.prox.l1(y, step * th)`` for g = th * ||x||_1).
Prox = Callable[[TensorTree, float, TensorTree], TensorTree]


@runtime_checkable
class Condition(Protocol):
    """What an optimality condition provides to an implicit layer.

    Attributes:
        symmetric: True when dF/dx is symmetric for every objective (then CG may solve the
            backward system); False selects a non-symmetric linear solver by default.
    """

    symmetric: bool

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


__all__ = [
    "Condition",
    "ProjectedFixedPoint",
    "Projection",
    "Prox",
    "ProximalFixedPoint",
    "Stationarity",
]
