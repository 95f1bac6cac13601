"""Inner solvers outside PyTorch: cvxpy, scikit-learn and a separate process.

Each solver's answer is checked against a closed form or an independent float64
reference, and its implicit hypergradient against a closed form, the dense
implicit-function formula, or central finite differences of re-solves.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import cvxpy as cp
import numpy as np
import problems as P
import pytest
import torch

import bilevel as bl
from bilevel.solvers import (
    Cvxpy,
    ScipyLBFGS,
    SklearnLogisticRegression,
    SklearnRidge,
    Subprocess,
    sklearn_logistic_objective,
    sklearn_ridge_objective,
)

D = torch.float64


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=D)


# ----------------------------------------------------------------------------- data and closed forms


def regression_data(seed: int = 0, n: int = 30, d: int = 4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = X @ w + 0.5 + 0.3 * rng.standard_normal(n)
    Xv = rng.standard_normal((n, d))
    yv = Xv @ w + 0.5 + 0.3 * rng.standard_normal(n)
    return X, y, Xv, yv


def ridge_closed_form(
    X: np.ndarray, y: np.ndarray, alpha: float, intercept: bool
) -> tuple[np.ndarray, np.ndarray]:
    """argmin ||y - X w - b||^2 + alpha ||w||^2 and its derivative in alpha, as [w; b]."""
    n, d = X.shape
    Xa = np.hstack([X, np.ones((n, 1))]) if intercept else X
    Pm = np.diag([1.0] * d + ([0.0] if intercept else []))
    K = Xa.T @ Xa + alpha * Pm
    z = np.linalg.solve(K, Xa.T @ y)
    return z, -np.linalg.solve(K, Pm @ z)


def ridge_hypergrad(X, y, Xv, yv, alpha: float, intercept: bool) -> float:  # type: ignore[no-untyped-def]
    """d/d alpha of the validation error ||yv - Xv w* - b*||^2."""
    z, dz = ridge_closed_form(X, y, alpha, intercept)
    Xva = np.hstack([Xv, np.ones((Xv.shape[0], 1))]) if intercept else Xv
    return float(-2.0 * (yv - Xva @ z) @ Xva @ dz)


# ----------------------------------------------------------------------------- cvxpy


def cvxpy_ridge(X: np.ndarray, y: np.ndarray) -> tuple[Cvxpy, object]:
    w, b, alpha = cp.Variable(X.shape[1]), cp.Variable(), cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - X @ w - b) + alpha * cp.sum_squares(w)))
    return Cvxpy(prob, variables=[w, b], parameters=[alpha], solver="CLARABEL"), prob


def test_cvxpy_solves_ridge() -> None:
    X, y, _, _ = regression_data()
    solver, _ = cvxpy_ridge(X, y)
    init = (torch.zeros(4, dtype=D), torch.zeros((), dtype=D))
    res = solver(sklearn_ridge_objective(X, y), init, torch.tensor(2.0, dtype=D))
    assert res.status is bl.SolverStatus.CONVERGED
    assert res.info["cvxpy_status"] == "optimal" and res.info["solver_name"] == "CLARABEL"
    assert res.x[0].dtype == D and res.x[1].shape == ()  # type: ignore[index]
    z, _ = ridge_closed_form(X, y, 2.0, intercept=True)
    torch.testing.assert_close(torch.cat([res.x[0], res.x[1][None]]), t64(z), rtol=0, atol=1e-6)  # type: ignore[index]
    assert res.fun == pytest.approx(
        float(sklearn_ridge_objective(X, y)(res.x, torch.tensor(2.0, dtype=D))), rel=1e-6
    )


def test_cvxpy_ridge_hypergradient() -> None:
    X, y, Xv, yv = regression_data()
    solver, _ = cvxpy_ridge(X, y)
    alpha = torch.tensor(2.0, dtype=D, requires_grad=True)
    init = (torch.zeros(4, dtype=D), torch.zeros((), dtype=D))
    w, b = bl.implicit_argmin(sklearn_ridge_objective(X, y), init, alpha, solver=solver)
    ((t64(yv) - t64(Xv) @ w - b) ** 2).sum().backward()
    # CLARABEL's default tolerances (1e-8) bound the answer's accuracy.
    assert float(alpha.grad) == pytest.approx(ridge_hypergrad(X, y, Xv, yv, 2.0, True), rel=1e-5)  # type: ignore[arg-type]


def box_lsq(seed: int = 4, m: int = 12, n: int = 6, bound: float = 0.5):  # type: ignore[no-untyped-def]
    """min 1/2 ||A x - b||^2 over -bound <= x <= bound, with b the parameter."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, n))
    b_val = 1.5 * rng.standard_normal(m)
    x, b = cp.Variable(n), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A @ x - b)), [x >= -bound, x <= bound])
    solver = Cvxpy(
        prob,
        variables=[x],
        parameters=[b],
        solver="CLARABEL",
        solve_kwargs={"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12},
    )
    return A, b_val, bound, solver


def test_cvxpy_box_constrained_lsq_derivative_via_fixed_point() -> None:
    A, b_val, bound, solver = box_lsq()
    At = t64(A)
    eta = 1.0 / float(np.linalg.eigvalsh(A.T @ A)[-1])

    def T(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Projected gradient step: its fixed points are the box-constrained minimizers."""
        return (x - eta * At.T @ (At @ x - b)).clamp(-bound, bound)

    b = t64(b_val).requires_grad_(True)
    x, info = bl.fixed_point(T, torch.zeros(A.shape[1], dtype=D), b, solver=solver, return_info=True)
    assert info.solver_result.converged and info.residual_norm < 1e-8
    wvec = torch.linspace(-1.0, 1.0, A.shape[1], dtype=D)
    (wvec @ x).backward()

    # Closed form: active coordinates do not move; the free ones solve the LS problem
    # restricted to them, so d x_F / d b = (A_F'A_F)^-1 A_F' and dL/db = A_F (A_F'A_F)^-1 w_F.
    xs = x.detach().numpy()
    free = np.abs(xs) < bound - 1e-6
    grad = A.T @ (A @ xs - b_val)
    assert 0 < free.sum() < len(xs), "the test needs both active and free coordinates"
    assert np.all(np.abs(grad[~free]) > 1e-3), "strict complementarity (non-degenerate active set)"
    AF = A[:, free]
    expected = AF @ np.linalg.solve(AF.T @ AF, wvec.numpy()[free])
    torch.testing.assert_close(b.grad, t64(expected), rtol=1e-7, atol=1e-9)


def test_cvxpy_kkt_with_duals_via_implicit_root() -> None:
    """Projection onto the hyperplane sum(z) = 1: unknowns (z, nu), F = KKT conditions."""
    n = 4
    th, z = cp.Parameter(n), cp.Variable(n)
    con = cp.sum(z) == 1
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(z - th)), [con])
    solver = Cvxpy(prob, variables=[z, con], parameters=[th], solver="CLARABEL")

    def kkt(x: tuple[torch.Tensor, torch.Tensor], theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zz, nu = x
        return zz - theta + nu, zz.sum() - 1.0  # cvxpy's dual sign: L = f + nu (sum z - 1)

    theta = torch.tensor([0.3, 0.9, -0.2, 0.5], dtype=D, requires_grad=True)
    zz, _nu = bl.implicit_root(kkt, (torch.zeros(n, dtype=D), torch.zeros((), dtype=D)), theta, solver=solver)
    torch.testing.assert_close(
        zz.detach(), theta.detach() - (theta.detach().sum() - 1) / n, rtol=0, atol=1e-7
    )
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=D)
    (w @ zz).backward()
    torch.testing.assert_close(theta.grad, w - w.mean(), rtol=0, atol=1e-9)  # dz/dtheta = I - 11'/n


def test_cvxpy_status_mapping() -> None:
    A, b_val, _, _ = box_lsq()
    x, b = cp.Variable(A.shape[1]), cp.Parameter(A.shape[0])
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A @ x - b)), [x >= -0.5, x <= 0.5])
    capped = Cvxpy(prob, variables=[x], parameters=[b], solver="SCS", solve_kwargs={"max_iters": 2})
    init = torch.zeros(A.shape[1], dtype=D)
    with pytest.warns(UserWarning, match="inaccurate"):
        res = capped(None, init, t64(b_val))  # type: ignore[arg-type]
    assert res.status is bl.SolverStatus.MAX_ITER and res.info["cvxpy_status"] == "optimal_inaccurate"

    y = cp.Variable(2)
    infeasible = Cvxpy(cp.Problem(cp.Minimize(cp.sum(y)), [y >= 1, y <= 0]), variables=[y])
    res = infeasible(None, torch.ones(2, dtype=D), ())  # type: ignore[arg-type]
    assert res.status is bl.SolverStatus.FAILED and res.info["cvxpy_status"] == "infeasible"
    torch.testing.assert_close(res.x, torch.ones(2, dtype=D))  # init back, flagged FAILED


def test_cvxpy_rejects_bad_configuration() -> None:
    x, other, b = cp.Variable(3), cp.Variable(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - b)))
    with pytest.raises(ValueError, match="does not appear in the problem"):
        Cvxpy(prob, variables=[other], parameters=[b])
    with pytest.raises(TypeError, match="expected a cvxpy Parameter"):
        Cvxpy(prob, variables=[x], parameters=[x])
    with pytest.raises(ValueError, match="not installed"):
        Cvxpy(prob, variables=[x], parameters=[b], solver="NO_SUCH_SOLVER")
    with pytest.raises(TypeError, match=r"expected a cvxpy\.Problem"):
        Cvxpy("min x", variables=[x])
    solver = Cvxpy(prob, variables=[x], parameters=[b])
    with pytest.raises(bl.StructureError, match="theta has 2 tensors but 1 Parameters"):
        solver(None, torch.zeros(3, dtype=D), (torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)))  # type: ignore[arg-type]
    with pytest.raises(bl.StructureError, match=r"init\[0\] has shape \(4,\)"):
        solver(None, torch.zeros(4, dtype=D), torch.zeros(3, dtype=D))  # type: ignore[arg-type]


def test_missing_optional_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    x = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)))
    monkeypatch.setitem(sys.modules, "cvxpy", None)
    with pytest.raises(ImportError, match=r"pip install bilevel\[cvxpy\]"):
        Cvxpy(prob, variables=[x])
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(ImportError, match=r"pip install bilevel\[sklearn\]"):
        SklearnRidge(np.zeros((3, 2)), np.zeros(3))


# ----------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("intercept", [True, False])
def test_sklearn_ridge_reaches_closed_form(intercept: bool) -> None:
    X, y, _, _ = regression_data()
    inner = SklearnRidge(X, y, fit_intercept=intercept)
    init = (torch.zeros(4, dtype=D), torch.zeros((), dtype=D)) if intercept else torch.zeros(4, dtype=D)
    res = inner(inner.objective, init, torch.tensor(3.0, dtype=D))
    assert res.status is bl.SolverStatus.CONVERGED
    z, _ = ridge_closed_form(X, y, 3.0, intercept)
    got = torch.cat([res.x[0], res.x[1][None]]) if intercept else res.x  # type: ignore[index]
    torch.testing.assert_close(got, t64(z), rtol=0, atol=1e-10)
    # The objective is scikit-learn's: its gradient vanishes at scikit-learn's answer.
    assert res.grad_norm < 1e-9 and res.n_gev == 1


@pytest.mark.parametrize("intercept", [True, False])
def test_sklearn_ridge_hypergradient(intercept: bool) -> None:
    X, y, Xv, yv = regression_data()
    inner = SklearnRidge(X, y, fit_intercept=intercept)
    alpha = torch.tensor(3.0, dtype=D, requires_grad=True)
    init = (torch.zeros(4, dtype=D), torch.zeros((), dtype=D)) if intercept else torch.zeros(4, dtype=D)
    phi = bl.implicit_argmin(inner.objective, init, alpha, solver=inner)
    w, b = phi if intercept else (phi, 0.0)
    ((t64(yv) - t64(Xv) @ w - b) ** 2).sum().backward()
    assert float(alpha.grad) == pytest.approx(ridge_hypergrad(X, y, Xv, yv, 3.0, intercept), rel=1e-8)  # type: ignore[arg-type]


def test_sklearn_scaling_mismatch_is_caught() -> None:
    """An objective with a 1/n (a common mistake) is not what Ridge minimizes."""
    X, y, _, _ = regression_data()
    Xt, yt = t64(X), t64(y)

    def mean_scaled(phi: tuple[torch.Tensor, torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
        w, b = phi
        return ((yt - Xt @ w - b) ** 2).mean() + alpha * (w * w).sum()

    inner = SklearnRidge(X, y)
    init = (torch.zeros(4, dtype=D), torch.zeros((), dtype=D))
    assert inner(mean_scaled, init, torch.tensor(3.0, dtype=D)).grad_norm > 1e-2
    with pytest.raises(bl.OptimalityError, match="optimality residual"):
        bl.implicit_argmin(mean_scaled, init, torch.tensor(3.0, dtype=D, requires_grad=True), solver=inner)


def logistic_data(seed: int = 5, n: int = 40, d: int = 3) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    X, Xv = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    y = (X @ w + 0.3 + 0.8 * rng.standard_normal(n) > 0).astype(int)
    yv = (Xv @ w + 0.3 + 0.8 * rng.standard_normal(n) > 0).astype(int)
    return X, y, Xv, yv


def test_sklearn_logistic_reaches_reference() -> None:
    X, y, _, _ = logistic_data()
    inner = SklearnLogisticRegression(X, y)
    C = torch.tensor(0.7, dtype=D)
    res = inner(inner.objective, (torch.zeros(3, dtype=D), torch.zeros((), dtype=D)), C)
    assert res.status is bl.SolverStatus.CONVERGED
    # Independent float64 reference: dense Newton on the stated objective.
    flat = lambda z, c: inner.objective((z[:3], z[3]), c)  # noqa: E731
    ref = P.reference_newton(flat, torch.zeros(4, dtype=D), C)
    torch.testing.assert_close(torch.cat([res.x[0], res.x[1][None]]), ref, rtol=0, atol=1e-7)  # type: ignore[index]
    assert res.grad_norm < 1e-6


def test_sklearn_logistic_hypergradient_against_finite_differences() -> None:
    X, y, Xv, yv = logistic_data()
    inner = SklearnLogisticRegression(X, y)
    sv = t64(np.where(yv == 1, 1.0, -1.0))

    def val_loss(phi: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w, b = phi
        return torch.nn.functional.softplus(-sv * (t64(Xv) @ w + b)).mean()

    init = (torch.zeros(3, dtype=D), torch.zeros((), dtype=D))
    C = torch.tensor(0.7, dtype=D, requires_grad=True)
    val_loss(bl.implicit_argmin(inner.objective, init, C, solver=inner)).backward()
    # Central differences of scikit-learn re-solves (h^2 truncation ~1e-9, solve noise / h ~1e-7).
    h = 1e-3
    plus = val_loss(inner(inner.objective, init, torch.tensor(0.7 + h, dtype=D)).x)  # type: ignore[arg-type]
    minus = val_loss(inner(inner.objective, init, torch.tensor(0.7 - h, dtype=D)).x)  # type: ignore[arg-type]
    fd = float((plus - minus) / (2 * h))
    assert float(C.grad) == pytest.approx(fd, rel=1e-5, abs=1e-8)  # type: ignore[arg-type]


def test_sklearn_logistic_objective_is_sklearns() -> None:
    """C * sum log-loss + 1/2 ||w||^2 with labels mapped to -1/+1 (larger label +1)."""
    X, y, _, _ = logistic_data()
    obj = sklearn_logistic_objective(X, 2 * y + 5)  # labels {5, 7}: 7 is the positive class
    w, b = torch.tensor([0.1, -0.2, 0.3], dtype=D), torch.tensor(0.05, dtype=D)
    s = np.where(y == 1, 1.0, -1.0)
    z = X @ w.numpy() + 0.05
    expected = 0.7 * np.log1p(np.exp(-s * z)).sum() + 0.5 * float(w @ w)
    assert float(obj((w, b), torch.tensor(0.7, dtype=D))) == pytest.approx(expected, rel=1e-12)


def test_sklearn_reports_max_iter_and_rejects_bad_input() -> None:
    X, y, _, _ = logistic_data()
    capped = SklearnLogisticRegression(X, y, estimator_kwargs={"max_iter": 1})
    res = capped(
        capped.objective, (torch.zeros(3, dtype=D), torch.zeros((), dtype=D)), torch.tensor(10.0, dtype=D)
    )
    assert res.status is bl.SolverStatus.MAX_ITER
    assert "iterations" in res.info["message"]  # scikit-learn's ConvergenceWarning
    assert res.grad_norm > 1e-3
    with pytest.raises(ValueError, match="C is set by the adapter"):
        SklearnLogisticRegression(X, y, estimator_kwargs={"C": 2.0})
    with pytest.raises(ValueError, match="exactly two classes"):
        SklearnLogisticRegression(X, np.arange(len(y)) % 3)
    with pytest.raises(ValueError, match="X has 40 rows but y has 39"):
        SklearnRidge(X, y[:-1])
    with pytest.raises(bl.StructureError, match="one tensor holding C"):
        capped(capped.objective, (torch.zeros(3, dtype=D), torch.zeros((), dtype=D)), torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="must be finite and > 0"):
        capped(
            capped.objective, (torch.zeros(3, dtype=D), torch.zeros((), dtype=D)), torch.tensor(-1.0, dtype=D)
        )


# ----------------------------------------------------------------------------- a separate process

EXTERNAL = textwrap.dedent(
    '''
    """A stand-alone ridge solver: numpy only, no torch, no bilevel."""
    import sys, time
    import numpy as np

    mode, data, request, answer = sys.argv[1:5]
    req = np.load(request)
    d = np.load(data)
    X, y = d["X"], d["y"]
    alpha = float(req["theta_0"])
    assert int(req["n_init"]) == 1 and req["init_0"].shape == (X.shape[1],)
    w = np.linalg.solve(X.T @ X + alpha * np.eye(X.shape[1]), X.T @ y)
    if mode == "fail":
        sys.stderr.write("solver crashed: singular matrix\\n")
        sys.exit(3)
    if mode == "sleep":
        time.sleep(30)
    if mode == "nofile":
        sys.exit(0)
    if mode == "pickle":  # not an .npz archive
        import pickle
        with open(answer, "wb") as f:
            pickle.dump({"x_0": w}, f)
        sys.exit(0)
    if mode == "objects":  # an .npz with an object array, which is never unpickled
        np.savez(answer, x_0=np.array([w, "x"], dtype=object))
        sys.exit(0)
    if mode == "reports-failure":
        np.savez(answer, x_0=w, status="failed", message="license server unreachable")
        sys.exit(0)
    fun = float(((y - X @ w) ** 2).sum() + alpha * w @ w)
    if mode == "badshape":
        w = np.append(w, 0.0)
    status = "not-a-status" if mode == "badstatus" else "converged"
    np.savez(answer, x_0=w, status=status, n_iter=1, fun=fun)
    '''
)


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tuple[np.ndarray, ...]]:
    root = tmp_path_factory.mktemp("external")
    script = root / "ridge_solver.py"
    script.write_text(EXTERNAL)
    X, y, Xv, yv = regression_data(seed=7)
    data = root / "data.npz"
    np.savez(data, X=X, y=y)
    return script, data, (X, y, Xv, yv)


def external_solver(external, mode: str = "ok", **kw) -> Subprocess:  # type: ignore[no-untyped-def]
    script, data, _ = external
    return Subprocess([sys.executable, str(script), mode, str(data)], **kw)


def test_subprocess_returns_the_external_answer(external) -> None:  # type: ignore[no-untyped-def]
    X, y, _, _ = external[2]
    solver = external_solver(external, measure_grad=True, timeout=60)
    res = solver(
        sklearn_ridge_objective(X, y, fit_intercept=False),
        torch.zeros(4, dtype=D),
        torch.tensor(2.0, dtype=D),
    )
    assert res.status is bl.SolverStatus.CONVERGED and res.n_iter == 1
    z, _ = ridge_closed_form(X, y, 2.0, intercept=False)
    torch.testing.assert_close(res.x, t64(z), rtol=0, atol=1e-10)
    assert res.grad_norm < 1e-9 and res.n_gev == 1  # measured here, in torch


def test_subprocess_hypergradient(external) -> None:  # type: ignore[no-untyped-def]
    X, y, Xv, yv = external[2]
    alpha = torch.tensor(2.0, dtype=D, requires_grad=True)
    w = bl.implicit_argmin(
        sklearn_ridge_objective(X, y, fit_intercept=False),
        torch.zeros(4, dtype=D),
        alpha,
        solver=external_solver(external, timeout=60),
    )
    ((t64(yv) - t64(Xv) @ w) ** 2).sum().backward()
    assert float(alpha.grad) == pytest.approx(ridge_hypergrad(X, y, Xv, yv, 2.0, False), rel=1e-8)  # type: ignore[arg-type]


def test_subprocess_failures_are_reported(external) -> None:  # type: ignore[no-untyped-def]
    init, theta = torch.zeros(4, dtype=D), torch.tensor(2.0, dtype=D)
    res = external_solver(external, "fail")(None, init, theta)  # type: ignore[arg-type]
    assert res.status is bl.SolverStatus.FAILED and res.info["returncode"] == 3
    assert "singular matrix" in res.info["message"]
    torch.testing.assert_close(res.x, init)
    res = external_solver(external, "nofile")(None, init, theta)  # type: ignore[arg-type]
    assert res.status is bl.SolverStatus.FAILED and "no answer file" in res.info["message"]
    res = external_solver(external, "sleep", timeout=1.0)(None, init, theta)  # type: ignore[arg-type]
    assert res.status is bl.SolverStatus.FAILED and "timed out" in res.info["message"]
    with pytest.raises(bl.StructureError, match=r"x\[0\] has 5 entries"):
        external_solver(external, "badshape")(None, init, theta)  # type: ignore[arg-type]
    with pytest.raises(bl.StructureError, match="'not-a-status' is not one of"):
        external_solver(external, "badstatus")(None, init, theta)  # type: ignore[arg-type]


def test_subprocess_rejects_bad_configuration() -> None:
    with pytest.raises(TypeError, match="as a sequence"):
        Subprocess("python solve.py")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must name a program"):
        Subprocess([])
    with pytest.raises(ValueError, match=r"Subprocess\(timeout=0\): timeout must be > 0"):
        Subprocess(["x"], timeout=0)


def test_subprocess_failure_causes_reach_the_user(external, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    init, theta = torch.zeros(4, dtype=D), torch.tensor(2.0, dtype=D)
    res = Subprocess([str(tmp_path / "no-such-solver")])(None, init, theta)  # type: ignore[arg-type]
    assert res.status is bl.SolverStatus.FAILED
    assert "could not start" in res.reason and "check command[0]" in res.reason and "x is init" in res.reason
    res = external_solver(external, "fail")(None, init, theta)  # type: ignore[arg-type]
    assert "exited with code 3" in res.reason and "singular matrix" in res.reason
    res = external_solver(external, "nofile")(None, init, theta)  # type: ignore[arg-type]
    assert "wrote no answer file" in res.reason
    res = external_solver(external, "reports-failure")(None, init, theta)  # type: ignore[arg-type]
    assert res.status is bl.SolverStatus.FAILED and "license server unreachable" in res.reason
    with pytest.raises(bl.StructureError, match=r"is not an \.npz archive: the answer must be"):
        external_solver(external, "pickle")(None, init, theta)  # type: ignore[arg-type]
    with pytest.raises(bl.StructureError, match=r"object array \(a pickle\), which is not read"):
        external_solver(external, "objects")(None, init, theta)  # type: ignore[arg-type]


def test_implicit_argmin_quotes_the_subprocess_failure(external, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Needs the layer to raise ConvergenceError(result.reason, info=...) on status FAILED (lead's change).
    X, y, _, _ = external[2]
    obj = sklearn_ridge_objective(X, y, fit_intercept=False)
    alpha = torch.tensor(2.0, dtype=D, requires_grad=True)
    solver = Subprocess([str(tmp_path / "no-such-solver")])
    for tol in (1e-3, 1e6):  # a failed solver returned init: no optimality_tol makes that an answer
        with pytest.raises(bl.ConvergenceError, match="could not start") as err:
            bl.implicit_argmin(obj, torch.zeros(4, dtype=D), alpha, solver=solver, optimality_tol=tol)
        # the diagnostics travel with the error: the solver's result, its status and reason
        result = err.value.info.solver_result
        assert result.status is bl.SolverStatus.FAILED and "could not start" in result.reason


# ----------------------------------------------------------------------------- ScipyLBFGS's rounding floor
WEIGHTS = torch.arange(1, 6, dtype=D)


def offset_quadratic(offset: float) -> bl.Objective:
    """f(x, theta) = offset + sum_j j (x_j - theta_j)^2, minimized at x = theta; f* = offset."""

    def f(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return offset + (WEIGHTS.to(x.dtype) * (x - theta) ** 2).sum()

    return f


@pytest.mark.parametrize(
    ("offset", "start", "dtype", "tol"),
    [
        (1e4, -1.0, D, 1e-12),  # eps * |f| ~ 2e-12: ||grad|| stalls near 1e-8
        (1.0, -1.0, D, 1e-14),  # f ~ 1: ||grad|| stalls near 1e-10
        (1.0, 1e-12, D, 1e-14),  # warm start at the minimizer: no L-BFGS update is ever made
        (10.0, -1.0, torch.float32, 1e-6),  # float32: ||grad|| stalls near 1e-3
    ],
)
def test_scipy_lbfgs_line_search_failure_at_rounding_floor_is_converged(
    offset: float, start: float, dtype: torch.dtype, tol: float
) -> None:
    theta = torch.ones(5, dtype=dtype)  # the minimizer; the solve starts at theta + start
    res = ScipyLBFGS(tol=tol)(offset_quadratic(offset), theta + start, theta)
    assert res.grad_norm > tol  # tol is out of reach: SciPy's line search failed ...
    assert res.converged and res.status is bl.SolverStatus.CONVERGED  # ... at f's rounding floor
    assert "rounding floor" in res.info["rounding_floor"] and f"tol={tol:g}" in res.info["rounding_floor"]
    # The floor test's own bounds hold, and the answer is the minimizer to the accuracy
    # ||grad|| / (2 min_j j) that the gradient allows.
    eps = torch.finfo(dtype).eps
    assert res.grad_norm <= eps ** (1 / 3) * (1 + abs(offset))
    x = res.x
    assert isinstance(x, torch.Tensor) and x.dtype == dtype
    assert float((x - theta).double().norm()) <= res.grad_norm / 2 + 10 * eps * float(theta.norm())


def _sign_flipped(scale: float, offset: float) -> bl.Objective:
    """f = offset + scale ||x||^2 whose gradient is returned with the wrong sign (-2 scale x)."""

    def f(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        v = scale * (x**2).sum()
        return offset + 2 * v.detach() - v

    return f


@pytest.mark.parametrize(
    ("name", "objective", "init"),
    [
        # A kink far from the minimizer's gradient scale: ||grad|| ~ 1 fails the gradient test
        # (the L-BFGS model, fooled by the kink, predicts a decrease of ~1e-16 and passes).
        ("kink", lambda x, t: (x - 0.3).abs().sum() + (x**2).sum(), torch.ones(5, dtype=D)),
        # A wrong gradient on f ~ 1e4: ||grad|| ~ 4e-3 passes the gradient test (<= 6e-2),
        # the model's predicted decrease ~1e-5 fails it.
        ("wrong gradient, large f", _sign_flipped(1e-3, 1e4), torch.ones(5, dtype=D)),
        ("wrong gradient", _sign_flipped(1.0, 0.0), torch.ones(5, dtype=D)),
    ],
)
def test_scipy_lbfgs_true_line_search_failure_still_fails(
    name: str, objective: bl.Objective, init: torch.Tensor
) -> None:
    res = ScipyLBFGS(tol=1e-8)(objective, init, torch.zeros((), dtype=D))
    assert res.status is bl.SolverStatus.LINE_SEARCH_FAILED and not res.converged, name
    assert "rounding_floor" not in res.info
    assert "no decrease found" in res.reason and "a kink" in res.reason and "check the gradient" in res.reason
