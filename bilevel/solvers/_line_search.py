"""Backtracking line search with the Armijo sufficient-decrease condition."""

from __future__ import annotations

import dataclasses

import torch

from .. import _sync
from ..tree import rowdot, rows_finite
from ._common import Oracle, check_int

__all__ = ["Armijo", "StepHalving"]


def _check_constants(who: str, c1: float, shrink: float) -> None:
    """``c1`` in (0, 1/2) and ``shrink`` in (0, 1), as numbers."""
    for name, v, hi in (("c1", c1, 0.5), ("shrink", shrink, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < hi:
            raise ValueError(f"{who}({name}={v!r}): {name} must be in (0, {hi:g})")


def _trial(
    oracle: Oracle,
    x: torch.Tensor,
    f: torch.Tensor,
    d: torch.Tensor,
    gd: torch.Tensor,
    t: torch.Tensor,
    run: torch.Tensor,
    c1: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One trial x + t d for the ``run`` problems: ``(trial, f there, g there, passed)``, where a
    trial passes on Armijo's test or its approximate form (see `Armijo`) with finite values."""
    trial = x + torch.where(run, t, torch.zeros_like(t))[:, None] * d
    ft, gt = oracle.value_and_grad(trial)
    armijo = ft <= f + c1 * t * gd
    approx = (ft <= f + 1e-6 * f.abs()) & (rowdot(gt, d) <= (1.0 - 2.0 * c1) * gd.abs())
    return trial, ft, gt, run & rows_finite(ft, gt) & (armijo | approx)


@dataclasses.dataclass(frozen=True)
class Armijo:
    """Backtracking (Armijo) line search, per problem.

    From a trial step t0 (1 for Newton directions; see `GradientDescent` for its
    trial step), accept the first t in t0, t0 * shrink, t0 * shrink^2, ... with

        f(x + t d) <= f(x) + c1 * t * g'd                                  (Armijo), or
        f(x + t d) <= f(x) + 1e-6 |f(x)|  and  g(x + t d)'d <= (1 - 2 c1) |g'd|   (approximate Armijo),

    where g = grad f.  The second test is Hager & Zhang's approximate Wolfe condition
    (sufficient decrease only): it is equivalent to Armijo's on a quadratic, but reads
    the slope instead of a difference of f values, which near a minimizer is lost in
    rounding (the decrease is ~||g||^2 / L, below eps * |f| once ||g|| is ~1e-8), so
    that a search close to the minimizer does not fail on noise.

    Each trial evaluates the objective and its gradient (one ``n_gev``); the accepted
    trial's gradient is the next iteration's, so a first-trial acceptance costs one
    gradient in total.

    Args:
        c1: sufficient-decrease constant, in (0, 1/2).
        shrink: backtracking factor, in (0, 1).
        max_steps: trials before giving up (status ``LINE_SEARCH_FAILED``), >= 1.

    References:
        Nocedal & Wright, Numerical Optimization, 2nd ed., Algorithm 3.1.
        Hager & Zhang, A new conjugate gradient method with guaranteed descent and an
        efficient line search, SIAM J. Optim. 16 (2005), condition (23).
    """

    c1: float = 1e-4
    shrink: float = 0.5
    max_steps: int = 30

    #: a problem for which no step is found stops (status ``LINE_SEARCH_FAILED``)
    stops_on_failure = True

    def __post_init__(self) -> None:
        _check_constants("Armijo", self.c1, self.shrink)
        check_int("Armijo", "max_steps", self.max_steps, 1)

    def search(
        self,
        oracle: Oracle,
        x: torch.Tensor,
        f: torch.Tensor,
        g: torch.Tensor,
        d: torch.Tensor,
        t0: torch.Tensor,
        active: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps along ``d`` for every active problem, with the values and gradients there.

        Args:
            oracle: evaluates the objective (counts the trials).
            x: current points, shape (B, n).
            f: their objective values, shape (B,).
            g: their gradients, shape (B, n).
            d: search directions, shape (B, n); must be descent directions (g'd < 0).
            t0: trial steps, shape (B,).
            active: problems to search for, bool (B,).

        Returns:
            ``(t, ok, x_new, f_new, g_new)``: accepted steps (B,); a bool (B,) mask of the
            active problems for which a step was found (False where d is not a descent
            direction); and the accepted points (B, n) with their values (B,) and
            gradients (B, n).  Rows without an accepted step keep ``x``, ``f``, ``g``.
        """
        gd = rowdot(g, d)
        ok = torch.zeros_like(active)
        done = ~active | ~(gd < 0)
        t = t0.clone()
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        for _ in range(self.max_steps):
            if bool(done.all()):
                break
            trial, ft, gt, good = _trial(oracle, x, f, d, gd, t, ~done, self.c1)
            x_new = torch.where(good[:, None], trial, x_new)
            f_new = torch.where(good, ft, f_new)
            g_new = torch.where(good[:, None], gt, g_new)
            ok |= good
            done |= good
            t = torch.where(done, t, t * self.shrink)
        return t, ok, x_new, f_new, g_new


@dataclasses.dataclass(frozen=True)
class StepHalving:
    """Backtracking with one trial per iteration, per problem: cheap on batches.

    Each iteration tries x + t d once for every running problem.  Where the trial passes the
    same sufficient-decrease test as `Armijo` it is taken; elsewhere the problem stays where it
    is and its t is multiplied by ``shrink`` for the next iteration (the iteration still counts).
    A batch is thus evaluated once per iteration, where `Armijo`'s full search re-evaluates the
    whole batch until its slowest problem finds a step (measured on the sinusoid meta-batch of
    25 tasks: 3 evaluations per inner step against 1).  No problem ever stops for want of a step.
    The step size only shrinks, as in `Armijo` within `GradientDescent`.

    Args:
        c1: sufficient-decrease constant, in (0, 1/2).
        shrink: factor applied to t after a rejected trial, in (0, 1).
    """

    c1: float = 1e-4
    shrink: float = 0.5

    stops_on_failure = False

    def __post_init__(self) -> None:
        _check_constants("StepHalving", self.c1, self.shrink)

    def search(
        self,
        oracle: Oracle,
        x: torch.Tensor,
        f: torch.Tensor,
        g: torch.Tensor,
        d: torch.Tensor,
        t0: torch.Tensor,
        active: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One trial along ``d`` for every active problem (shapes as in `Armijo.search`).

        Returns:
            ``(t, ok, x_new, f_new, g_new)``: the step sizes for the next iteration (t0 where the
            trial passed, ``shrink * t0`` where it failed), a bool (B,) mask of the passed trials,
            and the new points with their values and gradients (``x``, ``f``, ``g`` where failed).
        """
        gd = rowdot(g, d)
        run = active & (gd < 0)
        trial, ft, gt, good = _trial(oracle, x, f, d, gd, t0, run, self.c1)
        t = torch.where(good | ~run, t0, t0 * self.shrink)
        if _sync.host_checks(x) and bool(good.all()):  # every trial passed: no masked copies
            return t, good, trial, ft, gt
        return (
            t,
            good,
            torch.where(good[:, None], trial, x),
            torch.where(good, ft, f),
            torch.where(good[:, None], gt, g),
        )
