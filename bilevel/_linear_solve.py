"""Matrix-free linear solvers for the backward pass: A x = b with A given as a matvec.

Every solver is a frozen dataclass called as ``solver(matvec, b, x0=None)`` on flat
1-D tensors (or (B, n) for B independent systems) and returns a `LinearSolveResult`
with the solution, the status, the iterations, the matvecs spent and the residual
||A x - b|| at the returned ``x``.  A claim of convergence is always checked on the
*true* residual (recomputed with one extra matvec, never the recursively updated
estimate, which drifts from the truth in floating point); `CG` reports its recursive
residual for solves that stop without claiming convergence.

Which solver for which matrix:

==========  =======================================  ==========================
solver      matrix class                             cost per iteration
==========  =======================================  ==========================
`CG`        symmetric positive definite              1 matvec
`MINRES`    symmetric, possibly indefinite           1 matvec
`GMRES`     any non-singular (restarted)             1 matvec + O(k n) work
`BiCGStab`  any non-singular                         2 matvecs
`Neumann`   spectrum of alpha A inside (0, 2)         1 matvec
`DenseSolve` any non-singular, small n               n matvecs once, O(n^3)
`Nystrom`   symmetric positive semidefinite          k matvecs once, O(n k^2)
==========  =======================================  ==========================

The default tolerance (``rtol=None``) depends on the dtype of ``b``: 1e-10 in
float64, 1e-5 in float32, 1e-2 in half precision.  Convergence means
``||A x - b|| <= max(rtol * ||b||, atol)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _sync
from ._errors import BilevelWarning
from ._nystrom import NystromApproximation, nystrom_approximation
from ._preconditioners import PreconditionerRecipe
from ._results import HostValues, LinearSolveResult
from ._settings import check_flag, check_int, check_positive
from ._status import LINEAR_SEVERITY, LinearStatus, severity, worst
from ._types import Matvec
from .tree import rowdot, rownorm

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "BiCGStab",
    "DenseSolve",
    "Neumann",
    "Nystrom",
    "cg_solve",
    "default_rtol",
]


def default_rtol(dtype: torch.dtype) -> float:
    """Relative residual tolerance that the dtype can reach on a well-conditioned system."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-2


def _check_config(name: str, max_iter: int | None, rtol: float | None, atol: float) -> None:
    # an infinite tolerance would report CONVERGED at x = 0 (a zero gradient, silently)
    if max_iter is not None:
        check_int(name, "max_iter", max_iter, 0)
    if rtol is not None:
        check_positive(name, "rtol", rtol, allow_zero=True)
    check_positive(name, "atol", atol, allow_zero=True)


def _check_b(name: str, b: torch.Tensor, x0: torch.Tensor | None) -> None:
    if not isinstance(b, torch.Tensor) or b.ndim not in (1, 2):
        raise ValueError(
            f"{name}: b must be a 1-D tensor (one system) or a 2-D tensor (B, n) of B systems, "
            f"got {getattr(b, 'shape', type(b))}"
        )
    if not b.is_floating_point():
        raise TypeError(f"{name}: b has dtype {b.dtype}; it must be floating point (b.double(), b.float())")
    if b.numel() == 0:
        raise ValueError(f"{name}: b of shape {tuple(b.shape)} is empty (no systems, or systems of size 0)")
    if x0 is not None and (x0.shape != b.shape or x0.dtype != b.dtype):
        raise ValueError(
            f"{name}: x0 has shape {tuple(x0.shape)} and dtype {x0.dtype}; "
            f"b has {tuple(b.shape)} and {b.dtype}"
        )


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


class _Counted:
    """Wraps a matvec to count its calls and check its output shape."""

    def __init__(self, matvec: Matvec, b: torch.Tensor, name: str) -> None:
        self._matvec = matvec
        self._b = b
        self._name = name
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = _tensor_out(self._matvec(v), "matvec")
        if out.shape != self._b.shape:
            raise ValueError(
                f"{self._name}: matvec returned shape {tuple(out.shape)} for an input of shape "
                f"{tuple(v.shape)}; it must return a vector like its input"
            )
        return out


def _finish(
    A: _Counted, b: torch.Tensor, x: torch.Tensor, status: LinearStatus, n_iter: int, tol: float
) -> LinearSolveResult:
    """Recompute the true residual at x and settle the status on it."""
    b_norm = _norm(b)
    if not bool(torch.isfinite(x).all()):
        return LinearSolveResult(x, LinearStatus.NONFINITE, n_iter, A.calls, math.inf, b_norm)
    r_norm = _norm(b - A(x))
    if not math.isfinite(r_norm):
        status = LinearStatus.NONFINITE
    elif status is LinearStatus.CONVERGED and r_norm > tol:
        # The recursive residual said converged; rounding says otherwise.
        status = LinearStatus.MAX_ITER
    elif status is LinearStatus.MAX_ITER and r_norm <= tol:
        status = LinearStatus.CONVERGED
    return LinearSolveResult(x, status, n_iter, A.calls, r_norm, b_norm)


def cg_solve(
    matvec: Matvec,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    max_iter: int,
    tol: torch.Tensor,
    preconditioner: Matvec | None = None,
    check_residual: bool = True,
    budget: bool = False,
    radius: torch.Tensor | None = None,
    name: str = "CG",
    spent: int = 0,
) -> LinearSolveResult:
    """Preconditioned CG on B independent systems at once, each stopping on its own.

    The one CG loop of the library: `CG` calls it, and so do `bilevel.solvers.NewtonCG`
    (with per-problem forcing tolerances) and the meta-learning engine (through the
    implicit layer).

    Args:
        matvec: ``(B, n) -> (B, n)``, row b the product of problem b's matrix with row b.
        b: right-hand sides, shape (B, n).
        x0: starting points (B, n), or ``None`` for zeros.
        max_iter: iteration cap (each iteration is one matvec for every running problem).
        tol: per-problem absolute tolerances on ||A_b x_b - b_b||, shape (B,).
        preconditioner: ``(B, n) -> (B, n)``, symmetric positive definite per problem.
        check_residual: where some problem claims convergence, recompute the true residual
            b - A x (one more matvec) and settle each status on it; otherwise, and with
            ``False``, report the recursively updated residual.
        budget: every ``tol`` is 0 (a fixed budget, ``rtol = atol = 0``): off the CPU the
            loop then runs ``max_iter`` steps without reading whether any problem still runs
            (stopped problems are frozen by their masks), so it never waits for the device.
        radius: per-problem trust-region radii, shape (B,), > 0: Steihaug's CG (Nocedal &
            Wright, Algorithm 7.2), from ``x0 = None`` and without preconditioner.  A problem
            whose next iterate would leave the ball ||x|| <= radius, or that meets p'Ap <= 0,
            moves along p to the boundary and stops there (status ``BOUNDARY`` or
            ``NEGATIVE_CURVATURE``), and ``problem_decrease`` holds the decrease of the
            quadratic model x'Ax/2 - b'x: what a trust-region method needs from its step.
        name: for error messages.
        spent: matvecs already spent on these systems (building a preconditioner), added to
            the result's ``n_matvec``.

    Returns:
        `LinearSolveResult` with ``x`` of shape (B, n) and every per-problem field set.
        A problem that meets p'Ap <= 0 (or NaN) stops there with its last iterate and
        status ``NEGATIVE_CURVATURE`` (``NONFINITE``), the curvature in
        ``problem_curvature``.  Stopped problems are frozen by masks; the loop ends when
        none is running.
    """
    if radius is not None and (x0 is not None or preconditioner is not None):
        raise ValueError(f"{name}: a trust-region radius needs x0=None and no preconditioner (Steihaug's CG)")
    A = _Counted(matvec, b, name)
    st = _cg_start(A, preconditioner, b, x0, tol, radius, name)
    k = 0
    # Reading `alive` on the host ends the loop early once every problem stopped; it is free on
    # the CPU, and a budget without tolerances (all tol 0) cannot end early but by negative
    # curvature, so on an accelerator that budget runs without waiting for the device.
    sync = _sync.host_checks(b)
    while k < max_iter and ((budget and not sync) or bool(st.alive.any())):
        _cg_iteration(st, A, preconditioner, sync)
        k += 1
    _cg_settle(st, A, b, check_residual)
    return _batch_result(
        st.x, st.codes, k, A.calls + spent, st.r_norm, st.b_norm, st.iters, st.curvature, st.decrease
    )


@dataclasses.dataclass
class _CGState:
    """CG's per-problem state between iterations, all (B, n) or (B,) tensors on ``b``'s device.

    ``codes`` start at MAX_ITER and change where a problem stops; ``alive`` marks the running
    problems; ``stop_at`` is max(tol, rounding floor); ``radius`` and ``decrease`` are set for
    Steihaug's trust-region CG only.
    """

    x: torch.Tensor
    r: torch.Tensor
    p: torch.Tensor
    rz: torch.Tensor
    r_norm: torch.Tensor
    b_norm: torch.Tensor
    tol: torch.Tensor
    stop_at: torch.Tensor
    codes: torch.Tensor
    alive: torch.Tensor
    iters: torch.Tensor
    curvature: torch.Tensor
    radius: torch.Tensor | None
    decrease: torch.Tensor | None


def _cg_start(
    A: _Counted,
    preconditioner: Matvec | None,
    b: torch.Tensor,
    x0: torch.Tensor | None,
    tol: torch.Tensor,
    radius: torch.Tensor | None,
    name: str,
) -> _CGState:
    """The state before the first iteration: residual, first direction, who already converged."""
    B = b.shape[0]
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None else b - A(x0)
    z = r if preconditioner is None else preconditioner(r)
    r_norm = rownorm(r)
    b_norm = rownorm(b)
    tol = tol.to(dtype=r_norm.dtype, device=b.device)
    alive = r_norm > tol
    codes = torch.full((B,), severity(LinearStatus.MAX_ITER), dtype=torch.int8, device=b.device)
    codes = torch.where(alive, codes, severity(LinearStatus.CONVERGED))
    rz = rowdot(r, z)
    if preconditioner is not None:
        alive, codes = _positive_preconditioner(rz, alive, codes)
    # Below this the recursive residual is rounding noise: iterating on would let r and p
    # underflow and pAp round to 0, which would read as (spurious) negative curvature.
    floor = 1e-3 * torch.finfo(b.dtype).eps * b_norm
    decrease: torch.Tensor | None = None
    if radius is not None:
        radius = radius.to(dtype=b.dtype, device=b.device)
        if radius.shape != (B,) or not bool((radius > 0).all()):
            raise ValueError(f"{name}: radius must be positive and of shape ({B},), got {radius}")
        decrease = torch.zeros(B, dtype=b.dtype, device=b.device)
    return _CGState(
        x=x,
        r=r,
        p=z.clone(),
        rz=rz,
        r_norm=r_norm,
        b_norm=b_norm,
        tol=tol,
        stop_at=torch.maximum(tol, floor),  # converged (<= tol) or stagnated (<= floor)
        codes=codes,
        alive=alive,
        iters=torch.zeros(B, dtype=torch.int64, device=b.device),
        curvature=torch.full((B,), math.nan, dtype=b.dtype, device=b.device),
        radius=radius,
        decrease=decrease,
    )


def _cg_iteration(st: _CGState, A: _Counted, preconditioner: Matvec | None, sync: bool) -> None:
    """One CG iteration of every running problem (one matvec), stopped problems frozen by masks."""
    p, alive = st.p, st.alive
    Ap = A(p)
    pAp = rowdot(p, Ap)
    st.iters += alive
    # pAp > 0 is False for NaN too: one test stops both, the status tells them apart
    finite = torch.isfinite(pAp)
    halt = alive & ~(pAp > 0)
    st.codes = torch.where(
        halt,
        torch.where(finite, severity(LinearStatus.NEGATIVE_CURVATURE), severity(LinearStatus.NONFINITE)),
        st.codes,
    )
    st.curvature = torch.where(halt & finite, pAp, st.curvature)
    alive = alive & ~halt
    alpha = torch.where(alive, st.rz / torch.where(alive, pAp, 1.0), 0.0)
    if st.radius is not None and st.decrease is not None:
        alpha, alive, st.codes, st.decrease = _steihaug(
            st.x, p, pAp, st.rz, alpha, alive, halt & finite, st.radius, st.codes, st.decrease
        )
    # fused multiply-adds: one pass over each vector (stopped problems have alpha = 0)
    st.x = torch.addcmul(st.x, alpha[:, None], p)
    r = st.r = torch.addcmul(st.r, alpha[:, None], Ap, value=-1.0)
    r_new = rownorm(r)
    st.r_norm = torch.where(alive, r_new, st.r_norm)
    st.codes = torch.where(alive & (r_new <= st.tol), severity(LinearStatus.CONVERGED), st.codes)
    # converged, or stagnated at machine precision (the true residual below judges it): stop
    alive = alive & ~(r_new <= st.stop_at)
    if preconditioner is None:
        # z = r: r'z is the squared norm just computed (float32 for half precision: back to r's)
        z, rz_new = r, (r_new * r_new).to(r.dtype)
    else:
        z = preconditioner(r)
        rz_new = rowdot(r, z)
        alive, st.codes = _positive_preconditioner(rz_new, alive, st.codes)
    beta = torch.where(alive, rz_new / torch.where(st.rz != 0, st.rz, 1.0), 0.0)
    p_new = torch.addcmul(z, beta[:, None], p)
    st.p = p_new if sync and bool(alive.all()) else torch.where(alive[:, None], p_new, p)
    st.rz = torch.where(alive, rz_new, st.rz)
    st.alive = alive


def _positive_preconditioner(
    rz: torch.Tensor, alive: torch.Tensor, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stop the running problems whose r'M(r) is not positive: M is not positive definite there
    (CG would divide by it, and its next p'Ap <= 0 would blame A).  A NaN r'M(r) is left to the
    NaN checks, which call it NONFINITE."""
    bad = alive & ~(rz > 0) & torch.isfinite(rz)
    return alive & ~bad, torch.where(bad, severity(LinearStatus.INDEFINITE_PRECONDITIONER), codes)


def _cg_settle(st: _CGState, A: _Counted, b: torch.Tensor, check_residual: bool) -> None:
    """Final statuses and residuals: a non-finite x is NONFINITE; a claim of convergence is
    settled on the true residual (one matvec) where ``check_residual``; no tolerance is BUDGET."""
    x_finite = torch.isfinite(st.x).all(dim=1)
    codes = torch.where(x_finite, st.codes, severity(LinearStatus.NONFINITE))
    conv_code, max_code = severity(LinearStatus.CONVERGED), severity(LinearStatus.MAX_ITER)
    if check_residual and bool((codes == conv_code).any()):
        # A claim of convergence rests on the recursive residual, which drifts from the true
        # one in floating point: recompute the truth (one matvec) and settle every status on it.
        true = rownorm(b - A(st.x))
        true = torch.where(x_finite, true, torch.full_like(true, math.inf))
        codes = torch.where((codes == conv_code) & (true > st.tol), max_code, codes)
        codes = torch.where((codes == max_code) & (true <= st.tol), conv_code, codes)
        codes = torch.where(torch.isfinite(true), codes, severity(LinearStatus.NONFINITE))
        st.r_norm = true
    else:
        st.r_norm = torch.where(x_finite, st.r_norm, torch.full_like(st.r_norm, math.inf))
    # No tolerance (rtol = atol = 0): running the whole budget is what was asked for.
    st.codes = torch.where((codes == max_code) & (st.tol == 0), severity(LinearStatus.BUDGET), codes)


def _steihaug(
    x: torch.Tensor,
    p: torch.Tensor,
    pAp: torch.Tensor,
    rz: torch.Tensor,
    alpha: torch.Tensor,
    alive: torch.Tensor,
    negative: torch.Tensor,
    radius: torch.Tensor,
    codes: torch.Tensor,
    decrease: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One iteration's trust-region rule: step lengths, running mask, codes and model decrease.

    ``negative`` marks the problems that met finite p'Ap <= 0 in this iteration (already coded
    NEGATIVE_CURVATURE), ``alive`` those taking the full step ``alpha``.  Both kinds whose step
    would end outside ||x|| <= radius go to the boundary instead: tau >= 0 with
    ||x + tau p|| = radius, the positive root (p is a descent direction of the model: p'r > 0).
    """
    xx, xp, pp = rowdot(x, x), rowdot(x, p), rowdot(p, p)
    r2 = radius * radius
    tau = (torch.sqrt((xp * xp + pp * (r2 - xx)).clamp_min(0.0)) - xp) / torch.where(pp > 0, pp, 1.0)
    leave = alive & (xx + alpha * (2.0 * xp + alpha * pp) >= r2)
    alpha = torch.where(leave | negative, tau, alpha)
    codes = torch.where(leave, severity(LinearStatus.BOUNDARY), codes)
    # q(x + a p) - q(x) = -a p'r + a^2 p'Ap / 2, and p'r = r'z along CG's directions
    curv = torch.where(torch.isfinite(pAp), pAp, 0.0)
    decrease = decrease + alpha * rz - 0.5 * alpha * alpha * curv
    return alpha, alive & ~leave, codes, decrease


def _batch_result(
    x: torch.Tensor,
    codes: torch.Tensor,
    n_iter: int,
    n_matvec: int,
    r_norm: torch.Tensor,
    b_norm: torch.Tensor,
    iters: torch.Tensor,
    curvature: torch.Tensor | None = None,
    decrease: torch.Tensor | None = None,
) -> LinearSolveResult:
    """The `LinearSolveResult` of a batched solve from per-problem status codes and norms (read
    on the host when the first of its host values is)."""

    def read() -> dict[str, Any]:
        statuses = tuple(LINEAR_SEVERITY[c] for c in codes.tolist())
        return dict(
            status=worst(statuses),
            residual_norm=float(torch.linalg.vector_norm(r_norm.double())),
            b_norm=float(torch.linalg.vector_norm(b_norm.double())),
            problem_status=statuses,
        )

    values = HostValues(read)
    return LinearSolveResult(
        x=x,
        status=values,
        n_iter=n_iter,
        n_matvec=n_matvec,
        residual_norm=values,
        b_norm=values,
        problem_status=values,
        problem_n_iter=iters,
        problem_residual_norm=r_norm,
        problem_b_norm=b_norm,
        problem_curvature=curvature,
        problem_decrease=decrease,
        problem_codes=codes,
    )


def _single(res: LinearSolveResult) -> LinearSolveResult:
    """A batched result of one problem as the result of a 1-D solve."""
    assert res.problem_status is not None
    return LinearSolveResult(
        x=res.x[0],
        status=res.problem_status[0],
        n_iter=res.n_iter,
        n_matvec=res.n_matvec,
        residual_norm=res.residual_norm,
        b_norm=res.b_norm,
        problem_curvature=res.problem_curvature,
    )


def _as_rows(matvec: Matvec) -> Matvec:
    """A matvec on 1-D vectors as one on (1, n) matrices."""
    return lambda V: _tensor_out(matvec(V[0]), "matvec").unsqueeze(0)


def _shape_checked(M: Matvec) -> Matvec:
    """``M`` whose outputs are checked to be tensors shaped like its inputs."""

    def checked(r: torch.Tensor) -> torch.Tensor:
        out = _tensor_out(M(r), "preconditioner M")
        if out.shape != r.shape:
            raise ValueError(
                f"CG: the preconditioner M returned shape {tuple(out.shape)} for a residual of shape "
                f"{tuple(r.shape)}; M(r) ~ A^-1 r must be shaped like r"
            )
        return out

    return checked


def _tensor_out(out: object, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the linear solve's {what} returned a {type(out).__name__}; "
            "it must return a tensor shaped like its input"
        )
    return out


def _block_diagonal(
    solver: Callable[..., LinearSolveResult],
    matvec: Matvec,
    b: torch.Tensor,
    x0: torch.Tensor | None,
    rtol: float | None,
    atol: float,
) -> LinearSolveResult:
    """Batched mode of a solver without one: solve the block-diagonal system of all B problems
    as one system of size B n, then judge each problem on its own true residual (one matvec)."""
    B, n = b.shape
    b_norm = rownorm(b)
    tol = torch.clamp(rtol_or_default(rtol, b.dtype) * b_norm, min=atol)
    if dataclasses.is_dataclass(solver) and hasattr(solver, "rtol"):
        # One global tolerance that meets every problem's own: the smallest positive one.
        positive = tol[tol > 0]
        if positive.numel():
            solver = dataclasses.replace(solver, rtol=0.0, atol=float(positive.min()))  # type: ignore[type-var,assignment]
    flat = solver(
        lambda v: matvec(v.view(B, n)).reshape(-1),
        b.reshape(-1),
        None if x0 is None else x0.reshape(-1),
    )
    x = flat.x.view(B, n)
    if flat.status in (LinearStatus.NONFINITE, LinearStatus.BREAKDOWN) or not bool(torch.isfinite(x).all()):
        # One problem's NaN (or singular block) spreads through the joint Krylov space to all of
        # them: solve each problem on its own, so that only the ones that fail are reported.
        return _one_by_one(solver, matvec, b, x0, flat.n_matvec)
    r = rownorm(b - matvec(x))
    # A problem that misses its own tolerance inherits the whole solve's reason, or MAX_ITER
    # where the whole solve met its (global) tolerance.
    missed = LinearStatus.MAX_ITER if flat.status is LinearStatus.CONVERGED else flat.status
    codes = torch.where(r <= tol, severity(LinearStatus.CONVERGED), severity(missed))
    codes = torch.where(torch.isfinite(r), codes, severity(LinearStatus.NONFINITE)).to(torch.int8)
    iters = torch.full((B,), flat.n_iter, dtype=torch.int64)
    return _batch_result(x, codes, flat.n_iter, flat.n_matvec + 1, r, b_norm, iters)


def _one_by_one(
    solver: Callable[..., LinearSolveResult],
    matvec: Matvec,
    b: torch.Tensor,
    x0: torch.Tensor | None,
    spent: int,
) -> LinearSolveResult:
    """The B problems of a batched matvec solved one at a time by ``solver`` (its own tolerance
    relative to each problem's ||b_b||): each problem's status is its own.  ``spent``: the
    matvecs of the failed joint solve, counted in the result."""
    B = b.shape[0]
    rows, codes, iters, r_norms = [], [], [], []
    n_matvec = spent
    for i in range(B):

        def row(v: torch.Tensor, i: int = i) -> torch.Tensor:
            # problem i's product: the other rows are zero, and row i depends on row i only
            V = torch.zeros_like(b)
            V[i] = v
            return matvec(V)[i]

        res = solver(row, b[i], None if x0 is None else x0[i])
        rows.append(res.x)
        codes.append(severity(res.status))
        iters.append(res.n_iter)
        r_norms.append(res.residual_norm)
        n_matvec += res.n_matvec
    x = torch.stack(rows)
    return _batch_result(
        x,
        torch.tensor(codes, dtype=torch.int8, device=b.device),
        max(iters),
        n_matvec,
        torch.tensor(r_norms, dtype=torch.float64, device=b.device),
        rownorm(b),
        torch.tensor(iters, dtype=torch.int64, device=b.device),
    )


def rtol_or_default(rtol: float | None, dtype: torch.dtype) -> float:
    return rtol if rtol is not None else default_rtol(dtype)


@dataclasses.dataclass(frozen=True)
class CG:
    """Conjugate gradient for symmetric positive definite A, on one system or B at once.

    Args:
        max_iter: iteration cap; ``None`` means ``min(2 n, 1000)`` for n unknowns.
        rtol: relative tolerance on ||A x - b|| / ||b||; ``None`` picks it from the dtype.
        atol: absolute tolerance on ||A x - b||.
        M: the preconditioner ``M(r) ~ A^-1 r`` (SciPy's name), symmetric positive definite;
            ``None`` for none.
            In batched mode it maps (B, n) to (B, n).  Either a fixed callable (e.g. a
            `DiagonalPreconditioner`), or a `PreconditionerRecipe` (e.g. `HutchinsonDiagonal`,
            `NystromPreconditioner`) whose ``build(matvec, b)`` makes one from each solve's own
            matvec: the way to precondition a system known only inside the caller, such as the
            Hessian at the current answer in `bilevel.implicit_argmin`'s backward pass.  The
            matvecs a recipe spends count in the result's ``n_matvec``.
        check_residual: before reporting ``CONVERGED``, recompute the true residual
            ||b - A x|| with one more matvec (the recursively updated one drifts in floating
            point) and settle the status on it.  Solves that stop without claiming
            convergence report the recursive residual and spend no extra matvec.
            ``False`` never spends it.

    Call:
        ``CG(...)(matvec, b, x0=None)``.  ``b`` of shape (n,): one system, ``matvec``
        maps (n,) to (n,).  ``b`` of shape (B, n): B independent systems (batched mode),
        ``matvec`` maps (B, n) to (B, n) row by row; each problem stops on its own
        tolerance (masks) and the result has per-problem status, iterations and true
        residuals of shape (B,).  A solve of k iterations costs k matvecs with
        ``x0=None``, one more for a warm start ``x0`` and one more to verify a
        convergence claim.  With ``rtol = atol = 0`` the solve runs ``max_iter``
        iterations and reports ``BUDGET`` (what was asked for; not a failure).

    Non-positive curvature p'Ap <= 0 stops the iteration (of that problem) with status
    ``NEGATIVE_CURVATURE`` and returns the last iterate: A is not positive definite
    (for a Hessian: the point is not a strict local minimum).  A preconditioner that gives
    r'M(r) <= 0 for a nonzero residual stops it with ``INDEFINITE_PRECONDITIONER`` instead,
    so that M, not A, is blamed.

    References:
        Nocedal & Wright, Numerical Optimization, 2nd ed., Algorithm 5.3.
    """

    max_iter: int | None = None
    rtol: float | None = None
    atol: float = 0.0
    M: Matvec | PreconditionerRecipe | None = None
    check_residual: bool = True

    def __post_init__(self) -> None:
        _check_config("CG", self.max_iter, self.rtol, self.atol)
        check_flag("CG", "check_residual", self.check_residual)
        if isinstance(self.M, type):
            raise TypeError(f"CG(M={self.M.__name__}): pass an instance, e.g. M={self.M.__name__}()")
        if self.M is not None and not callable(self.M):
            if not isinstance(self.M, PreconditionerRecipe):
                raise TypeError(
                    f"CG(M={self.M!r}): expected a callable r -> M^-1 r or "
                    "a recipe with a build(matvec, b) method"
                )

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None) -> LinearSolveResult:
        _check_b("CG", b, x0)
        batched = b.ndim == 2
        rows = b if batched else b.unsqueeze(0)
        n = rows.shape[1]
        max_iter = self.max_iter if self.max_iter is not None else min(2 * n, 1000)
        rtol = rtol_or_default(self.rtol, b.dtype)
        tol = torch.clamp(rtol * rownorm(rows), min=self.atol)
        M = self.M
        spent = 0
        if isinstance(M, PreconditionerRecipe):
            # built from this solve's operator: the preconditioner follows the point
            counted = _Counted(matvec, b, "CG")
            M = M.build(counted, b)
            spent = counted.calls
        if M is not None:
            M = _shape_checked(M)
        res = cg_solve(
            matvec if batched else _as_rows(matvec),
            rows,
            None if x0 is None else (x0 if batched else x0.unsqueeze(0)),
            max_iter=max_iter,
            tol=tol,
            preconditioner=None if M is None else (M if batched else _as_rows(M)),
            check_residual=self.check_residual,
            budget=rtol == 0 and self.atol == 0,
            spent=spent,
        )
        return res if batched else _single(res)


@dataclasses.dataclass(frozen=True)
class Nystrom:
    """Nyström low-rank inverse: x = (A_k + rho I)^-1 b from ``rank`` matvecs, no iterations.

    A (symmetric positive semidefinite, e.g. a Hessian at a minimum) is sketched with k = rank
    matvecs against seeded Gaussian probes (orthonormalized; see `gaussian_test_matrix`),
    giving A_k = U diag(lam) U' by the stable algorithm of Tropp et al. (shift, Cholesky,
    thin SVD).  Then the Woodbury identity solves the regularized system in closed form,

        x = U diag(1 / (lam + rho)) U' b + (b - U U' b) / rho,

    as Hataya & Yamada do for implicit differentiation (there with column sampling; Gaussian
    probes here, which capture the top eigenspace rather than k coordinates).  With
    ``rank = n`` and ``rho = 0`` it is an exact solve; otherwise it answers a nearby system
    on purpose: the solution of (A_k + rho I) x = b, whose error in A x = b is the point of
    the trade (k matvecs and no iterations against a Krylov solve's many).

    The residual is honest: ||A x - b|| for the true A, at one more matvec (``n_matvec =
    rank + 1``).  The status compares it to the tolerance ``max(rtol * ||b||, atol)`` where
    one is given (``CONVERGED`` or ``MAX_ITER``: then raise ``rank`` or lower ``rho``); with no
    tolerance (``rtol=None`` or 0 and ``atol=0``, the default) the solve only reports it, with
    status ``BUDGET``: the fixed work asked for, not a failure.  In `implicit_argmin`'s backward
    pass such an answer whose relative residual is above 1 (worse than x = 0) gives a
    `BilevelWarning` (as any linear solver's ``BUDGET`` answer does there).

    Args:
        rank: k, the number of probes, 1 <= k <= n.
        rho: regularization, >= 0; must be > 0 where ``rank < n`` (A_k is singular there).
            A scale of the Hessian's small eigenvalues (or the inner problem's own ridge
            penalty) is the natural choice.
        rtol: relative tolerance on ||A x - b|| / ||b||, or ``None`` for none.
        atol: absolute tolerance on ||A x - b||.
        seed: seeds the probes; the same at every call, so backward passes are reproducible.

    Call:
        ``Nystrom(...)(matvec, b, x0=None)``; ``x0`` is ignored (a direct method).  ``b`` of shape
        (n,), or (B, n) with a row-wise matvec for B independent systems (batched mode: each
        problem sketched with the same probes, each with its own status and residual).
        Cost: ``rank + 1`` matvecs, O(n k^2) flops, O(n k) memory per problem.

    Statuses:
        ``NONFINITE`` where a matvec or ``b`` holds NaN or infinity; ``NEGATIVE_CURVATURE``
        (x = 0) where the sketch shows A is not positive semidefinite (use `MINRES` or
        `GMRES`).  With ``rho = 0`` an eigenvalue of the sketch at rounding level (a singular
        A) gives a `BilevelWarning` and the pseudo-inverse on the sketch's numerical range.

    Raises:
        ValueError: ``rank < 1``, ``rho < 0`` or not finite, bad tolerances (at construction);
            ``rank > n``, or ``rho = 0`` with ``rank < n`` (at the call).

    References:
        Hataya & Yamada, "Nyström method for accurate and scalable implicit differentiation",
        AISTATS 2023.  Tropp, Yurtsever, Udell & Cevher, "Fixed-rank approximation of a positive-
        semidefinite matrix from streaming data", NeurIPS 2017 (Algorithm 3).  Frangella, Tropp &
        Udell, "Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl. 44(2), 2023.
    """

    rank: int
    rho: float = 0.0
    rtol: float | None = None
    atol: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("Nystrom", "rank", self.rank, 1)
        check_positive("Nystrom", "rho", self.rho, allow_zero=True)
        _check_config("Nystrom", None, self.rtol, self.atol)
        check_int("Nystrom", "seed", self.seed, 0)

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None) -> LinearSolveResult:
        _check_b("Nystrom", b, x0)
        batched = b.ndim == 2
        rows = b if batched else b.unsqueeze(0)
        n = rows.shape[1]
        if self.rank > n:
            raise ValueError(
                f"Nystrom(rank={self.rank}): the system has n={n} unknowns; pass rank <= {n} "
                f"(rank = n with rho = 0 is an exact solve)"
            )
        if self.rho == 0 and self.rank < n:
            raise ValueError(
                f"Nystrom(rank={self.rank}, rho=0): a rank-{self.rank} approximation of an n={n} "
                "matrix is singular; pass rho > 0 (the Woodbury solve of A_k + rho I), or rank = n"
            )
        A = _Counted(matvec if batched else _as_rows(matvec), rows, "Nystrom")
        approx = nystrom_approximation(A, rows, self.rank, self.seed)  # rows: row-wise A
        ok = approx.psd & approx.finite
        if self.rho == 0:
            approx = self._drop_null_space(approx, ok)
        x = approx.solve(rows, float(self.rho))
        x = torch.where(approx.finite[:, None], x, math.nan)
        x = torch.where(approx.psd[:, None], x, 0.0)
        # the honest residual, against the true operator
        r_norm = rownorm(rows - A(x))
        b_norm = rownorm(rows)
        rtol = self.rtol or 0.0
        budget = rtol == 0 and self.atol == 0
        tol = torch.clamp(rtol * b_norm, min=self.atol)
        if budget:  # no tolerance: report only
            codes = torch.full_like(b_norm, severity(LinearStatus.BUDGET), dtype=torch.int8)
        else:
            met, missed = severity(LinearStatus.CONVERGED), severity(LinearStatus.MAX_ITER)
            codes = torch.where(r_norm <= tol, met, missed)
        codes = torch.where(approx.psd, codes, severity(LinearStatus.NEGATIVE_CURVATURE))
        finite = torch.isfinite(r_norm) & torch.isfinite(x).all(dim=1)
        codes = torch.where(finite, codes, severity(LinearStatus.NONFINITE)).to(torch.int8)
        r_norm = torch.where(finite, r_norm, math.inf)
        iters = torch.ones(rows.shape[0], dtype=torch.int64, device=b.device)
        res = _batch_result(x, codes, 1, A.calls, r_norm, b_norm, iters)
        return res if batched else _single(res)

    def _drop_null_space(self, approx: NystromApproximation, ok: torch.Tensor) -> NystromApproximation:
        """With rho = 0: eigenvalues at rounding level of the largest (a singular A) are dropped
        (the pseudo-inverse on the rest), with a warning naming the problems."""
        lam = approx.eigenvalues
        n = approx.U.shape[1]
        floor = n * torch.finfo(lam.dtype).eps * lam[:, :1]
        null = (lam <= floor) & ok[:, None]
        singular = null.any(dim=1)
        if bool(singular.any()):
            which = torch.nonzero(singular).flatten().tolist()
            warnings.warn(
                f"Nystrom(rank={self.rank}, rho=0): the sketched matrix is numerically singular "
                f"(problems {which}: eigenvalues at or below n * eps times the largest); solving "
                "with its pseudo-inverse on the numerical range, whose residual is in the result: "
                "pass rho > 0 to regularize",
                BilevelWarning,
                stacklevel=3,
            )
        return dataclasses.replace(approx, eigenvalues=torch.where(null, 0.0, lam))


@dataclasses.dataclass(frozen=True)
class MINRES:
    """MINRES for symmetric, possibly indefinite A (Paige & Saunders 1975).

    Args:
        max_iter: iteration cap; ``None`` means ``min(2 n, 1000)``.
        rtol: relative tolerance; ``None`` picks it from the dtype.
        atol: absolute tolerance.

    References:
        Paige & Saunders, "Solution of sparse indefinite systems of linear equations",
        SIAM J. Numer. Anal. 12(4), 1975; Choi, Paige & Saunders, SISC 2011.
    """

    max_iter: int | None = None
    rtol: float | None = None
    atol: float = 0.0

    def __post_init__(self) -> None:
        _check_config("MINRES", self.max_iter, self.rtol, self.atol)

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None) -> LinearSolveResult:
        _check_b("MINRES", b, x0)
        if b.ndim == 2:
            return _block_diagonal(self, matvec, b, x0, self.rtol, self.atol)
        A = _Counted(matvec, b, "MINRES")
        n = b.numel()
        max_iter = self.max_iter if self.max_iter is not None else min(2 * n, 1000)
        rtol = self.rtol if self.rtol is not None else default_rtol(b.dtype)
        tol = max(rtol * _norm(b), self.atol)

        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b.clone() if x0 is None else b - A(x0)
        beta = _norm(r)
        status = LinearStatus.CONVERGED if beta <= tol else LinearStatus.MAX_ITER
        if status is LinearStatus.CONVERGED or max_iter == 0:
            return _finish(A, b, x, status, 0, tol)
        # Lanczos vectors and the QR factorization of the tridiagonal, updated by Givens rotations.
        v_old = torch.zeros_like(b)
        v = r / beta
        w_old = torch.zeros_like(b)
        w = torch.zeros_like(b)
        beta_old = 0.0
        c_old, s_old, c, s = 1.0, 0.0, 1.0, 0.0
        eta = beta
        k = 0
        while k < max_iter:
            Av = A(v)
            k += 1
            alpha = float(torch.dot(v, Av))
            u = Av - alpha * v - beta_old * v_old if k > 1 else Av - alpha * v
            beta_new = _norm(u)
            # Apply the previous two rotations to the new column of the tridiagonal.
            delta = c * alpha - c_old * s * beta_old
            rho1 = math.hypot(delta, beta_new)
            rho2 = s * alpha + c_old * c * beta_old
            rho3 = s_old * beta_old
            if rho1 == 0.0 or not math.isfinite(rho1):
                status = LinearStatus.BREAKDOWN if math.isfinite(rho1) else LinearStatus.NONFINITE
                break
            c_old, s_old = c, s
            c, s = delta / rho1, beta_new / rho1
            w_new = (v - rho3 * w_old - rho2 * w) / rho1
            x = x + (c * eta) * w_new
            eta = -s * eta
            w_old, w = w, w_new
            if abs(eta) <= tol:
                status = LinearStatus.CONVERGED
                break
            if beta_new == 0.0:
                # Invariant subspace found: the solution in it is exact.
                status = LinearStatus.CONVERGED
                break
            v_old, v = v, u / beta_new
            beta_old = beta_new
        return _finish(A, b, x, status, k, tol)


@dataclasses.dataclass(frozen=True)
class GMRES:
    """Restarted GMRES(m) for any non-singular A.

    Args:
        max_iter: cap on the total number of Arnoldi steps; ``None`` means ``min(10 n, 1000)``
            (restarts slow convergence, so the cap is looser than CG's).
        restart: Krylov dimension m before a restart.
        rtol: relative tolerance; ``None`` picks it from the dtype.
        atol: absolute tolerance.

    References:
        Saad & Schultz, "GMRES", SIAM J. Sci. Stat. Comput. 7(3), 1986.
    """

    max_iter: int | None = None
    restart: int = 30
    rtol: float | None = None
    atol: float = 0.0

    def __post_init__(self) -> None:
        _check_config("GMRES", self.max_iter, self.rtol, self.atol)
        if self.restart < 1:
            raise ValueError(f"GMRES(restart={self.restart}): restart must be >= 1")

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None) -> LinearSolveResult:
        _check_b("GMRES", b, x0)
        if b.ndim == 2:
            return _block_diagonal(self, matvec, b, x0, self.rtol, self.atol)
        A = _Counted(matvec, b, "GMRES")
        n = b.numel()
        max_iter = self.max_iter if self.max_iter is not None else min(10 * n, 1000)
        rtol = self.rtol if self.rtol is not None else default_rtol(b.dtype)
        tol = max(rtol * _norm(b), self.atol)
        m = min(self.restart, max(n, 1))

        x = torch.zeros_like(b) if x0 is None else x0.clone()
        status = LinearStatus.MAX_ITER
        k = 0
        r = b.clone() if x0 is None else b - A(x)
        while True:
            beta = _norm(r)
            if beta <= tol:
                status = LinearStatus.CONVERGED
                break
            if not math.isfinite(beta):
                status = LinearStatus.NONFINITE
                break
            if k >= max_iter:
                break
            V = [r / beta]
            H = torch.zeros(m + 1, m, dtype=torch.float64)
            y = torch.zeros(0, dtype=torch.float64)
            e1 = torch.zeros(m + 1, dtype=torch.float64)
            e1[0] = beta
            j = 0
            lucky = False
            while j < m and k < max_iter:
                w = A(V[j])
                k += 1
                # Modified Gram-Schmidt, done twice: once is not enough in float32.
                for _ in range(2):
                    for i in range(j + 1):
                        h = torch.dot(V[i], w)
                        H[i, j] += float(h)
                        w = w - h * V[i]
                h_next = _norm(w)
                if not math.isfinite(h_next):
                    # a NaN or infinity from the matvec: LAPACK's least squares would refuse it
                    status = LinearStatus.NONFINITE
                    break
                H[j + 1, j] = h_next
                j += 1
                # gelsd (SVD): the CPU default gelsy gave run-to-run differences of 1 ulp
                # (threaded pivoted QR), which made backward passes non-reentrant.
                y = torch.linalg.lstsq(H[: j + 1, :j], e1[: j + 1, None], driver="gelsd").solution[:, 0]
                res = float(torch.linalg.vector_norm(H[: j + 1, :j] @ y - e1[: j + 1]))
                if h_next <= 1e-14 * beta:
                    lucky = True
                    break
                V.append(w / h_next)
                if res <= tol:
                    break
            if status is LinearStatus.NONFINITE:
                break  # x is the last finite iterate
            yb = y.to(dtype=b.dtype, device=b.device)
            x = x + torch.stack(V[:j], dim=1) @ yb
            r = b - A(x)
            if lucky and _norm(r) > tol:
                status = LinearStatus.BREAKDOWN
                break
        # The loop recomputed r = b - A x after the last update; reuse it (no extra matvec).
        r_norm = _norm(r)
        if status is LinearStatus.MAX_ITER and r_norm <= tol:
            status = LinearStatus.CONVERGED
        if not math.isfinite(r_norm):
            status = LinearStatus.NONFINITE
        return LinearSolveResult(x, status, k, A.calls, r_norm, _norm(b))


@dataclasses.dataclass(frozen=True)
class BiCGStab:
    """BiCGStab for non-symmetric A (van der Vorst 1992).  Two matvecs per iteration.

    Args:
        max_iter: iteration cap; ``None`` means ``min(2 n, 1000)``.
        rtol: relative tolerance; ``None`` picks it from the dtype.
        atol: absolute tolerance.
    """

    max_iter: int | None = None
    rtol: float | None = None
    atol: float = 0.0

    def __post_init__(self) -> None:
        _check_config("BiCGStab", self.max_iter, self.rtol, self.atol)

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None) -> LinearSolveResult:
        _check_b("BiCGStab", b, x0)
        if b.ndim == 2:
            return _block_diagonal(self, matvec, b, x0, self.rtol, self.atol)
        A = _Counted(matvec, b, "BiCGStab")
        n = b.numel()
        max_iter = self.max_iter if self.max_iter is not None else min(2 * n, 1000)
        rtol = self.rtol if self.rtol is not None else default_rtol(b.dtype)
        tol = max(rtol * _norm(b), self.atol)

        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b.clone() if x0 is None else b - A(x)
        r_hat = r.clone()
        rho = alpha = omega = 1.0
        v = torch.zeros_like(b)
        p = torch.zeros_like(b)
        status = LinearStatus.CONVERGED if _norm(r) <= tol else LinearStatus.MAX_ITER
        k = 0
        while k < max_iter and status is LinearStatus.MAX_ITER:
            k += 1
            rho_new = float(torch.dot(r_hat, r))
            if rho_new == 0.0 or omega == 0.0:
                status = LinearStatus.BREAKDOWN
                break
            beta = (rho_new / rho) * (alpha / omega)
            p = r + beta * (p - omega * v)
            v = A(p)
            denom = float(torch.dot(r_hat, v))
            if denom == 0.0:
                status = LinearStatus.BREAKDOWN
                break
            alpha = rho_new / denom
            s = r - alpha * v
            if _norm(s) <= tol:
                x = x + alpha * p
                status = LinearStatus.CONVERGED
                break
            t = A(s)
            tt = float(torch.dot(t, t))
            omega = float(torch.dot(t, s)) / tt if tt > 0 else 0.0
            x = x + alpha * p + omega * s
            r = s - omega * t
            rho = rho_new
            if not math.isfinite(rho_new) or not math.isfinite(omega):
                status = LinearStatus.NONFINITE
                break
            if _norm(r) <= tol:
                status = LinearStatus.CONVERGED
        return _finish(A, b, x, status, k, tol)


@dataclasses.dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series / Richardson iteration: x <- x + alpha (b - A x).

    Equivalent to x_k = alpha sum_{j<k} (I - alpha A)^j b from x0 = 0.  Converges when
    every eigenvalue of alpha A lies in (0, 2): for a Hessian H, alpha < 2 / lambda_max(H).

    Args:
        max_iter: iteration cap (the number of series terms).
        alpha: step; 1 / lambda_max(A) is the natural choice.
        rtol: relative tolerance; ``None`` picks it from the dtype.
        atol: absolute tolerance.

    References:
        Lorraine, Vicol & Duvenaud, "Optimizing millions of hyperparameters by implicit
        differentiation", AISTATS 2020.
    """

    max_iter: int = 100
    alpha: float = 1.0
    rtol: float | None = None
    atol: float = 0.0

    def __post_init__(self) -> None:
        _check_config("Neumann", self.max_iter, self.rtol, self.atol)
        if not self.alpha > 0:
            raise ValueError(f"Neumann(alpha={self.alpha}): alpha must be > 0")

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None) -> LinearSolveResult:
        _check_b("Neumann", b, x0)
        if b.ndim == 2:
            return _block_diagonal(self, matvec, b, x0, self.rtol, self.atol)
        A = _Counted(matvec, b, "Neumann")
        rtol = self.rtol if self.rtol is not None else default_rtol(b.dtype)
        tol = max(rtol * _norm(b), self.atol)
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b.clone() if x0 is None else b - A(x)
        status = LinearStatus.MAX_ITER
        k = 0
        r_norm = _norm(r)
        while True:
            if not math.isfinite(r_norm):
                status = LinearStatus.NONFINITE
                break
            if r_norm <= tol:
                status = LinearStatus.CONVERGED
                break
            if k >= self.max_iter:
                break
            x = x + self.alpha * r
            r = b - A(x)
            r_norm = _norm(r)
            k += 1
        # r is already the true residual at x: no extra matvec needed.
        return LinearSolveResult(x, status, k, A.calls, r_norm, _norm(b))


@dataclasses.dataclass(frozen=True)
class DenseSolve:
    """Materialize A with n matvecs and solve by LU.

    For small problems and for tests: memory O(n^2), time O(n^3).  The matrix is
    kept in the result's dtype; ``torch.linalg.solve`` raises on a singular matrix.
    """

    def __call__(self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None) -> LinearSolveResult:
        _check_b("DenseSolve", b, x0)
        if b.ndim == 2:
            return _block_diagonal(self, matvec, b, x0, None, 0.0)
        A = _Counted(matvec, b, "DenseSolve")
        M = dense_matrix(A, b)
        b_norm = _norm(b)
        try:
            x = torch.linalg.solve(M, b)
        except torch.linalg.LinAlgError:
            nan = torch.full_like(b, math.nan)
            return LinearSolveResult(nan, LinearStatus.BREAKDOWN, 1, A.calls, math.inf, b_norm)
        r_norm = _norm(M @ x - b)
        rtol = default_rtol(b.dtype)
        ok = math.isfinite(r_norm)
        status = LinearStatus.CONVERGED if ok else LinearStatus.NONFINITE
        # A direct solve has no tolerance to miss, but an ill-conditioned matrix shows up here.
        if ok and r_norm > max(1e3 * rtol * b_norm, 0.0) and b_norm > 0:
            status = LinearStatus.BREAKDOWN
        return LinearSolveResult(x, status, 1, A.calls, r_norm, b_norm)


def dense_matrix(matvec: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The n x n matrix of a linear map given as a matvec on 1-D tensors like ``like``."""
    n = like.numel()
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    cols = [matvec(eye[i]) for i in range(n)]
    return torch.stack(cols, dim=1)
