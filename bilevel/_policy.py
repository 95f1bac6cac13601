"""How the implicit layer differentiates and what it checks: one value, `ImplicitPolicy`.

The implicit layer (`bilevel.implicit_argmin`, `bilevel.implicit_root`, `bilevel.fixed_point`,
the layers of `bilevel.layers`, `bilevel.hyperopt.HyperProblem`) takes the problem (objective or
condition, init, theta, solver) as arguments and everything else, how the backward pass solves
and how strictly the forward pass checks, as one frozen value, like JAXopt's
``custom_root(optimality_fun, solve=...)`` and Optimistix's ``ImplicitAdjoint(linear_solver=...)``.

Every entry point also keeps the policy's fields as keyword arguments.  Give either the keywords
or ``policy=``, not both: a keyword next to a policy is a `TypeError` (derive a variant with
``policy.replace(throw=False)`` instead), so that no call has two sources for one setting.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any, Union

import torch

from ._hvp import HVPLike, as_oracle
from ._linear_solve import CG, GMRES
from ._settings import check_flag
from ._types import LinearSolver

__all__ = ["UNSET", "BackwardX0", "ImplicitPolicy", "Unset", "resolve_policy"]

#: A warm start of the backward solve: a flat tensor, a function of the right-hand side, or None.
BackwardX0 = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


class Unset(enum.Enum):
    """The default of a policy keyword: "not given" (the policy's field, or its default, applies)."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: What a policy keyword defaults to: not given.
UNSET = Unset.UNSET


@dataclasses.dataclass(frozen=True)
class ImplicitPolicy:
    """How an implicit layer differentiates through a solver, and what it checks.

    The gradient of x*(theta) with F(x*, theta) = 0 comes from one linear solve,
    (dF/dx)^T u = dL/dx, and is exact only where F(x, theta) = 0; the fields choose how
    that system is formed and solved, and how the layer treats an answer or a solve that
    does not meet its tolerance.

    Attributes:
        hvp: `implicit_argmin` only: how Hessian-vector products of G are formed: ``None``
            (reverse-over-reverse through the graph kept by the forward pass), an oracle
            (`bilevel.ReverseOverReverse`, `bilevel.ForwardOverReverse`,
            `bilevel.FiniteDifferenceHVP`, `bilevel.DenseHessian`) or ``hvp(phi, theta, v)``.
            `implicit_root` and `fixed_point` use reverse-mode products of F and refuse it.
        linear_solver: ``linear_solver(matvec, b, x0) -> LinearSolveResult`` for the backward
            system; ``None``: ``bilevel.CG()`` for an argmin (symmetric Hessian),
            ``bilevel.GMRES()`` for a root or fixed point.  In batched mode ``b`` has shape
            (B, n): B independent systems.
        optimality_tol: largest accepted optimality residual ||F(x, theta)|| at the solver's
            answer (||grad_phi G|| for an argmin; per problem in batched mode), >= 0;
            ``None`` skips the check (a solver result that did not converge then warns).
        throw: raise on a failed check (residual above ``optimality_tol``, a failed solver,
            a backward solve that missed its tolerance or met negative curvature); ``False``
            warns with `bilevel.BilevelWarning` and returns the gradient anyway.  Non-finite
            values always raise.
        warn: with ``throw=False``, whether failed checks warn; ``False`` only records them in
            the `bilevel.ImplicitInfo` (for callers that read every solve's status).
        measure_residual: `implicit_argmin` only: measure ||grad_phi G|| at the answer where
            no graph is kept for backward (one more gradient; with a backward pass ahead it
            is free).  ``False`` takes the solver's own ``grad_norm`` / ``problem_grad_norm``
            instead and needs ``optimality_tol=None``.
        backward_x0: warm start of the backward linear solve: a flat tensor of phi's size
            ((B, n) in batched mode), e.g. ``info.last_backward.x`` of a previous call, or a
            function ``b -> x0`` of the right-hand side; ``None``: zeros.
        batched: B independent problems along the leading dimension of every leaf of
            ``init``: one solver call (the solver's batched mode), one backward solve of the
            B systems with per-problem stopping and status, failures named by problem.

    Raises:
        TypeError: a field of the wrong kind (a non-bool flag, a non-number tolerance, a
            class where an instance is expected, a non-callable solver or HVP).
        ValueError: ``optimality_tol`` negative or NaN, or ``measure_residual=False`` with an
            ``optimality_tol`` (the check needs the measured residual).

    Example:
        >>> quiet = bl.ImplicitPolicy(optimality_tol=None, throw=False, warn=False)
        >>> phi = bl.implicit_argmin(G, init, theta, solver, policy=quiet)
        >>> phi = bl.implicit_argmin(G, init, theta, solver, policy=quiet.replace(warn=True))
    """

    hvp: HVPLike = None
    linear_solver: LinearSolver | None = None
    optimality_tol: float | None = 1e-3
    throw: bool = True
    warn: bool = True
    measure_residual: bool = True
    backward_x0: BackwardX0 = None
    batched: bool = False

    def __post_init__(self) -> None:
        for flag in ("throw", "warn", "measure_residual", "batched"):
            check_flag("ImplicitPolicy", flag, getattr(self, flag))
        tol = self.optimality_tol
        if tol is not None:
            if isinstance(tol, bool) or not isinstance(tol, (int, float)):
                raise TypeError(f"ImplicitPolicy(optimality_tol={tol!r}): must be a number or None")
            if math.isnan(tol) or tol < 0:
                raise ValueError(f"ImplicitPolicy(optimality_tol={tol}): must be >= 0 or None")
        if not self.measure_residual and tol is not None:
            raise ValueError(
                "ImplicitPolicy(measure_residual=False): the optimality check needs the measured "
                "residual; pass optimality_tol=None too"
            )
        _check_callable("linear_solver", self.linear_solver, "linear_solver(matvec, b, x0)")
        if isinstance(self.hvp, type):
            _check_callable("hvp", self.hvp, "")
        as_oracle(self.hvp)  # a TypeError for anything but None, an oracle or a callable
        x0 = self.backward_x0
        if x0 is not None and not isinstance(x0, torch.Tensor) and not callable(x0):
            raise TypeError(
                f"ImplicitPolicy(backward_x0={x0!r}): expected a tensor, a function b -> x0, or None"
            )

    def replace(self, **changes: Any) -> ImplicitPolicy:
        """A copy with the given fields changed (checked like a new policy)."""
        return dataclasses.replace(self, **changes)

    def backward_solver(self, symmetric: bool) -> LinearSolver:
        """The solver of the backward system: ``linear_solver``, or by default `bilevel.CG` for a
        symmetric dF/dx (an argmin's Hessian) and `bilevel.GMRES` otherwise."""
        if self.linear_solver is not None:
            return self.linear_solver
        return CG() if symmetric else GMRES()

    def backward_start(self, b: torch.Tensor) -> torch.Tensor | None:
        """The backward solve's starting point for the right-hand side ``b`` (``None``: zeros)."""
        x0 = self.backward_x0
        return x0(b) if callable(x0) else x0


def _check_callable(field: str, value: object, what: str) -> None:
    if value is None:
        return
    if isinstance(value, type):
        raise TypeError(
            f"ImplicitPolicy({field}={value.__name__}): a class; pass an instance, e.g. {value.__name__}()"
        )
    if not callable(value):
        raise TypeError(f"ImplicitPolicy({field}={value!r}): expected a callable {what}")


def resolve_policy(
    who: str, policy: ImplicitPolicy | None, *, root: bool = False, **keywords: Any
) -> ImplicitPolicy:
    """The policy of one call: ``policy``, or one built from the keywords that were given.

    Args:
        who: the entry point, for error messages.
        policy: the caller's ``policy=`` argument.
        root: the entry point solves a root or fixed point (reverse-mode products of F, its
            residual always measured): ``hvp`` must be ``None`` and ``measure_residual`` True.
        keywords: the entry point's policy keywords, `UNSET` where not given.

    Raises:
        TypeError: ``policy`` is not an `ImplicitPolicy`, or it is given together with a keyword.
        ValueError: a keyword's value is refused by `ImplicitPolicy` (named with ``who``), or a
            root's policy asks for HVPs or an unmeasured residual.
    """
    pol = _resolve(who, policy, keywords)
    if root and pol.hvp is not None:
        raise ValueError(
            f"{who}: the policy has hvp={pol.hvp!r}, but a root or fixed point uses reverse-mode "
            "products of F, not Hessian-vector products; leave hvp=None"
        )
    if root and not pol.measure_residual:
        raise ValueError(
            f"{who}: the policy has measure_residual=False, but a root's residual ||F(x, theta)|| "
            "is always measured (no solver reports it); leave measure_residual=True"
        )
    return pol


def _resolve(who: str, policy: ImplicitPolicy | None, keywords: dict[str, Any]) -> ImplicitPolicy:
    given = {k: v for k, v in keywords.items() if v is not UNSET}
    if policy is not None:
        if not isinstance(policy, ImplicitPolicy):
            raise TypeError(f"{who}(policy={policy!r}): expected a bilevel.ImplicitPolicy")
        if given:
            names = ", ".join(sorted(given))
            raise TypeError(
                f"{who}: got policy= and the keyword(s) {names}, two sources for one setting; "
                f"pass policy=policy.replace({names.replace(', ', '=..., ')}=...) instead"
            )
        return policy
    try:
        return ImplicitPolicy(**given)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{who}: {err}") from None
