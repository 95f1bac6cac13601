"""Lasso and elastic-net penalties tuned by hypergradient on scikit-learn's diabetes data.

Data: ``sklearn.datasets.load_diabetes()`` (442 patients, 10 features; bundled with
scikit-learn, no download), split once with a fixed seed into train / validation / test
(50% / 25% / 25%); features and target standardized with the training split's statistics.

Inner problem (training), an elastic net (the lasso when ``--lasso``):

    w*(theta) = argmin_w  1/(2m) ||X w - y||^2 + l2/2 ||w||^2 + l1 ||w||_1,
    (l1, l2) = exp(theta),

solved by FISTA with adaptive restart written below in torch (``--solver fista``) or by
scikit-learn's coordinate descent as a black box (``--solver sklearn``).  The l1 term is
not differentiable, so grad_w = 0 does not hold at w*; the hypergradient comes from the
proximal-gradient fixed point

    w = prox_{eta l1 ||.||_1}(w - eta grad_w f(w, theta))      (soft-thresholding),

named as ``bilevel.conditions.ProximalFixedPoint`` with the soft-threshold written in
torch.  On the support A of w*, differentiating it gives the closed form
dw_A/dtheta = -(X_A'X_A/m + l2 I)^-1 (l1 sign(w_A), l2 w_A); off the support dw/dtheta = 0:
the hypergradient lives on the active set.

Outer problem: the validation mean squared error, minimized over theta by Adam.  At the
start and at the end the hypergradient is compared with central finite differences of a
float64 re-solve (printed as the relative difference) and with the closed form.

    python examples/lasso_hyperparameter.py                  # elastic net, FISTA, ~2 s
    python examples/lasso_hyperparameter.py --solver sklearn --lasso
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

import bilevel as bl
from bilevel.conditions import ProximalFixedPoint

D = torch.float64


@dataclasses.dataclass(frozen=True)
class Data:
    X: torch.Tensor  # (m, d), standardized
    y: torch.Tensor  # (m,), standardized


def load(seed: int = 0) -> tuple[Data, Data, Data]:
    """Diabetes, shuffled with ``seed`` and split 50/25/25, standardized with the train split."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    return split(X, y, seed)


def split(X: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[Data, Data, Data]:
    """Shuffle with ``seed``, split 50/25/25, standardize features and target with the train split.

    Any per-feature affine scaling of X (scikit-learn's scaled or raw diabetes) gives the
    same splits up to rounding."""
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order], y[order]
    a, b = len(y) // 2, 3 * len(y) // 4
    mu, sd, ym, ys = X[:a].mean(0), X[:a].std(0), y[:a].mean(), y[:a].std()

    def part(i: slice) -> Data:
        return Data(torch.tensor((X[i] - mu) / sd, dtype=D), torch.tensor((y[i] - ym) / ys, dtype=D))

    return part(slice(0, a)), part(slice(a, b)), part(slice(b, None))


def penalties(theta: torch.Tensor, lasso: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(l1, l2) = exp(theta); the lasso has l2 = 0 (theta[1] then unused)."""
    l1 = theta[0].exp()
    return l1, (torch.zeros_like(l1) if lasso else theta[1].exp())


def smooth_part(train: Data, lasso: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """f(w, theta) = 1/(2m) ||Xw - y||^2 + l2/2 ||w||^2: the differentiable part of the objective."""

    def f(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        _, l2 = penalties(theta, lasso)
        return 0.5 * ((train.X @ w - train.y) ** 2).mean() + 0.5 * l2 * (w**2).sum()

    return f


def soft_threshold(y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """prox of tau ||.||_1: sign(y) max(|y| - tau, 0), differentiable by autograd off the kinks."""
    return torch.sign(y) * (y.abs() - tau).clamp_min(0.0)


def condition(train: Data, lasso: bool) -> ProximalFixedPoint:
    """The proximal-gradient fixed point with step 1/L of the smooth part's l2 = 0 bound.

    Any step > 0 has the same fixed points; 1/L keeps the backward system well scaled."""
    lipschitz = float(torch.linalg.matrix_norm(train.X, ord=2) ** 2) / train.X.shape[0]
    return ProximalFixedPoint(
        lambda y, step, th: soft_threshold(y, step * penalties(th, lasso)[0]), step=1.0 / lipschitz
    )


@dataclasses.dataclass(frozen=True)
class Fista:
    """FISTA with adaptive (gradient) restart on f + l1 ||.||_1, stopping on the fixed-point residual.

    Attributes:
        train: the training data (f is rebuilt from it).
        lasso: l2 = 0.
        tol: stop when ||w - prox(w - eta grad f(w))|| / eta <= tol.
        max_iter: iteration budget.
    """

    train: Data
    lasso: bool
    tol: float = 1e-12
    max_iter: int = 20_000

    def __call__(self, objective: object, init: torch.Tensor, theta: torch.Tensor) -> bl.SolverResult:
        X, y, m = self.train.X, self.train.y, self.train.X.shape[0]
        l1, l2 = (float(v) for v in penalties(theta.detach(), self.lasso))
        step = 1.0 / (float(torch.linalg.matrix_norm(X, ord=2) ** 2) / m + l2)
        w = z = init.clone()
        t = 1.0
        for k in range(1, self.max_iter + 1):
            grad = X.T @ (X @ z - y) / m + l2 * z
            w_new = soft_threshold(z - step * grad, torch.tensor(step * l1, dtype=D))
            gap = float(torch.linalg.vector_norm(w_new - z)) / step
            if gap <= self.tol:
                return bl.SolverResult(x=w_new, status=bl.SolverStatus.CONVERGED, n_iter=k, grad_norm=gap)
            # restart the momentum when it points uphill (O'Donoghue & Candes 2015)
            if float((z - w_new) @ (w_new - w)) > 0.0:
                t = 1.0
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            z = w_new + ((t - 1.0) / t_new) * (w_new - w)
            w, t = w_new, t_new
        return bl.SolverResult(x=w, status=bl.SolverStatus.MAX_ITER, n_iter=self.max_iter, grad_norm=gap)


@dataclasses.dataclass(frozen=True)
class SklearnElasticNet:
    """scikit-learn's coordinate descent (``Lasso`` / ``ElasticNet``) as a black box in float64."""

    train: Data
    lasso: bool

    def __call__(self, objective: object, init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        from sklearn.linear_model import ElasticNet, Lasso

        l1, l2 = (float(v) for v in penalties(theta.detach(), self.lasso))
        kw = dict(fit_intercept=False, tol=1e-14, max_iter=200_000)
        model = (
            Lasso(alpha=l1, **kw) if self.lasso else ElasticNet(alpha=l1 + l2, l1_ratio=l1 / (l1 + l2), **kw)
        )
        model.fit(self.train.X.numpy(), self.train.y.numpy())
        return torch.tensor(model.coef_, dtype=D)


def mse(w: torch.Tensor, data: Data) -> torch.Tensor:
    return ((data.X @ w - data.y) ** 2).mean()


@dataclasses.dataclass(frozen=True)
class Check:
    """The hypergradient at one theta against two independent references."""

    theta: list[float]
    hypergradient: list[float]
    finite_difference: list[float]
    closed_form: list[float]
    support: int
    rel_fd: float  # max relative difference to the finite differences
    rel_closed: float  # ... to the closed form on the active set


@dataclasses.dataclass(frozen=True)
class Report:
    val_mse: list[float]  # per outer step (before the step)
    thetas: list[list[float]]
    first: Check
    last: Check
    test_mse: float


class Tuner:
    """The bilevel problem: one solver, the condition, train and validation data."""

    def __init__(self, train: Data, val: Data, lasso: bool, solver: str) -> None:
        self.train, self.val, self.lasso = train, val, lasso
        self.f = smooth_part(train, lasso)
        self.cond = condition(train, lasso)
        self.solver: Callable[..., object] = (
            Fista(train, lasso) if solver == "fista" else SklearnElasticNet(train, lasso)
        )
        self.d = train.X.shape[1]

    def solve(self, theta: torch.Tensor) -> torch.Tensor:
        """w*(theta), differentiable in theta through the proximal fixed point."""
        return bl.implicit_argmin(
            self.f, torch.zeros(self.d, dtype=D), theta, self.solver, condition=self.cond, optimality_tol=1e-6
        )

    def resolve(self, theta: torch.Tensor) -> torch.Tensor:
        """w*(theta) by the solver alone (for finite differences)."""
        out = self.solver(self.f, torch.zeros(self.d, dtype=D), theta)
        return out.x if isinstance(out, bl.SolverResult) else out  # type: ignore[return-value]

    def check(self, theta_now: torch.Tensor, eps: float = 1e-6) -> Check:
        theta0 = theta_now.detach()
        theta = theta0.clone().requires_grad_(True)
        w = self.solve(theta)
        (g,) = torch.autograd.grad(mse(w, self.val), theta)
        k = 1 if self.lasso else 2
        fd = torch.zeros(k, dtype=D)
        for i in range(k):
            e = torch.zeros_like(theta0)
            e[i] = eps
            fd[i] = (mse(self.resolve(theta0 + e), self.val) - mse(self.resolve(theta0 - e), self.val)) / (
                2 * eps
            )
        # closed form on the support A: dw_A/dtheta = -(X_A'X_A/m + l2 I)^-1 (l1 s_A, l2 w_A)
        wd = w.detach()
        a = wd.abs() > 0
        l1, l2 = penalties(theta0, self.lasso)
        XA = self.train.X[:, a]
        M = XA.T @ XA / XA.shape[0] + l2 * torch.eye(int(a.sum()), dtype=D)
        v = 2.0 * self.val.X[:, a].T @ (self.val.X @ wd - self.val.y) / self.val.X.shape[0]
        u = torch.linalg.solve(M, v)
        closed = torch.stack([-(u @ (l1 * torch.sign(wd[a]))), -(u @ (l2 * wd[a]))])[:k]
        gk = g[:k]
        return Check(
            theta=theta0.tolist(),
            hypergradient=gk.tolist(),
            finite_difference=fd.tolist(),
            closed_form=closed.tolist(),
            support=int(a.sum()),
            rel_fd=float((gk - fd).abs().max() / fd.abs().max()),
            rel_closed=float((gk - closed).abs().max() / closed.abs().max()),
        )


def run(
    steps: int = 30, lr: float = 0.2, lasso: bool = False, solver: str = "fista", seed: int = 0
) -> Report:
    """Tune theta = log(l1, l2) by Adam on the validation MSE; check the first and last hypergradient."""
    train, val, test = load(seed)
    tuner = Tuner(train, val, lasso, solver)
    theta = torch.tensor([math.log(0.3), math.log(0.1)], dtype=D, requires_grad=True)
    first = tuner.check(theta)
    opt = torch.optim.Adam([theta], lr=lr)
    losses, thetas = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = mse(tuner.solve(theta), val)
        loss.backward()
        if lasso:
            theta.grad[1] = 0.0  # type: ignore[index]  # l2 is fixed at 0: theta[1] is unused
        losses.append(float(loss.detach()))
        thetas.append(theta.detach().tolist())
        opt.step()
    last = tuner.check(theta)
    with torch.no_grad():
        test_mse = float(mse(tuner.resolve(theta.detach()), test))
    return Report(losses, thetas, first, last, test_mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--lasso", action="store_true", help="l2 = 0: tune the lasso's l1 only")
    ap.add_argument("--solver", choices=["fista", "sklearn"], default="fista")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rep = run(args.steps, args.lr, args.lasso, args.solver, args.seed)
    kind = "lasso" if args.lasso else "elastic net"
    print(f"{kind} on diabetes, inner solver {args.solver}, {args.steps} Adam steps on log(l1, l2)")
    for name, c in (("start", rep.first), ("end", rep.last)):
        l1, l2 = math.exp(c.theta[0]), (0.0 if args.lasso else math.exp(c.theta[1]))
        print(
            f"  {name}: l1 = {l1:.4g}, l2 = {l2:.4g}, support {c.support}/10, hypergradient "
            f"{[f'{x:.6e}' for x in c.hypergradient]}"
        )
        print(
            f"         finite differences {[f'{x:.6e}' for x in c.finite_difference]} "
            f"(max rel. diff {c.rel_fd:.1e}); closed form on the support: max rel. diff {c.rel_closed:.1e}"
        )
    print(
        f"  validation MSE {rep.val_mse[0]:.5f} -> {rep.val_mse[-1]:.5f}; "
        f"test MSE at the end {rep.test_mse:.5f}"
    )


if __name__ == "__main__":
    main()
