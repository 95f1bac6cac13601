"""Optimization layers: any inner solver as a ``torch.nn.Module``, differentiated implicitly.

=====================  ============================================  ===========================
layer                  output for inputs theta                       backward (see `bilevel`)
=====================  ============================================  ===========================
`ArgminLayer`          argmin_x G(x, theta)                          `implicit_argmin`: Hessian
                                                                     solve, CG by default
`RootLayer`            x with F(x, theta) = 0 (e.g. KKT conditions)  `implicit_root`: GMRES
`FixedPointLayer`      x with x = T(x, theta) (e.g. a projected      `fixed_point`: GMRES
                       gradient step, for constrained problems)
=====================  ============================================  ===========================

The solver is a black box called without autograd (SciPy, cvxpy, a sorting
algorithm, ...); the gradient comes from the condition at its answer and is exact
only where that condition holds, which the layer checks (``optimality_tol``).  For a
constrained problem, pass a condition that encodes the constraints: the projected
gradient fixed point T(x) = proj_C(x - eta grad_x f(x, theta)) for any eta > 0 (its
fixed points are the minimizers of f over the convex set C), or the KKT system with
the multipliers among the unknowns.  The condition must be differentiable at the
solution (a projection is piecewise smooth: fine away from the kinks).

Inputs.  ``layer(theta)`` or ``layer(theta_1, ..., theta_k)``: one input is passed to
the objective as it is (a Tensor, or a dict str -> Tensor such as
``dict(module.named_parameters())``), several Tensors as a tuple.  Gradients flow to
every input tensor that requires grad.  Parameters learned inside the layer (say a
matrix A of a QP) must be passed as inputs, ``layer(z, self.A)``, so that the layer
sees them.

Batches.  Give the inputs a leading batch dimension and write the objective (or
condition) as a sum (or stack) of independent per-example problems: the Hessian (or
Jacobian dF/dx) is then block diagonal, so one implicit solve differentiates the
whole batch, with the cost of the largest block's conditioning.  A batched solver
(``NewtonCG(batched=True)`` with a `bilevel.solvers.BatchedObjective`, a vectorized
projection, one cvxpy problem with a matrix variable) solves every example at once.

Devices.  Nothing here is tied to a device: the unknowns live where ``init`` lives (a
tensor ``init`` is a registered buffer, so ``layer.to(device)`` moves it), and inputs
must be on that device too.  SciPy- and cvxpy-based solvers copy through the host.

Diagnostics.  ``layer.last_info`` is the `bilevel.ImplicitInfo` of the last call:
the solver's result and the optimality residual after the forward pass, the backward
linear solve (``last_info.last_backward``) after ``backward()``.

References:
    Amos & Kolter, "OptNet: differentiable optimization as a layer in neural
    networks", ICML 2017.  Agrawal et al., "Differentiable convex optimization
    layers", NeurIPS 2019.  Blondel et al., "Efficient and modular implicit
    differentiation", NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import nn

from ._hvp import HVPLike
from ._implicit import ImplicitInfo, fixed_point, implicit_argmin, implicit_root
from ._policy import UNSET, ImplicitPolicy, Unset, resolve_policy
from ._settings import check_flag, check_int
from ._types import LinearSolver, Objective, RootFn, TensorTree
from .conditions import Condition
from .tree import leaves, unflatten

__all__ = ["ArgminLayer", "FixedPointLayer", "Init", "RootLayer"]

#: How a layer starts its solver: ``None`` (zeros shaped like the first input tensor), a
#: tree (a Tensor, a tuple or list of Tensors or a dict str -> Tensor, registered as
#: buffers), or ``init(theta) -> TensorTree``.
Init = Union[
    None,
    torch.Tensor,
    tuple[torch.Tensor, ...],
    list[torch.Tensor],
    dict[str, torch.Tensor],
    Callable[[TensorTree], TensorTree],
]


class _ImplicitLayer(nn.Module):
    """What the three layers share: inputs, the starting point, warm starts, diagnostics."""

    def __init__(
        self,
        who: str,
        fn: Callable[..., Any],
        solver: Callable[..., Any],
        init: Init,
        *,
        policy: ImplicitPolicy,
        warm_start: bool,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"{who}: the objective/condition must be callable, got {fn!r}")
        if isinstance(solver, type):
            raise TypeError(
                f"{who}: solver is the class {solver.__name__}; pass an instance, e.g. {solver.__name__}(...)"
            )
        if not callable(solver):
            raise TypeError(f"{who}: solver must be a callable solver(fn, init, theta), got {solver!r}")
        if isinstance(fn, nn.Module) and any(p.requires_grad for p in fn.parameters()):
            # They would silently get no gradient: the implicit backward differentiates the inputs only.
            raise ValueError(
                f"{who}: the objective/condition is a Module with trainable parameters, which would "
                "get no gradient; pass them as inputs instead, e.g. layer(z, *module.parameters()) "
                "with torch.func.functional_call inside the objective, or freeze them"
            )
        self._who = who
        self.fn = fn
        self.solver = solver
        #: how the layer differentiates and what it checks
        self.policy = policy
        self.warm_start = warm_start
        self.last_info: ImplicitInfo | None = None
        self._last_x: TensorTree | None = None
        self._init_fn: Callable[[TensorTree], TensorTree] | None = None
        # The structure of a given init, without its tensors (those are buffers init_0, ...,
        # so that layer.to(device) moves them): a Tensor, a tuple, or a dict's keys.
        self._init_kind = "none"
        self._init_keys: tuple[str, ...] = ()
        self._n_init = 0
        self._set_init(init)

    def _set_init(self, init: Init) -> None:
        """Register a given starting point as buffers (or keep ``init(theta)``)."""
        who = self._who
        if init is None:
            pass
        elif isinstance(init, (torch.Tensor, tuple, list, Mapping)):
            tree: TensorTree = tuple(init) if isinstance(init, list) else init
            try:
                ls = leaves(tree, name="init")
            except TypeError as err:
                raise TypeError(f"{who}: init must be a tree of Tensors: {err}") from err
            if not ls:
                raise ValueError(f"{who}: init holds no tensors")
            for i, t in enumerate(ls):
                if not t.is_floating_point():
                    raise TypeError(f"{who}: init has dtype {t.dtype}; the unknowns must be floating point")
                self.register_buffer(f"init_{i}", t.detach().clone())
            if isinstance(init, Mapping):
                self._init_kind, self._init_keys = "dict", tuple(init.keys())
            else:
                self._init_kind = "tensor" if isinstance(init, torch.Tensor) else "tuple"
            self._n_init = len(ls)
        elif callable(init):
            self._init_fn = init
        else:
            raise TypeError(
                f"{who}: init must be None, a Tensor, a tuple or dict of Tensors or a callable "
                f"init(theta); got {type(init).__name__}"
            )

    def _theta(self, inputs: tuple[Any, ...]) -> TensorTree:
        if not inputs:
            raise TypeError(f"{self._who}: call the layer with at least one input tensor")
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            theta = dict(inputs[0])
            leaves(theta, name=f"{self._who}: input")  # a TypeError naming a non-tensor entry
            if not theta:
                raise TypeError(f"{self._who}: the input dict holds no tensors")
            return theta
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{self._who}: input {i} is a {type(t).__name__}; expected a Tensor (or one "
                    "dict of Tensors as the only input)"
                )
        return inputs[0] if len(inputs) == 1 else tuple(inputs)

    def _init(self, theta: TensorTree) -> TensorTree:
        if self._n_init:
            ls = [getattr(self, f"init_{i}") for i in range(self._n_init)]
            init: TensorTree
            if self._init_kind == "dict":
                init = dict(zip(self._init_keys, ls))
            elif self._init_kind == "tuple":
                init = tuple(ls)
            else:
                init = ls[0]
        elif self._init_fn is not None:
            init = self._init_fn(theta)
        else:
            first = leaves(theta)[0]
            if not first.is_floating_point():
                raise TypeError(
                    f"{self._who}: init=None means zeros like the first input, which has dtype "
                    f"{first.dtype}; give init explicitly"
                )
            init = torch.zeros_like(first, memory_format=torch.contiguous_format).detach()
        last = self._last_x
        if self.warm_start and last is not None and _same_layout(last, init):
            return last
        return init

    def _solve(self, init: TensorTree, theta: TensorTree) -> tuple[TensorTree, ImplicitInfo]:
        raise NotImplementedError

    def forward(self, *inputs: Any) -> Any:
        """The solution for the given inputs (structured like ``init``), differentiable in them.

        Args:
            inputs: Tensors (one is passed to the objective as is, several as a tuple),
                or a single dict str -> Tensor (passed as the dict).
        """
        theta = self._theta(inputs)
        x, info = self._solve(self._init(theta), theta)
        self.last_info = info
        if self.warm_start:
            self._last_x = unflatten(x, [t.detach() for t in leaves(x)])
        return x

    def extra_repr(self) -> str:
        return f"fn={_name(self.fn)}, solver={self.solver!r}, warm_start={self.warm_start}"


def _same_layout(a: TensorTree, b: TensorTree) -> bool:
    """Same structure (kind, a dict's keys in order), shapes, dtypes and devices."""
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        return False
    if isinstance(a, Mapping) and isinstance(b, Mapping) and list(a.keys()) != list(b.keys()):
        return False
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device for x, y in zip(la, lb)
    )


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class ArgminLayer(_ImplicitLayer):
    """x*(theta) = argmin_x G(x, theta) as a module, differentiated by `bilevel.implicit_argmin`.

    Backward: solve (d2G/dx2) w = dL/dx (``linear_solver``, CG by default), return
    -(d2G/dtheta dx)^T w.  Exact only where grad_x G(x*, theta) = 0.

    Args:
        objective: ``G(x, theta) -> scalar Tensor``; theta is the layer's input (a
            Tensor or a dict) or inputs (a tuple).  For a batch, the sum of per-example
            objectives.
        solver: ``solver(objective, init, theta) -> SolverResult | solution``, e.g.
            ``bilevel.solvers.ScipyLBFGS()``.
        init: the solver's starting point: ``None`` (zeros like the first input
            tensor), a Tensor, tuple or dict of Tensors (registered as buffers; the
            answer has its structure), or ``init(theta)``.
        hvp: Hessian-vector products (see `bilevel.implicit_argmin`).
        linear_solver: for the Hessian system; default ``bilevel.CG()``.
        optimality_tol: largest accepted ||grad_x G|| at the solver's answer (default 1e-3).
        throw: raise on failed checks (default; ``False``: warn).
        warm_start: start each solve from the previous answer when its shapes, dtypes
            and devices match (same batch size); useful when inputs change slowly.
        policy: ``hvp``, ``linear_solver``, ``optimality_tol`` and ``throw`` (and the
            other fields, e.g. ``batched``) as one `bilevel.ImplicitPolicy`; give it or
            the keywords, not both (a `TypeError`).
        condition: the optimality condition of the answer, a `bilevel.conditions.Condition`
            (`ProjectedFixedPoint`, `ProximalFixedPoint`, `KKT` for a constrained or
            non-smooth problem); ``None``: the solver's own ``condition``, else
            stationarity (see `bilevel.implicit_argmin`).

    Attributes:
        policy: the `bilevel.ImplicitPolicy` every call uses.
        condition: the condition given (``None``: decided per call as described).
        last_info: the `bilevel.ImplicitInfo` of the last call (``None`` before).

    Example:
        >>> layer = ArgminLayer(lambda x, z: 0.5 * ((x - z) ** 2).sum() + (x**4).sum(),
        ...                     bl.solvers.ScipyLBFGS(tol=1e-10))
        >>> x = layer(z)            # z of any shape; x has z's shape
        >>> x.sum().backward()      # z.grad by one CG solve
    """

    def __init__(
        self,
        objective: Objective,
        solver: Callable[..., Any],
        init: Init = None,
        *,
        hvp: HVPLike | Unset = UNSET,
        linear_solver: LinearSolver | Unset | None = UNSET,
        optimality_tol: float | Unset | None = UNSET,
        throw: bool | Unset = UNSET,
        warm_start: bool = False,
        policy: ImplicitPolicy | None = None,
        condition: Condition | None = None,
    ) -> None:
        if condition is not None and (isinstance(condition, type) or not isinstance(condition, Condition)):
            raise TypeError(
                f"ArgminLayer(condition={condition!r}): expected an instance of a "
                "bilevel.conditions.Condition (e.g. ProjectedFixedPoint(projection)) or None"
            )
        pol = resolve_policy(
            "ArgminLayer",
            policy,
            hvp=hvp,
            linear_solver=linear_solver,
            optimality_tol=optimality_tol,
            throw=throw,
        )
        super().__init__("ArgminLayer", objective, solver, init, policy=pol, warm_start=warm_start)
        self.condition = condition

    def _solve(self, init: TensorTree, theta: TensorTree) -> tuple[TensorTree, ImplicitInfo]:
        x, info = implicit_argmin(
            self.fn, init, theta, self.solver, policy=self.policy, return_info=True, condition=self.condition
        )
        return x, info


class _ConditionLayer(_ImplicitLayer):
    """Shared body of `RootLayer` and `FixedPointLayer`: they differ only in ``_transform``."""

    _transform: Callable[..., Any]

    def __init__(
        self,
        fn: RootFn,
        solver: Callable[..., Any],
        init: Init = None,
        *,
        linear_solver: LinearSolver | Unset | None = UNSET,
        optimality_tol: float | Unset | None = UNSET,
        throw: bool | Unset = UNSET,
        warm_start: bool = False,
        policy: ImplicitPolicy | None = None,
    ) -> None:
        who = type(self).__name__
        pol = resolve_policy(
            who, policy, root=True, linear_solver=linear_solver, optimality_tol=optimality_tol, throw=throw
        )
        super().__init__(who, fn, solver, init, policy=pol, warm_start=warm_start)

    def _solve(self, init: TensorTree, theta: TensorTree) -> tuple[TensorTree, ImplicitInfo]:
        x, info = type(self)._transform(
            self.fn, init, theta, self.solver, policy=self.policy, return_info=True
        )
        return x, info


class RootLayer(_ConditionLayer):
    """x*(theta) with F(x*, theta) = 0 as a module, differentiated by `bilevel.implicit_root`.

    Backward: solve (dF/dx)^T u = dL/dx (``linear_solver``, GMRES by default), return
    -(dF/dtheta)^T u.  For a constrained problem, F can be its KKT conditions with the
    multipliers among the unknowns (``init`` a tuple ``(x, nu)``); the layer then
    returns the tuple.

    Args:
        F: ``F(x, theta) -> tree like x``.
        solver: ``solver(F, init, theta) -> SolverResult | solution``; may ignore F
            and solve its own formulation of the same problem (cvxpy, a closed form).
        init, linear_solver, optimality_tol, throw, warm_start, policy: as in
            `ArgminLayer` (the residual checked is ||F(x, theta)||; the policy's ``hvp``
            must be ``None``).
    """

    _transform = staticmethod(implicit_root)


class FixedPointLayer(_ConditionLayer):
    """x*(theta) with x* = T(x*, theta) as a module, differentiated by `bilevel.fixed_point`.

    The usual constrained layer: T(x, theta) = proj_C(x - eta grad_x f(x, theta)),
    whose fixed points are the minimizers of f over the convex set C, solved by
    anything that solves that problem (cvxpy, a sorting algorithm for the simplex).
    Backward: solve (dT/dx - I)^T u = dL/dx (GMRES by default), return
    -(dT/dtheta)^T u.  The step eta changes the linear system, not the gradient;
    pick it so that I - dT/dx is well conditioned (eta near 1/L for f L-smooth).

    Args:
        T: ``T(x, theta) -> tree like x``, differentiable (almost everywhere) by autograd.
        solver: ``solver(T, init, theta) -> SolverResult | solution``.
        init, linear_solver, optimality_tol, throw, warm_start, policy: as in
            `RootLayer` (the residual checked is ||T(x, theta) - x||).
    """

    _transform = staticmethod(fixed_point)


# ---------------------------------------------------------------------------------------------
# QPLayer: a batched quadratic program as a layer (solver and gradient in bilevel._qp)

from ._qp import (  # noqa: E402
    QPError,
    QPInfeasibleError,
    QPInfo,
    QPNonConvexError,
    QPStatus,
    QPUnboundedError,
    default_tol,
    solve_qp,
)

__all__ += [
    "QPError",
    "QPInfeasibleError",
    "QPInfo",
    "QPLayer",
    "QPNonConvexError",
    "QPStatus",
    "QPUnboundedError",
    "solve_qp",
]


class QPLayer(nn.Module):
    """x*(Q, q, G, h, A, b) = argmin_x 1/2 x'Qx + q'x  s.t.  Ax = b,  Gx <= h, for a batch of QPs.

    The forward pass is a batched primal-dual interior-point method in torch (Mehrotra's
    predictor-corrector, one Cholesky factorization per iteration, of the reduced n x n system
    or, for a positive definite Q where that is cheaper, of the (m + p) constraint-space system,
    shared by predictor and corrector; in the latter an active-set polish ends it early where
    the guessed active set is right; problems stop one by one), on the inputs' device and
    dtype.  The backward pass differentiates the KKT conditions at the answer (OptNet): one
    batched linear solve, gradients for every input that requires grad.  See `bilevel._qp` for
    the equations and what the gradient is at a weakly active constraint.

    Args:
        tol: stopping tolerance on the relative primal and dual residuals (the relative duality
            gap must fall below max(tol / 1000, 10 eps)); default 1e-9 in float64, 1e-5 in float32.
        max_iter: interior-point iterations at most (default 50; 10-20 is typical).
        throw: on the iteration cap, raise `bilevel.ConvergenceError` (default) or warn with
            `bilevel.BilevelWarning` and return the last iterate.
        check: check before solving that inputs are finite, Q is positive semidefinite and A has
            full row rank (default; a few small factorizations, one host read).

    Call:
        ``layer(Q, q, G=None, h=None, A=None, b=None) -> x``.  Q (n, n) positive semidefinite, q
        (n,), G (m, n), h (m,), A (p, n), b (p,); any of them may carry a leading batch
        dimension B (the others are shared by the batch).  x is (B, n) if any input is batched,
        else (n,).

    Attributes:
        last_info: the `QPInfo` of the last call (per-problem status, iterations, residuals).

    Raises:
        StructureError: shapes, batch sizes, dtypes or devices that do not match.
        NonFiniteError: NaN or infinity in an input (the problem index is named).
        QPNonConvexError: Q not positive semidefinite; QPError: A without full row rank;
            QPInfeasibleError, QPUnboundedError: no feasible point, or no bounded unique
            minimizer (each names the problem index and carries ``problems``).
        ConvergenceError: ``max_iter`` reached (with ``throw=True``).
        LinearSolveError: in backward, a KKT system at the answer that is singular (the answer
            is not differentiable there).

    Example:
        >>> layer = QPLayer()
        >>> x = layer(Q, q, G, h)          # Q (n, n) shared, q (B, n): B problems at once
        >>> x.sum().backward()             # q.grad, and Q.grad etc. where they require grad
    """

    def __init__(
        self, *, tol: float | None = None, max_iter: int = 50, throw: bool = True, check: bool = True
    ) -> None:
        super().__init__()
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0):
            raise ValueError(f"QPLayer(tol={tol!r}): must be a number > 0 or None")
        check_int("QPLayer", "max_iter", max_iter, 1)
        check_flag("QPLayer", "throw", throw)
        check_flag("QPLayer", "check", check)
        self.tol = tol
        self.max_iter = max_iter
        self.throw = throw
        self.check = check
        self.last_info: QPInfo | None = None

    def forward(
        self,
        Q: torch.Tensor,
        q: torch.Tensor,
        G: torch.Tensor | None = None,
        h: torch.Tensor | None = None,
        A: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The minimizer, (B, n) or (n,), differentiable in every input."""
        x, info = solve_qp(
            Q, q, G, h, A, b, tol=self.tol, max_iter=self.max_iter, throw=self.throw, check=self.check,
            who="QPLayer",
        )
        self.last_info = info
        return x

    def extra_repr(self) -> str:
        tol = self.tol if self.tol is not None else f"default ({default_tol(torch.float64):g} in float64)"
        return f"tol={tol}, max_iter={self.max_iter}, throw={self.throw}, check={self.check}"
