"""`ProjectedGradient` and `ProximalGradient` against cvxpy, alone and batched (batched = loop over
problems), FISTA against ISTA, trees, the implicit gradient of their answers through their own
``condition`` against float64 finite differences of a re-solve (gradcheck), and every guard.

The problems (`PROBLEMS`) are f(x, theta) = 1/2 x'Qx + c'x with c = theta[0], plus a constraint or
a penalty whose parameters are theta[1:], random and sized so that at the answer some constraints
are active and some not (some lasso coefficients zero, some not): the test asserts that it is so.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from bilevel import projections as P
from bilevel import prox as X
from bilevel.solvers import ProjectedGradient, ProximalGradient

D = torch.float64
N, M = 8, 12
TOL = 1e-10
# cvxpy (CLARABEL, default tolerances) lands within ~1e-8 of the answer (l2 ball: see _reference)
CVX_ATOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Problem:
    """min 1/2 x'Qx + theta[0]'x + g(x, theta[1:]) for one instance or a batch of them.

    Attributes:
        name: the test id.
        params: ``(seed, batch) -> theta[1:]``: the set's or penalty's parameters (leading dim B
            when batched).
        projection: ``(y, theta) -> P(y)`` for a constraint, ``None`` for a penalty.
        prox: ``(y, step, theta) -> prox_{step g}(y)``.
        cvx: ``(x, *params) -> (penalty expression, constraints)`` for cvxpy.
        active: ``(x, *params) -> bool array``: which constraints are active (coefficients zero).
    """

    name: str
    params: Callable[[int, int | None], tuple[torch.Tensor, ...]]
    projection: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor] | None
    prox: Callable[[torch.Tensor, float, tuple[torch.Tensor, ...]], torch.Tensor]
    cvx: Callable[..., tuple[Any, list[Any]]]
    active: Callable[..., np.ndarray]

    def __repr__(self) -> str:
        return self.name


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.rand(shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def _shape(B: int | None, *rest: int) -> tuple[int, ...]:
    return rest if B is None else (B, *rest)


def _box_params(seed: int, B: int | None) -> tuple[torch.Tensor, ...]:
    lo = -0.3 * _rand(seed + 1, *_shape(B, N))
    return lo, lo + 0.2 + 0.4 * _rand(seed + 2, *_shape(B, N))


def _radius(seed: int, B: int | None) -> tuple[torch.Tensor, ...]:
    return (0.5 + 0.5 * _rand(seed + 3, *_shape(B)),)


def _lam(seed: int, B: int | None) -> tuple[torch.Tensor, ...]:
    return (0.6 + 0.6 * _rand(seed + 4, *_shape(B, 1)),)


def _enet(seed: int, B: int | None) -> tuple[torch.Tensor, ...]:
    return (0.6 + 0.6 * _rand(seed + 5, *_shape(B, 1)), 0.5 + _rand(seed + 6, *_shape(B, 1)))


def _ind(projection: Callable[[torch.Tensor, Any], torch.Tensor]) -> Any:
    return lambda y, step, th: projection(y, th)


def _box_proj(y: torch.Tensor, th: Any) -> torch.Tensor:
    return P.box(y, th[1], th[2])


def _nonneg_proj(y: torch.Tensor, th: Any) -> torch.Tensor:
    return P.nonnegative(y)


def _simplex_proj(y: torch.Tensor, th: Any) -> torch.Tensor:
    return P.simplex(y, th[1])


def _l2_proj(y: torch.Tensor, th: Any) -> torch.Tensor:
    return P.l2_ball(y, th[1])


ATOL_ACTIVE = 1e-7  # what counts as on a bound / zero at the cvxpy answer

PROBLEMS = [
    Problem(
        "box_qp",
        _box_params,
        _box_proj,
        _ind(_box_proj),
        lambda x, lo, hi: (0, [x >= lo, x <= hi]),
        lambda x, lo, hi: (np.abs(x - lo) < ATOL_ACTIVE) | (np.abs(x - hi) < ATOL_ACTIVE),
    ),
    Problem(
        "nnls",
        lambda s, B: (),
        _nonneg_proj,
        _ind(_nonneg_proj),
        lambda x: (0, [x >= 0]),
        lambda x: np.abs(x) < ATOL_ACTIVE,
    ),
    Problem(
        "simplex",
        _radius,
        _simplex_proj,
        _ind(_simplex_proj),
        lambda x, r: (0, [x >= 0, cp.sum(x) == r]),
        lambda x, r: np.abs(x) < ATOL_ACTIVE,
    ),
    Problem(
        "l2_ball",
        _radius,
        _l2_proj,
        _ind(_l2_proj),
        lambda x, r: (0, [cp.norm2(x) <= r]),
        lambda x, r: np.array([abs(np.linalg.norm(x) - r) < ATOL_ACTIVE]),
    ),
    Problem(
        "lasso",
        _lam,
        None,
        lambda y, step, th: X.l1(y, step * th[1]),
        lambda x, lam: (lam.item() * cp.norm1(x), []),
        lambda x, lam: np.abs(x) < ATOL_ACTIVE,
    ),
    Problem(
        "elastic_net",
        _enet,
        None,
        lambda y, step, th: X.elastic_net(y, step * th[1], step * th[2]),
        lambda x, a, b: (a.item() * cp.norm1(x) + b.item() / 2 * cp.sum_squares(x), []),
        lambda x, a, b: np.abs(x) < ATOL_ACTIVE,
    ),
]


def _data(seed: int, B: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A (.., M, N) with Q = A'A positive definite, and the linear term c (.., N)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*_shape(B, M, N), dtype=D, generator=g) / M**0.5
    c = torch.randn(*_shape(B, N), dtype=D, generator=g)
    return A, c


def _objective(A: torch.Tensor) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """f(x, theta) = 1/2 ||A x||^2 + theta[0]'x (one per problem in batched mode)."""

    def f(x: torch.Tensor, theta: Any) -> torch.Tensor:
        Ax = (A @ x[..., None]).squeeze(-1)
        return 0.5 * (Ax * Ax).sum(-1) + (theta[0] * x).sum(-1)

    return f


def _lipschitz(A: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(A, ord=2).max() ** 2)


@functools.cache
def _reference(name: str, seed: int) -> np.ndarray:
    p = {q.name: q for q in PROBLEMS}[name]
    A, c = _data(seed, None)
    params = [t.numpy() for t in p.params(seed, None)]
    x = cp.Variable(N)
    penalty, constraints = p.cvx(x, *params)
    cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(A.numpy() @ x) + c.numpy() @ x + penalty), constraints
    ).solve()
    assert x.value is not None
    if name != "l2_ball":
        return np.asarray(x.value)
    # cvxpy's second-order cone answer is off by up to ~1e-5 (and warns "inaccurate" at tighter
    # tolerances): the reference is the trust-region secular equation, checked against cvxpy
    exact = _l2_ball_reference((A.T @ A).numpy(), c.numpy(), float(params[0]))
    np.testing.assert_allclose(exact, x.value, atol=1e-4)  # (measured: 1.3e-5 apart)
    return exact


def _l2_ball_reference(Q: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    """argmin 1/2 x'Qx + c'x over ||x|| <= r (Q positive definite): x(nu) = -(Q + nu I)^-1 c with
    nu = 0 inside, else the root of ||x(nu)|| = r, found by bisection (||x(nu)|| decreases)."""
    lam, V = np.linalg.eigh(Q)
    cv = V.T @ c

    def x(nu: float) -> np.ndarray:
        return np.asarray(-V @ (cv / (lam + nu)))

    if np.linalg.norm(x(0.0)) <= r:
        return x(0.0)
    lo, hi = 0.0, float(np.linalg.norm(c)) / r  # ||x(hi)|| <= ||c|| / hi = r
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.linalg.norm(x(mid)) > r else (lo, mid)
    return x(hi)


# --------------------------------------------------------------------------- the solver matrix


@dataclasses.dataclass(frozen=True)
class Case:
    """A solver configuration, built for a problem's step 1/L (``projected``: ProjectedGradient,
    used on the problems with a projection)."""

    name: str
    projected: bool
    settings: dict[str, Any]

    def __call__(self, p: Problem, L: float, **more: Any) -> Any:
        kw = {"max_iter": 50_000, "tol": TOL, **self.settings, **more}
        if kw.pop("fixed_step", False):
            kw["step"] = 1.0 / L
        if self.projected:
            assert p.projection is not None
            return ProjectedGradient(p.projection, **kw)
        return ProximalGradient(p.prox, **kw)

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("pg", True, {"fixed_step": True, "backtracking": False}),
    Case("pg_backtracking", True, {"step": 10.0}),
    Case("pg_accelerated", True, {"accelerated": True, "step": 10.0}),
    Case("ista", False, {"fixed_step": True, "accelerated": False, "backtracking": False}),
    Case("ista_backtracking", False, {"accelerated": False, "step": 10.0}),
    Case("fista", False, {"fixed_step": True, "backtracking": False}),
    Case("fista_backtracking", False, {"step": 10.0}),
    Case("fista_no_restart", False, {"fixed_step": True, "backtracking": False, "restart": False}),
]
MATRIX = [(c, p) for c in CASES for p in PROBLEMS if p.projection is not None or not c.projected]


def _in_answer_set(p: Problem, x: torch.Tensor, theta: tuple[torch.Tensor, ...]) -> None:
    """The answer of a constrained problem is a point of the set (P x = x)."""
    if p.projection is not None:
        torch.testing.assert_close(p.projection(x, theta), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("case", "p"), MATRIX, ids=[f"{c.name}-{p.name}" for c, p in MATRIX])
@pytest.mark.parametrize("seed", [0, 1])
def test_reaches_the_cvxpy_answer(case: Case, p: Problem, seed: int) -> None:
    A, c = _data(seed, None)
    params = p.params(seed, None)
    solver = case(p, _lipschitz(A))
    r = solver(_objective(A), torch.zeros(N, dtype=D), (c, *params))
    assert r.converged, r.reason
    assert r.grad_norm <= TOL
    ref = _reference(p.name, seed)
    np.testing.assert_allclose(r.x.numpy(), ref, atol=CVX_ATOL)
    _in_answer_set(p, r.x, (c, *params))
    if p.projection is None:  # the prox's zeros are exact where cvxpy's are ~0
        assert bool((r.x[torch.from_numpy(np.abs(ref) < 1e-6)] == 0).all())
    # the problem is a meaningful test: some constraints active, some not
    active = p.active(ref, *[t.numpy() for t in params])
    assert active.any() and (p.name == "l2_ball" or not active.all())
    # the reported value and gradient mapping are re-measurable at the answer's last iterate
    assert r.fun == pytest.approx(float(_objective(A)(r.x, (c, *params))), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(("case", "p"), MATRIX, ids=[f"{c.name}-{p.name}" for c, p in MATRIX])
def test_batched_equals_loop(case: Case, p: Problem) -> None:
    B = 3
    A, c = _data(5, B)
    params = p.params(5, B)
    L = _lipschitz(A)
    solver = case(p, L, batched=True)
    r = solver(_objective(A), torch.zeros(B, N, dtype=D), (c, *params))
    assert r.converged, r.reason
    assert r.problem_status is not None and len(r.problem_status) == B
    for b in range(B):
        one = case(p, L)(_objective(A[b]), torch.zeros(N, dtype=D), (c[b], *[t[b] for t in params]))
        assert one.converged
        # both stop at ||G|| <= TOL on a problem with mu ~ 0.1: answers within ~TOL / mu
        torch.testing.assert_close(r.x[b], one.x, atol=1e-8, rtol=0)
        assert float(r.problem_grad_norm[b]) <= TOL  # type: ignore[index]


def test_answers_of_the_batch_stop_on_their_own_criteria() -> None:
    """A problem that starts at its answer takes no step while the others run."""
    p = PROBLEMS[0]
    A, c = _data(7, 2)
    params = p.params(7, 2)
    solver = ProjectedGradient(
        p.projection, step=1.0 / _lipschitz(A), backtracking=False, tol=TOL, batched=True
    )  # type: ignore[arg-type]
    first = solver(_objective(A), torch.zeros(2, N, dtype=D), (c, *params))
    init = torch.stack([first.x[0], torch.zeros(N, dtype=D)])
    again = solver(_objective(A), init, (c, *params))
    assert again.problem_n_iter is not None and int(again.problem_n_iter[0]) <= 1
    assert int(again.problem_n_iter[1]) > 10


@settings(max_examples=20)
@given(st.integers(0, 2**31 - 1), st.integers(2, 12), st.booleans())
def test_box_qp_answers_satisfy_kkt(seed: int, n: int, accelerated: bool) -> None:
    """Random strongly convex box QPs: the answer is in the box and the gradient of f is >= 0 on
    the lower bounds, <= 0 on the upper ones, 0 elsewhere, up to what tol on ||G|| allows."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n + 2, n, dtype=D, generator=g)
    Q = A.T @ A + 0.1 * torch.eye(n, dtype=D)
    c = 3.0 * torch.randn(n, dtype=D, generator=g)
    lo = -torch.rand(n, dtype=D, generator=g)
    hi = lo + torch.rand(n, dtype=D, generator=g)
    tol = 1e-10
    r = ProjectedGradient(
        P.fixed(P.box, lo, hi), step=1.0, tol=tol, max_iter=100_000, accelerated=accelerated
    )(lambda x, th: 0.5 * x @ Q @ x + c @ x, torch.zeros(n, dtype=D), None)
    assert r.converged, r.reason
    x = r.x
    assert bool(((x >= lo) & (x <= hi)).all())
    grad = Q @ x + c
    # ||G|| <= tol bounds the distance to the answer by tol / mu (mu >= 0.1) and the gradient's
    # error by ||Q|| tol / mu: the slack of the sign conditions
    slack = 100.0 * float(torch.linalg.matrix_norm(Q, ord=2)) * tol / 0.1 + 1e-12
    on_lo, on_hi = x == lo, x == hi
    free = ~(on_lo | on_hi)
    assert bool((grad[on_lo] >= -slack).all()) and bool((grad[on_hi] <= slack).all())
    assert bool((grad[free].abs() <= slack).all())


# --------------------------------------------------------------------------- FISTA and the counts


def test_fista_takes_fewer_iterations_on_an_ill_conditioned_lasso() -> None:
    g = torch.Generator().manual_seed(3)
    A = torch.randn(40, 20, dtype=D, generator=g) * torch.logspace(0, -1, 20, dtype=D)  # kappa ~ 3e2
    b = torch.randn(40, dtype=D, generator=g)

    def f(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((A @ x - b) ** 2).sum()

    lam = torch.tensor(0.5, dtype=D)
    L = _lipschitz(A)
    common = dict(step=1.0 / L, tol=1e-7, max_iter=20_000, backtracking=False)
    ista = ProximalGradient(X.weighted(X.l1), accelerated=False, **common)(f, torch.zeros(20, dtype=D), lam)  # type: ignore[arg-type]
    fista = ProximalGradient(X.weighted(X.l1), **common)(f, torch.zeros(20, dtype=D), lam)  # type: ignore[arg-type]
    assert ista.converged and fista.converged
    assert fista.n_iter * 5 < ista.n_iter, (fista.n_iter, ista.n_iter)
    torch.testing.assert_close(fista.x, ista.x, atol=1e-6, rtol=0)
    assert int(fista.info["n_restarts"]) > 0  # the restart acted on this problem
    plain = ProximalGradient(X.weighted(X.l1), restart=False, **common)(f, torch.zeros(20, dtype=D), lam)  # type: ignore[arg-type]
    assert plain.converged and fista.n_iter * 3 < plain.n_iter  # the restart makes FISTA fast here
    assert int((fista.x == 0).sum()) >= 3 and int((fista.x != 0).sum()) >= 3
    x = cp.Variable(20)
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A.numpy() @ x - b.numpy()) + 0.5 * cp.norm1(x))).solve()
    np.testing.assert_allclose(fista.x.numpy(), x.value, atol=1e-5)  # kappa 1e4 amplifies cvxpy's 1e-9


@pytest.mark.parametrize("accelerated", [False, True])
def test_counts_one_gradient_per_fixed_step(accelerated: bool) -> None:
    A, c = _data(0, None)
    p = PROBLEMS[4]
    s = ProximalGradient(
        p.prox, step=1.0 / _lipschitz(A), backtracking=False, accelerated=accelerated, tol=TOL
    )
    r = s(_objective(A), torch.zeros(N, dtype=D), (c, *p.params(0, None)))
    assert r.n_gev == r.n_iter + 1 and r.n_fev == 0 and r.n_hvp == 0
    assert r.info["n_backtracks"] == 0 and r.info["step"] == s.step


def test_backtracking_shrinks_the_step_below_2_over_l_and_counts_its_trials() -> None:
    A, c = _data(1, None)
    p = PROBLEMS[4]
    L = _lipschitz(A)
    r = ProximalGradient(p.prox, step=100.0 / L, accelerated=False, tol=TOL)(
        _objective(A), torch.zeros(N, dtype=D), (c, *p.params(1, None))
    )
    assert r.converged
    assert r.info["step"] <= 2.0 / L and r.info["n_backtracks"] >= 6  # 100 -> < 2 by halving
    # ISTA reuses each accepted trial's gradient: one per iteration, plus one per backtrack
    assert r.n_gev == 1 + r.n_iter + r.info["n_backtracks"]


# --------------------------------------------------------------------------- trees


def test_tuple_unknowns_with_a_projection_per_leaf() -> None:
    A, c = _data(2, None)
    lo, hi = _box_params(2, None)
    f = _objective(A)

    def f_tree(x: tuple[torch.Tensor, torch.Tensor], th: Any) -> torch.Tensor:
        return f(torch.cat([x[0], x[1].reshape(-1)]), th)

    def proj_tree(y: tuple[torch.Tensor, torch.Tensor], th: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return P.box(y[0], lo[:4], hi[:4]), P.box(y[1], lo[4:].reshape(2, 2), hi[4:].reshape(2, 2))

    init = (torch.zeros(4, dtype=D), torch.zeros(2, 2, dtype=D))
    r = ProjectedGradient(proj_tree, step=1.0, tol=TOL)(f_tree, init, (c,))
    flat = ProjectedGradient(P.fixed(P.box, lo, hi), step=1.0, tol=TOL)(f, torch.zeros(N, dtype=D), (c,))
    assert r.converged and isinstance(r.x, tuple) and r.x[1].shape == (2, 2)
    torch.testing.assert_close(torch.cat([r.x[0], r.x[1].reshape(-1)]), flat.x, atol=1e-9, rtol=0)


# --------------------------------------------------------------------------- implicit differentiation


IMPLICIT = [
    (c, p) for c in CASES[:1] + CASES[5:6] for p in PROBLEMS if p.projection is not None or not c.projected
]


@pytest.mark.parametrize(("case", "p"), IMPLICIT, ids=[f"{c.name}-{p.name}" for c, p in IMPLICIT])
def test_implicit_gradient_through_the_condition_matches_finite_differences(case: Case, p: Problem) -> None:
    """x*(theta) by the solver, differentiated by `implicit_root` on ``solver.condition``: gradcheck
    compares with central differences of re-solves, in c (always) and the set's or penalty's
    parameters (bounds, radius, lambda), at answers with active and inactive constraints."""
    A, c = _data(0, None)
    params = p.params(0, None)
    solver = case(p, _lipschitz(A), tol=1e-13)
    f = _objective(A)
    F = solver.condition.residual(f)

    def answer(*theta: torch.Tensor) -> torch.Tensor:
        return bl.implicit_root(
            F,
            torch.zeros(N, dtype=D),
            theta,
            solver=lambda _F, x0, th: solver(f, x0, th),
            linear_solver=bl.DenseSolve(),
        )

    theta = tuple(t.clone().requires_grad_(True) for t in (c, *params))
    # finite differences of re-solves at 1e-13: error ~1e-13 / eps = 1e-7 per entry
    assert torch.autograd.gradcheck(answer, theta, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("p", [PROBLEMS[0], PROBLEMS[4]], ids=["box_qp", "lasso"])
def test_implicit_gradient_of_a_batch_matches_finite_differences(p: Problem) -> None:
    """A batch of B problems solved at once (``batched=True``) and differentiated by one batched
    implicit_root through the condition of a `BatchedObjective`: gradcheck of re-solves."""
    B = 3
    A, c = _data(11, B)
    params = p.params(11, B)
    f = bl.solvers.BatchedObjective(_objective(A))
    solver = ProximalGradient(p.prox, step=1.0 / _lipschitz(A), tol=1e-13, batched=True)

    def answer(*theta: torch.Tensor) -> torch.Tensor:
        return bl.implicit_root(
            solver.condition.residual(f),
            torch.zeros(B, N, dtype=D),
            theta,
            solver=lambda _F, x0, th: solver(f, x0, th),
            batched=True,
        )

    theta = tuple(t.clone().requires_grad_(True) for t in (c, *params))
    assert torch.autograd.gradcheck(answer, theta, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_jacobians_of_a_box_qp_equal_the_reduced_kkt_solution() -> None:
    """x* of a box QP in c and the bounds, by implicit_root on ProjectedGradient's condition (its
    default GMRES backward): with F the free coordinates and K the active ones (x_K = bound_K),
    dx_F/dc_F = -(Q_FF)^-1, dx_F/dbound_K = -(Q_FF)^-1 Q_FK, dx_K/dbound_K = I, zero elsewhere."""
    A, c = _data(0, None)
    lo, hi = _box_params(0, None)
    Q = A.T @ A
    f = _objective(A)
    solver = ProjectedGradient(_box_proj, step=1.0 / _lipschitz(A), tol=1e-13, backtracking=False)

    def answer(*theta: torch.Tensor) -> torch.Tensor:
        return bl.implicit_root(
            solver.condition.residual(f),
            torch.zeros(N, dtype=D),
            theta,
            solver=lambda _F, x0, th: solver(f, x0, th),
        )

    x = answer(c, lo, hi).detach()
    at_lo, at_hi = (x - lo).abs() < 1e-9, (x - hi).abs() < 1e-9
    free = ~(at_lo | at_hi)
    assert free.any() and at_lo.any() and at_hi.any()
    Jc, Jlo, Jhi = torch.autograd.functional.jacobian(answer, (c, lo, hi))
    Fi = free.nonzero().squeeze(1)
    inv = torch.linalg.inv(Q[Fi][:, Fi])
    expected_c = torch.zeros(N, N, dtype=D)
    expected_c[Fi[:, None], Fi] = -inv
    torch.testing.assert_close(Jc, expected_c, atol=1e-8, rtol=1e-7)
    for J, active in ((Jlo, at_lo), (Jhi, at_hi)):
        Ki = active.nonzero().squeeze(1)
        expected = torch.zeros(N, N, dtype=D)
        expected[Ki, Ki] = 1.0
        expected[Fi[:, None], Ki] = -inv @ Q[Fi][:, Ki]
        torch.testing.assert_close(J, expected, atol=1e-8, rtol=1e-7)


# --------------------------------------------------------------------------- statuses and guards


def test_condition_carries_the_projection_or_prox_and_the_step() -> None:
    proj = P.fixed(P.nonnegative)
    pg = ProjectedGradient(proj, step=0.25)
    assert pg.condition == bl.conditions.ProjectedFixedPoint(proj, 0.25)
    px = X.weighted(X.l1)
    assert ProximalGradient(px, step=0.5).condition == bl.conditions.ProximalFixedPoint(px, 0.5)
    assert not pg.condition.symmetric


def test_cap_reports_max_iter_and_names_the_settings() -> None:
    A, c = _data(0, None)
    p = PROBLEMS[4]
    r = ProximalGradient(p.prox, step=1.0 / _lipschitz(A), backtracking=False, max_iter=3, tol=TOL)(
        _objective(A), torch.zeros(N, dtype=D), (c, *p.params(0, None))
    )
    assert r.status is bl.SolverStatus.MAX_ITER and r.n_iter == 3
    assert "ProximalGradient stopped at max_iter=3" in r.reason and "step=" in r.reason


def test_divergence_reports_nonfinite_and_keeps_a_finite_iterate() -> None:
    A, c = _data(0, None)
    p = PROBLEMS[1]
    r = ProjectedGradient(p.projection, step=1e3 / _lipschitz(A), backtracking=False, max_iter=10_000)(  # type: ignore[arg-type]
        _objective(A), torch.ones(N, dtype=D), (-c,)
    )
    assert r.status is bl.SolverStatus.NONFINITE
    assert bool(torch.isfinite(r.x).all())
    assert "lower step=" in r.reason


def test_backtracking_failure_is_reported() -> None:
    A, c = _data(0, None)
    p = PROBLEMS[4]
    r = ProximalGradient(p.prox, step=1e6, max_backtracks=2)(
        _objective(A), torch.zeros(N, dtype=D), (c, *p.params(0, None))
    )
    assert r.status is bl.SolverStatus.LINE_SEARCH_FAILED
    assert "line search found no step" in r.reason
    assert r.info["n_backtracks"] == 2


def test_a_nan_objective_reports_nonfinite() -> None:
    r = ProximalGradient(X.weighted(X.l1), backtracking=False)(
        lambda x, th: (x * float("nan")).sum(), torch.zeros(3, dtype=D), torch.tensor(1.0, dtype=D)
    )
    assert r.status is bl.SolverStatus.NONFINITE


def test_a_prox_returning_another_shape_is_refused() -> None:
    with pytest.raises(bl.StructureError, match=r"prox\(y, step, theta\) has shape"):
        ProximalGradient(lambda y, s, th: y[:2])(lambda x, th: (x * x).sum(), torch.ones(3, dtype=D), None)
    with pytest.raises(bl.StructureError, match=r"prox\(y, step, theta\) has dtype"):
        ProjectedGradient(lambda y, th: y.float())(lambda x, th: (x * x).sum(), torch.ones(3, dtype=D), None)


BAD_CONFIG: list[tuple[Callable[[], Any], type[Exception], str]] = [
    (lambda: ProximalGradient(3.0), TypeError, "prox must be callable"),  # type: ignore[arg-type]
    (lambda: ProjectedGradient(None), TypeError, "projection must be callable"),  # type: ignore[arg-type]
    (lambda: ProximalGradient(X.l1, step=0.0), ValueError, r"step=0.0\): step must be > 0"),
    (lambda: ProjectedGradient(P.nonnegative, step=-1.0), ValueError, "step must be > 0"),
    (lambda: ProximalGradient(X.l1, max_iter=-1), ValueError, "max_iter must be >= 0"),
    (lambda: ProximalGradient(X.l1, tol=-1e-3), ValueError, "tol must be >= 0"),
    (lambda: ProximalGradient(X.l1, shrink=1.0), ValueError, r"shrink must be in \(0, 1\)"),
    (lambda: ProjectedGradient(P.nonnegative, max_backtracks=0), ValueError, "max_backtracks must be >= 1"),
    (lambda: ProximalGradient(X.l1, accelerated="yes"), TypeError, "accelerated must be True or False"),  # type: ignore[arg-type]
    (lambda: ProjectedGradient(P.nonnegative, batched=1), TypeError, "batched must be True or False"),  # type: ignore[arg-type]
    # the class called as if it were a solver: (objective, init, theta) fill (prox, step, max_iter)
    (
        lambda: ProximalGradient(lambda x, t: x.sum(), torch.zeros(3), torch.ones(1)),  # type: ignore[arg-type]
        TypeError,
        "ProximalGradient is a solver class",
    ),
]


@pytest.mark.parametrize(("make", "err", "match"), BAD_CONFIG, ids=[b[2] for b in BAD_CONFIG])
def test_bad_configuration_raises(make: Callable[[], Any], err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        make()


def test_configurations_are_frozen() -> None:
    s = ProximalGradient(X.l1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = 2.0  # type: ignore[misc]
