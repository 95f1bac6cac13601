"""Optimality conditions as values: each differentiates a black-box answer correctly.

Every condition (Stationarity, ProjectedFixedPoint, ProximalFixedPoint, KKT) is checked on at
least two problems, each with constraints active and inactive, against closed forms on the
active set and against central finite differences of a float64 re-solve by the same black box
(SciPy L-BFGS-B with bounds, SLSQP, cvxpy, scikit-learn).  Every guard has a negative test.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import cvxpy as cp
import numpy as np
import pytest
import scipy.optimize as so
import torch
from sklearn.linear_model import ElasticNet, Lasso

import bilevel as bl
from bilevel.conditions import (
    KKT,
    DegenerateActiveSetError,
    ProjectedFixedPoint,
    ProximalFixedPoint,
    Stationarity,
)

D = torch.float64
#: closed forms are exact at the answer: only the backward GMRES/CG tolerance and the inner
#: solver's accuracy (<= 1e-9 here) separate them from the layer's gradient
CLOSED = dict(rtol=1e-6, atol=1e-7)
#: a central difference of a re-solve, eps = 1e-5: O(eps^2) truncation plus (solver accuracy) / eps
FD = dict(rtol=1e-4, atol=1e-5)


def finite_difference(
    solve: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, w: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """d <w, x(theta)> / d theta by central differences of float64 re-solves."""
    out = torch.zeros_like(theta)
    flat = out.view(-1)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta).view(-1)
        e[i] = eps
        e = e.view_as(theta)
        flat[i] = (w @ solve(theta + e) - w @ solve(theta - e)) / (2 * eps)
    return out


def grad_of(x: torch.Tensor, theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(w @ x, theta)
    return g


# --------------------------------------------------------------------------------------------------
# Box-constrained QP: min 1/2 x'Qx - theta'x s.t. lo <= x <= hi, solved by SciPy's L-BFGS-B.
# Closed form on the free set F: dx_F/dtheta_F = Q_FF^-1, zero rows on the bounds.

N = 6
_A = torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=D)
Q = _A @ _A.T + 0.5 * torch.eye(N, dtype=D)
LO, HI = -1.0, 1.0
STEP = float(1.0 / torch.linalg.eigvalsh(Q).max())
W = torch.linspace(-1.0, 2.0, N, dtype=D)


def box_f(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * x @ Q @ x - theta @ x


def lbfgsb(objective: object, init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A black box: SciPy's L-BFGS-B with bounds, in NumPy, blind to torch."""
    q, th = Q.numpy(), theta.detach().numpy()
    res = so.minimize(
        lambda z: (0.5 * z @ q @ z - th @ z, q @ z - th),
        init.detach().numpy(),
        jac=True,
        method="L-BFGS-B",
        bounds=[(LO, HI)] * N,
        options=dict(ftol=1e-16, gtol=1e-13, maxiter=10_000, maxcor=30),
    )
    return torch.tensor(res.x, dtype=D)


def box_closed_form(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    free = (x > LO + 1e-7) & (x < HI - 1e-7)
    g = torch.zeros(N, dtype=D)
    g[free] = torch.linalg.solve(Q[free][:, free], w[free])
    return g


#: theta with several bounds active, and theta with the answer strictly inside the box
BOX_THETAS = {
    "active": torch.tensor([4.0, -3.0, 0.5, 2.5, -0.2, -5.0], dtype=D),
    "inactive": torch.tensor([0.2, -0.1, 0.05, 0.1, -0.2, 0.1], dtype=D) * 0.5,
}

BOX_CONDITIONS = {
    "projected": ProjectedFixedPoint(lambda y, th: y.clamp(LO, HI), step=STEP),
    # the prox of the indicator of the box is the projection onto it
    "proximal": ProximalFixedPoint(lambda y, step, th: y.clamp(LO, HI), step=STEP),
    "kkt": KKT(ineq=lambda x, th: torch.cat([x - HI, LO - x])),
}


@pytest.mark.parametrize("which", list(BOX_THETAS))
@pytest.mark.parametrize("name", list(BOX_CONDITIONS))
def test_box_qp_black_box_lbfgsb_named_condition(name: str, which: str) -> None:
    """x(theta) is affine while the active set holds, so eps = 1e-3 has no truncation error and
    keeps L-BFGS-B's ~1e-9 answer accuracy below 1e-5 in the difference."""
    theta = BOX_THETAS[which].clone().requires_grad_(True)
    x = bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), theta, lbfgsb, condition=BOX_CONDITIONS[name])
    on_bounds = int(((x.detach() - LO).abs() < 1e-9).sum() + ((x.detach() - HI).abs() < 1e-9).sum())
    assert (on_bounds >= 2) if which == "active" else (on_bounds == 0)
    g = grad_of(x, theta, W)
    torch.testing.assert_close(g, box_closed_form(x.detach(), W), **CLOSED)
    torch.testing.assert_close(
        g,
        finite_difference(lambda t: lbfgsb(None, torch.zeros(N, dtype=D), t), theta.detach(), W, eps=1e-3),
        **FD,
    )


@pytest.mark.parametrize("name", list(BOX_CONDITIONS))
def test_box_qp_float32_torch_projected_loop(name: str) -> None:
    """float32 unknowns, a torch projected-gradient loop as the solver: the closed form to float32
    accuracy (the default backward tolerance in float32 is 1e-5 relative)."""
    Q32 = Q.float()

    def loop(objective: object, init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        x = init.clone()
        for _ in range(3000):
            x = (x - STEP * (Q32 @ x - theta)).clamp(LO, HI)
        return x

    theta = BOX_THETAS["active"].float().requires_grad_(True)
    x = bl.implicit_argmin(
        lambda x, t: 0.5 * x @ Q32 @ x - t @ x, torch.zeros(N), theta, loop, condition=BOX_CONDITIONS[name]
    )
    assert x.dtype == torch.float32
    g = grad_of(x, theta, W.float())
    torch.testing.assert_close(g.double(), box_closed_form(x.detach().double(), W), rtol=1e-4, atol=1e-5)


def test_stationarity_without_active_constraints_equals_the_default_and_the_closed_form() -> None:
    theta = BOX_THETAS["inactive"].clone().requires_grad_(True)
    g_default = grad_of(bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), theta, lbfgsb), theta, W)
    x = bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), theta, lbfgsb, condition=Stationarity())
    g = grad_of(x, theta, W)
    torch.testing.assert_close(g, g_default, rtol=0, atol=0)
    torch.testing.assert_close(g, torch.linalg.solve(Q, W), **CLOSED)


def test_stationarity_at_a_constrained_answer_is_refused_by_the_optimality_check() -> None:
    """With bounds active, grad f != 0 at the answer: the unconstrained condition would give a
    wrong gradient, and the layer's check on ||grad f|| says so."""
    theta = BOX_THETAS["active"].clone().requires_grad_(True)
    with pytest.raises(bl.OptimalityError, match="optimality residual"):
        bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), theta, lbfgsb)


@pytest.mark.parametrize("name", list(BOX_CONDITIONS))
def test_box_qp_batched_condition_equals_the_loop(name: str) -> None:
    """batched=True: B problems in one call and one backward solve; KKT stacks their constraints
    into one block-diagonal system."""
    thetas = torch.stack([BOX_THETAS["active"], BOX_THETAS["inactive"], -BOX_THETAS["active"]])

    def per_problem(x: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ Q) * x).sum(-1) - (th * x).sum(-1)

    def batched_lbfgsb(objective: object, init: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return torch.stack([lbfgsb(None, init[b], th[b]) for b in range(th.shape[0])])

    theta = thetas.clone().requires_grad_(True)
    cond = BOX_CONDITIONS[name]
    x = bl.implicit_argmin(
        per_problem, torch.zeros(3, N, dtype=D), theta, batched_lbfgsb, condition=cond, batched=True
    )
    (g,) = torch.autograd.grad((x * W).sum(), theta)
    for b in range(3):
        tb = thetas[b].clone().requires_grad_(True)
        xb = bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), tb, lbfgsb, condition=cond)
        torch.testing.assert_close(g[b], grad_of(xb, tb, W), **CLOSED)
        torch.testing.assert_close(g[b], box_closed_form(xb.detach(), W), **CLOSED)


# --------------------------------------------------------------------------------------------------
# Simplex QP: min 1/2 x'Sx - theta'x s.t. 1'x = 1, x >= 0, solved by cvxpy.  Closed form on the
# support s: [[S_ss, 1], [1', 0]] [x_s; nu] = [theta_s; 1], so dx_s/dtheta_s is the top-left block
# of the inverse of that matrix.

M = 5
S = torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5], dtype=D)) + 0.3
_xs, _th = cp.Variable(M), cp.Parameter(M)
_simplex_problem = cp.Problem(
    cp.Minimize(0.5 * cp.quad_form(_xs, S.numpy(), assume_PSD=True) - _th @ _xs),
    [cp.sum(_xs) == 1, _xs >= 0],
)
CLARABEL_TIGHT = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
simplex_solver = bl.solvers.Cvxpy(
    _simplex_problem, variables=[_xs], parameters=[_th], solver="CLARABEL", solve_kwargs=CLARABEL_TIGHT
)


def simplex_f(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * x @ S @ x - theta @ x


def project_simplex(y: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the probability simplex (sort-based), on the last dimension."""
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    k = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype)
    rho = (u - css / k > 0).sum(dim=-1, keepdim=True)
    tau = css.gather(-1, rho - 1) / rho.to(y.dtype)
    return (y - tau).clamp_min(0.0)


def simplex_closed_form(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    s = x > 1e-7
    k = int(s.sum())
    K = torch.zeros(k + 1, k + 1, dtype=D)
    K[:k, :k] = S[s][:, s]
    K[:k, k] = 1.0
    K[k, :k] = 1.0
    rhs = torch.zeros(k + 1, dtype=D)
    rhs[:k] = w[s]
    g = torch.zeros(M, dtype=D)
    g[s] = torch.linalg.solve(K, rhs)[:k]  # K is symmetric: w' K^-1 = (K^-1 w)'
    return g


SIMPLEX_THETAS = {
    "active": torch.tensor([3.0, 0.1, 2.5, -1.0, 0.2], dtype=D),
    "inactive": torch.tensor([0.9, 1.1, 1.3, 1.0, 1.2], dtype=D),
}
SIMPLEX_CONDITIONS = {
    "projected": ProjectedFixedPoint(lambda y, th: project_simplex(y), step=0.2),
    "kkt": KKT(eq=lambda x, th: x.sum(-1, keepdim=True) - 1.0, ineq=lambda x, th: -x, active_tol=1e-8),
}


@pytest.mark.parametrize("which", list(SIMPLEX_THETAS))
@pytest.mark.parametrize("name", list(SIMPLEX_CONDITIONS))
def test_simplex_qp_cvxpy_named_condition(name: str, which: str) -> None:
    theta = SIMPLEX_THETAS[which].clone().requires_grad_(True)
    x = bl.implicit_argmin(
        simplex_f,
        torch.full((M,), 1.0 / M, dtype=D),
        theta,
        simplex_solver,
        condition=SIMPLEX_CONDITIONS[name],
    )
    zeros = int((x.detach() < 1e-7).sum())
    assert (zeros >= 2) if which == "active" else (zeros == 0)
    g = grad_of(x, theta, W[:M])
    torch.testing.assert_close(g, simplex_closed_form(x.detach(), W[:M]), **CLOSED)

    def resolve(t: torch.Tensor) -> torch.Tensor:
        out = simplex_solver(simplex_f, torch.zeros(M, dtype=D), t)
        return out.x

    torch.testing.assert_close(g, finite_difference(resolve, theta.detach(), W[:M]), **FD)


# --------------------------------------------------------------------------------------------------
# Lasso and elastic net: min 1/(2m) ||Xw - y||^2 + l1 ||w||_1 (+ l2/2 ||w||^2), solved by
# scikit-learn.  Closed form on the support A: (X_A'X_A/m + l2 I) w_A = X_A'y/m - l1 sign(w_A), so
# dw_A/dl1 = -(X_A'X_A/m + l2 I)^-1 sign(w_A) and dw_A/dl2 = -(X_A'X_A/m + l2 I)^-1 w_A.

_g = torch.Generator().manual_seed(3)
XL = torch.randn(40, 8, generator=_g, dtype=D)
YL = XL @ torch.tensor([2.0, -1.5, 0.0, 0.0, 1.0, 0.0, 0.3, 0.0], dtype=D) + 0.1 * torch.randn(
    40, generator=_g, dtype=D
)
LSTEP = float(XL.shape[0] / torch.linalg.matrix_norm(XL, ord=2) ** 2)
WL = torch.linspace(0.5, -1.0, 8, dtype=D)


def soft_threshold(y: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    return torch.sign(y) * (y.abs() - tau).clamp_min(0.0)


def lasso_f(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((XL @ w - YL) ** 2).mean() + 0.5 * theta[1] * (w**2).sum()


def sklearn_enet(objective: object, init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """scikit-learn's coordinate descent as a black box (l2 = 0: its Lasso)."""
    l1, l2 = (float(v) for v in theta.detach())
    model = (
        Lasso(alpha=l1, fit_intercept=False, tol=1e-14, max_iter=200_000)
        if l2 == 0.0
        else ElasticNet(
            alpha=l1 + l2, l1_ratio=l1 / (l1 + l2), fit_intercept=False, tol=1e-14, max_iter=200_000
        )
    )
    model.fit(XL.numpy(), YL.numpy())
    return torch.tensor(model.coef_, dtype=D)


LASSO_PROX = ProximalFixedPoint(lambda y, step, th: soft_threshold(y, step * th[0]), step=LSTEP)


def enet_closed_form(w: torch.Tensor, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a = w.abs() > 1e-9
    Mx = XL[:, a].T @ XL[:, a] / XL.shape[0] + theta[1] * torch.eye(int(a.sum()), dtype=D)
    u = torch.linalg.solve(Mx, v[a])  # symmetric: v' M^-1 = (M^-1 v)'
    return torch.stack([-(u @ torch.sign(w[a])), -(u @ w[a])])


@pytest.mark.parametrize(
    "theta0",
    [
        pytest.param((0.3, 0.0), id="lasso-sparse"),
        pytest.param((1e-3, 0.0), id="lasso-dense"),
        pytest.param((0.2, 0.5), id="enet-sparse"),
        pytest.param((1e-3, 0.1), id="enet-dense"),
    ],
)
def test_lasso_and_elastic_net_sklearn_proximal_condition(theta0: tuple[float, float]) -> None:
    theta = torch.tensor(theta0, dtype=D, requires_grad=True)
    w = bl.implicit_argmin(lasso_f, torch.zeros(8, dtype=D), theta, sklearn_enet, condition=LASSO_PROX)
    zeros = int((w.detach().abs() < 1e-12).sum())
    assert (zeros >= 2) if theta0[0] > 0.1 else (zeros == 0)
    g = grad_of(w, theta, WL)
    ref = enet_closed_form(w.detach(), theta.detach(), WL)
    if theta0[1] == 0.0:
        # the lasso: l2 = 0 is a fixed value, not a variable the solver sees; compare d/dl1
        torch.testing.assert_close(g[0], ref[0], **CLOSED)
    else:
        torch.testing.assert_close(g, ref, **CLOSED)
        torch.testing.assert_close(
            g, finite_difference(lambda t: sklearn_enet(None, w, t), theta.detach(), WL, eps=1e-6), **FD
        )


def lasso_full(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The whole lasso objective: smooth wherever no coefficient is zero."""
    return lasso_f(w, theta) + theta[0] * w.abs().sum()


def test_stationarity_on_a_dense_lasso_answer_equals_the_proximal_condition() -> None:
    """With every coefficient nonzero the l1 term is smooth at the answer (no active kink):
    stationarity of the whole objective holds and gives the closed form too."""
    theta = torch.tensor([1e-3, 0.0], dtype=D, requires_grad=True)
    w = bl.implicit_argmin(lasso_full, torch.zeros(8, dtype=D), theta, sklearn_enet, condition=Stationarity())
    assert bool((w.detach().abs() > 1e-6).all())
    g = grad_of(w, theta, WL)
    torch.testing.assert_close(g[0], enet_closed_form(w.detach(), theta.detach(), WL)[0], **CLOSED)


def test_stationarity_on_a_sparse_lasso_answer_is_refused() -> None:
    """At a zero coefficient |w| has a kink; torch's subgradient 0 leaves grad f there, which
    the optimality check reports instead of differentiating a wrong condition."""
    theta = torch.tensor([0.3, 0.0], dtype=D, requires_grad=True)
    with pytest.raises(bl.OptimalityError, match="optimality residual"):
        bl.implicit_argmin(lasso_full, torch.zeros(8, dtype=D), theta, sklearn_enet, condition=Stationarity())


def test_forward_mode_with_a_non_symmetric_condition_is_refused() -> None:
    theta = BOX_THETAS["active"].clone()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(theta, torch.ones_like(theta))
        with pytest.raises(NotImplementedError, match="forward-mode"):
            bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), dual, lbfgsb, condition=BOX_CONDITIONS["kkt"])


def test_lasso_gradient_is_supported_on_the_active_set() -> None:
    """d w_j / d theta = 0 on every zero coefficient: the derivative lives on the support."""
    theta = torch.tensor([0.3, 0.0], dtype=D, requires_grad=True)
    w = bl.implicit_argmin(lasso_f, torch.zeros(8, dtype=D), theta, sklearn_enet, condition=LASSO_PROX)
    zero = w.detach().abs() < 1e-12
    for j in torch.nonzero(zero).flatten().tolist():
        (g,) = torch.autograd.grad(w[j], theta, retain_graph=True)
        assert float(g.abs().max()) == 0.0
    (g,) = torch.autograd.grad(w[~zero].sum(), theta)
    assert float(g[0].abs()) > 0.1


# --------------------------------------------------------------------------------------------------
# KKT: equality QP (closed form), a nonlinear ball constraint (closed form), an inequality QP with
# cvxpy (finite differences and cvxpy's duals).


_ge = torch.Generator().manual_seed(5)
AE = torch.randn(2, N, generator=_ge, dtype=D)


def eq_qp_slsqp(
    objective: object, init: torch.Tensor, theta: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    q, b = (t.detach().numpy() for t in theta)
    Qn, An = Q.numpy(), AE.numpy()
    res = so.minimize(
        lambda z: 0.5 * z @ Qn @ z - q @ z,
        init.numpy(),
        jac=lambda z: Qn @ z - q,
        method="SLSQP",
        constraints=[dict(type="eq", fun=lambda z: An @ z - b, jac=lambda z: An)],
        options=dict(ftol=1e-15, maxiter=1000),
    )
    return torch.tensor(res.x, dtype=D)


def test_equality_qp_slsqp_kkt_equals_the_closed_form() -> None:
    q = torch.linspace(-1.0, 1.0, N, dtype=D).requires_grad_(True)
    b = torch.tensor([0.5, -0.3], dtype=D, requires_grad=True)
    cond = KKT(eq=lambda x, th: AE @ x - th[1])
    x = bl.implicit_argmin(
        lambda x, th: 0.5 * x @ Q @ x - th[0] @ x,
        torch.zeros(N, dtype=D),
        (q, b),
        eq_qp_slsqp,
        condition=cond,
    )
    gq, gb = torch.autograd.grad(W @ x, (q, b))
    K = torch.zeros(N + 2, N + 2, dtype=D)
    K[:N, :N], K[:N, N:], K[N:, :N] = Q, AE.T, AE
    u = torch.linalg.solve(K, torch.cat([W, torch.zeros(2, dtype=D)]))
    torch.testing.assert_close(
        x.detach(), torch.linalg.solve(K, torch.cat([q, b]).detach())[:N], rtol=1e-7, atol=1e-8
    )
    torch.testing.assert_close(gq, u[:N], **CLOSED)
    torch.testing.assert_close(gb, u[N:], **CLOSED)


def ball_slsqp(
    objective: object, init: torch.Tensor, theta: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """min ||x - z||^2 s.t. ||x||^2 <= r^2 by SLSQP (a nonlinear inequality)."""
    z, r = (t.detach().numpy() for t in theta)
    res = so.minimize(
        lambda v: ((v - z) ** 2).sum(),
        np.zeros_like(z),
        jac=lambda v: 2 * (v - z),
        method="SLSQP",
        constraints=[dict(type="ineq", fun=lambda v: r**2 - v @ v, jac=lambda v: -2 * v)],
        options=dict(ftol=1e-15, maxiter=1000),
    )
    return torch.tensor(res.x, dtype=D)


@pytest.mark.parametrize("active", [True, False])
def test_nonlinear_ball_constraint_slsqp_kkt_equals_the_closed_form(active: bool) -> None:
    z = torch.tensor([1.2, -0.8, 0.5], dtype=D) * (1.0 if active else 0.3)
    z.requires_grad_(True)
    r = torch.tensor(1.0, dtype=D, requires_grad=True)
    cond = KKT(ineq=lambda x, th: (x @ x - th[1] ** 2).reshape(1))
    x = bl.implicit_argmin(
        lambda x, th: ((x - th[0]) ** 2).sum(), torch.zeros(3, dtype=D), (z, r), ball_slsqp, condition=cond
    )
    w = torch.tensor([0.3, 1.0, -2.0], dtype=D)
    gz, gr = torch.autograd.grad(w @ x, (z, r))
    zd = z.detach()
    nz = torch.linalg.vector_norm(zd)
    if active:  # x = r z / ||z||: dx/dz = r/||z|| (I - z z'/||z||^2), dx/dr = z/||z||
        Jz = (1.0 / nz) * (torch.eye(3, dtype=D) - torch.outer(zd, zd) / nz**2)
        torch.testing.assert_close(gz, Jz @ w, **CLOSED)
        torch.testing.assert_close(gr, w @ zd / nz, **CLOSED)
    else:  # x = z
        torch.testing.assert_close(gz, w, **CLOSED)
        torch.testing.assert_close(gr, torch.zeros((), dtype=D), **CLOSED)


# A random inequality-and-equality QP in cvxpy: min 1/2 x'Qx + q'x s.t. Gx <= h, Ax = b.
_gq = torch.Generator().manual_seed(7)
GQ = torch.randn(8, N, generator=_gq, dtype=D)
H0 = torch.rand(8, generator=_gq, dtype=D) * 0.2 + 0.05
_x, _q, _h = cp.Variable(N), cp.Parameter(N), cp.Parameter(8)
_ineq = GQ.numpy() @ _x <= _h
_eq = AE.numpy()[:1] @ _x == 0.3
_qp = cp.Problem(cp.Minimize(0.5 * cp.quad_form(_x, Q.numpy(), assume_PSD=True) + _q @ _x), [_ineq, _eq])
qp_solver = bl.solvers.Cvxpy(
    _qp, variables=[_x], parameters=[_q, _h], solver="CLARABEL", solve_kwargs=CLARABEL_TIGHT
)
QP_KKT = KKT(eq=lambda x, th: AE[:1] @ x - 0.3, ineq=lambda x, th: GQ @ x - th[1], active_tol=1e-8)


def qp_f(x: torch.Tensor, theta: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return 0.5 * x @ Q @ x + theta[0] @ x


def test_inequality_qp_cvxpy_kkt_matches_finite_differences_and_cvxpy_duals() -> None:
    q = torch.linspace(-3.0, 2.0, N, dtype=D).requires_grad_(True)
    h = H0.clone().requires_grad_(True)
    x = bl.implicit_argmin(qp_f, torch.zeros(N, dtype=D), (q, h), qp_solver, condition=QP_KKT)
    mult = QP_KKT.multipliers(qp_f, x.detach(), (q.detach(), h.detach()))
    assert 1 <= int(mult.active.sum()) < 8  # some constraints active, some not
    torch.testing.assert_close(mult.lam, torch.as_tensor(_ineq.dual_value, dtype=D), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        mult.nu, torch.as_tensor(_eq.dual_value, dtype=D).reshape(1), rtol=1e-6, atol=1e-7
    )
    gq, gh = torch.autograd.grad(W @ x, (q, h))

    def resolve_q(t: torch.Tensor) -> torch.Tensor:
        return qp_solver(qp_f, torch.zeros(N, dtype=D), (t, H0)).x

    def resolve_h(t: torch.Tensor) -> torch.Tensor:
        return qp_solver(qp_f, torch.zeros(N, dtype=D), (q.detach(), t)).x

    torch.testing.assert_close(gq, finite_difference(resolve_q, q.detach(), W), **FD)
    torch.testing.assert_close(gh, finite_difference(resolve_h, H0, W), **FD)


def test_argmin_layer_takes_a_condition() -> None:
    layer = bl.layers.ArgminLayer(
        box_f, lbfgsb, init=torch.zeros(N, dtype=D), condition=BOX_CONDITIONS["kkt"]
    )
    theta = BOX_THETAS["active"].clone().requires_grad_(True)
    x = layer(theta)
    torch.testing.assert_close(grad_of(x, theta, W), box_closed_form(x.detach(), W), **CLOSED)
    assert layer.condition is BOX_CONDITIONS["kkt"]


class _ProjectedLoop:
    """A torch solver that names its own condition (like bl.solvers.ProjectedGradient)."""

    condition = ProjectedFixedPoint(lambda y, th: y.clamp(LO, HI), step=STEP)

    def __call__(self, objective: object, init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        x = init.clone()
        for _ in range(5000):
            x = (x - STEP * (Q @ x - theta)).clamp(LO, HI)
        return x


def test_the_solvers_own_condition_is_the_default() -> None:
    theta = BOX_THETAS["active"].clone().requires_grad_(True)
    x = bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), theta, _ProjectedLoop())
    torch.testing.assert_close(grad_of(x, theta, W), box_closed_form(x.detach(), W), **CLOSED)


@pytest.mark.parametrize("accelerated", [False, True])
def test_the_librarys_projected_gradient_names_its_condition(accelerated: bool) -> None:
    """bl.solvers.ProjectedGradient + bl.projections.box: differentiable with no condition written."""
    solver = bl.solvers.ProjectedGradient(
        bl.projections.fixed(bl.projections.box, LO, HI), step=STEP, tol=1e-12, max_iter=20000,
        accelerated=accelerated,
    )
    theta = BOX_THETAS["active"].clone().requires_grad_(True)
    x = bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), theta, solver)
    torch.testing.assert_close(grad_of(x, theta, W), box_closed_form(x.detach(), W), **CLOSED)


# --------------------------------------------------------------------------------------------------
# Guards


def _fixed(answer: torch.Tensor) -> Callable[..., torch.Tensor]:
    return lambda objective, init, theta: answer.clone()


def test_kkt_degenerate_active_set_is_an_error() -> None:
    # x_0 <= 1 twice: the two active gradients are equal, LICQ fails
    cond = KKT(ineq=lambda x, th: torch.stack([x[0] - 1.0, 2.0 * x[0] - 2.0]))
    theta = torch.tensor([3.0, 0.5], dtype=D, requires_grad=True)
    with pytest.raises(DegenerateActiveSetError, match="linearly dependent"):
        bl.implicit_argmin(
            lambda x, th: 0.5 * ((x - th) ** 2).sum(),
            torch.zeros(2, dtype=D),
            theta,
            _fixed(torch.tensor([1.0, 0.5], dtype=D)),
            condition=cond,
        )


def test_kkt_more_active_constraints_than_unknowns_is_degenerate() -> None:
    cond = KKT(ineq=lambda x, th: torch.stack([x[0] - 1.0, -x[0] + 1.0]))
    with pytest.raises(DegenerateActiveSetError, match="LICQ"):
        bl.implicit_argmin(
            lambda x, th: 0.5 * ((x - th) ** 2).sum(),
            torch.zeros(1, dtype=D),
            torch.tensor([3.0], dtype=D, requires_grad=True),
            _fixed(torch.tensor([1.0], dtype=D)),
            condition=cond,
        )


def test_kkt_strict_complementarity_failure_warns() -> None:
    # min 1/2 (x - 1)^2 s.t. x <= 1: active with multiplier 0
    theta = torch.tensor([1.0], dtype=D, requires_grad=True)
    with pytest.warns(bl.BilevelWarning, match="strict complementarity"):
        x = bl.implicit_argmin(
            lambda x, th: 0.5 * ((x - th) ** 2).sum(),
            torch.zeros(1, dtype=D),
            theta,
            _fixed(torch.tensor([1.0], dtype=D)),
            condition=KKT(ineq=lambda x, th: x - 1.0),
        )
    # the one-sided derivative that keeps the constraint active
    (g,) = torch.autograd.grad(x.sum(), theta)
    assert float(g) == pytest.approx(0.0, abs=1e-12)


def test_kkt_no_warning_with_strict_complementarity() -> None:
    theta = torch.tensor([2.0], dtype=D, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bl.implicit_argmin(
            lambda x, th: 0.5 * ((x - th) ** 2).sum(),
            torch.zeros(1, dtype=D),
            theta,
            _fixed(torch.tensor([1.0], dtype=D)),
            condition=KKT(ineq=lambda x, th: x - 1.0),
        )


def test_kkt_negative_multiplier_is_an_optimality_error() -> None:
    # min 1/2 x^2 s.t. x <= 1, but the "answer" x = 1 sits on the bound pulling the wrong way
    with pytest.raises(bl.OptimalityError, match="negative multipliers"):
        bl.implicit_argmin(
            lambda x, th: 0.5 * ((x - th) ** 2).sum(),
            torch.zeros(1, dtype=D),
            torch.tensor([0.0], dtype=D, requires_grad=True),
            _fixed(torch.tensor([1.0], dtype=D)),
            condition=KKT(ineq=lambda x, th: x - 1.0),
        )


def test_kkt_infeasible_answer_is_an_optimality_error() -> None:
    with pytest.raises(bl.OptimalityError, match="violates the inequality"):
        bl.implicit_argmin(
            lambda x, th: 0.5 * ((x - th) ** 2).sum(),
            torch.zeros(1, dtype=D),
            torch.tensor([3.0], dtype=D, requires_grad=True),
            _fixed(torch.tensor([1.5], dtype=D)),
            condition=KKT(ineq=lambda x, th: x - 1.0),
        )


def test_kkt_large_stationarity_residual_is_the_usual_optimality_error() -> None:
    # x = 0.5 is strictly feasible (inactive) but not stationary for theta = 3
    with pytest.raises(bl.OptimalityError, match="optimality residual"):
        bl.implicit_argmin(
            lambda x, th: 0.5 * ((x - th) ** 2).sum(),
            torch.zeros(1, dtype=D),
            torch.tensor([3.0], dtype=D, requires_grad=True),
            _fixed(torch.tensor([0.5], dtype=D)),
            condition=KKT(ineq=lambda x, th: x - 1.0),
        )


def test_projected_condition_residual_is_checked() -> None:
    theta = BOX_THETAS["active"].clone().requires_grad_(True)
    with pytest.raises(bl.OptimalityError, match="optimality residual"):
        bl.implicit_argmin(
            box_f,
            torch.zeros(N, dtype=D),
            theta,
            _fixed(torch.zeros(N, dtype=D)),
            condition=BOX_CONDITIONS["projected"],
        )


@pytest.mark.parametrize(
    "bad, match",
    [
        ("projected", "expected a bilevel.conditions.Condition"),
        (KKT, "the class KKT; pass an instance"),
        (lambda x, th: x, "expected a bilevel.conditions.Condition"),
    ],
)
def test_wrong_condition_type_is_a_type_error(bad: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), BOX_THETAS["inactive"], lbfgsb, condition=bad)  # type: ignore[arg-type]


def test_argmin_layer_wrong_condition_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ArgminLayer\\(condition="):
        bl.layers.ArgminLayer(box_f, lbfgsb, condition="kkt")  # type: ignore[arg-type]


def test_a_solvers_wrong_condition_is_a_type_error() -> None:
    class Odd:
        condition = "projected"

        def __call__(self, objective: object, init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            return init

    with pytest.raises(TypeError, match="the solver Odd's condition"):
        bl.implicit_argmin(box_f, torch.zeros(N, dtype=D), BOX_THETAS["inactive"], Odd())


@pytest.mark.parametrize("hvp", [bl.ForwardOverReverse(), bl.DenseHessian()])
def test_hvp_with_a_non_stationarity_condition_is_refused(hvp: bl.HVPOracle) -> None:
    with pytest.raises(ValueError, match="leave hvp=None"):
        bl.implicit_argmin(
            box_f,
            torch.zeros(N, dtype=D),
            BOX_THETAS["inactive"],
            lbfgsb,
            hvp,
            condition=BOX_CONDITIONS["projected"],
        )


def test_hvp_with_stationarity_is_accepted() -> None:
    theta = BOX_THETAS["inactive"].clone().requires_grad_(True)
    x = bl.implicit_argmin(
        box_f, torch.zeros(N, dtype=D), theta, lbfgsb, bl.DenseHessian(), condition=Stationarity()
    )
    torch.testing.assert_close(grad_of(x, theta, W), torch.linalg.solve(Q, W), **CLOSED)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(), ValueError, "no constraints"),
        (dict(eq="x = 0"), TypeError, "expected a function"),
        (dict(ineq=lambda x, th: x, active_tol=-1.0), ValueError, "non-negative"),
        (dict(ineq=lambda x, th: x, rank_tol=True), TypeError, "non-negative float"),
    ],
)
def test_kkt_construction_guards(kwargs: dict[str, object], err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        KKT(**kwargs)  # type: ignore[arg-type]


def test_kkt_constraint_must_return_a_tensor() -> None:
    with pytest.raises(TypeError, match="expected a floating-point Tensor"):
        bl.implicit_argmin(
            box_f,
            torch.zeros(N, dtype=D),
            BOX_THETAS["inactive"].clone().requires_grad_(True),
            lbfgsb,
            condition=KKT(ineq=lambda x, th: [1.0]),
        )  # type: ignore[arg-type,return-value]


# --------------------------------------------------------------------------------------------------
# The lasso / elastic-net example, run small


def _load_example() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "examples" / "lasso_hyperparameter.py"
    spec = importlib.util.spec_from_file_location("_example_lasso_hyperparameter", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "lasso, solver",
    [pytest.param(False, "fista", id="enet-fista"), pytest.param(True, "sklearn", id="lasso-sklearn")],
)
def test_lasso_example_hypergradient_matches_finite_differences(lasso: bool, solver: str) -> None:
    example = _load_example()
    rep = example.run(steps=4, lr=0.3, lasso=lasso, solver=solver)
    for check in (rep.first, rep.last):
        assert check.rel_fd < 1e-6, check  # eps = 1e-6 on a 1e-12 accurate solve
        assert check.rel_closed < 1e-8, check
        assert 0 < check.support < 10  # some coefficients zero: the l1 kink is active
    assert rep.val_mse[-1] < rep.val_mse[0]


def test_a_non_finite_objective_at_the_answer_is_an_error_with_any_condition() -> None:
    def f(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return box_f(x, theta) + torch.log(x[0] - LO)  # -inf on the lower bound

    theta = BOX_THETAS["active"].clone().requires_grad_(True)
    answer = torch.zeros(N, dtype=D)
    answer[0] = LO  # feasible, and where log(x[0] - LO) = -inf
    with pytest.raises(bl.NonFiniteError, match="objective is"):
        bl.implicit_argmin(
            f, torch.zeros(N, dtype=D), theta, _fixed(answer), condition=BOX_CONDITIONS["projected"]
        )
