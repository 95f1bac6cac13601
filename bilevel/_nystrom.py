"""Randomized Nyström approximation of a symmetric positive semidefinite matrix from k matvecs.

For A (n x n, PSD) and an orthonormal n x k test matrix Omega, the Nyström approximation is
A_k = (A Omega) (Omega' A Omega)^+ (A Omega)'.  It is computed here in the numerically stable
form of Tropp et al. (2017, Algorithm 3; Frangella, Tropp & Udell 2023, Algorithm 2.1): shift
by a tiny nu (so that the k x k core is safely positive definite), Cholesky, thin SVD, unshift.
The result is A_k = U diag(lam) U' with U orthonormal (n x k) and lam >= 0, from which
(A_k + rho I)^-1 b is a closed form (the Woodbury identity):

    x = U diag(1 / (lam + rho)) U' b + (b - U U' b) / rho.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ._errors import BilevelWarning
from ._settings import check_int
from ._types import Matvec

__all__ = ["NystromApproximation", "NystromPreconditioner", "gaussian_test_matrix", "nystrom_approximation"]


def gaussian_test_matrix(
    n: int, rank: int, seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The orthonormal test matrix Omega (n, rank) of `nystrom_approximation`.

    Drawn as ``torch.randn((n, rank), generator=torch.Generator().manual_seed(seed),
    dtype=torch.float64)`` on the CPU, orthonormalized by reduced QR in float64, then cast to
    ``dtype`` and moved to ``device``: the same probes on every device, for a given seed.
    """
    g = torch.Generator().manual_seed(seed)
    omega = torch.linalg.qr(torch.randn((n, rank), generator=g, dtype=torch.float64)).Q
    return omega.to(dtype=dtype, device=device)


@dataclasses.dataclass(frozen=True)
class NystromApproximation:
    """A_k = U diag(eigenvalues) U' for B problems.

    Attributes:
        U: orthonormal columns, (B, n, k).
        eigenvalues: lam >= 0, (B, k), in decreasing order.
        psd: per problem, whether the shifted k x k core was positive definite, bool (B,):
            ``False`` means A is not positive semidefinite (its ``U`` and ``eigenvalues`` are
            then those of the identity on the first k coordinates, placeholders only).
        finite: per problem, whether the k matvecs were finite, bool (B,) (``False``: placeholders
            as for ``psd``).
    """

    U: torch.Tensor
    eigenvalues: torch.Tensor
    psd: torch.Tensor
    finite: torch.Tensor

    def solve(self, b: torch.Tensor, rho: float) -> torch.Tensor:
        """(A_k + rho I)^-1 b by the Woodbury identity, b and the result (B, n).

        With ``rho = 0`` the pseudo-inverse on the range of U: the exact inverse where k = n and
        every eigenvalue is positive (callers check that).
        """
        coef = torch.einsum("bnk,bn->bk", self.U, b)
        lam = self.eigenvalues + rho
        inv = torch.where(lam > 0, 1.0 / torch.where(lam > 0, lam, 1.0), 0.0)
        inside = torch.einsum("bnk,bk->bn", self.U, coef * inv)
        if rho == 0:
            return inside
        # the part of b orthogonal to range(U), where A_k + rho I acts as rho I
        return inside + (b - torch.einsum("bnk,bk->bn", self.U, coef)) / rho


def nystrom_approximation(
    matvec: Matvec, like: torch.Tensor, rank: int, seed: int = 0
) -> NystromApproximation:
    """Sketch a PSD matrix (or B of them) with ``rank`` matvecs against seeded Gaussian probes.

    Args:
        matvec: ``v -> A v`` on (n,) tensors, or row-wise on (B, n) tensors (row b the product of
            problem b's matrix with row b).
        like: a tensor of the shape, dtype and device of A's vectors: (n,), or (B, n).
        rank: k, 1 <= k <= n: the number of matvecs (each on all B problems at once).
        seed: seeds the probes, those of `gaussian_test_matrix` (the same for every problem).

    Returns:
        The `NystromApproximation`, with a leading problem axis (B = 1 for a 1-D ``like``).

    Raises:
        ValueError: ``like`` not (n,) or (B, n); ``rank`` not in [1, n].
    """
    if like.ndim not in (1, 2):
        raise ValueError(f"nystrom_approximation: like must be (n,) or (B, n), got shape {tuple(like.shape)}")
    n = like.shape[-1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ValueError(f"nystrom_approximation(rank={rank!r}): rank must be an integer in [1, n={n}]")
    b = like if like.ndim == 2 else like.unsqueeze(0)

    def matvec_rows(V: torch.Tensor) -> torch.Tensor:
        return matvec(V) if like.ndim == 2 else matvec(V[0]).unsqueeze(0)

    B = b.shape[0]
    omega = gaussian_test_matrix(n, rank, seed, b.dtype, b.device)
    Y = torch.stack([matvec_rows(omega[:, j].expand(B, n).contiguous()) for j in range(rank)], dim=2)
    finite = torch.isfinite(Y).flatten(1).all(dim=1)
    # Problems with NaN products get a placeholder sketch (Y = Omega) so that the batched
    # factorizations below run for the others; their results are masked by `finite`.
    Y = torch.where(finite[:, None, None], Y, omega)
    # half precisions: the factorizations in float32 (LAPACK has none in 16 bits), the shift from
    # the products' own rounding (eps of b's dtype), the factors back in b's dtype at the end
    work = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype
    Y, omega = Y.to(work), omega.to(work)
    eps = torch.finfo(b.dtype).eps
    # Shift nu ~ eps ||A Omega|| (Frangella et al. use sqrt(n) eps(||Y||_2)): large enough that the
    # k x k core Omega'(Y + nu Omega) is positive definite in floating point for any PSD A, small
    # enough that unshifting (lam = s^2 - nu) costs only rounding-level accuracy.
    nu = (n**0.5) * eps * torch.linalg.matrix_norm(Y, ord="fro")
    Y_nu = Y + nu[:, None, None] * omega
    core = omega.T @ Y_nu
    core = 0.5 * (core + core.transpose(1, 2))
    L, info = torch.linalg.cholesky_ex(core)
    psd = info == 0
    eye = torch.eye(rank, dtype=work, device=b.device)
    L = torch.where(psd[:, None, None], L, eye)
    # F = Y_nu L^-T, so that F F' = Y_nu core^-1 Y_nu'
    F = torch.linalg.solve_triangular(L, Y_nu.transpose(1, 2), upper=False).transpose(1, 2)
    U, s, _ = torch.linalg.svd(F, full_matrices=False)
    lam = (s * s - nu[:, None]).clamp_min(0.0)
    ok = psd & finite
    placeholder = torch.eye(n, rank, dtype=work, device=b.device).expand(B, n, rank)
    U = torch.where(ok[:, None, None], U, placeholder)
    lam = torch.where(ok[:, None], lam, 1.0)
    return NystromApproximation(U.to(b.dtype), lam.to(b.dtype), psd, finite)


@dataclasses.dataclass(frozen=True)
class NystromPreconditioner:
    """Recipe for CG: the randomized Nyström preconditioner of each solve's own operator.

    ``CG(M=NystromPreconditioner(rank=k))`` sketches A = U diag(lam) U' with k
    matvecs before CG starts (counted in the result's ``n_matvec``) and applies

        M(r) = lam_k U diag(1 / lam) U' r + (r - U U' r)

    (Frangella, Tropp & Udell 2023, eq. (5.3) with mu = 0): it maps the top k eigenvalues of A
    to about lam_k, so CG then converges as if A's condition number were lam_k / lam_min.  Worth
    it where A has a few large outlying eigenvalues (a Hessian of a model with a few dominant
    directions) and the solve takes many more than k iterations.

    Args:
        rank: k, 1 <= k <= n (a larger k than n raises `ValueError` at the solve).
        seed: seeds the probes (see `gaussian_test_matrix`).

    A problem whose sketch is not positive definite (NaN products, an indefinite A, lam_k = 0)
    is left unpreconditioned (M = I), with a `BilevelWarning`; CG then reports on it as usual.
    """

    rank: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("NystromPreconditioner", "rank", self.rank, 1)
        check_int("NystromPreconditioner", "seed", self.seed, 0)

    def build(self, matvec: Matvec, b: torch.Tensor) -> Matvec:
        n = b.shape[-1]
        if self.rank > n:
            raise ValueError(
                f"NystromPreconditioner(rank={self.rank}): the system has n={n} unknowns; pass rank <= {n}"
            )
        approx = nystrom_approximation(matvec, b, self.rank, self.seed)
        lam_k = approx.eigenvalues[:, -1]
        ok = approx.psd & approx.finite & (lam_k > 0)
        if not bool(ok.all()):
            which = torch.nonzero(~ok).flatten().tolist()
            warnings.warn(
                f"NystromPreconditioner(rank={self.rank}): the sketch of problems {which} is not "
                "positive definite (NaN products, an indefinite matrix, or a zero eigenvalue): "
                "those are solved without preconditioner",
                BilevelWarning,
                stacklevel=3,
            )
        U = approx.U
        lam = torch.where(ok[:, None], approx.eigenvalues, 1.0)
        # M = I - U (I - lam_k / lam) U' per problem; M = I where the sketch failed
        shrink = torch.where(ok[:, None], 1.0 - lam_k[:, None] / lam, 0.0)

        def apply(r: torch.Tensor) -> torch.Tensor:
            R = r if r.ndim == 2 else r.unsqueeze(0)
            coef = torch.einsum("bnk,bn->bk", U, R) * shrink
            out = R - torch.einsum("bnk,bk->bn", U, coef)
            return out if r.ndim == 2 else out[0]

        return apply
