"""implicit_argmin / implicit_root / fixed_point against independent references (float64).

References: ridge's closed form, the iMAML Jacobian (I + H/lam)^-1 v, gradcheck, and
central finite differences of a float64 re-solve.  Each is run with several inner
solvers, at least one of them plain NumPy or SciPy, written here so that these
tests depend on the core alone.
"""

from __future__ import annotations

import warnings

import helpers as H
import numpy as np
import pytest
import scipy.optimize
import torch

import bilevel as bl

D = torch.float64
RTOL = 1e-8


# ---------------------------------------------------------------- local inner solvers
def torch_newton(objective, init, theta, iters: int = 50):  # type: ignore[no-untyped-def]
    """Exact Newton on a single-tensor phi with dense Hessians from autograd."""
    x = init.clone()
    for _ in range(iters):
        with torch.enable_grad():
            H = torch.autograd.functional.hessian(lambda p: objective(p, theta), x)
            g = torch.func.grad(lambda p: objective(p, theta))(x)
        x = x - torch.linalg.solve(H.reshape(x.numel(), -1), g.reshape(-1)).view_as(x)
        if float(g.norm()) < 1e-14:
            break
    return x


def scipy_lbfgs(objective, init, theta):  # type: ignore[no-untyped-def]
    """SciPy L-BFGS-B on a NumPy vector; torch only evaluates f and its gradient."""

    def fg(z: np.ndarray) -> tuple[float, np.ndarray]:
        p = torch.tensor(z, dtype=D).view_as(init).requires_grad_(True)
        with torch.enable_grad():
            f = objective(p, theta)
            (g,) = torch.autograd.grad(f, p)
        return float(f), g.numpy().reshape(-1).copy()

    r = scipy.optimize.minimize(
        fg,
        init.numpy().reshape(-1),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-13, "ftol": 1e-300, "maxiter": 10_000, "maxcor": 30},
    )
    return bl.SolverResult(torch.tensor(r.x, dtype=D).view_as(init), bl.SolverStatus.CONVERGED, r.nit)


def cg_normal_equations(objective, init, theta):  # type: ignore[no-untyped-def]
    """For quadratics: solve grad G(phi) = 0 with our own CG on HVPs (matrix-free)."""
    with torch.enable_grad():
        g0 = torch.func.grad(lambda p: objective(p, theta))(torch.zeros_like(init))

    def hv(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return torch.func.jvp(torch.func.grad(lambda p: objective(p, theta)), (init,), (v,))[1]

    res = bl.CG()(lambda v: hv(v.view_as(init)).reshape(-1), -g0.reshape(-1))
    return res.x.view_as(init)


# ---------------------------------------------------------------- ridge: closed form
def _ridge_data(seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    Xtr, Xval = torch.randn(30, 6, generator=g, dtype=D), torch.randn(20, 6, generator=g, dtype=D)
    w_true = torch.randn(6, generator=g, dtype=D)
    ytr = Xtr @ w_true + 0.3 * torch.randn(30, generator=g, dtype=D)
    yval = Xval @ w_true + 0.3 * torch.randn(20, generator=g, dtype=D)
    return Xtr, ytr, Xval, yval


def ridge_numpy(objective, init, theta):  # type: ignore[no-untyped-def]
    """Plain NumPy normal equations for the ridge problem below."""
    Xtr, ytr, _, _ = _ridge_data()
    lam = float(np.exp(theta.detach().numpy()))
    X, y = Xtr.numpy(), ytr.numpy()
    w = np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ y)
    return torch.from_numpy(w)


@pytest.mark.parametrize("solver", [ridge_numpy, torch_newton, scipy_lbfgs, cg_normal_equations])
def test_ridge_hypergradient_matches_closed_form(solver) -> None:  # type: ignore[no-untyped-def]
    Xtr, ytr, Xval, yval = _ridge_data()

    def G(w: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((Xtr @ w - ytr) ** 2).sum() + 0.5 * torch.exp(log_lam) * (w**2).sum()

    log_lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    w = bl.implicit_argmin(G, torch.zeros(6, dtype=D), log_lam, solver=solver)
    val = 0.5 * ((Xval @ w - yval) ** 2).sum()
    (got,) = torch.autograd.grad(val, log_lam)

    lam = float(np.exp(0.7))
    A = Xtr.T @ Xtr + lam * torch.eye(6, dtype=D)
    w_star = torch.linalg.solve(A, Xtr.T @ ytr)
    dw_dlam = -torch.linalg.solve(A, w_star)  # d w*/d lam = -(X'X + lam I)^-1 w*
    expected = (Xval.T @ (Xval @ w_star - yval)) @ dw_dlam * lam  # chain rule through exp
    # L-BFGS stops at ||grad|| ~ 1e-10 rather than 1e-15: its answer, not the layer, limits the match.
    tol = 1e-7 if solver is scipy_lbfgs else RTOL
    torch.testing.assert_close(got, expected, rtol=tol, atol=0)


# ---------------------------------------------------------------- iMAML: Lemma 1
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("solver", [torch_newton, scipy_lbfgs, cg_normal_equations])
def test_imaml_jacobian_on_random_quadratics(seed: int, solver) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    n, lam = 8, 2.0
    M = torch.randn(n, n, generator=g, dtype=D)
    A = M @ M.T / n  # PSD support-loss Hessian
    bvec = torch.randn(n, generator=g, dtype=D)
    theta = torch.randn(n, generator=g, dtype=D, requires_grad=True)
    v = torch.randn(n, generator=g, dtype=D)

    def G(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 0.5 * phi @ A @ phi + bvec @ phi + lam / 2 * ((phi - th) ** 2).sum()

    phi = bl.implicit_argmin(G, torch.zeros(n, dtype=D), theta, solver=solver)
    (got,) = torch.autograd.grad(phi, theta, v)
    expected = torch.linalg.solve(torch.eye(n, dtype=D) + A / lam, v)  # Lemma 1
    tol = 1e-7 if solver is scipy_lbfgs else RTOL  # L-BFGS: see the ridge test
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------- gradcheck
def test_gradcheck_through_newton_solves() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(15, 4, generator=g, dtype=D)
    y = (torch.rand(15, generator=g, dtype=D) > 0.5).to(D)

    def G(w: torch.Tensor, th: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        centre, log_lam = th
        logits = X @ w
        return (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            + 0.5 * (torch.exp(log_lam) * (w - centre) ** 2).sum()
        )

    def f(centre: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        return bl.implicit_argmin(G, torch.zeros(4, dtype=D), (centre, log_lam), solver=torch_newton)

    centre = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    log_lam = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(f, (centre, log_lam), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------- logistic, one weight per feature
def _logreg_data():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    Xtr, Xval = torch.randn(40, 5, generator=g, dtype=D), torch.randn(30, 5, generator=g, dtype=D)
    w = torch.randn(5, generator=g, dtype=D)
    ytr = (torch.sigmoid(Xtr @ w) > torch.rand(40, generator=g, dtype=D)).to(D)
    yval = (torch.sigmoid(Xval @ w) > torch.rand(30, generator=g, dtype=D)).to(D)
    return Xtr, ytr, Xval, yval


def logreg_numpy_newton(objective, init, theta):  # type: ignore[no-untyped-def]
    """Plain NumPy Newton for the weighted-L2 logistic regression below."""
    Xtr, ytr, _, _ = _logreg_data()
    X, y, lam = Xtr.numpy(), ytr.numpy(), np.exp(theta.detach().numpy())
    w = np.zeros(X.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + lam * w
        if np.linalg.norm(grad) < 1e-14:
            break
        H = X.T @ (X * (p * (1 - p))[:, None]) + np.diag(lam)
        w = w - np.linalg.solve(H, grad)
    return torch.from_numpy(w)


def _logreg_G(w: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
    Xtr, ytr, _, _ = _logreg_data()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(Xtr @ w, ytr, reduction="sum")
    return bce + 0.5 * (torch.exp(log_lam) * w**2).sum()


def _val_loss(w: torch.Tensor) -> torch.Tensor:
    _, _, Xval, yval = _logreg_data()
    return torch.nn.functional.binary_cross_entropy_with_logits(Xval @ w, yval, reduction="mean")


@pytest.mark.parametrize("solver", [logreg_numpy_newton, torch_newton, scipy_lbfgs])
def test_logreg_per_feature_weights_match_finite_differences(solver) -> None:  # type: ignore[no-untyped-def]
    theta0 = torch.tensor([0.5, -1.0, 0.0, 1.5, -0.3], dtype=D)
    log_lam = theta0.clone().requires_grad_(True)
    w = bl.implicit_argmin(_logreg_G, torch.zeros(5, dtype=D), log_lam, solver=solver)
    (got,) = torch.autograd.grad(_val_loss(w), log_lam)

    def F(th: torch.Tensor) -> float:
        return float(_val_loss(logreg_numpy_newton(None, None, th)))

    # Fourth-order central differences of an exact re-solve: truncation ~h^4, rounding ~1e-16/h.
    h = 1e-3
    fd = torch.zeros(5, dtype=D)
    for i in range(5):
        e = torch.zeros(5, dtype=D)
        e[i] = h
        fd[i] = (-F(theta0 + 2 * e) + 8 * F(theta0 + e) - 8 * F(theta0 - e) + F(theta0 - 2 * e)) / (12 * h)
    tol = 1e-7 if solver is scipy_lbfgs else RTOL  # L-BFGS: see the ridge test
    torch.testing.assert_close(got, fd, rtol=tol, atol=1e-11)


# ---------------------------------------------------------------- structures: theta in many roles
def test_tuple_phi_and_theta_in_every_role() -> None:
    """theta as proximal centre, as a weight inside exp, and as data weights, phi a tuple."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(12, 3, generator=g, dtype=D)
    y = torch.randn(12, generator=g, dtype=D)

    def G(phi, th):  # type: ignore[no-untyped-def]
        w, b = phi
        centre, log_lam, data_w = th
        r = X @ w + b - y
        return 0.5 * (data_w * r**2).sum() + 0.5 * torch.exp(log_lam) * ((w - centre) ** 2).sum() + 0.5 * b**2

    def closed_form(centre, log_lam, data_w):  # type: ignore[no-untyped-def]
        Xa = torch.cat([X, torch.ones(12, 1, dtype=D)], 1)
        lam = torch.exp(log_lam)
        reg = torch.diag(torch.cat([lam.expand(3), torch.ones(1, dtype=D)]))
        rhs = Xa.T @ (data_w * y) + torch.cat([lam * centre, torch.zeros(1, dtype=D)])
        sol = torch.linalg.solve(Xa.T @ (data_w[:, None] * Xa) + reg, rhs)
        return sol[:3], sol[3]

    def solver(obj, init, th):  # type: ignore[no-untyped-def]
        return closed_form(*th)

    centre = torch.randn(3, generator=g, dtype=D, requires_grad=True)
    log_lam = torch.tensor(0.2, dtype=D, requires_grad=True)
    data_w = torch.rand(12, generator=g, dtype=D).add(0.5).requires_grad_(True)
    init = (torch.zeros(3, dtype=D), torch.zeros((), dtype=D))
    w, b = bl.implicit_argmin(G, init, (centre, log_lam, data_w), solver=solver)
    assert isinstance(w, torch.Tensor) and w.shape == (3,) and b.shape == ()
    loss = (w**3).sum() + torch.sin(b)
    got = torch.autograd.grad(loss, (centre, log_lam, data_w))
    w_ref, b_ref = closed_form(centre, log_lam, data_w)
    ref = torch.autograd.grad((w_ref**3).sum() + torch.sin(b_ref), (centre, log_lam, data_w))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=RTOL, atol=1e-12)


def test_only_theta_leaves_that_require_grad_get_gradients() -> None:
    def G(phi, th):  # type: ignore[no-untyped-def]
        a, b = th
        return ((phi - a) ** 2).sum() + b * (phi**2).sum()

    a = torch.ones(3, dtype=D, requires_grad=True)
    b = torch.tensor(1.0, dtype=D)  # a constant
    phi = bl.implicit_argmin(G, torch.zeros(3, dtype=D), (a, b), solver=lambda o, i, th: th[0] / (1 + th[1]))
    phi.sum().backward()
    torch.testing.assert_close(a.grad, torch.full((3,), 0.5, dtype=D))
    assert b.grad is None


# ---------------------------------------------------------------- work and diagnostics
def test_backward_costs_at_most_k_plus_one_hvps() -> None:
    n = 20
    g = torch.Generator().manual_seed(0)
    M = torch.randn(n, n, generator=g, dtype=D)
    A = M @ M.T / n + torch.eye(n, dtype=D)
    calls = 0

    def hvp(phi, theta, v):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return A @ v

    def G(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 0.5 * phi @ A @ phi - th @ phi

    theta = torch.randn(n, generator=g, dtype=D, requires_grad=True)
    solve = lambda o, i, th: torch.linalg.solve(A, th)  # noqa: E731
    for k in (1, 3, 5):
        calls = 0
        phi, info = bl.implicit_argmin(
            G,
            torch.zeros(n, dtype=D),
            theta,
            solve,
            hvp=hvp,
            linear_solver=bl.CG(max_iter=k, rtol=0.0),
            return_info=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fixed budget (rtol = atol = 0) is no failure
            phi.sum().backward()
        assert info.last_backward.n_iter == k and info.last_backward.status is bl.LinearStatus.BUDGET
        assert calls == info.last_backward.n_matvec == k
    for k in (1, 3):  # a tolerance missed at the cap is a failure: raised, or warned with throw=False
        phi, info = bl.implicit_argmin(
            G,
            torch.zeros(n, dtype=D),
            theta,
            solve,
            hvp=hvp,
            linear_solver=bl.CG(max_iter=k),
            return_info=True,
        )
        with pytest.raises(bl.LinearSolveError, match="MAX_ITER"):
            phi.sum().backward()
    calls = 0
    phi, info = bl.implicit_argmin(G, torch.zeros(n, dtype=D), theta, solve, hvp=hvp, return_info=True)
    phi.sum().backward()
    assert info.last_backward.converged and calls == info.last_backward.n_iter + 1


def test_diagnostics_are_readable_after_forward_and_backward() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=D))

    def G(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 0.5 * phi @ A @ phi - th @ phi

    theta = torch.ones(3, dtype=D, requires_grad=True)
    off = torch.tensor([1e-6, 0.0, 0.0], dtype=D)  # a slightly inexact inner solve
    phi, info = bl.implicit_argmin(
        G,
        torch.zeros(3, dtype=D),
        theta,
        solver=lambda o, i, th: bl.SolverResult(
            torch.linalg.solve(A, th) + off, bl.SolverStatus.CONVERGED, 7
        ),
        return_info=True,
    )
    assert info.residual_norm == pytest.approx(1e-6, rel=1e-6)
    assert info.solver_result.n_iter == 7 and info.last_backward is None
    phi.sum().backward()
    assert info.last_backward.converged and info.last_backward.relative_residual <= 1e-10
    phi2, _ = bl.implicit_argmin(
        G,
        torch.zeros(3, dtype=D),
        theta,
        lambda o, i, th: th / torch.diag(A),
        return_info=True,
        backward_x0=info.last_backward.x,
    )
    assert phi2.requires_grad


# ---------------------------------------------------------------- roots and fixed points
def test_fixed_point_of_projected_gradient_box_ls() -> None:
    """Box-constrained least squares min 1/2||x - c||^2 s.t. 0 <= x <= 1: x* = clip(c)."""
    c = torch.tensor([-0.5, 0.3, 0.9, 1.7], dtype=D, requires_grad=True)

    def T(x: torch.Tensor, c_: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x - 0.5 * (x - c_), 0.0, 1.0)

    def iterate(T_, init, c_):  # type: ignore[no-untyped-def]
        x = init
        for _ in range(200):
            x = T_(x, c_)
        return x

    x = bl.fixed_point(T, torch.zeros(4, dtype=D), c, solver=iterate)
    torch.testing.assert_close(x, torch.tensor([0.0, 0.3, 0.9, 1.0], dtype=D))
    (grad,) = torch.autograd.grad((x * torch.arange(1.0, 5.0, dtype=D)).sum(), c)
    # Derivative of clip: 1 on the free set, 0 on the active set.
    torch.testing.assert_close(grad, torch.tensor([0.0, 2.0, 3.0, 0.0], dtype=D), rtol=RTOL, atol=1e-12)


def test_implicit_root_nonsymmetric_jacobian() -> None:
    g = torch.Generator().manual_seed(1)
    B = torch.eye(4, dtype=D) * 2 + 0.5 * torch.randn(4, 4, generator=g, dtype=D)

    def F(x: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return B @ x + 0.1 * torch.tanh(x) - th

    def newton(F_, init, th):  # type: ignore[no-untyped-def]
        x = init.clone()
        for _ in range(30):
            J = torch.autograd.functional.jacobian(lambda z: F_(z, th), x)
            x = x - torch.linalg.solve(J, F_(x, th))
        return x

    theta = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    for ls in (bl.GMRES(), bl.BiCGStab(), bl.DenseSolve()):
        x = bl.implicit_root(F, torch.zeros(4, dtype=D), theta, solver=newton, linear_solver=ls)
        v = torch.arange(1.0, 5.0, dtype=D)
        (got,) = torch.autograd.grad(x, theta, v)
        xd = x.detach()
        J = B + 0.1 * torch.diag(1 - torch.tanh(xd) ** 2)
        torch.testing.assert_close(got, torch.linalg.solve(J.T, v), rtol=RTOL, atol=1e-12)


# ---------------------------------------------------------------- bad input
def _quad(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((phi - th) ** 2).sum()


def _exact(o, i, th):  # type: ignore[no-untyped-def]
    return th.clone()


THETA = torch.ones(3, dtype=D)


@pytest.mark.parametrize(
    ("solver", "error", "match"),
    [
        (lambda o, i, th: torch.full((3,), float("nan"), dtype=D), bl.NonFiniteError, "the solver's answer"),
        (lambda o, i, th: torch.zeros(4, dtype=D), bl.StructureError, r"shape \(4,\), init has \(3,\)"),
        (lambda o, i, th: torch.zeros(3, dtype=torch.float32), bl.StructureError, "dtype torch.float32"),
        (lambda o, i, th: (th,), bl.StructureError, "is a tuple but init is a Tensor"),
        (lambda o, i, th: torch.zeros(3, dtype=D, device="meta"), bl.StructureError, "is on meta"),
        (lambda o, i, th: np.zeros(3), bl.StructureError, "is a ndarray but init is a Tensor"),
    ],
)
def test_bad_solver_answers(solver, error, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), THETA.clone().requires_grad_(), solver)


def test_nonfinite_theta() -> None:
    theta = torch.tensor([1.0, float("inf"), 0.0], dtype=D, requires_grad=True)
    with pytest.raises(bl.NonFiniteError, match="theta contains NaN or infinity"):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), theta, _exact)


def test_objective_must_be_scalar() -> None:
    with pytest.raises(bl.StructureError, match=r"shape \(3,\); it must return a scalar"):
        bl.implicit_argmin(lambda p, t: (p - t) ** 2, torch.zeros(3, dtype=D), THETA, _exact)
    with pytest.raises(TypeError, match="must return a scalar Tensor"):
        bl.implicit_argmin(lambda p, t: 1.0, torch.zeros(3, dtype=D), THETA, _exact)


def test_optimality_residual_threshold() -> None:
    far = lambda o, i, th: th + 0.1  # noqa: E731  residual 0.1 * sqrt(3)
    theta = THETA.clone().requires_grad_()
    with pytest.raises(bl.OptimalityError, match=r"residual .* exceeds optimality_tol=0.001"):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), theta, far)
    with pytest.warns(bl.BilevelWarning, match="exceeds optimality_tol"):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), theta, far, throw=False)
    phi = bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), theta, far, optimality_tol=1.0)
    assert phi.requires_grad
    capped = lambda o, i, th: bl.SolverResult(th + 0.1, bl.SolverStatus.MAX_ITER, 5)  # noqa: E731
    with pytest.warns(bl.BilevelWarning, match="did not converge"):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), theta, capped, optimality_tol=None)


def test_linear_solve_that_misses_its_tolerance() -> None:
    n = 10
    A = torch.diag(torch.logspace(0, 3, n, dtype=D))
    G = lambda p, t: 0.5 * p @ A @ p - t @ p  # noqa: E731
    theta = torch.ones(n, dtype=D, requires_grad=True)
    solve = lambda o, i, th: torch.linalg.solve(A, th)  # noqa: E731
    phi = bl.implicit_argmin(G, torch.zeros(n, dtype=D), theta, solve, linear_solver=bl.CG(max_iter=2))
    with pytest.raises(bl.LinearSolveError, match="backward solve stopped with status MAX_ITER"):
        phi.sum().backward()
    phi = bl.implicit_argmin(
        G, torch.zeros(n, dtype=D), theta, solve, linear_solver=bl.CG(max_iter=2), throw=False
    )
    with pytest.warns(bl.BilevelWarning, match="raise max_iter"):
        phi.sum().backward()
    assert theta.grad is not None


def test_negative_curvature_in_cg() -> None:
    # A saddle: grad = 0 at phi = theta, Hessian diag(1, -1): not a minimum.
    G = lambda p, t: 0.5 * (p[0] - t[0]) ** 2 - 0.5 * (p[1] - t[1]) ** 2  # noqa: E731
    theta = torch.ones(2, dtype=D, requires_grad=True)
    phi = bl.implicit_argmin(G, torch.zeros(2, dtype=D), theta, _exact)
    with pytest.raises(bl.NegativeCurvatureError, match="not positive definite"):
        phi.sum().backward()


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="solver must be a callable"):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), THETA, solver=None)
    with pytest.raises(
        TypeError, match=r"implicit_argmin\(return_info='yes'\): return_info must be True or False"
    ):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), THETA, _exact, return_info="yes")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="optimality_tol"):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), THETA, _exact, optimality_tol=-1.0)
    with pytest.raises(TypeError, match="must be floating point"):
        bl.implicit_argmin(_quad, torch.zeros(3, dtype=torch.int64), THETA, _exact)


@pytest.mark.parametrize("case", H.SOLVERS, ids=repr)
def test_a_tree_with_an_empty_leaf_is_solved_and_differentiated(case: H.SolverCase) -> None:
    """init {a: (3,), b: (0,)}: the empty leaf is carried through the solve and the backward pass;
    the answer and gradient are those of the problem in a alone (a* = theta, d sum(a*) / d theta = 1)."""
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)

    def G(p: dict[str, torch.Tensor], th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((p["a"] - th) ** 2).sum() + (p["b"] ** 2).sum()

    init = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(0, dtype=torch.float64)}
    x = bl.implicit_argmin(G, init, theta, solver=case(H.Scale(step=1.0, mu=1.0)))
    assert x["b"].shape == (0,)
    torch.testing.assert_close(x["a"], theta.detach(), rtol=0, atol=1e-6)
    x["a"].sum().backward()
    torch.testing.assert_close(theta.grad, torch.ones(3, dtype=torch.float64))
