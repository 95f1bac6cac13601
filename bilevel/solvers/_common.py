"""What every inner solver shares: configuration checks, the counted objective oracle, the loop.

The torch solvers (`GradientDescent`, `Nesterov`, `NewtonCG`) differ only in how
they propose the next iterate.  Everything else lives here, once:

* `Oracle` wraps ``objective(phi, theta)``: it flattens ``phi`` to a matrix of shape
  (B, n) (B = 1 for a single problem, B problems of a meta-batch otherwise), evaluates
  values, gradients and Hessian-vector products on it, and counts them.
* `iterate` runs a `Method` until every problem has ||grad|| <= tol, has failed, or the
  iteration cap is reached, freezing each problem where it stopped, and builds the
  `SolverResult` with honest per-problem diagnostics.

Counting convention (what ``n_fev``, ``n_gev`` and ``n_hvp`` of the result mean):
``n_gev`` counts gradient evaluations (a forward and a backward pass; the objective
value comes with it and is not counted again), ``n_fev`` counts objective values
computed without a gradient, ``n_hvp`` counts Hessian-vector products (each one
backward pass through a gradient graph built by `Oracle.linearize`, which runs the
objective once and counts as one ``n_gev``).  In batched mode one call of the
objective evaluates all B problems and counts once.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch

from .. import _sync
from .._errors import BilevelWarning, StructureError
from .._results import HostValues, SolverResult
from .._settings import check_flag, check_int, check_positive
from .._status import SolverStatus, worst
from .._types import Objective, TensorTree
from ..tree import (
    all_finite,
    batch_size,
    check_finite,
    leaves,
    ravel_batch,
    rownorm,
    rows_finite,
    unflatten,
    unravel_batch,
)

__all__ = [
    "BatchedObjective",
    "Method",
    "Oracle",
    "Step",
    "check_flag",
    "check_int",
    "check_positive",
    "detach_tree",
    "iterate",
    "lazy_import",
    "measure",
    "tree_from_arrays",
    "tree_to_arrays",
]


def lazy_import(module: str, extra: str, who: str) -> ModuleType:
    """Import an optional dependency, or raise an ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{who} needs the optional dependency '{module}', which is not installed: "
            f"pip install bilevel[{extra}]"
        ) from err


def detach_tree(tree: TensorTree) -> TensorTree:
    """The tree with every leaf detached (solvers never differentiate through theta).

    Leaves that are not tensors (a theta holding other values) pass through unchanged.
    """
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, (tuple, list)):
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in tree)
    if isinstance(tree, dict):
        return {k: t.detach() if isinstance(t, torch.Tensor) else t for k, t in tree.items()}
    return tree


# --------------------------------------------------------------------------- batched objectives


class BatchedObjective:
    """A batch of B independent problems, with per-problem losses.

    ``per_problem(phi, theta)`` returns the losses of shape (B,), where loss ``b``
    depends on ``phi[b]`` only (every leaf of phi carries the batch as its leading
    dimension).  Calling the object returns their sum, a scalar, so the same object
    can be given to `bilevel.implicit_argmin`: the Hessian of the sum is block
    diagonal, so one implicit solve differentiates every problem at once.  Batched
    solvers (``batched=True``) read ``per_problem`` for per-problem line searches and
    diagnostics.

    Args:
        per_problem: ``(phi, theta) -> Tensor`` of shape (B,).

    Example:
        >>> obj = BatchedObjective(lambda phi, theta: ((phi - theta) ** 2).sum(dim=1))
        >>> phi = bl.implicit_argmin(obj, init, theta, solver=NewtonCG(batched=True))
    """

    def __init__(self, per_problem: Callable[[TensorTree, TensorTree], torch.Tensor]) -> None:
        if not callable(per_problem):
            raise TypeError(f"BatchedObjective: per_problem must be callable, got {per_problem!r}")
        self.per_problem = per_problem

    def __call__(self, phi: TensorTree, theta: TensorTree) -> torch.Tensor:
        return self.per_problem(phi, theta).sum()

    def __repr__(self) -> str:
        return f"BatchedObjective({self.per_problem!r})"


# --------------------------------------------------------------------------- the counted oracle


class Oracle:
    """The objective at flat points, counted.

    Points are matrices ``X`` of shape (B, n): row b holds the raveled leaves of
    problem b (B = 1 when not batched).  Values have shape (B,), gradients and
    Hessian-vector products shape (B, n), in the dtype and device of ``init``.

    Args:
        objective: ``objective(phi, theta)``: a scalar; in batched mode a tensor of
            shape (B,), a `BatchedObjective`, or (for methods that need no values) a
            scalar sum over the problems.
        init: starting point; in batched mode every leaf has the leading dim B.
        theta: detached before use: the solver never differentiates through it.
        batched: whether ``init`` holds a batch of independent problems.
        who: the solver's name, for error messages.
        need_values: the method needs per-problem objective values (line searches).
        differentiable: keep the autograd graph of the whole path (unrolled
            differentiation): ``init`` and ``theta`` are not detached, gradients are taken
            with ``create_graph=True`` and the answer is not detached, so that it can be
            differentiated in theta and init (MAML).  Memory grows with the iterations.

    Raises:
        TypeError: ``init`` is not floating point.
        StructureError: leaves of ``init`` differ in dtype, device or batch size (the message
            names the leaf and both sizes).
        NonFiniteError: ``init`` holds NaN or infinity (in batched mode the message names the
            problems).
    """

    def __init__(
        self,
        objective: Objective,
        init: TensorTree,
        theta: TensorTree,
        *,
        batched: bool,
        who: str,
        need_values: bool,
        differentiable: bool = False,
    ) -> None:
        if not callable(objective):
            raise TypeError(f"{who}: objective must be callable objective(phi, theta), got {objective!r}")
        ls = leaves(init, name="init")
        if not ls:
            raise StructureError(f"{who}: init holds no tensors")
        for t in ls:
            if not t.is_floating_point():
                raise TypeError(f"{who}: init has dtype {t.dtype}; the unknowns must be floating point")
            if t.dtype != ls[0].dtype or t.device != ls[0].device:
                raise StructureError(
                    f"{who}: the leaves of init mix dtypes/devices ({t.dtype} on {t.device} vs "
                    f"{ls[0].dtype} on {ls[0].device}); use one dtype and device for phi"
                )
        self.who = who
        self.batched = batched
        self.like = init
        self.dtype = ls[0].dtype
        self.device = ls[0].device
        if batched:
            try:
                self.B = batch_size(init, "init")
            except StructureError as err:
                raise StructureError(
                    f"{who}(batched=True): {err}; got shapes {[tuple(s.shape) for s in ls]}"
                ) from None
            if self.B == 0:
                raise StructureError(f"{who}(batched=True): init has an empty batch")
        else:
            self.B = 1
            if all(t.numel() == 0 for t in ls):
                raise StructureError(
                    f"{who}: init has no entries (shapes {[tuple(t.shape) for t in ls]}): nothing to solve"
                )
        self._warned_constant = False
        # in batched mode the message names the problems whose start is not finite
        check_finite(init, "init", batched=batched)
        start = init if differentiable else detach_tree(init)
        self.x0 = ravel_batch(start, batched=batched)
        if not differentiable:
            self.x0 = self.x0.clone()
        self.differentiable = differentiable
        self.theta = theta if differentiable else detach_tree(theta)
        self.need_values = need_values
        per_problem = getattr(objective, "per_problem", None)
        self._fn: Callable[[TensorTree, TensorTree], torch.Tensor] = (
            per_problem if batched and callable(per_problem) else objective
        )
        self.values_known = True  # False once a batched objective returned a scalar sum
        self.n_fev = 0
        self.n_gev = 0
        self.n_hvp = 0

    # -- structure

    def unflat(self, X: torch.Tensor) -> TensorTree:
        """The tree of ``init``'s structure at the flat point ``X`` (views of ``X``; ``X`` itself
        for a batched init that is already the (B, n) matrix)."""
        return unravel_batch(X, self.like, batched=self.batched)

    def answer(self, X: torch.Tensor) -> TensorTree:
        """The solution tree at ``X``: fresh contiguous tensors, detached (in differentiable
        mode: attached to the path's graph)."""
        if self.differentiable:
            return unflatten(self.like, [t.contiguous() for t in leaves(self.unflat(X))])
        return unflatten(self.like, [t.detach().clone() for t in leaves(self.unflat(X))])

    # -- evaluations

    def _losses(self, X: torch.Tensor) -> torch.Tensor:
        out = self._fn(self.unflat(X), self.theta)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{self.who}: objective returned a {type(out).__name__}; it must return a Tensor")
        if not out.is_floating_point():
            raise TypeError(f"{self.who}: objective returned dtype {out.dtype}; it must be floating point")
        if self.batched:
            if out.shape == (self.B,):
                return out
            if out.numel() == 1 and not self.need_values:
                # A scalar sum over independent problems: its gradient still holds each
                # problem's gradient in its own rows, only per-problem values are lost.
                self.values_known = False
                return out.reshape(1).expand(self.B) / self.B
            raise StructureError(
                f"{self.who}(batched=True): objective returned shape {tuple(out.shape)}; it must "
                f"return the per-problem losses of shape ({self.B},) (or wrap them in "
                "BatchedObjective)"
            )
        if out.numel() != 1:
            raise StructureError(
                f"{self.who}: objective returned shape {tuple(out.shape)}; it must return a scalar "
                "(for a batch of independent problems pass batched=True)"
            )
        return out.reshape(1)

    def value_and_grad(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (B,) and gradients (B, n) at ``X`` (counts one n_gev).

        Problems are independent, so the gradient of the summed losses holds each
        problem's gradient in its own row.  In differentiable mode both stay attached to
        the graph (``create_graph``).
        """
        self.n_gev += 1
        if self.differentiable:
            with torch.enable_grad():
                Xr = X if X.requires_grad else X.detach().requires_grad_(True)
                f = self._losses(Xr)
                (g,) = torch.autograd.grad(
                    f.sum(), Xr, create_graph=True, allow_unused=True, materialize_grads=True
                )
            return f, g
        with torch.enable_grad():
            Xr = X.detach().requires_grad_(True)
            f = self._losses(Xr)
            if f.requires_grad:
                (g,) = torch.autograd.grad(f.sum(), Xr, allow_unused=True, materialize_grads=True)
            else:  # the objective does not depend on phi
                g = torch.zeros_like(Xr)
                self._warn_constant()
        return f.detach(), g.detach()

    def _warn_constant(self) -> None:
        """Every point is stationary for an objective without a graph to phi: the solver stops at
        its start, CONVERGED.  Say so once, as that is rarely what was meant."""
        if not self._warned_constant:
            self._warned_constant = True
            warnings.warn(
                f"{self.who}: the objective does not depend on phi (its value has no graph to phi: "
                "a detached copy of phi, .item() or NumPy?), so its gradient is zero everywhere and "
                "the start is returned as converged; compute the objective from the phi it receives",
                BilevelWarning,
                stacklevel=4,
            )

    def linearize(self, X: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The Hessian-vector product map at ``X``: ``V -> (d2 f_b / dx_b^2) V_b``, shapes (B, n).

        Reverse-over-reverse through one retained graph: the forward pass and the gradient,
        with its graph, are computed here, once (one objective call, counted as one n_gev),
        and each product then costs one backward pass through that gradient (one n_hvp), with
        no objective call.  A truncated CG runs all its products at one point, so this is
        several times cheaper than forward-over-reverse (``torch.func.jvp`` of ``grad``),
        which re-runs the forward and backward passes and pays the functorch transforms' fixed
        overhead on every product.  ``X`` is detached: the products carry no graph to the
        caller, in differentiable mode too (the Newton direction is not differentiated).
        """
        self.n_gev += 1
        with torch.enable_grad():
            Xr = X.detach().requires_grad_(True)
            f = self._losses(Xr).sum()
            g: torch.Tensor | None = None
            if f.requires_grad:
                (g,) = torch.autograd.grad(
                    f, Xr, create_graph=True, allow_unused=True, materialize_grads=True
                )

        def hvp(V: torch.Tensor) -> torch.Tensor:
            self.n_hvp += 1
            if g is None or not g.requires_grad:  # the objective is constant or linear in phi
                return torch.zeros_like(Xr)
            (hv,) = torch.autograd.grad(
                g, Xr, grad_outputs=V.detach(), retain_graph=True, allow_unused=True, materialize_grads=True
            )
            return hv.detach()

        return hvp


# --------------------------------------------------------------------------- the shared loop


@dataclasses.dataclass
class Step:
    """A method's proposal for every problem (rows of frozen problems are ignored).

    Attributes:
        x, f, g: the next point (B, n), its values (B,) and gradients (B, n); ``f`` and ``g``
            ``None`` after the last step of a fixed budget (tol = 0), whose gradient nothing
            would read (the result's ``grad_norm`` and ``fun`` are then NaN).
        failed: problems for which the method found no acceptable step (line search).
        negative_curvature: problems whose inner CG met non-positive curvature.
    """

    x: torch.Tensor
    f: torch.Tensor | None
    g: torch.Tensor | None
    failed: torch.Tensor | None = None
    negative_curvature: torch.Tensor | None = None


class Method(Protocol):
    """One iteration rule.  Created per solver call; may keep state between steps."""

    def step(self, k: int, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> Step:
        """Propose the next point of every problem; ``active`` (B,) marks the running ones.

        Rows of inactive problems must not move (multiply their step by zero), so that
        the objective is never evaluated at an arbitrary point on their behalf.
        """
        ...


# Per-problem stop codes kept on the device while a solver runs (0: still running).
_CONVERGED, _NONFINITE, _LS_FAILED = 1, 2, 3
_CODES = {
    _CONVERGED: SolverStatus.CONVERGED,
    _NONFINITE: SolverStatus.NONFINITE,
    _LS_FAILED: SolverStatus.LINE_SEARCH_FAILED,
}


def iterate(
    oracle: Oracle, method: Method, *, max_iter: int, tol: float, info: dict[str, Any]
) -> SolverResult:
    """Run ``method`` from ``oracle.x0`` until each problem stops, and report honestly.

    A problem stops when ||grad|| <= tol (CONVERGED), when its proposal has NaN or
    infinity (NONFINITE: it keeps its last finite iterate), when the method fails to
    find a step (LINE_SEARCH_FAILED), or after ``max_iter`` iterations (MAX_ITER, or
    NEGATIVE_CURVATURE if its last step met negative curvature).  Stopped problems
    are frozen while the others continue.

    Args:
        oracle: the counted objective.
        method: proposes steps.
        max_iter: iteration cap per problem.
        tol: gradient-norm tolerance (Euclidean norm of each problem's gradient).
        info: solver-specific diagnostics to include; per-problem ones are added here.

    Returns:
        `SolverResult` with ``x`` like ``init``.  Single problem: ``n_iter``,
        ``grad_norm`` and ``fun`` of that problem.  Batched: ``n_iter`` is the largest
        per-problem count, ``grad_norm`` the Euclidean norm of the whole gradient,
        ``fun`` the sum of the losses, ``status`` the worst per-problem status; the
        per-problem values are in ``problem_status``, ``problem_n_iter``,
        ``problem_grad_norm`` and ``problem_fun``.
    """
    st = _start(oracle, tol)
    sync = _sync.host_checks(st.x)
    unmeasured = torch.full_like(st.gn, math.nan)  # the norms of a step that measures none
    k = 0
    # a fixed budget (tol = 0) runs every step; stopped problems are frozen by the masks
    while k < max_iter and (tol == 0 or bool(st.active.any())):
        s = method.step(k, st.x, st.f, st.g, st.active)
        _count(st, s)
        st.g_at_x = s.g is not None
        gn_new, measured, ok = _measure(s, oracle.values_known, tol, unmeasured)
        accept = st.active & ok if s.failed is None else st.active & ok & ~s.failed
        _accept(st, s, accept, gn_new, sync)
        del s
        _stop(st, accept, tol, measured)
        k += 1
    if tol == 0 and st.g_at_x:
        # measured once, at the end
        st.gn = torch.where(torch.isnan(st.gn), rownorm(st.g.detach()).double(), st.gn)
    if getattr(method, "reports_negative_curvature", False):
        # (Newton methods only; their loops read the device anyway)
        info["n_negative_curvature"] = st.n_negcurv.cpu() if oracle.batched else int(st.n_negcurv[0])
    return _result(oracle, st, tol, info)


@dataclasses.dataclass
class _LoopState:
    """The shared loop's per-problem state: the iterate (B, n), its values (B,), gradients (B, n)
    and float64 gradient norms (B,), stop codes (0: running), the running mask and the counts."""

    x: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    gn: torch.Tensor
    code: torch.Tensor
    active: torch.Tensor
    n_iter: torch.Tensor
    n_negcurv: torch.Tensor
    last_negcurv: torch.Tensor
    g_at_x: bool = True  # whether g is the gradient at x (not after a fixed budget's last step)


def _start(oracle: Oracle, tol: float) -> _LoopState:
    """The state at ``oracle.x0``: one gradient, and the problems that start converged or broken."""
    x = oracle.x0
    f, g = oracle.value_and_grad(x)
    B, dev = oracle.B, x.device
    gn = rownorm(g.detach()).double()
    # Per-problem stops as codes on the device (0: running), read once at the end: nothing in the
    # loop waits for the device unless a tolerance can stop it early (tol > 0).
    code = torch.zeros(B, dtype=torch.int8, device=dev)
    finite = rows_finite(f, g) if oracle.values_known else rows_finite(g)
    conv = finite & (gn <= tol)
    code = torch.where(~finite, _NONFINITE, torch.where(conv, _CONVERGED, code))
    return _LoopState(
        x=x,
        f=f,
        g=g,
        gn=gn,
        code=code,
        active=finite & ~conv,
        n_iter=torch.zeros(B, dtype=torch.int64, device=dev),
        n_negcurv=torch.zeros(B, dtype=torch.int64, device=dev),
        last_negcurv=torch.zeros(B, dtype=torch.bool, device=dev),
    )


def _count(st: _LoopState, s: Step) -> None:
    """Count the step's iteration and negative curvature for the running problems."""
    st.n_iter += st.active
    if s.negative_curvature is not None:
        nc = st.active & s.negative_curvature
        st.n_negcurv += nc
        st.last_negcurv = torch.where(st.active, nc, st.last_negcurv)


def _measure(
    s: Step, values_known: bool, tol: float, unmeasured: torch.Tensor
) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """The proposal's gradient norms (float64, NaN where not measured), whether they were
    measured, and which rows are finite.

    Finiteness from norms (one reduction, no copies): a NaN or infinity anywhere in a row makes
    its norm non-finite.  x_{k+1} = x_k + step is finite wherever x_k and the gradient there
    are, so x is checked only where no gradient follows it.
    """
    if s.g is None:
        # The method's last step of a fixed budget: no gradient at the answer was taken.
        return unmeasured, False, torch.isfinite(rownorm(s.x))
    if tol == 0 and values_known:
        # A fixed budget needs no gradient norm.  A NaN in the gradient shows in the next
        # iterate's value (or in the final iterate's norm above), which is then rejected,
        # keeping this finite iterate: one pass over g per step saved.
        assert s.f is not None
        return unmeasured, False, torch.isfinite(s.f.detach())
    gn_new = rownorm(s.g.detach()).double()
    ok = torch.isfinite(gn_new)
    if values_known:
        ok &= torch.isfinite(s.f.detach())  # type: ignore[union-attr]
    return gn_new, True, ok


def _accept(st: _LoopState, s: Step, accept: torch.Tensor, gn_new: torch.Tensor, sync: bool) -> None:
    """Move the accepted problems to the proposal; code the rejected ones (non-finite or failed).

    After a fixed budget's last step (no gradient taken) the values are unknown too: NaN.
    """
    f_new = s.f if s.g is not None else None
    if sync and bool(accept.all()):
        # every problem moved (the common case; checked where a check is free, on the host):
        # no masked copies, one iterate alive less
        st.x, st.gn = s.x, gn_new
        st.f = f_new if f_new is not None else torch.full_like(st.f, math.nan)
        st.g = s.g if s.g is not None else st.g
        return
    a = accept[:, None]
    st.x = torch.where(a, s.x, st.x)
    st.gn = torch.where(accept, gn_new, st.gn)
    st.f = torch.where(accept, f_new, st.f) if f_new is not None else torch.where(accept, math.nan, st.f)
    st.g = torch.where(a, s.g, st.g) if s.g is not None else st.g
    rejected = st.active & ~accept
    bad = _NONFINITE if s.failed is None else torch.where(s.failed, _LS_FAILED, _NONFINITE)
    st.code = torch.where(rejected, bad, st.code)


def _stop(st: _LoopState, accept: torch.Tensor, tol: float, measured: bool) -> None:
    """The problems that keep running after this step."""
    if tol > 0:
        newly_conv = accept & (st.gn <= tol)
        st.code = torch.where(newly_conv, _CONVERGED, st.code)
        st.active = accept & ~newly_conv
    elif not measured:  # tol = 0, no norm measured: nothing but a failure stops
        st.active = accept
    else:  # tol = 0: a fixed budget; only an exactly zero gradient could stop a problem
        st.active = accept & ~(st.gn == 0)


def _result(oracle: Oracle, st: _LoopState, tol: float, info: dict[str, Any]) -> SolverResult:
    """The `SolverResult`, its per-problem fields read on the host when its first host value is."""
    B, values_known, batched = oracle.B, oracle.values_known, oracle.batched
    # detached: a result read late (a check queued by `bilevel.deferred_checks`) must not keep a
    # differentiable path's graph alive through its gradient norms or values
    code, last_negcurv, n_iter, gn, fun = st.code, st.last_negcurv, st.n_iter, st.gn.detach(), st.f.detach()

    def read() -> dict[str, Any]:
        # (one copy each: on the CPU these are free, elsewhere only the first one waits)
        codes, negs = code.tolist(), last_negcurv.tolist()
        iters, norms, funs = n_iter.cpu(), gn.double().cpu(), fun.double().cpu()
        # Without a tolerance (tol = 0), running every iteration is what was asked for.
        capped = SolverStatus.BUDGET if tol == 0 else SolverStatus.MAX_ITER
        final = [
            _CODES.get(int(c)) or (SolverStatus.NEGATIVE_CURVATURE if neg else capped)
            for c, neg in zip(codes, negs)
        ]
        fun_rows = funs if values_known else torch.full((B,), math.nan, dtype=torch.float64)
        if not batched:
            return dict(
                status=final[0], n_iter=int(iters[0]), grad_norm=float(norms[0]), fun=float(fun_rows[0])
            )
        return dict(
            status=worst(final),
            n_iter=int(iters.max()),
            grad_norm=float(torch.linalg.vector_norm(norms)),
            fun=float(fun_rows.sum()) if values_known else float(funs[0] * B),
            problem_status=tuple(final),
            problem_n_iter=iters,
            problem_grad_norm=norms,
            problem_fun=fun_rows,
        )

    host = HostValues(read)
    per_problem = host if batched else None
    return SolverResult(
        x=oracle.answer(st.x),
        status=host,
        n_iter=host,
        grad_norm=host,
        n_fev=oracle.n_fev,
        n_gev=oracle.n_gev,
        n_hvp=oracle.n_hvp,
        fun=host,
        info=info,
        problem_status=per_problem,
        problem_n_iter=per_problem,
        problem_grad_norm=per_problem,
        problem_fun=per_problem,
    )


# --------------------------------------------------------------------------- adapters of external solvers


def tree_from_arrays(arrays: Sequence[Any], init: TensorTree, who: str, what: str) -> TensorTree:
    """Tensors like ``init``'s leaves (shape, dtype, device) from array-likes with as many entries.

    Raises:
        StructureError: the number of arrays or of entries differs from ``init``.
    """
    ls = leaves(init, name="init")
    if len(arrays) != len(ls):
        raise StructureError(f"{who}: {what} has {len(arrays)} arrays but init has {len(ls)} tensors")
    out = []
    for i, (a, t) in enumerate(zip(arrays, ls)):
        arr = np.asarray(a, dtype=np.float64)
        if arr.size != t.numel():
            raise StructureError(
                f"{who}: {what}[{i}] has {arr.size} entries (shape {arr.shape}) but init[{i}] has shape "
                f"{tuple(t.shape)}"
            )
        out.append(torch.as_tensor(arr.reshape(tuple(t.shape)), dtype=t.dtype, device=t.device).clone())
    return unflatten(init, out)


def tree_to_arrays(tree: TensorTree, name: str) -> list[np.ndarray]:
    """The leaves of ``tree`` as float64 NumPy arrays on the host."""
    return [t.detach().to("cpu", torch.float64).numpy() for t in leaves(tree, name=name)]


def measure(objective: Objective, x: TensorTree, theta: TensorTree, who: str) -> tuple[float, float, int]:
    """Objective value and gradient norm at an external solver's answer: ``(fun, grad_norm, n_gev)``.

    Returns NaNs (and no evaluation) if ``x`` is not finite.
    """
    if not bool(all_finite(x).all()):
        return math.nan, math.nan, 0
    oracle = Oracle(objective, x, theta, batched=False, who=who, need_values=True)
    f, g = oracle.value_and_grad(oracle.x0)
    return float(f[0]), float(rownorm(g).double()[0]), oracle.n_gev
