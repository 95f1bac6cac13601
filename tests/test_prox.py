"""Proximal operators of `bilevel.prox` against cvxpy and closed forms; batched = loop; gradients by
gradcheck away from the thresholds and the documented one-sided derivative on them; the adapters
to `bilevel.conditions.Prox`; a negative test for every guard."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import cvxpy as cp
import numpy as np
import pytest
import torch

import bilevel as bl
from bilevel import projections as P
from bilevel import prox

D = torch.float64
# cvxpy (CLARABEL, default tolerances) lands within ~1e-8 of the prox
CVX_ATOL = 1e-6
GROUPS = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # sizes 2, 3, 1, 1
N = int(GROUPS.numel())


def _gen(seed: int, shape: tuple[int, ...] = (N,), scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def _cvx(y: np.ndarray, penalty: Callable[[cp.Variable], Any]) -> np.ndarray:
    x = cp.Variable(y.size)
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + penalty(x))).solve()
    assert x.value is not None
    return np.asarray(x.value)


def _cvx_group(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    g = GROUPS.numpy()
    return _cvx(y, lambda x: sum(s[k] * cp.norm2(x[np.flatnonzero(g == k)]) for k in range(int(g.max()) + 1)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [0.3, 3.0])  # most entries / groups zeroed, or most kept
def test_equal_cvxpy(seed: int, scale: float) -> None:
    y = _gen(seed, scale=scale)
    w = 0.2 + torch.rand(N, dtype=D, generator=torch.Generator().manual_seed(99 + seed))
    yn, wn = y.numpy(), w.numpy()
    np.testing.assert_allclose(prox.l1(y, 0.7).numpy(), _cvx(yn, lambda x: 0.7 * cp.norm1(x)), atol=CVX_ATOL)
    np.testing.assert_allclose(  # per-entry weights: a weighted l1 norm
        prox.l1(y, w).numpy(), _cvx(yn, lambda x: cp.sum(cp.multiply(wn, cp.abs(x)))), atol=CVX_ATOL
    )
    np.testing.assert_allclose(
        prox.elastic_net(y, 0.7, 0.4).numpy(),
        _cvx(yn, lambda x: 0.7 * cp.norm1(x) + 0.2 * cp.sum_squares(x)),
        atol=CVX_ATOL,
    )
    sg = np.array([0.5, 1.0, 0.3, 2.0])
    np.testing.assert_allclose(
        prox.group_lasso(y, torch.tensor(sg), GROUPS).numpy(), _cvx_group(yn, sg), atol=CVX_ATOL
    )
    np.testing.assert_allclose(
        prox.group_lasso(y, 0.8, GROUPS).numpy(), _cvx_group(yn, np.full(4, 0.8)), atol=CVX_ATOL
    )


def test_closed_forms() -> None:
    y = torch.tensor([-2.0, 0.5, 3.0, 0.0], dtype=D)
    torch.testing.assert_close(prox.l1(y, 1.0), torch.tensor([-1.0, 0.0, 2.0, 0.0], dtype=D))
    torch.testing.assert_close(prox.elastic_net(y, 1.0, 1.0), torch.tensor([-0.5, 0.0, 1.0, 0.0], dtype=D))
    torch.testing.assert_close(prox.l1(y, 0.0), y)
    # group lasso with one group per entry is the soft threshold
    torch.testing.assert_close(prox.group_lasso(y, 1.0, torch.arange(4)), prox.l1(y, 1.0))
    # one group: y (1 - s / ||y||)_+
    s = 0.5 * float(y.norm())
    torch.testing.assert_close(prox.group_lasso(y, s, torch.zeros(4, dtype=torch.long)), 0.5 * y)
    # Moreau: prox_{s||.||_1}(y) + s * P_{linf ball}(y / s) = y
    torch.testing.assert_close(prox.l1(y, 0.7) + 0.7 * P.box(y / 0.7, -1.0, 1.0), y)
    # a zero group stays zero (no 0/0), with a finite gradient
    z = torch.zeros(N, dtype=D, requires_grad=True)
    out = prox.group_lasso(z, 1.0, GROUPS)
    (dz,) = torch.autograd.grad(out.sum(), z)
    assert torch.equal(out.detach(), torch.zeros(N, dtype=D)) and bool(torch.isfinite(dz).all())


OPS: list[tuple[str, Callable[..., torch.Tensor], Callable[[int, int], tuple[torch.Tensor, ...]]]] = [
    ("l1", prox.l1, lambda s, B: (0.1 + torch.rand(B, 1, dtype=D),)),
    ("l1_per_entry", prox.l1, lambda s, B: (0.1 + torch.rand(B, N, dtype=D),)),
    (
        "elastic_net",
        prox.elastic_net,
        lambda s, B: (0.1 + torch.rand(B, 1, dtype=D), torch.rand(B, N, dtype=D)),
    ),
    (
        "group_lasso",
        functools.partial(prox.group_lasso, groups=GROUPS),
        lambda s, B: (0.1 + torch.rand(B, 4, dtype=D),),
    ),
]


@pytest.mark.parametrize(("name", "op", "scales"), OPS, ids=[o[0] for o in OPS])
def test_batched_equals_loop(name: str, op: Any, scales: Any) -> None:
    torch.manual_seed(0)
    B = 5
    Y = _gen(1, (B, N), 1.5)
    S = scales(0, B)
    torch.testing.assert_close(op(Y, *S), torch.stack([op(Y[b], *[s[b] for s in S]) for b in range(B)]))
    # two leading dimensions
    out = op(torch.stack([Y, Y]), *[torch.stack([s, s]) for s in S])
    torch.testing.assert_close(out[1], op(Y, *S))


@pytest.mark.parametrize(("name", "op", "scales"), OPS, ids=[o[0] for o in OPS])
@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_away_from_thresholds(name: str, op: Any, scales: Any, seed: int) -> None:
    torch.manual_seed(seed)
    Y = _gen(seed, (3, N), 1.5).requires_grad_(True)  # a.s. no |y_i| or ||y_g|| on a threshold
    S = tuple(s.requires_grad_(True) for s in scales(seed, 3))
    assert torch.autograd.gradcheck(lambda y, *s: op(y, *s), (Y, *S), eps=1e-6, atol=1e-7)


def test_one_sided_derivatives_on_thresholds_are_as_documented() -> None:
    # soft threshold at |y| == scale: the non-zero side (1 in y)
    y = torch.tensor([1.0, -1.0], dtype=D, requires_grad=True)
    (dy,) = torch.autograd.grad(prox.l1(y, 1.0).sum(), y)
    torch.testing.assert_close(dy, torch.ones(2, dtype=D))
    # group lasso at ||y_g|| == scale: the zero side (0)
    v = torch.tensor([0.6, 0.8], dtype=D, requires_grad=True)
    J = torch.autograd.functional.jacobian(
        lambda u: prox.group_lasso(u, 1.0, torch.zeros(2, dtype=torch.long)), v
    )
    torch.testing.assert_close(J, torch.zeros(2, 2, dtype=D))


# --------------------------------------------------------------------------- adapters


def test_weighted_scales_every_weight_by_the_step() -> None:
    y = _gen(3, scale=2.0)
    torch.testing.assert_close(prox.weighted(prox.l1)(y, 0.5, torch.tensor(0.8, dtype=D)), prox.l1(y, 0.4))
    torch.testing.assert_close(
        prox.weighted(prox.elastic_net)(y, 0.5, (torch.tensor(0.8, dtype=D), torch.tensor(2.0, dtype=D))),
        prox.elastic_net(y, 0.4, 1.0),
    )
    gl = prox.weighted(functools.partial(prox.group_lasso, groups=GROUPS))
    torch.testing.assert_close(gl(y, 0.5, 2.0), prox.group_lasso(y, 1.0, GROUPS))


def test_fixed_ignores_theta_and_indicator_ignores_the_step() -> None:
    y = _gen(4, scale=2.0)
    torch.testing.assert_close(prox.fixed(prox.l1, 0.3)(y, 2.0, "ignored"), prox.l1(y, 0.6))
    ind = prox.indicator(P.parametrized(P.l2_ball))
    r = torch.tensor(0.5, dtype=D)
    torch.testing.assert_close(ind(y, 0.01, r), P.l2_ball(y, 0.5))
    torch.testing.assert_close(ind(y, 100.0, r), P.l2_ball(y, 0.5))


def test_prox_of_a_condition_is_zero_at_the_lasso_answer() -> None:
    """x* of min 1/2||x - c||^2 + th ||x||_1 is soft(c, th): ProximalFixedPoint's residual vanishes there."""
    c = torch.tensor([2.0, -0.3, 0.8], dtype=D)
    th = torch.tensor(0.5, dtype=D)
    x = prox.l1(c, 0.5).requires_grad_(True)
    F = bl.conditions.ProximalFixedPoint(prox.weighted(prox.l1), step=0.7).residual(
        lambda v, t: 0.5 * ((v - c) ** 2).sum()
    )
    torch.testing.assert_close(F(x, th).detach(), torch.zeros(3, dtype=D), atol=1e-15, rtol=0)
    off = (x.detach() + 0.1).requires_grad_(True)
    assert float(F(off, th).detach().norm()) > 0.05  # and not elsewhere


@pytest.mark.parametrize("adapter", [prox.weighted, prox.fixed, prox.indicator])
def test_adapters_need_a_callable(adapter: Any) -> None:
    with pytest.raises(TypeError, match="must be callable"):
        adapter(1.0)


# --------------------------------------------------------------------------- guards

Y = torch.randn(3, N, dtype=D)
BAD: list[tuple[Callable[[], Any], type[Exception], str]] = [
    (lambda: prox.l1(Y, -0.1), ValueError, "scale must be >= 0"),
    (lambda: prox.l1(Y, torch.tensor([[0.1], [-0.1], [0.1]], dtype=D)), ValueError, "scale must be >= 0"),
    (lambda: prox.l1(Y, float("inf")), ValueError, "and finite"),
    (lambda: prox.l1(Y, torch.ones(3, dtype=D)), bl.StructureError, "scale has shape"),
    (lambda: prox.l1(torch.arange(3), 0.1), TypeError, "floating point"),
    (lambda: prox.elastic_net(Y, 0.1, -1.0), ValueError, "l2 must be >= 0"),
    (lambda: prox.elastic_net(Y, -0.1, 1.0), ValueError, "l1 must be >= 0"),
    (lambda: prox.group_lasso(Y, -1.0, GROUPS), ValueError, "scale must be >= 0"),
    (lambda: prox.group_lasso(Y, 1.0, GROUPS.double()), TypeError, "LongTensor"),
    (lambda: prox.group_lasso(Y, 1.0, [0, 0, 1, 1, 1, 2, 3]), TypeError, "LongTensor"),  # type: ignore[arg-type]
    (lambda: prox.group_lasso(Y, 1.0, GROUPS[:5]), bl.StructureError, "one id per entry"),
    (lambda: prox.group_lasso(Y, 1.0, GROUPS - 1), ValueError, "group ids must be in"),
    (lambda: prox.group_lasso(Y, 1.0, GROUPS + N), ValueError, "group ids must be in"),
    (lambda: prox.group_lasso(Y, torch.ones(5, dtype=D), GROUPS), bl.StructureError, "scale has shape"),
]


@pytest.mark.parametrize(("call", "err", "match"), BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise(call: Callable[[], Any], err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        call()
