"""Projections of `bilevel.projections` against cvxpy and closed forms; batched = loop; gradients by
gradcheck (float64 central differences) away from kinks, the documented one-sided derivative on
them; a negative test for every guard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bilevel as bl
from bilevel import projections as P

D = torch.float64
# cvxpy (CLARABEL, its default tolerances) lands within ~1e-8 of the projection
CVX_ATOL = 1e-6


def _solve(x: cp.Variable, y: np.ndarray, constraints: list[Any]) -> np.ndarray:
    cp.Problem(cp.Minimize(cp.sum_squares(x - y)), constraints).solve()
    assert x.value is not None
    return np.asarray(x.value)


def _gen(seed: int, n: int = 7, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, dtype=D, generator=g)


# --------------------------------------------------------------------------- the references
# Each case: (name, the projection of one point y given its parameters, the cvxpy reference,
# the parameters of one problem drawn from a seed).


def _box_params(seed: int, n: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(1000 + seed)
    lo = -torch.rand(n, dtype=D, generator=g)
    return (lo, lo + torch.rand(n, dtype=D, generator=g))


def _affine_params(seed: int, n: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(2000 + seed)
    return (torch.randn(3, n, dtype=D, generator=g), torch.randn(3, dtype=D, generator=g))


def _plane_params(seed: int, n: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(3000 + seed)
    return (torch.randn(n, dtype=D, generator=g), torch.randn((), dtype=D, generator=g))


def _radius(seed: int, n: int) -> tuple[Any, ...]:
    return (torch.tensor(0.5 + seed % 3, dtype=D),)


def _cvx_box(y: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
    x = cp.Variable(y.size)
    return _solve(x, y, [x >= np.asarray(lo), x <= np.asarray(hi)])


def _cvx_simplex(y: np.ndarray, r: Any) -> np.ndarray:
    x = cp.Variable(y.size)
    return _solve(x, y, [x >= 0, cp.sum(x) == float(r)])


def _cvx_l1(y: np.ndarray, r: Any) -> np.ndarray:
    x = cp.Variable(y.size)
    return _solve(x, y, [cp.norm1(x) <= float(r)])


def _cvx_l2(y: np.ndarray, r: Any) -> np.ndarray:
    x = cp.Variable(y.size)
    return _solve(x, y, [cp.norm2(x) <= float(r)])


def _cvx_affine(y: np.ndarray, A: Any, b: Any) -> np.ndarray:
    x = cp.Variable(y.size)
    return _solve(x, y, [np.asarray(A) @ x == np.asarray(b)])


def _cvx_hyperplane(y: np.ndarray, a: Any, b: Any) -> np.ndarray:
    x = cp.Variable(y.size)
    return _solve(x, y, [np.asarray(a) @ x == float(b)])


def _cvx_halfspace(y: np.ndarray, a: Any, b: Any) -> np.ndarray:
    x = cp.Variable(y.size)
    return _solve(x, y, [np.asarray(a) @ x <= float(b)])


def _cvx_nonneg(y: np.ndarray) -> np.ndarray:
    x = cp.Variable(y.size)
    return _solve(x, y, [x >= 0])


CASES: list[
    tuple[str, Callable[..., torch.Tensor], Callable[..., np.ndarray], Callable[[int, int], tuple[Any, ...]]]
] = [
    ("box", P.box, _cvx_box, _box_params),
    ("nonnegative", P.nonnegative, _cvx_nonneg, lambda s, n: ()),
    ("simplex", P.simplex, _cvx_simplex, _radius),
    ("l1_ball", P.l1_ball, _cvx_l1, _radius),
    ("l2_ball", P.l2_ball, _cvx_l2, _radius),
    ("affine", P.affine, _cvx_affine, _affine_params),
    ("hyperplane", P.hyperplane, _cvx_hyperplane, _plane_params),
    ("halfspace", P.halfspace, _cvx_halfspace, _plane_params),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("name", "proj", "ref", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [0.1, 3.0])  # mostly inside / mostly outside the sets
def test_equals_cvxpy(name: str, proj: Any, ref: Any, params: Any, seed: int, scale: float) -> None:
    n = 7
    y = _gen(seed, n, scale)
    p = params(seed, n)
    x = proj(y, *p)
    expected = ref(y.numpy(), *[t.numpy() if isinstance(t, torch.Tensor) else t for t in p])
    np.testing.assert_allclose(x.numpy(), expected, atol=CVX_ATOL)
    # a projection is idempotent: the answer lies in the set
    torch.testing.assert_close(proj(x, *p), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("name", "proj", "ref", "params"), CASES, ids=IDS)
def test_points_in_the_set_stay(name: str, proj: Any, ref: Any, params: Any) -> None:
    y = _gen(7, 6)
    p = params(7, 6)
    inside = proj(y, *p)  # a point of the set (its projection, checked against cvxpy above)
    torch.testing.assert_close(proj(inside, *p), inside, atol=1e-12, rtol=0)


def test_closed_forms() -> None:
    y = torch.tensor([-2.0, 0.5, 3.0], dtype=D)
    torch.testing.assert_close(P.box(y, -1.0, 1.0), torch.tensor([-1.0, 0.5, 1.0], dtype=D))
    torch.testing.assert_close(P.nonnegative(y), torch.tensor([0.0, 0.5, 3.0], dtype=D))
    torch.testing.assert_close(P.l2_ball(y, 1.0), y / y.norm())
    torch.testing.assert_close(P.l2_ball(0.1 * y, 1.0), 0.1 * y)
    # simplex of (3, 0.5, -2) with radius 1: tau = 2, only the largest entry survives
    torch.testing.assert_close(P.simplex(y), torch.tensor([0.0, 0.0, 1.0], dtype=D))
    # radius 3 reaches the second entry: 3 - tau + 0.5 - tau = 3 -> tau = 0.25
    torch.testing.assert_close(P.simplex(y, 3.0), torch.tensor([0.0, 0.25, 2.75], dtype=D))
    # ties, and entries exactly on the threshold
    ties = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=D)
    torch.testing.assert_close(P.simplex(ties), torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0], dtype=D))
    torch.testing.assert_close(
        P.simplex(torch.tensor([1.0, 0.0, 0.0], dtype=D)), torch.tensor([1.0, 0.0, 0.0], dtype=D)
    )
    torch.testing.assert_close(P.simplex(torch.zeros(4, dtype=D), 2.0), torch.full((4,), 0.5, dtype=D))
    torch.testing.assert_close(P.l1_ball(y, 1.0), torch.tensor([0.0, 0.0, 1.0], dtype=D))
    torch.testing.assert_close(P.l1_ball(y, 0.0), torch.zeros(3, dtype=D))
    a = torch.tensor([1.0, 1.0, 1.0], dtype=D)
    torch.testing.assert_close(P.hyperplane(y, a, 0.0), y - y.mean())
    torch.testing.assert_close(P.halfspace(y, a, 0.0), y - y.mean())  # a'y = 1.5 > 0: onto the plane
    torch.testing.assert_close(P.halfspace(y, a, 2.0), y)  # inside
    torch.testing.assert_close(P.affine(y, a[None], torch.zeros(1, dtype=D)), y - y.mean())


@pytest.mark.parametrize("cond", [1e2, 3e2, 1e3])
def test_affine_keeps_its_accuracy_when_A_is_ill_conditioned(cond: float) -> None:
    """float32 A with singular values 1, 1, 1 / cond, against the float64 projection of the same
    float32 data: relative error within 10 cond eps (a solve with A A' gives ~cond^2 eps: at
    cond 300, 7e-3 where this bound is 3.6e-4)."""
    worst = 0.0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        U = torch.linalg.qr(torch.randn(8, 3, dtype=D, generator=g))[0]
        V = torch.linalg.qr(torch.randn(3, 3, dtype=D, generator=g))[0]
        A = ((V * torch.tensor([1.0, 1.0, 1.0 / cond], dtype=D)) @ U.T).float()
        y, b = torch.randn(8, generator=g).float(), torch.randn(3, generator=g).float()
        ref = P.affine(y.double(), A.double(), b.double())
        assert torch.allclose(A.double() @ ref, b.double(), atol=1e-9 * cond)  # the reference is on the set
        worst = max(worst, ((P.affine(y, A, b).double() - ref).norm() / ref.norm()).item())
    assert worst <= 10 * cond * torch.finfo(torch.float32).eps, worst


# --------------------------------------------------------------------------- batched = loop


@pytest.mark.parametrize(("name", "proj", "ref", "params"), CASES, ids=IDS)
def test_batched_equals_loop_with_per_problem_parameters(name: str, proj: Any, ref: Any, params: Any) -> None:
    B, n = 5, 6
    Y = torch.stack([_gen(s, n, 2.0) for s in range(B)])
    per = [params(s, n) for s in range(B)]
    stacked = tuple(torch.stack([p[i] for p in per]) for i in range(len(per[0])))
    X = proj(Y, *stacked)
    loop = torch.stack([proj(Y[b], *per[b]) for b in range(B)])
    torch.testing.assert_close(X, loop, atol=1e-12, rtol=1e-12)
    # two leading dimensions: (2, B, n) with the same parameters for both
    X2 = proj(torch.stack([Y, -Y]), *[torch.stack([t, t]) for t in stacked])
    torch.testing.assert_close(X2[0], X, atol=1e-12, rtol=1e-12)


def test_shared_parameters_broadcast_over_the_batch() -> None:
    Y = torch.stack([_gen(s, 5, 2.0) for s in range(3)])
    A, b = _affine_params(0, 5)
    torch.testing.assert_close(P.affine(Y, A, b), torch.stack([P.affine(y, A, b) for y in Y]))
    torch.testing.assert_close(P.simplex(Y, 2.0), torch.stack([P.simplex(y, 2.0) for y in Y]))
    torch.testing.assert_close(P.box(Y, 0.0, torch.ones(5, dtype=D)), Y.clamp(0.0, 1.0))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(("name", "proj", "ref", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_away_from_kinks(name: str, proj: Any, ref: Any, params: Any, seed: int) -> None:
    # random points are a.s. off the kinks (entries on a bound, on the simplex's threshold);
    # the scale puts some outside and some coordinates inside for each set
    Y = torch.stack([_gen(10 * seed + s, 5, 1.5) for s in range(2)]).requires_grad_(True)
    p = tuple(torch.stack([t, t]).requires_grad_(True) for t in params(seed, 5))
    assert torch.autograd.gradcheck(lambda y, *q: proj(y, *q), (Y, *p), eps=1e-6, atol=1e-7)


def test_simplex_jacobian_is_the_support_projector() -> None:
    # support S = {1, 2} (closed form above, radius 3): J = I - 11'/|S| on S, zero off it
    y = torch.tensor([-2.0, 0.5, 3.0], dtype=D)
    J = torch.autograd.functional.jacobian(lambda v: P.simplex(v, 3.0), y)
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, -0.5], [0.0, -0.5, 0.5]], dtype=D)
    torch.testing.assert_close(J, expected)
    r = torch.tensor(3.0, dtype=D, requires_grad=True)
    (dr,) = torch.autograd.grad(P.simplex(y, r).sum(), r)
    assert float(dr) == pytest.approx(1.0)  # the mass added to the radius stays in the set


def test_one_sided_derivatives_on_kinks_are_as_documented() -> None:
    # box: y on the upper bound takes the inside derivative (1 in y, 0 in the bound)
    y = torch.tensor([1.0, 0.0], dtype=D, requires_grad=True)
    hi = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    dy, dhi = torch.autograd.grad(P.box(y, -1.0, hi).sum(), (y, hi))
    torch.testing.assert_close(dy, torch.ones(2, dtype=D))
    torch.testing.assert_close(dhi, torch.zeros(2, dtype=D))
    # nonnegative at 0: derivative 1
    z = torch.zeros(2, dtype=D, requires_grad=True)
    (d0,) = torch.autograd.grad(P.nonnegative(z).sum(), z)
    torch.testing.assert_close(d0, torch.ones(2, dtype=D))
    # simplex with y_1 on the threshold (tau = 0.5 for radius 2.5): i = 1 counts in the support
    J = torch.autograd.functional.jacobian(
        lambda v: P.simplex(v, 2.5), torch.tensor([3.0, 0.5, -2.0], dtype=D)
    )
    torch.testing.assert_close(
        J, torch.tensor([[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    )
    # l1 sphere: the inside one (identity)
    J1 = torch.autograd.functional.jacobian(lambda v: P.l1_ball(v, 1.0), torch.tensor([0.25, -0.75], dtype=D))
    torch.testing.assert_close(J1, torch.eye(2, dtype=D))
    # l2 sphere: the inside one (identity)
    s = torch.tensor([0.6, 0.8], dtype=D, requires_grad=True)
    J = torch.autograd.functional.jacobian(lambda v: P.l2_ball(v, 1.0), s)
    torch.testing.assert_close(J, torch.eye(2, dtype=D))
    # halfspace boundary: the hyperplane's (active) derivative
    a = torch.tensor([1.0, 1.0], dtype=D)
    on = torch.tensor([0.5, -0.5], dtype=D)
    Jh = torch.autograd.functional.jacobian(lambda v: P.halfspace(v, a, 0.0), on)
    Jp = torch.autograd.functional.jacobian(lambda v: P.hyperplane(v, a, 0.0), on)
    torch.testing.assert_close(Jh, Jp)


@given(st.integers(0, 10_000), st.sampled_from(IDS))
def test_projection_is_the_nearest_point_of_the_set(seed: int, name: str) -> None:
    """The obtuse-angle criterion: (y - P y)'(x - P y) <= 0 for every x of the set (x = P z)."""
    proj, params = {c[0]: (c[1], c[3]) for c in CASES}[name]
    p = params(seed % 5, 6)
    y, z = _gen(seed, 6, 3.0), _gen(seed + 1, 6, 3.0)
    py, x = proj(y, *p), proj(z, *p)
    assert float((y - py) @ (x - py)) <= 1e-10 * (1.0 + float(y.norm() * z.norm()))


# --------------------------------------------------------------------------- adapters


def test_adapters_follow_the_projection_convention() -> None:
    y = _gen(0, 4, 3.0)
    lo, hi = torch.zeros(4, dtype=D), torch.ones(4, dtype=D)
    torch.testing.assert_close(P.parametrized(P.box)(y, (lo, hi)), P.box(y, lo, hi))
    torch.testing.assert_close(P.parametrized(P.l2_ball)(y, torch.tensor(2.0, dtype=D)), P.l2_ball(y, 2.0))
    torch.testing.assert_close(P.fixed(P.simplex, 2.0)(y, "ignored"), P.simplex(y, 2.0))
    torch.testing.assert_close(P.fixed(P.nonnegative)(y, None), P.nonnegative(y))
    # a condition accepts them as its projection
    cond = bl.conditions.ProjectedFixedPoint(P.fixed(P.nonnegative))
    x = torch.tensor([0.0, 2.0], dtype=D, requires_grad=True)  # argmin over x >= 0 of ||x - th||^2 / 2
    F = cond.residual(lambda v, th: 0.5 * ((v - th) ** 2).sum())
    torch.testing.assert_close(F(x, torch.tensor([-1.0, 2.0], dtype=D)).detach(), torch.zeros(2, dtype=D))


@pytest.mark.parametrize("adapter", [P.parametrized, P.fixed])
def test_adapters_need_a_callable(adapter: Any) -> None:
    with pytest.raises(TypeError, match="op must be callable"):
        adapter(3.0)


# --------------------------------------------------------------------------- guards

Y = torch.randn(3, 4, dtype=D)
BAD: list[tuple[Callable[[], Any], type[Exception], str]] = [
    (lambda: P.box([1.0, 2.0], 0.0, 1.0), TypeError, "y must be a torch.Tensor"),  # type: ignore[arg-type]
    (lambda: P.box(torch.arange(4), 0.0, 1.0), TypeError, "must be floating point"),
    (lambda: P.nonnegative(torch.tensor(1.0, dtype=D)), bl.StructureError, "needs a last dimension"),
    (lambda: P.box(Y, 1.0, 0.0), ValueError, "lower must be <= upper"),
    (
        lambda: P.box(Y, torch.zeros(4, dtype=D), -torch.ones(3, 1, dtype=D)),
        ValueError,
        "lower must be <= upper",
    ),
    (lambda: P.box(Y, float("nan"), 1.0), ValueError, "neither NaN"),
    (lambda: P.box(Y, torch.full((4,), float("nan"), dtype=D), 1.0), ValueError, "neither NaN"),
    (lambda: P.box(Y, torch.zeros(5, dtype=D), 1.0), bl.StructureError, "lower has shape"),
    (lambda: P.box(Y, 0.0, torch.ones(2, 3, 4, dtype=D)), bl.StructureError, "does not broadcast"),
    (lambda: P.box(Y, True, 1.0), TypeError, "must be a number or a tensor"),
    (lambda: P.simplex(Y, 0.0), ValueError, "radius must be > 0"),
    (lambda: P.simplex(Y, torch.tensor([1.0, -1.0, 1.0], dtype=D)), ValueError, "radius must be > 0"),
    (lambda: P.simplex(Y, torch.ones(4, dtype=D)), bl.StructureError, "radius has shape"),
    (lambda: P.l1_ball(Y, -1.0), ValueError, "radius must be >= 0"),
    (lambda: P.l2_ball(Y, float("nan")), ValueError, "radius must be >= 0 and finite"),
    (lambda: P.affine(Y, torch.ones(2, 4, dtype=D), torch.zeros(2, dtype=D)), ValueError, "full row rank"),
    (lambda: P.affine(Y, torch.randn(5, 4, dtype=D), torch.zeros(5, dtype=D)), ValueError, "m = 5 rows > n"),
    (lambda: P.affine(Y, torch.randn(2, 3, dtype=D), torch.zeros(2, dtype=D)), bl.StructureError, "columns"),
    (lambda: P.affine(Y, torch.randn(4, dtype=D), 0.0), bl.StructureError, r"shape \(\.\.\., m, n\)"),
    (lambda: P.affine(Y, torch.randn(2, 2, 4, dtype=D), torch.zeros(2, dtype=D)), bl.StructureError, "batch"),
    (
        lambda: P.affine(Y, torch.randn(2, 4, dtype=D), torch.zeros(3, dtype=D)),
        bl.StructureError,
        "b has shape",
    ),
    (lambda: P.hyperplane(Y, torch.zeros(4, dtype=D), 0.0), ValueError, "normal a is zero"),
    (
        lambda: P.hyperplane(Y, torch.tensor([float("nan"), 1, 1, 1], dtype=D), 0.0),
        ValueError,
        "NaN or infinite",
    ),
    (lambda: P.affine(Y, torch.tensor([[1.0, 0, 0, float("inf")]], dtype=D), 0.0), ValueError, "A has NaN"),
    # rank 2 in float32 up to a 1e-5 perturbation: cond(A) ~ 1e5, above 1 / sqrt(m eps) ~ 2e3
    (
        lambda: P.affine(
            torch.zeros(4),
            torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1e-5, 0]]),
            torch.zeros(3),
        ),
        ValueError,
        "A is not of full row rank",
    ),
    # exactly rank 1, b inconsistent: R's last pivot is rounding error
    (
        lambda: P.affine(
            torch.tensor([1.0, -2, 0.5], dtype=D),
            torch.tensor([[1.0, 1, 0], [2, 2, 0]], dtype=D),
            torch.tensor([1.0, 3], dtype=D),
        ),
        ValueError,
        "A is not of full row rank",
    ),
    (lambda: P.halfspace(Y, torch.ones(3, dtype=D), 0.0), bl.StructureError, "a has shape"),
    (lambda: P.halfspace(Y, 1.0, 0.0), bl.StructureError, "a must have the last dimension"),
]


@pytest.mark.parametrize(("call", "err", "match"), BAD, ids=[b[2] for b in BAD])
def test_bad_arguments_raise(call: Callable[[], Any], err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        call()


def test_value_checks_wait_for_a_deferred_block() -> None:
    with pytest.raises(ValueError, match="radius must be > 0"):
        with bl.deferred_checks():
            out = P.simplex(Y, -1.0)
            assert out.shape == Y.shape  # computed; the check runs when the block ends


def test_a_non_finite_point_projects_to_non_finite_in_its_row_only() -> None:
    # the sort-based threshold used to index out of bounds on NaN; now NaN in, NaN out, as the
    # other projections answer (a solver then reports NONFINITE)
    y = torch.tensor([[0.3, 1.0, -0.2], [float("nan"), 0.0, 1.0], [float("inf"), 1.0, 0.0]], dtype=D)
    for project in (P.simplex, P.l1_ball):
        out = project(y)
        assert not bool(torch.isfinite(out[1:]).all(dim=-1).any())
        torch.testing.assert_close(out[0], project(y[:1])[0])
    torch.testing.assert_close(P.simplex(y[:1])[0], torch.tensor([0.15, 0.85, 0.0], dtype=D))
