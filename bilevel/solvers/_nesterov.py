"""Nesterov's accelerated gradient descent (the inner solver analyzed in Theorem 2 of iMAML)."""

from __future__ import annotations

import dataclasses
import math

import torch

from .._results import SolverResult
from .._types import Objective, TensorTree
from ..tree import rowdot
from ._common import Oracle, Step, check_flag, check_int, check_positive, iterate
from ._messages import check_setting, explain

__all__ = ["Nesterov"]


@dataclasses.dataclass(frozen=True)
class Nesterov:
    """Accelerated gradient descent (Nesterov), with per-problem adaptive restart.

    Iterates, from y_0 = x_0:

        x_{k+1} = y_k - lr * grad G(y_k)
        y_{k+1} = x_{k+1} + beta_k (x_{k+1} - x_k)

    The momentum beta_k is

    * ``momentum`` if given (a constant);
    * else, with a strong-convexity estimate ``mu``, the constant
      (sqrt(kappa) - 1) / (sqrt(kappa) + 1) with kappa = 1 / (lr * mu) (= L / mu when
      lr = 1/L): the scheme of Lemma 2 / Theorem 2 of Rajeswaran et al. (2019), which
      reaches ||x - x*|| <= delta after about 2 sqrt(kappa) log(2 kappa ||x*|| / delta)
      gradients;
    * else the schedule k / (k + 3) (convex case, no mu needed).

    With ``restart=True`` (a departure from the plain scheme) the momentum of a
    problem restarts from zero whenever grad G(y_k)'(x_{k+1} - x_k) > 0, i.e. the step
    goes uphill (O'Donoghue & Candes, 2015): this keeps the k/(k+3) schedule linearly
    convergent on strongly convex problems and guards against an over-estimated mu.

    The gradient is only known at y_k, so convergence is tested there and y_k is
    returned: ``grad_norm`` is measured at the returned point.

    Args:
        lr: step size (> 0), ideally 1/L.
        momentum: constant momentum in [0, 1), or ``None``.
        mu: strong-convexity estimate (> 0, with lr * mu <= 1), or ``None``; only used
            when ``momentum`` is ``None``.
        max_iter: iteration cap (>= 0).
        tol: gradient-norm tolerance (>= 0).
        restart: adaptive gradient restart (see above).
        batched: as in `GradientDescent` (a scalar sum of the losses works too).

    Call:
        ``solver(objective, init, theta) -> SolverResult``; one gradient per iteration.
        ``info``: ``momentum`` (the constant, or ``"k/(k+3)"``), ``n_restarts``
        (int, or a (B,) tensor in batched mode), plus the ``problem_*`` fields of
        batched mode.  Unless it converged, ``message`` (`SolverResult.reason`) says why
        in terms of ``max_iter``, ``lr`` and ``tol``.

    Raises:
        TypeError: a setting is not a number, or is a function or tensor (the class called
            as if it were a solver: create it first, ``Nesterov(lr=...)``).

    References:
        Nesterov, Introductory Lectures on Convex Optimization (2004), scheme 2.2.19.
        Rajeswaran, Finn, Kakade, Levine, Meta-Learning with Implicit Gradients
        (NeurIPS 2019), Lemma 2 and Theorem 2.
        O'Donoghue & Candes, Adaptive Restart for Accelerated Gradient Schemes (2015).
    """

    lr: float
    momentum: float | None = None
    mu: float | None = None
    max_iter: int = 1000
    tol: float = 1e-6
    restart: bool = True
    batched: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "mu"):
            check_setting("Nesterov", name, getattr(self, name))
        check_positive("Nesterov", "lr", self.lr)
        check_flag("Nesterov", "restart", self.restart)
        check_flag("Nesterov", "batched", self.batched)
        check_int("Nesterov", "max_iter", self.max_iter, 0)
        check_positive("Nesterov", "tol", self.tol, allow_zero=True)
        if self.momentum is not None:
            m = self.momentum
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
                raise ValueError(f"Nesterov(momentum={m!r}): momentum must be in [0, 1) or None")
            if self.mu is not None:
                raise ValueError(f"Nesterov(momentum={m!r}, mu={self.mu!r}): give momentum or mu, not both")
        if self.mu is not None:
            check_positive("Nesterov", "mu", self.mu)
            if self.lr * self.mu > 1.0:
                raise ValueError(
                    f"Nesterov(lr={self.lr!r}, mu={self.mu!r}): lr * mu must be <= 1 "
                    "(lr <= 1/L <= 1/mu for an L-smooth, mu-strongly convex objective)"
                )

    @property
    def constant_momentum(self) -> float | None:
        """The constant momentum in use, or ``None`` for the k/(k+3) schedule."""
        if self.momentum is not None:
            return float(self.momentum)
        if self.mu is not None:
            s = math.sqrt(1.0 / (self.lr * self.mu))
            return (s - 1.0) / (s + 1.0)
        return None

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        oracle = Oracle(objective, init, theta, batched=self.batched, who="Nesterov", need_values=False)
        method = _NesterovMethod(self, oracle)
        info = {"momentum": self.constant_momentum if self.constant_momentum is not None else "k/(k+3)"}
        result = iterate(oracle, method, max_iter=self.max_iter, tol=self.tol, info=info)
        restarts = method.restarts if oracle.batched else int(method.restarts[0])
        result = result.replace(info={**result.info, "n_restarts": restarts})
        return explain(
            result, "Nesterov", cap=("max_iter", self.max_iter), tol=self.tol, step=("lr", self.lr)
        )


class _NesterovMethod:
    def __init__(self, cfg: Nesterov, oracle: Oracle) -> None:
        self.cfg = cfg
        self.oracle = oracle
        self.beta = cfg.constant_momentum
        self.x_prev: torch.Tensor | None = None
        self.count = torch.zeros(oracle.B, dtype=oracle.dtype, device=oracle.device)
        self.restarts = torch.zeros(oracle.B, dtype=torch.int64)

    def step(self, k: int, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> Step:
        if self.x_prev is None:
            self.x_prev = y.clone()
        a = active[:, None]
        x_new = y - self.cfg.lr * g * a
        delta = x_new - self.x_prev
        if self.cfg.restart:
            uphill = active & (rowdot(g, delta) > 0)
            self.count = torch.where(uphill, torch.zeros_like(self.count), self.count)
            self.restarts += uphill.cpu().long()
        else:
            uphill = torch.zeros_like(active)
        if self.beta is None:
            beta = self.count / (self.count + 3.0)
        else:
            beta = torch.where(uphill, 0.0, self.beta).to(self.count.dtype)
        y_new = x_new + (beta * active)[:, None] * delta
        self.x_prev = torch.where(a, x_new, self.x_prev)
        self.count = torch.where(active, self.count + 1.0, self.count)
        f_new, g_new = self.oracle.value_and_grad(y_new)
        return Step(y_new, f_new, g_new)
