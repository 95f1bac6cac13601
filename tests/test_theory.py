"""bilevel.theory against random problems: the paper's lemmas and theorem must hold.

Every property compares a gradient computed through `bl.implicit_argmin` with an
independent float64 reference: the closed form for quadratic support losses, a Newton
solve to machine precision for logistic ones, and dense `torch.linalg.solve` for the
meta-gradient (I + Lhat''(phi*)/lam)^-1 grad L(phi*).

Tolerances: references are float64 and well conditioned (kappa <= ~250), so a bound
that must hold is checked as ``err <= bound * (1 + 1e-9) + SLACK`` where SLACK = 1e-12
covers rounding in the reference and in the computed gradient (the bounds hold in exact
arithmetic; see the module docstring of bilevel.theory).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from bilevel import theory
from bilevel._types import LinearSolver

D64 = torch.float64
SLACK = 1e-12
REL = 1e-9

seeds = st.integers(0, 2**32 - 1)
dims = st.integers(3, 10)
lams = st.floats(0.2, 10.0)
#: The layer's exact HVP oracles (None: the default, reverse-over-reverse).  Finite
#: differences are left to tests/test_hvp.py: their truncation error is not a Lemma 1 matter.
oracles = st.sampled_from([None, bl.ForwardOverReverse(), bl.DenseHessian()])

Vec = torch.Tensor


# ----------------------------------------------------------------------------- test problems


@dataclasses.dataclass
class Task:
    """One iMAML task: support loss Lhat, query loss Lq, proximal weight lam, meta-parameters theta.

    ``hess_hat`` and ``grad_hat`` are explicit formulas, used by the references and the
    local solvers (never by the layer, which differentiates ``G`` by autograd).
    """

    lam: float
    theta: Vec
    loss_hat: Callable[[Vec], Vec]
    grad_hat: Callable[[Vec], Vec]
    hess_hat: Callable[[Vec], Vec]
    loss_q: Callable[[Vec], Vec]
    grad_q: Callable[[Vec], Vec]
    smooth_hat: float  # ||Lhat''|| <= smooth_hat everywhere
    rho: float  # Lhat'' is rho-Lipschitz
    B: float  # ||grad Lq|| <= B (globally for logistic; see the quadratic builder)
    L: float  # grad Lq is L-Lipschitz
    phi_star: Vec = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.phi_star = newton(self.grad_G, self.hess_G, self.theta.clone())

    @property
    def mu(self) -> float:
        return self.lam  # Lhat is convex in every task below

    @property
    def kappa(self) -> float:
        return (self.lam + self.smooth_hat) / self.lam

    def G(self, phi: Vec, theta: Vec) -> Vec:
        return self.loss_hat(phi) + 0.5 * self.lam * ((phi - theta) ** 2).sum()

    def grad_G(self, phi: Vec, theta: Vec | None = None) -> Vec:
        th = self.theta if theta is None else theta
        return self.grad_hat(phi) + self.lam * (phi - th)

    def hess_G(self, phi: Vec) -> Vec:
        return self.hess_hat(phi) + self.lam * torch.eye(phi.numel(), dtype=D64)

    def g_exact_at(self, phi: Vec) -> Vec:
        """(I + Lhat''(phi)/lam)^-1 grad Lq(phi): what the linear solve aims at, at phi."""
        n = phi.numel()
        return torch.linalg.solve(torch.eye(n, dtype=D64) + self.hess_hat(phi) / self.lam, self.grad_q(phi))

    @property
    def g_star(self) -> Vec:
        """d_theta Lq(Alg*(theta)), the exact meta-gradient (Lemma 1)."""
        return self.g_exact_at(self.phi_star)


def newton(grad: Callable[[Vec], Vec], hess: Callable[[Vec], Vec], x: Vec, iters: int = 50) -> Vec:
    """Damped Newton on a strongly convex function, to machine precision (float64 reference).

    Stops when a step no longer reduces ||grad|| (rounding level) or after ``iters`` steps.
    """
    g_norm = float(grad(x).norm())
    for _ in range(iters):
        step = torch.linalg.solve(hess(x), grad(x))
        # Halve on an increase of ||grad||: enough for the far-out logistic starts here.
        t = 1.0
        while t > 1e-6:
            x_new = x - t * step
            new_norm = float(grad(x_new).norm())
            if new_norm < g_norm:
                break
            t /= 2
        else:
            return x  # no progress at rounding level: x is the float64 answer
        x, g_norm = x_new, new_norm
        if g_norm == 0.0:
            break
    return x


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_psd(d: int, top: float, g: torch.Generator, singular: bool) -> Vec:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    eig = torch.rand(d, generator=g, dtype=D64) * top
    eig[0] = top
    if singular:
        eig[-1] = 0.0  # convex, not strongly: only the proximal term makes G strongly convex
    return Q @ torch.diag(eig) @ Q.T


def quadratic_task(seed: int, d: int, lam: float, *, B_radius: float = 0.0) -> Task:
    """Lhat = 1/2 phi'A phi + b'phi (rho = 0); Lq = 1/2 (phi - c)'P(phi - c).

    Lq is not globally Lipschitz; ``B`` is set to ||grad Lq(Alg*)|| + L * B_radius,
    which bounds ||grad Lq|| on the ball of radius ``B_radius`` around Alg* (all that
    Lemma 3 and Theorem 2 use: with rho = 0, B enters only the CG budget, through
    ||grad Lq(phi)|| at the computed phi).
    """
    g = rng(seed)
    A = random_psd(d, float(torch.empty(1).uniform_(0.5, 50.0, generator=g)), g, singular=seed % 2 == 0)
    P = random_psd(d, float(torch.empty(1).uniform_(0.5, 5.0, generator=g)), g, singular=False)
    b = torch.randn(d, generator=g, dtype=D64)
    c = torch.randn(d, generator=g, dtype=D64)
    theta = torch.randn(d, generator=g, dtype=D64)
    L = float(torch.linalg.matrix_norm(P, ord=2))
    task = Task(
        lam=lam,
        theta=theta,
        loss_hat=lambda p: 0.5 * p @ A @ p + b @ p,
        grad_hat=lambda p: A @ p + b,
        hess_hat=lambda p: A,
        loss_q=lambda p: 0.5 * (p - c) @ P @ (p - c),
        grad_q=lambda p: P @ (p - c),
        smooth_hat=float(torch.linalg.matrix_norm(A, ord=2)),
        rho=0.0,
        B=math.nan,
        L=L,
    )
    # Closed form: (A + lam I) phi* = lam theta - b.  Newton hit it already; check.
    closed = torch.linalg.solve(A + lam * torch.eye(d, dtype=D64), lam * theta - b)
    torch.testing.assert_close(task.phi_star, closed, rtol=1e-10, atol=1e-12)
    task.B = float(task.grad_q(task.phi_star).norm()) + L * B_radius
    return task


def logistic_parts(X: Vec, y: Vec) -> tuple[Callable[[Vec], Vec], Callable[[Vec], Vec], Callable[[Vec], Vec]]:
    """Mean logistic loss 1/n sum log(1 + exp(-y_i x_i'w)), its gradient and Hessian (explicit)."""
    n = X.shape[0]

    def loss(w: Vec) -> Vec:
        return F.softplus(-y * (X @ w)).mean()

    def grad(w: Vec) -> Vec:
        return -(X.T @ (y * torch.sigmoid(-y * (X @ w)))) / n

    def hess(w: Vec) -> Vec:
        s = torch.sigmoid(X @ w)
        return (X.T * (s * (1 - s))) @ X / n

    return loss, grad, hess


def logistic_data(g: torch.Generator, n: int, d: int, scale: float) -> tuple[Vec, Vec]:
    w = torch.randn(d, generator=g, dtype=D64)
    X = scale * torch.randn(n, d, generator=g, dtype=D64) / math.sqrt(d)
    flip = torch.rand(n, generator=g, dtype=D64) < 0.2  # label noise: no separable data
    y = torch.where((X @ w > 0) ^ flip, 1.0, -1.0).to(D64)
    return X, y


def logistic_task(seed: int, d: int, lam: float, *, scale: float = 2.0, ridge: float = 0.0) -> Task:
    """Lhat = mean logistic loss on support data (+ ridge/2 ||phi||^2); Lq = logistic on query data."""
    g = rng(seed)
    Xs, ys = logistic_data(g, 2 * d, d, scale)
    Xq, yq = logistic_data(g, 3 * d, d, scale)
    theta = torch.randn(d, generator=g, dtype=D64)
    loss_s, grad_s, hess_s = logistic_parts(Xs, ys)
    loss_q, grad_q, _ = logistic_parts(Xq, yq)
    cs, cq = theory.logistic_constants(Xs), theory.logistic_constants(Xq)
    eye = torch.eye(d, dtype=D64)
    return Task(
        lam=lam,
        theta=theta,
        loss_hat=lambda p: loss_s(p) + 0.5 * ridge * (p @ p),
        grad_hat=lambda p: grad_s(p) + ridge * p,
        hess_hat=lambda p: hess_s(p) + ridge * eye,
        loss_q=loss_q,
        grad_q=grad_q,
        smooth_hat=cs.smoothness + ridge,
        rho=cs.hessian_lipschitz,
        B=cq.lipschitz,
        L=cq.smoothness,
    )


# ----------------------------------------------------------------------------- solvers and the layer


def nesterov(grad: Callable[[Vec], Vec], x0: Vec, *, beta: float, mu: float, iters: int) -> Vec:
    """Nesterov's constant-step scheme for strongly convex f (Lemma 2's method).

    y_k = x_k + m (x_k - x_{k-1}),  x_{k+1} = y_k - grad f(y_k) / beta,
    m = (sqrt(kappa) - 1) / (sqrt(kappa) + 1): one gradient per iteration.
    (Nesterov 2018, scheme 2.2.22.)
    """
    q = math.sqrt(beta / mu)
    m = (q - 1) / (q + 1)
    x_prev = x = x0.clone()
    for _ in range(iters):
        y = x + m * (x - x_prev)
        x_prev, x = x, y - grad(y) / beta
    return x


def nesterov_solver(task: Task, iters: int) -> Callable[..., Vec]:
    beta = task.lam + task.smooth_hat

    def solve(objective: object, init: Vec, theta: Vec) -> Vec:
        return nesterov(lambda p: task.grad_G(p, theta), init, beta=beta, mu=task.mu, iters=iters)

    return solve


def fixed_solver(phi: Vec) -> Callable[..., Vec]:
    """A 'solver' that returns a given point: to place phi exactly where a test wants it."""

    def solve(objective: object, init: Vec, theta: Vec) -> Vec:
        return phi.clone()

    return solve


def layer_metagrad(
    task: Task,
    solver: Callable[..., Vec],
    linear_solver: LinearSolver,
    init: Vec | None = None,
    backward_x0: Vec | None = None,
    hvp: Any = None,
) -> tuple[Vec, Vec, bl.ImplicitInfo]:
    """theta.grad of Lq(implicit_argmin(G)) through the layer; returns (phi, g, info).

    HVPs by ``ReverseOverReverse`` unless given: on these 10-dimensional problems it is
    ~15x faster than forward-over-reverse (torch.func overhead per call);
    the Lemma 1 tests cover the other oracles.

    ``throw=False`` with the warnings silenced: these tests run deliberately inexact
    solves (a fixed number of CG steps, perturbed phi) and measure the consequence.
    """
    theta = task.theta.clone().requires_grad_(True)
    start = task.theta.clone() if init is None else init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.BilevelWarning)
        phi, info = bl.implicit_argmin(
            task.G,
            start,
            theta,
            solver,
            hvp=bl.ReverseOverReverse() if hvp is None else hvp,
            linear_solver=linear_solver,
            optimality_tol=None,
            throw=False,
            backward_x0=backward_x0,
            return_info=True,
        )
        task.loss_q(phi).backward()
    assert theta.grad is not None
    return phi.detach(), theta.grad, info


def holds(err: float, bound: float) -> bool:
    return err <= bound * (1 + REL) + SLACK


def unit(d: int, g: torch.Generator) -> Vec:
    u = torch.randn(d, generator=g, dtype=D64)
    return u / u.norm()


# ----------------------------------------------------------------------------- Lemma 1


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=seeds, d=dims, lam=lams, hvp=oracles)
def test_lemma1_quadratic(seed: int, d: int, lam: float, hvp: Any) -> None:
    task = quadratic_task(seed, d, lam)
    theta = task.theta.clone().requires_grad_(True)
    phi = bl.implicit_argmin(task.G, task.theta.clone(), theta, fixed_solver(task.phi_star), hvp=hvp)
    v = torch.randn(d, generator=rng(seed + 1), dtype=D64)
    phi.backward(v)
    H = torch.autograd.functional.hessian(task.loss_hat, task.phi_star)
    expected = torch.linalg.solve(torch.eye(d, dtype=D64) + H / lam, v)
    assert theta.grad is not None
    torch.testing.assert_close(theta.grad, expected, rtol=1e-8, atol=1e-8 * float(expected.norm()))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=seeds, d=dims, lam=lams, ridge=st.floats(0.0, 1.0), hvp=oracles)
def test_lemma1_logistic(seed: int, d: int, lam: float, ridge: float, hvp: Any) -> None:
    task = logistic_task(seed, d, lam, ridge=ridge)
    theta = task.theta.clone().requires_grad_(True)
    phi = bl.implicit_argmin(task.G, task.theta.clone(), theta, fixed_solver(task.phi_star), hvp=hvp)
    v = torch.randn(d, generator=rng(seed + 1), dtype=D64)
    phi.backward(v)
    # The dense Hessian by autograd, independent of the explicit formula the solver used.
    H = torch.autograd.functional.hessian(task.loss_hat, task.phi_star)
    expected = torch.linalg.solve(torch.eye(d, dtype=D64) + H / lam, v)
    assert theta.grad is not None
    torch.testing.assert_close(theta.grad, expected, rtol=1e-8, atol=1e-8 * float(expected.norm()))


# ----------------------------------------------------------------------------- constants


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=seeds, d=dims, n=st.integers(1, 30), scale=st.floats(0.1, 5.0), spread=st.floats(0.01, 10.0))
def test_logistic_constants_hold(seed: int, d: int, n: int, scale: float, spread: float) -> None:
    g = rng(seed)
    X, y = logistic_data(g, n, d, scale)
    _loss, grad, hess = logistic_parts(X, y)
    c = theory.logistic_constants(X)
    for _ in range(5):
        a = spread * torch.randn(d, generator=g, dtype=D64)
        b = a + spread * torch.randn(d, generator=g, dtype=D64) / 10
        assert float(grad(a).norm()) <= c.lipschitz * (1 + REL)
        assert float(torch.linalg.matrix_norm(hess(a), ord=2)) <= c.smoothness * (1 + REL)
        dH = float(torch.linalg.matrix_norm(hess(a) - hess(b), ord=2))
        assert dH <= c.hessian_lipschitz * float((a - b).norm()) * (1 + REL) + SLACK


def test_logistic_third_derivative_constant() -> None:
    z = torch.linspace(-10, 10, 200001, dtype=D64)
    s = torch.sigmoid(z)
    third = s * (1 - s) * (1 - 2 * s)
    assert float(third.abs().max()) == pytest.approx(theory.LOGISTIC_THIRD_DERIVATIVE_MAX, rel=1e-8)


# ----------------------------------------------------------------------------- Lemma 3


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    seed=seeds,
    d=dims,
    lam=lams,
    frac=st.floats(0.0, 0.99),
    log_cap=st.floats(-6.0, 1.0),
    cg_iters=st.integers(0, 10),
)
def test_lemma3_logistic(seed: int, d: int, lam: float, frac: float, log_cap: float, cg_iters: int) -> None:
    """Error of the layer's gradient at phi = phi* + delta u with cg_iters CG steps <= Lemma 3."""
    task = logistic_task(seed, d, lam)
    delta_max = task.mu / (2 * task.rho)
    delta = min(frac * delta_max, 10.0**log_cap)
    phi = task.phi_star + delta * unit(d, rng(seed + 2))
    _, g, _ = layer_metagrad(task, fixed_solver(phi), bl.CG(max_iter=cg_iters, rtol=0.0))
    delta_true = float((phi - task.phi_star).norm())
    delta_prime = float((g - task.g_exact_at(phi)).norm())
    bound = theory.lemma3_bound(
        lam=lam, rho=task.rho, B=task.B, L=task.L, mu=task.mu, delta=delta_true, delta_prime=delta_prime
    )
    err = float((g - task.g_star).norm())
    assert holds(err, bound), (err, bound)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=seeds, d=dims, lam=lams, log_delta=st.floats(-8.0, 1.0), cg_iters=st.integers(0, 10))
def test_lemma3_quadratic(seed: int, d: int, lam: float, log_delta: float, cg_iters: int) -> None:
    """rho = 0: the bound lam L / mu delta + delta' holds at any distance."""
    task = quadratic_task(seed, d, lam)
    phi = task.phi_star + 10.0**log_delta * unit(d, rng(seed + 2))
    _, g, _ = layer_metagrad(task, fixed_solver(phi), bl.CG(max_iter=cg_iters, rtol=0.0))
    delta = float((phi - task.phi_star).norm())
    delta_prime = float((g - task.g_exact_at(phi)).norm())
    bound = theory.lemma3_bound(
        lam=lam, rho=0.0, B=task.B, L=task.L, mu=task.mu, delta=delta, delta_prime=delta_prime
    )
    assert holds(float((g - task.g_star).norm()), bound)


# ----------------------------------------------------------------------------- Theorem 2


def _run_theorem2(task: Task, eps: float, from_zero: bool, use_budget_cg: bool) -> float:
    d = task.theta.numel()
    init = torch.zeros(d, dtype=D64) if from_zero else task.theta.clone()
    D = float((init - task.phi_star).norm())  # the tightest valid D for this start
    consts = dict(kappa=task.kappa, D=D, B=task.B, L=task.L, rho=task.rho, mu=task.mu, lam=task.lam)
    inner, cg = theory.theorem2_iterations(eps=eps, **consts)
    budget = theory.budget_for(eps, **consts)
    assert (budget.inner_iters, budget.cg_iters) == (inner, cg)
    # budget.cg() may stop early, once its residual certifies delta'; CG(rtol=0) runs all cg steps.
    lin = budget.cg() if use_budget_cg else bl.CG(max_iter=cg, rtol=0.0)
    _, g, info = layer_metagrad(task, nesterov_solver(task, inner), lin, init=init)
    assert info.last_backward is not None and info.last_backward.n_iter <= cg
    return float((g - task.g_star).norm())


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    seed=seeds,
    d=dims,
    lam=lams,
    log_eps=st.floats(-8.0, -1.0),
    from_zero=st.booleans(),
    budget_cg=st.booleans(),
)
def test_theorem2_quadratic(
    seed: int, d: int, lam: float, log_eps: float, from_zero: bool, budget_cg: bool
) -> None:
    eps = 10.0**log_eps
    # With rho = 0, delta = eps / (2 B1) does not depend on B; B bounds ||grad Lq|| within delta of phi*.
    probe = quadratic_task(seed, d, lam)
    B1 = theory.lemma3_constant(lam=lam, rho=0.0, B=0.0, L=probe.L, mu=lam)
    task = quadratic_task(seed, d, lam, B_radius=eps / (2 * B1))
    err = _run_theorem2(task, eps, from_zero, budget_cg)
    assert err <= eps, (err, eps)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    seed=seeds,
    d=dims,
    lam=lams,
    log_eps=st.floats(-8.0, -1.0),
    from_zero=st.booleans(),
    budget_cg=st.booleans(),
)
def test_theorem2_logistic(
    seed: int, d: int, lam: float, log_eps: float, from_zero: bool, budget_cg: bool
) -> None:
    task = logistic_task(seed, d, lam)
    eps = 10.0**log_eps
    err = _run_theorem2(task, eps, from_zero, budget_cg)
    assert err <= eps, (err, eps)


def test_theorem2_with_library_nesterov() -> None:
    """The budget, spent by bl.solvers.Nesterov (plain scheme) and Budget.cg(), meets eps; certify agrees."""
    import bilevel.solvers as solvers

    for seed in range(3):
        task = logistic_task(seed, 8, 0.3)
        for eps in (1e-3, 1e-7):
            D = float((task.theta - task.phi_star).norm())
            b = theory.budget_for(
                eps, kappa=task.kappa, D=D, B=task.B, L=task.L, rho=task.rho, mu=task.mu, lam=task.lam
            )
            inner = solvers.Nesterov(
                lr=1 / (task.lam + task.smooth_hat),
                mu=task.mu,
                max_iter=b.inner_iters,
                tol=b.inner_grad_tol,
                restart=False,
            )
            _, g, info = layer_metagrad(task, inner, b.cg())
            err = float((g - task.g_star).norm())
            assert err <= eps, (seed, eps, err)
            cert = theory.certify(info, lam=task.lam, rho=task.rho, L=task.L, B=task.B)
            assert cert.valid and holds(err, cert.bound)
            # Both solves stopped on their certified tolerances: the certificate meets eps too.
            assert info.solver_result is not None and info.solver_result.converged
            assert info.last_backward is not None and info.last_backward.converged
            assert cert.bound <= eps * (1 + REL)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    kappa=st.floats(1.0, 1e4),
    D=st.floats(0.0, 1e3),
    B=st.floats(0.0, 1e3),
    L=st.floats(0.0, 1e3),
    rho=st.floats(0.0, 1e3),
    lam=st.floats(1e-3, 1e3),
    mu_frac=st.floats(0.01, 1.0),
    eps=st.floats(1e-10, 1e2),
)
def test_theorem2_counts_cover_lemma2(
    kappa: float, D: float, B: float, L: float, rho: float, lam: float, mu_frac: float, eps: float
) -> None:
    """The paper's counts are Lemma 2 at the accuracies its proof needs (arithmetic only)."""
    mu = mu_frac * lam
    b = theory.budget_for(eps, kappa=kappa, D=D, B=B, L=L, rho=rho, mu=mu, lam=lam)
    B1 = theory.lemma3_constant(lam=lam, rho=rho, B=B, L=L, mu=mu)
    assert b.delta_prime == eps / 2
    if math.isfinite(b.delta):
        assert B1 * b.delta + b.delta_prime <= eps * (1 + 1e-12)
        assert rho * b.delta < mu / 2  # strictly inside Lemma 3's radius
        assert theory.lemma2_iterations(kappa=kappa, distance=D, delta=b.delta) <= b.inner_iters
    assert theory.lemma2_iterations(kappa=kappa, distance=lam / mu * B, delta=eps / 2) <= b.cg_iters
    assert b.inner_grad_tol == pytest.approx(mu * b.delta)
    assert b.cg_atol == pytest.approx(mu * b.delta_prime / lam)


# ----------------------------------------------------------------------------- certify


def _check_certificate(task: Task, inner: int, cg_iters: int) -> tuple[float, theory.Certificate]:
    phi, g, info = layer_metagrad(task, nesterov_solver(task, inner), bl.CG(max_iter=cg_iters, rtol=0.0))
    err = float((g - task.g_star).norm())
    B = task.B if math.isfinite(task.B) else None
    cert = theory.certify(info, lam=task.lam, rho=task.rho, L=task.L, B=B)
    cert_measured = theory.certify(info, lam=task.lam, rho=task.rho, L=task.L)  # B from ||grad Lq(phi)||
    delta_true = float((phi - task.phi_star).norm())
    delta_prime_true = float((g - task.g_exact_at(phi)).norm())
    assert holds(delta_true, cert.delta)
    assert holds(delta_prime_true, cert.delta_prime)
    for c in (cert, cert_measured):
        if c.valid:
            assert holds(err, c.bound), (err, c)
        else:
            assert c.bound == math.inf and c.reason
    assert cert_measured.bound <= cert.bound or not cert.valid or math.isinf(cert_measured.bound)
    return err, cert


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=seeds, d=dims, lam=lams, inner=st.integers(0, 60), cg_iters=st.integers(0, 10))
def test_certify_never_underestimates_logistic(
    seed: int, d: int, lam: float, inner: int, cg_iters: int
) -> None:
    _check_certificate(logistic_task(seed, d, lam), inner, cg_iters)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=seeds, d=dims, lam=lams, inner=st.integers(0, 60), cg_iters=st.integers(0, 10))
def test_certify_never_underestimates_quadratic(
    seed: int, d: int, lam: float, inner: int, cg_iters: int
) -> None:
    _, cert = _check_certificate(quadratic_task(seed, d, lam), inner, cg_iters)
    assert cert.valid  # rho = 0: Lemma 3 applies at any distance


def test_certify_reports_inapplicable_lemma() -> None:
    # Large features: rho is large, and a start far from phi* puts delta outside mu / (2 rho).
    task = logistic_task(3, 5, 0.5, scale=20.0)
    _phi, _g, info = layer_metagrad(task, fixed_solver(task.theta + 10.0), bl.CG(max_iter=2, rtol=0.0))
    cert = theory.certify(info, lam=task.lam, rho=task.rho, L=task.L, B=task.B)
    assert not cert.valid
    assert cert.bound == math.inf
    assert "Lemma 3 does not apply" in cert.reason
    assert cert.delta >= task.mu / (2 * task.rho)


def test_certify_at_exact_solves_is_tiny() -> None:
    task = logistic_task(0, 6, 1.0)
    _, g, info = layer_metagrad(task, fixed_solver(task.phi_star), bl.CG())
    cert = theory.certify(info, lam=task.lam, rho=task.rho, L=task.L, B=task.B)
    assert cert.valid and cert.bound < 1e-9
    assert float((g - task.g_star).norm()) <= cert.bound + SLACK


def test_certify_flags_negative_curvature() -> None:
    bad = bl.LinearSolveResult(torch.zeros(3, dtype=D64), bl.LinearStatus.NEGATIVE_CURVATURE, 1, 2, 0.1, 1.0)
    info = bl.ImplicitInfo(residual_norm=1e-6, backward=[bad])
    cert = theory.certify(info, lam=1.0, rho=0.1, L=1.0, B=1.0)
    assert not cert.valid and cert.bound == math.inf and "positive definite" in cert.reason


def test_certify_from_uses_measured_gradient_norm() -> None:
    c1 = theory.certify_from(1e-3, 1e-4, lam=2.0, rho=0.5, L=1.0, B=10.0)
    c2 = theory.certify_from(1e-3, 1e-4, lam=2.0, rho=0.5, L=1.0, B=10.0, grad_norm=1.0)
    c3 = theory.certify_from(1e-3, 1e-4, lam=2.0, rho=0.5, L=1.0, grad_norm=1.0)
    delta, delta_prime = 1e-3 / 2.0, 2.0 * 1e-4 / 2.0
    assert (c1.delta, c1.delta_prime) == pytest.approx((delta, delta_prime))
    assert c1.bound == pytest.approx((2 * 2.0 * 0.5 * 10.0 / 4.0 + 2.0 * 1.0 / 2.0) * delta + delta_prime)
    assert c2.B == pytest.approx(1.0 + 1.0 * delta) and c2.bound < c1.bound
    assert c3 == c2
    c4 = theory.certify_from(1e-3, 1e-4, lam=2.0, rho=0.5, L=1.0, B=10.0, mu=1.0)
    assert c4.delta == pytest.approx(1e-3) and c4.bound > c1.bound


def test_certify_errors() -> None:
    with pytest.raises(ValueError, match="no backward solve yet"):
        theory.certify(bl.ImplicitInfo(residual_norm=0.0), lam=1.0, rho=0.0, L=1.0, B=1.0)
    with pytest.raises(TypeError, match="ImplicitInfo"):
        theory.certify({"residual_norm": 0.0}, lam=1.0, rho=0.0, L=1.0, B=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give B"):
        theory.certify_from(0.0, 0.0, lam=1.0, rho=0.0, L=1.0)
    with pytest.raises(ValueError, match=r"certify_from\(lam=0.0\)"):
        theory.certify_from(0.0, 0.0, lam=0.0, rho=0.0, L=1.0, B=1.0)
    for r_G, r_cg in ((math.inf, 0.0), (math.nan, 0.0), (0.0, math.nan)):
        c = theory.certify_from(r_G, r_cg, lam=1.0, rho=0.0, L=1.0, B=1.0)
        assert not c.valid and c.bound == math.inf and "non-finite" in c.reason


# ----------------------------------------------------------------------------- formulas and validation


def test_lemma3_bound_formula_and_radius() -> None:
    kw = dict(lam=2.0, rho=0.5, B=3.0, L=4.0, mu=1.0)
    B1 = 2 * 2.0 * 0.5 * 3.0 / 1.0 + 2.0 * 4.0 / 1.0
    assert theory.lemma3_constant(**kw) == pytest.approx(B1)
    assert theory.lemma3_bound(**kw, delta=0.1, delta_prime=0.01) == pytest.approx(B1 * 0.1 + 0.01)
    # mu / (2 rho) = 1.0: the lemma stops applying there, strictly.
    assert math.isfinite(theory.lemma3_bound(**kw, delta=0.999, delta_prime=0.0))
    with pytest.raises(ValueError, match=r"delta < mu / \(2 rho\) = 1"):
        theory.lemma3_bound(**kw, delta=1.0, delta_prime=0.0)
    # rho = 0 (quadratic support loss): any delta.
    assert theory.lemma3_bound(lam=1.0, rho=0.0, B=1.0, L=1.0, mu=1.0, delta=1e6, delta_prime=0.0) == 1e6


def test_theorem2_iterations_formula() -> None:
    kw = dict(kappa=10.0, D=2.0, B=1.5, L=3.0, rho=0.2, mu=0.5, lam=1.0, eps=1e-3)
    B1 = 2 * 1.0 * 0.2 * 1.5 / 0.25 + 1.0 * 3.0 / 0.5
    inner = math.ceil(2 * math.sqrt(10) * math.log(8 * 10 * 2.0 * (B1 / 1e-3 + 0.2 / 0.5)))
    cg = math.ceil(2 * math.sqrt(10) * math.log(4 * 10 * (1.0 / 0.5) * 1.5 / 1e-3))
    assert theory.theorem2_iterations(**kw) == (inner, cg)
    # Looser targets never cost more; a target met at the start costs nothing.
    looser = theory.theorem2_iterations(**{**kw, "eps": 1e-1})
    assert looser[0] <= inner and looser[1] <= cg
    assert theory.theorem2_iterations(**{**kw, "D": 0.0, "B": 0.0}) == (0, 0)
    assert theory.lemma2_iterations(kappa=4.0, distance=1.0, delta=8.0) == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: theory.lemma3_bound(lam=-1.0, rho=0, B=1, L=1, mu=1, delta=0, delta_prime=0), r"lam=-1.0"),
        (lambda: theory.lemma3_bound(lam=1, rho=0, B=1, L=1, mu=0.0, delta=0, delta_prime=0), r"mu=0.0"),
        (lambda: theory.lemma3_bound(lam=1, rho=0, B=1, L=1, mu=1, delta=-1.0, delta_prime=0), r"delta=-1.0"),
        (
            lambda: theory.lemma3_bound(lam=1, rho=math.nan, B=1, L=1, mu=1, delta=0, delta_prime=0),
            r"rho=nan",
        ),
        (
            lambda: theory.theorem2_iterations(kappa=0.5, D=1, B=1, L=1, rho=0, mu=1, lam=1, eps=1),
            r"kappa=0.5",
        ),
        (lambda: theory.theorem2_iterations(kappa=1, D=1, B=1, L=1, rho=0, mu=1, lam=1, eps=0.0), r"eps=0.0"),
        (lambda: theory.budget_for(1.0, kappa=1, D=math.inf, B=1, L=1, rho=0, mu=1, lam=1), r"D=inf"),
        (lambda: theory.lemma2_iterations(kappa=1.0, distance=1.0, delta=0.0), r"delta=0.0"),
        (lambda: theory.logistic_constants(torch.zeros(3)), r"2-D"),
    ],
)
def test_bad_arguments_raise(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_wrong_kind_of_argument_raises_type_error() -> None:
    with pytest.raises(TypeError, match="lam must be a real number"):
        theory.lemma3_constant(lam="1", rho=0, B=1, L=1, mu=1)  # type: ignore[arg-type]


def test_budget_cg_config() -> None:
    b = theory.budget_for(1e-4, kappa=5.0, D=1.0, B=1.0, L=1.0, rho=0.1, mu=1.0, lam=1.0)
    cg = b.cg()
    assert isinstance(cg, bl.CG)
    assert (cg.max_iter, cg.rtol, cg.atol) == (b.cg_iters, 0.0, b.cg_atol)


# ----------------------------------------------------------------------------- Appendix A


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=seeds, d=dims, lam=lams)
def test_fomaml_is_imaml_with_zero_cg_steps(seed: int, d: int, lam: float) -> None:
    """First-order MAML's g = grad Lq(phi) is iMAML with the linear solve left at its start g0 = v.

    iMAML's g solves (I + H/lam) g = v; the layer solves (H + lam I) w = v and returns
    g = lam w.  Zero CG steps from the warm start w0 = v / lam (i.e. g0 = v) return
    g = v, the FOMAML gradient; so does the order-0 Neumann series of (I + H/lam)^-1
    (``Neumann(max_iter=1, alpha=1/lam)`` from 0).  Zero CG steps from the default
    start 0 return g = 0 instead: "iMAML with 0 CG steps" means the warm start g0 = v.
    """
    task = logistic_task(seed, d, lam)
    phi = task.phi_star + 0.1 * unit(d, rng(seed + 3))  # any phi: the identity is algebraic
    v = task.grad_q(phi)  # FOMAML's task gradient
    _, g_cg0, _ = layer_metagrad(task, fixed_solver(phi), bl.CG(max_iter=0), backward_x0=v / lam)
    _, g_neu, _ = layer_metagrad(task, fixed_solver(phi), bl.Neumann(max_iter=1, alpha=1.0 / lam))
    _, g_zero, _ = layer_metagrad(task, fixed_solver(phi), bl.CG(max_iter=0))
    torch.testing.assert_close(g_cg0, v, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_neu, v, rtol=1e-12, atol=1e-15)
    assert float(g_zero.abs().max()) == 0.0


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=seeds, d=dims, lam=lams, ridge=st.floats(0.0, 1.0))
def test_reptile_direction_at_proximal_solution(seed: int, d: int, lam: float, ridge: float) -> None:
    """At phi* = Alg*(theta): theta - phi* = grad Lhat(phi*) / lam (stationarity of G)."""
    task = logistic_task(seed, d, lam, ridge=ridge)
    phi = bl.implicit_argmin(task.G, task.theta.clone(), task.theta, fixed_solver(task.phi_star))
    torch.testing.assert_close(task.theta - phi, task.grad_hat(phi) / lam, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- tightness


def test_bounds_are_not_vacuous() -> None:
    """Certified bound / true error on fixed tasks (the benchmark prints the full table).

    Moderately inexact solves (10 Nesterov steps, 3 CG steps).  The a-posteriori
    certificate, with B taken from the measured ||grad Lq(phi)||, overestimates the
    error by a bounded factor, not by orders of magnitude.
    """
    ratios = {"quadratic": [], "logistic": []}  # type: dict[str, list[float]]
    for seed in range(6):
        for kind, task in (
            ("quadratic", quadratic_task(seed, 8, 2.0)),
            ("logistic", logistic_task(seed, 8, 2.0)),
        ):
            _phi, g, info = layer_metagrad(task, nesterov_solver(task, 10), bl.CG(max_iter=3, rtol=0.0))
            cert = theory.certify(info, lam=task.lam, rho=task.rho, L=task.L)
            err = float((g - task.g_star).norm())
            assert cert.valid and holds(err, cert.bound)
            ratios[kind].append(cert.bound / err)
    for kind, rs in ratios.items():
        rs.sort()
        median = rs[len(rs) // 2]
        print(f"{kind}: certify bound / true error: median {median:.1f}, max {rs[-1]:.1f}")
        assert median < 50, (kind, rs)
