"""Shared test problems with known minimizers and hypergradients.

Each problem is an inner objective G(phi, theta), a starting point, the minimizer
(closed form, or a float64 reference computed here by dense Newton, independently
of `bilevel`), an outer loss L(phi) and the hypergradient d L(phi*(theta)) / d theta
(closed form, or the dense implicit-function formula at the reference).

======================  ============================================  =====================
problem                 G(phi, theta)                                 phi*(theta)
======================  ============================================  =====================
`quadratic`             1/2 phi'A phi + b'phi + lam/2 ||phi - theta||^2  (A + lam I)^-1 (lam theta - b)
`ridge`                 ||y - X w - c||^2 + alpha ||w||^2 (sklearn's)  normal equations
`logistic`              mean log(1 + exp(-s x'w)) + lam/2 ||w||^2       dense Newton (float64)
`rosenbrock`            (a - x0)^2 + 100 (x1 - x0^2)^2                   (a, a^2)
======================  ============================================  =====================

``mu`` and ``L`` are the extreme Hessian eigenvalues at phi* (global bounds for the
quadratic and ridge), so ||phi - phi*|| <= ||grad G(phi)|| / mu near phi*.
``hyper_lipschitz`` is ||d h / d phi|| at phi*, where h(phi) is the implicit
hypergradient formula evaluated at phi: the hypergradient computed at an inner
answer with ||grad G|| <= tol is therefore off by about hyper_lipschitz * tol / mu.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

TensorTree = torch.Tensor | tuple[torch.Tensor, ...]
D = torch.float64


@dataclasses.dataclass(frozen=True)
class Problem:
    """A test problem.

    Attributes:
        name: short id for test ids.
        objective: G(phi, theta) -> scalar.
        init: starting point (Tensor or tuple, like phi).
        theta: the outer variables (Tensor).
        solution: phi*(theta), float64 closed form or reference, structure of ``init``.
        outer: L(phi) -> scalar, the outer loss.
        hypergrad: d L(phi*(theta)) / d theta, shape of ``theta``.
        mu, L: smallest and largest Hessian eigenvalue of G at phi*.
        hyper_lipschitz: ||d h / d phi|| at phi* (see the module docstring).
        step: a safe gradient step, 1 / (a global bound on the Hessian's largest
            eigenvalue); NaN where none exists (Rosenbrock).
        convex: G(., theta) is convex everywhere.
    """

    name: str
    objective: Callable[[TensorTree, torch.Tensor], torch.Tensor]
    init: TensorTree
    theta: torch.Tensor
    solution: TensorTree
    outer: Callable[[TensorTree], torch.Tensor]
    hypergrad: torch.Tensor
    mu: float
    L: float
    step: float = math.nan
    convex: bool = True

    @functools.cached_property
    def hyper_lipschitz(self) -> float:
        """||d h / d phi|| at phi* (computed on first use: it costs a third derivative)."""
        return _hyper_lipschitz(self.objective, self.outer, self.solution, self.theta)

    @property
    def kappa(self) -> float:
        return self.L / self.mu

    def cast(self, dtype: torch.dtype) -> Problem:
        """The same problem with init and theta in ``dtype`` (references stay float64)."""

        def c(t: TensorTree) -> TensorTree:
            return t.to(dtype) if isinstance(t, torch.Tensor) else tuple(x.to(dtype) for x in t)

        return dataclasses.replace(self, init=c(self.init), theta=c(self.theta))  # type: ignore[arg-type]


# ------------------------------------------------------------------------ dense helpers


def _flat(t: TensorTree) -> torch.Tensor:
    return t.reshape(-1) if isinstance(t, torch.Tensor) else torch.cat([x.reshape(-1) for x in t])


def _unflat(v: torch.Tensor, like: TensorTree) -> TensorTree:
    if isinstance(like, torch.Tensor):
        return v.view_as(like)
    out, i = [], 0
    for x in like:
        out.append(v[i : i + x.numel()].view_as(x))
        i += x.numel()
    return tuple(out)


def dense_hypergrad(
    objective: Callable[[TensorTree, torch.Tensor], torch.Tensor],
    outer: Callable[[TensorTree], torch.Tensor],
    phi: TensorTree,
    theta: torch.Tensor,
) -> torch.Tensor:
    """-(d2G/dtheta dphi)' (d2G/dphi2)^-1 grad L(phi), with dense float64 matrices.

    Differentiable in ``phi`` (to measure how it varies near phi*).
    """
    p0 = _flat(phi)
    t0 = theta.reshape(-1)

    def g_of(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return objective(_unflat(p, phi), t.view_as(theta))

    H = torch.func.hessian(g_of, argnums=0)(p0, t0)
    M = torch.func.jacfwd(torch.func.grad(g_of, argnums=0), argnums=1)(p0, t0)  # (n, m)
    v = torch.func.grad(lambda p: outer(_unflat(p, phi)))(p0)
    return -(M.T @ torch.linalg.solve(H, v)).view_as(theta)


def _curvature(
    objective: Callable[..., torch.Tensor], phi: TensorTree, theta: torch.Tensor
) -> tuple[float, float]:
    p0 = _flat(phi)
    H = torch.func.hessian(lambda p: objective(_unflat(p, phi), theta))(p0)
    ev = torch.linalg.eigvalsh(H)
    return float(ev[0]), float(ev[-1])


def _hyper_lipschitz(
    objective: Callable[..., torch.Tensor],
    outer: Callable[..., torch.Tensor],
    phi: TensorTree,
    theta: torch.Tensor,
) -> float:
    p0 = _flat(phi)
    J = torch.func.jacrev(lambda p: dense_hypergrad(objective, outer, _unflat(p, phi), theta).reshape(-1))(p0)
    return float(torch.linalg.matrix_norm(J.reshape(-1, p0.numel()), ord=2))


def _finish(
    name: str,
    objective: Callable[..., torch.Tensor],
    init: TensorTree,
    theta: torch.Tensor,
    solution: TensorTree,
    outer: Callable[..., torch.Tensor],
    hypergrad: torch.Tensor,
    convex: bool = True,
    L_global: float | None = None,
) -> Problem:
    mu, L = _curvature(objective, solution, theta)
    step = math.nan if not convex else 1.0 / (L if L_global is None else L_global)
    return Problem(
        name=name,
        objective=objective,
        init=init,
        theta=theta,
        solution=solution,
        outer=outer,
        hypergrad=hypergrad,
        mu=mu,
        L=L,
        step=step,
        convex=convex,
    )


# ------------------------------------------------------------------------ the problems


def quadratic(n: int = 8, kappa: float = 10.0, lam: float = 0.5, seed: int = 0) -> Problem:
    """iMAML's synthetic problem (Appendix F.1): G = 1/2 phi'A phi + b'phi + lam/2 ||phi - theta||^2.

    The Hessian A + lam I has eigenvalues spread log-uniformly over [1, kappa].
    phi* = (A + lam I)^-1 (lam theta - b); with L(phi) = 1/2 ||phi - t||^2 the
    hypergradient is lam (A + lam I)^-1 (phi* - t) (Lemma 1).
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    ev = torch.logspace(0.0, math.log10(kappa), n, dtype=D) - lam
    A = Q @ torch.diag(ev) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(n, generator=g, dtype=D)
    theta = torch.randn(n, generator=g, dtype=D)
    target = torch.randn(n, generator=g, dtype=D)
    H = A + lam * torch.eye(n, dtype=D)

    def objective(phi: TensorTree, th: torch.Tensor) -> torch.Tensor:
        assert isinstance(phi, torch.Tensor)
        Ad, bd = A.to(phi.dtype), b.to(phi.dtype)
        return 0.5 * phi @ (Ad @ phi) + bd @ phi + 0.5 * lam * ((phi - th) ** 2).sum()

    def outer(phi: TensorTree) -> torch.Tensor:
        assert isinstance(phi, torch.Tensor)
        return 0.5 * ((phi - target.to(phi.dtype)) ** 2).sum()

    sol = torch.linalg.solve(H, lam * theta - b)
    hyper = lam * torch.linalg.solve(H, sol - target)
    return _finish(f"quadratic{int(kappa)}", objective, torch.zeros(n, dtype=D), theta, sol, outer, hyper)


def ridge(n: int = 30, d: int = 5, alpha: float = 3.0, seed: int = 1) -> Problem:
    """Ridge with an intercept, scikit-learn's scaling: G((w, c), alpha) = ||y - X w - c||^2 + alpha ||w||^2.

    With Xa = [X, 1] and P = diag(1, ..., 1, 0) (the intercept is not penalized):
    (w*, c*) = (Xa'Xa + alpha P)^-1 Xa'y and d(w*, c*)/d alpha = -(Xa'Xa + alpha P)^-1 P (w*, c*).
    Outer loss: validation squared error ||y_v - X_v w - c||^2.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    w_true = torch.randn(d, generator=g, dtype=D)
    y = X @ w_true + 0.7 + 0.3 * torch.randn(n, generator=g, dtype=D)
    Xv = torch.randn(n, d, generator=g, dtype=D)
    yv = Xv @ w_true + 0.7 + 0.3 * torch.randn(n, generator=g, dtype=D)
    Xa = torch.cat([X, torch.ones(n, 1, dtype=D)], dim=1)
    Xva = torch.cat([Xv, torch.ones(n, 1, dtype=D)], dim=1)
    P = torch.diag(torch.cat([torch.ones(d, dtype=D), torch.zeros(1, dtype=D)]))
    theta = torch.tensor(alpha, dtype=D)

    def objective(phi: TensorTree, th: torch.Tensor) -> torch.Tensor:
        w, c = phi
        r = y.to(w.dtype) - X.to(w.dtype) @ w - c
        return (r * r).sum() + th * (w * w).sum()

    def outer(phi: TensorTree) -> torch.Tensor:
        w, c = phi
        r = yv.to(w.dtype) - Xv.to(w.dtype) @ w - c
        return (r * r).sum()

    K = Xa.T @ Xa + alpha * P
    z = torch.linalg.solve(K, Xa.T @ y)
    dz = -torch.linalg.solve(K, P @ z)
    grad_outer = -2.0 * Xva.T @ (yv - Xva @ z)
    hyper = (grad_outer @ dz).reshape(())
    sol = (z[:d].clone(), z[d].clone())
    init = (torch.zeros(d, dtype=D), torch.zeros((), dtype=D))
    return _finish("ridge", objective, init, theta, sol, outer, hyper)


def logistic(n: int = 60, d: int = 6, lam: float = 0.05, scale: float = 1.0, seed: int = 2) -> Problem:
    """L2-regularized logistic regression: G(w, lam) = mean_i log(1 + exp(-s_i x_i'w)) + lam/2 ||w||^2.

    No closed form: w* is a float64 dense-Newton reference (gradient norm < 1e-14)
    and the hypergradient of the validation log-loss is the dense implicit formula
    -g_v' H^-1 w* at w* (d grad G / d lam = w).  ``scale`` spreads the feature
    scales, which raises the condition number.
    """
    g = torch.Generator().manual_seed(seed)
    cols = torch.logspace(0.0, math.log10(scale), d, dtype=D) if scale != 1.0 else torch.ones(d, dtype=D)
    X = torch.randn(n, d, generator=g, dtype=D) * cols
    w_true = torch.randn(d, generator=g, dtype=D) / cols
    s = torch.sign(X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=D))
    Xv = torch.randn(n, d, generator=g, dtype=D) * cols
    sv = torch.sign(Xv @ w_true + 0.5 * torch.randn(n, generator=g, dtype=D))
    theta = torch.tensor(lam, dtype=D)

    def objective(phi: TensorTree, th: torch.Tensor) -> torch.Tensor:
        assert isinstance(phi, torch.Tensor)
        return F.softplus(-s.to(phi.dtype) * (X.to(phi.dtype) @ phi)).mean() + 0.5 * th * (phi * phi).sum()

    def outer(phi: TensorTree) -> torch.Tensor:
        assert isinstance(phi, torch.Tensor)
        return F.softplus(-sv.to(phi.dtype) * (Xv.to(phi.dtype) @ phi)).mean()

    w = reference_newton(objective, torch.zeros(d, dtype=D), theta)
    hyper = dense_hypergrad(objective, outer, w, theta)
    # The log-loss has curvature at most 1/4, so 1/4 lambda_max(X'X)/n + lam bounds the Hessian.
    L_global = 0.25 * float(torch.linalg.eigvalsh(X.T @ X / n)[-1]) + lam
    return _finish(
        f"logistic{int(scale)}", objective, torch.zeros(d, dtype=D), theta, w, outer, hyper, L_global=L_global
    )


def rosenbrock(a: float = 1.5) -> Problem:
    """Rosenbrock's function: G(x, a) = (a - x0)^2 + 100 (x1 - x0^2)^2, from (-1.2, 1).

    x* = (a, a^2), so with L(x) = x0 + x1 the hypergradient is 1 + 2a.  Not convex:
    the Hessian is indefinite above the valley x1 = x0^2 + 0.005.
    """
    theta = torch.tensor(a, dtype=D)

    def objective(phi: TensorTree, th: torch.Tensor) -> torch.Tensor:
        assert isinstance(phi, torch.Tensor)
        return (th - phi[0]) ** 2 + 100.0 * (phi[1] - phi[0] ** 2) ** 2

    def outer(phi: TensorTree) -> torch.Tensor:
        assert isinstance(phi, torch.Tensor)
        return phi.sum()

    sol = torch.tensor([a, a * a], dtype=D)
    hyper = torch.tensor(1.0 + 2.0 * a, dtype=D)
    return _finish(
        "rosenbrock", objective, torch.tensor([-1.2, 1.0], dtype=D), theta, sol, outer, hyper, convex=False
    )


def reference_newton(
    objective: Callable[[TensorTree, torch.Tensor], torch.Tensor], init: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """Damped dense Newton in float64 (for convex problems): the reference minimizer."""
    x = init.clone()
    for _ in range(100):
        g = torch.func.grad(lambda p: objective(p, theta))(x)
        if float(g.norm()) < 1e-14:
            return x
        H = torch.func.hessian(lambda p: objective(p, theta))(x)
        step = torch.linalg.solve(H, g)
        t, f0 = 1.0, float(objective(x, theta))
        while float(objective(x - t * step, theta)) > f0 - 1e-4 * t * float(g @ step) and t > 1e-10:
            t *= 0.5
        x = x - t * step
    g = torch.func.grad(lambda p: objective(p, theta))(x)
    if float(g.norm()) > 1e-12:
        raise RuntimeError(f"reference_newton did not converge: ||grad|| = {float(g.norm()):.3e}")
    return x


def distance(a: TensorTree, b: TensorTree) -> float:
    """Euclidean distance between two trees (in float64)."""
    return float((_flat(a).double() - _flat(b).double()).norm())


def grad_norm(objective: Callable[..., torch.Tensor], phi: TensorTree, theta: torch.Tensor) -> float:
    """||grad_phi G(phi, theta)||, measured independently of the solvers (autograd)."""
    leaves = (phi,) if isinstance(phi, torch.Tensor) else phi
    ps = tuple(p.detach().requires_grad_(True) for p in leaves)
    with torch.enable_grad():
        f = objective(ps[0] if isinstance(phi, torch.Tensor) else ps, theta)
        gs = torch.autograd.grad(f, ps, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))  # type: ignore[arg-type]


def all_problems() -> list[Problem]:
    return [quadratic(), ridge(), logistic(), rosenbrock()]


@dataclasses.dataclass(frozen=True)
class BatchedQuadratic:
    """B independent iMAML quadratics G_b = 1/2 phi_b'A_b phi_b + c_b'phi_b + lam/2 ||phi_b - theta_b||^2.

    ``per_problem(phi, theta)`` returns the B losses; phi and theta have shape (B, n).
    Every Hessian A_b + lam I has largest eigenvalue ``L`` and problem b has condition
    number ``kappas[b]``, so one step size 1/L suits all and the better-conditioned
    problems converge first.  With the outer loss sum_b 1/2 ||phi_b - t_b||^2 the
    hypergradient is lam (A_b + lam I)^-1 (phi_b* - t_b).
    """

    A: torch.Tensor  # (B, n, n)
    c: torch.Tensor  # (B, n)
    lam: float
    theta: torch.Tensor  # (B, n)
    target: torch.Tensor  # (B, n)
    solution: torch.Tensor  # (B, n)
    hypergrad: torch.Tensor  # (B, n)
    L: float
    mu: torch.Tensor  # (B,)

    def per_problem(self, phi: TensorTree, theta: TensorTree) -> torch.Tensor:
        assert isinstance(phi, torch.Tensor) and isinstance(theta, torch.Tensor)
        A, c = self.A.to(phi.dtype), self.c.to(phi.dtype)
        quad = 0.5 * torch.einsum("bi,bij,bj->b", phi, A, phi)
        return quad + (c * phi).sum(1) + 0.5 * self.lam * ((phi - theta) ** 2).sum(1)

    def single(self, b: int) -> Callable[[TensorTree, TensorTree], torch.Tensor]:
        """The objective of problem b alone (phi and theta of shape (n,))."""
        A, c = self.A[b], self.c[b]

        def objective(phi: TensorTree, theta: TensorTree) -> torch.Tensor:
            assert isinstance(phi, torch.Tensor) and isinstance(theta, torch.Tensor)
            Ad, cd = A.to(phi.dtype), c.to(phi.dtype)
            return 0.5 * phi @ (Ad @ phi) + cd @ phi + 0.5 * self.lam * ((phi - theta) ** 2).sum()

        return objective

    def outer(self, phi: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((phi - self.target.to(phi.dtype)) ** 2).sum()


def batched_quadratic(
    kappas: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0),
    n: int = 6,
    L: float = 10.0,
    lam: float = 0.5,
    seed: int = 3,
) -> BatchedQuadratic:
    g = torch.Generator().manual_seed(seed)
    As, cs = [], []
    for kappa in kappas:
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
        ev = torch.logspace(math.log10(L / kappa), math.log10(L), n, dtype=D) - lam
        A = Q @ torch.diag(ev) @ Q.T
        As.append(0.5 * (A + A.T))
        cs.append(torch.randn(n, generator=g, dtype=D))
    A, c = torch.stack(As), torch.stack(cs)
    B = len(kappas)
    theta = torch.randn(B, n, generator=g, dtype=D)
    target = torch.randn(B, n, generator=g, dtype=D)
    H = A + lam * torch.eye(n, dtype=D)
    sol = torch.linalg.solve(H, lam * theta - c)
    hyper = lam * torch.linalg.solve(H, sol - target)
    return BatchedQuadratic(A, c, lam, theta, target, sol, hyper, L, torch.linalg.eigvalsh(H)[:, 0])
