"""Differentiate through SciPy's L-BFGS and compare with finite differences of re-solves.

Logistic regression with one L2 weight per feature (log-parametrized) on synthetic data:

    w*(theta) = argmin_w  sum_i log(1 + exp(-y_i x_i'w)) + 1/2 sum_j exp(theta_j) w_j^2
    F(theta)  = mean validation log-loss at w*(theta)

The inner problem is solved by `bl.solvers.ScipyLBFGS` (float64, outside torch); the
hypergradient dF/dtheta comes from `bl.implicit_argmin` (one CG solve on Hessian-vector
products) and is printed beside central finite differences of F computed with fresh
solves by Newton-CG to ||grad G|| <= 1e-12 (SciPy's line search stalls near 1e-8, too
noisy for a finite-difference reference).  Run: ``python examples/hypergradient_check.py``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import bilevel as bl

D = torch.float64


def make_data(seed: int = 0, n: int = 200, d: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=D) * torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=D)
    X = torch.randn(2 * n, d, generator=g, dtype=D)
    y = (torch.rand(2 * n, generator=g, dtype=D) < torch.sigmoid(X @ w_true)).to(D)
    return X[:n], y[:n], X[n:], y[n:]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    Xtr, ytr, Xval, yval = make_data()
    solver = bl.solvers.ScipyLBFGS(tol=1e-8, max_iter=1000)
    reference = bl.solvers.NewtonCG(newton_iters=100, cg_iters=50, tol=1e-12)

    def G(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(Xtr @ w, ytr, reduction="sum")
        return bce + 0.5 * (theta.exp() * w**2).sum()

    def val_loss(theta: torch.Tensor) -> torch.Tensor:
        w = reference(G, torch.zeros(Xtr.shape[1], dtype=D), theta).x
        return F.binary_cross_entropy_with_logits(Xval @ w, yval)

    theta = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -0.5], dtype=D, requires_grad=True)
    w, info = bl.implicit_argmin(
        G, torch.zeros(Xtr.shape[1], dtype=D), theta, solver=solver, return_info=True
    )
    loss = F.binary_cross_entropy_with_logits(Xval @ w, yval)
    (hypergrad,) = torch.autograd.grad(loss, theta)

    h = 1e-3
    fd = torch.zeros_like(theta)
    with torch.no_grad():
        for j in range(theta.numel()):
            e = torch.zeros_like(theta)
            e[j] = h
            # fourth-order central difference: truncation ~h^4
            f = [val_loss(theta + k * e) for k in (-2, -1, 1, 2)]
            fd[j] = (f[0] - 8 * f[1] + 8 * f[2] - f[3]) / (12 * h)
    res = info.solver_result
    print("Hypergradient through SciPy L-BFGS-B (implicit differentiation) vs central finite differences")
    print(f"  inner solve: {res.status.name}, {res.n_iter} iterations, ||grad G|| = {info.residual_norm:.2e}")
    if not res.converged:
        print(f"    ({res.reason}; the layer's own check, ||grad G|| <= optimality_tol=1e-3, passed)")
    lin = info.last_backward
    print(
        f"  backward: CG {lin.status.name} in {lin.n_iter} iterations, "
        f"relative residual {lin.relative_residual:.1e}"
    )
    print(f"  {'j':>2} {'implicit':>14} {'finite diff':>14} {'rel. diff':>10}")
    for j in range(theta.numel()):
        a, b = float(hypergrad[j]), float(fd[j])
        print(f"  {j:>2} {a:>14.8f} {b:>14.8f} {abs(a - b) / max(abs(b), 1e-12):>10.1e}")
    rel = float((hypergrad - fd).norm() / fd.norm())
    print(f"  relative error ||implicit - fd|| / ||fd|| = {rel:.2e}")
    return 0 if rel < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
