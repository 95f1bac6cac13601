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

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._errors import (
    BilevelWarning,
    LinearSolveError,
    NegativeCurvatureError,
    NonFiniteError,
    OptimalityError,
)
from ._hvp import HVPLike, Linearization, Point, as_oracle, call_scalar, gradient_condition
from ._linear_solve import CG, GMRES
from ._results import LinearSolveResult, SolverResult
from ._status import LinearStatus, SolverStatus
from .tree import check_finite, check_like, leaves, unflatten
from ._types import LinearSolver, Objective, RootFn, TensorTree

__all__ = ["ImplicitArgmin", "ImplicitInfo", "fixed_point", "implicit_argmin", "implicit_root"]

Leaves = tuple[torch.Tensor, ...]


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
        backward: the `LinearSolveResult` of each backward pass, in order.
    """

    solver_result: SolverResult | None = None
    residual_norm: float = math.nan
    backward: list[LinearSolveResult] = dataclasses.field(default_factory=list)

    @property
    def last_backward(self) -> LinearSolveResult | None:
        return self.backward[-1] if self.backward else None


class _Problem:
    """Everything the autograd Function needs besides tensors (not a tensor, so not saved)."""

    def __init__(
        self,
        *,
        name: str,
        condition: Callable[[TensorTree, TensorTree], TensorTree],
        residual: Callable[[TensorTree, TensorTree], TensorTree],
        objective: Callable[..., Any],
        init: TensorTree,
        theta_like: TensorTree,
        solver: Callable[..., Any],
        linearize: Callable[[Point], Linearization],
        linear_solver: LinearSolver,
        optimality_tol: float | None,
        throw: bool,
        backward_x0: torch.Tensor | None,
        info: ImplicitInfo,
    ) -> None:
        self.name = name
        self.condition = condition
        self.residual = residual
        self.objective = objective
        self.init = init
        self.theta_like = theta_like
        self.solver = solver
        self.linearize = linearize
        self.linear_solver = linear_solver
        self.optimality_tol = optimality_tol
        self.throw = throw
        self.backward_x0 = backward_x0
        self.info = info

    def _fail(self, err: Exception) -> None:
        if self.throw:
            raise err
        warnings.warn(f"{err} (throw=False: continuing)", BilevelWarning, stacklevel=4)

    def solve(self, theta: Leaves) -> Leaves:
        theta_tree = unflatten(self.theta_like, list(theta))
        check_finite(theta_tree, "theta")
        init = unflatten(self.init, [t.detach() for t in leaves(self.init, name="init")])
        check_finite(init, "init")
        with torch.no_grad():
            out = self.solver(self.objective, init, theta_tree)
        result = out if isinstance(out, SolverResult) else SolverResult(x=out, status=SolverStatus.UNKNOWN)
        check_like(result.x, self.init, "the solver's answer", "init")
        check_finite(result.x, "the solver's answer")
        x = leaves(result.x)

        # The residual is measured here, independently of what the solver claims.
        theta_det = unflatten(self.theta_like, [t.detach() for t in theta])
        with torch.enable_grad():
            xs = tuple(t.detach().requires_grad_(True) for t in x)
            F = leaves(self.residual(unflatten(self.init, list(xs)), theta_det))
        residual = math.sqrt(sum(float((f.detach().double() ** 2).sum()) for f in F))
        self.info.solver_result = result
        self.info.residual_norm = residual
        if not math.isfinite(residual):
            raise NonFiniteError(f"{self.name}: the optimality residual at the solver's answer is {residual}")
        tol = self.optimality_tol
        if tol is not None and residual > tol:
            self._fail(
                OptimalityError(
                    f"{self.name}: optimality residual ||F(x, theta)|| = {residual:.3e} at the solver's "
                    f"answer exceeds optimality_tol={tol:g} (solver status: {result.status.name}: "
                    f"{result.status.message}); the implicit gradient is only valid at a solution: "
                    "solve the inner problem more accurately or raise optimality_tol"
                )
            )
        elif tol is None and result.status not in (SolverStatus.CONVERGED, SolverStatus.UNKNOWN):
            warnings.warn(
                f"{self.name}: the inner solver did not converge ({result.status.message}); "
                f"residual {residual:.3e}. Set optimality_tol to turn this into a check.",
                BilevelWarning,
                stacklevel=4,
            )
        # An output must not alias an input of the Function.
        return tuple(t.clone() if any(t is s for s in theta) else t.detach() for t in x)

    def backward(self, x: Leaves, theta: Leaves, v: Leaves, wrt: tuple[bool, ...]) -> tuple[Any, ...]:
        if not any(wrt):
            return tuple(None for _ in theta)
        point = Point(self.condition, self.init, self.theta_like, x, theta, wrt)
        lin = self.linearize(point)
        sizes = [t.numel() for t in x]
        dtype = x[0].dtype

        def to_leaves(flat: torch.Tensor) -> Leaves:
            parts = torch.split(flat, sizes)
            return tuple(c.view(t.shape).to(t.dtype) for c, t in zip(parts, x))

        def to_flat(ts: Leaves) -> torch.Tensor:
            return torch.cat([t.reshape(-1).to(dtype) for t in ts])

        def matvec(u: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return to_flat(tuple(t.detach() for t in lin.matvec(to_leaves(u))))

        b = to_flat(v)
        x0 = self.backward_x0
        if x0 is not None and (x0.shape != b.shape or x0.dtype != b.dtype):
            raise ValueError(
                f"{self.name}: backward_x0 has shape {tuple(x0.shape)} and dtype {x0.dtype}; "
                f"expected {tuple(b.shape)} and {b.dtype} (the flattened phi)"
            )
        res = self.linear_solver(matvec, b, x0)
        self.info.backward.append(res)
        if res.status is LinearStatus.NONFINITE or not bool(torch.isfinite(res.x).all()):
            raise NonFiniteError(f"{self.name}: the backward linear solve produced NaN or infinity")
        if res.status is LinearStatus.NEGATIVE_CURVATURE:
            self._fail(
                NegativeCurvatureError(
                    f"{self.name}: backward solve: {res.status.message} (after {res.n_iter} iterations)"
                )
            )
        elif not res.converged:
            self._fail(
                LinearSolveError(
                    f"{self.name}: backward solve stopped with status {res.status.name} after "
                    f"{res.n_iter} iterations, relative residual {res.relative_residual:.3e}: "
                    f"{res.status.message}"
                )
            )
        u = to_leaves(res.x)
        with torch.no_grad():
            cross = lin.cross(u)
        grads = tuple(None if g is None else -g.detach() for g in cross)
        for g in grads:
            if g is not None and not bool(torch.isfinite(g).all()):
                raise NonFiniteError(f"{self.name}: the gradient with respect to theta has NaN or infinity")
        return grads


class ImplicitArgmin(torch.autograd.Function):
    """The autograd Function under `implicit_argmin`, `implicit_root` and `fixed_point`.

    ``forward(problem, *theta_leaves) -> x_leaves`` runs the black-box solver without
    autograd; ``backward`` solves (dF/dx)^T u = dL/dx and returns -(dF/dtheta)^T u.
    Double backward is not supported.  Use the wrappers, which handle structures.
    """

    @staticmethod
    def forward(ctx: Any, problem: _Problem, *theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = problem.solve(theta)
        ctx.problem = problem
        ctx.n_x = len(x)
        ctx.save_for_backward(*x, *theta)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        x, theta = saved[: ctx.n_x], saved[ctx.n_x :]
        wrt = tuple(bool(w) for w in ctx.needs_input_grad[1:])
        return (None, *ctx.problem.backward(x, theta, grads, wrt))


def _run(problem: _Problem, theta: TensorTree, return_info: bool) -> Any:
    theta_leaves = leaves(theta, name="theta")
    out = ImplicitArgmin.apply(problem, *theta_leaves)
    x = unflatten(problem.init, list(out))
    return (x, problem.info) if return_info else x


def _check_common(name: str, solver: Any, optimality_tol: float | None, init: TensorTree) -> None:
    if not callable(solver):
        raise TypeError(f"{name}: solver must be a callable solver(objective, init, theta); got {solver!r}")
    if optimality_tol is not None and not optimality_tol >= 0:
        raise ValueError(f"{name}(optimality_tol={optimality_tol}): must be >= 0 or None")
    ls = leaves(init, name="init")
    if not ls:
        raise ValueError(f"{name}: init holds no tensors")
    for t in ls:
        if not t.is_floating_point():
            raise TypeError(f"{name}: init has dtype {t.dtype}; the unknowns must be floating point")


def implicit_argmin(
    objective: Objective,
    init: TensorTree,
    theta: TensorTree,
    solver: Callable[..., Any],
    hvp: HVPLike = None,
    linear_solver: LinearSolver | None = None,
    *,
    optimality_tol: float | None = 1e-3,
    throw: bool = True,
    backward_x0: torch.Tensor | None = None,
    return_info: bool = False,
) -> Any:
    """phi*(theta) = argmin_phi G(phi, theta), differentiable in theta by implicit differentiation.

    The solver is a black box; gradients come from the optimality condition
    grad_phi G(phi*, theta) = 0 at its answer (Lemma 1 of iMAML in general form):

        dL/dtheta = -(d2G/dtheta dphi)^T w,   where  (d2G/dphi2) w = dL/dphi.

    Args:
        objective: ``G(phi, theta) -> scalar Tensor``; phi and theta arrive in the
            structures of ``init`` and ``theta``.  Must be differentiable twice by
            autograd unless ``hvp`` is a `FiniteDifferenceHVP` or a user callable.
        init: starting point, a Tensor or a tuple of Tensors (floating point).
        theta: the outer variables, a Tensor or a tuple of Tensors.  Gradients flow
            to every leaf that requires grad, however it enters G.
        solver: ``solver(objective, init, theta) -> SolverResult | solution``,
            called without autograd; may leave PyTorch (NumPy, SciPy, a subprocess).
        hvp: ``None`` (reverse-over-reverse through one retained graph, the fastest
            in eager PyTorch), an oracle (`ReverseOverReverse`, `ForwardOverReverse`,
            `FiniteDifferenceHVP`, `DenseHessian`) or ``hvp(phi, theta, v)``.
        linear_solver: solves the Hessian system; default ``CG()`` (1e-10 relative
            residual in float64, 1e-5 in float32).
        optimality_tol: largest acceptable ||grad_phi G|| at the solver's answer;
            ``None`` skips the check (a non-converged `SolverResult` then warns).
        throw: raise on a failed check (optimality residual, linear solve that missed
            its tolerance, negative curvature); ``False`` warns with `BilevelWarning`
            and returns the gradient anyway.  Non-finite values always raise.
        backward_x0: warm start of the backward linear solve, a flat vector of
            phi's size (e.g. ``info.last_backward.x`` of a previous call).
        return_info: also return an `ImplicitInfo` with the diagnostics.

    Returns:
        phi with the structure, shapes and dtypes of ``init`` (and the `ImplicitInfo`
        if ``return_info``).  Reading diagnostics: ``info.residual_norm`` and
        ``info.solver_result`` after the call; ``info.last_backward`` (iterations,
        residual, status of the linear solve) after ``backward()``.

    Raises:
        NonFiniteError: NaN or infinity in theta, init, the answer or the gradient.
        StructureError: the answer's structure, shape, dtype or device differs from
            ``init``, or the objective is not scalar.
        OptimalityError: the residual exceeds ``optimality_tol`` (with ``throw``).
        LinearSolveError, NegativeCurvatureError: the backward solve failed (with ``throw``).
    """
    _check_common("implicit_argmin", solver, optimality_tol, init)
    oracle = as_oracle(hvp)
    checked = _scalar_checked(objective)
    return _run(
        _Problem(
            name="implicit_argmin",
            condition=gradient_condition(checked),
            residual=gradient_condition(checked, create_graph=False),
            objective=objective,
            init=init,
            theta_like=theta,
            solver=solver,
            linearize=lambda point: oracle.linearize(checked, point),
            linear_solver=linear_solver if linear_solver is not None else CG(),
            optimality_tol=optimality_tol,
            throw=throw,
            backward_x0=backward_x0,
            info=ImplicitInfo(),
        ),
        theta,
        return_info,
    )


def _scalar_checked(objective: Objective) -> Objective:
    def checked(phi: TensorTree, theta: TensorTree) -> torch.Tensor:
        return call_scalar(objective, phi, theta)

    return checked


def _root_linearization(point: Point) -> Linearization:
    return Linearization(point.vjp_phi, point.vjp_theta)


def _run_root(
    name: str,
    F: RootFn,
    passed_to_solver: Callable[..., Any],
    init: TensorTree,
    theta: TensorTree,
    solver: Callable[..., Any],
    linear_solver: LinearSolver | None,
    optimality_tol: float | None,
    throw: bool,
    backward_x0: torch.Tensor | None,
    return_info: bool,
) -> Any:
    """`implicit_root` and `fixed_point`: F(x, theta) = 0, reverse-mode products, GMRES default."""
    _check_common(name, solver, optimality_tol, init)
    problem = _Problem(
        name=name,
        condition=F,
        residual=F,
        objective=passed_to_solver,
        init=init,
        theta_like=theta,
        solver=solver,
        linearize=_root_linearization,
        linear_solver=linear_solver if linear_solver is not None else GMRES(),
        optimality_tol=optimality_tol,
        throw=throw,
        backward_x0=backward_x0,
        info=ImplicitInfo(),
    )
    return _run(problem, theta, return_info)


def implicit_root(
    F: RootFn,
    init: TensorTree,
    theta: TensorTree,
    solver: Callable[..., Any],
    linear_solver: LinearSolver | None = None,
    *,
    optimality_tol: float | None = 1e-3,
    throw: bool = True,
    backward_x0: torch.Tensor | None = None,
    return_info: bool = False,
) -> Any:
    """x*(theta) with F(x*, theta) = 0, differentiable in theta by the implicit function theorem.

    Backward: solve (dF/dx)^T u = dL/dx with ``linear_solver`` (reverse-mode
    products only), then dL/dtheta = -(dF/dtheta)^T u.  For constrained problems,
    pass a KKT system or a projected-gradient condition as F (or use `fixed_point`).

    Args:
        F: ``F(x, theta) -> tree like x``, differentiable by autograd in x and theta.
        init, theta, optimality_tol, throw, backward_x0, return_info: as in
            `implicit_argmin` (the residual is ||F(x, theta)||).
        solver: ``solver(F, init, theta) -> SolverResult | solution``; it may
            ignore ``F`` and solve its own formulation (cvxpy, a subprocess).
        linear_solver: default ``GMRES()`` since dF/dx need not be symmetric; pass
            ``CG()`` when it is symmetric positive definite.

    Returns:
        x with the structure of ``init`` (and the `ImplicitInfo` if ``return_info``).
    """
    return _run_root(
        "implicit_root",
        F,
        F,
        init,
        theta,
        solver,
        linear_solver,
        optimality_tol,
        throw,
        backward_x0,
        return_info,
    )


def fixed_point(
    T: RootFn,
    init: TensorTree,
    theta: TensorTree,
    solver: Callable[..., Any],
    linear_solver: LinearSolver | None = None,
    *,
    optimality_tol: float | None = 1e-3,
    throw: bool = True,
    backward_x0: torch.Tensor | None = None,
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
        return unflatten(x, [a - b for a, b in zip(leaves(T(x, th)), leaves(x))])

    return _run_root(
        "fixed_point",
        F,
        T,
        init,
        theta,
        solver,
        linear_solver,
        optimality_tol,
        throw,
        backward_x0,
        return_info,
    )
