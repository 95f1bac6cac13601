"""Proximal operators, batched and differentiable by autograd, and adapters to `bilevel.conditions.Prox`.

The proximal operator of a convex function h scaled by s >= 0 is

    prox_{s h}(y) = argmin_x 1/2 ||x - y||^2 + s h(x).

Each operator here acts on the last dimension of ``y`` (shape ``(..., n)``), leading
dimensions being independent problems, and returns the shape, dtype and device of ``y``.
Scales broadcast against ``y`` (a number, one per problem with shape ``(..., 1)``, or
one per entry), so a batch may carry its own penalties.  They are torch operations only:
autograd gives the Jacobian in ``y`` and in the scales, which the backward pass of
`bilevel.conditions.ProximalFixedPoint` differentiates.  Where an operator has a kink (the
threshold of a soft threshold) autograd takes the one-sided derivative named in the
docstring; with strict complementarity at the answer the kink is never met.

The solvers and conditions call a prox as ``prox(y, step, theta)`` (`bilevel.conditions.Prox`):

* `weighted` makes one from an operator when theta is the penalty's weight (lasso:
  g(x, theta) = theta ||x||_1, ``weighted(l1)``; elastic net: theta = (l1, l2),
  ``weighted(elastic_net)``);
* `fixed` makes one from an operator whose penalty does not depend on theta;
* `indicator` makes one from a projection (the prox of a set's indicator, for any step).

References:
    Parikh & Boyd, Proximal Algorithms, Found. Trends Optim. 1 (2014), sections 6.1 and 6.5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ._errors import StructureError
from ._param_checks import Param, check_input, check_nonnegative
from ._types import TensorTree

__all__ = ["elastic_net", "fixed", "group_lasso", "indicator", "l1", "weighted"]


def _soft(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # clamp_min's derivative at 0 is 1: on the threshold the entry counts as non-zero
    return torch.sign(y) * torch.clamp_min(y.abs() - s, 0.0)


def l1(y: torch.Tensor, scale: Param) -> torch.Tensor:
    """Soft thresholding: argmin_x 1/2 ||x - y||^2 + scale * ||x||_1.

    Args:
        y: points, shape (..., n).
        scale: >= 0, broadcasting to (..., n): a number, (..., 1) per problem, or per entry
            (a weighted l1 norm).

    Returns:
        ``sign(y) * max(|y| - scale, 0)``, shape (..., n).  Jacobian: 1 in ``y`` and
        ``-sign(y)`` in ``scale`` where |y| > scale, 0 where |y| < scale; on the threshold
        (|y| == scale) autograd takes the non-zero side.
    """
    check_input("prox.l1", y)
    s = check_nonnegative("prox.l1", "scale", scale, y, y.shape)
    return _soft(y, s)


def elastic_net(y: torch.Tensor, l1: Param, l2: Param) -> torch.Tensor:
    """argmin_x 1/2 ||x - y||^2 + l1 ||x||_1 + (l2 / 2) ||x||_2^2 = soft(y, l1) / (1 + l2).

    Args:
        y: points, shape (..., n).
        l1, l2: >= 0, each broadcasting to (..., n) (see `l1`).  Note the 1/2 on the squared
            norm (scikit-learn's ElasticNet has alpha * l1_ratio and alpha * (1 - l1_ratio) / 2
            per sample: l1 = n_samples * alpha * l1_ratio, l2 = n_samples * alpha * (1 - l1_ratio)).

    Returns:
        Shape (..., n); one-sided at |y| == l1 as `l1`.
    """
    check_input("prox.elastic_net", y)
    a = check_nonnegative("prox.elastic_net", "l1", l1, y, y.shape)
    b = check_nonnegative("prox.elastic_net", "l2", l2, y, y.shape)
    return _soft(y, a) / (1.0 + b)


def _check_groups(y: torch.Tensor, groups: torch.Tensor) -> int:
    """The number of groups G, after checking ``groups`` is a LongTensor (n,) of ids in [0, n)."""
    n = y.shape[-1]
    if not isinstance(groups, torch.Tensor) or groups.dtype != torch.long:
        raise TypeError(
            f"prox.group_lasso: groups must be a LongTensor of group ids, one per entry of the last "
            f"dimension (shape ({n},)), got {groups!r}"
        )
    if groups.shape != (n,):
        raise StructureError(
            f"prox.group_lasso: groups has shape {tuple(groups.shape)}; it needs one id per entry of "
            f"y's last dimension, shape ({n},)"
        )
    lo, hi = int(groups.min()), int(groups.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"prox.group_lasso: group ids must be in [0, {n}), got ids from {lo} to {hi}")
    return hi + 1


def group_lasso(y: torch.Tensor, scale: Param, groups: torch.Tensor) -> torch.Tensor:
    """Block soft thresholding: argmin_x 1/2 ||x - y||^2 + sum_g scale_g ||x_g||_2.

    Args:
        y: points, shape (..., n).
        scale: >= 0, broadcasting to (..., G): a number, (..., 1) per problem, or (G,) per
            group (e.g. ``lam * sqrt(group sizes)``).
        groups: LongTensor of shape (n,): ``groups[i]`` is the group of entry i, ids in
            [0, G) (contiguous or not; G = max id + 1, an id without entries is ignored).

    Returns:
        ``y_g * max(1 - scale_g / ||y_g||, 0)`` for each group g, shape (..., n).  On the
        threshold (||y_g|| == scale_g) autograd takes the zero side (derivative 0).

    Raises:
        TypeError: ``groups`` is not a LongTensor.
        StructureError: ``groups`` does not have one id per entry of y's last dimension.
        ValueError: an id outside [0, n), or a negative scale.
    """
    check_input("prox.group_lasso", y)
    G = _check_groups(y, groups)
    groups = groups.to(y.device)
    s = check_nonnegative("prox.group_lasso", "scale", scale, y, torch.Size([*y.shape[:-1], G]))
    sq = torch.zeros(*y.shape[:-1], G, dtype=y.dtype, device=y.device).index_add(-1, groups, y * y)
    keep = sq > s * s
    # the norm only where it is divided by: no 0/0 in the value or its gradient for a zero group
    norm = torch.sqrt(torch.where(keep, sq, torch.ones_like(sq)))
    factor = torch.where(keep, 1.0 - s / norm, torch.zeros_like(sq))
    return y * torch.index_select(factor, -1, groups)


# --------------------------------------------------------------------------- adapters to Prox


def _scaled(step: Any, theta: Any) -> tuple[Any, ...]:
    if isinstance(theta, (tuple, list)):
        return tuple(step * t for t in theta)
    return (step * theta,)


@dataclasses.dataclass(frozen=True)
class weighted:  # lower case: used like a function: bl.prox.weighted(bl.prox.l1)
    """The `bilevel.conditions.Prox` of g(x, theta) = h(x; theta) when h scales linearly with theta.

    ``weighted(op)(y, step, theta) = op(y, step * theta)``, or ``op(y, *(step * t for t in
    theta))`` for a tuple theta: the prox of step * g is ``op`` with every weight scaled by the
    step.  Lasso: ``weighted(l1)`` (theta the penalty); elastic net: ``weighted(elastic_net)``
    with theta = (l1, l2); group lasso: ``weighted(functools.partial(group_lasso, groups=ids))``.

    Args:
        op: ``op(y, *weights) -> like y``, e.g. `l1`, `elastic_net`.
    """

    op: Callable[..., torch.Tensor]

    def __post_init__(self) -> None:
        if not callable(self.op):
            raise TypeError(f"prox.weighted(op={self.op!r}): op must be callable, e.g. bl.prox.l1")

    def __call__(self, y: TensorTree, step: Any, theta: TensorTree) -> TensorTree:
        return self.op(y, *_scaled(step, theta))


@dataclasses.dataclass(frozen=True)
class fixed:  # lower case: used like a function
    """The `bilevel.conditions.Prox` of step * h(x) for an h that does not depend on theta.

    ``fixed(op, *weights)(y, step, theta) = op(y, *(step * w for w in weights))``: e.g.
    ``fixed(l1, 0.1)`` for g = 0.1 ||x||_1 whatever theta is.

    Args:
        op: ``op(y, *weights) -> like y``.
        weights: the penalty's weights (numbers or tensors).
    """

    op: Callable[..., torch.Tensor]
    weights: tuple[Any, ...]

    def __init__(self, op: Callable[..., torch.Tensor], *weights: Any) -> None:
        if not callable(op):
            raise TypeError(f"prox.fixed(op={op!r}): op must be callable, e.g. bl.prox.l1")
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "weights", tuple(weights))

    def __call__(self, y: TensorTree, step: Any, theta: TensorTree) -> TensorTree:
        return self.op(y, *(step * w for w in self.weights))


@dataclasses.dataclass(frozen=True)
class indicator:  # lower case: used like a function: bl.prox.indicator(projection)
    """The prox of a convex set's indicator: its projection, whatever the step.

    ``indicator(projection)(y, step, theta) = projection(y, theta)`` turns a
    `bilevel.conditions.Projection` into a `bilevel.conditions.Prox`, so that a constrained
    problem can be solved by `bilevel.solvers.ProximalGradient` or differentiated through
    `bilevel.conditions.ProximalFixedPoint`.

    Args:
        projection: ``projection(y, theta) -> like y`` (e.g. ``lambda y, th:
            bl.projections.box(y, 0.0, th)``).
    """

    projection: Callable[[TensorTree, TensorTree], TensorTree]

    def __post_init__(self) -> None:
        if not callable(self.projection):
            raise TypeError(
                f"prox.indicator(projection={self.projection!r}): projection must be callable "
                "projection(y, theta)"
            )

    def __call__(self, y: TensorTree, step: Any, theta: TensorTree) -> TensorTree:
        return self.projection(y, theta)
