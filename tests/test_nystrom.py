"""Nyström inverse-HVPs and the Nyström preconditioner against dense references.

References: ``torch.linalg.solve`` on the dense matrix; the Woodbury formula of the
Nyström approximation Y (Omega'Y)^-1 Y' built densely from the same probes (Hataya & Yamada's
form, (C W^-1 C' + rho I)^-1 = I/rho - C (rho W + C'C)^-1 C' / rho); ridge's closed-form
hypergradient through `bilevel.implicit_argmin`; B single solves for batched mode.
"""

from __future__ import annotations

import warnings

import problems as P
import pytest
import torch

import bilevel as bl
from bilevel.solvers import NewtonCG

D = torch.float64


def spd(n: int, cond: float, seed: int, dtype: torch.dtype = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    return (Q @ torch.diag(eig) @ Q.T).to(dtype)


def rhs(n: int, seed: int = 1, dtype: torch.dtype = D) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D).to(dtype)


def probes(n: int, k: int, seed: int) -> torch.Tensor:
    """The documented probes: QR of a seeded float64 Gaussian (n, k), computed here on its own."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn((n, k), generator=g, dtype=D)).Q


def woodbury(A: torch.Tensor, omega: torch.Tensor, rho: float, b: torch.Tensor) -> torch.Tensor:
    """(A_k + rho I)^-1 b with A_k = C W^-1 C', C = A Omega, W = Omega'A Omega, by Woodbury."""
    C = A @ omega
    W = omega.T @ C
    return b / rho - C @ torch.linalg.solve(rho * W + C.T @ C, C.T @ b) / rho


@pytest.mark.parametrize("n", [1, 7, 40])
def test_full_rank_equals_dense_solve(n: int) -> None:
    A = spd(n, 1e3, seed=n)
    b = rhs(n)
    res = bl.Nystrom(rank=n)(lambda v: A @ v, b)
    ref = torch.linalg.solve(A, b)
    torch.testing.assert_close(res.x, ref, rtol=1e-10, atol=0)
    assert res.status is bl.LinearStatus.BUDGET  # no tolerance was given: report only
    assert res.n_matvec == n + 1 and res.n_iter == 1


@pytest.mark.parametrize(("n", "k", "rho"), [(30, 5, 0.5), (30, 12, 1e-2), (50, 3, 10.0)])
def test_low_rank_equals_dense_woodbury_of_the_same_probes(n: int, k: int, rho: float) -> None:
    A = spd(n, 1e4, seed=k)
    b = rhs(n, seed=k)
    res = bl.Nystrom(rank=k, rho=rho, seed=7)(lambda v: A @ v, b)
    ref = woodbury(A, probes(n, k, 7), rho, b)
    torch.testing.assert_close(res.x, ref, rtol=1e-10, atol=1e-12)
    # the approximation itself: A_k = A Omega (Omega'A Omega)^-1 Omega'A, its eigenvalues
    approx = bl.nystrom_approximation(lambda v: A @ v, b, k, 7)
    C = A @ probes(n, k, 7)
    dense = C @ torch.linalg.solve(probes(n, k, 7).T @ C, C.T)
    Uk, lam = approx.U[0], approx.eigenvalues[0]
    torch.testing.assert_close(Uk @ torch.diag(lam) @ Uk.T, dense, rtol=0, atol=1e-10 * float(dense.norm()))
    # a different seed is a different sketch (k < n): the seed is what is used
    other = bl.Nystrom(rank=k, rho=rho, seed=8)(lambda v: A @ v, b)
    assert float((other.x - res.x).norm()) > 1e-6 * float(res.x.norm())


def test_residual_is_the_true_one_and_the_tolerance_sets_the_status() -> None:
    n = 25
    A = spd(n, 100.0, seed=3)
    b = rhs(n)
    calls = 0

    def mv(v: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return A @ v

    res = bl.Nystrom(rank=6, rho=1.0)(mv, b)
    assert calls == res.n_matvec == 7  # rank probes and the residual
    true = float(torch.linalg.vector_norm(A @ res.x - b))
    assert true > 1e-3 * float(b.norm())  # an approximate solve, as asked
    assert res.residual_norm == pytest.approx(true, rel=1e-12)
    assert res.status is bl.LinearStatus.BUDGET
    missed = bl.Nystrom(rank=6, rho=1.0, rtol=1e-6)(mv, b)
    assert missed.status is bl.LinearStatus.MAX_ITER and not missed.converged
    loose = bl.Nystrom(rank=6, rho=1.0, atol=2 * true)(mv, b)
    assert loose.converged
    exact = bl.Nystrom(rank=n, rtol=1e-10)(mv, b)
    assert exact.converged and exact.relative_residual <= 1e-10


@pytest.mark.parametrize(("k", "rho"), [(9, 0.0), (4, 0.3)])
def test_batched_equals_one_solve_per_problem(k: int, rho: float) -> None:
    n, B = 9, 4
    As = torch.stack([spd(n, 50.0, seed=s) for s in range(B)])
    b = torch.stack([rhs(n, seed=s) for s in range(B)])
    res = bl.Nystrom(rank=k, rho=rho)(lambda V: torch.einsum("bij,bj->bi", As, V), b)
    assert res.problem_status == (bl.LinearStatus.BUDGET,) * B
    assert res.n_matvec == k + 1  # one batched matvec per probe, for every problem at once
    for i in range(B):
        one = bl.Nystrom(rank=k, rho=rho)(lambda v, i=i: As[i] @ v, b[i])
        torch.testing.assert_close(res.x[i], one.x, rtol=1e-12, atol=1e-13)
        assert res.problem_residual_norm is not None
        assert float(res.problem_residual_norm[i]) == pytest.approx(one.residual_norm, rel=1e-9, abs=1e-13)


def test_float32_full_rank() -> None:
    A = spd(20, 10.0, seed=0, dtype=torch.float32)
    b = rhs(20, dtype=torch.float32)
    res = bl.Nystrom(rank=20, rtol=1e-4)(lambda v: A @ v, b)
    assert res.converged and res.x.dtype == torch.float32
    torch.testing.assert_close(
        res.x.double(), torch.linalg.solve(A.double(), b.double()), rtol=1e-4, atol=1e-5
    )


def test_half_precision_factorizes_in_float32() -> None:
    A = spd(16, 4.0, seed=0, dtype=torch.bfloat16)
    b = rhs(16, dtype=torch.bfloat16)
    res = bl.Nystrom(rank=16, rtol=0.05)(lambda v: A @ v, b)
    assert res.x.dtype == torch.bfloat16 and res.converged
    ref = torch.linalg.solve(A.double(), b.double())
    assert float((res.x.double() - ref).norm() / ref.norm()) < 0.05  # bfloat16 keeps 8 bits
    pcg = bl.CG(M=bl.NystromPreconditioner(rank=4))(lambda v: A @ v, b)
    assert pcg.x.dtype == torch.bfloat16 and pcg.converged


# ---------------------------------------------------------------- guards


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(rank=0), ValueError, r"rank=0\): rank must be >= 1"),
        (dict(rank=True), TypeError, "rank must be an int"),
        (dict(rank=2.0), TypeError, "rank must be an int"),
        (dict(rank=3, rho=-1.0), ValueError, r"rho=-1.0\): rho must be >= 0"),
        (dict(rank=3, rho=float("nan")), ValueError, "rho must be >= 0"),
        (dict(rank=3, rho=float("inf")), ValueError, "rho must be >= 0"),
        (dict(rank=3, rho=True), TypeError, "rho must be a number"),
        (dict(rank=3, rtol=-1.0), ValueError, r"Nystrom\(rtol=-1.0\): rtol must be >= 0"),
        (dict(rank=3, rtol="a"), TypeError, r"Nystrom\(rtol='a'\): rtol must be a number"),
        (dict(rank=3, atol=float("nan")), ValueError, r"Nystrom\(atol=nan\): atol must be >= 0"),
        (dict(rank=3, seed="a"), TypeError, r"Nystrom\(seed='a'\): seed must be an int"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict, err: type[Exception], match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(err, match=match):
        bl.Nystrom(**kwargs)


def test_a_recipe_refuses_a_seed_that_is_not_an_int() -> None:
    with pytest.raises(TypeError, match=r"NystromPreconditioner\(seed=1.5\): seed must be an int"):
        bl.NystromPreconditioner(rank=2, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"HutchinsonDiagonal\(seed=-1\): seed must be >= 0"):
        bl.HutchinsonDiagonal(seed=-1)


def test_rank_above_n_and_singular_rank_k_are_refused_at_the_call() -> None:
    A = spd(5, 10.0, seed=0)
    with pytest.raises(ValueError, match=r"n=5 unknowns; pass rank <= 5"):
        bl.Nystrom(rank=6, rho=1.0)(lambda v: A @ v, rhs(5))
    with pytest.raises(ValueError, match=r"rank-3 approximation of an n=5 matrix is singular; pass rho > 0"):
        bl.Nystrom(rank=3)(lambda v: A @ v, rhs(5))
    with pytest.raises(ValueError, match="b must be a 1-D tensor"):
        bl.Nystrom(rank=1, rho=1.0)(lambda v: v, torch.ones(2, 2, 2, dtype=D))
    with pytest.raises(ValueError, match="matvec returned shape"):
        bl.Nystrom(rank=2, rho=1.0)(lambda v: v[:2], rhs(5))
    with pytest.raises(ValueError, match=r"NystromPreconditioner\(rank=6\).*pass rank <= 5"):
        bl.CG(M=bl.NystromPreconditioner(rank=6))(lambda v: A @ v, rhs(5))
    with pytest.raises(ValueError, match=r"NystromPreconditioner\(rank=0\): rank must be >= 1"):
        bl.NystromPreconditioner(rank=0)
    with pytest.raises(TypeError, match=r"NystromPreconditioner\(rank=2.0\): rank must be an int"):
        bl.NystromPreconditioner(rank=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank=6\): rank must be an integer in \[1, n=5\]"):
        bl.nystrom_approximation(lambda v: A @ v, rhs(5), 6)
    with pytest.raises(ValueError, match=r"like must be \(n,\) or \(B, n\)"):
        bl.nystrom_approximation(lambda v: v, torch.ones(2, 2, 2, dtype=D), 1)


def test_singular_matrix_with_rho_zero_warns_and_uses_the_pseudo_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    V = torch.randn(8, 5, generator=g, dtype=D)
    A = V @ V.T  # rank 5 of 8
    b = A @ rhs(8)  # in the range: the pseudo-inverse solves it
    with pytest.warns(bl.BilevelWarning, match=r"numerically singular \(problems \[0\].*pass rho > 0"):
        res = bl.Nystrom(rank=8)(lambda v: A @ v, b)
    torch.testing.assert_close(res.x, torch.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)
    assert res.residual_norm == pytest.approx(float((A @ res.x - b).norm()), rel=1e-9, abs=1e-12)


def test_nonfinite_and_indefinite_are_reported_per_problem() -> None:
    n = 6
    A = spd(n, 10.0, seed=0)
    nan = bl.Nystrom(rank=n)(lambda v: A @ v * float("nan"), rhs(n))
    assert nan.status is bl.LinearStatus.NONFINITE and nan.residual_norm == float("inf")
    bad_b = bl.Nystrom(rank=n)(lambda v: A @ v, torch.full((n,), float("nan"), dtype=D))
    assert bad_b.status is bl.LinearStatus.NONFINITE
    indefinite = -A
    neg = bl.Nystrom(rank=n)(lambda v: indefinite @ v, rhs(n))
    assert neg.status is bl.LinearStatus.NEGATIVE_CURVATURE
    assert torch.equal(neg.x, torch.zeros(n, dtype=D))
    # batched: only problem 1 is poisoned; the others are solved exactly
    As = torch.stack([A, A, A])
    scale = torch.tensor([1.0, float("nan"), 1.0], dtype=D)[:, None]
    b = torch.stack([rhs(n, seed=s) for s in range(3)])
    res = bl.Nystrom(rank=n)(lambda V: torch.einsum("bij,bj->bi", As, V) * scale, b)
    assert res.problem_status == (bl.LinearStatus.BUDGET, bl.LinearStatus.NONFINITE, bl.LinearStatus.BUDGET)
    torch.testing.assert_close(res.x[0], torch.linalg.solve(A, b[0]), rtol=1e-10, atol=0)
    torch.testing.assert_close(res.x[2], torch.linalg.solve(A, b[2]), rtol=1e-10, atol=0)


# ---------------------------------------------------------------- the Nyström preconditioner


def outliers(n: int, k: int, seed: int) -> torch.Tensor:
    """SPD with k large outlying eigenvalues over a well-conditioned bulk in [1, 2]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    eig = torch.cat([torch.logspace(3, 6, k, dtype=D), torch.linspace(1, 2, n - k, dtype=D)])
    return Q @ torch.diag(eig) @ Q.T


def test_nystrom_preconditioner_removes_the_outliers() -> None:
    n, k = 120, 10
    A = outliers(n, k, seed=0)
    b = rhs(n)
    plain = bl.CG(max_iter=500)(lambda v: A @ v, b)
    pre = bl.CG(max_iter=500, M=bl.NystromPreconditioner(rank=k + 2))(lambda v: A @ v, b)
    assert plain.converged and pre.converged
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, b), rtol=1e-8, atol=0)
    torch.testing.assert_close(pre.x, plain.x, rtol=1e-8, atol=0)
    # the bulk has condition 2: measured 15 iterations, against plain CG's 86
    assert pre.n_iter <= 20 and plain.n_iter >= 60
    assert pre.n_matvec == pre.n_iter + (k + 2) + 1  # sketch, iterations, residual check


def test_nystrom_preconditioner_falls_back_to_none_with_a_warning() -> None:
    A = spd(6, 10.0, seed=0)
    with pytest.warns(bl.BilevelWarning, match=r"problems \[0\] is not positive definite"):
        res = bl.CG(M=bl.NystromPreconditioner(rank=3))(lambda v: -A @ v, rhs(6))
    assert res.status is bl.LinearStatus.NEGATIVE_CURVATURE


# ---------------------------------------------------------------- through the implicit layer


RIDGE_SOLVERS = {
    "nystrom_full": bl.Nystrom(rank=6),
    "nystrom_full_checked": bl.Nystrom(rank=6, rtol=1e-10),
    "pcg_hutchinson": bl.CG(M=bl.HutchinsonDiagonal(probes=8)),
    "pcg_nystrom": bl.CG(M=bl.NystromPreconditioner(rank=2)),
}


@pytest.mark.parametrize("name", list(RIDGE_SOLVERS))
def test_ridge_hypergradient_through_implicit_argmin(name: str) -> None:
    p = P.ridge()  # 5 weights and an intercept: n = 6
    theta = p.theta.clone().requires_grad_(True)

    def closed_form(objective, init, th):  # type: ignore[no-untyped-def]
        return p.solution

    phi, info = bl.implicit_argmin(
        p.objective, p.init, theta, closed_form, linear_solver=RIDGE_SOLVERS[name], return_info=True
    )
    (grad,) = torch.autograd.grad(p.outer(phi), theta)
    torch.testing.assert_close(grad, p.hypergrad, rtol=1e-9, atol=0)
    last = info.last_backward
    assert last is not None and not last.failed_problems()


def test_low_rank_nystrom_in_implicit_argmin_is_approximate_and_says_so() -> None:
    """rank < n with rho: the gradient of a regularized system; a tolerance makes the layer refuse it."""
    p = P.ridge()
    theta = p.theta.clone().requires_grad_(True)

    def closed_form(objective, init, th):  # type: ignore[no-untyped-def]
        return p.solution

    phi = bl.implicit_argmin(
        p.objective, p.init, theta, closed_form, linear_solver=bl.Nystrom(rank=3, rho=1.0, rtol=1e-8)
    )
    with pytest.raises(bl.LinearSolveError, match="backward solve stopped with status MAX_ITER"):
        torch.autograd.grad(p.outer(phi), theta)


def test_batched_implicit_argmin_with_preconditioner_recipes() -> None:
    q = P.batched_quadratic()
    for linear in (
        bl.CG(M=bl.HutchinsonDiagonal(probes=4)),
        bl.CG(M=bl.NystromPreconditioner(rank=2)),
        bl.Nystrom(rank=q.theta.shape[1]),
    ):
        theta = q.theta.clone().requires_grad_(True)
        phi = bl.implicit_argmin(
            q.per_problem,
            torch.zeros_like(q.theta),
            theta,
            NewtonCG(newton_iters=50, tol=1e-12, batched=True),
            linear_solver=linear,
            batched=True,
        )
        (grad,) = torch.autograd.grad(q.outer(phi), theta)
        torch.testing.assert_close(grad, q.hypergrad, rtol=1e-7, atol=1e-9)


def test_per_feature_ridge_hypergradient_through_hyperopt() -> None:
    """One L2 weight per feature, spread over four decades: Jacobi's case, and Nyström at rank n."""
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(40, 8, generator=g, dtype=D), torch.randn(25, 8, generator=g, dtype=D)
    w_true = torch.randn(8, generator=g, dtype=D)
    y, yv = X @ w_true, Xv @ w_true + 0.3 * torch.randn(25, generator=g, dtype=D)
    theta0 = torch.linspace(-2.0, 7.0, 8, dtype=D)

    def inner(w: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (th.exp() * w**2).sum()

    def outer(w: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    def exact(objective: object, init: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(X.T @ X + torch.diag(th.exp()), X.T @ y)

    H = X.T @ X + torch.diag(theta0.exp())
    w = torch.linalg.solve(H, X.T @ y)
    u = torch.linalg.solve(H, Xv.T @ (Xv @ w - yv) / 25)
    reference = -u * theta0.exp() * w  # d/dtheta_j of grad_w G is exp(theta_j) w_j e_j
    for linear in (
        bl.Nystrom(rank=8, rtol=1e-10),
        bl.CG(rtol=1e-12, M=bl.HutchinsonDiagonal(probes=8)),
    ):
        theta = theta0.clone().requires_grad_(True)
        ev = bl.hyperopt.HyperProblem(inner, outer, exact, linear_solver=linear).evaluate(
            theta, torch.zeros(8, dtype=D)
        )
        ev.loss.backward()
        assert theta.grad is not None
        torch.testing.assert_close(theta.grad, reference, rtol=1e-8, atol=1e-12)
        assert ev.info.last_backward is not None and ev.info.last_backward.converged


def test_a_budget_answer_worse_than_zero_warns_in_the_backward_pass() -> None:
    """A rank-1 sketch with a small rho answers H w = v worse than w = 0 (relative residual 17.8
    here): the implicit layer's backward warns, naming the problem in batched mode; a fitting
    rho, or ``warn=False``, stays quiet.  The gradient is compared with the dense one."""
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
    theta0 = torch.tensor([1.0, 2.0], dtype=D)

    def grad_with(solver: bl.Nystrom, **kw: object) -> torch.Tensor:
        t = theta0.clone().requires_grad_(True)
        x = bl.implicit_argmin(
            lambda p, th: 0.5 * p @ A @ p - th @ p,
            torch.zeros(2, dtype=D),
            t,
            lambda f, x0, th: torch.linalg.solve(A, th.detach()),
            linear_solver=solver,
            **kw,  # type: ignore[arg-type]
        )
        x.sum().backward()
        assert t.grad is not None
        return t.grad

    with pytest.warns(bl.BilevelWarning, match=r"relative residual of 17\.8, above 1: its answer solves"):
        grad_with(bl.Nystrom(rank=1, rho=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad_with(bl.Nystrom(rank=1, rho=0.1), throw=False, warn=False)
        exact = grad_with(bl.Nystrom(rank=2))
    torch.testing.assert_close(exact, torch.linalg.solve(A, torch.ones(2, dtype=D)))
    # batched: problem 1 (H = 0.1 I, which rank 1 with rho = 0.1 solves exactly) is not named
    As = torch.stack([A, 0.1 * torch.eye(2, dtype=D)])
    th = torch.stack([theta0, theta0]).requires_grad_(True)
    x = bl.implicit_argmin(
        lambda P, T: 0.5 * torch.einsum("bi,bij,bj->b", P, As, P) - (T * P).sum(1),
        torch.zeros(2, 2, dtype=D),
        th,
        lambda f, x0, T: torch.linalg.solve(As, T.detach()),
        linear_solver=bl.Nystrom(rank=1, rho=0.1),
        batched=True,
    )
    with pytest.warns(bl.BilevelWarning, match=r"above 1 in problem\(s\) \[0\] of the batch:"):
        x.sum().backward()
