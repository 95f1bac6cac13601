"""Extreme eigenvalues of B symmetric operators at once, by Lanczos: for diagnostics.

Lemma 1 of iMAML holds at the argmin of G, where the Hessian lam I + Lhat'' is positive
semidefinite; a negative smallest eigenvalue of I + Lhat''/lam at the inner answer says that the
inner solve stopped short of a minimum.  `lanczos_extremes` estimates it from a few matrix-vector
products (HVPs), for every task of a meta-batch at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["lanczos_extremes"]


def lanczos_extremes(
    matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest Ritz values of ``steps`` Lanczos steps on B symmetric operators.

    Args:
        matvec: ``(B, n) -> (B, n)``, row b the product of the symmetric matrix A_b with row b.
        v0: starting vectors (B, n), nonzero rows (a random start finds every eigen-direction).
        steps: Lanczos steps (matvecs), >= 1.

    Returns:
        ``(lo, hi)``, each of shape (B,), in ``v0``'s dtype: the extreme eigenvalues of the
        Lanczos tridiagonal of each problem.  They lie inside [lambda_min(A_b), lambda_max(A_b)]
        and approach its ends as ``steps`` grows (exact, to rounding, with ``steps >= n``);
        a few steps resolve well-separated extremes.  No reorthogonalization: lost orthogonality
        repeats converged Ritz values, which leaves the extremes in place.  A problem whose Krylov
        space is exhausted early (an invariant subspace) keeps the Ritz values found by then.

    Raises:
        ValueError: ``steps < 1`` or ``v0`` not of shape (B, n).
    """
    if steps < 1:
        raise ValueError(f"lanczos_extremes(steps={steps}): steps must be >= 1")
    if v0.ndim != 2:
        raise ValueError(f"lanczos_extremes: v0 has shape {tuple(v0.shape)}; expected (B, n)")
    B = v0.shape[0]
    q = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True)
    q_prev = torch.zeros_like(q)
    beta = torch.zeros(B, dtype=v0.dtype, device=v0.device)
    alive = torch.ones(B, dtype=torch.bool, device=v0.device)
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    tiny = torch.finfo(v0.dtype).eps
    for _ in range(steps):
        w = matvec(q)
        a = (q * w).sum(1)
        w = w - a[:, None] * q - beta[:, None] * q_prev
        b = torch.linalg.vector_norm(w, dim=1)
        # an exhausted Krylov space: later rows decouple (beta 0) and repeat this problem's first
        # Rayleigh quotient, which lies between its extreme Ritz values and so moves neither
        a = torch.where(alive, a, alphas[0] if alphas else a)
        alphas.append(a)
        alive = alive & (b > tiny * (a.abs() + beta))
        b = torch.where(alive, b, torch.zeros_like(b))
        betas.append(b)
        q_prev, q = q, torch.where(alive[:, None], w / torch.where(alive, b, 1.0)[:, None], 0.0)
        beta = b
    T = torch.diag_embed(torch.stack(alphas, 1))
    if steps > 1:
        off = torch.stack(betas[:-1], 1)
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    ev = torch.linalg.eigvalsh(T)
    return ev[:, 0], ev[:, -1]
