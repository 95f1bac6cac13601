"""How tight are the iMAML error bounds?  Bound / true error on quadratic and logistic tasks.

For each task the exact meta-gradient g* = (I + Lhat''(phi*)/lam)^-1 grad L(phi*) is
computed in float64 (closed form for quadratic support losses, Newton for logistic
ones), and the layer's meta-gradient g (``bl.implicit_argmin`` with k Nesterov steps
and j CG steps) is compared with it.  Three tables:

1. Lemma 3 with the true delta = ||phi - phi*|| and delta' = ||g - g_exact(phi)||:
   bound / ||g - g*||.
2. `bilevel.theory.certify` (a posteriori, from the layer's measured residuals):
   bound / ||g - g*||, with B the global constant ("B given") and with B replaced by the
   measured ||grad L(phi)|| + L delta ("B measured"; quadratic query losses are not
   globally Lipschitz, so only this column applies to them).
3. Theorem 2: for a target eps, the budgets (inner Nesterov steps, CG steps), the
   achieved error, and the fewest steps that would have met the two sub-targets
   delta and delta' = eps / 2 of the proof.

Run:  python benchmarks/theory_tightness.py [--seeds 10]
Takes about 20 s on one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import bilevel as bl
from bilevel import theory
from bilevel._types import LinearSolver

D64 = torch.float64
Vec = torch.Tensor


@dataclasses.dataclass
class Task:
    """G = Lhat + lam/2 ||phi - theta||^2 with explicit derivatives, a query loss and constants."""

    name: str
    lam: float
    theta: Vec
    loss_hat: Callable[[Vec], Vec]
    grad_hat: Callable[[Vec], Vec]
    hess_hat: Callable[[Vec], Vec]
    loss_q: Callable[[Vec], Vec]
    grad_q: Callable[[Vec], Vec]
    smooth_hat: float
    rho: float
    B: float  # global Lipschitz constant of the query loss (inf if none)
    L: float
    phi_star: Vec = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        x = self.theta.clone()
        g_norm = float(self.grad_G(x).norm())
        for _ in range(50):  # damped Newton to rounding level
            step = torch.linalg.solve(self.hess_G(x), self.grad_G(x))
            t = 1.0
            while t > 1e-6 and float(self.grad_G(x - t * step).norm()) >= g_norm:
                t /= 2
            if t <= 1e-6:
                break
            x = x - t * step
            g_norm = float(self.grad_G(x).norm())
        self.phi_star = x

    @property
    def kappa(self) -> float:
        return (self.lam + self.smooth_hat) / self.lam

    def G(self, phi: Vec, theta: Vec) -> Vec:
        return self.loss_hat(phi) + 0.5 * self.lam * ((phi - theta) ** 2).sum()

    def grad_G(self, phi: Vec, theta: Vec | None = None) -> Vec:
        return self.grad_hat(phi) + self.lam * (phi - (self.theta if theta is None else theta))

    def hess_G(self, phi: Vec) -> Vec:
        return self.hess_hat(phi) + self.lam * torch.eye(phi.numel(), dtype=D64)

    def g_exact_at(self, phi: Vec) -> Vec:
        eye = torch.eye(phi.numel(), dtype=D64)
        return torch.linalg.solve(eye + self.hess_hat(phi) / self.lam, self.grad_q(phi))

    @property
    def g_star(self) -> Vec:
        return self.g_exact_at(self.phi_star)


def quadratic_task(seed: int, d: int = 50, lam: float = 5.0, kappa: float = 50.0) -> Task:
    """Appendix F.1 of the paper: Lhat = 1/2 phi'A phi + b'phi, lam = 5, kappa = 50, d = 50.

    Query loss 1/2 ||phi - c||^2_P (L = ||P||, not globally Lipschitz).
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    eig = torch.linspace(0.0, lam * (kappa - 1), d, dtype=D64)  # beta = lam kappa, mu = lam
    A = Q @ torch.diag(eig) @ Q.T
    P = torch.eye(d, dtype=D64) + torch.diag(torch.rand(d, generator=g, dtype=D64))
    b, c, theta = (torch.randn(d, generator=g, dtype=D64) for _ in range(3))
    return Task(
        name="quadratic (F.1)",
        lam=lam,
        theta=theta,
        loss_hat=lambda p: 0.5 * p @ A @ p + b @ p,
        grad_hat=lambda p: A @ p + b,
        hess_hat=lambda p: A,
        loss_q=lambda p: 0.5 * (p - c) @ P @ (p - c),
        grad_q=lambda p: P @ (p - c),
        smooth_hat=float(eig.max()),
        rho=0.0,
        B=math.inf,
        L=float(torch.linalg.matrix_norm(P, ord=2)),
    )


def _logistic(X: Vec, y: Vec) -> tuple[Callable[[Vec], Vec], Callable[[Vec], Vec], Callable[[Vec], Vec]]:
    n = X.shape[0]
    return (
        lambda w: F.softplus(-y * (X @ w)).mean(),
        lambda w: -(X.T @ (y * torch.sigmoid(-y * (X @ w)))) / n,
        lambda w: (X.T * (torch.sigmoid(X @ w) * torch.sigmoid(-(X @ w)))) @ X / n,
    )


def logistic_task(seed: int, d: int = 20, lam: float = 0.5, scale: float = 3.0) -> Task:
    """Logistic support (2d examples) and query (3d examples) losses, 20% label noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=D64)

    def data(n: int) -> tuple[Vec, Vec]:
        X = scale * torch.randn(n, d, generator=g, dtype=D64) / math.sqrt(d)
        flip = torch.rand(n, generator=g, dtype=D64) < 0.2
        return X, torch.where((X @ w > 0) ^ flip, 1.0, -1.0).to(D64)

    Xs, ys = data(2 * d)
    Xq, yq = data(3 * d)
    ls, gs, hs = _logistic(Xs, ys)
    lq, gq, _ = _logistic(Xq, yq)
    cs, cq = theory.logistic_constants(Xs), theory.logistic_constants(Xq)
    return Task(
        name=f"logistic (lam={lam:g})",
        lam=lam,
        theta=torch.randn(d, generator=g, dtype=D64),
        loss_hat=ls,
        grad_hat=gs,
        hess_hat=hs,
        loss_q=lq,
        grad_q=gq,
        smooth_hat=cs.smoothness,
        rho=cs.hessian_lipschitz,
        B=cq.lipschitz,
        L=cq.smoothness,
    )


def nesterov_path(task: Task, x0: Vec, iters: int) -> list[Vec]:
    """Iterates x_0..x_iters of Lemma 2's scheme: step 1/beta, momentum (sqrt k - 1)/(sqrt k + 1)."""
    beta, q = task.lam + task.smooth_hat, math.sqrt(task.kappa)
    m = (q - 1) / (q + 1)
    xs = [x0.clone()]
    x_prev = x = x0.clone()
    for _ in range(iters):
        y = x + m * (x - x_prev)
        x_prev, x = x, y - task.grad_G(y) / beta
        xs.append(x)
    return xs


def layer(
    task: Task, phi: Vec, cg_iters: int | None, linear_solver: LinearSolver | None = None
) -> tuple[Vec, bl.ImplicitInfo]:
    """The layer's meta-gradient at a given phi with ``cg_iters`` CG steps from 0 (None: exact).

    The exact solve is `DenseSolve`: CG with rtol=0 run far past convergence can stop
    on a spurious NEGATIVE_CURVATURE once its recursive residual underflows.
    """
    lin: LinearSolver = bl.DenseSolve() if cg_iters is None else bl.CG(max_iter=cg_iters, rtol=0.0)
    if linear_solver is not None:
        lin = linear_solver
    theta = task.theta.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bl.BilevelWarning)  # inexact on purpose
        out, info = bl.implicit_argmin(
            task.G,
            task.theta.clone(),
            theta,
            lambda obj, init, th: phi.clone(),
            hvp=bl.ReverseOverReverse(),
            linear_solver=lin,
            optimality_tol=None,
            throw=False,
            return_info=True,
        )
        task.loss_q(out).backward()
    assert theta.grad is not None
    return theta.grad, info


def summarize(xs: list[float]) -> str:
    return f"{statistics.median(xs):9.3g} [{min(xs):.3g}, {max(xs):.3g}]"


def tightness(families: list[Family]) -> None:
    print("## Lemma 3 and certify: bound / true error, median [min, max] over tasks\n")
    print(
        "Lemma 3 uses the true delta = ||phi - phi*|| and delta' = ||g - g_exact(phi)|| and the global B; "
        "certify uses only the layer's residuals, with the global B or with B measured "
        "(||grad L(phi)|| + L delta). Rows whose error is at rounding level are left out.\n"
    )
    print(
        "| task | Nesterov steps | CG steps | true error (median) | Lemma 3 (true delta, delta') "
        "| certify, global B | certify, B measured | Lemma 3 applies |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fam in families:
        for k in fam.inner_steps:
            for j in fam.cg_steps:
                errs, r3, rc, rm = [], [], [], []
                n_valid = 0
                for t in fam.tasks:
                    phi = nesterov_path(t, t.theta, k)[-1]
                    g, info = layer(t, phi, j)
                    err = float((g - t.g_star).norm())
                    delta = float((phi - t.phi_star).norm())
                    delta_p = float((g - t.g_exact_at(phi)).norm())
                    B = t.B if math.isfinite(t.B) else float(t.grad_q(t.phi_star).norm())  # rho = 0: unused
                    cert_m = theory.certify(info, lam=t.lam, rho=t.rho, L=t.L)
                    if not cert_m.valid or err < 1e-12:
                        continue
                    n_valid += 1
                    errs.append(err)
                    r3.append(
                        theory.lemma3_bound(
                            lam=t.lam, rho=t.rho, B=B, L=t.L, mu=t.lam, delta=delta, delta_prime=delta_p
                        )
                        / err
                    )
                    rm.append(cert_m.bound / err)
                    if math.isfinite(t.B):
                        # grad_norm left out: the global B alone.
                        res = info.last_backward
                        assert res is not None
                        cert_g = theory.certify_from(
                            info.residual_norm, res.residual_norm, lam=t.lam, rho=t.rho, L=t.L, B=t.B
                        )
                        if cert_g.valid:
                            rc.append(cert_g.bound / err)
                j_name = "exact" if j is None else str(j)
                if not errs:
                    print(f"| {fam.name} | {k} | {j_name} | - | - | - | - | 0/{len(fam.tasks)} |")
                    continue
                given = summarize(rc) if rc else "n/a (no global B)"
                print(
                    f"| {fam.name} | {k} | {j_name} | {statistics.median(errs):.2e} | {summarize(r3)} "
                    f"| {given} | {summarize(rm)} | {n_valid}/{len(fam.tasks)} |"
                )
    print()


def theorem2(families: list[Family]) -> None:
    print("## Theorem 2: budgets vs. what was needed (median over tasks)\n")
    print(
        "inner needed: fewest Nesterov steps reaching the proof's delta = min(eps / (2 B1), mu / (4 rho)); "
        "CG needed: fewest CG steps reaching delta' = eps / 2; Budget.cg() stops once its residual "
        "certifies delta'. Error: ||g - g*|| with the full inner budget and Budget.cg().\n"
    )
    print(
        "| task | eps | inner budget | inner needed | CG budget | CG needed | CG run by Budget.cg() | error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fam in families:
        for eps in (1e-2, 1e-4, 1e-6):
            rows = []
            for t in fam.tasks:
                D = float((t.theta - t.phi_star).norm())  # start at theta
                B = t.B
                if not math.isfinite(B):
                    # rho = 0: delta = eps / (2 B1) does not involve B; bound ||grad L|| within delta.
                    B1 = theory.lemma3_constant(lam=t.lam, rho=0.0, B=0.0, L=t.L, mu=t.lam)
                    B = float(t.grad_q(t.phi_star).norm()) + t.L * eps / (2 * B1)
                bud = theory.budget_for(eps, kappa=t.kappa, D=D, B=B, L=t.L, rho=t.rho, mu=t.lam, lam=t.lam)
                path = nesterov_path(t, t.theta, bud.inner_iters)
                phi = path[-1]
                g, info = layer(t, phi, bud.cg_iters, bud.cg())
                assert info.last_backward is not None
                err = float((g - t.g_star).norm())
                assert err <= eps, (fam.name, eps, err)
                need_inner = next(
                    i for i, x in enumerate(path) if float((x - t.phi_star).norm()) <= bud.delta
                )
                target = t.g_exact_at(phi)
                need_cg = next(
                    j
                    for j in range(bud.cg_iters + 1)
                    if float((layer(t, phi, j)[0] - target).norm()) <= bud.delta_prime
                )
                rows.append(
                    (bud.inner_iters, need_inner, bud.cg_iters, need_cg, info.last_backward.n_iter, err)
                )
            med = [statistics.median(r[i] for r in rows) for i in range(6)]
            print(
                f"| {fam.name} | {eps:g} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.0f} | {med[3]:.0f} | "
                f"{med[4]:.0f} | {med[5]:.1e} |"
            )
    print()


@dataclasses.dataclass
class Family:
    name: str
    tasks: list[Task]
    inner_steps: tuple[int, ...]
    cg_steps: tuple[int | None, ...]  # None: exact solve


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="tasks per problem family")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    families = [
        Family("quadratic F.1 (d=50, lam=5)", [quadratic_task(s) for s in seeds], (5, 20, 80), (2, 5, None)),
        Family(
            "logistic (d=20, lam=0.5)", [logistic_task(s, lam=0.5) for s in seeds], (2, 4, 8), (1, 3, None)
        ),
        Family(
            "logistic (d=20, lam=0.05)",
            [logistic_task(s, lam=0.05) for s in seeds],
            (10, 20, 40),
            (2, 5, None),
        ),
    ]
    for fam in families:
        t = fam.tasks[0]
        radius = math.inf if t.rho == 0 else t.lam / (2 * t.rho)
        print(
            f"{fam.name}: kappa = {t.kappa:.3g}, rho = {t.rho:.3g}, mu / (2 rho) = {radius:.3g}, "
            f"B = {t.B:.3g}, L = {t.L:.3g}  (first task)"
        )
    print()
    tightness(families)
    theorem2(families)


if __name__ == "__main__":
    main()
