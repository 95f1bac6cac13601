"""Preconditioners for `bilevel.CG`: fixed ones, and recipes built from the system's own matvec.

CG's ``M=`` takes either

* a fixed map ``M(r) ~ A^-1 r`` (any callable, e.g. a `DiagonalPreconditioner`), right where A
  is known when the solver is configured; or
* a `PreconditionerRecipe`: a value with a method ``build(matvec, b) -> M`` that CG calls at
  the start of every solve with that solve's matvec.  This is how a preconditioner follows the
  point: the backward solve of `bilevel.implicit_argmin` sees the Hessian at the current answer
  only through its matvec, so ``implicit_argmin(..., linear_solver=CG(M=
  HutchinsonDiagonal(probes=16)))`` estimates the Hessian's diagonal there, at each backward
  pass.  The matvecs a recipe spends are counted in the solve's ``n_matvec``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Protocol, runtime_checkable

import torch

from ._errors import BilevelWarning
from ._settings import check_int
from ._types import Matvec

__all__ = ["DiagonalPreconditioner", "HutchinsonDiagonal", "PreconditionerRecipe", "hutchinson_diagonal"]


@runtime_checkable
class PreconditionerRecipe(Protocol):
    """Builds a preconditioner for one solve from that solve's operator.

    ``build(matvec, b)`` receives the matvec and right-hand side(s) of the solve about to run
    (``b`` of shape (n,), or (B, n) with a row-wise matvec in batched mode) and returns
    ``M``, a map ``r -> M^-1 r`` of the same shapes, symmetric positive definite per problem.
    """

    def build(self, matvec: Matvec, b: torch.Tensor) -> Matvec: ...


def _check_floor(who: str, floor: float) -> None:
    """``floor``, a fraction of the largest diagonal entry, is a number in (0, 1]."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)):
        raise TypeError(f"{who}(floor={floor!r}): floor must be a number")
    if not (math.isfinite(floor) and 0 < floor <= 1):
        raise ValueError(f"{who}(floor={floor!r}): floor must be in (0, 1]")


def hutchinson_diagonal(matvec: Matvec, like: torch.Tensor, probes: int, seed: int = 0) -> torch.Tensor:
    """Hutchinson's estimate of diag(A): the mean of z * (A z) over Rademacher probes z.

    Each entry is unbiased: E[z_i (A z)_i] = A_ii + sum_{j != i} A_ij E[z_i z_j] = A_ii, with
    variance sum_{j != i} A_ij^2 / probes (zero for a diagonal A: one probe is then exact).

    Args:
        matvec: ``v -> A v``, on (n,) tensors, or row-wise on (B, n) tensors in batched mode.
        like: a tensor of the shape, dtype and device of A's vectors: (n,), or (B, n) for B
            matrices (every problem gets the same probes).
        probes: number of probes, >= 1; the cost is ``probes`` matvecs.
        seed: seeds the probes (drawn on the CPU, so that every device gets the same ones).

    Returns:
        The estimated diagonal, shaped like ``like``.

    Raises:
        ValueError: ``probes < 1``, or ``like`` not 1-D or 2-D.
    """
    check_int("hutchinson_diagonal", "probes", probes, 1)
    if like.ndim not in (1, 2):
        raise ValueError(f"hutchinson_diagonal: like must be (n,) or (B, n), got shape {tuple(like.shape)}")
    n = like.shape[-1]
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (probes, n), generator=g).to(dtype=like.dtype, device=like.device) * 2 - 1
    total = torch.zeros_like(like)
    for z in signs:
        zz = z.expand_as(like).contiguous()
        total = total + zz * matvec(zz)
    return total / probes


@dataclasses.dataclass(frozen=True)
class DiagonalPreconditioner:
    """The Jacobi preconditioner ``M(r) = r / diagonal``.

    Args:
        diagonal: positive entries, (n,), or (B, n) for B problems in batched mode.

    Raises:
        ValueError: an entry that is not finite or not > 0 (M would not be positive definite).
    """

    diagonal: torch.Tensor

    def __post_init__(self) -> None:
        d = self.diagonal
        if not isinstance(d, torch.Tensor) or d.ndim not in (1, 2):
            raise ValueError(
                "DiagonalPreconditioner: diagonal must be a (n,) or (B, n) tensor, "
                f"got {getattr(d, 'shape', d)}"
            )
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            bad = int((~((d > 0) & torch.isfinite(d))).sum())
            raise ValueError(
                f"DiagonalPreconditioner: {bad} diagonal entries are not finite and > 0; a Jacobi "
                "preconditioner needs a positive diagonal (estimate it with more probes, or clip it)"
            )

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """``r / diagonal``: r of shape (n,) or (B, n), with a (B, n) diagonal only (B, n).

        Raises:
            ValueError: r's shape does not match the diagonal's.
        """
        d = self.diagonal
        if r.shape[-1:] != d.shape[-1:] or (d.ndim == 2 and r.shape != d.shape):
            raise ValueError(
                f"DiagonalPreconditioner: a diagonal of shape {tuple(d.shape)} cannot precondition a "
                f"residual of shape {tuple(r.shape)}: build it for the system being solved"
            )
        return r / d

    @classmethod
    def estimate(
        cls, matvec: Matvec, like: torch.Tensor, probes: int, seed: int = 0, floor: float = 1e-6
    ) -> DiagonalPreconditioner:
        """The Jacobi preconditioner of the diagonal estimated by `hutchinson_diagonal`.

        Costs ``probes`` matvecs.  Estimated entries below ``floor`` times the largest of their
        problem's (zero or negative: too few probes for a matrix far from diagonal, or a matrix
        that is not positive definite) are raised to that level, with a `BilevelWarning` saying
        how many.  A problem whose estimate holds NaN or infinity, or no positive entry, is left
        unpreconditioned (its row of the diagonal is 1), with a `BilevelWarning` naming it: the
        solve then reports on it (in batched mode, without touching the other problems).

        Args:
            matvec, like, probes, seed: as for `hutchinson_diagonal`.
            floor: relative floor in (0, 1].

        Raises:
            ValueError: ``floor`` outside (0, 1], or as `hutchinson_diagonal`.
        """
        _check_floor("DiagonalPreconditioner.estimate", floor)
        d = hutchinson_diagonal(matvec, like, probes, seed)
        rows = d if d.ndim == 2 else d.unsqueeze(0)
        top = torch.where(torch.isfinite(rows), rows, -math.inf).amax(dim=1, keepdim=True)
        usable = torch.isfinite(rows).all(dim=1, keepdim=True) & (top > 0)
        if not bool(usable.all()):
            which = torch.nonzero(~usable[:, 0]).flatten().tolist()
            warnings.warn(
                f"DiagonalPreconditioner.estimate: the estimated diagonal of problems {which} has NaN "
                "or infinity or no positive entry (a matvec that returned NaN, or a matrix that is not "
                "positive definite): those problems are left unpreconditioned (M = I)",
                BilevelWarning,
                stacklevel=2,
            )
            rows = torch.where(usable, rows, 1.0)
            top = torch.where(usable, top, 1.0)
        level = floor * top
        low = rows < level
        n_low = int(low.sum())
        if n_low:
            warnings.warn(
                f"DiagonalPreconditioner.estimate: {n_low} of {rows.numel()} estimated diagonal "
                f"entries were below {floor:g} times their problem's largest and were raised to it "
                f"({probes} probes): use more probes, or a floor that suits the matrix",
                BilevelWarning,
                stacklevel=2,
            )
            rows = torch.where(low, level, rows)
        return cls(rows if d.ndim == 2 else rows[0])


@dataclasses.dataclass(frozen=True)
class HutchinsonDiagonal:
    """Recipe for CG: the Jacobi preconditioner of each solve's own operator, by Hutchinson probes.

    ``CG(M=HutchinsonDiagonal(probes=16))`` estimates diag(A) with ``probes``
    matvecs of the solve's matvec before CG starts (counted in the result's ``n_matvec``), so
    that in `bilevel.implicit_argmin` the preconditioner is that of the Hessian at the current
    answer.  Worth it where A is diagonally dominant with a wide spread of diagonal entries
    (per-feature penalties, badly scaled features) and the solve takes many more iterations
    than ``probes``.

    Args:
        probes: Rademacher probes, >= 1.
        seed: seeds the probes (the same at every solve: reproducible backward passes).
        floor: relative floor of the estimated entries, in (0, 1] (see
            `DiagonalPreconditioner.estimate`).
    """

    probes: int = 16
    seed: int = 0
    floor: float = 1e-6

    def __post_init__(self) -> None:
        check_int("HutchinsonDiagonal", "probes", self.probes, 1)
        _check_floor("HutchinsonDiagonal", self.floor)
        check_int("HutchinsonDiagonal", "seed", self.seed, 0)

    def build(self, matvec: Matvec, b: torch.Tensor) -> DiagonalPreconditioner:
        return DiagonalPreconditioner.estimate(matvec, b, self.probes, self.seed, self.floor)
