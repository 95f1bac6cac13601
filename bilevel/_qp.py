"""A batched convex quadratic program solver in torch, differentiated through its KKT conditions.

Solves, for each problem of a batch,

    minimize    1/2 x'Qx + q'x
    subject to  Ax = b,  Gx <= h

by a primal-dual interior-point method (Mehrotra's predictor-corrector, as in CVXOPT's
``coneqp`` and qpth's batched PDIPM) with the slacks s = h - Gx >= 0 and multipliers z >= 0
(inequalities) and y (equalities).  Each Newton step eliminates s and z and solves the reduced
(n x n) system

    [ Q + G'DG   A' ] [dx]   [r1]
    [ A          0  ] [dy] = [r2],        D = diag(z / s),

by one batched Cholesky factorization of K = Q + G'DG + rho A'A (adding rho A'A leaves the
solution unchanged, as A dx = r2, and makes K definite wherever the problem has a unique solution
even if Q is only semidefinite) and one of the Schur complement A K^-1 A' (p x p).  Where Q is
positive definite (and well conditioned) and it costs less, the step is solved in the constraint
space instead (`_DualNewton`, qpth's formulation): one Cholesky factorization of
E Q^-1 E' + diag(s/z, 0) (E = [G; A], size m + p), with Q^-1 and E Q^-1 E' computed once per
solve (Q's Cholesky factor also serves the convexity check).  Either way predictor and corrector
share the factorization (in the reduced form the corrector's solve gets one step of iterative
refinement once z/s spans many orders of magnitude).  Steps go 0.99 of the way to the boundary,
and up to 1 - 1e-6 of it once the residuals are within 1e4 tol (an adaptive step: 1 - sigma).
Problems stop one by one when the relative primal and dual residuals fall below
``tol`` and the relative duality gap below ``tol / 1000``, or, in the constraint space, once an
active-set polish passes that test (OSQP's solution polishing: the equality-constrained QP on the
active set guessed by Tapia's indicator, tried once the residuals are below 1e-3 and accepted only
with strict complementarity and linearly independent active rows; see `_polish`: it ends the loop
two to five iterations early on random problems); a stopped problem's step is masked
(``torch.where``), and the loop reads its flags from the device once per iteration.
Infeasibility and unboundedness are recognized by certificates on the iterates (Farkas: z >= 0,
y with G'z + A'y = 0, h'z + b'y < 0; a ray d with Qd = 0, Ad = 0, Gd <= 0, q'd < 0), checked
every third iteration from the fifth and once more for a problem that stalled or hit
``max_iter``; one neither solved nor certified ends with the status ``MAX_ITER`` or ``STALLED``.

The gradient (OptNet, Amos & Kolter 2017): at the solution the KKT conditions
F(x, z, y; Q, q, G, h, A, b) = 0 read

    Qx + q + G'z + A'y = 0,     z * (Gx - h) = 0,     Ax - b = 0,

and the implicit function theorem gives dL/dtheta = -u' dF/dtheta with (dF/d(x, z, y))' u =
(dL/dx, 0, 0).  With w = z * u_z this is the symmetric system

    [ Q   G'          A' ] [u_x]   [dL/dx]
    [ G   -diag(s/z)  0  ] [w  ] = [0    ]
    [ A   0           0  ] [u_y]   [0    ],

solved, where the solver worked in the constraint space, by one Cholesky factorization of
E Q^-1 E' + diag(s/z, 0) (eliminating u_x; size m + p; at an answer the active-set polish gave,
with the polish's factor, the same matrix to rounding), else (or where that factorization fails)
by one batched LU factorization of the whole matrix (see `_adjoint` for why not with the
interior-point method's reduced matrix), and

    dL/dq = -u_x,   dL/dQ = -(u_x x' + x u_x')/2,   dL/dG = -(w x' + z u_x'),   dL/dh = w,
    dL/dA = -(u_y x' + y u_x'),   dL/db = u_y.

The solution map is differentiable where strict complementarity holds (each constraint has
s_i > 0 or z_i > 0) and the active constraints' rows with A's have full row rank.  At a weakly
active constraint (s_i = z_i = 0) it has one-sided derivatives only; there the gradient returned
is that of the interior-point path's end (the weight s_i / z_i as found by the solver), which lies
between the one-sided ones (the constraint counts as partly active).  Where the active rows and
A are linearly dependent (a redundant active constraint) the multipliers are not unique but x
is: dL/dq and dL/dQ stay exact, dL/dG and dL/dh are split between the dependent rows.

References:
    Amos & Kolter, "OptNet: differentiable optimization as a layer in neural networks",
    ICML 2017.  Vandenberghe, "The CVXOPT linear and quadratic cone program solvers", 2010.
    Nocedal & Wright, "Numerical Optimization", 2nd ed., section 16.6 (Mehrotra's method).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._errors import (
    BilevelError,
    BilevelWarning,
    ConvergenceError,
    LinearSolveError,
    NonFiniteError,
    StructureError,
)

__all__ = [
    "QPError",
    "QPInfeasibleError",
    "QPInfo",
    "QPNonConvexError",
    "QPStatus",
    "QPUnboundedError",
    "default_tol",
    "solve_qp",
]


class QPStatus(enum.Enum):
    """Why the QP solver stopped, for one problem of a batch.  `message` says what to do."""

    SOLVED = "solved: primal and dual residuals and the duality gap below tol"
    MAX_ITER = (
        "hit the iteration cap (max_iter) before tol: raise max_iter, loosen tol, or rescale the "
        "problem (entries of very different magnitudes slow interior-point methods)"
    )
    PRIMAL_INFEASIBLE = (
        "primal infeasible: no x satisfies Ax = b and Gx <= h (a certificate z >= 0, y with "
        "G'z + A'y = 0 and h'z + b'y < 0 was found); check h and b"
    )
    DUAL_INFEASIBLE = (
        "unbounded below (dual infeasible): a direction d with Qd = 0, Ad = 0, Gd <= 0 and q'd < 0 "
        "was found; add constraints or a positive definite Q"
    )
    STALLED = (
        "stalled before tol: the reduced KKT matrix could no longer be factorized (the iterate is "
        "at the limit of the working precision); its residuals are in the info: loosen tol, use "
        "float64, or rescale the problem"
    )
    NONFINITE = "a NaN or infinity appeared in the iterates: rescale the problem"

    @property
    def message(self) -> str:
        return self.value


#: Per-problem status codes of `QPInfo.codes`: a status's index here.
_STATUSES: tuple[QPStatus, ...] = tuple(QPStatus)
_RUNNING = -1
_SOLVED, _MAX_ITER, _PRIMAL_INF, _DUAL_INF, _STALLED, _NONFINITE = (
    _STATUSES.index(s)
    for s in (
        QPStatus.SOLVED,
        QPStatus.MAX_ITER,
        QPStatus.PRIMAL_INFEASIBLE,
        QPStatus.DUAL_INFEASIBLE,
        QPStatus.STALLED,
        QPStatus.NONFINITE,
    )
)


class QPError(BilevelError):
    """A quadratic program that cannot be solved or differentiated as given.

    Attributes:
        problems: the indices (in the batch) of the problems at fault; ``(0,)`` for one problem.
    """

    def __init__(self, *args: object, problems: tuple[int, ...] = (), info: Any = None) -> None:
        super().__init__(*args, info=info)
        self.problems = problems


class QPInfeasibleError(QPError):
    """No point satisfies the constraints (primal infeasibility)."""


class QPUnboundedError(QPError):
    """The objective is unbounded below on the feasible set, or its minimizer is not unique."""


class QPNonConvexError(QPError, ValueError):
    """Q is not positive semidefinite: the problem is not convex."""


@dataclasses.dataclass(frozen=True)
class QPInfo:
    """Diagnostics of one batched QP solve.  Tensors have shape (B,) (B = 1 for one problem).

    Attributes:
        codes: per-problem status codes, the index of the status in ``tuple(QPStatus)``.
        n_iter: per-problem interior-point iterations until it stopped.
        primal_residual: max(||Ax - b||_inf, ||Gx + s - h||_inf) at the answer.
        dual_residual: ||Qx + q + G'z + A'y||_inf at the answer.
        gap: the duality gap s'z at the answer.
        iterations: iterations the batch ran (the slowest problem's).
    """

    codes: torch.Tensor
    n_iter: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    gap: torch.Tensor
    iterations: int

    @property
    def statuses(self) -> tuple[QPStatus, ...]:
        """The status of each problem."""
        return tuple(_STATUSES[c] for c in self.codes.tolist())

    @property
    def converged(self) -> bool:
        """Whether every problem was solved."""
        return bool((self.codes == 0).all())


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Inputs with a leading batch dimension of size 1 (shared) or B; G, A with m or p = 0 rows."""

    Q: torch.Tensor  # (1|B, n, n), symmetrized
    q: torch.Tensor  # (1|B, n)
    G: torch.Tensor  # (1|B, m, n)
    h: torch.Tensor  # (1|B, m)
    A: torch.Tensor  # (1|B, p, n)
    b: torch.Tensor  # (1|B, p)
    B: int
    batched: bool

    @property
    def n(self) -> int:
        return self.Q.shape[-1]

    @property
    def m(self) -> int:
        return self.G.shape[-2]

    @property
    def p(self) -> int:
        return self.A.shape[-2]


def _where(batched: bool, index: int) -> str:
    return f"problem {index} of the batch" if batched else "the problem"


def _prepare(
    who: str,
    Q: Any,
    q: Any,
    G: Any,
    h: Any,
    A: Any,
    b: Any,
) -> tuple[_Problem, tuple[torch.Tensor | None, ...]]:
    """Check shapes, dtypes and devices; give every input a leading batch dimension."""
    if (G is None) != (h is None):
        raise TypeError(f"{who}: give G and h together (Gx <= h), or neither")
    if (A is None) != (b is None):
        raise TypeError(f"{who}: give A and b together (Ax = b), or neither")
    args = {"Q": Q, "q": q, "G": G, "h": h, "A": A, "b": b}
    for name, t in args.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}")
    if not isinstance(Q, torch.Tensor) or not isinstance(q, torch.Tensor):
        raise TypeError(f"{who}: Q and q are required Tensors")
    if not Q.is_floating_point():
        raise TypeError(f"{who}: Q has dtype {Q.dtype}; expected float32 or float64")
    for name, t in args.items():
        if t is None:
            continue
        if t.dtype != Q.dtype:
            raise StructureError(f"{who}: {name} has dtype {t.dtype} but Q has {Q.dtype}; use one dtype")
        if t.device != Q.device:
            raise StructureError(f"{who}: {name} is on {t.device} but Q is on {Q.device}; use one device")
    matrices = {"Q": Q, "G": G, "A": A}
    vectors = {"q": q, "h": h, "b": b}
    for name, t in matrices.items():
        if t is not None and t.ndim not in (2, 3):
            raise StructureError(
                f"{who}: {name} has shape {tuple(t.shape)}; expected (rows, n) or (B, rows, n)"
            )
    for name, t in vectors.items():
        if t is not None and t.ndim not in (1, 2):
            raise StructureError(f"{who}: {name} has shape {tuple(t.shape)}; expected (k,) or (B, k)")
    sizes = {
        name: t.shape[0]
        for name, t in args.items()
        if t is not None and t.ndim == (3 if name in matrices else 2)
    }
    if len(set(sizes.values()) - {1}) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise StructureError(f"{who}: the inputs' batch sizes differ ({listed}); use one B (or 1 to share)")
    B = max(sizes.values(), default=1)
    batched = bool(sizes)
    n = Q.shape[-1]
    if Q.shape[-2] != n:
        raise StructureError(f"{who}: Q has shape {tuple(Q.shape)}; it must be square (n, n)")
    if q.shape[-1] != n:
        raise StructureError(f"{who}: q has {q.shape[-1]} entries but Q is {n} x {n}")
    for mat, vec in (("G", "h"), ("A", "b")):
        M, v = args[mat], args[vec]
        if M is None:
            continue
        if M.shape[-1] != n:
            raise StructureError(f"{who}: {mat} has {M.shape[-1]} columns but Q is {n} x {n}")
        if v.shape[-1] != M.shape[-2]:
            raise StructureError(f"{who}: {vec} has {v.shape[-1]} entries but {mat} has {M.shape[-2]} rows")
    if A is not None and A.shape[-2] > n:
        raise QPError(
            f"{who}: A has {A.shape[-2]} rows but x has {n} entries: an equality matrix with more rows "
            "than columns has no full row rank; drop redundant equalities"
        )

    def mat3(t: torch.Tensor | None, rows: int) -> torch.Tensor:
        if t is None:
            return Q.new_zeros(1, rows, n)
        return t if t.ndim == 3 else t.unsqueeze(0)

    def vec2(t: torch.Tensor | None) -> torch.Tensor:
        if t is None:
            return Q.new_zeros(1, 0)
        return t if t.ndim == 2 else t.unsqueeze(0)

    Qb = mat3(Q, n)
    prob = _Problem(
        Q=0.5 * (Qb + Qb.mT),
        q=vec2(q),
        G=mat3(G, 0),
        h=vec2(h),
        A=mat3(A, 0),
        b=vec2(b),
        B=B,
        batched=batched,
    )
    return prob, (Q, q, G, h, A, b)


def _check_values(who: str, prob: _Problem, q_info: torch.Tensor) -> None:
    """Non-finite entries, Q not PSD, A without full row rank: typed errors naming the problem.

    ``q_info``: the info of ``torch.linalg.cholesky_ex(prob.Q)`` (0 where Q is positive
    definite, hence PSD; only where it is not is Q tested again with a shift).
    """
    B, batched = prob.B, prob.batched
    names = ("Q", "q", "G", "h", "A", "b")
    inputs = (prob.Q, prob.q, prob.G, prob.h, prob.A, prob.b)
    # One reduction per input, summed: a NaN or infinity anywhere makes its problem's sum
    # non-finite (finite sums that overflow are told apart below, per input).
    sums = [t.sum((1, 2) if t.ndim == 3 else 1) for t in inputs if t.numel()]
    total = sums[0] if sums else prob.Q.new_zeros(1)
    for t in sums[1:]:
        total = total + t
    bad = (total - total) != 0  # t - t is 0 for finite t, NaN otherwise: isfinite in two ops
    eps = torch.finfo(prob.Q.dtype).eps
    rank_bad: torch.Tensor | None = None
    if prob.p:
        AAt = prob.A @ prob.A.mT
        L, a_info = torch.linalg.cholesky_ex(torch.nan_to_num(AAt))
        d = L.diagonal(dim1=-2, dim2=-1).abs()
        # A relative pivot below sqrt(eps) means AA' is singular to working precision.
        rank_bad = (a_info != 0) | (d.amin(-1) <= math.sqrt(eps) * d.amax(-1).clamp_min(eps))
    flags = torch.stack(
        [bad.expand(B), (q_info != 0).expand(B)] + ([rank_bad.expand(B)] if rank_bad is not None else [])
    ).cpu()
    any_flag = flags.any(-1).tolist()  # one host read for the three tests
    if any_flag[1]:
        # Q is PSD up to rounding iff Q + delta I is positive definite for a shift delta far
        # above rounding but far below the scale of Q's entries.
        scale = prob.Q.abs().amax(dim=(-2, -1), keepdim=True)
        delta = math.sqrt(eps) * (1.0 + scale)
        eye = torch.eye(prob.n, dtype=prob.Q.dtype, device=prob.Q.device)
        _, shifted_info = torch.linalg.cholesky_ex(torch.nan_to_num(prob.Q) + delta * eye)
        flags[1] = (shifted_info != 0).expand(B).cpu()
        any_flag[1] = bool(flags[1].any())
    which: list[str] = []
    if any_flag[0]:
        i = int(flags[0].nonzero()[0])
        for nm, t in zip(names, inputs):
            if t.numel() and not bool(torch.isfinite(t[min(i, t.shape[0] - 1)]).all()):
                which.append(nm)
    if which:
        raise NonFiniteError(
            f"{who}: {_where(batched, i)} has NaN or infinite entries in {', '.join(which)}",
        )
    if any_flag[1]:
        idx = tuple(int(i) for i in flags[1].nonzero().flatten())
        raise QPNonConvexError(
            f"{who}: Q of {_where(batched, idx[0])} is not positive semidefinite (Cholesky of Q + "
            f"{math.sqrt(eps):.1e}(1 + max|Q|) I failed): the problem is not convex; use a PSD Q, e.g. "
            "L L' + eps I",
            problems=idx,
        )
    if rank_bad is not None and any_flag[2]:
        idx = tuple(int(i) for i in flags[2].nonzero().flatten())
        raise QPError(
            f"{who}: the equality matrix A of {_where(batched, idx[0])} has no full row rank (AA' is "
            "singular): drop redundant equalities Ax = b (their multipliers, and so the gradient, are "
            "not unique)",
            problems=idx,
        )


# ---------------------------------------------------------------------------------------------
# The reduced KKT system


class _KKT:
    """The factorization of [[H, A'], [A, 0]] with H = Q + G'DG, for a batch; `solve` reuses it."""

    def __init__(self, prob: _Problem, d: torch.Tensor | None, rhoAtA: torch.Tensor | None) -> None:
        H = prob.Q
        if d is not None and prob.m:
            H = H + (prob.G.mT * d.unsqueeze(-2)) @ prob.G
        if rhoAtA is not None:
            H = H + rhoAtA
        self.L, info = torch.linalg.cholesky_ex(H)
        self.ok = info == 0
        self.A = prob.A
        self.p = prob.p
        self.M: torch.Tensor | None = None
        self.LS: torch.Tensor | None = None
        if self.p:
            self.M = torch.cholesky_solve(prob.A.mT.expand(self.L.shape[0], -1, -1), self.L)
            self.LS, info_s = torch.linalg.cholesky_ex(prob.A @ self.M)
            self.ok = self.ok & (info_s == 0)

    def solve(
        self, r1: torch.Tensor, r2: torch.Tensor | None, rho: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """u, v with H u + A'v = r1, A u = r2 (r2 = None: zero).  r1 (B, n), r2 (B, p)."""
        if not self.p:
            return torch.cholesky_solve(r1.unsqueeze(-1), self.L).squeeze(-1), None
        assert self.M is not None and self.LS is not None and rho is not None
        # K u + A'v = r1 + rho A'r2 with K = H + rho A'A (the same equations, as A u = r2).
        if r2 is not None:
            r1 = r1 + rho.squeeze(-1) * (r2.unsqueeze(-2) @ self.A).squeeze(-2)
        u = torch.cholesky_solve(r1.unsqueeze(-1), self.L)
        s = self.A @ u
        if r2 is not None:
            s = s - r2.unsqueeze(-1)
        v = torch.cholesky_solve(s, self.LS)
        return (u - self.M @ v).squeeze(-1), v.squeeze(-1)


# ---------------------------------------------------------------------------------------------
# The interior-point method


@dataclasses.dataclass(frozen=True)
class _Solution:
    """The iterates at the answer, (B, n), (B, m), (B, m), (B, p), and the diagnostics."""

    x: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    y: torch.Tensor
    info: QPInfo
    #: the constraint-space matrices, where the solver used them (the backward reuses them)
    space: _DualSpace | None = None
    #: where the active-set polish gave every problem's answer: its Cholesky factor (B, k, k)
    #: and active rows (B, k, 1), the backward's matrix at that answer (see `_adjoint`)
    polished: tuple[torch.Tensor, torch.Tensor] | None = None


def _mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product: M (B, r, c), v (B, c) -> (B, r).

    ``bmm`` on equal batch sizes: a third of the dispatches of a broadcasting ``@``, which
    matters at batch 1, where the interior-point loop is bound by per-op overhead.
    """
    return torch.bmm(M, v.unsqueeze(-1)).squeeze(-1)


def _mtv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched M'v: M (B, r, c), v (B, r) -> (B, c)."""
    return torch.bmm(v.unsqueeze(-2), M).squeeze(-2)


#: The contraction length from which `_bmv` multiplies a batch of rows instead of columns.
_ROW_FORM_MIN = 32


def _bmv(
    M: torch.Tensor, Mt: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """c + alpha M v for columns v (B, k, 1) and c (B, r, 1) (``None``: 0); ``Mt`` is M' (B, k, r).

    With a batch of more than one and k >= 32 the product is formed as the row v' times M' (Mt
    stored contiguously): CPU ``bmm`` of (B, r, k) x (B, k, 1) runs 3-7x slower than
    (B, 1, k) x (B, k, r) there (530 against 145 us at B = 64, r = k = 50).  A batch of one keeps
    the column (one dispatch instead of three, and no slower).
    """
    if v.shape[0] > 1 and v.shape[-2] >= _ROW_FORM_MIN:
        if c is None:
            return torch.bmm(v.mT, Mt).mT
        return torch.baddbmm(c.mT, v.mT, Mt, alpha=alpha).mT
    if c is None:
        return torch.bmm(M, v)
    return torch.baddbmm(c, M, v, alpha=alpha)


def _col_inf_norm(v: torch.Tensor) -> torch.Tensor:
    """max_i |v_i| of columns v (B, k, c) -> (B,) (0 for k = 0), one op."""
    return torch.linalg.vector_norm(v, math.inf, dim=(-2, -1)) if v.shape[-2] else v.new_zeros(v.shape[:-2])


def _inf_norm(v: torch.Tensor) -> torch.Tensor:
    """max_i |v_i| over the last dimension (0 for an empty one), one op."""
    return torch.linalg.vector_norm(v, math.inf, dim=-1) if v.shape[-1] else v.new_zeros(v.shape[:-1])


@dataclasses.dataclass(frozen=True)
class _Newton:
    """One interior-point iteration's linear algebra: directions for any complementarity target."""

    prob: _Problem
    kkt: _KKT
    rho: torch.Tensor | None
    s: torch.Tensor
    z: torch.Tensor
    d: torch.Tensor  # z / s
    r1: torch.Tensor  # -r_dual - G'(d * r_ineq), the part of the right-hand side that rc leaves
    rp_in: torch.Tensor
    r2: torch.Tensor | None  # -r_eq

    def direction(
        self, rc: torch.Tensor, refine: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(dx, ds, dz, dy) of the Newton system with s * dz + z * ds = -rc, as columns (B, k, 1)
        like rc (B, m, 1)."""
        dx, ds, dz, dy = self._direction(rc.squeeze(-1), refine)
        return dx.unsqueeze(-1), ds.unsqueeze(-1), dz.unsqueeze(-1), None if dy is None else dy.unsqueeze(-1)

    def _direction(
        self, rc: torch.Tensor, refine: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`direction` on vectors (B, k)."""
        prob = self.prob
        G, A = prob.G, prob.A
        r1 = self.r1 + _mtv(G, rc / self.s)
        dx, dy = self.kkt.solve(r1, self.r2, self.rho)
        Gdx = _mv(G, dx)
        if refine:
            # One step of iterative refinement, with the residual computed from Q, G and D
            # unformed: near the solution D = z/s spans many orders of magnitude, so the factor
            # of Q + G'DG has lost Q's digits (an error of eps * max D), and the dual residual
            # would stall at that error instead of reaching tol.
            res1 = r1 - _mv(prob.Q, dx) - _mtv(G, self.d * Gdx)
            res2 = None
            if dy is not None:
                res1 = res1 - _mtv(A, dy)
                assert self.r2 is not None
                res2 = self.r2 - _mv(A, dx)
            cx, cy = self.kkt.solve(res1, res2, self.rho)
            dx = dx + cx
            if dy is not None and cy is not None:
                dy = dy + cy
            Gdx = _mv(G, dx)
        dz = self.d * (Gdx + self.rp_in) - rc / self.s
        ds = -self.rp_in - Gdx
        return dx, ds, dz, dy

    def affine(self, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ds, dz) of the predictor (the step length and Mehrotra's second-order term need no
        more), columns (B, m, 1) like rc."""
        _, ds, dz, _ = self._direction(rc.squeeze(-1), False)
        return ds.unsqueeze(-1), dz.unsqueeze(-1)

    @property
    def ok(self) -> torch.Tensor:
        """Per problem: the factorization succeeded, (B,) bool."""
        return self.kkt.ok


def _max_step(v: torch.Tensor, dv: torch.Tensor, neg_eta: torch.Tensor | None = None) -> torch.Tensor:
    """eta times the largest step in [0, 1] that keeps v + a dv >= 0 for v > 0 (B, k, 1).

    1 / max(1, max_i -dv_i / v_i): one division and one reduction for the whole batch.
    ``neg_eta``: -eta, (B,), and the step is (B,); ``None``: eta = 1, and the step is (B, 1, 1)
    (what scales a direction).  NaN where dv has one.
    """
    r = (dv / v).amin((-2, -1), keepdim=neg_eta is None).clamp(max=-1.0)
    return r.reciprocal().neg_() if neg_eta is None else neg_eta / r


@dataclasses.dataclass(frozen=True)
class _DualSpace:
    """What the constraint-space Newton step reuses across iterations (Q positive definite).

    With E = [G; A] (k = m + p rows): Q^-1, Q^-1 E' and E Q^-1 E', formed once per solve.  Q^-1
    is formed explicitly (Q is well conditioned where this space is used) so that each
    iteration's products with it are one ``bmm`` each, not a triangular solve pair.
    """

    Qinv: torch.Tensor  # (B, n, n), symmetric
    QinvEt: torch.Tensor  # (B, n, k)
    EQinvEt: torch.Tensor  # (B, k, k)
    E: torch.Tensor  # (B, k, n)
    #: E' and E Q^-1, contiguous where B > 1 (the row form of `_bmv`), else views
    Et: torch.Tensor  # (B, n, k)
    EQinv: torch.Tensor  # (B, k, n)

    @staticmethod
    def build(prob: _Problem, LQ: torch.Tensor) -> _DualSpace:
        """From prob (matrices expanded to the batch) and Q's Cholesky factor LQ (1 or B, n, n)."""
        E = torch.cat([prob.G, prob.A], -2) if prob.p else prob.G
        Qinv = torch.cholesky_inverse(LQ).expand(prob.B, -1, -1)
        QinvEt = torch.bmm(Qinv, E.mT)
        Et, EQinv = E.mT, QinvEt.mT
        if prob.B > 1:
            Et, EQinv = Et.contiguous(), EQinv.contiguous()
        return _DualSpace(Qinv, QinvEt, torch.bmm(E, QinvEt), E, Et, EQinv)

    def select(self, sel: torch.Tensor) -> _DualSpace:
        """The rows ``sel`` of the batch."""
        return _DualSpace(*(getattr(self, f.name)[sel] for f in dataclasses.fields(self)))

    def factor(self, w: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The Cholesky factor of E Q^-1 E' + diag(w, 0) (w (B, m); p zeros) and its info (B,)."""
        M = self.EQinvEt.clone()
        diag = M.diagonal(dim1=-2, dim2=-1)
        (diag[:, : w.shape[-1]] if p else diag).add_(w)
        return torch.linalg.cholesky_ex(M)


def _chol_solve(L: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(L L')^-1 r for a lower Cholesky factor L (B, k, k) and r (B, k, c).

    Two triangular solves: ``torch.cholesky_solve`` copies the factor on every call (to column
    major), which at batch 64 costs as much as the solves themselves.
    """
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, r, upper=False), upper=True)


class _DualNewton:
    """One iteration's Newton directions in the constraint space, for Q positive definite.

    Eliminating dx = Q^-1 (-r_d - E' dl) (dl = (dz, dy)) leaves the (m + p) system

        (E Q^-1 E' + diag(s/z, 0)) dl = E Q^-1 (-r_d) - (-r_ineq + rc/z, -r_eq),

    qpth's formulation: the per-iteration work is one Cholesky factorization of size m + p (no
    Q + G'DG to form: 2 m n^2 flops less per iteration), and the weights enter as s/z on the
    diagonal, where an active constraint's s/z ~ 0 and an inactive one's huge value are both
    harmless to rounding (the reduced form's z/s multiplies rounding errors instead).
    """

    def __init__(
        self,
        prob: _Problem,
        ds_: _DualSpace,
        s: torch.Tensor,
        z: torch.Tensor,
        rd: torch.Tensor,
        rp: torch.Tensor,
        eye: torch.Tensor | None = None,
    ) -> None:
        """Columns: s, z (B, m, 1); rd the dual residual (B, n, 1); rp the primal residuals
        (Gx + s - h, Ax - b), (B, m + p, 1); ``eye``: the identity (m, m), used where p = 0."""
        self.prob, self.space, self.s, self.z = prob, ds_, s, z
        m, p = prob.m, prob.p
        if eye is not None and not p:
            # E Q^-1 E' + I diag(s/z) in one op (the row s/z scales the identity's columns)
            LS, info = torch.linalg.cholesky_ex(torch.addcmul(ds_.EQinvEt, eye, (s / z).mT))
        else:
            LS, info = ds_.factor((s / z).squeeze(-1), p)
        self.LS, self.LSt = LS, LS.mT
        self.ok = info == 0
        self.u0 = _bmv(ds_.Qinv, ds_.Qinv, rd).neg_()  # Q^-1 (-r_d), (B, n, 1)
        # the right-hand side without its rc part: E Q^-1 (-r_d) + (r_ineq, r_eq), (B, m + p, 1)
        self.base = _bmv(ds_.E, ds_.Et, self.u0, rp)
        self.rp_in = rp[:, :m] if p else rp
        self.Gt = ds_.Et[..., :m] if p else ds_.Et
        self.pad = s.new_zeros(s.shape[0], p, 1) if p else None

    def _dl(self, rc: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            r = self.base - torch.cat([rc / self.z, self.pad], -2)
        else:
            r = torch.addcdiv(self.base, rc, self.z, value=-1.0)
        return torch.linalg.solve_triangular(
            self.LSt, torch.linalg.solve_triangular(self.LS, r, upper=False), upper=True
        )

    def affine(self, rc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ds, dz) of the predictor.  ds comes from the primal rows, as in `direction` (from
        s * dz + z * ds = -rc instead, two products fewer, infeasible problems no longer grew
        their iterates into a certificate)."""
        dl = self._dl(rc)
        dx = _bmv(self.space.QinvEt, self.space.EQinv, dl, self.u0, -1.0)
        ds = _bmv(self.prob.G, self.Gt, dx, self.rp_in).neg_()
        return ds, dl if self.pad is None else dl[:, : self.prob.m]

    def direction(
        self, rc: torch.Tensor, refine: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(dx, ds, dz, dy) of the Newton system with s * dz + z * ds = -rc, as columns (B, k, 1)
        like rc (B, m, 1)."""
        m = self.prob.m
        dl = self._dl(rc)
        dx = _bmv(self.space.QinvEt, self.space.EQinv, dl, self.u0, -1.0)
        # ds from the primal rows (G dx + ds = -r_ineq), which the step then keeps satisfied
        ds = _bmv(self.prob.G, self.Gt, dx, self.rp_in).neg_()
        if self.pad is None:
            return dx, ds, dl, None
        return dx, ds, dl[:, :m], dl[:, m:]


@dataclasses.dataclass(frozen=True)
class _Polish:
    """What the active-set polish (`_polish`) reuses across iterations, constraint space only.

    u = Q^-1 (-q) (B, n, 1) and r = E u - e (B, k, 1) (e = (h, b)), from the starting point;
    ``piv_min`` (B, k): the smallest Cholesky pivot accepted for each row, sqrt(sqrt(eps) M_ii),
    below which the guessed active rows count as linearly dependent; ``eye`` (k, k) and
    ``zero`` (B, k, 1) fill the inactive rows; ``eq`` (B, p, 1) true (equalities are active).
    """

    u: torch.Tensor
    r: torch.Tensor
    piv_min: torch.Tensor
    eye: torch.Tensor
    zero: torch.Tensor
    eq: torch.Tensor | None

    def select(self, sel: torch.Tensor) -> _Polish:
        """The rows ``sel`` of the batch."""
        eq = None if self.eq is None else self.eq[sel]
        return _Polish(self.u[sel], self.r[sel], self.piv_min[sel], self.eye, self.zero[sel], eq)


def _polish(
    space: _DualSpace, pol: _Polish, a: torch.Tensor, e_c: torch.Tensor, tol: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The solution of the equality-constrained QP on a guessed active set.

    With the rows where ``a`` is true taken as active (and the equalities), x = Q^-1 (-q - E_A' l),
    (E_A Q^-1 E_A') l = E_A Q^-1 (-q) - e_A: one Cholesky factorization of size m + p (the
    inactive rows and columns replaced by the identity), as OSQP's solution polishing does.
    Where the guess is right, this is the answer to rounding, reached in fewer iterations than
    the interior point's last ones (which shrink the duality gap geometrically): the active
    constraints hold exactly, s = 0 there and z = 0 on the inactive ones.

    Args:
        space: the constraint-space matrices; pol: `_Polish`; a: the guess, (B, m, 1) bool;
            e_c: (h, b), (B, k, 1); tol: (B,), the least margin by which the active
            rows' multipliers and the inactive rows' slacks must be positive.

    Returns:
        x, s, z, y (columns), Ex (B, k, 1), and per problem (B,) whether the candidate is usable:
        the factorization succeeded with no pivot below ``pol.piv_min`` (the active rows are
        linearly independent) and every multiplier and slack exceeds ``tol`` (strict
        complementarity: a weakly active constraint, s = z = 0, is left to the interior point,
        whose gradient there is documented in `_adjoint`).  Whether x solves the QP to tol is
        for the caller's residual test.  Then the factor L (B, k, k) and the active rows
        (B, k, 1, the equalities' included).
    """
    m = a.shape[-2]
    act = torch.cat([a, pol.eq], -2) if pol.eq is not None else a
    M = torch.where(act & act.mT, space.EQinvEt, pol.eye)
    L, info = torch.linalg.cholesky_ex(M)
    lam = _chol_solve(L, torch.where(act, pol.r, pol.zero))
    x = _bmv(space.QinvEt, space.EQinv, lam, pol.u, -1.0)
    Ex = _bmv(space.E, space.Et, x)
    slack = e_c - Ex
    zero = pol.zero
    if pol.eq is not None:
        lam_m, y, slack, zero = lam[:, :m], lam[:, m:], slack[:, :m], zero[:, :m]
    else:
        lam_m, y = lam, lam[:, m:]
    margin = torch.where(a, lam_m, slack).amin((-2, -1))
    usable = (info == 0) & (L.diagonal(dim1=-2, dim2=-1) >= pol.piv_min).all(-1) & (margin > tol)
    return x, torch.where(a, zero, slack), torch.where(a, lam_m, zero), y, Ex, usable, L, act


def _certificates(
    prob: _Problem,
    x: torch.Tensor,
    z: torch.Tensor,
    y: torch.Tensor,
    Qx: torch.Tensor,
    Gx: torch.Tensor,
    dual_part: torch.Tensor,
    scale_p: torch.Tensor,
    scale_d: torch.Tensor,
) -> torch.Tensor | None:
    """Per problem: `_PRIMAL_INF`, `_DUAL_INF` where the iterate certifies it, else `_RUNNING`;
    ``None`` where no problem's iterate has grown enough for either (none is certified).

    The iterates grow without bound on such problems, so the tests are relative to their size:
    z >= 0, y with G'z + A'y = 0 and h'z + b'y < 0 prove Ax = b, Gx <= h infeasible (Farkas);
    d = x with Qd = 0, Ad = 0, Gd <= 0 and q'd < 0 proves the objective unbounded below.
    ``dual_part`` is G'z + A'y.
    """
    eps = torch.finfo(x.dtype).eps
    eps_inf = 1e4 * eps
    B = x.shape[0]
    h_B, b_B, q_B = prob.h.expand(B, -1), prob.b.expand(B, -1), prob.q.expand(B, -1)
    zy = torch.maximum(_inf_norm(z), _inf_norm(y)).clamp_min(eps)
    xn = _inf_norm(x).clamp_min(eps)
    big = 1e6 * scale_d * scale_p
    grown_zy, grown_x = zy > big, xn > big
    # Both certificates need iterates grown past `big`: where none has, one host read spares
    # the tests (a converging problem's iterates stay near the data's scale).
    if not bool((grown_zy | grown_x).any()):
        return None
    p_cert = (
        (_inf_norm(dual_part) <= eps_inf * zy * scale_d)
        & ((h_B * z).sum(-1) + (b_B * y).sum(-1) < -math.sqrt(eps) * zy * scale_p)
        & grown_zy
    )
    d_cert = (
        (_inf_norm(Qx) <= eps_inf * xn * scale_d)
        & ((Gx.amax(-1) if prob.m else xn.new_zeros(())) <= eps_inf * xn * scale_p)
        & ((q_B * x).sum(-1) < -math.sqrt(eps) * xn)
        & grown_x
    )
    if prob.p:
        d_cert = d_cert & (_inf_norm(_mv(prob.A, x)) <= eps_inf * xn * scale_p)
    return torch.where(p_cert, _PRIMAL_INF, torch.where(d_cert, _DUAL_INF, _RUNNING))


def _constraint_space_pays(n: int, m: int, p: int) -> bool:
    """Whether one Cholesky of size m + p per iteration costs less than forming and factorizing
    Q + G'DG (n x n), the test for the constraint-space step (where Q is positive definite)."""
    return m > 0 and (m + p) ** 3 <= 6 * m * n * n + n**3


def _ipm(
    prob: _Problem,
    tol: float,
    max_iter: int,
    chol_Q: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> _Solution:
    """Mehrotra's predictor-corrector on the batch, from CVXOPT's starting point.

    ``chol_Q``: ``torch.linalg.cholesky_ex(prob.Q)`` where the caller has it already.
    """
    B, n, m, p = prob.B, prob.n, prob.m, prob.p
    prob_in = prob
    # Shared matrices as (B, ...) views (no copies), for `_mv` and `_mtv`.
    prob = dataclasses.replace(
        prob, Q=prob.Q.expand(B, n, n), G=prob.G.expand(B, m, n), A=prob.A.expand(B, p, n)
    )
    Q, q, G, h, A, b = prob.Q, prob.q, prob.G, prob.h, prob.A, prob.b
    dt, dev = Q.dtype, Q.device
    eps = torch.finfo(dt).eps
    scale_p = 1.0 + (torch.maximum(_inf_norm(h), _inf_norm(b)) if p else _inf_norm(h)).expand(B)
    scale_d = 1.0 + _inf_norm(q).expand(B)
    q_B = q.expand(B, n)
    h_B = h.expand(B, m)
    b_B = b.expand(B, p)

    # The constraint-space Newton step (`_DualNewton`) where Q is positive definite and one
    # factorization of size m + p costs less than forming and factorizing Q + G'DG (n x n).
    space: _DualSpace | None = None
    pol: _Polish | None = None
    if _constraint_space_pays(n, m, p):
        LQ, q_info = chol_Q if chol_Q is not None else torch.linalg.cholesky_ex(prob_in.Q)
        piv = LQ.diagonal(dim1=-2, dim2=-1)
        # well conditioned enough that Q^-1 E' keeps its digits (pivot ratio^2 = 1/cond)
        flags0 = torch.stack(
            [(q_info == 0).all(), (piv.amin(-1) >= math.sqrt(math.sqrt(eps)) * piv.amax(-1)).all()]
        ).tolist()
        if all(flags0):
            space = _DualSpace.build(prob, LQ)
            # Starting point (CVXOPT's, below) in this space: with s = h - Gx and z = Gx - h
            # its KKT system is the Newton system's with s/z = 1.
            LS, s_info = space.factor(torch.ones(1, m, dtype=dt, device=dev).expand(B, m), p)
            if bool((s_info == 0).all()):
                u = _bmv(space.Qinv, space.Qinv, q_B.unsqueeze(-1)).neg_()
                e = torch.cat([h_B, b_B], -1) if p else h_B
                r0 = _bmv(space.E, space.Et, u).sub_(e.unsqueeze(-1))
                lam = _chol_solve(LS, r0)
                x = _bmv(space.QinvEt, space.EQinv, lam, u, -1.0).squeeze(-1)
                y = lam.squeeze(-1)[:, m:]
                k = m + p
                pol = _Polish(
                    u,
                    r0,
                    space.EQinvEt.diagonal(dim1=-2, dim2=-1).mul(math.sqrt(eps)).sqrt_(),
                    torch.eye(k, dtype=dt, device=dev),
                    x.new_zeros(B, k, 1),
                    torch.ones(B, p, 1, dtype=torch.bool, device=dev) if p else None,
                )
            else:  # A without full row rank (not checked): the reduced form names the problem
                space = pol = None

    rho: torch.Tensor | None = None
    rhoAtA: torch.Tensor | None = None
    if p and space is None:
        # rho scales A'A to Q's magnitude, so that K = H + rho A'A is neither dominated by it nor
        # left singular where Q is.
        a2 = (A * A).sum(-1).amax(-1).clamp_min(eps)
        rho = ((1.0 + Q.abs().amax(dim=(-2, -1))) / a2).reshape(-1, 1, 1)
        rhoAtA = rho * (A.mT @ A)

    if space is None:
        # Starting point (CVXOPT's): the solution of min 1/2 x'Qx + q'x + 1/2 ||Gx - h||^2
        # s.t. Ax = b gives x and s = h - Gx, z = Gx - h, each shifted into the positive orthant.
        kkt = _KKT(prob, torch.ones(1, m, dtype=dt, device=dev) if m else None, rhoAtA)
        if not bool(kkt.ok.all()):
            bad = tuple(int(i) for i in (~kkt.ok).expand(B).nonzero().flatten())
            raise QPUnboundedError(
                f"QPLayer: {_where(prob.batched, bad[0])} has no unique solution: Q + G'G + A'A is "
                "singular, so some direction d with Qd = 0, Gd = 0, Ad = 0 leaves the objective "
                "unchanged (or, where q'd != 0, unbounded); add constraints or make Q positive definite",
                problems=bad,
            )
        x, y_ = kkt.solve(-q_B + _mtv(G, h_B), b_B if p else None, rho)
        y = Q.new_zeros(B, 0) if y_ is None else y_
    if m:
        r = _mv(G, x) - h_B
        # s0 = -r and z0 = r side by side, (B, 2, m), each shifted by its own t = -min
        sz0 = torch.stack([r.neg(), r], -2)
        t = sz0.amin(-1, keepdim=True).neg_()
        # ([s; z] as one column, (B, 2m, 1))
        v0 = torch.add(sz0, torch.where(t >= 0, 1.0 + t, 0.0)).view(B, 2 * m, 1)
    else:
        v0 = Q.new_zeros(B, 0, 1)

    # E = [G; A] and e = (h, b): the primal rows in one product per iteration.
    E = space.E if space is not None else (torch.cat([G, A], -2) if p else G)
    e_B = torch.cat([h_B, b_B], -1) if p else h_B
    # The loop keeps its vectors as columns (B, k, 1), the shape of the batched products, so
    # that an iteration needs no conversions: x, [s; z] in one tensor (s and z its halves, for
    # the step length and one masked update), y; E' and the right-hand sides q, e likewise.
    Et, q_c, e_c = E.mT, q_B.unsqueeze(-1), e_B.unsqueeze(-1)
    # E' stored contiguously for `_bmv`'s row form (B > 1)
    Et_c = space.Et if space is not None else (Et.contiguous() if B > 1 else Et)
    xc, yc = x.unsqueeze(-1), y.unsqueeze(-1)
    # (split_with_sizes: `Tensor.split` goes through Python, at three times the cost)
    sc, zc = v0.split_with_sizes((m, m), -2) if m else (v0, v0)
    vc: torch.Tensor | None = v0
    # The gap is held 1000x tighter than the residuals: x and the multipliers are off by about
    # mu / (the smaller of s_i, z_i), and the gradient by that times the conditioning of the
    # active set (measured: gradient error ~ 1e3 x gap), while the gap, unlike the dual residual,
    # keeps falling geometrically down to rounding.  (At tol / 100 the adaptive step below left
    # x off by up to 8e-7 on 64 random problems with n = 200, against 9e-8 with 0.99 steps; at
    # tol / 1000 by 2e-9, for at most one more iteration.)
    tol_gap = max(1e-3 * tol, 10 * eps)

    def full(value: float, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.full((B,), value, dtype=dtype, device=dev)

    # A single problem (B = 1) keeps its status in Python values, decided from one host read per
    # iteration of its measures (and of whether the last step moved): at batch 1 the loop is bound
    # by per-op overhead, and the per-problem masks of the batch path below cost about twenty
    # ops per iteration.  Both paths apply the same tests (a batch's answers and iteration counts
    # match those of its problems solved one by one).
    scalar = B == 1 and m > 0
    # Constants as (B,) tensors: at batch 1 the loop is bound by dispatches, and an op between
    # tensors of one shape costs about a third of one with a Python number.
    # (t_far: the step's -eta far from the solution, -0.99)
    t_tol, t_tol_gap, t_near, t_polish, t_inf, t_zero, t_one, t_far = (
        torch.tensor(
            [[tol], [tol_gap], [1e4 * tol], [max(1e-3, 10 * tol)], [math.inf], [0.0], [1.0], [1e-2 - 1.0]],
            dtype=dt,
            device=dev,
        )
        .expand(-1, B)
        .unbind(0)
    )
    it = 0
    kept: tuple[torch.Tensor, ...] = (xc, sc, zc, yc)
    any_saved = False
    space_all = space
    outs: list[torch.Tensor] | None = None
    nb = B
    if scalar:
        # (the batch path's state, unused by a single problem's path: placeholders)
        c_solved = c_stalled = c_running = c_nonfinite = codes = n_iter = t_zero
        running = saved = stalled = idx = t_zero
        kept_res: tuple[torch.Tensor, ...] = ()
    else:
        # per-problem status codes, iteration counts and flags, (B,)
        c_solved, c_stalled, c_running, c_nonfinite = (
            full(c, torch.long) for c in (_SOLVED, _STALLED, _RUNNING, _NONFINITE)
        )
        # (tensors that the loop replaces, never changes in place, may start as one)
        codes = c_running
        n_iter = full(0, torch.long)
        running = torch.ones(B, dtype=torch.bool, device=dev)
        saved = stalled = torch.zeros(B, dtype=torch.bool, device=dev)
        kept_res = (x.new_zeros(B),) * 3
        # Once at most half the batch still runs, the running problems continue as a smaller
        # batch (the others' answers are written out): the last iterations, where a few slow
        # problems remain, then cost what those few cost.  `idx`: the running batch's rows in
        # the whole one.
        idx = torch.arange(B, device=dev)
    s_prev: torch.Tensor | None = None  # the previous iterate's s and z (the polish's guess)
    z_prev: torch.Tensor | None = None

    def residuals(
        xc: torch.Tensor, sc: torch.Tensor, zc: torch.Tensor, yc: torch.Tensor, Ex: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Residuals of an iterate: Qx, Ex, G'z + A'y, rp, rd, their norms and the larger relative
        one, which the stopping test compares with tol."""
        Qx = _bmv(Q, Q, xc)  # (Q is symmetric)
        if Ex is None:
            Ex = _bmv(E, Et_c, xc)
        dual_part = _bmv(Et, E, torch.cat([zc, yc], -2) if p else zc)  # G'z + A'y
        rp = Ex - e_c
        if p:
            rp[:, :m].add_(sc)
        else:
            rp.add_(sc)
        res_p = _col_inf_norm(rp)
        rd = torch.add(Qx, q_c).add_(dual_part)
        res_d = _col_inf_norm(rd)
        # Relative to the size of the terms that make up each residual (OSQP's test): rounding
        # leaves a residual of about eps times those, whatever the data's scale.
        # (each one reduction over the terms side by side)
        rel_p = _col_inf_norm(torch.cat([Ex, sc], -2))
        rel_d = _col_inf_norm(torch.cat([Qx, dual_part], -1))
        worst = torch.maximum(res_p / (scale_p + rel_p), res_d / (scale_d + rel_d))
        return Qx, Ex, dual_part, rp, rd, res_p, res_d, worst

    def measure(
        xc: torch.Tensor, sc: torch.Tensor, zc: torch.Tensor, yc: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """`residuals`, with s * z, the gap and the relative gap after the residuals' norms."""
        Qx, Ex, dual_part, rp, rd, res_p, res_d, worst = residuals(xc, sc, zc, yc)
        sz = sc * zc
        gap = sz.sum((-2, -1))
        pobj_scale = torch.add(q_c, Qx, alpha=0.5).mul_(xc).sum((-2, -1)).abs_().add_(t_one)
        return Qx, Ex, dual_part, rp, rd, res_p, res_d, sz, gap, worst, gap / pobj_scale

    code, run1, saved1, stalled1 = _RUNNING, True, False, False
    moved: torch.Tensor | None = None  # where(factorization ok, step length, 0) of the last step
    back1: tuple[Any, ...] = ()  # the iterate before the last step, its measures and values
    vals: list[float] = []
    tol_near, tol_polish = 1e4 * tol, max(1e-3, 10 * tol)
    # the polish's factor and active rows, where it gave every problem's answer (the backward's)
    polished: tuple[torch.Tensor, torch.Tensor] | None = None

    while True:
        # Residuals and per-problem stopping at the current point.
        meas = measure(xc, sc, zc, yc)
        if scalar:
            read = [meas[9], meas[10]] if moved is None else [meas[9], meas[10], moved]
            vals = torch.cat(read).tolist()
            if moved is not None and not vals[2] > 0.0:
                # The step failed (its factorization, or a non-finite or zero step): the problem
                # keeps the iterate before it, whose measures are at hand.
                (xc, sc, zc, yc, vc), meas, vals = back1
                stalled1 = True
            moved = None
        Qx, Ex, dual_part, rp, rd, res_p, res_d, sz, gap, worst, gap_rel = meas
        near: torch.Tensor | None = None
        if scalar:
            w1, g1 = vals[0], vals[1]
            ok_res1 = w1 <= tol
            ok1 = ok_res1 and g1 <= tol_gap
            good1 = ok_res1 and g1 <= tol and not ok1
            finite1 = w1 + g1 < math.inf  # false for NaN too
            # (the batch path's revert, below)
            revert1 = saved1 and not ok1 and (stalled1 or not (ok_res1 and finite1))
            if revert1:
                ok1 = finite1 = True
                stalled1 = good1 = False
            code = (
                _NONFINITE if not finite1 else _SOLVED if ok1 else _STALLED if stalled1 else _RUNNING
            )
            if code == _RUNNING and ((it % 3 == 2 and it >= 5) or it >= max_iter):
                x, z, y, Qx_, Gx, dual_ = (t.squeeze(-1) for t in (xc, zc, yc, Qx, Ex[:, :m], dual_part))
                cert = _certificates(prob, x, z, y, Qx_, Gx, dual_, scale_p, scale_d)
                if cert is not None:
                    code = int(cert[0])
            run1 = code == _RUNNING
            if revert1:
                xc, sc, zc, yc = kept
                vc = None
                res_p, res_d, gap = kept_res
            if good1 and run1:
                kept = (xc, sc, zc, yc)
                kept_res = (res_p, res_d, gap)
                saved1 = True
            try_polish = pol is not None and run1 and w1 <= tol_polish
        else:
            try_polish = False
            ok_res = worst <= t_tol
            good = ok_res & (gap_rel <= t_tol)
            ok = ok_res & (gap_rel <= t_tol_gap)
            finite = (worst + gap_rel) < t_inf  # false for NaN too
            revert: torch.Tensor | None = None
            if m and any_saved:
                # Near the end the weights z/s of the active constraints reach 1/eps and a step can
                # lose the accuracy already reached (rounding in the reduced system, amplified by
                # z/s, lands in the dual residual).  An iterate good to tol (gap below tol, not yet
                # tol/1000) is kept, and a problem whose next steps break down or undo it returns to it
                # (below, after the host read says that one does).
                # (on bools a > b is a & ~b and a <= b is ~a | b: one op each)
                revert = ((running & saved) > ok) & ((ok_res & finite) <= stalled)
                ok = ok | revert
                finite = finite | revert
                stalled = stalled > revert
                good = good > revert
            new = torch.where(
                finite, torch.where(ok, c_solved, torch.where(stalled, c_stalled, c_running)), c_nonfinite
            )
            if (it % 3 == 2 and it >= 5) or it >= max_iter:
                # Infeasibility certificates every third iteration from the fifth: they are for
                # problems that do not converge, whose iterates need a few iterations to grow to
                # a certificate (and once more at the end, for those that stalled).
                x, z, y, Qx_, Gx, dual_ = (t.squeeze(-1) for t in (xc, zc, yc, Qx, Ex[:, :m], dual_part))
                cert = _certificates(prob, x, z, y, Qx_, Gx, dual_, scale_p, scale_d)
                if cert is not None:
                    new = torch.where(new == c_running, cert, new)
            # (a batch of one gets here only while its problem runs: no masks with `running`)
            if nb == 1:
                keep = good > ok  # good and not ok, one op on bools
                codes = new
            else:
                keep = running & (good > ok)
                codes = torch.where(running, new, codes)
            running = codes == c_running
            # The loop's one host read: whether any problem runs, whether one has an iterate to keep,
            # whether one returns to its kept iterate.
            masks = [running, keep] + ([revert] if revert is not None else [])
            if pol is not None:
                # The polish is tried on the running problems whose relative residuals are below
                # 1e-3: on random problems (n = 10-200) it then succeeded at the first or second
                # try, with one to five iterations less than at 1e-5 (1e-1: two tries more for
                # 0.1-0.6 iterations less).
                near = (worst <= t_polish) & running
                masks.append(near)
            if not m:
                flags = [0, 0]
            else:
                flags = (torch.cat(masks) if nb == 1 else torch.stack(masks).sum(-1)).tolist()
            try_polish = near is not None and bool(flags[-1])
            if revert is not None and flags[2]:
                back = revert.view(-1, 1, 1)
                xc, sc, zc, yc = (torch.where(back, a, c) for a, c in zip(kept, (xc, sc, zc, yc)))
                vc = None
                res_p, res_d, gap = (torch.where(revert, a, c) for a, c in zip(kept_res, (res_p, res_d, gap)))
            if flags[1]:
                keep = keep & running
                keep_c = keep.view(-1, 1, 1)
                kept = tuple(torch.where(keep_c, a, c) for a, c in zip((xc, sc, zc, yc), kept))
                kept_res = tuple(torch.where(keep, a, c) for a, c in zip((res_p, res_d, gap), kept_res))
                saved = saved | keep
                any_saved = True
        if try_polish and pol is not None and space is not None:
            # Active-set polish: where the equality-constrained QP on the guessed active set
            # passes the same stopping test, it is the answer.  (Its gap s'z is 0, each product
            # having a factor 0, so the residuals alone decide.)
            # The active set guessed by Tapia's indicator: an active constraint's s falls
            # faster than its z from one iterate to the next, an inactive one's z faster than its
            # s (El-Bakry, Tapia & Zhang 1994; more reliable than z > s, which compares slacks
            # with multipliers: on random problems it guessed right where z > s missed 1-6 rows).
            if s_prev is not None and z_prev is not None:
                guess = (sc / s_prev) < (zc / z_prev)
            else:
                guess = zc > sc
            cand = _polish(space, pol, guess, e_c, t_tol)
            c_res_p, c_res_d, c_worst = residuals(*cand[:5])[5:]
            if scalar:
                if bool(cand[5] & (c_worst <= t_tol)):
                    xc, sc, zc, yc = cand[:4]
                    res_p, res_d, gap = c_res_p, c_res_d, t_zero
                    code, run1 = _SOLVED, False
                    polished = cand[6], cand[7]
            else:
                assert near is not None
                acc = near & cand[5] & (c_worst <= t_tol)
                n_acc = int(acc.sum())
                if n_acc:
                    acc_c = acc.view(-1, 1, 1)
                    xc, sc, zc, yc = (torch.where(acc_c, a, c) for a, c in zip(cand[:4], (xc, sc, zc, yc)))
                    res_p, res_d, gap = (
                        torch.where(acc, a, c)
                        for a, c in zip((c_res_p, c_res_d, t_zero), (res_p, res_d, gap))
                    )
                    vc = None
                    codes = torch.where(acc, c_solved, codes)
                    running = running > acc
                    flags[0] -= n_acc
                    if n_acc == B:  # (every problem of the whole batch, at once)
                        polished = cand[6], cand[7]
        if it >= max_iter or not m or not (run1 if scalar else flags[0]):
            break
        if nb >= 4 and 2 * flags[0] <= nb:
            state = (xc, sc, zc, yc, codes, n_iter, res_p, res_d, gap)
            if outs is None:
                outs = [t.clone() for t in state]
            for o, t in zip(outs, state):
                o[idx] = t
            sel = running.nonzero().squeeze(-1)
            idx, nb = idx[sel], int(flags[0])
            xc, sc, zc, yc, codes, n_iter, running, saved, stalled = (
                t[sel] for t in (xc, sc, zc, yc, codes, n_iter, running, saved, stalled)
            )
            vc = None
            # what the step below uses of this iteration's residuals
            rd, rp, sz, gap, worst = (t[sel] for t in (rd, rp, sz, gap, worst))
            kept = tuple(t[sel] for t in kept)
            kept_res = tuple(t[sel] for t in kept_res)
            prob = dataclasses.replace(
                prob, Q=Q[sel], q=q_B[sel], G=G[sel], h=h_B[sel], A=A[sel], b=b_B[sel], B=nb
            )
            Q, G, A, q_B, h_B, b_B = prob.Q, prob.G, prob.A, prob.q, prob.h, prob.b
            E, e_B, scale_p, scale_d = E[sel], e_B[sel], scale_p[sel], scale_d[sel]
            Et, Et_c, q_c, e_c = E.mT, Et_c[sel], q_B.unsqueeze(-1), e_B.unsqueeze(-1)
            if space is not None:
                space = space.select(sel)
            if pol is not None:
                pol = pol.select(sel)
            if s_prev is not None and z_prev is not None:
                s_prev, z_prev = s_prev[sel], z_prev[sel]
            if rho is not None and rhoAtA is not None:
                rho, rhoAtA = rho[sel], rhoAtA[sel]
            c_solved, c_stalled, c_running, c_nonfinite = (
                t[sel] for t in (c_solved, c_stalled, c_running, c_nonfinite)
            )
            t_tol, t_tol_gap, t_near, t_polish, t_inf, t_zero, t_one, t_far = (
                t[sel] for t in (t_tol, t_tol_gap, t_near, t_polish, t_inf, t_zero, t_one, t_far)
            )
        it += 1
        if B > 1:  # (a single problem's count is `it`, set at the end)
            n_iter.add_(running)

        step: _Newton | _DualNewton
        if space is not None:
            step = _DualNewton(prob, space, sc, zc, rd, rp, None if pol is None else pol.eye)
        else:
            s, z, rd_, rp_ = (t.squeeze(-1) for t in (sc, zc, rd, rp))
            rp_in = rp_[:, :m]
            d = z / s
            kkt = _KKT(prob, d, rhoAtA)
            step = _Newton(
                prob, kkt, rho, s, z, d, -rd_ - _mtv(G, d * rp_in), rp_in, -rp_[:, m:] if p else None
            )
        # Predictor (affine scaling): the Newton step towards s * z = 0.
        if vc is None:
            vc = torch.cat([sc, zc], -2)
        ds_a, dz_a = step.affine(sz)
        a_aff = _max_step(vc, torch.cat([ds_a, dz_a], -2))  # (B, 1, 1)
        # sigma = (mu_aff / mu)^3, mu = s'z / m; (B, 1, 1)
        gap_c = gap.view(-1, 1, 1)
        gap_aff = torch.addcmul(sc, a_aff, ds_a).mul_(torch.addcmul(zc, a_aff, dz_a))
        gap_aff = gap_aff.sum((-2, -1), keepdim=True)
        sigma_c = (gap_aff / gap_c).clamp(0.0, 1.0).pow(3)
        # Corrector: aim at sigma * mu on the central path, with Mehrotra's second-order term;
        # the same factorization.
        # (refined from the fourth iteration on, when z/s starts to span many orders of magnitude)
        rc = torch.addcmul(sz, ds_a, dz_a).addcmul_(sigma_c, gap_c, value=-1.0 / m)
        dx, ds, dz, dy = step.direction(rc, refine=it > 3)
        # The fraction eta of the way to the boundary: 0.99 (CVXOPT's) far from the solution,
        # 1 - sigma (clipped to [1 - 1e-2, 1 - 1e-6]) once the residuals are within 1e4 tol: where
        # the predictor needed little centering (sigma small), the gap then falls by about
        # 1/sigma per iteration instead of 100, which saves one or two iterations (an adaptive
        # step as in Mehrotra's and OOQP's implementations; used from the start, long steps
        # drove infeasible problems to a singular Newton system before their certificate).
        if scalar:
            neg_eta = sigma_c.view(-1).clamp(1e-6, 1e-2).sub_(t_one) if vals[0] <= tol_near else t_far
        else:
            neg_eta = torch.where(worst <= t_near, sigma_c.view(-1), t_one).clamp(1e-6, 1e-2).sub_(t_one)
        dv = torch.cat([ds, dz], -2)
        alpha = _max_step(vc, dv, neg_eta)
        if pol is not None:
            s_prev, z_prev = sc, zc
        if scalar:
            # The step is taken; whether it moved is read with the next measures, which return
            # to the iterate before it where it did not.
            back1 = ((xc, sc, zc, yc, vc), meas, vals)
            moved = torch.where(step.ok, alpha, t_zero)
            alpha = alpha.view(-1, 1, 1)
            xc = torch.addcmul(xc, alpha, dx)
            vc = torch.addcmul(vc, alpha, dv)
            if dy is not None:
                yc = torch.addcmul(yc, alpha, dy)
        else:
            # Stopped problems keep their iterate (a masked step: the batch keeps its shapes).
            # (torch.where, not a zero step: a failed factorization's NaN times 0 is NaN.)
            moved_ = step.ok & (alpha > t_zero)  # false for NaN too
            # (a batch of one runs here: its problem is running)
            move = (moved_ if nb == 1 else running & moved_).view(-1, 1, 1)
            alpha = alpha.view(-1, 1, 1)
            xc = torch.where(move, torch.addcmul(xc, alpha, dx), xc)
            vc = torch.where(move, torch.addcmul(vc, alpha, dv), vc)
            if dy is not None:
                yc = torch.where(move, torch.addcmul(yc, alpha, dy), yc)
            # A problem whose factorization failed (or whose step is not finite) cannot move: it
            # is reported (or returns to its kept iterate) at the next check, not silently frozen.
            stalled = stalled | (running > moved_)
        sc, zc = vc.split_with_sizes((m, m), -2)

    if scalar:
        code = _MAX_ITER if code == _RUNNING else code
        codes = torch.full((1,), code, dtype=torch.long, device=dev)
        any_unsolved = code in (_MAX_ITER, _STALLED)
    else:
        codes = torch.where(codes == _RUNNING, _MAX_ITER, codes)
        any_unsolved = bool(((codes == _MAX_ITER) | (codes == _STALLED)).any()) if m else False
    x, s, z, y = (t.squeeze(-1) for t in (xc, sc, zc, yc))
    if B == 1:
        n_iter = torch.full((1,), it, dtype=torch.long, device=dev)
    if any_unsolved:
        unsolved = (codes == _MAX_ITER) | (codes == _STALLED)
        Gz = _mtv(G, z)
        dual_part = Gz + _mtv(A, y) if p else Gz
        cert = _certificates(prob, x, z, y, _mv(Q, x), _mv(G, x), dual_part, scale_p, scale_d)
        if cert is not None:
            codes = torch.where(unsolved & (cert != _RUNNING), cert, codes)
    if outs is not None:
        for o, t in zip(outs, (xc, sc, zc, yc, codes, n_iter, res_p, res_d, gap)):
            o[idx] = t
        xc, sc, zc, yc, codes, n_iter, res_p, res_d, gap = outs
        x, s, z, y = (t.squeeze(-1) for t in (xc, sc, zc, yc))
    return _Solution(x, s, z, y, QPInfo(codes, n_iter, res_p, res_d, gap, it), space_all, polished)


# ---------------------------------------------------------------------------------------------
# The autograd function and the entry point


class _QPFunction(torch.autograd.Function):
    """x*(Q, q, G, h, A, b); the solution is computed outside and passed in (``sol``)."""

    @staticmethod
    def forward(
        ctx: Any,
        sol: _Solution,
        prob: _Problem,
        Q: torch.Tensor,
        q: torch.Tensor,
        G: torch.Tensor | None,
        h: torch.Tensor | None,
        A: torch.Tensor | None,
        b: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.sol = sol
        ctx.prob = prob
        ctx.shapes = tuple(None if t is None else t.shape for t in (Q, q, G, h, A, b))
        x = sol.x
        return x.clone() if prob.batched else x[0].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_x: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sol: _Solution = ctx.sol
        prob: _Problem = ctx.prob
        g = grad_x if prob.batched else grad_x.unsqueeze(0)
        u, w, v = _adjoint(prob, sol, g.expand(prob.B, prob.n))
        x, z, y = sol.x, sol.z, sol.y

        def outer(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return a.unsqueeze(-1) * c.unsqueeze(-2)

        # (formed only for the inputs that need them: at batch 1 each is a few dispatches)
        full = (
            lambda: -0.5 * (outer(u, x) + outer(x, u)),  # dQ (the objective sees Q's symmetric part)
            lambda: -u,  # dq
            lambda: -(outer(w, x) + outer(z, u)),  # dG
            lambda: w,  # dh
            lambda: -(outer(v, x) + outer(y, u)),  # dA
            lambda: v,  # db
        )
        grads: list[torch.Tensor | None] = []
        for make, shape, need in zip(full, ctx.shapes, ctx.needs_input_grad[2:]):
            if shape is None or not need:
                grads.append(None)
                continue
            gfull = make()
            if len(shape) == gfull.ndim:  # this input had the batch dimension
                grads.append(gfull)
            else:  # shared by the batch: the sum of the problems' gradients
                grads.append(gfull.sum(0))
        return (None, None, *grads)


def _adjoint(
    prob: _Problem, sol: _Solution, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, w, v solving the transposed KKT system at the answer for dL/dx = g (B, n).

        [ Q   G'          A' ] [u]   [g]
        [ G   -diag(s/z)  0  ] [w] = [0]
        [ A   0           0  ] [v]   [0]

    This is (dF/d(x, z, y))' (u, w / z, v) = (g, 0, 0) for the KKT conditions F, scaled by z.
    Where the solver used the constraint space (Q positive definite and well conditioned), u is
    eliminated and (E Q^-1 E' + diag(s/z, 0)) (w, v) = E Q^-1 g is solved by one Cholesky
    factorization of size m + p, with the same property as below (s/z alone on the diagonal).
    Otherwise, and where that factorization fails for a problem, the system is solved
    unreduced (one batched LU of size n + m + p) rather than with the
    interior-point method's reduced matrix Q + G'DG: there an active constraint's weight
    D = z/s ~ 1e12 swamps Q's entries in rounding, an error of eps * D in the gradient, while
    here s/z sits alone on the diagonal: an active row (s/z ~ 0) holds G_i u = 0 to rounding, an
    inactive one (s/z huge) gets w_i ~ 0.

    Raises:
        LinearSolveError: the system is singular for a problem (named): the solution is not a
            differentiable function of the inputs there (e.g. Q singular on the null space of the
            active constraints).
    """
    B, n, m, p = prob.B, prob.n, prob.m, prob.p
    dt = g.dtype
    eps = torch.finfo(dt).eps
    if sol.space is not None:
        # Q positive definite and well conditioned (the solver worked in the constraint space):
        # eliminating u = Q^-1 (g - G'w - A'v) leaves (E Q^-1 E' + diag(s/z, 0)) (w, v) = E Q^-1 g,
        # the Newton system's matrix at the answer, one Cholesky of size m + p instead of an
        # LU of size n + m + p.  s/z again sits alone on the diagonal (an active row's ~0, an
        # inactive one's huge value); where the factorization fails (active rows linearly
        # dependent with s/z at 0) the unreduced LU below decides.
        space = sol.space
        Qg = _bmv(space.Qinv, space.Qinv, g.unsqueeze(-1))
        rhs = _bmv(space.E, space.Et, Qg)
        if sol.polished is not None:
            # At a polished answer s = 0 on the active rows and z = 0 on the others, so s/z is 0
            # on the active rows and (clamped, below) 1/eps^2 on the others, whose w is then 0 to
            # rounding: the polish's factor (the active rows' block, the identity elsewhere) with
            # the inactive rows' right-hand side set to 0 solves the same system.
            L, act = sol.polished
            wv = _chol_solve(L, torch.where(act, rhs, 0.0))
            ok = True
        else:
            c = (sol.s.clamp_min(0.0) / sol.z.clamp_min(eps * eps)).clamp(max=1.0 / (eps * eps))
            L, info = space.factor(c, p)
            wv = _chol_solve(L, rhs)
            ok = bool((info == 0).all())
        u = _bmv(space.QinvEt, space.EQinv, wv, Qg, -1.0).squeeze(-1)
        wv = wv.squeeze(-1)
        # (a NaN or infinity anywhere makes the sum non-finite; one that overflows only sends the
        # batch to the LU below)
        if ok and math.isfinite(float(wv.sum())):
            return u, wv[:, :m], wv[:, m:]
    c = (sol.s.clamp_min(0.0) / sol.z.clamp_min(eps * eps)).clamp(max=1.0 / (eps * eps))
    Q = prob.Q.expand(B, n, n)
    G = prob.G.expand(B, m, n)
    A = prob.A.expand(B, p, n)
    zeros = g.new_zeros
    K = torch.cat(
        [
            torch.cat([Q, G.mT, A.mT], -1),
            torch.cat([G, torch.diag_embed(-c), zeros(B, m, p)], -1),
            torch.cat([A, zeros(B, p, m), zeros(B, p, p)], -1),
        ],
        -2,
    )
    LU, piv, info = torch.linalg.lu_factor_ex(K)
    rhs = torch.cat([g, zeros(B, m + p)], -1).unsqueeze(-1)
    sol_all = torch.linalg.lu_solve(LU, piv, rhs).squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(sol_all).all(-1)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero().flatten())
        raise LinearSolveError(
            f"QPLayer backward: the KKT system at the answer of {_where(prob.batched, idx[0])} is "
            "singular: the solution is not differentiable there (Q is singular on the null space of "
            "the active constraints, or active constraints and equalities are linearly dependent "
            "with weakly active ones); make Q positive definite or remove redundant constraints"
        )
    return sol_all[:, :n], sol_all[:, n : n + m], sol_all[:, n + m :]


def _raise_failures(who: str, info: QPInfo, batched: bool, throw: bool) -> None:
    statuses = info.statuses
    if all(s is QPStatus.SOLVED for s in statuses):
        return
    errors: dict[QPStatus, type[BilevelError]] = {
        QPStatus.PRIMAL_INFEASIBLE: QPInfeasibleError,
        QPStatus.DUAL_INFEASIBLE: QPUnboundedError,
        QPStatus.NONFINITE: NonFiniteError,
    }
    for status in (QPStatus.NONFINITE, QPStatus.PRIMAL_INFEASIBLE, QPStatus.DUAL_INFEASIBLE):
        idx = tuple(i for i, s in enumerate(statuses) if s is status)
        if idx:
            msg = f"{who}: {_where(batched, idx[0])} is {status.message}"
            if len(idx) > 1:
                msg += f" (also problems {list(idx[1:])})"
            cls = errors[status]
            if issubclass(cls, QPError):
                raise cls(msg, problems=idx, info=info)
            raise cls(msg, info=info)
    idx = tuple(i for i, s in enumerate(statuses) if s in (QPStatus.MAX_ITER, QPStatus.STALLED))
    i = idx[0]
    msg = (
        f"{who}: {_where(batched, i)} {statuses[i].message} (primal residual "
        f"{float(info.primal_residual[i]):.2e}, dual {float(info.dual_residual[i]):.2e}, gap "
        f"{float(info.gap[i]):.2e} after {int(info.n_iter[i])} iterations)"
    )
    if len(idx) > 1:
        msg += f"; also problems {list(idx[1:])}"
    if throw:
        raise ConvergenceError(msg, info=info)
    warnings.warn(msg, BilevelWarning, stacklevel=3)


def default_tol(dtype: torch.dtype) -> float:
    """The default stopping tolerance: 1e-9 in float64, 1e-5 in float32 (what rounding allows).

    Near the solution the active constraints' weights z/s reach ~1/tol and amplify rounding in
    the dual update; below about 1e-9 (float64) the dual residual stalls at that rounding.
    """
    return 1e-5 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9


def solve_qp(
    Q: torch.Tensor,
    q: torch.Tensor,
    G: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    A: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    tol: float | None = None,
    max_iter: int = 50,
    throw: bool = True,
    check: bool = True,
    who: str = "solve_qp",
) -> tuple[torch.Tensor, QPInfo]:
    """Solve min 1/2 x'Qx + q'x s.t. Ax = b, Gx <= h for a batch of problems, differentiably.

    Args:
        Q: (n, n) or (B, n, n), positive semidefinite (only its symmetric part is used).
        q: (n,) or (B, n).
        G, h: (m, n) or (B, m, n) and (m,) or (B, m): inequalities Gx <= h (both or neither).
        A, b: (p, n) or (B, p, n) and (p,) or (B, p): equalities Ax = b, A of full row rank.
        tol: stopping tolerance on the relative primal and dual residuals (the relative
            duality gap must fall below max(tol / 1000, 10 eps)); default `default_tol` of the dtype.
        max_iter: interior-point iterations at most.
        throw: on the iteration cap, raise `ConvergenceError` (``True``) or warn with
            `BilevelWarning` and return the last iterate.
        check: check the values (finite, Q PSD, A of full row rank) before solving.
        who: the name used in error messages.

    Returns:
        x of shape (B, n) if any input has a batch dimension, else (n,), differentiable in every
        input by the KKT conditions at x; and the `QPInfo`.

    Raises:
        StructureError: shapes, batch sizes, dtypes or devices that do not match.
        NonFiniteError: a NaN or infinity in an input or the iterates (names the problem).
        QPNonConvexError: Q not positive semidefinite (names the problem).
        QPError: A without full row rank (names the problem).
        QPInfeasibleError: no x satisfies the constraints (names the problem).
        QPUnboundedError: the objective is unbounded below, or the minimizer is not unique.
        ConvergenceError: ``max_iter`` reached (with ``throw=True``).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"{who}(max_iter={max_iter!r}): must be an int >= 0")
    prob, raw = _prepare(who, Q, q, G, h, A, b)
    if tol is None:
        tol = default_tol(prob.Q.dtype)
    if not tol > 0:
        raise ValueError(f"{who}(tol={tol!r}): must be > 0")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in raw)
    with torch.no_grad():
        # One Cholesky of Q serves the convexity check and the constraint-space step.
        chol_Q = None
        if check or _constraint_space_pays(prob.n, prob.m, prob.p):
            chol_Q = torch.linalg.cholesky_ex(prob.Q)
        if check and chol_Q is not None:
            _check_values(who, prob, chol_Q[1])
        sol = _ipm(prob, tol, max_iter, chol_Q)
    _raise_failures(who, sol.info, prob.batched, throw)
    if needs_grad:
        return _QPFunction.apply(sol, prob, *raw), sol.info
    x = sol.x if prob.batched else sol.x[0]
    return x, sol.info
