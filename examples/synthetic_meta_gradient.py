"""Figure 2a of iMAML: meta-gradient accuracy against inner GD steps (Appendix F.1).

Each task is a linear regression in R^50 (Appendix F.1 of Rajeswaran et al. 2019):

    support loss  Lhat_i(phi) = 1/2 phi' A_i phi + phi' b_i,   A_i = E[x x'],  b_i = -E[x y]
    query loss    L_i(phi)    = 1/(2 n_q) ||X_q phi - y_q||^2   (n_q sampled query points)
    inner problem G_i(phi, theta) = Lhat_i(phi) + lam/2 ||phi - theta||^2,   lam = 5
    Alg*_i(theta) = (A_i + lam I)^-1 (lam theta - b_i)
    exact meta-gradient  g*_i = lam (A_i + lam I)^-1 grad L_i(Alg*_i(theta))

The inputs of task i are x ~ N(0, A_i) and the targets y = w_i' x + noise, with true weights
w_i ~ N(0, I); the support loss is the expected squared error (so A_i, b_i = -A_i w_i are the
population moments) and the query loss the empirical one on ``n_query`` samples.

**Which matrix has kappa = 50.** The Hessian of the inner problem, A_i + lam I, has condition
number beta / mu = 50 (the kappa of the paper's analysis: G_i is beta-smooth and mu-strongly
convex).  Its eigenvalues are mu * 50^(j/4), j = 0..4, with mu = lam + 1 = 6, each of
multiplicity 10, in a random basis per task: the features come in 5 bands of 10 with
different scales (like Fourier features in 5 frequency bands), so A_i itself has eigenvalues
1 ... 295.  Five distinct eigenvalues are what lets CG on (I + A_i/lam) g = v finish in 5
steps; this is the regime of the paper's "the terminal error vanishes with 5 CG steps".  With a
continuous spectrum of the same condition number (``--spectrum continuous``: 50 eigenvalues
log-spaced), 5 CG steps leave an error of about 0.3 however many GD steps are taken.

Meta-gradients compared (inner solver: K steps of GD on G_i from phi_0 = theta, step 1/beta):

* ``maml``: backpropagation through the K GD steps (autograd in float64, second order).
* ``imaml-cg2``, ``imaml-cg5``: `bilevel.implicit_argmin` at the inner answer phi_K, with
  ``bilevel.CG(max_iter=c, rtol=0)`` from 0 as the backward solver: c CG steps on
  (A_i + lam I) w = grad L_i(phi_K), g = lam w.  CG's iterates are invariant to scaling the
  matrix, so this is exactly the paper's c CG steps on (I + A_i/lam) g = grad L_i started from 0
  (the meta-learning engine's `Implicit` starts from grad L_i by default; the paper starts from
  0, and so do we here).  phi_K comes from `bilevel.solvers.GradientDescent` run once on all
  tasks (`inner_path`) and is handed to the layer by a `Precomputed` solver: the layer only
  needs the answer, so one GD run serves both CG budgets.
* ``fomaml``: grad L_i(phi_K), the same inner solve taken as the meta-gradient.

Reported: ||g - g*|| / ||g*|| averaged over tasks, in float64.

Run:
    python examples/synthetic_meta_gradient.py --out results/fig2 [--quick]
writes ``fig2a.csv`` (columns ``method,inner_steps,rel_error``) and ``fig2a.png``.
About 10 s with the defaults on one core, 5 s with ``--quick`` (plus imports).

References:
    Rajeswaran, Finn, Kakade, Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019,
    Figure 2a and Appendix F.1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

import bilevel as bl
from bilevel.solvers import GradientDescent

D64 = torch.float64
METHODS = ("maml", "imaml-cg2", "imaml-cg5", "fomaml")
FULL_STEPS = (1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, 200, 300, 500, 700, 1000)
QUICK_STEPS = (1, 3, 10, 30, 100, 300, 1000)


@dataclasses.dataclass(frozen=True)
class RegressionTask:
    """One linear-regression task of Appendix F.1 (float64 throughout).

    Attributes:
        A: (d, d) support second moment E[x x'], symmetric positive definite.
        b: (d,) support term -E[x y].
        Xq: (n_q, d) query inputs.
        yq: (n_q,) query targets.
    """

    A: torch.Tensor
    b: torch.Tensor
    Xq: torch.Tensor
    yq: torch.Tensor

    def support_loss(self, phi: torch.Tensor) -> torch.Tensor:
        return 0.5 * phi @ (self.A @ phi) + phi @ self.b

    def query_loss(self, phi: torch.Tensor) -> torch.Tensor:
        r = self.Xq @ phi - self.yq
        return 0.5 * (r @ r) / self.yq.numel()

    def query_grad(self, phi: torch.Tensor) -> torch.Tensor:
        return self.Xq.T @ (self.Xq @ phi - self.yq) / self.yq.numel()

    def inner_objective(self, lam: float) -> bl.Objective:
        """G(phi, theta) = Lhat(phi) + lam/2 ||phi - theta||^2."""

        def G(phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            return self.support_loss(phi) + 0.5 * lam * ((phi - theta) ** 2).sum()

        return G

    def inner_grad(self, phi: torch.Tensor, theta: torch.Tensor, lam: float) -> torch.Tensor:
        """grad_phi G(phi, theta) = A phi + b + lam (phi - theta)."""
        return self.A @ phi + self.b + lam * (phi - theta)

    def hessian(self, lam: float) -> torch.Tensor:
        return self.A + lam * torch.eye(self.A.shape[0], dtype=self.A.dtype)

    def exact_meta_gradient(self, theta: torch.Tensor, lam: float) -> torch.Tensor:
        """lam (A + lam I)^-1 grad L(Alg*(theta)), Alg*(theta) = (A + lam I)^-1 (lam theta - b)."""
        H = self.hessian(lam)
        phi_star = torch.linalg.solve(H, lam * theta - self.b)
        return lam * torch.linalg.solve(H, self.query_grad(phi_star))


def hessian_spectrum(dim: int, lam: float, kappa: float, spectrum: str, bands: int = 5) -> torch.Tensor:
    """Eigenvalues of A + lam I: from mu = lam + 1 to kappa * mu.

    ``"bands"``: ``bands`` distinct values mu * kappa^(j / (bands - 1)), each repeated
    ``dim / bands`` times; ``"continuous"``: ``dim`` values log-spaced over the same range.
    """
    mu = lam + 1.0  # A positive definite: its smallest eigenvalue is 1
    if spectrum == "bands":
        if dim % bands:
            raise ValueError(f"hessian_spectrum: dim={dim} must be a multiple of bands={bands}")
        levels = mu * kappa ** (torch.arange(bands, dtype=D64) / (bands - 1))
        return levels.repeat_interleave(dim // bands)
    if spectrum == "continuous":
        return mu * kappa ** torch.linspace(0.0, 1.0, dim, dtype=D64)
    raise ValueError(f"hessian_spectrum(spectrum={spectrum!r}): choose 'bands' or 'continuous'")


def make_tasks(
    n_tasks: int,
    *,
    dim: int = 50,
    lam: float = 5.0,
    kappa: float = 50.0,
    n_query: int = 100,
    noise: float = 0.1,
    spectrum: str = "bands",
    seed: int = 0,
) -> list[RegressionTask]:
    """Draw tasks as described in the module docstring (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    a = hessian_spectrum(dim, lam, kappa, spectrum) - lam
    tasks = []
    for _ in range(n_tasks):
        Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=D64))
        A = (Q * a) @ Q.T
        A = 0.5 * (A + A.T)
        w = torch.randn(dim, generator=g, dtype=D64)
        Xq = torch.randn(n_query, dim, generator=g, dtype=D64) @ (Q * a.sqrt()).T  # x ~ N(0, A)
        yq = Xq @ w + noise * torch.randn(n_query, generator=g, dtype=D64)
        tasks.append(RegressionTask(A=A, b=-(A @ w), Xq=Xq, yq=yq))
    return tasks


def maml_gradient(
    task: RegressionTask, theta: torch.Tensor, lam: float, steps: int, lr: float
) -> torch.Tensor:
    """d/dtheta L(phi_K(theta)) by backpropagation through K GD steps on G (MAML).

    Autograd records the GD loop phi <- phi - lr * grad_phi G(phi, theta) from phi_0 = theta;
    grad_phi G = A phi + b + lam (phi - theta) is written out, so the backward pass through each
    step is the Hessian-vector product that MAML pays for.
    """
    th = theta.detach().clone().requires_grad_(True)
    phi = th
    for _ in range(steps):
        phi = phi - lr * task.inner_grad(phi, th, lam)
    (g,) = torch.autograd.grad(task.query_loss(phi), th)
    return g


def inner_path(
    tasks: Sequence[RegressionTask], theta: torch.Tensor, lam: float, lr: float, steps: Sequence[int]
) -> dict[int, torch.Tensor]:
    """phi_K of every task for every K: `GradientDescent` on all tasks at once (batched mode).

    Fixed-step GD is a Markov iteration, so phi_K2 is GD continued for K2 - K1 steps from phi_K1:
    the solver runs max(steps) steps in all, not sum(steps).

    Returns:
        ``{K: phi_K}`` with ``phi_K`` of shape (tasks, d).
    """
    A = torch.stack([t.A for t in tasks])
    b = torch.stack([t.b for t in tasks])

    def G(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B,)
        quad = (phi * (A @ phi.unsqueeze(-1)).squeeze(-1)).sum(1)
        return 0.5 * quad + (phi * b).sum(1) + 0.5 * lam * ((phi - th) ** 2).sum(1)

    phi = theta.expand(len(tasks), -1).clone()
    done = 0
    path = {}
    for k in sorted(steps):
        if k > done:
            res = GradientDescent(lr=lr, max_iter=k - done, tol=0.0, batched=True)(G, phi, theta)
            x = res.x
            if not isinstance(x, torch.Tensor) or res.n_iter != k - done or not bool(torch.isfinite(x).all()):
                raise RuntimeError(f"inner GD: {res.n_iter} steps ({res.status.name}), expected {k - done}")
            phi, done = x, k
        path[k] = phi
    return path


@dataclasses.dataclass(frozen=True)
class Precomputed:
    """An inner "solver" that returns an answer computed elsewhere (here: by `inner_path`).

    The implicit layer only needs the inner answer, not how it was found, so one GD run can
    serve every CG budget.  The result says honestly that GD stopped at its step budget.
    """

    x: torch.Tensor
    n_iter: int

    def __call__(self, objective: object, init: torch.Tensor, theta: torch.Tensor) -> bl.SolverResult:
        return bl.SolverResult(x=self.x.clone(), status=bl.SolverStatus.MAX_ITER, n_iter=self.n_iter)


def imaml_gradient(
    task: RegressionTask, theta: torch.Tensor, lam: float, phi_K: torch.Tensor, steps: int, cg_iters: int
) -> torch.Tensor:
    """iMAML's meta-gradient at the inner answer phi_K with ``cg_iters`` CG steps from 0."""
    th = theta.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        # Deliberately unconverged inner solves and truncated CG: this figure measures the
        # error they cause, so the layer's warnings about them are expected here.
        warnings.simplefilter("ignore", bl.BilevelWarning)
        phi, info = bl.implicit_argmin(
            task.inner_objective(lam),
            theta.detach().clone(),
            th,
            solver=Precomputed(phi_K, steps),
            # Double backward through one retained graph.  Forward-over-reverse HVPs
            # (torch.func.jvp) costs ~20 ms per product here and imports torch._dynamo (~5 s).
            hvp=bl.ReverseOverReverse(),
            linear_solver=bl.CG(max_iter=cg_iters, rtol=0.0),
            optimality_tol=None,
            throw=False,
            return_info=True,
        )
        (g,) = torch.autograd.grad(task.query_loss(phi), th)
    last = info.last_backward
    if last is None or last.n_iter > cg_iters:
        raise RuntimeError(f"backward CG did not run as configured (max_iter={cg_iters}): {last}")
    return g


def run(
    *,
    n_tasks: int = 10,
    steps: Sequence[int] = FULL_STEPS,
    dim: int = 50,
    lam: float = 5.0,
    kappa: float = 50.0,
    spectrum: str = "bands",
    seed: int = 0,
) -> list[tuple[str, int, float]]:
    """Rows ``(method, inner_steps, mean relative error over tasks)`` for every method and K."""
    tasks = make_tasks(n_tasks, dim=dim, lam=lam, kappa=kappa, spectrum=spectrum, seed=seed)
    theta = torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1), dtype=D64)
    # beta = largest eigenvalue of A + lam I, the same for every task by construction
    beta = max(float(torch.linalg.eigvalsh(t.hessian(lam)).max()) for t in tasks)
    lr = 1.0 / beta
    path = inner_path(tasks, theta, lam, lr, steps)
    errors: dict[tuple[str, int], list[float]] = {(m, k): [] for m in METHODS for k in steps}
    for i, task in enumerate(tasks):
        g_star = task.exact_meta_gradient(theta, lam)
        norm = float(g_star.norm())
        for k in steps:
            phi_K = path[k][i]
            grads = {
                "maml": maml_gradient(task, theta, lam, k, lr),
                "imaml-cg2": imaml_gradient(task, theta, lam, phi_K, k, 2),
                "imaml-cg5": imaml_gradient(task, theta, lam, phi_K, k, 5),
                "fomaml": task.query_grad(phi_K),
            }
            for m, g in grads.items():
                errors[(m, k)].append(float((g - g_star).norm()) / norm)
    return [(m, k, statistics.fmean(errors[(m, k)])) for m in METHODS for k in steps]


def write_csv(rows: Sequence[tuple[str, int, float]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "inner_steps", "rel_error"])
        for m, k, e in rows:
            w.writerow([m, k, f"{e:.6e}"])


def plot(rows: Sequence[tuple[str, int, float]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "plotting needs matplotlib, which is not installed: pip install 'bilevel[plot]'"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "maml": "MAML (backprop through GD)",
        "imaml-cg2": "iMAML, 2 CG steps",
        "imaml-cg5": "iMAML, 5 CG steps",
        "fomaml": "first-order MAML",
    }
    short = {"maml": "MAML", "imaml-cg2": "iMAML-CG2", "imaml-cg5": "iMAML-CG5", "fomaml": "FOMAML"}
    styles = {"maml": "o-", "imaml-cg2": "s--", "imaml-cg5": "^-", "fomaml": "x:"}
    fig, ax = plt.subplots(figsize=(7.2, 5.0), layout="constrained")
    k_max = max(k for _, k, _ in rows)
    finals = []
    for m in METHODS:
        pts = [(k, e) for mm, k, e in rows if mm == m]
        last = dict(pts)[k_max]
        finals.append(f"{short[m]} {last:.1e}")
        # a relative error of exactly 0 cannot be drawn on a log axis; rounding keeps it > 0 here
        ax.loglog(
            [k for k, _ in pts],
            [max(e, 1e-16) for _, e in pts],
            styles[m],
            label=f"{labels[m]}: {last:.1e} at {k_max} steps",
            ms=4,
        )
    ax.set_xlabel("inner GD steps")
    ax.set_ylabel(r"relative error $\|g - g^*\| \,/\, \|g^*\|$")
    ax.set_title(f"{title}\nrelative error at {k_max} inner steps:\n" + ", ".join(finals), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[tuple[str, int, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true", help="3 tasks, 7 step counts (a few seconds)")
    p.add_argument("--tasks", type=int, default=None, help="tasks to average over (default 10; quick 3)")
    p.add_argument("--spectrum", choices=("bands", "continuous"), default="bands")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads; d = 50 gains nothing from more")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_tasks = args.tasks if args.tasks is not None else (3 if args.quick else 10)
    steps = QUICK_STEPS if args.quick else FULL_STEPS
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = run(n_tasks=n_tasks, steps=steps, spectrum=args.spectrum, seed=args.seed)
    write_csv(rows, args.out / "fig2a.csv")
    title = f"Fig. 2a: linear regression, d=50, λ=5, κ(A+λI)=50 ({args.spectrum}), {n_tasks} tasks"
    plot(rows, args.out / "fig2a.png", title)
    print(f"{'inner steps':>12} " + " ".join(f"{m:>10}" for m in METHODS))
    for k in steps:
        errs = {m: e for m, kk, e in rows if kk == k}
        print(f"{k:>12} " + " ".join(f"{errs[m]:10.2e}" for m in METHODS))
    elapsed = time.perf_counter() - t0
    print(f"wrote {args.out / 'fig2a.csv'} and {args.out / 'fig2a.png'} in {elapsed:.1f} s")
    if not all(math.isfinite(e) for _, _, e in rows):
        raise SystemExit("non-finite relative error")
    return rows


if __name__ == "__main__":
    main()
