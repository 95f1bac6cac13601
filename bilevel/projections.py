"""Euclidean projections onto convex sets, batched and differentiable by autograd.

Every projection acts on the last dimension of ``y`` (shape ``(..., n)``): the leading
dimensions are independent problems, and the set's parameters broadcast against them (a
radius of shape ``(...)`` or a scalar, bounds of shape ``(..., n)``, ``(n,)`` or scalars), so
that each problem of a batch may have its own set.  The answer has the shape, dtype and
device of ``y``.  Parameters given as Python numbers are converted to ``y``'s dtype.  The
parameters are checked (a NaN radius or bound raises); the points are not, since each check
is a host read and these run in solvers' inner loops: NaN or infinity in ``y`` gives NaN in
the answer (in that entry, or in its whole problem where the set couples the entries), which
the solvers and layers that call them detect and report.

They are written in torch operations only, so autograd gives their Jacobian in ``y`` and in
the set's parameters: what the backward pass of `bilevel.conditions.ProjectedFixedPoint`
differentiates.  A projection is piecewise smooth; on a kink (a point exactly on the boundary
of a piece, e.g. ``y_i == upper_i`` for `box`) autograd takes one one-sided derivative, which
each function's docstring names.  At an answer with strict complementarity the gradient step
lands strictly inside a piece and no kink is met.

With ``theta`` as the set's parameter they are projections in the convention of
`bilevel.conditions.Projection` (``projection(y, theta)``): ``lambda y, theta: box(y, 0.0,
theta)``, or with the adapters ``parametrized(box)`` (theta = (lower, upper)) and
``fixed(simplex, 2.0)`` (a set that does not depend on theta).

Raises (every function):
    ValueError: a parameter outside its domain (a negative radius, ``lower > upper``, a zero
        normal ``a``, ``A`` without full row rank).
    StructureError: a parameter whose shape does not broadcast against ``y``'s, or would
        change the shape of the answer.
    TypeError: ``y`` is not a floating-point tensor.

References:
    Duchi, Shalev-Shwartz, Singer, Chandra, Efficient projections onto the l1-ball for
    learning in high dimensions, ICML 2008 (simplex and l1 ball by sorting).
    Parikh & Boyd, Proximal Algorithms, Found. Trends Optim. 1 (2014), section 6.2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ._errors import StructureError
from ._param_checks import Param, as_param, check_input, check_nonnegative, check_sign, check_values

__all__ = [
    "affine",
    "box",
    "fixed",
    "halfspace",
    "hyperplane",
    "l1_ball",
    "l2_ball",
    "nonnegative",
    "parametrized",
    "simplex",
]


# --------------------------------------------------------------------------- the projections


def box(y: torch.Tensor, lower: Param, upper: Param) -> torch.Tensor:
    """Projection onto the box {x: lower <= x <= upper}: ``clamp(y, lower, upper)``.

    Args:
        y: points, shape (..., n).
        lower, upper: bounds broadcasting to (..., n) (``-inf`` / ``inf`` allowed for a
            one-sided box), with ``lower <= upper`` (equal bounds fix an entry).

    Returns:
        The projections, shape (..., n).  Jacobian: 1 in ``y`` where the entry is inside
        the box, 1 in the bound it is clamped to elsewhere; on a kink (``y == upper``) autograd
        takes the inside derivative (1 in ``y``, 0 in the bound).
    """
    check_input("box", y)
    lo = as_param("box", "lower", lower, y, y.shape)
    hi = as_param("box", "upper", upper, y, y.shape)
    # NaN bounds would pass a plain comparison and give NaN answers
    message = "lower must be <= upper in every entry, neither NaN"
    if isinstance(lower, torch.Tensor) or isinstance(upper, torch.Tensor):
        check_values("box", message, ~(lo <= hi))
    elif not lower <= upper:
        raise ValueError(f"box: {message} (got lower={lower!r}, upper={upper!r})")
    return torch.clamp(y, lo, hi)


def nonnegative(y: torch.Tensor) -> torch.Tensor:
    """Projection onto the non-negative orthant: ``max(y, 0)`` entrywise.

    Returns:
        Shape of ``y``.  At ``y_i == 0`` autograd takes the derivative 1 (the inside one,
        as `box`; ``relu`` would take 0).
    """
    check_input("nonnegative", y)
    return torch.clamp_min(y, 0.0)


def _simplex(y: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Projection onto {x >= 0, sum x = radius} (radius > 0, shape (...) or broadcasting)."""
    n = y.shape[-1]
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - radius[..., None]
    k = torch.arange(1, n + 1, dtype=y.dtype, device=y.device)
    # rho: the last k with u_k >= css_k / k (Duchi et al. take u_k > css_k / k; the two give the
    # same tau, as u_k = tau there, but ">=" counts an entry on the threshold in the support, as
    # clamp_min's derivative 1 at 0 below does: a one-sided Jacobian on that kink).  The last such
    # k rather than their count, so that a tie broken by rounding cannot shift it; k = 1 always holds.
    # k = 1 fails only where y has NaN or infinity (the comparisons are then False): clamped, tau
    # is NaN there, and so is the answer, as every other projection answers a non-finite point
    rho = ((u - css / k >= 0).to(y.dtype) * k).amax(dim=-1, keepdim=True).long().clamp_min(1)
    tau = torch.gather(css, -1, rho - 1) / rho.to(y.dtype)
    return torch.clamp_min(y - tau, 0.0)


def simplex(y: torch.Tensor, radius: Param = 1.0) -> torch.Tensor:
    """Projection onto the simplex {x: x >= 0, sum(x) = radius} (Duchi et al., by sorting).

    Args:
        y: points, shape (..., n).
        radius: > 0, a number or one per problem (shape broadcasting to (...)).

    Returns:
        ``max(y - tau, 0)`` with the threshold tau making the sum ``radius``, shape (..., n).
        Jacobian: on the support S, I - 11'/|S| (and 1/|S| in ``radius``), zero off it.  On a
        kink (``y_i == tau``, the answer's entry i zero) autograd counts i in S: the one-sided
        derivative of i entering the support.

    O(n log n) per problem (a sort); differentiable through the gathered threshold.
    """
    check_input("simplex", y)
    r = as_param("simplex", "radius", radius, y, y.shape[:-1])
    check_sign("simplex", "radius", radius, r, positive=True)
    return _simplex(y, r.expand(y.shape[:-1]))


def l1_ball(y: torch.Tensor, radius: Param = 1.0) -> torch.Tensor:
    """Projection onto the l1 ball {x: ||x||_1 <= radius}.

    Inside the ball ``y`` itself; outside, ``sign(y) * simplex(|y|, radius)`` (Duchi et al.).

    Args:
        y: points, shape (..., n).
        radius: >= 0, a number or one per problem (broadcasting to (...)); 0 gives 0.

    Returns:
        Shape (..., n).  Jacobian: I inside; outside, the simplex's on the support with signs.
        On the sphere ||y||_1 == radius autograd takes the inside one (I).
    """
    check_input("l1_ball", y)
    r = check_nonnegative("l1_ball", "radius", radius, y, y.shape[:-1]).expand(y.shape[:-1])
    inside = torch.linalg.vector_norm(y, ord=1, dim=-1) <= r
    # the simplex needs a positive radius: where r == 0 the answer is 0 (clamp_min(|y| - big))
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    outside = torch.sign(y) * _simplex(y.abs(), safe_r) * (r > 0)[..., None]
    return torch.where(inside[..., None], y, outside)


def l2_ball(y: torch.Tensor, radius: Param = 1.0) -> torch.Tensor:
    """Projection onto the Euclidean ball {x: ||x||_2 <= radius}: ``y * min(1, radius / ||y||)``.

    Args:
        y: points, shape (..., n).
        radius: >= 0, a number or one per problem (broadcasting to (...)).

    Returns:
        Shape (..., n).  Jacobian outside: (radius / ||y||) (I - u u'), u = y / ||y||; on the
        sphere autograd takes the inside one (I).
    """
    check_input("l2_ball", y)
    r = check_nonnegative("l2_ball", "radius", radius, y, y.shape[:-1])
    norm = torch.linalg.vector_norm(y, dim=-1)
    outside = norm > r
    # the division only where it is taken: no 0/0 (y = 0, r = 0) in the value or its gradient
    scale = torch.where(outside, r / torch.where(outside, norm, torch.ones_like(norm)), torch.ones_like(norm))
    return y * scale[..., None]


def affine(y: torch.Tensor, A: torch.Tensor, b: Param) -> torch.Tensor:
    """Projection onto the affine set {x: A x = b}: ``y - A' (A A')^{-1} (A y - b)``.

    Args:
        y: points, shape (..., n).
        A: shape (..., m, n) (or (m, n), shared), of full row rank m <= n.
        b: shape (..., m) (or (m,), or a number).

    Returns:
        Shape (..., n); smooth (an affine map of ``y`` and ``b``, rational in ``A``).  Computed
        from a QR factorization of ``A'``, so its relative error is about cond(A) eps, not the
        cond(A)^2 eps of a solve with ``A A'``.

    Raises:
        ValueError: ``A`` has NaN or infinite entries, or is not of full row rank in this
            precision (cond(A) above about 1 / sqrt(m eps), where less than half of the digits
            would be left): drop the redundant rows of A, or use `hyperplane` for m = 1.
    """
    check_input("affine", y)
    if not isinstance(A, torch.Tensor) or A.ndim < 2:
        raise StructureError(
            f"affine: A must be a tensor of shape (..., m, n), got "
            f"{type(A).__name__ if not isinstance(A, torch.Tensor) else tuple(A.shape)}"
        )
    if A.shape[-1] != y.shape[-1]:
        raise StructureError(
            f"affine: A has shape {tuple(A.shape)}, y has {tuple(y.shape)}: A needs n = y.shape[-1] columns"
        )
    A = A.to(dtype=y.dtype, device=y.device)
    m = A.shape[-2]
    if m > y.shape[-1]:
        raise ValueError(
            f"affine: A has m = {m} rows > n = {y.shape[-1]} columns; it cannot have full row rank"
        )
    lead = y.shape[:-1]
    try:
        torch.broadcast_shapes(A.shape[:-2], lead)
    except RuntimeError:
        raise StructureError(
            f"affine: A's batch shape {tuple(A.shape[:-2])} does not broadcast to y's {tuple(lead)}"
        ) from None
    if torch.broadcast_shapes(A.shape[:-2], lead) != lead:
        raise StructureError(f"affine: A's batch shape {tuple(A.shape[:-2])} would enlarge y's {tuple(lead)}")
    bt = as_param("affine", "b", b, y, torch.Size([*lead, m]))
    check_values("affine", "A has NaN or infinite entries", ~torch.isfinite(A))
    # A' = Q R, so A A' = R' R and the projection is y - Q (Q'y - R'^{-1} b): its error grows with
    # cond(A), where solving with the Gram matrix A A' would square it
    Q, R = torch.linalg.qr(A.transpose(-1, -2))
    d = torch.diagonal(R, dim1=-2, dim2=-1).abs()
    # A is refused where a pivot of R falls below sqrt(m eps) of the largest (cond(A) above about
    # 1 / sqrt(m eps)): the answer keeps at least half of the precision's digits
    eps = torch.finfo(y.dtype).eps
    tiny = d.min(dim=-1).values <= (m * eps) ** 0.5 * d.max(dim=-1).values
    check_values("affine", "A is not of full row rank (A A' is singular): drop its redundant rows", tiny)
    batch = torch.broadcast_shapes(A.shape[:-2], lead)
    z = torch.linalg.solve_triangular(R.transpose(-1, -2), bt[..., None].expand(*batch, m, 1), upper=False)
    qy = Q.transpose(-1, -2) @ y[..., None]
    return y - (Q @ (qy - z)).squeeze(-1)


def _normal(
    who: str, y: torch.Tensor, a: torch.Tensor, b: Param
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normal ``a`` (broadcasting to y), its squared norm and ``b`` (broadcasting to (...))."""
    check_input(who, y)
    at = as_param(who, "a", a, y, y.shape)
    if at.ndim == 0:
        raise StructureError(f"{who}: a must have the last dimension n = {y.shape[-1]}, got a scalar")
    bt = as_param(who, "b", b, y, y.shape[:-1])
    sq = (at * at).sum(dim=-1)
    check_values(who, "the normal a has NaN or infinite entries", ~torch.isfinite(sq))
    check_values(who, "the normal a is zero (the set is empty or everything): give a != 0", sq == 0)
    return at, sq, bt


def hyperplane(y: torch.Tensor, a: torch.Tensor, b: Param) -> torch.Tensor:
    """Projection onto the hyperplane {x: a'x = b}: ``y - (a'y - b) / ||a||^2 a``.

    Args:
        y: points, shape (..., n).
        a: normal, != 0, shape broadcasting to (..., n) (one per problem or shared).
        b: offset, shape broadcasting to (...).

    Returns:
        Shape (..., n); smooth.
    """
    at, sq, bt = _normal("hyperplane", y, a, b)
    return y - (((y * at).sum(dim=-1) - bt) / sq)[..., None] * at


def halfspace(y: torch.Tensor, a: torch.Tensor, b: Param) -> torch.Tensor:
    """Projection onto the half-space {x: a'x <= b}: ``y - max(a'y - b, 0) / ||a||^2 a``.

    Args:
        y: points, shape (..., n).
        a: normal, != 0, shape broadcasting to (..., n).
        b: offset, shape broadcasting to (...).

    Returns:
        Shape (..., n).  On the boundary (a'y == b) autograd takes the derivative of the
        hyperplane's projection (``clamp_min``'s derivative 1 at 0): the active side.
    """
    at, sq, bt = _normal("halfspace", y, a, b)
    excess = torch.clamp_min((y * at).sum(dim=-1) - bt, 0.0)
    return y - (excess / sq)[..., None] * at


# --------------------------------------------------------------------------- adapters to Projection


@dataclasses.dataclass(frozen=True)
class parametrized:  # lower case: used like a function: bl.projections.parametrized(box)
    """The `bilevel.conditions.Projection` whose set's parameters are theta.

    ``parametrized(op)(y, theta) = op(y, *theta)`` for a tuple theta, ``op(y, theta)``
    otherwise: ``parametrized(box)`` with theta = (lower, upper), ``parametrized(l2_ball)``
    with theta the radius.

    Args:
        op: ``op(y, *params) -> like y``, e.g. `box`, `simplex`.
    """

    op: Callable[..., torch.Tensor]

    def __post_init__(self) -> None:
        if not callable(self.op):
            raise TypeError(f"projections.parametrized(op={self.op!r}): op must be callable, e.g. box")

    def __call__(self, y: Any, theta: Any) -> Any:
        if isinstance(theta, (tuple, list)):
            return self.op(y, *theta)
        return self.op(y, theta)


@dataclasses.dataclass(frozen=True)
class fixed:  # lower case: used like a function: bl.projections.fixed(box, 0.0, 1.0)
    """The `bilevel.conditions.Projection` onto a set that does not depend on theta.

    ``fixed(op, *params)(y, theta) = op(y, *params)``: ``fixed(nonnegative)``,
    ``fixed(box, 0.0, 1.0)``, ``fixed(simplex)``.

    Args:
        op: ``op(y, *params) -> like y``.
        params: the set's parameters.
    """

    op: Callable[..., torch.Tensor]
    params: tuple[Any, ...]

    def __init__(self, op: Callable[..., torch.Tensor], *params: Any) -> None:
        if not callable(op):
            raise TypeError(f"projections.fixed(op={op!r}): op must be callable, e.g. nonnegative")
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "params", tuple(params))

    def __call__(self, y: Any, theta: Any) -> Any:
        return self.op(y, *self.params)
