"""Hyperparameter optimization by implicit hypergradients.

The bilevel problem

    min_theta  f(theta) = L(w*(theta), theta)
    s.t.       w*(theta) = argmin_w G(w, theta)

has L the outer (validation) loss, G the inner (training) objective, w the model
parameters and theta the hyperparameters (for example one log L2 weight per
feature).  `HyperProblem` holds L, G and the inner solver; its `evaluate` solves
the inner problem with `bilevel.implicit_argmin`, so the outer loss is
differentiable in theta, at the cost of one Hessian linear solve per backward pass:

    df/dtheta = dL/dtheta - (d2G/dtheta dw)^T u,   (d2G/dw2) u = dL/dw   at w*(theta).

The hypergradient is exact only where grad_w G(w, theta) = 0: the inner solver's
answer is checked against ``optimality_tol`` on every evaluation.

Two drivers share the problem and report the same `HyperResult`:

* `minimize_hyper`: a torch optimizer on theta (Adam, L-BFGS, ... built by a
  factory), warm-started across outer steps: each inner solve starts from the
  previous answer and each backward linear solve from the previous solution.
* `search_hyper`: evaluate a list of candidates (grid or random search), the
  zero-order baseline, counted in the same unit.

Both call a ``callback`` after each inner solve with a `HyperStep` (the record, the
hyperparameters and the inner answer) and stop when it returns ``True``.  With many
hyperparameters and a small validation set, the hyperparameters overfit the
validation set like weights overfit a training set: give ``score`` (e.g. the loss on
a held-out split) to return the best hyperparameters by it, and ``patience`` to stop
when it stops improving.

The unit of cost is the inner solve: one call of the inner solver, whatever its
iterations (recorded beside it).  An L-BFGS outer step that evaluates f five times
costs five inner solves.

References:
    Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016.
    Lorraine, Vicol & Duvenaud, "Optimizing millions of hyperparameters by implicit
    differentiation", AISTATS 2020.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._errors import BilevelError, NonFiniteError, StructureError
from ._hvp import HVPLike
from ._implicit import ImplicitInfo, implicit_argmin
from ._policy import UNSET, ImplicitPolicy, Unset, resolve_policy
from ._settings import check_flag
from ._status import LinearStatus, SolverStatus
from ._stochastic import SABA as SABA
from ._stochastic import SOBA as SOBA
from ._stochastic import BatchLoss as BatchLoss
from ._stochastic import Constant as Constant
from ._stochastic import Decay as Decay
from ._stochastic import StepSchedule as StepSchedule
from ._stochastic import StocBiO as StocBiO
from ._stochastic import StochasticBilevel as StochasticBilevel
from ._stochastic import StochasticRecord as StochasticRecord
from ._stochastic import StochasticResult as StochasticResult
from ._stochastic import StochasticStop as StochasticStop
from ._stochastic import batch_schedule as batch_schedule
from ._sync import defer_check
from ._types import LinearSolver, Objective, TensorTree
from .tree import check_finite, leaves, unflatten

__all__ = [
    "SABA",
    "SOBA",
    "BatchLoss",
    "Constant",
    "Decay",
    "HyperEvaluation",
    "HyperProblem",
    "HyperRecord",
    "HyperResult",
    "HyperStep",
    "HyperStop",
    "OuterOptimizer",
    "StepSchedule",
    "StocBiO",
    "StochasticBilevel",
    "StochasticRecord",
    "StochasticResult",
    "StochasticStop",
    "batch_schedule",
    "minimize_hyper",
    "search_hyper",
]

#: Builds the outer optimizer from the hyperparameter leaves, e.g.
#: ``lambda params: torch.optim.Adam(params, lr=0.05)``.
OuterOptimizer = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

#: A driver's callback: called with a `HyperStep` after each inner solve; ``True`` stops the
#: run, ``False`` or ``None`` continues it.
Callback = Callable[["HyperStep"], "bool | None"]

#: A driver's selection score: ``score(step) -> float``, lower is better (e.g. the loss of
#: ``step.params`` on a held-out split).
Score = Callable[["HyperStep"], float]


@dataclasses.dataclass(frozen=True)
class HyperEvaluation:
    """The outer loss at one value of the hyperparameters, and how it was obtained.

    Attributes:
        loss: L(w*(theta), theta), a scalar tensor, differentiable in theta when theta
            required grad (one ``backward()`` runs the implicit linear solve).  In the
            `HyperStep` a callback receives, detached.
        params: w*(theta), the inner solver's answer, structured like ``params_init``.
        info: the implicit layer's diagnostics: ``info.solver_result`` (the inner
            solve), ``info.residual_norm`` and, after ``backward()``,
            ``info.last_backward``.
    """

    loss: torch.Tensor
    params: TensorTree
    info: ImplicitInfo


@dataclasses.dataclass(frozen=True, eq=False)
class HyperProblem:
    """A hyperparameter-optimization problem: inner objective, outer loss, inner solver.

    Args:
        inner_objective: ``G(params, hyper) -> scalar Tensor``, the training objective,
            minimized over params; twice differentiable by autograd (or give ``hvp``).
            Write down its scaling: the hypergradient, and what a hyperparameter means,
            depend on whether the data term is a sum or a mean.
        outer_objective: ``L(params, hyper) -> scalar Tensor``, the validation loss;
            it may depend on hyper directly (a penalty on the hyperparameters).
        solver: any inner solver ``solver(objective, init, theta)`` (see
            `bilevel.solvers`); called without autograd.
        hvp: how to form Hessian-vector products of G (see `bilevel.implicit_argmin`).
        linear_solver: solver of the Hessian system; default ``bilevel.CG()``.
        optimality_tol: largest accepted ||grad_params G|| at the inner answer
            (default 1e-3; ``None``: no check).
        throw: raise on a failed check (default; ``False`` warns and continues).
        policy: the four above (and the other fields of a `bilevel.ImplicitPolicy`) as one
            value; give it or the keywords, not both.  The keywords are construction
            arguments only: afterwards ``problem.policy`` holds them (derive a variant with
            ``dataclasses.replace(problem, policy=problem.policy.replace(throw=False))``).

    Raises:
        TypeError: an objective or the solver is not callable, the solver is a class (pass an
            instance), a policy field of the wrong kind, or ``policy`` with a keyword.
        ValueError: ``optimality_tol`` is negative.
    """

    inner_objective: Objective
    outer_objective: Callable[..., torch.Tensor]
    solver: Callable[..., Any]
    hvp: dataclasses.InitVar[HVPLike | Unset] = UNSET
    linear_solver: dataclasses.InitVar[LinearSolver | Unset | None] = UNSET
    optimality_tol: dataclasses.InitVar[float | Unset | None] = UNSET
    throw: dataclasses.InitVar[bool | Unset] = UNSET
    policy: ImplicitPolicy = None  # type: ignore[assignment]  # None: built from the keywords

    def __post_init__(
        self,
        hvp: HVPLike | Unset,
        linear_solver: LinearSolver | Unset | None,
        optimality_tol: float | Unset | None,
        throw: bool | Unset,
    ) -> None:
        for name in ("inner_objective", "outer_objective", "solver"):
            value = getattr(self, name)
            if not callable(value):
                raise TypeError(f"HyperProblem({name}={value!r}): expected a callable")
        if isinstance(self.solver, type):
            raise TypeError(
                f"HyperProblem(solver={self.solver.__name__}): a solver class; pass an instance, e.g. "
                f"{self.solver.__name__}(...)"
            )
        object.__setattr__(
            self,
            "policy",
            resolve_policy(
                "HyperProblem",
                self.policy,
                hvp=hvp,
                linear_solver=linear_solver,
                optimality_tol=optimality_tol,
                throw=throw,
            ),
        )

    def evaluate(
        self, hyper: TensorTree, params_init: TensorTree, *, backward_x0: torch.Tensor | None = None
    ) -> HyperEvaluation:
        """Solve the inner problem at ``hyper`` (from ``params_init``) and compute the outer loss.

        Args:
            hyper: the hyperparameters, a tree (Tensor, tuple or dict of Tensors; see
                `bilevel.tree`), passed to both objectives as is; gradients flow to
                the leaves that require grad.  For a hypergradient, create them with
                ``requires_grad=True``: otherwise (with grad enabled) the loss's
                ``backward()`` raises a `bilevel.BilevelError` saying so (the loss then
                requires grad: read it with ``float(loss.detach())``, or evaluate under
                ``torch.no_grad()`` for values only).
            params_init: the inner solver's starting point.
            backward_x0: warm start of the backward linear solve (a flat vector of the
                size of params, e.g. the previous ``info.last_backward.x``); ``None``: the
                policy's.

        Returns:
            A `HyperEvaluation`.

        Raises:
            NonFiniteError: the outer loss is NaN or infinite; or (in the backward pass) its
                gradient with respect to the inner answer is, which is checked before the
                Hessian system is solved with it.
            StructureError: the outer objective does not return a scalar.
            BilevelError: (in the backward pass) no leaf of ``hyper`` requires grad.
            OptimalityError, LinearSolveError: as in `bilevel.implicit_argmin`.
        """
        return self._evaluate(hyper, params_init, backward_x0, at="")

    def _evaluate(
        self, hyper: TensorTree, params_init: TensorTree, backward_x0: torch.Tensor | None, at: str
    ) -> HyperEvaluation:
        """`evaluate`, with ``at`` (e.g. ``" at outer step 3"``) appended to where errors occurred."""
        policy = self.policy if backward_x0 is None else self.policy.replace(backward_x0=backward_x0)
        params, info = implicit_argmin(
            self.inner_objective, params_init, hyper, self.solver, policy=policy, return_info=True
        )
        loss = self.outer_objective(params, hyper)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise StructureError(f"HyperProblem: outer_objective returned {shape}; it must return a scalar")
        loss = loss.reshape(())
        if not bool(torch.isfinite(loss.detach())):
            raise NonFiniteError(
                f"HyperProblem: the outer loss is {float(loss.detach())}{at} at the inner answer; check the "
                "outer objective's domain (log, sqrt, division) and the hyperparameters' range (e.g. a "
                "log-parametrized weight that over/underflows)"
            )
        if loss.requires_grad:
            # dL/dparams is the right-hand side of the backward Hessian solve: a NaN there would
            # surface as "the backward linear solve produced NaN", blaming the wrong stage.
            for leaf in leaves(params):
                if leaf.requires_grad:
                    leaf.register_hook(_outer_gradient_check(float(loss.detach()), at))
        elif torch.is_grad_enabled():
            # Give the loss a backward that says why it has no gradient, instead of torch's
            # "element 0 of tensors does not require grad and does not have a grad_fn".
            why = _NO_HYPER if not any(t.requires_grad for t in leaves(hyper)) else _CONSTANT_LOSS
            loss = _NoHypergradient.apply(loss, torch.zeros((), device=loss.device, requires_grad=True), why)
        return HyperEvaluation(loss=loss, params=params, info=info)


def _outer_gradient_check(loss: float, at: str) -> Callable[[torch.Tensor], None]:
    """A tensor hook on the inner answer: raise if dL/dparams has NaN or infinity."""

    def check(grad: torch.Tensor) -> None:
        # Queued like the layer's own checks (`bilevel.deferred_checks`); queued before the
        # backward solve's, so this one reports first.
        defer_check(
            functools.partial(_raise_if_nonfinite_outer_gradient, torch.isfinite(grad).all(), loss, at)
        )

    return check


def _raise_if_nonfinite_outer_gradient(finite: torch.Tensor, loss: float, at: str) -> None:
    if not bool(finite):
        raise NonFiniteError(
            f"HyperProblem: the gradient of the outer loss (= {loss:.6g}){at} with respect to "
            "the inner answer has NaN or infinity, so no hypergradient can be formed: the outer "
            "objective is not differentiable there (e.g. sqrt or norm at 0, log of 0, a NaN "
            "branch of torch.where); smooth it (sqrt(x + eps), log(x + eps), logsumexp)"
        )


_NO_HYPER = (
    "HyperProblem.evaluate: backward() on the outer loss, but no tensor of hyper requires "
    "grad, so there is no hypergradient to compute: create the hyperparameters with "
    "requires_grad=True (e.g. torch.zeros(d, requires_grad=True), or "
    "theta.requires_grad_()) before calling evaluate"
)
_CONSTANT_LOSS = (
    "HyperProblem: backward() on an outer loss that depends on neither the inner answer nor the "
    "hyperparameters (a constant, or computed from detached tensors or NumPy): its hypergradient "
    "would be zero by construction; make outer_objective(params, hyper) a differentiable "
    "function of params"
)


class _NoHypergradient(torch.autograd.Function):
    """The identity on the outer loss, whose backward raises ``why`` (no hypergradient exists)."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, anchor: torch.Tensor, why: str) -> torch.Tensor:
        ctx.why = why
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        raise BilevelError(ctx.why)


@dataclasses.dataclass(frozen=True)
class HyperRecord:
    """One inner solve of a driver and the outer loss at its answer.

    Attributes:
        solve: how many inner solves the run had made, this one included (1-based).
        outer_step: optimizer steps completed before this evaluation (``minimize_hyper``;
            an L-BFGS step can evaluate several times), or the candidate's index
            (``search_hyper``).
        outer_loss: L(w*(theta), theta) at this evaluation.
        hypergrad_norm: Euclidean norm of df/dtheta (NaN for `search_hyper`).
        inner_status: the inner solver's status.
        inner_iters: the inner solver's iterations (its own unit).
        inner_gradient_equivalents: the inner solver's work in gradients
            (`SolverResult.gradient_equivalents`).
        residual_norm: ||grad_params G|| at the inner answer, measured by the layer.
        backward_status: status of the backward linear solve (``None`` without one).
        backward_iters: its iterations (0 without one).
        backward_matvecs: its Hessian-vector products (0 without one).
        score: the driver's selection score: ``score(step)`` when a ``score`` was given,
            else the outer loss (lower is better).
    """

    solve: int
    outer_step: int
    outer_loss: float
    hypergrad_norm: float
    inner_status: SolverStatus
    inner_iters: int
    inner_gradient_equivalents: float
    residual_norm: float
    backward_status: LinearStatus | None = None
    backward_iters: int = 0
    backward_matvecs: int = 0
    score: float = math.nan


@dataclasses.dataclass(frozen=True)
class HyperStep:
    """What a driver passes to ``callback`` and ``score`` after each inner solve.

    Attributes:
        record: the `HyperRecord` of this solve (outer loss, hypergradient norm, the inner
            and backward solves' status and work).  In the step given to ``score`` its
            ``score`` is NaN (not yet computed); the callback sees it filled in.
        hyper: the hyperparameters evaluated, structured like ``hyper_init`` (or the
            candidate); detached copies, safe to keep.
        evaluation: the `HyperEvaluation` there, with ``loss`` and ``params`` detached
            (``params`` copied, safe to keep) and the implicit layer's ``info``.
    """

    record: HyperRecord
    hyper: TensorTree
    evaluation: HyperEvaluation

    @property
    def params(self) -> TensorTree:
        """w*(theta), the inner answer at ``hyper`` (detached)."""
        return self.evaluation.params

    @property
    def outer_loss(self) -> float:
        """L(w*(theta), theta) at ``hyper``."""
        return self.record.outer_loss

    @property
    def outer_step(self) -> int:
        """Optimizer steps completed before this evaluation (the candidate's index in `search_hyper`)."""
        return self.record.outer_step

    @property
    def solve(self) -> int:
        """Inner solves made so far, this one included (1-based)."""
        return self.record.solve


class HyperStop(enum.Enum):
    """Why a driver stopped."""

    COMPLETED = "ran every optimizer step (minimize_hyper) or candidate (search_hyper)"
    CALLBACK = "the callback returned True"
    PATIENCE = "the score did not improve for `patience` inner solves"


@dataclasses.dataclass(frozen=True)
class HyperResult:
    """What `minimize_hyper` and `search_hyper` return.

    Attributes:
        hyper: the evaluated hyperparameters with the lowest score (detached): the lowest
            outer loss, unless the driver was given a ``score`` (e.g. a held-out loss).
        params: the inner answer at ``hyper``.
        outer_loss: the outer loss there.
        best_solve: the ``solve`` number of that evaluation (1-based).
        history: one `HyperRecord` per inner solve, in order.
        last_hyper: the hyperparameters when the run stopped (for `minimize_hyper`,
            after the last optimizer step, not evaluated; to resume from).
        stop: why the run stopped (`HyperStop`).
        stopped_at: the outer step (`minimize_hyper`) or candidate index (`search_hyper`)
            after which the run was stopped early; ``None`` when it ran to the end.
        score: the score at ``hyper`` (equal to ``outer_loss`` without a ``score``).
    """

    hyper: TensorTree
    params: TensorTree
    outer_loss: float
    best_solve: int
    history: tuple[HyperRecord, ...]
    last_hyper: TensorTree
    stop: HyperStop = HyperStop.COMPLETED
    stopped_at: int | None = None
    score: float = math.nan

    @property
    def stopped_early(self) -> bool:
        """Whether the callback or ``patience`` ended the run before its last step or candidate."""
        return self.stop is not HyperStop.COMPLETED

    @property
    def n_solves(self) -> int:
        """Inner solves spent."""
        return len(self.history)

    @property
    def outer_losses(self) -> tuple[float, ...]:
        """The outer loss at each inner solve."""
        return tuple(r.outer_loss for r in self.history)

    @property
    def best_so_far(self) -> tuple[float, ...]:
        """The lowest outer loss after each inner solve (the curve to compare methods by)."""
        out: list[float] = []
        best = math.inf
        for r in self.history:
            best = min(best, r.outer_loss)
            out.append(best)
        return tuple(out)

    @property
    def hypergrad_norms(self) -> tuple[float, ...]:
        """The hypergradient norm at each inner solve (NaN for `search_hyper`)."""
        return tuple(r.hypergrad_norm for r in self.history)

    @property
    def scores(self) -> tuple[float, ...]:
        """The selection score at each inner solve (the outer loss without a ``score``)."""
        return tuple(r.score for r in self.history)

    @property
    def inner_iters(self) -> int:
        """Inner-solver iterations summed over the run."""
        return sum(r.inner_iters for r in self.history)

    def __repr__(self) -> str:
        # The history holds one record per inner solve (tens of kilobytes printed): counts only.
        return (
            f"HyperResult(outer_loss={self.outer_loss:.6g}, best_solve={self.best_solve}, "
            f"n_solves={self.n_solves}, inner_iters={self.inner_iters}, stop={self.stop.name}"
            f"{'' if self.stopped_at is None else f' at outer step {self.stopped_at}'}, "
            f"hyper={_describe(self.hyper)}, "
            f"params={_describe(self.params)})"
        )


def _describe(tree: TensorTree) -> str:
    """A tree in a few words: small tensors by value, larger ones by shape and dtype."""
    if isinstance(tree, torch.Tensor):
        dtype = str(tree.dtype).replace("torch.", "")
        if tree.numel() <= 4:
            values = ", ".join(f"{v:.4g}" for v in tree.detach().double().cpu().reshape(-1).tolist())
            return f"tensor([{values}], {dtype})" if tree.ndim else f"tensor({values}, {dtype})"
        return f"Tensor{tuple(tree.shape)} {dtype}"
    if isinstance(tree, (dict, tuple, list)) and len(tree) > 6:
        return f"{type(tree).__name__} of {len(tree)} entries"
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in tree) + ")"
    return type(tree).__name__


class _Tracker:
    """Records evaluations, keeps the best one by score and decides when to stop (both drivers)."""

    def __init__(
        self, who: str, callback: Callback | None, score: Score | None, patience: int | None
    ) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"{who}(callback={callback!r}): expected a function step -> bool | None")
        if score is not None and not callable(score):
            raise TypeError(f"{who}(score={score!r}): expected a function step -> float (lower is better)")
        if patience is not None and (
            isinstance(patience, bool) or not isinstance(patience, int) or patience < 1
        ):
            raise ValueError(f"{who}(patience={patience!r}): patience must be an int >= 1 or None")
        self.who = who
        self.history: list[HyperRecord] = []
        self.best: tuple[float, HyperStep] | None = None
        self.callback = callback
        self.score = score
        self.patience = patience
        self.stop: HyperStop = HyperStop.COMPLETED
        self.stopped_at: int | None = None

    def add(self, hyper: TensorTree, ev: HyperEvaluation, outer_step: int, hypergrad_norm: float) -> None:
        res = ev.info.solver_result
        back = ev.info.last_backward
        loss = float(ev.loss.detach())
        record = HyperRecord(
            solve=len(self.history) + 1,
            outer_step=outer_step,
            outer_loss=loss,
            hypergrad_norm=hypergrad_norm,
            inner_status=res.status if res is not None else SolverStatus.UNKNOWN,
            inner_iters=res.n_iter if res is not None else 0,
            inner_gradient_equivalents=res.gradient_equivalents if res is not None else 0.0,
            residual_norm=ev.info.residual_norm,
            backward_status=back.status if back is not None else None,
            backward_iters=back.n_iter if back is not None else 0,
            backward_matvecs=back.n_matvec if back is not None else 0,
            score=loss if self.score is None else math.nan,
        )
        detached = HyperEvaluation(loss=ev.loss.detach(), params=_detached(ev.params), info=ev.info)
        step = HyperStep(record=record, hyper=_detached(hyper), evaluation=detached)
        if self.score is not None:
            value = self.score(step)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = float(value.detach())
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{self.who}: score(step) returned {type(value).__name__}; it must return a float "
                    "(lower is better), e.g. float(heldout_loss(step.params))"
                )
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"{self.who}: score(step) is {value} at outer step {outer_step} (inner solve "
                    f"{record.solve}, outer loss {loss:.6g}); the score must be finite to rank the "
                    "hyperparameters by it"
                )
            record = dataclasses.replace(record, score=float(value))
            step = dataclasses.replace(step, record=record)
        self.history.append(record)
        if self.best is None or record.score < self.best[0]:
            self.best = (record.score, step)
        if self.callback is not None:
            verdict = self.callback(step)
            if verdict is not None and not isinstance(verdict, bool):
                raise TypeError(
                    f"{self.who}: callback returned {type(verdict).__name__}; it must return True to "
                    "stop the run, False or None to go on (wrap a tensor or NumPy test in bool(...))"
                )
            if verdict and self.stop is HyperStop.COMPLETED:
                self.stop, self.stopped_at = HyperStop.CALLBACK, outer_step
        if (
            self.patience is not None
            and self.stop is HyperStop.COMPLETED
            and record.solve - self.best[1].solve >= self.patience
        ):
            self.stop, self.stopped_at = HyperStop.PATIENCE, outer_step

    @property
    def stopping(self) -> bool:
        return self.stop is not HyperStop.COMPLETED

    def result(self, last_hyper: TensorTree) -> HyperResult:
        if self.best is None:
            raise ValueError(f"{self.who}: no hyperparameters were evaluated")
        score, step = self.best
        return HyperResult(
            hyper=step.hyper,
            params=step.params,
            outer_loss=step.outer_loss,
            best_solve=step.solve,
            history=tuple(self.history),
            last_hyper=_detached(last_hyper),
            stop=self.stop,
            stopped_at=self.stopped_at,
            score=score,
        )


def _detached(tree: TensorTree) -> TensorTree:
    return unflatten(tree, [t.detach().clone() for t in leaves(tree)])


def _check_hyper(who: str, hyper: TensorTree) -> None:
    ls = leaves(hyper, name="hyper")
    if not ls:
        raise ValueError(f"{who}: hyper holds no tensors")
    for t in ls:
        if not t.is_floating_point():
            raise TypeError(f"{who}: hyper has dtype {t.dtype}; hyperparameters must be floating point")
    check_finite(hyper, "hyper")


def minimize_hyper(
    problem: HyperProblem,
    hyper_init: TensorTree,
    params_init: TensorTree,
    *,
    outer: OuterOptimizer | None = None,
    steps: int = 50,
    warm_start: bool = True,
    callback: Callback | None = None,
    score: Score | None = None,
    patience: int | None = None,
) -> HyperResult:
    """Minimize the outer loss over the hyperparameters with a torch optimizer.

    Each evaluation solves the inner problem (one inner solve), computes the outer
    loss and its hypergradient by implicit differentiation; the optimizer is
    stepped with a closure, so optimizers that re-evaluate (``torch.optim.LBFGS``)
    work, and each of their evaluations is counted as an inner solve.

    Warm start (``warm_start=True``): each inner solve starts from the previous
    inner answer, and each backward linear solve from the previous solution
    (``info.last_backward.x``).  Both change only the work, not the answer, up to
    the solvers' tolerances.

    Args:
        problem: the `HyperProblem`.
        hyper_init: initial hyperparameters (a Tensor, tuple or dict of Tensors; the
            result's ``hyper`` and ``last_hyper`` have its structure); copied,
            never modified.
        params_init: the first inner solve's starting point.
        outer: ``outer(hyper_leaves) -> torch.optim.Optimizer``; default
            ``torch.optim.Adam(hyper_leaves, lr=0.1)``.
        steps: optimizer steps (>= 1).
        warm_start: warm-start the inner and backward solves as described above;
            ``False`` starts every solve from ``params_init`` and from zero.
        callback: ``callback(step)`` after each inner solve, with a `HyperStep` (the
            record, the hyperparameters and the inner answer, detached): return ``True`` to
            stop the run after the current optimizer step, ``False`` or ``None`` to go on.
        score: ``score(step) -> float``, lower is better: the returned ``hyper`` is the
            evaluated point with the lowest score (default: the lowest outer loss).  With
            many hyperparameters and a small validation set the outer loss keeps falling
            while the model gets worse on new data; score on a held-out split to notice.
        patience: stop after the current optimizer step once ``patience`` inner solves in
            a row did not lower the best score (with Adam or SGD one solve per step;
            ``None``: never).

    Returns:
        A `HyperResult`: ``hyper`` is the best evaluated point by ``score``; ``stop`` and
        ``stopped_at`` say whether and at which outer step the callback or ``patience``
        stopped the run.

    Raises:
        TypeError, ValueError: bad arguments; a callback that returns neither a bool nor
            None, a score that returns no number.
        NonFiniteError: the outer loss, its gradient with respect to the inner answer, the
            hypergradient or the score is NaN or infinite (the message names the outer step).
        OptimalityError, LinearSolveError: whatever ``problem.evaluate`` raises
            (`bilevel.OptimalityError` when the inner solver misses ``optimality_tol``, ...).
    """
    if not isinstance(problem, HyperProblem):
        raise TypeError(f"minimize_hyper: problem must be a HyperProblem, got {type(problem).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"minimize_hyper(steps={steps!r}): steps must be an int >= 1")
    check_flag("minimize_hyper", "warm_start", warm_start)
    _check_hyper("minimize_hyper", hyper_init)
    hyper_leaves = [t.detach().clone().requires_grad_(True) for t in leaves(hyper_init)]
    factory = outer if outer is not None else _default_outer
    if not callable(factory):
        raise TypeError(f"minimize_hyper(outer={outer!r}): expected a factory params -> Optimizer")
    optimizer = factory(hyper_leaves)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"minimize_hyper: outer(params) returned a {type(optimizer).__name__}; expected a "
            "torch.optim.Optimizer built on the given params"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not all(id(t) in held for t in hyper_leaves):
        # it would step other tensors: hyper would never move, and its gradients pile up
        raise ValueError(
            "minimize_hyper: outer(params) returned an optimizer that does not hold the params it "
            "was given; build it on them, e.g. outer=lambda params: torch.optim.Adam(params, lr=0.1)"
        )
    tracker = _Tracker("minimize_hyper", callback, score, patience)
    state: dict[str, Any] = {"init": params_init, "x0": None, "step": 0}

    def closure() -> float:
        optimizer.zero_grad()
        hyper = unflatten(hyper_init, hyper_leaves)
        at = f" at outer step {state['step']} (inner solve {len(tracker.history) + 1})"
        with torch.enable_grad():
            ev = problem._evaluate(hyper, state["init"], state["x0"] if warm_start else None, at)
            ev.loss.backward()
        grads = [h.grad for h in hyper_leaves if h.grad is not None]
        gnorm = math.sqrt(sum(float((g.detach().double() ** 2).sum()) for g in grads))
        if not math.isfinite(gnorm):
            raise NonFiniteError(
                f"minimize_hyper: the hypergradient has NaN or infinity{at}, where the outer loss is "
                f"{float(ev.loss.detach()):.6g}: check the outer objective's direct dependence on the "
                "hyperparameters and their range (e.g. exp of a large log-weight)"
            )
        if warm_start:
            state["init"] = _detached(ev.params)
            back = ev.info.last_backward
            state["x0"] = back.x.detach() if back is not None else None
        tracker.add(hyper, ev, state["step"], gnorm)
        return float(ev.loss.detach())

    for step in range(steps):
        state["step"] = step
        optimizer.step(closure)
        if tracker.stopping:
            break
    return tracker.result(unflatten(hyper_init, hyper_leaves))


def _default_outer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.1)


def search_hyper(
    problem: HyperProblem,
    candidates: Iterable[TensorTree],
    params_init: TensorTree,
    *,
    warm_start: bool = True,
    callback: Callback | None = None,
    score: Score | None = None,
    patience: int | None = None,
) -> HyperResult:
    """Evaluate each candidate (grid or random search); keep the one with the lowest outer loss.

    No hypergradient is computed (``hypergrad_norm`` is NaN in the records).

    Args:
        problem: the `HyperProblem`.
        candidates: hyperparameter values, each structured like the problem expects.
        params_init: the first inner solve's starting point.
        warm_start: start each inner solve from the previous answer (good along a
            sorted grid, a regularization path); ``False`` starts each from
            ``params_init``.
        callback: ``callback(step)`` after each inner solve, with a `HyperStep`;
            ``True`` stops, ``False`` or ``None`` goes on (as in `minimize_hyper`).
        score: ``score(step) -> float``, lower is better; the returned ``hyper`` is the
            candidate with the lowest score (default: the lowest outer loss).
        patience: stop once ``patience`` candidates in a row did not lower the best score
            (along a sorted grid; ``None``: never).

    Returns:
        A `HyperResult` (``last_hyper`` is the last candidate evaluated, ``stopped_at`` its
        index when the callback or ``patience`` stopped the search).

    Raises:
        ValueError: no candidates.
        TypeError, NonFiniteError: as in `minimize_hyper`.
    """
    if not isinstance(problem, HyperProblem):
        raise TypeError(f"search_hyper: problem must be a HyperProblem, got {type(problem).__name__}")
    check_flag("search_hyper", "warm_start", warm_start)
    tracker = _Tracker("search_hyper", callback, score, patience)
    init = params_init
    last: TensorTree | None = None
    if not isinstance(candidates, Iterable):
        raise TypeError(
            f"search_hyper: candidates must be an iterable of hyperparameter values (a list of "
            f"tensors or trees, or a tensor of rows), got {type(candidates).__name__}"
        )
    for i, hyper in enumerate(candidates):
        _check_hyper("search_hyper", hyper)
        with torch.no_grad():
            ev = problem._evaluate(_detached(hyper), init, None, f" at candidate {i}")
        if warm_start:
            init = _detached(ev.params)
        tracker.add(hyper, ev, i, math.nan)
        last = hyper
        if tracker.stopping:
            break
    if last is None:
        raise ValueError("search_hyper: candidates is empty")
    return tracker.result(last)
