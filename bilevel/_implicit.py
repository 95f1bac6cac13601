"""The implicit layer: differentiate a black-box solver through its optimality condition.

If x*(theta) solves F(x, theta) = 0 and dF/dx is invertible there, the implicit
function theorem gives dx*/dtheta = -(dF/dx)^-1 dF/dtheta.  A backward pass with
v = dL/dx therefore needs one linear solve and one vector-Jacobian product:

    (dF/dx)^T u = v,        dL/dtheta = -(dF/dtheta)^T u.

For an argmin, F = grad_phi G and dF/dx = d2G/dphi2 is the (symmetric) Hessian, so
the solve uses Hessian-vector products only and CG by default (Lemma 1 of
Rajeswaran et al. 2019 is the case G = Lhat(phi) + lam/2 ||phi - theta||^2).  The
solver's path is never recorded: memory does not grow with inner iterations.

The gradient is exact only where F(x, theta) = 0.  The forward pass therefore
measures the optimality residual ||F(x, theta)|| at the returned x and refuses
(or warns about) answers whose residual exceeds ``optimality_tol``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch.autograd.function import once_differentiable

from ._errors import (
    BilevelWarning,
    ConvergenceError,
    LinearSolveError,
    NegativeCurvatureError,
    NonFiniteError,
    OptimalityError,
    StructureError,
)
from ._hvp import HVPLike, Linearization, Point, as_oracle, call_scalar, gradient_condition
from ._policy import UNSET, BackwardX0, ImplicitPolicy, Unset, resolve_policy
from ._results import LinearSolveResult, SolverResult
from ._settings import check_flag
from ._status import LinearStatus, SolverStatus
from ._sync import defer_check
from ._types import LinearSolver, Objective, RootFn, TensorTree
from .conditions import Condition, Stationarity
from .tree import (
    LeafNames,
    aligned,
    all_finite,
    batch_norm,
    batch_size,
    check_finite,
    finite_problems,
    leaf_names,
    leaves,
    problems_named,
    ravel,
    ravel_batch,
    rows_finite,
    tree_map,
    unflatten,
    unravel_batch,
    unravel_like,
)

__all__ = ["ImplicitArgmin", "ImplicitInfo", "fixed_point", "implicit_argmin", "implicit_root"]

Leaves = tuple[torch.Tensor, ...]
# Statuses that say the solver did what it was asked (no warning without optimality_tol).
_QUIET = (SolverStatus.CONVERGED, SolverStatus.UNKNOWN, SolverStatus.BUDGET)


@dataclasses.dataclass
class ImplicitInfo:
    """Diagnostics of one implicit layer call, filled in by its forward and backward passes.

    Returned by ``implicit_argmin(..., return_info=True)`` (likewise `implicit_root`,
    `fixed_point`).  The forward pass sets ``solver_result`` and ``residual_norm``;
    every backward pass appends its linear solve to ``backward``.

    Attributes:
        solver_result: what the inner solver returned (status ``UNKNOWN`` when it
            returned a bare solution).
        residual_norm: ||F(x, theta)|| at the returned x, measured by the layer
            (||grad_phi G(phi, theta)|| for an argmin), in the objective's units per
            unit of phi.
        backward: the `LinearSolveResult` of each backward pass, in order (in batched
            mode with per-problem status, iterations and residuals).
        problem_residual_norm: batched mode: ||F_b(x_b, theta)|| per problem, shape (B,)
            (``None`` otherwise).
        failed_problems: batched mode: the problems that the failed check named (a NaN or
            infinity in the answer, the objective, the residual, the incoming gradient dL/dx,
            the backward solve or the gradient; a failed backward solve; a residual above
            ``optimality_tol``), in increasing order; ``()`` where no check failed.  A backward
            solve that ran the fixed budget it was given (``LinearStatus.BUDGET``) is not a
            failure and is never named.  The error (or warning) names the same problems.

    Under ``torch.func.vmap`` the layer runs once per vmapped problem: ``solver_result``
    and the residuals are then the last problem's, and ``backward`` collects every solve.
    Inside `bilevel.deferred_checks`, ``residual_norm`` (and ``problem_residual_norm`` where the
    solver's own gradient norms stand for it) is set when the block ends, with the checks.
    """

    solver_result: SolverResult | None = None
    residual_norm: float = math.nan
    backward: list[LinearSolveResult] = dataclasses.field(default_factory=list)
    problem_residual_norm: torch.Tensor | None = None
    failed_problems: tuple[int, ...] = ()

    def __repr__(self) -> str:
        solver = "None" if self.solver_result is None else self.solver_result.status.name
        last = "None" if not self.backward else repr(self.backward[-1])
        return (
            f"ImplicitInfo(solver={solver}, residual_norm={self.residual_norm:.3e}, "
            f"backward_solves={len(self.backward)}, last_backward={last})"
        )

    @property
    def last_backward(self) -> LinearSolveResult | None:
        return self.backward[-1] if self.backward else None


class _ValueRecorder:
    """The objective, remembering the value of its last evaluation (detached), so that the
    forward pass can check that G is finite at the answer: in batched mode the per-problem
    values (B,) where the objective gives them (`_Summed`), so that a NaN names its problem."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.last: torch.Tensor | None = None

    def __call__(self, phi: TensorTree, theta: TensorTree) -> torch.Tensor:
        out = self.objective(phi, theta)
        rows = self.objective.rows if isinstance(self.objective, _Summed) else None
        self.last = (out if rows is None else rows).detach()
        return out


class _Summed:
    """Batched G as a scalar, the sum of the per-problem losses (a block-diagonal Hessian),
    keeping the losses (B,) of its last evaluation in ``rows`` (``None`` where the objective
    returned the sum itself)."""

    def __init__(self, per_problem: Callable[[TensorTree, TensorTree], Any]) -> None:
        self.per_problem = per_problem
        self.rows: torch.Tensor | None = None

    def __call__(self, phi: TensorTree, theta: TensorTree) -> torch.Tensor:
        def summed(p: TensorTree, t: TensorTree) -> Any:
            out = self.per_problem(p, t)
            self.rows = out.detach() if isinstance(out, torch.Tensor) and out.ndim == 1 else None
            return _as_sum(out)

        return call_scalar(summed, phi, theta)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """What one call solves: F(x, theta) = 0 at the answer of ``solver`` started from ``init``.

    Attributes:
        name: the entry point, for messages.
        condition: F(x, theta), built with its graph (create_graph) for the backward pass.
        residual: F(x, theta) for the forward pass's measured residual only.
        objective: what the solver is given (G for an argmin, F or T for a root or fixed point).
        init, theta_like: the structures of x and theta.
        solver: the black-box inner solver.
        linearize: the products dF/dx and dF/dtheta at a `Point` (HVPs for an argmin).
        symmetric: dF/dx is symmetric (an argmin): forward mode is supported.
        recorder: the objective's last value (an argmin), checked for finiteness at the answer.
    """

    name: str
    condition: Callable[[TensorTree, TensorTree], TensorTree]
    residual: Callable[[TensorTree, TensorTree], TensorTree]
    objective: Callable[..., Any]
    init: TensorTree
    theta_like: TensorTree
    solver: Callable[..., Any]
    linearize: Callable[[Point], Linearization]
    symmetric: bool = True
    recorder: _ValueRecorder | None = None


class _Checks:
    """The checks of one call that `deferred_checks` may queue, and all that they read: the call's
    name, policy and theta's leaf names, and its `ImplicitInfo` weakly.

    A queued check keeps no answer, backward solution or graph of the call to the end of the
    block (it is given the solver's results without their solutions).  Where nobody holds the
    call's info any more when a queued check fails, its error carries a stand-in with the
    checks' own figures (residual, failed problems, the results without their solutions).
    """

    def __init__(self, name: str, policy: ImplicitPolicy, theta_names: LeafNames, info: ImplicitInfo) -> None:
        self.name = name
        self.policy = policy
        self.theta_names = theta_names
        self._info = weakref.ref(info)
        self._stand_in: ImplicitInfo | None = None

    @property
    def info(self) -> ImplicitInfo:
        info = self._info()
        if info is None:
            if self._stand_in is None:
                self._stand_in = ImplicitInfo()
            info = self._stand_in
        return info

    def _fail(self, err: Exception) -> None:
        if self.policy.throw:
            raise err
        if self.policy.warn:
            # the caller of implicit_argmin (forward pass, not deferred): _fail < settle < defer_check
            # < solve < forward < Function.apply < _run < implicit_argmin < caller
            warnings.warn(f"{err} (throw=False: continuing)", BilevelWarning, stacklevel=9)

    def _where(self, failed: list[int]) -> str:
        """' in problem(s) [i, j] of the batch' for a batched call, '' otherwise."""
        if not self.policy.batched:
            return ""
        return f" in {problems_named(failed)}"

    def _blame(self, failed: list[int]) -> str:
        """Record the problems a failed check names (batched mode) and say where, for its message."""
        if self.policy.batched:
            self.info.failed_problems = tuple(failed)
        return self._where(failed)

    def raise_rows(self, rows: torch.Tensor, per_leaf: torch.Tensor, names: LeafNames, what: str) -> None:
        if bool(rows.all()):
            return
        bad = torch.nonzero(~rows).flatten().tolist()
        leaf = int(torch.nonzero(~per_leaf[:, bad[0]]).flatten()[0])
        raise NonFiniteError(
            f"{self.name}: {names.label(what, leaf)} contains NaN or infinity{self._blame(bad)}: check the "
            "inputs of those problems, lower the inner step size, or solve the inner problem more carefully",
            info=self.info,
        )

    def settle(self, result: SolverResult, per: torch.Tensor | None, value: torch.Tensor | None) -> None:
        """The forward pass's checks of the solver's answer (host reads), and its residual in `info`.

        Args:
            result: what the solver returned (its ``x`` is not read: the queue passes ``None``).
            per: the measured per-problem residuals ||F_b||, float64 (B,) or (1,); ``None``: take
                the solver's own ``problem_grad_norm`` / ``grad_norm`` (not measured).
            value: the objective's value at the answer where it was recorded with ``per``.
        """
        if self._info() is None:  # the stand-in (see the class) records what this check knows
            self.info.solver_result = result
        measured = per is not None
        if per is None:
            if self.policy.batched and result.problem_grad_norm is not None:
                per = result.problem_grad_norm.double()
            else:
                per = torch.tensor([result.grad_norm], dtype=torch.float64)
            self.info.problem_residual_norm = per if self.policy.batched else None
        if value is not None and not bool(torch.isfinite(value).all()):
            # per problem where the objective gave its losses (B,), else its sum: no problem to name
            per_value = self.policy.batched and value.ndim == 1 and value.shape == per.shape
            bad = torch.nonzero(~torch.isfinite(value.reshape(-1))).flatten().tolist()
            shown = value.tolist() if value.ndim == 0 else value.reshape(-1)[bad[:10]].tolist()
            raise NonFiniteError(
                f"{self.name}: the objective is {shown} at the solver's answer"
                f"{self._blame(bad) if per_value else ''}: the implicit gradient needs a finite "
                "objective there",
                info=self.info,
            )
        residual = float(torch.linalg.vector_norm(per))
        self.info.residual_norm = residual
        if measured and not math.isfinite(residual):
            bad = torch.nonzero(~torch.isfinite(per)).flatten().tolist()
            raise NonFiniteError(
                f"{self.name}: the optimality residual at the solver's answer is {residual}"
                f"{self._blame(bad)}",
                info=self.info,
            )
        tol = self.policy.optimality_tol
        failed = torch.nonzero(per > tol).flatten().tolist() if tol is not None else []
        if result.status is SolverStatus.FAILED:
            # The solver says its answer is no answer: whatever the residual, say why.
            gave_up = result.problems_with(SolverStatus.FAILED)
            self._fail(
                ConvergenceError(
                    f"{self.name}: the inner solver failed{self._blame(gave_up)}: {result.reason} "
                    f"(residual {residual:.3e} at what it returned)",
                    info=self.info,
                )
            )
        elif failed:
            worst = float(per.max())
            self._fail(
                OptimalityError(
                    f"{self.name}: optimality residual ||F(x, theta)|| = {worst:.3e} at the solver's "
                    f"answer exceeds optimality_tol={tol:g}{self._blame(failed)} (solver status: "
                    f"{result.status.name}: {result.reason}); the implicit gradient is only "
                    "valid at a solution: solve the inner problem more accurately or raise optimality_tol",
                    info=self.info,
                )
            )
        elif tol is None and self.policy.warn and result.status not in _QUIET:
            warnings.warn(
                f"{self.name}: the inner solver did not converge ({result.reason}); "
                f"residual {residual:.3e}. Set optimality_tol to turn this into a check.",
                BilevelWarning,
                stacklevel=8,  # the caller of implicit_argmin / implicit_root / fixed_point (not deferred)
            )

    def check_backward_solve(
        self, res: LinearSolveResult, rhs_finite: torch.Tensor, finite: torch.Tensor, rhs_name: str
    ) -> None:
        """Raise (or warn) unless the backward solve converged or ran its budget (host reads),
        naming the problems that failed; a problem that ran its fixed budget (``BUDGET``) is not one.

        Args:
            res: the linear solve's result.
            rhs_finite: per problem, whether its right-hand side is finite, bool (B,) or (1,).
            finite: per problem, whether its row of ``res.x`` is finite, bool (B,) or (1,).
            rhs_name: what the right-hand side is, for the message.
        """
        if self._info() is None:
            self.info.backward.append(res)
        if not bool(rhs_finite.all()):
            bad = torch.nonzero(~rhs_finite).flatten().tolist()
            raise NonFiniteError(
                f"{self.name}: {rhs_name} has NaN or infinity{self._blame(bad)}: the backward pass "
                "received it so; check what is computed from the layer's output there",
                info=self.info,
            )
        nonfinite = sorted(set(res.problems_with(LinearStatus.NONFINITE)) | set(_false(finite)))
        if nonfinite:
            raise NonFiniteError(
                f"{self.name}: the backward linear solve produced NaN or infinity{self._blame(nonfinite)}: "
                f"{LinearStatus.NONFINITE.message}",
                info=self.info,
            )
        if res.status is LinearStatus.NEGATIVE_CURVATURE:
            self._fail(
                NegativeCurvatureError(
                    f"{self.name}: backward solve: {res.status.message} (after {res.n_iter} iterations)"
                    f"{self._blame(res.problems_with(LinearStatus.NEGATIVE_CURVATURE))}",
                    info=self.info,
                )
            )
        elif res.failed_problems():
            # BUDGET (a fixed number of iterations, rtol = atol = 0, asked for and run) is no failure
            self._fail(
                LinearSolveError(
                    f"{self.name}: backward solve stopped with status {res.status.name} after "
                    f"{res.n_iter} iterations, relative residual {res.relative_residual:.3e}"
                    f"{self._blame(res.failed_problems())}: {res.status.message}",
                    info=self.info,
                )
            )
        elif self.policy.warn and LinearStatus.BUDGET in (res.problem_status or (res.status,)):
            self._warn_worse_than_zero(res)

    def _warn_worse_than_zero(self, res: LinearSolveResult) -> None:
        """Warn where a solve that ran its fixed budget ended with a relative residual above 1: its
        answer solves the system worse than zero does, so the gradient built on it is noise."""
        if res.problem_residual_norm is not None and res.problem_b_norm is not None:
            b = res.problem_b_norm
            rel = (res.problem_residual_norm / torch.where(b > 0, b, 1.0)).tolist()
        else:
            rel = [res.relative_residual]
        worse = [i for i, r in enumerate(rel) if r > 1.0]
        if worse:
            warnings.warn(
                f"{self.name}: the backward solve ran its fixed budget ({res.n_iter} iteration(s)) and "
                f"ended with a relative residual of {max(rel[i] for i in worse):.3g}, above 1"
                f"{self._where(worse)}: its answer solves the system worse than zero does, so the "
                "gradient is unreliable.  Give the linear solver more iterations (Nystrom: a higher "
                "rank, or rho near the Hessian's small eigenvalues), or a tolerance to check",
                BilevelWarning,
                stacklevel=2,
            )

    def check_gradient(self, finite: torch.Tensor, index: list[int], rows: list[torch.Tensor]) -> None:
        """Raise `NonFiniteError` if the gradient has NaN or infinity, naming the theta leaf and, in
        batched mode, the problems whose rows have it where theta is per problem (every leaf
        with the batch's leading size).

        Args:
            finite: per gradient leaf, whether it is finite.
            index: the theta leaf of each gradient leaf.
            rows: per-problem masks (B,) of the gradient leaves where theta is per problem, else empty.
        """
        if bool(finite.all()):
            return
        leaf = index[int(torch.nonzero(~finite).flatten()[0])]
        bad = sorted({i for r in rows for i in _false(r)})
        where = (
            self._blame(bad)
            if bad
            else (
                " in a part shared by the problems of the batch (every problem's answer, dL/dx and "
                "backward solve are finite: the NaN comes from the objective's derivative in theta)"
                if self.policy.batched
                else ""
            )
        )
        raise NonFiniteError(
            f"{self.name}: {self.theta_names.label('the gradient with respect to theta', leaf)} has NaN "
            f"or infinity{where}",
            info=self.info,
        )


class _Call:
    """One call of the layer, handed to the autograd Function (not a tensor, so not saved): the
    problem, the policy, the diagnostics it fills in, and the graph it keeps for backward."""

    def __init__(self, problem: _Problem, policy: ImplicitPolicy) -> None:
        self.problem = problem
        self.policy = policy
        self.linear_solver = policy.backward_solver(problem.symmetric)
        self.info = ImplicitInfo()
        self.checks = _Checks(problem.name, policy, leaf_names(problem.theta_like), self.info)
        #: build F's graph in the forward pass and keep it for backward (set by `_run`)
        self.keep_graph = False
        self.point: Point | None = None

    @property
    def name(self) -> str:
        return self.problem.name

    def _check_finite(self, tree: TensorTree, what: str) -> None:
        """Raise `NonFiniteError` if ``tree`` (like x) has NaN or infinity, naming the leaf and, in
        batched mode, the problems (also in ``info.failed_problems``)."""
        if not self.policy.batched:
            check_finite(tree, what)
            return
        rows, per_leaf = finite_problems(tree)
        # the queued check keeps the names, not the tensors (nor their graphs) to the block's end
        defer_check(functools.partial(self.checks.raise_rows, rows, per_leaf, leaf_names(tree), what))

    def _flat(self, ts: Leaves, dtype: torch.dtype) -> torch.Tensor:
        """Leaves like x as one vector (n,), or as a (B, n) matrix in batched mode."""
        return ravel_batch(ts, dtype=dtype) if self.policy.batched else ravel(ts, dtype=dtype)

    def _unflat(self, flat: torch.Tensor, like: Leaves) -> Leaves:
        out = unravel_batch(flat, like) if self.policy.batched else unravel_like(flat, like)
        return leaves(out)

    def _norms(self, ts: Leaves) -> torch.Tensor:
        """Per-problem Euclidean norms (B,) in float64 (shape (1,) when not batched)."""
        return batch_norm(ts, batched=self.policy.batched)

    def solve(self, theta: Leaves, init_leaves: Leaves) -> Leaves:
        theta_tree = unflatten(self.problem.theta_like, list(theta))
        # theta may be shared by the problems of a batch: its leaves are named, not its rows
        check_finite(theta_tree, "theta")
        init = unflatten(self.problem.init, [t.detach() for t in init_leaves])
        self._check_finite(init, "init")
        try:
            with torch.no_grad():
                out = self.problem.solver(self.problem.objective, init, theta_tree)
        except RuntimeError as err:
            self._name_mixed_dtypes(err, init, theta_tree)
            raise
        result = out if isinstance(out, SolverResult) else SolverResult(x=out, status=SolverStatus.UNKNOWN)
        # a dict answer is matched to init by key (and returned in init's order)
        answer = aligned(result.x, init, "the solver's answer", "init")
        self._check_finite(answer, "the solver's answer")
        x = leaves(answer)

        self.info.solver_result = result
        wrt = tuple(t.requires_grad for t in theta)
        per: torch.Tensor | None = None  # None: the solver's own claim (`_settle` reads it)
        if self.keep_graph and any(wrt):
            # A backward pass may follow: F is built here with its graph and kept, so that
            # backward() linearizes this very graph (no second evaluation of the objective,
            # which might have changed by then) and the residual below costs nothing more.
            self.point = Point(self.problem.condition, init, self.problem.theta_like, x, theta, wrt)
            per = self._norms(self.point.F())
        elif self.policy.measure_residual:
            # The residual is measured here, independently of what the solver claims.
            theta_det = unflatten(self.problem.theta_like, [t.detach() for t in theta])
            with torch.enable_grad():
                xs = tuple(t.detach().requires_grad_(True) for t in x)
                out_F = self.problem.residual(unflatten(init, list(xs)), theta_det)
            per = self._norms(leaves(aligned(out_F, init, "optimality condition F(x, theta)", "x")))
        value = (
            self.problem.recorder.last if (per is not None and self.problem.recorder is not None) else None
        )
        self.info.problem_residual_norm = per if self.policy.batched else None
        # every check below reads the device: now, or at the end of a `deferred_checks` block
        defer_check(functools.partial(self.checks.settle, result.facts(), per, value))
        # An output must not alias an input of the Function.
        inputs = (*theta, *init_leaves)
        return tuple(t.clone() if any(t is s for s in inputs) else t.detach() for t in x)

    def _name_mixed_dtypes(self, err: RuntimeError, init: Any, theta: Any) -> None:
        """Where the solver's call failed and init and theta hold floating leaves of different
        dtypes (the usual cause of torch's dtype errors inside an objective), say so."""
        ours = {str(t.dtype) for t in leaves(init) if t.is_floating_point()}
        theirs = {
            str(t.dtype) for t in leaves(theta) if isinstance(t, torch.Tensor) and t.is_floating_point()
        }
        if ours and theirs and ours != theirs:
            first = str(err).splitlines()[0][:200] if str(err) else ""
            raise StructureError(
                f"{self.name}: the solver's call raised {type(err).__name__}: {first}.  "
                f"init's leaves are {', '.join(sorted(ours))} and theta's {', '.join(sorted(theirs))}: "
                "give them one dtype (e.g. init.to(theta.dtype)), the likely cause"
            ) from err

    def linear_solve(
        self, lin: Linearization, x: Leaves, rhs: Leaves, rhs_name: str = "the incoming gradient dL/dx"
    ) -> Leaves:
        """Solve (dF/dx)^T u = rhs (in batched mode B independent systems) and check the solve
        (``rhs_name`` names the right-hand side in messages)."""
        dtype = x[0].dtype

        def matvec(u: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self._flat(tuple(t.detach() for t in lin.matvec(self._unflat(u, x))), dtype)

        b = self._flat(rhs, dtype)
        x0 = self.policy.backward_start(b)
        if x0 is not None and (
            not isinstance(x0, torch.Tensor) or x0.shape != b.shape or x0.dtype != b.dtype
        ):
            raise ValueError(
                f"{self.name}: backward_x0 is {_describe(x0)}; expected a tensor of shape "
                f"{tuple(b.shape)} and dtype {b.dtype} (the flattened phi"
                f"{', one row per problem' if self.policy.batched else ''})"
            )
        res = self.linear_solver(matvec, b, x0)
        if not isinstance(res, LinearSolveResult):
            raise TypeError(
                f"{self.name}: linear_solver returned {_describe(res)}; it must return a "
                "bilevel.LinearSolveResult(x, status, n_iter, n_matvec, residual_norm, b_norm) "
                "(wrap a bare solution x as LinearSolveResult(x, LinearStatus.CONVERGED, ...) "
                "only if you have checked its residual)"
            )
        if res.x.shape != b.shape:
            raise StructureError(
                f"{self.name}: linear_solver returned x of shape {tuple(res.x.shape)}; expected "
                f"{tuple(b.shape)} like its right-hand side"
            )
        self.info.backward.append(res)
        defer_check(
            functools.partial(
                self.checks.check_backward_solve,
                res.facts(),
                self._rows_finite(b),
                self._rows_finite(res.x),
                rhs_name,
            )
        )
        return self._unflat(res.x, x)

    def _rows_finite(self, flat: torch.Tensor) -> torch.Tensor:
        """Per problem, whether a flat (B, n) matrix is finite, bool (B,) ((1,) for one problem)."""
        return rows_finite(flat) if self.policy.batched else torch.isfinite(flat).all().reshape(1)

    def backward(self, x: Leaves, theta: Leaves, v: Leaves, wrt: tuple[bool, ...]) -> tuple[Any, ...]:
        if not any(wrt):
            return tuple(None for _ in theta)
        point = self.point
        # Let go of the forward's graph of F here: a check queued by `deferred_checks` keeps this
        # object to the block's end, and with it that graph (a second backward, retain_graph=True,
        # builds F again from the saved x and theta).
        self.point = None
        if point is None or point.wrt != wrt:
            point = Point(self.problem.condition, self.problem.init, self.problem.theta_like, x, theta, wrt)
        lin = self.problem.linearize(point)
        u = self.linear_solve(lin, x, v)
        with torch.no_grad():
            cross = lin.cross(u)
        if point.theta_unused:
            warnings.warn(
                f"{self.name}: the optimality condition does not depend on theta, so the gradient "
                "with respect to theta is zero.  If the objective should depend on theta, it may use "
                "a detached copy of it (theta.detach(), .data, a tensor created before the call): use "
                "the theta argument the objective receives",
                BilevelWarning,
                stacklevel=4,
            )
        grads = tuple(None if g is None else -g.detach() for g in cross)
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        if present:
            B = x[0].shape[0] if self.policy.batched else 0
            # A theta whose every leaf has the batch's leading size is taken as per problem (row b:
            # problem b's), and a NaN row names its problem; a shared theta's rows name nothing
            # (a leaf of a shared theta may have B rows by coincidence).
            per_problem = self.policy.batched and all(g.ndim and g.shape[0] == B for _, g in present)
            rows = [rows_finite(g) for _, g in present] if per_problem else []
            defer_check(
                functools.partial(
                    self.checks.check_gradient,
                    all_finite([g for _, g in present]),
                    [i for i, _ in present],
                    rows,
                )
            )
        return grads

    def jvp(self, x: Leaves, theta: Leaves, tangents: tuple[torch.Tensor | None, ...]) -> Leaves:
        """Forward mode: dx = -(dF/dx)^-1 (dF/dtheta) t, for an argmin (symmetric dF/dx)."""
        if not self.problem.symmetric:
            raise NotImplementedError(
                f"{self.name}: forward-mode differentiation (torch.func.jvp) is supported for "
                "implicit_argmin only, whose dF/dx is symmetric; use reverse mode (backward, "
                "torch.func.grad or vjp) here"
            )
        wrt = tuple(t is not None for t in tangents)
        if not any(wrt):
            return tuple(torch.zeros_like(t) for t in x)
        point = Point(self.problem.condition, self.problem.init, self.problem.theta_like, x, theta, wrt)
        lin = self.problem.linearize(point)
        idx = [i for i, w in enumerate(wrt) if w]
        with torch.enable_grad():
            F = point.F()
            # (dF/dtheta) t by the double-vjp trick: differentiate u -> (dF/dtheta)^T u . t in u.
            us = tuple(torch.zeros_like(f).requires_grad_(True) for f in F)
            g = torch.autograd.grad(
                F, [point.theta[i] for i in idx], us, create_graph=True, allow_unused=True
            )
            pairs = [(gi, t) for gi, i in zip(g, idx) if gi is not None and (t := tangents[i]) is not None]
            if not pairs:
                return tuple(torch.zeros_like(t) for t in x)
            s = torch.stack([(gi * ti).sum() for gi, ti in pairs]).sum()
            Jt = torch.autograd.grad(s, us, allow_unused=True)
        rhs = tuple(torch.zeros_like(t) if j is None else -j.detach() for j, t in zip(Jt, x))
        return self.linear_solve(lin, x, rhs, "the tangent's image -(dF/dtheta) t")


def _false(mask: torch.Tensor) -> list[int]:
    """The indices where a bool (B,) mask is False (a host read)."""
    return torch.nonzero(~mask).flatten().tolist()


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a Tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return f"a {type(obj).__name__}"


class ImplicitArgmin(torch.autograd.Function):
    """The autograd Function under `implicit_argmin`, `implicit_root` and `fixed_point`.

    ``forward(call, n_theta, *theta_leaves, *init_leaves) -> x_leaves`` runs the black-box solver without
    autograd; ``backward`` solves (dF/dx)^T u = dL/dx and returns -(dF/dtheta)^T u.
    Written with ``setup_context``: ``torch.func.vmap`` runs the layer once per vmapped
    problem (a loop, equal to calling it problem by problem; for speed pass
    ``batched=True``), and ``torch.autograd`` then differentiates the vmapped result.
    Forward mode (``torch.autograd.forward_ad``, argmin only) solves (dF/dx) dx =
    -(dF/dtheta) t.  ``torch.func.grad`` / ``vjp`` / ``jvp`` cannot wrap the layer,
    whose backward pass uses torch.autograd: they raise a `NotImplementedError`
    saying so.
    Double backward is not supported.  Use the wrappers, which handle structures.
    """

    @staticmethod
    def forward(call: _Call, n_theta: int, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return call.solve(args[:n_theta], args[n_theta:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        call, n_theta, *args = inputs
        ctx.call = call
        ctx.n_x = len(output)
        ctx.n_theta = n_theta
        theta = args[:n_theta]
        ctx.save_for_backward(*output, *theta)
        ctx.save_for_forward(*output, *theta)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        if torch.is_grad_enabled():
            # create_graph=True: the result would be differentiated again, and the implicit part
            # of a second derivative (which needs third derivatives of G) would be silently lost.
            raise NotImplementedError(
                f"{ctx.call.problem.name}: the gradient through the implicit layer cannot be differentiated "
                "again: double backward (create_graph=True, torch.autograd.functional.hessian) and "
                "torch.func.grad / vjp / jacrev through the layer are not supported (the implicit part "
                "of a second derivative would be lost).  Use torch.autograd.grad or .backward() "
                "without create_graph; for second derivatives, finite differences of the gradient"
            )
        return ImplicitArgmin._backward(ctx, *grads)

    @staticmethod
    @once_differentiable
    def _backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        x, theta = saved[: ctx.n_x], saved[ctx.n_x :]
        wrt = tuple(bool(w) for w in ctx.needs_input_grad[2 : 2 + ctx.n_theta])
        n_init = len(ctx.needs_input_grad) - 2 - ctx.n_theta
        # The backward pass differentiates G with plain autograd on the saved (unwrapped)
        # tensors; under torch.func.grad / vjp that must not be seen by the transforms.
        try:
            out = ctx.call.backward(x, theta, grads, wrt)
        except RuntimeError as err:
            _refuse_transform(ctx.call.problem.name, err)
            raise
        # init is where the solver starts, not a variable of phi*(theta): no gradient.
        return (None, None, *out, *([None] * n_init))

    @staticmethod
    def jvp(ctx: Any, _call: Any, _n: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        saved = ctx.saved_tensors
        x, theta = saved[: ctx.n_x], saved[ctx.n_x :]
        try:
            return ctx.call.jvp(x, theta, tangents[: ctx.n_theta])
        except RuntimeError as err:
            _refuse_transform(ctx.call.problem.name, err)
            raise

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], call: _Call, n_theta: int, *args: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        outs = []
        for i in range(info.batch_size):
            sliced = tuple(t if d is None else t.select(d, i) for t, d in zip(args, in_dims[2:]))
            # a copy per problem: each keeps its own graph of F at its answer (the problem, the
            # policy and the diagnostics object are shared)
            outs.append(ImplicitArgmin.apply(copy.copy(call), n_theta, *sliced))
        stacked = tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))
        return stacked, tuple(0 for _ in stacked)


def _refuse_transform(name: str, err: RuntimeError) -> None:
    """Turn functorch's refusal of autograd inside a transform into a clear error."""
    text = str(err)
    if "functorch" in text or "vmap" in text or "transform" in text:
        raise NotImplementedError(
            f"{name}: the backward pass differentiates G with torch.autograd, which cannot run "
            "inside torch.func.grad / vjp / jvp or under vmap of them.  Supported: torch.func.vmap "
            "of the layer's forward, then torch.autograd.grad or .backward(); or batched=True for "
            "B problems in one call"
        ) from err


def _run(call: _Call, theta: TensorTree, return_info: bool) -> Any:
    check_flag(call.problem.name, "return_info", return_info)
    theta_leaves = leaves(theta, name="theta")
    init_leaves = tuple(t.detach() for t in leaves(call.problem.init, name="init"))
    call.keep_graph = torch.is_grad_enabled() and any(t.requires_grad for t in theta_leaves)
    out = ImplicitArgmin.apply(call, len(theta_leaves), *theta_leaves, *init_leaves)
    x = unflatten(call.problem.init, list(out))
    return (x, call.info) if return_info else x


def _check_common(name: str, solver: Any, init: TensorTree, batched: bool) -> None:
    """Entry checks of the solver and init (the policy's fields are checked by `ImplicitPolicy`)."""
    if isinstance(solver, type):
        raise TypeError(
            f"{name}: solver is the class {solver.__name__}; pass an instance, e.g. {solver.__name__}(...)"
        )
    if not callable(solver):
        raise TypeError(f"{name}: solver must be a callable solver(objective, init, theta); got {solver!r}")
    ls = leaves(init, name="init")
    if not ls:
        raise ValueError(f"{name}: init holds no tensors")
    for t in ls:
        if not t.is_floating_point():
            raise TypeError(f"{name}: init has dtype {t.dtype}; the unknowns must be floating point")
    if batched:
        try:
            B = batch_size(init, "init")
        except StructureError as err:
            raise StructureError(
                f"{name}(batched=True): {err}; got shapes {[tuple(t.shape) for t in ls]}"
            ) from None
        if B == 0:
            raise StructureError(f"{name}(batched=True): init has an empty batch (B = 0); B must be >= 1")
        if getattr(solver, "batched", None) is False:
            raise ValueError(
                f"{name}(batched=True): the solver {type(solver).__name__} is not in batched mode; "
                f"pass {type(solver).__name__}(..., batched=True) so that each problem stops on its own"
            )


def implicit_argmin(
    objective: Objective,
    init: TensorTree,
    theta: TensorTree,
    solver: Callable[..., Any],
    hvp: HVPLike | Unset = UNSET,
    linear_solver: LinearSolver | Unset | None = UNSET,
    *,
    policy: ImplicitPolicy | None = None,
    batched: bool | Unset = UNSET,
    optimality_tol: float | Unset | None = UNSET,
    throw: bool | Unset = UNSET,
    warn: bool | Unset = UNSET,
    measure_residual: bool | Unset = UNSET,
    backward_x0: BackwardX0 | Unset = UNSET,
    return_info: bool = False,
    condition: Condition | None = None,
) -> Any:
    """phi*(theta) = argmin_phi G(phi, theta), differentiable in theta by implicit differentiation.

    The solver is a black box; gradients come from the optimality condition
    grad_phi G(phi*, theta) = 0 at its answer (Lemma 1 of iMAML in general form):

        dL/dtheta = -(d2G/dtheta dphi)^T w,   where  (d2G/dphi2) w = dL/dphi.

    A constrained or non-smooth problem names its own condition F(phi, theta) = 0
    (``condition=``, see `bilevel.conditions`): the backward pass then solves
    (dF/dphi)^T u = dL/dphi with reverse-mode products of F (GMRES by default, dF/dphi
    being non-symmetric) and returns -(dF/dtheta)^T u.

    **When the objective is evaluated.**  By the solver, then once more at its answer in
    this call: the optimality condition grad_phi G is built there with its autograd graph,
    which gives the measured residual and is kept for ``backward()`` (reverse-over-reverse
    HVPs and the cross term reuse it).  ``backward()`` does not call the objective again,
    so a ``lambda`` that closes over a loop variable is differentiated with the value the
    variable had at this call.  Without autograd (``torch.no_grad()``, or no theta leaf
    requiring grad) no graph is kept.  Other HVP oracles (`ForwardOverReverse`,
    `FiniteDifferenceHVP`, a user ``hvp``) call the objective during ``backward()``: bind
    closed-over values as default arguments (``lambda phi, th, x=x: ...``) with those.

    Args:
        objective: ``G(phi, theta) -> scalar Tensor``; phi and theta arrive in the
            structures of ``init`` and ``theta``.  Must be differentiable twice by
            autograd unless ``hvp`` is a `FiniteDifferenceHVP` or a user callable.
            With ``batched=True``: the per-problem losses, shape (B,) (or a
            `bilevel.solvers.BatchedObjective`), problem b depending on phi[b] only.
        init: starting point, a Tensor, a tuple of Tensors or a dict of Tensors
            (floating point); with ``batched=True`` every leaf has the leading dim B.
        theta: the outer variables, a Tensor, tuple or dict of Tensors.  Gradients
            flow to every leaf that requires grad, however it enters G.  In batched
            mode theta may be shared by the B problems (iMAML's meta-parameters) or
            carry its own batch dimension.
        solver: ``solver(objective, init, theta) -> SolverResult | solution``,
            called without autograd; may leave PyTorch (NumPy, SciPy, a subprocess).
            An instance, not a class; with ``batched=True`` a solver in batched mode
            (``GradientDescent(..., batched=True)``, `Nesterov`, `NewtonCG`).
        hvp: ``None`` (reverse-over-reverse through one retained graph, the fastest
            in eager PyTorch), an oracle (`ReverseOverReverse`, `ForwardOverReverse`,
            `FiniteDifferenceHVP`, `DenseHessian`) or ``hvp(phi, theta, v)``.
            Default ``None``.
        linear_solver: solves the Hessian system; default ``CG()`` (1e-10 relative
            residual in float64, 1e-5 in float32).  Called as
            ``linear_solver(matvec, b, x0)`` and must return a `LinearSolveResult`;
            with ``batched=True``, ``b`` has shape (B, n) (B independent systems).
        batched: B independent problems along the leading dimension of every leaf of
            ``init``: one call solves them all (the solver's batched mode), one
            backward solves the B Hessian systems at once with per-problem stopping
            and status (``info.last_backward.problem_status``), and failures name the
            problems that failed.  Default ``False``.
        optimality_tol: largest acceptable ||grad_phi G|| at the solver's answer (per
            problem in batched mode); ``None`` skips the check (a non-converged
            `SolverResult` then warns).  Default ``1e-3``.
        throw: raise on a failed check (optimality residual, linear solve that missed
            its tolerance, negative curvature); ``False`` warns with `BilevelWarning`
            and returns the gradient anyway.  Non-finite values always raise.
            Default ``True``.
        warn: with ``throw=False``, whether failed checks warn; ``False`` only records
            them in the `ImplicitInfo` (for callers that read and report every
            solve's status themselves, like meta-learning's per-task statistics).
            Default ``True``.
        measure_residual: measure ||grad_phi G|| at the answer where no graph is kept
            for backward (one more gradient; with a backward pass ahead the measurement
            is free).  ``False`` then takes the solver's own ``grad_norm`` /
            ``problem_grad_norm`` (NaN where the solver did not evaluate it); needs
            ``optimality_tol=None``.  Default ``True``.
        backward_x0: warm start of the backward linear solve: a flat vector of phi's
            size ((B, n) in batched mode), e.g. ``info.last_backward.x`` of a previous
            call, or a function ``b -> x0`` of the right-hand side (e.g.
            ``lambda b: b / lam`` for a proximal objective).  Default ``None`` (zeros).
        policy: ``hvp``, ``linear_solver``, ``batched`` ... ``backward_x0`` as one
            `ImplicitPolicy` value; give it or those keywords, not both (a `TypeError`).
            A keyword not given takes the `ImplicitPolicy` default written above.
        return_info: also return an `ImplicitInfo` with the diagnostics.
        condition: the optimality condition at the answer, a `bilevel.conditions.Condition`
            value: `Stationarity` (grad_phi G = 0, the path described above),
            `ProjectedFixedPoint` (min G over a convex set), `ProximalFixedPoint`
            (min G + g, g non-smooth) or `KKT` (equality and inequality constraints).
            ``None``: the solver's own ``solver.condition`` where it has one (the
            projected and proximal torch solvers), else `Stationarity()`.  With any
            condition but `Stationarity`: ``optimality_tol`` bounds ||F(phi, theta)||,
            the default ``linear_solver`` is ``GMRES()`` (``CG()`` where the condition
            is ``symmetric``), forward mode is not supported and ``hvp`` must be ``None``
            (the products are reverse-mode products of F, not HVPs of G).

    Returns:
        phi with the structure, shapes and dtypes of ``init`` (and the `ImplicitInfo`
        if ``return_info``).  Reading diagnostics: ``info.residual_norm`` and
        ``info.solver_result`` after the call; ``info.last_backward`` (iterations,
        residual, status of the linear solve) after ``backward()``.

    Raises:
        NonFiniteError: NaN or infinity in theta, init, the answer or the gradient.
        StructureError: the answer's structure, shape, dtype or device differs from
            ``init``, or the objective is not scalar (not (B,) in batched mode).
        OptimalityError: the residual exceeds ``optimality_tol`` (with ``throw``).
        LinearSolveError, NegativeCurvatureError: the backward solve failed (with ``throw``).
        TypeError: a solver class instead of an instance, a ``linear_solver`` that
            returns something other than a `LinearSolveResult`, a policy field of the
            wrong kind, ``policy`` together with one of its keywords, or a ``condition``
            that is not a `bilevel.conditions.Condition` value.
        ValueError: a policy field out of range (see `ImplicitPolicy`), or an ``hvp``
            together with a condition other than `Stationarity`.
    """
    pol = resolve_policy(
        "implicit_argmin",
        policy,
        hvp=hvp,
        linear_solver=linear_solver,
        optimality_tol=optimality_tol,
        throw=throw,
        warn=warn,
        measure_residual=measure_residual,
        backward_x0=backward_x0,
        batched=batched,
    )
    _check_common("implicit_argmin", solver, init, pol.batched)
    cond = _argmin_condition(condition, solver, pol)
    if not isinstance(cond, Stationarity):
        # G reaches the backward pass only through F: reverse-mode products of F, as for a root.
        recorded = _ValueRecorder(_scalar_checked(objective, pol.batched))
        F = cond.residual(recorded)
        problem = _Problem(
            name="implicit_argmin",
            condition=F,
            residual=F,
            objective=objective,
            init=init,
            theta_like=theta,
            solver=solver,
            linearize=_root_linearization,
            symmetric=cond.symmetric,
            recorder=recorded,
        )
        return _run(_Call(problem, pol), theta, return_info)
    oracle = as_oracle(pol.hvp)
    recorder = _ValueRecorder(_scalar_checked(objective, pol.batched))
    checked: Objective = recorder
    problem = _Problem(
        name="implicit_argmin",
        condition=gradient_condition(checked),
        residual=gradient_condition(checked, create_graph=False),
        objective=objective,
        init=init,
        theta_like=theta,
        solver=solver,
        linearize=lambda point: oracle.linearize(checked, point),
        recorder=recorder,
    )
    return _run(_Call(problem, pol), theta, return_info)


class _Conditioned(Protocol):
    """A solver that names the optimality condition of its answers (projected, proximal)."""

    @property
    def condition(self) -> Condition: ...


_STATIONARITY = Stationarity()


def _argmin_condition(condition: object, solver: object, policy: ImplicitPolicy) -> Condition:
    """The condition of one `implicit_argmin` call: the given one, the solver's, or stationarity."""
    cond: object
    if condition is None:
        own = cast("_Conditioned", solver).condition if hasattr(solver, "condition") else None
        if own is None:
            return _STATIONARITY  # the default, without the protocol checks below
        cond = own
        origin = f"the solver {type(solver).__name__}'s condition"
    else:
        cond = condition
        origin = "condition"
    if isinstance(cond, type):
        raise TypeError(
            f"implicit_argmin: {origin} is the class {cond.__name__}; pass an instance, "
            f"e.g. {cond.__name__}(...)"
        )
    if not isinstance(cond, Condition):
        raise TypeError(
            f"implicit_argmin: {origin} is {cond!r}; expected a bilevel.conditions.Condition "
            "(Stationarity(), ProjectedFixedPoint(projection), ProximalFixedPoint(prox), KKT(...))"
        )
    if not isinstance(cond, Stationarity) and policy.hvp is not None:
        raise ValueError(
            f"implicit_argmin: hvp={policy.hvp!r} was given with the condition {type(cond).__name__}, "
            "whose backward pass uses reverse-mode products of its residual F, not Hessian-vector "
            "products of G; leave hvp=None (or use Stationarity() for an unconstrained argmin)"
        )
    return cond


def _scalar_checked(objective: Objective, batched: bool) -> Objective:
    """G as a scalar: in batched mode the sum of the per-problem losses (a block-diagonal Hessian)."""
    if not batched:

        def checked(phi: TensorTree, theta: TensorTree) -> torch.Tensor:
            return call_scalar(objective, phi, theta)

        return checked
    per_problem = getattr(objective, "per_problem", None)
    return _Summed(per_problem if callable(per_problem) else objective)


def _as_sum(out: Any) -> Any:
    if isinstance(out, torch.Tensor) and out.ndim == 1:
        return out.sum()
    return out


def _root_linearization(point: Point) -> Linearization:
    return Linearization(point.vjp_phi, point.vjp_theta)


def _run_root(
    name: str,
    F: RootFn,
    passed_to_solver: Callable[..., Any],
    init: TensorTree,
    theta: TensorTree,
    solver: Callable[..., Any],
    policy: ImplicitPolicy,
    return_info: bool,
) -> Any:
    """`implicit_root` and `fixed_point`: F(x, theta) = 0, reverse-mode products, GMRES default."""
    _check_common(name, solver, init, policy.batched)
    problem = _Problem(
        name=name,
        condition=F,
        residual=F,
        objective=passed_to_solver,
        init=init,
        theta_like=theta,
        solver=solver,
        linearize=_root_linearization,
        symmetric=False,
    )
    return _run(_Call(problem, policy), theta, return_info)


def implicit_root(
    F: RootFn,
    init: TensorTree,
    theta: TensorTree,
    solver: Callable[..., Any],
    linear_solver: LinearSolver | Unset | None = UNSET,
    *,
    policy: ImplicitPolicy | None = None,
    batched: bool | Unset = UNSET,
    optimality_tol: float | Unset | None = UNSET,
    throw: bool | Unset = UNSET,
    warn: bool | Unset = UNSET,
    backward_x0: BackwardX0 | Unset = UNSET,
    return_info: bool = False,
) -> Any:
    """x*(theta) with F(x*, theta) = 0, differentiable in theta by the implicit function theorem.

    Backward: solve (dF/dx)^T u = dL/dx with ``linear_solver`` (reverse-mode
    products only), then dL/dtheta = -(dF/dtheta)^T u.  For constrained problems,
    pass a KKT system or a projected-gradient condition as F (or use `fixed_point`).
    F is evaluated again during ``backward()`` (see `implicit_argmin` on closures).

    Args:
        F: ``F(x, theta) -> tree like x``, differentiable by autograd in x and theta.
        init, theta, optimality_tol, throw, warn, backward_x0, return_info: as in
            `implicit_argmin` (the residual is ||F(x, theta)||).
        policy: the keywords as one `ImplicitPolicy` (give it or them, not both); its
            ``hvp`` must be ``None`` and its ``measure_residual`` ``True``.
        solver: ``solver(F, init, theta) -> SolverResult | solution``; it may
            ignore ``F`` and solve its own formulation (cvxpy, a subprocess).
        linear_solver: default ``GMRES()`` since dF/dx need not be symmetric; pass
            ``CG()`` when it is symmetric positive definite.
        batched: B independent problems along the leading dimension of every leaf of
            ``init`` (F_b depends on x_b only); per-problem residuals and solves.

    Returns:
        x with the structure of ``init`` (and the `ImplicitInfo` if ``return_info``).
    """
    pol = resolve_policy(
        "implicit_root",
        policy,
        root=True,
        linear_solver=linear_solver,
        optimality_tol=optimality_tol,
        throw=throw,
        warn=warn,
        backward_x0=backward_x0,
        batched=batched,
    )
    return _run_root("implicit_root", F, F, init, theta, solver, pol, return_info)


def fixed_point(
    T: RootFn,
    init: TensorTree,
    theta: TensorTree,
    solver: Callable[..., Any],
    linear_solver: LinearSolver | Unset | None = UNSET,
    *,
    policy: ImplicitPolicy | None = None,
    batched: bool | Unset = UNSET,
    optimality_tol: float | Unset | None = UNSET,
    throw: bool | Unset = UNSET,
    warn: bool | Unset = UNSET,
    backward_x0: BackwardX0 | Unset = UNSET,
    return_info: bool = False,
) -> Any:
    """x*(theta) with x* = T(x*, theta), differentiable in theta.

    The special case F(x, theta) = T(x, theta) - x of `implicit_root`: for example a
    projected-gradient step T(x) = proj(x - eta grad f(x, theta)), whose fixed points
    are the solutions of the constrained problem min f over the feasible set.

    Args:
        T: ``T(x, theta) -> tree like x``.
        solver: ``solver(T, init, theta)``; e.g. fixed-point iteration, or any
            method that solves the underlying problem directly (cvxpy).
        Other arguments: as in `implicit_root`.
    """

    def F(x: TensorTree, th: TensorTree) -> TensorTree:
        # T's answer matched to x by key: T(x) - x pairs the same leaves
        Tx = aligned(T(x, th), x, "fixed-point map T(x, theta)", "x")
        return tree_map(torch.sub, Tx, x)

    pol = resolve_policy(
        "fixed_point",
        policy,
        root=True,
        linear_solver=linear_solver,
        optimality_tol=optimality_tol,
        throw=throw,
        warn=warn,
        backward_x0=backward_x0,
        batched=batched,
    )
    return _run_root("fixed_point", F, T, init, theta, solver, pol, return_info)
