"""What the solvers tell the user: why a solver stopped, in terms of its own settings.

`bilevel.SolverStatus` messages are generic ("hit its iteration cap"); a solver knows which of
its settings is the cap (``max_iter`` of `GradientDescent`, ``newton_iters`` of `NewtonCG`) and
what its line search is.  `explain` puts that in `bilevel.SolverResult.message`, which error
messages and warnings quote through `bilevel.SolverResult.reason`.  `check_setting` refuses the
mistake of calling a solver class as if it were a solver (``ScipyLBFGS(objective, init, theta)``),
which would otherwise surface as "tol=<function ...> must be a number".
"""

from __future__ import annotations

from typing import Any

import torch

from .._results import HostValues, SolverResult
from .._status import SolverStatus
from ._line_search import Armijo, StepHalving

__all__ = ["check_setting", "explain"]


def check_setting(who: str, name: str, value: Any, *, allow_tensor: bool = False) -> None:
    """Refuse a function or a tensor where a number or a setting belongs.

    ``who(objective, init, theta)`` builds a solver with ``objective`` as its first setting:
    the caller meant to call a solver instance.  Call this on the settings that a positional
    call would fill, before their own checks.

    Args:
        who, name: the solver and the setting, for the message.
        value: the setting's value.
        allow_tensor: a tensor is a valid value of this setting (data, e.g. ``X``).

    Raises:
        TypeError: ``value`` is callable (a function, a solver) or, unless ``allow_tensor``, a tensor.
    """
    tensor = isinstance(value, torch.Tensor) and not allow_tensor
    if tensor or (callable(value) and not isinstance(value, (Armijo, torch.Tensor))):
        kind = "a tensor (pass a Python number: float(t))" if tensor else f"the callable {value!r}"
        raise TypeError(
            f"{who}({name}=...): got {kind} where the setting {name} belongs; {who} is a solver class: "
            f"create the solver with its settings, then call it: solver = {who}(...); "
            f"solver(objective, init, theta)"
        )


def _where(result: SolverResult, status: SolverStatus) -> str:
    """' in problems [i, j] of B' for a batched result, '' otherwise."""
    if result.problem_status is None:
        return ""
    idx = [i for i, s in enumerate(result.problem_status) if s is status]
    shown = ", ".join(str(i) for i in idx[:8]) + (", ..." if len(idx) > 8 else "")
    return f" in {len(idx)} of {len(result.problem_status)} problems ([{shown}])"


def explain(
    result: SolverResult,
    who: str,
    *,
    cap: tuple[str, int],
    tol: float,
    step: tuple[str, float] | None = None,
    line_search: Armijo | StepHalving | None = None,
    trust_region: bool = False,
) -> SolverResult:
    """``result`` with `SolverResult.message` saying why it stopped, naming the solver's settings.

    Args:
        result: what the solver's loop returned (`bilevel.solvers._common.iterate`).
        who: the solver's name.
        cap: the name and value of the iteration cap (``("newton_iters", 3)``).
        tol: the gradient-norm tolerance.
        step: the name and value of the step size setting, where there is one (``("lr", 0.1)``).
        line_search: the solver's line search, if any.
        trust_region: the solver is a trust-region method (its failures are of the radius).

    Returns:
        ``result`` with ``message`` set ("" if it converged), composed when first read: the
        result's host values are then read too, not before.
    """
    # the message reads the host values, never x: composed late (a check queued to the end of
    # a `bilevel.deferred_checks` block), it must not keep x, nor a differentiable path's graph
    facts = result.facts()
    return result.replace(
        message=HostValues(
            lambda: {
                "message": _message(
                    facts,
                    who,
                    cap=cap,
                    tol=tol,
                    step=step,
                    line_search=line_search,
                    trust_region=trust_region,
                )
            }
        )
    )


def _message(
    result: SolverResult,
    who: str,
    *,
    cap: tuple[str, int],
    tol: float,
    step: tuple[str, float] | None,
    line_search: Armijo | StepHalving | None,
    trust_region: bool,
) -> str:
    status = result.status
    if status is SolverStatus.CONVERGED:
        return ""
    gn = f"||grad|| = {result.grad_norm:.3e}"
    where = _where(result, status)
    cap_name, cap_value = cap
    if status is SolverStatus.MAX_ITER:
        msg = (
            f"{who} stopped at {cap_name}={cap_value}{where} with {gn} > tol={tol:g}: raise {cap_name} "
            f"or loosen tol"
        )
        if step is not None:
            msg += f" (or raise {step[0]}={step[1]:g} if it is well below 1/L of the objective)"
    elif status is SolverStatus.NEGATIVE_CURVATURE:
        msg = (
            f"{who} stopped at {cap_name}={cap_value}{where} right after a Newton step met negative "
            f"curvature ({gn}): the objective is not convex here; raise {cap_name}, add a proximal or "
            "L2 term, or start closer to a minimizer"
        )
    elif status is SolverStatus.LINE_SEARCH_FAILED and trust_region:
        msg = (
            f"{who}: the trust region shrank below the rounding of the iterate without an acceptable "
            f"step{where}, at {gn} > tol={tol:g}: the objective may be non-smooth there, or tol is "
            "below what the rounding of its values allows (loosen tol)"
        )
    elif status is SolverStatus.LINE_SEARCH_FAILED:
        trials = (
            f"{line_search.max_steps} trials (Armijo(max_steps={line_search.max_steps}, "
            f"shrink={line_search.shrink:g}))"
            if isinstance(line_search, Armijo)
            else "its trials"
        )
        msg = (
            f"{who}: the line search found no step with sufficient decrease in {trials}{where}, at {gn} "
            f"> tol={tol:g}: the objective may be non-smooth there, or tol is below what the rounding of "
            f"its values allows (loosen tol); raise Armijo's max_steps only for a badly scaled step"
        )
    elif status is SolverStatus.NONFINITE:
        lower = f"lower {step[0]}={step[1]:g}" if step is not None else "check the objective"
        msg = (
            f"{who}: a NaN or infinity appeared{where} (the last finite iterate is returned): {lower}, "
            "or check the objective where it is evaluated"
        )
    else:
        return ""
    return msg
