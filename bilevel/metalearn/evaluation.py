"""Adapt a meta-trained model to tasks and score it: per-task losses, accuracies and predictions.

A `Run` is everything needed to adapt: the model function, the meta-parameters theta, the
evaluation `MetaAlgorithm` and lambda.  `bilevel.metalearn.load_run` reads one from a checkpoint;
`bilevel.metalearn.Experiment.run` makes one during training; or build one from parts.  Then::

    run = load_run("runs/imaml/checkpoint.pt")
    res = evaluate_tasks(run, my_tasks)          # a Task with a leading task dimension, or a list
    res.predictions                              # (B, Nq, ways) logits after adaptation
    res.query_acc, res.mean_accuracy, res.ci95   # per task; mean and 95% half-width in percent

Every task is adapted with ``run.algorithm``'s inner solver from theta (`adapt`), then its query
set is passed through the adapted model.  The computation is the one of `evaluate_batch`
(the same model path: batched model, ``torch.func.vmap`` or a loop), so the accuracies are equal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch

from bilevel.internal import check_int

from .algorithms import MetaAlgorithm, predict_batch
from .batched import BatchedModel
from .data.samplers import SinusoidTasks, TaskSampler
from .models import LossFn, ModelFn, Params
from .proximal import ProximalWeight, coerce
from .tasks import Task, stack_tasks

if TYPE_CHECKING:  # a run's configuration is read, not built, here: training imports this module
    from .training.config import TrainConfig

__all__ = ["EvalResult", "Run", "evaluate", "evaluate_fixed", "evaluate_tasks"]

#: lambda as `adapt` takes it: a `ProximalWeight`, a float, a 0-d tensor, or one 0-d tensor per
#: parameter name (`bilevel.metalearn.proximal.coerce`).
LamValue = Union[ProximalWeight, float, torch.Tensor, dict[str, torch.Tensor]]

#: Tasks per adaptation call where neither the caller nor a configuration says.
DEFAULT_BATCH = 25


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A meta-trained model, ready to adapt to new tasks.

    Attributes:
        model_fn: ``model_fn(params, x) -> out`` for one task: ``x`` ``(N, ...)``, ``out`` ``(N, ways)``
            logits or ``(N, 1)`` regression outputs.
        params: theta by name (the meta-parameters).
        algorithm: the `MetaAlgorithm` whose inner solver adapts theta to a support set.
        loss: ``loss(out, y) -> scalar`` for one task.
        classification: whether ``out`` are logits scored by accuracy (else regression: NaN accuracy).
        lam: lambda of the inner objective as a `ProximalWeight` (given as one, a float, or the
            learned lambda: a 0-d tensor, or one per parameter name), or ``None`` for
            ``algorithm.lam``.
        batched: the `BatchedModel` of the model (``None``: ``torch.func.vmap`` or a loop).
        config: the run's `TrainConfig` (``None`` for a run built from parts); sets the default
            tasks per call (``eval_batch``) and ``vectorize``.
        step: meta-steps done when the checkpoint was written (``None`` if unknown).

    Raises:
        TypeError: ``algorithm`` is not a `MetaAlgorithm`, ``params`` is not a non-empty dict of
            tensors, or ``model_fn`` or ``loss`` is not callable.
    """

    model_fn: ModelFn
    params: Params
    algorithm: MetaAlgorithm
    loss: LossFn
    classification: bool
    lam: ProximalWeight | None = None
    batched: BatchedModel | None = None
    config: TrainConfig | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.algorithm, MetaAlgorithm):
            raise TypeError(f"Run(algorithm={self.algorithm!r}): expected a MetaAlgorithm (make_algorithm)")
        if (
            not isinstance(self.params, dict)
            or not self.params
            or not all(isinstance(v, torch.Tensor) for v in self.params.values())
        ):
            raise TypeError("Run(params=...): expected a non-empty dict name -> Tensor (theta by name)")
        for name in ("model_fn", "loss"):
            if not callable(getattr(self, name)):
                raise TypeError(f"Run({name}=...): expected a callable")
        if self.lam is not None:
            object.__setattr__(self, "lam", coerce(self.lam))

    @property
    def device(self) -> torch.device:
        """Where the parameters are (tasks are moved here)."""
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (task inputs must have it)."""
        return next(iter(self.params.values())).dtype

    def __repr__(self) -> str:
        n = sum(v.numel() for v in self.params.values())
        lam_s = "None" if self.lam is None else self.lam.describe()
        cfg = self.config
        what = f", config={cfg.algo} on {cfg.dataset}" if cfg is not None else ""
        step = f", step={self.step}" if self.step is not None else ""
        return (
            f"Run(theta: {n:,} parameters, {str(self.dtype).replace('torch.', '')} on {self.device}, "
            f"algorithm={self.algorithm!r}, lam={lam_s}, "
            f"{'classification' if self.classification else 'regression'}{what}{step})"
        )


def _ci95(x: torch.Tensor) -> float:
    """Half-width of the normal 95% interval of the mean of ``x`` (NaN for fewer than 2 values)."""
    return float(1.96 * x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


@dataclasses.dataclass(frozen=True, eq=False)
class EvalResult:
    """Per-task scores and per-query outputs of adapted models.

    Attributes:
        query_loss: ``(B,)`` query loss of each task after adaptation.
        query_acc: ``(B,)`` query accuracy of each task in [0, 1] (NaN for regression).
        predictions: ``(B, Nq, ways)`` logits (classification) or ``(B, Nq, 1)`` outputs (regression)
            of each adapted model on its query set; ``query_acc`` is the mean of
            ``predictions.argmax(-1) == query_y`` over the queries.
    """

    query_loss: torch.Tensor
    query_acc: torch.Tensor
    predictions: torch.Tensor

    @property
    def n_tasks(self) -> int:
        """B."""
        return int(self.query_loss.numel())

    @property
    def mean_accuracy(self) -> float:
        """Mean query accuracy over the tasks, in percent (NaN for regression)."""
        return float(self.query_acc.double().cpu().mean() * 100)

    @property
    def ci95(self) -> float:
        """Half-width of the 95% interval of `mean_accuracy`, in percent (NaN for one task)."""
        return _ci95(self.query_acc.double().cpu()) * 100

    @property
    def mean_loss(self) -> float:
        """Mean query loss over the tasks."""
        return float(self.query_loss.double().cpu().mean())

    @property
    def loss_ci95(self) -> float:
        """Half-width of the 95% interval of `mean_loss`."""
        return _ci95(self.query_loss.double().cpu())

    def __repr__(self) -> str:
        scored = bool(self.query_acc.isfinite().any())
        acc = f"accuracy {self.mean_accuracy:.2f} ± {self.ci95:.2f}%, " if scored else ""
        return (
            f"EvalResult({self.n_tasks} tasks, {acc}loss {self.mean_loss:.4g} ± {self.loss_ci95:.2g}, "
            f"predictions {tuple(self.predictions.shape)})"
        )

    def summary(self) -> dict[str, float]:
        """``accuracy``, ``ci95`` (percent), ``loss``, ``loss_ci95``, ``n_tasks``: what `evaluate` returns."""
        return {
            "accuracy": self.mean_accuracy,
            "ci95": self.ci95,
            "loss": self.mean_loss,
            "loss_ci95": self.loss_ci95,
            "n_tasks": self.n_tasks,
        }

    @classmethod
    def concat(cls, results: Sequence[EvalResult]) -> EvalResult:
        """The results of consecutive task batches as one (tasks in order).

        Raises:
            ValueError: ``results`` is empty.
        """
        if not results:
            raise ValueError("EvalResult.concat: no results")
        if len(results) == 1:
            return results[0]
        return cls(
            torch.cat([r.query_loss for r in results]),
            torch.cat([r.query_acc for r in results]),
            torch.cat([r.predictions for r in results]),
        )


# ------------------------------------------------------------------------------------- checking tasks
def _shapes(t: Task) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(x.shape) for x in t)


def _stack_list(tasks: Sequence[object]) -> Task:
    """Stack single tasks after checking that they are `Task`s of one format."""
    if not tasks:
        raise ValueError("evaluate_tasks: no tasks")
    checked: list[Task] = []
    for i, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise TypeError(f"evaluate_tasks: tasks[{i}] is a {type(t).__name__}, not a Task")
        if not all(isinstance(x, torch.Tensor) for x in t):
            raise TypeError(f"evaluate_tasks: tasks[{i}] has a field that is not a tensor")
        if _shapes(t) != _shapes(checked[0] if checked else t):
            raise ValueError(
                f"evaluate_tasks: tasks[{i}] has shapes {_shapes(t)} (support_x, support_y, query_x, "
                f"query_y) but tasks[0] has {_shapes(checked[0])}: a list holds tasks of one format"
            )
        checked.append(t)
    return stack_tasks(checked)


def _check_batch(batch: Task, run: Run) -> None:
    """Shapes, dtypes and labels of a batch of B tasks, against ``run``."""
    for name, t in zip(Task._fields, batch):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"evaluate_tasks: {name} is a {type(t).__name__}, not a tensor")
    sx, sy, qx, qy = batch
    hint = (
        "pass a Task whose tensors have a leading task dimension B (stack_tasks), or a list of single tasks"
    )
    for name, x, y in (("support", sx, sy), ("query", qx, qy)):
        if x.ndim < 3:
            raise ValueError(
                f"evaluate_tasks: {name}_x has shape {tuple(x.shape)}; expected (B, N, ...): {hint}"
            )
        if tuple(y.shape[:2]) != tuple(x.shape[:2]) or (run.classification and y.ndim != 2):
            want = "(B, N) labels" if run.classification else "(B, N, ...) targets"
            raise ValueError(
                f"evaluate_tasks: {name}_y has shape {tuple(y.shape)} for {name}_x {tuple(x.shape)}; "
                f"expected {want} with {name}_x (B, N, ...): {hint}"
            )
        if not x.is_floating_point():
            raise TypeError(f"evaluate_tasks: {name}_x is {x.dtype}: inputs must be floating ({run.dtype})")
        if x.dtype != run.dtype:
            raise ValueError(
                f"evaluate_tasks: {name}_x is {x.dtype} but the parameters are {run.dtype}: "
                f"convert the tasks (x.to({run.dtype}))"
            )
        if run.classification and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
            raise TypeError(f"evaluate_tasks: {name}_y is {y.dtype}: class labels must be integers (int64)")
    if not (sx.shape[0] == sy.shape[0] == qx.shape[0] == qy.shape[0]):
        raise ValueError(
            f"evaluate_tasks: support and query sets hold different numbers of tasks "
            f"({sx.shape[0]} and {qx.shape[0]}): {hint}"
        )
    if sx.shape[0] < 1:
        raise ValueError("evaluate_tasks: no tasks (B = 0)")
    if tuple(sx.shape[2:]) != tuple(qx.shape[2:]):
        raise ValueError(
            f"evaluate_tasks: support examples have shape {tuple(sx.shape[2:])} but query examples "
            f"{tuple(qx.shape[2:])}"
        )
    if run.classification and run.config is not None:
        ways = run.config.ways
        lo, hi = int(torch.minimum(sy.min(), qy.min())), int(torch.maximum(sy.max(), qy.max()))
        if lo < 0 or hi >= ways:
            raise ValueError(
                f"evaluate_tasks: labels run from {lo} to {hi}; a {ways}-way run needs 0..{ways - 1}"
            )


# ------------------------------------------------------------------------------------- evaluation
def _evaluate_batch(run: Run, batch: Task, vectorize: bool) -> EvalResult:
    losses, acc, out = predict_batch(
        run.algorithm,
        run.model_fn,
        run.loss,
        run.params,
        batch,
        lam=run.lam,
        classification=run.classification,
        vectorize=vectorize,
        batched=run.batched,
    )
    return EvalResult(losses, acc, out)


def evaluate_tasks(
    run: Run,
    tasks: Task | Sequence[Task],
    *,
    batch_size: int | None = None,
    vectorize: bool | None = None,
) -> EvalResult:
    """Adapt ``run`` to each task's support set and score its query set.

    Task ``b`` is adapted from theta with ``run.algorithm``'s inner solver (`adapt`, no gradient
    kept); its query inputs then go through the adapted model.

    Args:
        run: the model, theta, algorithm and lambda (`load_run`, `Experiment.run` or built from parts).
        tasks: a `Task` whose tensors have a leading task dimension B (``support_x`` ``(B, Ns, ...)``,
            ``support_y`` ``(B, Ns)`` int64 labels or ``(B, Ns, 1)`` targets, ``query_x``
            ``(B, Nq, ...)``, ``query_y`` likewise), or a sequence of B single tasks of equal shapes.
            Inputs must have the parameters' dtype; tensors are moved to the parameters' device.
        batch_size: tasks adapted per call (default: the run's ``eval_batch``, else 25); memory
            grows with it.
        vectorize: ``torch.func.vmap`` over tasks where there is no batched model (default: the
            run's ``vectorize``, else True); ``False`` loops.

    Returns:
        `EvalResult` with per-task ``query_loss`` and ``query_acc`` ``(B,)`` and ``predictions``
        ``(B, Nq, ways)`` logits (classification) or ``(B, Nq, 1)`` outputs (regression).

    Raises:
        TypeError: ``tasks`` is not a `Task` or a sequence of them; inputs are not floating, or
            classification labels are not integers; ``batch_size`` is not an int.
        ValueError: no tasks; shapes without a leading task dimension or that disagree between
            fields or tasks; inputs of another dtype than the parameters; labels outside
            ``0..ways-1`` (runs with a configuration); ``batch_size < 1``.
    """
    if isinstance(tasks, Task):
        batch = tasks
    elif isinstance(tasks, Sequence) and not isinstance(tasks, (str, bytes)):
        batch = _stack_list(tasks)
    else:
        raise TypeError(
            f"evaluate_tasks(tasks=...): expected a Task or a sequence of Tasks, got {type(tasks).__name__}"
        )
    _check_batch(batch, run)
    cfg = run.config
    size = batch_size if batch_size is not None else (cfg.eval_batch if cfg is not None else DEFAULT_BATCH)
    check_int("evaluate_tasks", "batch_size", size, 1)
    vec = vectorize if vectorize is not None else (cfg.vectorize if cfg is not None else True)
    batch = batch.to(run.device)
    B = batch.support_x.shape[0]
    if B <= size:
        return _evaluate_batch(run, batch, vec)
    chunks = [Task(*(t[s : s + size] for t in batch)) for s in range(0, B, size)]
    return EvalResult.concat([_evaluate_batch(run, c, vec) for c in chunks])


def evaluate_fixed(
    run: Run,
    sampler: TaskSampler | SinusoidTasks,
    n_tasks: int,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """`evaluate_tasks` on the first ``n_tasks`` fixed evaluation tasks of ``sampler``.

    The tasks are drawn ``batch_size`` at a time (`TaskSampler.fixed_batch`), so memory stays
    bounded; task ``i`` depends only on the sampler's evaluation seed and ``i``.

    Args:
        run: what to adapt.
        sampler: the test tasks (e.g. `Experiment.test_sampler`).
        n_tasks: how many (600 in the Omniglot protocol).
        batch_size: tasks per call (default: the run's ``eval_batch``, else 25).
        device: where to draw the tasks (default: the parameters' device).
        progress: called with the number of tasks just evaluated, after each batch (a progress bar's
            ``update``).

    Raises:
        ValueError: ``n_tasks < 1`` or ``batch_size < 1``.
        TypeError: ``n_tasks`` or ``batch_size`` is not an int.
    """
    cfg = run.config
    size = batch_size if batch_size is not None else (cfg.eval_batch if cfg is not None else DEFAULT_BATCH)
    check_int("evaluate_fixed", "n_tasks", n_tasks, 1)
    check_int("evaluate_fixed", "batch_size", size, 1)
    dev = run.device if device is None else device
    results = []
    for s in range(0, n_tasks, size):
        idx = range(s, min(n_tasks, s + size))
        results.append(evaluate_tasks(run, sampler.fixed_batch(idx, device=dev), batch_size=size))
        if progress is not None:
            progress(len(idx))
    return EvalResult.concat(results)


def evaluate(
    cfg: TrainConfig,
    model: ModelFn,
    loss: LossFn,
    classification: bool,
    theta: Params,
    sampler: Any,
    n_tasks: int,
    device: torch.device,
    lam: Any = None,
    batched: BatchedModel | None = None,
) -> dict[str, float]:
    """Adapt to ``n_tasks`` fixed tasks and score the query sets (`evaluate_fixed` from parts).

    Args:
        cfg: the run's configuration: its evaluation algorithm, ``eval_batch`` and ``vectorize``.
        model, loss, classification, theta, lam, batched: as the fields of `Run`.
        sampler: the test tasks (`TaskSampler` or `SinusoidTasks`).
        n_tasks: how many fixed tasks.
        device: where to draw the tasks.

    Returns:
        ``accuracy`` and ``ci95`` (percent; NaN for regression), ``loss`` and
        ``loss_ci95`` (the mean query loss and its 95% half-width), ``n_tasks``.
    """
    run = Run(
        model_fn=model,
        params=theta,
        algorithm=cfg.algorithm(evaluation=True),
        loss=loss,
        classification=classification,
        lam=cfg.evaluation_lam(lam),
        batched=batched,
        config=cfg,
    )
    return evaluate_fixed(run, sampler, n_tasks, device=device).summary()
