"""An inner problem written in cvxpy, solved by cvxpy's installed solvers."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any

from .._errors import StructureError
from .._results import SolverResult
from .._status import SolverStatus
from .._types import Objective, TensorTree
from ..tree import all_finite, leaves
from ._common import lazy_import, tree_from_arrays, tree_to_arrays
from ._messages import check_setting

__all__ = ["Cvxpy"]

# cvxpy status string -> SolverStatus.  "optimal_inaccurate" (the solver stopped at its
# iteration limit or on numerical trouble, with an approximate answer) and "user_limit"
# map to MAX_ITER; infeasible, unbounded and solver errors to FAILED.
_STATUS = {
    "optimal": SolverStatus.CONVERGED,
    "optimal_inaccurate": SolverStatus.MAX_ITER,
    "user_limit": SolverStatus.MAX_ITER,
    "infeasible": SolverStatus.FAILED,
    "infeasible_inaccurate": SolverStatus.FAILED,
    "unbounded": SolverStatus.FAILED,
    "unbounded_inaccurate": SolverStatus.FAILED,
    "infeasible_or_unbounded": SolverStatus.FAILED,
    "solver_error": SolverStatus.FAILED,
}


@dataclasses.dataclass(frozen=True, eq=False)
class Cvxpy:
    """The inner problem as a cvxpy ``Problem``: Variables for phi, Parameters for theta.

    On each call the Parameters get the values of theta's leaves (as float64 NumPy
    arrays, in order), the problem is solved by cvxpy, and the values of
    ``variables`` come back as tensors shaped like ``init``'s leaves (dtype and
    device of ``init``).  The ``objective`` argument of the call is not used: the
    problem is the one written in cvxpy.  To differentiate the answer, pass the same
    problem's optimality condition to the implicit layer, in torch: its gradient
    for an unconstrained problem (`bilevel.implicit_argmin`), a projected-gradient
    fixed point x = proj(x - eta grad f(x, theta)) (`bilevel.fixed_point`), or the
    KKT conditions with the duals among the unknowns (`bilevel.implicit_root`; list
    the Constraints in ``variables`` to get their dual values).

    Status mapping: ``optimal`` -> ``CONVERGED``; ``optimal_inaccurate`` and
    ``user_limit`` -> ``MAX_ITER``; infeasible, unbounded, ``solver_error`` (and a
    raised ``cvxpy.error.SolverError``) -> ``FAILED`` with ``init`` returned unchanged.
    ``info`` holds ``cvxpy_status``, ``solver_name``, ``solve_time`` and, where the
    solver reports it, ``num_iters`` (also ``n_iter``).  ``grad_norm`` is NaN: a
    constrained problem's gradient need not vanish.

    Args:
        problem: a ``cvxpy.Problem``.
        variables: its Variables (primal values) or Constraints (dual values), one per
            leaf of ``init``, in order; sizes must match.  Or a dict ``name -> Variable``
            for a dict ``init``: matched by name (the answer has ``init``'s key order).
        parameters: its Parameters, one per leaf of theta, in order; or a dict
            ``name -> Parameter`` for a dict theta, matched by name.
        solver: a cvxpy solver name (e.g. ``"CLARABEL"``, ``"SCS"``, ``"OSQP"``), or
            ``None`` for cvxpy's choice.
        solve_kwargs: passed to ``problem.solve`` (tolerances, iteration limits).
        warm_start: set the variables to ``init`` and ask cvxpy to warm start.

    Raises:
        ImportError: cvxpy is not installed (``pip install bilevel[cvxpy]``).
        StructureError (on call): the number of leaves, their sizes, or (for dicts of
            variables or parameters) the keys of ``init`` or theta do not match.

    Example:
        >>> x, b = cp.Variable(n), cp.Parameter(m)
        >>> prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A @ x - b)), [x >= 0, x <= 1])
        >>> solver = Cvxpy(prob, variables=[x], parameters=[b], solver="CLARABEL")
        >>> T = lambda x, b: (x - eta * A_t.T @ (A_t @ x - b)).clamp(0, 1)
        >>> x_star = bl.fixed_point(T, torch.zeros(n), b_t, solver=solver)
    """

    problem: Any
    variables: Sequence[Any] | Mapping[str, Any]
    parameters: Sequence[Any] | Mapping[str, Any] = ()
    solver: str | None = None
    solve_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    warm_start: bool = False

    def __post_init__(self) -> None:
        check_setting("Cvxpy", "problem", self.problem)
        cp = lazy_import("cvxpy", "cvxpy", "Cvxpy")
        if not isinstance(self.problem, cp.Problem):
            raise TypeError(f"Cvxpy(problem={type(self.problem).__name__}): expected a cvxpy.Problem")
        variables = _frozen(self.variables, "variables")
        parameters = _frozen(self.parameters, "parameters")
        if not variables:
            raise ValueError("Cvxpy(variables=()): give at least one Variable (one per leaf of init)")
        problem_vars = {id(v) for v in self.problem.variables()}
        problem_cons = {id(c) for c in self.problem.constraints}
        for i, v in _items(variables):
            if isinstance(v, cp.Variable):
                if id(v) not in problem_vars:
                    raise ValueError(
                        f"Cvxpy(variables[{i!r}]={v}): this Variable does not appear in the problem"
                    )
            elif isinstance(v, cp.constraints.constraint.Constraint):
                if id(v) not in problem_cons:
                    raise ValueError(
                        f"Cvxpy(variables[{i!r}]={v}): this Constraint is not one of the problem's"
                    )
            else:
                raise TypeError(
                    f"Cvxpy(variables[{i!r}]={v!r}): expected a cvxpy Variable or Constraint (for its dual)"
                )
        problem_params = {id(p) for p in self.problem.parameters()}
        for i, p in _items(parameters):
            if not isinstance(p, cp.Parameter):
                raise TypeError(f"Cvxpy(parameters[{i!r}]={p!r}): expected a cvxpy Parameter")
            if id(p) not in problem_params:
                raise ValueError(
                    f"Cvxpy(parameters[{i!r}]={p}): this Parameter does not appear in the problem"
                )
        if self.solver is not None and self.solver not in cp.installed_solvers():
            raise ValueError(
                f"Cvxpy(solver={self.solver!r}): not installed; installed: {cp.installed_solvers()}"
            )
        object.__setattr__(self, "variables", variables)
        object.__setattr__(self, "parameters", parameters)
        object.__setattr__(self, "solve_kwargs", types.MappingProxyType(dict(self.solve_kwargs)))

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        cp = lazy_import("cvxpy", "cvxpy", "Cvxpy")
        parameters = _in_order(self.parameters, theta, "theta", "parameters") if self.parameters else []
        theta_arrays = tree_to_arrays(theta, "theta") if self.parameters else []
        if len(theta_arrays) != len(parameters):
            raise StructureError(
                f"Cvxpy: theta has {len(theta_arrays)} tensors but {len(parameters)} Parameters were given"
            )
        for (i, p), a in zip(parameters, theta_arrays):
            if a.size != p.size:
                raise StructureError(
                    f"Cvxpy: theta[{i!r}] has {a.size} entries but Parameter {p.name()} has shape {p.shape}"
                )
            p.value = a.reshape(p.shape)
        named_variables = _in_order(self.variables, init, "init", "variables")
        variables = [v for _, v in named_variables]
        init_leaves = leaves(init, name="init")
        if len(init_leaves) != len(variables):
            raise StructureError(
                f"Cvxpy: init has {len(init_leaves)} tensors but {len(variables)} variables were given"
            )
        for (i, v), t in zip(named_variables, init_leaves):
            if v.size != t.numel():
                raise StructureError(
                    f"Cvxpy: init[{i!r}] has shape {tuple(t.shape)} but variables[{i!r}] has {v.shape}"
                )
        if self.warm_start:
            for v, a in zip(variables, tree_to_arrays(init, "init")):
                if isinstance(v, cp.Variable):
                    v.value = a.reshape(v.shape)
        message = ""
        try:
            self.problem.solve(solver=self.solver, warm_start=self.warm_start, **self.solve_kwargs)
            cvx_status = str(self.problem.status)
        except cp.error.SolverError as err:
            cvx_status, message = "solver_error", str(err)
        status = _STATUS.get(cvx_status, SolverStatus.FAILED)
        values = [v.value if isinstance(v, cp.Variable) else v.dual_value for v in variables]
        info: dict[str, Any] = {"cvxpy_status": cvx_status}
        if message:
            info["message"] = message
        stats = getattr(self.problem, "solver_stats", None)
        n_iter = 0
        if stats is not None:
            info["solver_name"] = stats.solver_name
            info["solve_time"] = stats.solve_time
            if stats.num_iters is not None:
                n_iter = int(stats.num_iters)
                info["num_iters"] = n_iter
        if any(v is None for v in values) or status is SolverStatus.FAILED:
            if status is SolverStatus.CONVERGED:
                status = SolverStatus.FAILED
                info["message"] = "cvxpy reported a solution but some variables have no value"
            x = tree_from_arrays(tree_to_arrays(init, "init"), init, "Cvxpy", "init")
            said = f": {info['message']}" if "message" in info else ""
            why = (
                f"Cvxpy returned no solution (x is init): cvxpy status {cvx_status!r}{said}; check the "
                "problem's feasibility and boundedness at this theta, or pass another solver="
            )
            return SolverResult(x=x, status=status, n_iter=n_iter, info=info, message=why)
        x = tree_from_arrays(values, init, "Cvxpy", "the variables' values")
        if not bool(all_finite(x).all()):
            status = SolverStatus.NONFINITE
        value = self.problem.value
        fun = float(value) if value is not None and math.isfinite(float(value)) else math.nan
        return SolverResult(x=x, status=status, n_iter=n_iter, fun=fun, info=info)


def _frozen(spec: Sequence[Any] | Mapping[str, Any], what: str) -> tuple[Any, ...] | Mapping[str, Any]:
    """A tuple of a sequence, a read-only dict of a mapping (whose keys must be strings)."""
    if isinstance(spec, Mapping):
        for k in spec:
            if not isinstance(k, str):
                raise TypeError(f"Cvxpy({what}=...): the keys of a dict of {what} must be str, got {k!r}")
        return types.MappingProxyType(dict(spec))
    return tuple(spec)


def _items(spec: tuple[Any, ...] | Mapping[str, Any]) -> list[tuple[int | str, Any]]:
    """(position or name, item) pairs, for messages that name the entry."""
    if isinstance(spec, Mapping):
        return list(spec.items())
    return list(enumerate(spec))


def _in_order(
    spec: Sequence[Any] | Mapping[str, Any], tree: TensorTree, tree_name: str, what: str
) -> list[tuple[int | str, Any]]:
    """The cvxpy objects of ``spec`` in the order of ``tree``'s leaves, with their labels.

    A sequence is matched by position; a dict by name, against a dict ``tree`` with the same keys.

    Raises:
        StructureError: a dict ``spec`` and a ``tree`` that is not a dict, or whose keys differ.
    """
    if not isinstance(spec, Mapping):
        return list(enumerate(spec))
    if not isinstance(tree, Mapping):
        raise StructureError(
            f"Cvxpy: {what} is a dict (keys {list(spec)}) but {tree_name} is a {type(tree).__name__}; "
            f"give {tree_name} as a dict with those keys"
        )
    missing = [k for k in spec if k not in tree]
    extra = [k for k in tree if k not in spec]
    if missing or extra:
        raise StructureError(
            f"Cvxpy: {tree_name} has keys {list(tree)} but {what} has {list(spec)}"
            + (f"; {tree_name} lacks {missing}" if missing else "")
            + (f"; no entry of {what} for {extra}" if extra else "")
        )
    return [(k, spec[k]) for k in tree]
