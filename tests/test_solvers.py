"""The torch inner solvers and ScipyLBFGS against the shared problems' known minimizers.

References are independent of the solvers: closed forms and float64 dense-Newton
solutions from `problems`, gradient norms re-measured by autograd, hypergradients
from closed forms or the dense implicit-function formula.  Tolerances derive from
the solver's ``tol``: strong convexity gives ||phi - phi*|| <= ||grad|| / mu, and the
hypergradient at such a phi is off by about ``hyper_lipschitz * tol / mu``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import helpers as H
import problems as P
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from bilevel.solvers import (
    Armijo,
    BatchedObjective,
    GradientDescent,
    Nesterov,
    NewtonCG,
    ScipyLBFGS,
    TrustRegionNewtonCG,
)

D = torch.float64
CONVEX = H.CONVEX
problem = H.problem
ALL = [c.name for c in H.SOLVERS]
CASES = [(c.name, n) for c, n in H.matrix()]


# ----------------------------------------------------------------------------- minimizers


def _matrix() -> list[Any]:
    out = []
    for dtype in H.DTYPES:
        for kind, name in CASES:
            why = H.FLOAT32_LIMITS.get((kind, name)) if dtype == torch.float32 else None
            marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
            out.append(pytest.param(kind, name, dtype, marks=marks, id=f"{kind}-{name}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize(("kind", "name", "dtype"), _matrix())
def test_reaches_known_minimizer(kind: str, name: str, dtype: torch.dtype) -> None:
    p = problem(name).cast(dtype)
    case = H.solver(kind)
    solver = case(p, max(case.tol(dtype), H.PROBLEM_FLOOR.get((name, dtype), 0.0)))
    res = solver(p.objective, p.init, p.theta)
    tol = solver.tol
    assert res.status is bl.SolverStatus.CONVERGED, (res.status, res.grad_norm, dict(res.info))
    assert res.converged
    assert res.grad_norm <= tol
    assert all(x.dtype == dtype for x in bl.tree.leaves(res.x))
    # The reported gradient norm is the true one at the returned point (re-measured in dtype:
    # float32 gradients of one point agree to ~1e-6 relative, the norms to 1e-5).
    rel = 1e-6 if dtype == torch.float64 else H.RTOL[dtype]
    assert res.grad_norm == pytest.approx(
        P.grad_norm(p.objective, res.x, p.theta), rel=rel, abs=H.ATOL[dtype]
    )
    # ||phi - phi*|| <= ||grad|| / mu (exact for quadratics; factor 2 for the local bound otherwise),
    # plus the rounding of phi* itself in dtype.
    slack = 1.0 + 1e-6 if name in ("quadratic", "ridge") else 2.0
    assert P.distance(res.x, p.solution) <= slack * tol / p.mu + H.ATOL[dtype]
    assert res.fun == pytest.approx(float(p.objective(res.x, p.theta)), rel=H.RTOL[dtype])
    assert res.n_gev >= 1 and res.n_iter >= 1
    if H.solver(kind).hvp:
        assert res.n_hvp >= res.n_iter
    else:
        assert res.n_hvp == 0


@pytest.mark.parametrize("kind", ALL)
def test_answer_has_init_structure(kind: str) -> None:
    p = problem("ridge")  # phi = (w, intercept): a tuple with a 0-d leaf
    res = H.solver(kind)(p)(p.objective, p.init, p.theta)
    assert isinstance(res.x, tuple) and len(res.x) == 2
    for got, like in zip(res.x, p.init):
        assert got.shape == like.shape and got.dtype == like.dtype
        assert not got.requires_grad


def test_theta_requiring_grad_is_not_differentiated_through() -> None:
    p = problem("quadratic")
    theta = p.theta.clone().requires_grad_(True)
    with torch.enable_grad():
        res = GradientDescent(lr=p.step, max_iter=500, tol=1e-8)(p.objective, p.init, theta)
    assert not res.x.requires_grad and res.converged  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- honest failures


@pytest.mark.parametrize(
    "solver",
    [
        GradientDescent(lr=0.01, max_iter=3, tol=1e-10),
        Nesterov(lr=0.01, max_iter=3, tol=1e-10),
        NewtonCG(tol=1e-14),  # iMAML-HF's defaults: 3 Newton steps of 5 CG iterations
        ScipyLBFGS(tol=1e-12, max_iter=2),
    ],
    ids=["gd", "nesterov", "newton", "lbfgs"],
)
def test_cap_reports_max_iter(solver) -> None:  # type: ignore[no-untyped-def]
    p = problem("ill_logistic")
    res = solver(p.objective, p.init, p.theta)
    assert res.status is bl.SolverStatus.MAX_ITER
    assert not res.converged
    assert res.grad_norm > solver.tol
    assert res.grad_norm == pytest.approx(P.grad_norm(p.objective, res.x, p.theta), rel=1e-6)
    assert "max_iter" in res.status.message


def test_capped_gd_returns_the_last_iterate() -> None:
    p = problem("quadratic")
    res = GradientDescent(lr=p.step, max_iter=3, tol=1e-12)(p.objective, p.init, p.theta)
    x = p.init.clone()  # type: ignore[union-attr]
    for _ in range(3):
        x = x - p.step * torch.func.grad(p.objective)(x, p.theta)
    assert res.n_iter == 3 and res.n_gev == 4  # the start and 3 steps
    torch.testing.assert_close(res.x, x, rtol=0, atol=1e-14)


def test_divergence_reports_nonfinite_and_keeps_a_finite_iterate() -> None:
    p = problem("quadratic")
    res = GradientDescent(lr=10 * p.step, max_iter=5000, tol=1e-9)(p.objective, p.init, p.theta)
    assert res.status is bl.SolverStatus.NONFINITE
    assert bool(torch.isfinite(res.x).all())  # type: ignore[arg-type]
    assert res.n_iter < 5000


def test_nan_objective_reports_nonfinite() -> None:
    def obj(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        # Defined for x <= 1 only (NaN beyond); the minimizer of the first term is at 2.
        return ((x - theta) ** 2).sum() + torch.sqrt(1.0 - x).sum()

    res = GradientDescent(lr=0.4, max_iter=100, tol=1e-10)(
        obj, torch.zeros(3, dtype=D), torch.full((3,), 2.0, dtype=D)
    )
    assert res.status is bl.SolverStatus.NONFINITE
    assert bool(torch.isfinite(res.x).all())  # type: ignore[arg-type]


def test_newton_cg_line_search_failure_is_reported() -> None:
    # |x| is not differentiable at 0: Newton directions from a kink-free model fail to decrease.
    def obj(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return x.abs().sum() + 1e-3 * (x**2).sum()

    res = NewtonCG(newton_iters=50, cg_iters=3, tol=1e-12, line_search=Armijo(max_steps=3))(
        obj, torch.full((2,), 1e-3, dtype=D), torch.zeros((), dtype=D)
    )
    assert res.status is bl.SolverStatus.LINE_SEARCH_FAILED
    assert "line search" in res.status.message


# ----------------------------------------------------------------------------- negative curvature


def double_well(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """sum_i x_i^4/4 - x_i^2/2 + theta x_i: negative curvature for |x_i| < 1/sqrt(3)."""
    return (x**4 / 4 - x**2 / 2 + theta * x).sum()


def test_newton_cg_handles_negative_curvature() -> None:
    theta = torch.tensor(0.1, dtype=D)
    res = NewtonCG(newton_iters=50, cg_iters=5, tol=1e-10)(
        double_well, torch.full((3,), 0.05, dtype=D), theta
    )
    assert res.converged
    assert res.info["n_negative_curvature"] >= 1
    # A local minimizer: x^3 - x + theta = 0 with positive curvature 3x^2 - 1 > 0.
    x = res.x
    assert bool(((3 * x**2 - 1) > 0).all())  # type: ignore[operator]
    torch.testing.assert_close(x**3 - x + theta, torch.zeros(3, dtype=D), rtol=0, atol=1e-9)  # type: ignore[operator]


def test_capped_right_after_negative_curvature_says_so() -> None:
    res = NewtonCG(newton_iters=1, cg_iters=5, tol=1e-10)(
        double_well, torch.full((3,), 0.05, dtype=D), torch.tensor(0.0, dtype=D)
    )
    assert res.status is bl.SolverStatus.NEGATIVE_CURVATURE
    assert res.info["n_negative_curvature"] == 1


def test_trust_region_follows_negative_curvature_to_a_minimizer() -> None:
    """From near the double well's saddle (H = -I there), the boundary steps along negative
    curvature reach a local minimizer."""
    theta = torch.tensor(0.0, dtype=D)
    init = torch.tensor([0.05, -0.03, 0.01], dtype=D)
    res = TrustRegionNewtonCG(newton_iters=50, cg_iters=5, radius=0.1, tol=1e-10)(double_well, init, theta)
    assert res.converged, (res.status, res.grad_norm)
    assert res.info["n_negative_curvature"] >= 1 and res.info["n_boundary"] >= 1
    x = res.x
    assert bool(((3 * x**2 - 1) > 0).all())  # type: ignore[operator]
    torch.testing.assert_close(x.abs(), torch.ones(3, dtype=D), rtol=0, atol=1e-9)  # type: ignore[union-attr]
    # the decrease each accepted step was promised is delivered: f fell below f(init)
    assert res.fun < float(double_well(init, theta)) - 0.7


def test_trust_region_step_rejection_shrinks_the_radius() -> None:
    """A radius far too large for the model: the first steps are rejected and the radius shrinks,
    then the solve converges; the counts are per problem in batched mode."""
    p = problem("rosenbrock")
    res = TrustRegionNewtonCG(newton_iters=500, cg_iters=10, radius=1e3, max_radius=1e3, tol=1e-8)(
        p.objective, p.init, p.theta
    )
    assert res.converged and res.info["n_rejected"] >= 1
    assert res.info["radius"] < 1e3
    q = P.batched_quadratic()
    rb = TrustRegionNewtonCG(newton_iters=100, cg_iters=4, tol=1e-9, batched=True)(
        q.per_problem, torch.zeros_like(q.theta), q.theta
    )
    B = q.theta.shape[0]
    for key in ("n_negative_curvature", "n_boundary", "n_rejected", "radius"):
        assert rb.info[key].shape == (B,)
    assert int(rb.info["n_negative_curvature"].sum()) == 0  # convex: no negative curvature


def test_trust_region_failure_names_the_radius() -> None:
    """A kink at the answer defeats every model: the radius collapses and the status says why."""
    theta = torch.zeros(2, dtype=D)

    def kink(x: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return (x - th).abs().sum() + 1e-3 * (x**2).sum()

    res = TrustRegionNewtonCG(newton_iters=2000, cg_iters=3, tol=1e-12)(
        kink, torch.tensor([0.3, -0.2], dtype=D), theta
    )
    assert res.status is bl.SolverStatus.LINE_SEARCH_FAILED
    assert "trust region shrank" in res.reason


def test_newton_cg_on_convex_problem_meets_no_negative_curvature() -> None:
    p = problem("logistic")
    res = NewtonCG(newton_iters=50, cg_iters=10, tol=1e-10)(p.objective, p.init, p.theta)
    assert res.converged and res.info["n_negative_curvature"] == 0


# ----------------------------------------------------------------------------- counting


class Counted:
    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.fn = fn
        self.calls = 0

    def __call__(self, phi, theta):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.fn(phi, theta)


@pytest.mark.parametrize("kind", ALL)
def test_counts_are_the_objective_calls(kind: str) -> None:
    p = problem("logistic")
    obj = Counted(p.objective)
    res = H.solver(kind)(p, 1e-8)(obj, p.init, p.theta)
    assert res.converged
    # Every value or gradient runs the objective exactly once; an HVP runs none (a backward
    # pass through the gradient graph of its Newton step, whose building is one n_gev).
    assert obj.calls == res.n_fev + res.n_gev
    if kind in ("gd", "nesterov", "nesterov_mu"):
        assert res.n_gev == res.n_iter + 1 and res.n_fev == 0
    if kind == "gd_armijo":
        assert res.n_gev >= res.n_iter + 1 and res.n_fev == 0
    if kind == "newton":
        assert res.n_hvp == sum(res.info["cg_iters_per_step"])
    assert res.gradient_equivalents == res.n_gev + 0.5 * res.n_fev + 2 * res.n_hvp


class LegacyIdentity(torch.autograd.Function):
    """An autograd.Function without ``setup_context``: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def,override]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        return g


def test_newton_cg_solves_objectives_torch_func_cannot_trace() -> None:
    p = problem("logistic")

    def untraceable(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return p.objective(LegacyIdentity.apply(w), theta)

    res = NewtonCG(newton_iters=50, cg_iters=10, tol=1e-10)(untraceable, p.init, p.theta)
    assert res.converged
    assert P.distance(res.x, p.solution) <= 2 * 1e-10 / p.mu


@pytest.mark.parametrize("batched", [False, True])
def test_linearized_hvps_match_the_dense_hessian(batched: bool) -> None:
    """`Oracle.linearize`: products equal the dense Hessian's (torch.autograd.functional), one
    objective call for any number of products, counted as one gradient."""
    from bilevel.solvers._common import Oracle

    p = problem("logistic")
    obj = Counted(p.objective)
    B = 3 if batched else 1
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(B, p.init.numel(), dtype=D, generator=gen)
    if batched:

        def per_problem(W: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            return torch.stack([obj(w, theta) for w in W])

        oracle = Oracle(per_problem, X.clone(), p.theta, batched=True, who="test", need_values=False)
    else:
        oracle = Oracle(obj, X[0].clone(), p.theta, batched=False, who="test", need_values=False)
    hvp = oracle.linearize(X)
    calls = obj.calls
    for _ in range(4):
        V = torch.randn(B, p.init.numel(), dtype=D, generator=gen)
        got = hvp(V)
        for b in range(B):
            Hb = torch.autograd.functional.hessian(lambda w: p.objective(w, p.theta), X[b])
            torch.testing.assert_close(got[b], Hb @ V[b], rtol=1e-12, atol=1e-12)
    assert obj.calls == calls  # the products call the objective no more
    assert (oracle.n_gev, oracle.n_hvp) == (1, 4)


# ----------------------------------------------------------------------------- work comparison


@pytest.mark.parametrize(("name", "tol"), [("ill_logistic", 1e-6), ("ill_quadratic", 1e-8)])
def test_newton_cg_needs_fewer_gradient_equivalents(name: str, tol: float, record_property) -> None:  # type: ignore[no-untyped-def]
    """Work to reach ||grad|| <= tol with kappa >= 100 (measured: see the printed counts).

    GD is capped at 1500 iterations to keep the test fast: on ill_logistic it needs
    about 4500 (lr = 1 / the global smoothness bound); a capped run is a lower bound.
    On the quadratic, whose spectrum is spread evenly, Newton-CG's advantage needs a
    tight tol: at 1e-6, Nesterov with the exact mu needed 154 gradient-equivalents and
    Newton-CG 160 (each Newton step restarts CG and an HVP costs 2 gradients).
    """
    p = problem(name)
    # L / mu of eigenvalues built as 10**2 and 10**0 rounds to 99.99999999999989 in some builds
    assert p.kappa >= 100 * (1 - 1e-12)
    solvers = {
        "gd": GradientDescent(lr=p.step, max_iter=1500, tol=tol),
        "nesterov_mu": Nesterov(lr=p.step, mu=p.mu, max_iter=100_000, tol=tol),
        "nesterov": Nesterov(lr=p.step, max_iter=100_000, tol=tol),
        "newton": NewtonCG(newton_iters=100, cg_iters=20, tol=tol),
    }
    work = {}
    for key, solver in solvers.items():
        res = solver(p.objective, p.init, p.theta)
        assert res.converged or (key == "gd" and res.status is bl.SolverStatus.MAX_ITER), (key, res.status)
        work[key] = (
            res.gradient_equivalents if res.converged else f">={res.gradient_equivalents:.0f} (capped)"
        )
        record_property(f"{name}_{key}_gradient_equivalents", work[key])
    print(f"\n{name} (kappa={p.kappa:.0f}) gradient-equivalents to ||grad|| <= {tol}: {work}")
    newton = work["newton"]
    assert isinstance(newton, float)
    assert all(newton < (w if isinstance(w, float) else 1501.0) for k, w in work.items() if k != "newton")


# ----------------------------------------------------------------------------- batched mode


def batched_solver(kind: str, q: P.BatchedQuadratic) -> object:
    # 4 CG iterations per Newton step: at 10 or more (n = 6) every problem would take 1-2 steps
    return H.solver(kind)(q, 1e-9, batched=True, cg_iters=4)


BATCHED = [c.name for c in H.BATCHED]


@pytest.mark.parametrize("kind", BATCHED)
def test_batched_matches_per_problem_solves(kind: str) -> None:
    q = P.batched_quadratic()
    B = q.theta.shape[0]
    init = torch.zeros_like(q.theta)
    res = batched_solver(kind, q)(q.per_problem, init, q.theta)  # type: ignore[operator]
    assert res.converged and res.status is bl.SolverStatus.CONVERGED
    assert res.problem_converged.tolist() == [True] * B
    assert (res.problem_grad_norm <= 1e-9).all()
    torch.testing.assert_close(res.x, q.solution, rtol=0, atol=1e-9 / float(q.mu.min()))
    # Per-problem stopping: each problem takes exactly the iterations it takes alone.
    single_solver = dataclasses.replace(batched_solver(kind, q), batched=False)  # type: ignore[type-var]
    for b in range(B):
        single = single_solver(q.single(b), init[b], q.theta[b])
        assert int(res.problem_n_iter[b]) == single.n_iter
        torch.testing.assert_close(res.x[b], single.x, rtol=0, atol=1e-12)  # type: ignore[index]
    # Better-conditioned problems stop earlier.
    assert int(res.problem_n_iter[0]) < int(res.problem_n_iter[-1])
    assert res.n_iter == int(res.problem_n_iter.max())
    assert res.grad_norm == pytest.approx(float(res.problem_grad_norm.norm()))


def test_batched_per_problem_cap_and_status() -> None:
    q = P.batched_quadratic()
    res = GradientDescent(lr=1 / q.L, max_iter=200, tol=1e-9, batched=True)(
        q.per_problem, torch.zeros_like(q.theta), q.theta
    )
    statuses = res.problem_status
    assert statuses[0] is bl.SolverStatus.CONVERGED  # kappa 2
    assert statuses[-1] is bl.SolverStatus.MAX_ITER  # kappa 200
    assert res.status is bl.SolverStatus.MAX_ITER  # the worst problem's status
    assert res.problem_converged.tolist() == [s is bl.SolverStatus.CONVERGED for s in statuses]


def test_batched_failure_of_one_problem_leaves_the_others() -> None:
    q = P.batched_quadratic()

    def per_problem(phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        losses = q.per_problem(phi, theta)
        # Problem 1 turns NaN once it leaves the ball of radius 0.5 around 0.
        bad = torch.where(phi[1].norm() > 0.5, torch.nan, 0.0)
        return losses + torch.stack(
            [torch.zeros((), dtype=D), bad, torch.zeros((), dtype=D), torch.zeros((), dtype=D)]
        )

    res = NewtonCG(newton_iters=100, cg_iters=6, tol=1e-9, batched=True)(
        per_problem, torch.zeros_like(q.theta), q.theta
    )
    statuses = res.problem_status
    assert float(q.solution[1].norm()) > 0.5
    assert statuses[1] in (bl.SolverStatus.NONFINITE, bl.SolverStatus.LINE_SEARCH_FAILED)
    for b in (0, 2, 3):
        assert statuses[b] is bl.SolverStatus.CONVERGED
        torch.testing.assert_close(res.x[b], q.solution[b], rtol=0, atol=1e-8)  # type: ignore[index]


def test_batched_objective_wrapper_and_scalar_sum() -> None:
    q = P.batched_quadratic()
    init = torch.zeros_like(q.theta)
    wrapped = BatchedObjective(q.per_problem)
    assert wrapped(init, q.theta).shape == ()
    r1 = NewtonCG(newton_iters=100, cg_iters=6, tol=1e-9, batched=True)(wrapped, init, q.theta)
    assert r1.converged and r1.problem_fun.shape == (4,)
    # Gradient-only methods accept the plain sum; per-problem values are then unknown.
    summed = lambda phi, theta: q.per_problem(phi, theta).sum()  # noqa: E731
    r2 = Nesterov(lr=1 / q.L, max_iter=20_000, tol=1e-9, batched=True)(summed, init, q.theta)
    assert r2.converged
    torch.testing.assert_close(r2.x, q.solution, rtol=0, atol=1e-8)
    assert bool(torch.isnan(r2.problem_fun).all())
    with pytest.raises(bl.StructureError, match=r"per-problem losses of shape \(4,\)"):
        NewtonCG(batched=True)(summed, init, q.theta)


def test_batched_tuple_leaves_need_a_common_batch_dim() -> None:
    with pytest.raises(bl.StructureError, match="leading batch"):
        GradientDescent(lr=0.1, batched=True)(
            lambda phi, th: phi[0].sum(1) + phi[1].sum(1),
            (torch.zeros(3, 2), torch.zeros(4, 2)),
            torch.zeros(()),
        )


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GradientDescent(lr=-1.0), r"GradientDescent\(lr=-1.0\): lr must be > 0"),
        (lambda: GradientDescent(lr=math.nan), r"GradientDescent\(lr=nan\): lr must be > 0"),
        (
            lambda: GradientDescent(lr=0.1, max_iter=-1),
            r"GradientDescent\(max_iter=-1\): max_iter must be >= 0",
        ),
        (lambda: GradientDescent(lr=0.1, tol=-1e-3), r"GradientDescent\(tol=-0.001\): tol must be >= 0"),
        (lambda: Nesterov(lr=0.1, momentum=1.0), r"Nesterov\(momentum=1.0\): momentum must be in \[0, 1\)"),
        (lambda: Nesterov(lr=0.1, momentum=0.5, mu=0.1), r"give momentum or mu, not both"),
        (lambda: Nesterov(lr=1.0, mu=2.0), r"Nesterov\(lr=1.0, mu=2.0\): lr \* mu must be <= 1"),
        (lambda: Nesterov(lr=0.1, mu=0.0), r"Nesterov\(mu=0.0\): mu must be > 0"),
        (lambda: NewtonCG(cg_iters=0), r"NewtonCG\(cg_iters=0\): cg_iters must be >= 1"),
        (lambda: NewtonCG(newton_iters=-2), r"NewtonCG\(newton_iters=-2\): newton_iters must be >= 0"),
        (lambda: TrustRegionNewtonCG(radius=0.0), r"TrustRegionNewtonCG\(radius=0.0\): radius must be > 0"),
        (
            lambda: TrustRegionNewtonCG(eta=0.25),
            r"TrustRegionNewtonCG\(eta=0.25\): eta must be in \[0, 0.25\)",
        ),
        (lambda: TrustRegionNewtonCG(radius=2.0, max_radius=1.0), r"max_radius must be >= radius"),
        (
            lambda: TrustRegionNewtonCG(cg_iters=0),
            r"TrustRegionNewtonCG\(cg_iters=0\): cg_iters must be >= 1",
        ),
        (lambda: ScipyLBFGS(tol=0.0), r"ScipyLBFGS\(tol=0.0\): tol must be > 0"),
        (lambda: ScipyLBFGS(max_iter=0), r"ScipyLBFGS\(max_iter=0\): max_iter must be >= 1"),
        (lambda: Armijo(c1=0.5), r"Armijo\(c1=0.5\): c1 must be in \(0, 0.5\)"),
        (lambda: Armijo(max_steps=0), r"Armijo\(max_steps=0\): max_steps must be >= 1"),
    ],
)
def test_bad_configuration_raises(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types_raise() -> None:
    with pytest.raises(TypeError, match=r"GradientDescent\(max_iter=1.5\): max_iter must be an int"):
        GradientDescent(lr=0.1, max_iter=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected Armijo or None"):
        NewtonCG(line_search="armijo")  # type: ignore[arg-type]
    # a flag taken by truthiness would turn "False" on
    with pytest.raises(TypeError, match=r"Nesterov\(restart='False'\): restart must be True or False"):
        Nesterov(lr=0.1, restart="False")  # type: ignore[arg-type]
    for make in (lambda: GradientDescent(lr=0.1, batched=1), lambda: Nesterov(lr=0.1, batched="yes"),
                 lambda: NewtonCG(batched=None), lambda: TrustRegionNewtonCG(batched=0)):  # fmt: skip
        with pytest.raises(TypeError, match="batched must be True or False"):
            make()


def test_configurations_are_frozen() -> None:
    s = GradientDescent(lr=0.1)
    with pytest.raises(AttributeError):
        s.lr = 0.2  # type: ignore[misc]


def quad(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return ((x - theta) ** 2).sum()


@pytest.mark.parametrize(
    "solver", [GradientDescent(lr=0.1), Nesterov(lr=0.1), NewtonCG(), TrustRegionNewtonCG(), ScipyLBFGS()]
)
def test_bad_inputs_raise(solver) -> None:  # type: ignore[no-untyped-def]
    theta = torch.zeros(3, dtype=D)
    with pytest.raises(bl.StructureError, match=r"objective returned shape \(3,\); it must return a scalar"):
        solver(lambda x, th: x - th, torch.zeros(3, dtype=D), theta)
    with pytest.raises(TypeError, match="must be floating point"):
        solver(quad, torch.zeros(3, dtype=torch.int64), theta)
    with pytest.raises(bl.NonFiniteError, match="init contains NaN"):
        solver(quad, torch.tensor([0.0, math.nan, 0.0], dtype=D), theta)
    with pytest.raises(bl.StructureError, match="mix dtypes"):
        solver(lambda x, th: x[0].sum() + x[1].sum(), (torch.zeros(2, dtype=D), torch.zeros(2)), theta)
    with pytest.raises(TypeError, match="returned a float"):
        solver(lambda x, th: 1.0, torch.zeros(3, dtype=D), theta)
    with pytest.raises(bl.StructureError, match=r"init has no entries \(shapes \[\(0,\)\]\)"):
        solver(quad, torch.zeros(0, dtype=D), theta)
    # phi detached inside the objective: every point is stationary; the start comes back, warned
    with pytest.warns(bl.BilevelWarning, match="the objective does not depend on phi") as record:
        res = solver(lambda x, th: quad(x.detach(), th), torch.ones(3, dtype=D), theta)
    assert res.status is bl.SolverStatus.CONVERGED and torch.equal(res.x, torch.ones(3, dtype=D))
    assert sum("does not depend on phi" in str(w.message) for w in record) == 1


# ----------------------------------------------------------------------------- implicit hypergradients


HYPER_CASES = CASES


@pytest.mark.parametrize(("kind", "name"), HYPER_CASES)
def test_implicit_hypergradient_matches_reference(kind: str, name: str) -> None:
    p = problem(name)
    theta = p.theta.clone().requires_grad_(True)
    solver = H.solver(kind)(p)
    phi, info = bl.implicit_argmin(
        p.objective, p.init, theta, solver=solver, linear_solver=bl.DenseSolve(), return_info=True
    )
    p.outer(phi).backward()
    assert info.solver_result.converged
    # Error budget: the inner answer is within tol/mu of phi*, and h(phi) moves by at most
    # hyper_lipschitz per unit of phi near phi* (factor 2 for second-order terms); the dense
    # backward solve adds rounding only.
    atol = 2.0 * p.hyper_lipschitz * solver.tol / p.mu + 1e-10 * (1.0 + float(p.hypergrad.abs().max()))
    torch.testing.assert_close(theta.grad, p.hypergrad, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", BATCHED)
def test_implicit_hypergradient_of_a_batch(kind: str) -> None:
    q = P.batched_quadratic()
    theta = q.theta.clone().requires_grad_(True)
    obj = BatchedObjective(q.per_problem)
    phi = bl.implicit_argmin(obj, torch.zeros_like(q.theta), theta, solver=batched_solver(kind, q))
    q.outer(phi).backward()
    # Default CG backward (rtol 1e-10) on the block-diagonal Hessian, kappa up to 200.
    atol = 2.0 * 1e-9 / float(q.mu.min()) + 200 * 1e-10
    torch.testing.assert_close(theta.grad, q.hypergrad, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- honesty on random problems


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 8),
    log_kappa=st.floats(0.0, 3.0),
    kind=st.sampled_from(["gd", "nesterov_mu", "nesterov", "newton", "trust_region", "lbfgs"]),
    max_iter=st.integers(1, 60),
)
def test_status_is_truthful_on_random_quadratics(
    seed: int, n: int, log_kappa: float, kind: str, max_iter: int
) -> None:
    """CONVERGED exactly when the independently measured ||grad|| <= tol (or at ScipyLBFGS's
    rounding floor), whatever the cap."""
    p = P.quadratic(n=n, kappa=10**log_kappa, seed=seed)
    tol = 1e-6
    solver = {
        "gd": GradientDescent(lr=p.step, max_iter=max_iter, tol=tol),
        "nesterov_mu": Nesterov(lr=p.step, mu=p.mu, max_iter=max_iter, tol=tol),
        "nesterov": Nesterov(lr=p.step, max_iter=max_iter, tol=tol),
        "newton": NewtonCG(newton_iters=max_iter // 10 + 1, cg_iters=3, tol=tol),
        "trust_region": TrustRegionNewtonCG(newton_iters=max_iter // 10 + 1, cg_iters=3, tol=tol),
        "lbfgs": ScipyLBFGS(max_iter=max_iter, tol=tol),
    }[kind]
    res = solver(p.objective, p.init, p.theta)
    measured = P.grad_norm(p.objective, res.x, p.theta)
    assert res.grad_norm == pytest.approx(measured, rel=1e-6, abs=1e-14)
    # ScipyLBFGS also converges where its line search failed at f's rounding floor, and says so.
    assert res.converged == (measured <= tol or "rounding_floor" in res.info)
    if not res.converged:
        assert res.status in (bl.SolverStatus.MAX_ITER, bl.SolverStatus.LINE_SEARCH_FAILED)
    # Strong convexity turns the measured gradient into a distance bound.
    assert P.distance(res.x, p.solution) <= measured / p.mu * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("batched", [False, True])
def test_differentiable_gd_equals_autograd_through_a_hand_unrolled_loop(batched: bool) -> None:
    """GradientDescent(differentiable=True) is unrolled differentiation: d phi_K / d theta by autograd
    through the K steps, equal to a hand-written loop (float64); a dict tree for phi and theta."""
    q = P.batched_quadratic()
    K, lr = 7, 1 / q.L
    b = slice(None) if batched else 0
    theta = {"t": q.theta[b].clone().requires_grad_(True)}
    per = q.per_problem if batched else q.single(0)

    def objective(phi: dict, th: dict) -> torch.Tensor:
        return per(phi["t"], th["t"])

    init = {"t": theta["t"] * 0.5}  # attached: gradients also flow through the start
    res = GradientDescent(lr=lr, max_iter=K, tol=0.0, batched=batched, differentiable=True)(
        objective, init, theta
    )
    (g,) = torch.autograd.grad(
        q.outer(res.x["t"]) if batched else 0.5 * ((res.x["t"] - q.target[0]) ** 2).sum(), theta["t"]
    )
    th = q.theta[b].clone().requires_grad_(True)
    x = th * 0.5
    for _ in range(K):
        (gx,) = torch.autograd.grad(per(x, th).sum(), x, create_graph=True)
        x = x - lr * gx
    ref_loss = q.outer(x) if batched else 0.5 * ((x - q.target[0]) ** 2).sum()
    (ref,) = torch.autograd.grad(ref_loss, th)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)
    assert res.n_gev == K and res.status is bl.SolverStatus.BUDGET  # a fixed budget: no gradient at the end


def test_differentiable_gd_refuses_a_line_search() -> None:
    with pytest.raises(ValueError, match="cannot be unrolled"):
        GradientDescent(lr=0.1, line_search=bl.solvers.Armijo(), differentiable=True)


# ----------------------------------------------------------------------------- what a failure says


def _quartic(x: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    return ((x - th) ** 4).sum() + ((x - th) ** 2).sum()


def test_reasons_name_each_solvers_own_settings() -> None:
    init, theta = torch.zeros(5, dtype=D), torch.ones(5, dtype=D)
    res = NewtonCG(newton_iters=1)(_quartic, init, theta)
    assert res.status is bl.SolverStatus.MAX_ITER
    # NewtonCG's cap is newton_iters: the generic status message's "max_iter" would mislead
    assert "newton_iters=1" in res.reason and "max_iter" not in res.reason
    res = GradientDescent(lr=0.01, max_iter=2)(_quartic, init, theta)
    assert "max_iter=2" in res.reason and "lr=0.01" in res.reason
    res = Nesterov(lr=0.01, max_iter=2)(_quartic, init, theta)
    assert "Nesterov stopped at max_iter=2" in res.reason
    res = GradientDescent(lr=10.0, max_iter=100)(_quartic, init, theta)
    assert res.status is bl.SolverStatus.NONFINITE and "lower lr=10" in res.reason
    batch = GradientDescent(lr=0.01, max_iter=2, batched=True)(
        lambda x, t: ((x - t) ** 2).sum(dim=1), torch.zeros(3, 5, dtype=D), theta
    )
    assert "in 3 of 3 problems" in batch.reason
    done = GradientDescent(lr=0.1, max_iter=500, tol=1e-8)(lambda x, t: ((x - t) ** 2).sum(), init, theta)
    assert done.converged and done.message == "" and done.reason == done.status.message


def test_newton_cg_line_search_failure_names_armijo() -> None:
    def obj(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return x.abs().sum() + 1e-3 * (x**2).sum()

    res = NewtonCG(newton_iters=50, cg_iters=3, tol=1e-12, line_search=Armijo(max_steps=3))(
        obj, torch.full((2,), 1e-3, dtype=D), torch.zeros((), dtype=D)
    )
    assert res.status is bl.SolverStatus.LINE_SEARCH_FAILED
    assert "Armijo(max_steps=3" in res.reason and "smaller initial step" not in res.reason


def test_scipy_line_search_failure_blames_tol_not_step_options() -> None:
    # f = 1e4 + ...: its rounding (eps * 1e4 ~ 2e-12) hides the decrease near the minimizer,
    # which is reported as converged at f's rounding floor (tests/test_solvers_external.py);
    # with a kink at the minimizer the line search fails short of that floor.
    def obj(x: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 1e4 + ((x - th) ** 2 * torch.arange(1, 6, dtype=D)).sum() + (x - th).abs().sum()

    res = ScipyLBFGS(tol=1e-12)(obj, torch.zeros(5, dtype=D), torch.ones(5, dtype=D))
    assert res.status is bl.SolverStatus.LINE_SEARCH_FAILED
    assert "tol=1e-12" in res.reason and "loosen tol" in res.reason and "2.2e-12 in float64" in res.reason
    assert "backtracking" not in res.reason and res.info["reason"] == res.reason
    res = ScipyLBFGS(tol=1e-12, max_iter=1)(obj, torch.zeros(5, dtype=D), torch.ones(5, dtype=D))
    assert res.status is bl.SolverStatus.MAX_ITER and "max_iter=1" in res.reason


@pytest.mark.parametrize(
    "cls",
    [GradientDescent, Nesterov, NewtonCG, TrustRegionNewtonCG, ScipyLBFGS, bl.solvers.Subprocess],
    ids=lambda c: c.__name__,
)
def test_a_solver_class_called_as_a_solver_is_refused(cls: type) -> None:
    init, theta = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    with pytest.raises(TypeError, match=f"{cls.__name__} is a solver class: create the solver"):
        cls(_quartic, init, theta)
    with pytest.raises(TypeError, match="pass an instance"):
        bl.layers.ArgminLayer(_quartic, cls)
    with pytest.raises(TypeError, match="pass an instance"):
        bl.hyperopt.HyperProblem(_quartic, lambda w, t: w.sum(), cls)
    with pytest.raises(TypeError, match="where the setting"):
        GradientDescent(lr=torch.tensor(0.1))  # type: ignore[arg-type]


def test_solver_result_checks_its_fields() -> None:
    with pytest.raises(TypeError, match="expected a SolverStatus"):
        bl.SolverResult(torch.zeros(1), "converged")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a str"):
        bl.SolverResult(torch.zeros(1), bl.SolverStatus.FAILED, message=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("batched", [False, True])
def test_fixed_budget_keeps_the_last_finite_iterate(batched: bool) -> None:
    """With tol = 0 no gradient norm is taken per step: a divergence is caught from the values (or,
    after the last step, from the iterate) and the problem keeps its last finite iterate."""
    q = P.batched_quadratic()
    b = slice(None) if batched else 0
    per = q.per_problem if batched else q.single(0)
    res = GradientDescent(lr=100 / q.L, max_iter=2000, tol=0.0, batched=batched)(
        per, torch.zeros_like(q.theta[b]), q.theta[b]
    )
    statuses = res.problem_status if batched else (res.status,)
    assert all(s is bl.SolverStatus.NONFINITE for s in statuses)
    assert bool(torch.isfinite(res.x).all())  # type: ignore[arg-type]
    ok = GradientDescent(lr=1 / q.L, max_iter=50, tol=0.0, batched=batched)(
        per, torch.zeros_like(q.theta[b]), q.theta[b]
    )
    assert ok.status is bl.SolverStatus.BUDGET and ok.n_iter == 50 and ok.n_gev == 50


def test_step_halving_takes_one_evaluation_per_step_and_never_increases_the_objective() -> None:
    """StepHalving: one trial per iteration (n_gev = max_iter + 1), a failed trial halves that
    problem's step and leaves it in place; where fixed steps diverge it decreases every problem."""
    q = P.batched_quadratic()
    x0 = torch.zeros_like(q.theta)
    lr = 30 / q.L  # far beyond 2/L: fixed steps diverge
    fixed = GradientDescent(lr=lr, max_iter=40, tol=0.0, batched=True)(q.per_problem, x0, q.theta)
    assert fixed.status is bl.SolverStatus.NONFINITE or not bool(
        (q.per_problem(fixed.x, q.theta) < q.per_problem(x0, q.theta)).all()
    )
    start = q.per_problem(x0, q.theta)
    prev = start
    for k in (5, 10, 20, 40):
        res = GradientDescent(lr=lr, max_iter=k, tol=0.0, line_search=bl.solvers.StepHalving(), batched=True)(
            q.per_problem, x0, q.theta
        )
        assert res.n_gev == k + 1  # one evaluation of the batch per step
        now = q.per_problem(res.x, q.theta)
        assert bool((now <= prev + 1e-12).all())
        prev = now
    assert bool((prev < start).all())
    with pytest.raises(ValueError, match=r"StepHalving\(shrink=1.5\)"):
        bl.solvers.StepHalving(shrink=1.5)


@pytest.fixture
def no_host_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the loops as on an accelerator: nothing read on the host until they return."""
    import bilevel._sync

    monkeypatch.setattr(bilevel._sync, "host_checks", lambda x: False)


@pytest.mark.parametrize("tol", [0.0, 1e-9])
def test_loops_without_host_reads_equal_the_cpu_loops(tol: float, request: pytest.FixtureRequest) -> None:
    """The masked, read-free loops (accelerators, torch.compile) give the CPU loops' answers and
    per-problem statuses, a diverging problem included (it keeps its last finite iterate)."""
    q = P.batched_quadratic()

    def per_problem(phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        losses = q.per_problem(phi, theta)
        bad = torch.where(phi[1].norm() > 0.5, torch.nan, 0.0)  # problem 1 fails away from 0
        return losses + torch.stack([torch.zeros((), dtype=D), bad, *[torch.zeros((), dtype=D)] * 2])

    def run() -> tuple[bl.SolverResult, bl.LinearSolveResult]:
        res = GradientDescent(lr=1 / q.L, max_iter=300, tol=tol, batched=True)(
            per_problem, torch.zeros_like(q.theta), q.theta
        )
        A = torch.stack([torch.diag(torch.arange(1.0, 6.0, dtype=D) * (b + 1)) for b in range(4)])
        A[2, 0, 0] = -1.0  # indefinite: CG meets negative curvature in problem 2
        lin = bl.CG(max_iter=8, rtol=0.0, atol=0.0)(
            lambda V: torch.einsum("bij,bj->bi", A, V), torch.ones(4, 5, dtype=D)
        )
        return res, lin

    ref_res, ref_lin = run()
    request.getfixturevalue("no_host_checks")
    res, lin = run()
    assert res.problem_status == ref_res.problem_status
    assert res.problem_status[1] is bl.SolverStatus.NONFINITE
    assert res.problem_n_iter.tolist() == ref_res.problem_n_iter.tolist()
    torch.testing.assert_close(res.x, ref_res.x, rtol=0, atol=0)  # type: ignore[arg-type]
    assert bool(torch.isfinite(res.x).all())  # type: ignore[arg-type]
    assert lin.problem_status == ref_lin.problem_status
    assert lin.problem_status[2] is bl.LinearStatus.NEGATIVE_CURVATURE
    torch.testing.assert_close(lin.x, ref_lin.x, rtol=0, atol=0)
