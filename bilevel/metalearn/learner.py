"""Meta-learning for any ``nn.Module`` with any ``torch.optim`` optimizer: IMAML, MAML, FOMAML, Reptile,
ANIL and Meta-SGD.

The ``nn.Module`` workflow of learn2learn and higher, on the engine of `meta_gradient`: a learner
holds the model and a `MetaAlgorithm`; `MetaLearner.step` computes the meta-gradient of a
meta-batch and adds it to the ``.grad`` of the model's parameters, so any optimizer can step::

    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1))
    learner = IMAML(model, lam=2.0, inner=GradientDescent(lr=0.05, max_iter=10, tol=0.0), cg_iters=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(1000):
        opt.zero_grad()
        loss = learner.step(tasks.meta_batch(step, 16))   # mean query loss after adaptation
        opt.step()
    adapted = learner.adapt(test_batch)                    # the B adapted models
    pred = adapted(test_batch.query_x)                     # (B, Nq, 1)
    res = learner.evaluate(test_batch)                     # an EvalResult: losses, accuracies

Classification or regression is read from the labels' dtype: integer ``support_y`` means
classification (cross-entropy on logits, accuracy reported), floating ``support_y`` regression
(mean squared error, `mse`; accuracy NaN).  ``task_type=`` fixes it, and a batch of the other kind
is then refused.  Regression targets of shape ``(K,)`` per task are compared with model outputs of
shape ``(K, 1)`` as ``(K, 1)`` (never broadcast to ``(K, K)``).

Nothing here re-implements an algorithm: `step` is `meta_gradient`, `MetaLearner.adapt` is
`bilevel.metalearn.adapt`, and the B task models run through `batched_model` (the `ConvNet` and
`MLP` of `bilevel.metalearn.models`) or ``torch.func.vmap`` of `make_functional` (any other module).
Parameters with ``requires_grad=False`` are neither adapted nor given a gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl
from bilevel.internal import check_flag, check_int, check_positive
from bilevel.solvers import GradientDescent

from .algorithms import (
    FirstOrder,
    HeadOnly,
    Implicit,
    LearnedSteps,
    MetaAlgorithm,
    MetaStats,
    ReptileStep,
    Unrolled,
    adapt,
    meta_gradient,
)
from .batched import BatchedModel, batched_model
from .evaluation import EvalResult, Run, evaluate_tasks
from .gradients import NO_STEP
from .metabatch import INNER_SOLVERS, STEP_PREFIX, InnerSolver
from .models import LossFn, Params, make_functional, mse
from .tasks import Task, check_finite, stack_tasks

__all__ = ["ANIL", "FOMAML", "IMAML", "MAML", "AdaptedModel", "MetaLearner", "MetaSGD", "Reptile", "TaskType"]

#: The default inner solver: 16 GD steps of 0.1, a fixed budget (the paper's Omniglot iMAML-GD).
_DEFAULT_INNER = GradientDescent(lr=0.1, max_iter=16, tol=0.0)
#: ANIL's default inner solver: 5 GD steps of 0.1 on the head (learn2learn's ANIL examples: 1-5 steps).
_ANIL_INNER = GradientDescent(lr=0.1, max_iter=5, tol=0.0)
#: ``"classification"`` (integer labels, cross-entropy) or ``"regression"`` (floating targets, MSE).
TaskType = Literal["classification", "regression"]
Tasks = Union[Task, Sequence[Task]]

_TASK_TYPES = ("classification", "regression")
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclasses.dataclass(frozen=True)
class _DefaultLoss:
    """The loss of a task type when none is given: cross-entropy on logits or `mse`, shapes checked.

    Attributes:
        kind: the task type.
        inferred: whether the kind was read from the labels' dtype (then a shape error says so,
            and how to fix the task type instead).
    """

    kind: TaskType
    inferred: bool

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one task's outputs ``out`` and labels or targets ``y``.

        Raises:
            ValueError: the outputs do not fit the labels (the message names the task type, the
                labels' dtype and, where the type was inferred, how to set it).
        """
        if self.kind == "classification":
            if out.ndim != y.ndim + 1 or out.shape[: y.ndim] != y.shape:
                raise ValueError(
                    f"classification: the model returned {tuple(out.shape)} for labels {tuple(y.shape)}; "
                    f"expected logits (N, classes) for labels (N,) per task{self._why(y)}"
                )
            return F.cross_entropy(out, y)
        if out.shape != y.shape:
            # (K, 1) outputs and (K,) targets meet as (K, 1), never broadcast to (K, K)
            if out.shape == (*y.shape, 1):
                y = y.unsqueeze(-1)
            elif y.shape == (*out.shape, 1):
                y = y.squeeze(-1)
            else:
                raise ValueError(
                    f"regression: the model returned {tuple(out.shape)} for targets {tuple(y.shape)} per "
                    f"task; shapes must be equal (a trailing 1 may be missing on either side){self._why(y)}"
                )
        return mse(out, y)

    def _why(self, y: torch.Tensor) -> str:
        return _inferred(self.kind, y.dtype) if self.inferred else ""


def _inferred(kind: TaskType, dtype: torch.dtype) -> str:
    """How a task type inferred from the labels' dtype came about, and how to set the other one."""
    other, fix = ("regression", "y.float()") if kind == "classification" else ("classification", "y.long()")
    return (
        f". The labels are {dtype}, so task_type was inferred as {kind!r}; for {other} "
        f"convert them ({fix}) or pass task_type={other!r} to the learner"
    )


#: The default losses by (task type, inferred), built once (`task_losses` caches by function).
_DEFAULT_LOSSES = {
    (k, i): _DefaultLoss(k, i) for k in ("classification", "regression") for i in (False, True)
}
#: Modules that draw random numbers in training mode, which ``torch.func.vmap`` cannot batch.
_RANDOM_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _number(who: str, name: str, value: Any, *, positive: bool) -> float:
    """``value`` as a finite float, > 0 (``positive``) or >= 0; TypeError / ValueError naming it."""
    check_positive(who, name, value, allow_zero=not positive)
    return float(value)


def _count(who: str, name: str, value: Any) -> int:
    """``value`` as an int >= 0; TypeError / ValueError naming it."""
    check_int(who, name, value, 0)
    return int(value)


def _inner_solver(who: str, inner: Any, kinds: tuple[type, ...] = INNER_SOLVERS) -> None:
    """Refuse an inner value that is not an instance of ``kinds`` (a class, a function, a name)."""
    names = ", ".join(t.__name__ for t in kinds)
    if isinstance(inner, type):
        raise TypeError(
            f"{who}(inner={inner.__name__}): a class, not a solver; pass an instance with its settings, "
            f"e.g. inner={inner.__name__}(...)"
        )
    if not isinstance(inner, kinds):
        raise TypeError(f"{who}(inner={inner!r}): expected an instance of {names}")


def _label_kind(y: torch.Tensor, who: str, field: str) -> TaskType:
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(
            f"{who}: {field} is {y.dtype}; use integer class labels (int64) or floating regression targets"
        )
    return "regression" if y.is_floating_point() else "classification"


def _randomness_message(who: str, cls: str, source: str) -> str:
    return (
        f"{who}: {source} draws random numbers, which torch.func.vmap (vectorize=True, the default "
        "engine for this model) cannot batch. Either put the model in eval mode (model.eval()) or "
        f"remove the dropout, or choose the loop engine: {cls}(..., vectorize=False)"
    )


@contextlib.contextmanager
def _engine_errors(who: str, cls: str) -> Iterator[None]:
    """Turn torch.func's randomness error (a random op the checks at the door did not see) into
    a message with the ways out."""
    try:
        yield
    except RuntimeError as err:
        if "vmap" in str(err) and "random" in str(err):
            raise ValueError(_randomness_message(who, cls, "an operation of the model")) from err
        raise


@dataclasses.dataclass(frozen=True, eq=False)
class AdaptedModel:
    """The B models of a meta-batch after adaptation: ``adapted(x)`` runs task b's model on ``x[b]``.

    Attributes:
        params: the adapted parameters phi by name, each with a leading task dimension B (the
            trainable parameters only; frozen ones are read from the module).
        batched: the `BatchedModel` that evaluates them.
    """

    params: Params
    batched: BatchedModel

    def __len__(self) -> int:
        """B, the number of adapted tasks."""
        return int(next(iter(self.params.values())).shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(B, N, ...)`` of the B adapted models on inputs ``x`` of shape ``(B, N, ...)``.

        Raises:
            ValueError: ``x`` does not have B as its leading dimension.
        """
        if x.ndim < 2 or x.shape[0] != len(self):
            raise ValueError(
                f"AdaptedModel: inputs have shape {tuple(x.shape)}; expected (B, N, ...) with "
                f"B = {len(self)} (one set of inputs per adapted task; use .task(i)(x) for one task)"
            )
        return self.batched.outputs(self.params, x)

    def task(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Task ``i``'s adapted model alone: ``f(x)`` with ``x`` ``(N, ...)`` returns ``(N, ...)``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"AdaptedModel.task({i}): {len(self)} tasks")
        phi = {k: v[i] for k, v in self.params.items()}
        single = self.batched.single
        return lambda x: single(phi, x)

    def __repr__(self) -> str:
        n = sum(v[0].numel() for v in self.params.values())
        return f"AdaptedModel({len(self)} tasks, {n:,} adapted parameters each)"


class MetaLearner:
    """A model and a `MetaAlgorithm`: meta-gradients into ``.grad``, adaptation, evaluation.

    `IMAML`, `MAML`, `FOMAML` and `Reptile` build the algorithm from keyword arguments; this class
    takes any `MetaAlgorithm` (e.g. ``make_algorithm("imaml-hf")``).

    Args:
        model: any module mapping one task's inputs ``(N, ...)`` to outputs ``(N, classes)`` (logits)
            or ``(N, ...)`` (regression).  Batch-norm layers must not track running statistics
            (``track_running_stats=False``): the B task models run as one function of the parameters.
        algorithm: how to adapt and how to form the meta-gradient.
        task_type: ``"classification"`` or ``"regression"``; ``None`` reads it from each batch's
            ``support_y`` dtype (integer: classification, floating: regression).
        loss: ``loss(outputs, y) -> scalar`` for one task, replacing cross-entropy / `mse`.
        vectorize: the engine of models other than the package's `ConvNet` / `MLP`:
            ``torch.func.vmap`` over the tasks (``True``) or a loop over them (``False``: for ops
            without batching rules, and models that draw random numbers, such as dropout in
            training mode).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``algorithm`` not a `MetaAlgorithm`, ``loss``
            not callable, ``vectorize`` not a bool.
        ValueError: an unknown ``task_type``; a model without parameters; a batch norm that
            tracks running statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        algorithm: MetaAlgorithm,
        *,
        task_type: TaskType | None = None,
        loss: LossFn | None = None,
        vectorize: bool = True,
    ) -> None:
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}(model={type(model).__name__}): expected a torch.nn.Module")
        if not isinstance(algorithm, MetaAlgorithm):
            raise TypeError(f"{who}(algorithm={algorithm!r}): expected a MetaAlgorithm (make_algorithm)")
        if task_type is not None and task_type not in _TASK_TYPES:
            raise ValueError(f"{who}(task_type={task_type!r}): use 'classification', 'regression' or None")
        if loss is not None and not callable(loss):
            raise TypeError(f"{who}(loss={loss!r}): expected a callable loss(outputs, y) -> scalar")
        if not isinstance(vectorize, bool):
            # a truthy string ("loop") would otherwise choose vmap
            raise TypeError(
                f"{who}(vectorize={vectorize!r}): choose the engine with a bool: True (torch.func.vmap "
                "over the tasks) or False (a loop over the tasks)"
            )
        if not any(True for _ in model.parameters()):
            raise ValueError(f"{who}: the model has no parameters")
        for name, m in model.named_modules():
            if isinstance(m, _BATCH_NORMS) and m.track_running_stats:
                raise ValueError(
                    f"{who}: {type(m).__name__} {name!r} tracks running statistics, which the B task "
                    "models cannot share; build it with track_running_stats=False (batch statistics, "
                    "as in MAML and iMAML)"
                )
        self._model = model
        self._algorithm = algorithm
        self._task_type: TaskType | None = task_type
        self._loss = loss
        self._vectorize = vectorize
        self._fn = make_functional(model)[0]
        self._structured = batched_model(model)
        self._fits: set[tuple[int, ...]] = set()  # per-example input shapes the model was seen to run on
        #: the number of model outputs per input shape (for the label range check)
        self._outputs: dict[tuple[Any, ...], int | None] = {}

    # -- configuration, read-only
    @property
    def model(self) -> nn.Module:
        """The module whose parameters are meta-learned (theta)."""
        return self._model

    @property
    def algorithm(self) -> MetaAlgorithm:
        """The `MetaAlgorithm` of `step` and `adapt`."""
        return self._algorithm

    @property
    def task_type(self) -> TaskType | None:
        """The fixed task type, or ``None`` (read from each batch's labels)."""
        return self._task_type

    # -- the engine's inputs
    def _theta(self) -> dict[str, nn.Parameter]:
        theta = {n: p for n, p in self._model.named_parameters() if p.requires_grad}
        if not theta:
            raise ValueError(
                f"{type(self).__name__}: every parameter has requires_grad=False; nothing to learn"
            )
        return theta

    def _meta_extra(self) -> dict[str, nn.Parameter]:
        """Meta-parameters beyond the model's, by theta-tree key (Meta-SGD's step sizes); ``{}``."""
        return {}

    def _engine_theta(self, theta: dict[str, nn.Parameter]) -> Params:
        """What the engine reads as theta: the model's parameters and `_meta_extra`, detached."""
        return {n: p.detach() for n, p in {**theta, **self._meta_extra()}.items()}

    def _batched(self, theta: dict[str, nn.Parameter]) -> BatchedModel:
        """The model's structure where every parameter is learned, else vmap (or a loop) of ``fn``."""
        if self._structured is not None and len(theta) == sum(1 for _ in self._model.parameters()):
            return self._structured
        return BatchedModel.from_function(self._fn, vectorize=self._vectorize)

    def _batch(self, tasks: Tasks, who: str, like: torch.Tensor, *, query: bool = True) -> Task:
        """``tasks`` as one meta-batch on ``like``'s device, checked at the door.

        Checked here, before any work: the format (a leading task dimension, agreeing shapes, the
        parameters' dtype), non-empty support sets (and query sets where ``query``), finite inputs
        and targets, inputs the model takes (`_check_fit`), and a model the engine can run (see
        `_engine_check`).
        """
        if isinstance(tasks, Task):
            batch = tasks
        elif isinstance(tasks, Sequence) and not isinstance(tasks, (str, bytes)):
            if not tasks or not all(isinstance(t, Task) for t in tasks):
                raise TypeError(f"{who}: expected a Task with a leading task dimension, or a list of Tasks")
            shapes = {tuple(tuple(x.shape) for x in t) for t in tasks}
            if len(shapes) > 1:
                raise ValueError(
                    f"{who}: the tasks have different shapes {sorted(shapes)[:2]}; a meta-batch holds tasks "
                    "of one format"
                )
            batch = stack_tasks(list(cast(Sequence[Task], tasks)))
        else:
            raise TypeError(f"{who}: expected a Task or a list of Tasks, got {type(tasks).__name__}")
        for name, t in zip(Task._fields, batch):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{who}: {name} is a {type(t).__name__}, not a tensor")
        sx, sy, qx, qy = batch
        if sx.ndim < 3 or sy.ndim < 2:
            raise ValueError(
                f"{who}: support_x has shape {tuple(sx.shape)} and support_y {tuple(sy.shape)}; expected "
                "(B, N, ...) and (B, N, ...) with a leading task dimension B: pass a list of single tasks, "
                "or stack_tasks([...])"
            )
        if not (sy.shape[:2] == sx.shape[:2] and qy.shape[:2] == qx.shape[:2] and qx.shape[0] == sx.shape[0]):
            raise ValueError(
                f"{who}: shapes support_x {tuple(sx.shape)}, support_y {tuple(sy.shape)}, query_x "
                f"{tuple(qx.shape)}, query_y {tuple(qy.shape)} disagree; expected (B, N, ...) inputs and "
                "(B, N, ...) labels or targets"
            )
        if sx.shape[0] == 0:
            raise ValueError(f"{who}: the meta-batch holds no tasks (B = 0)")
        if sx.shape[1] == 0:
            raise ValueError(
                f"{who}: the support sets are empty (support_x {tuple(sx.shape)}): adaptation needs at "
                "least one support example per task"
            )
        if query and qx.shape[1] == 0:
            raise ValueError(
                f"{who}: the query sets are empty (query_x {tuple(qx.shape)}): the query loss needs at "
                "least one query example per task (adapt() takes tasks without queries)"
            )
        for name, x in (("support_x", sx), ("query_x", qx)):
            if x.dtype != like.dtype:
                raise ValueError(
                    f"{who}: {name} is {x.dtype} but the model's parameters are {like.dtype}: convert the "
                    f"tasks (Task(*(t.to({like.dtype}) if t.is_floating_point() else t for t in task))) "
                    "or the model"
                )
        batch = batch.to(like.device)
        # what the call reads: adaptation reads no query set
        check_finite(batch if query else batch._replace(query_x=qx[:, :0], query_y=qy[:, :0]), who)
        self._check_fit(batch.support_x, who)
        return batch

    def _check_fit(self, x: torch.Tensor, who: str) -> None:
        """Refuse inputs the model cannot take, before the engine blames something else for it.

        The first time an input shape is seen, the module runs on task 0's support inputs (no
        gradient, in eval mode so that no dropout draws random numbers; every module's train/eval
        state restored after).
        """
        shape = tuple(x.shape[2:])
        if shape in self._fits:
            return
        modes = {m: m.training for m in self._model.modules()}
        try:
            with torch.no_grad():
                self._model.eval()(x[0])
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise bl.StructureError(
                f"{who}: the model cannot take these tasks' inputs: on task 0's support_x, of shape "
                f"{tuple(x[0].shape)} (N = {x.shape[1]} examples of shape {shape}), it raised "
                f"{type(err).__name__}: {str(err).splitlines()[0][:200]}.  The tasks' inputs must be "
                "what the model takes (e.g. images (N, C, H, W) for a ConvNet, (N, features) for an MLP)"
            ) from err
        finally:
            for m, mode in modes.items():
                m.training = mode
        self._fits.add(shape)

    def _kind(self, batch: Task, who: str) -> TaskType:
        kind = _label_kind(batch.support_y, who, "support_y")
        if batch.query_y.numel() and _label_kind(batch.query_y, who, "query_y") != kind:
            raise ValueError(
                f"{who}: support_y is {batch.support_y.dtype} but query_y is {batch.query_y.dtype}: "
                "labels must be integers in both, or targets floating in both"
            )
        if self._task_type is not None and kind != self._task_type:
            have = "integer labels" if kind == "classification" else "floating targets"
            fix = "y.float()" if self._task_type == "regression" else "y.long()"
            raise ValueError(
                f"{who}: task_type={self._task_type!r} but support_y is {batch.support_y.dtype} ({have}); "
                f"convert the labels ({fix}) or use task_type={kind!r} (or None to infer it)"
            )
        if kind == "classification" and self._loss is None:
            self._check_labels(batch, who)
        return kind

    def _check_labels(self, batch: Task, who: str) -> None:
        """Class labels in ``0 .. outputs - 1`` (cross-entropy would fail with an index error, or a
        device-side assertion on an accelerator), read in one transfer."""
        key = (tuple(batch.support_x.shape[2:]), batch.support_x.dtype, batch.support_x.device)
        if key not in self._outputs:
            with torch.no_grad():
                theta = {n: p.detach() for n, p in self._model.named_parameters()}
                out = self._fn(theta, batch.support_x[0])
            # only logits (N, classes) bound the labels; another shape fails in the loss, named there
            self._outputs[key] = int(out.shape[-1]) if out.ndim == 2 else None
        classes = self._outputs[key]
        ys = [
            (name, y) for name, y in (("support_y", batch.support_y), ("query_y", batch.query_y)) if y.numel()
        ]
        bounds = torch.stack([torch.stack([y.min(), y.max()]) for _, y in ys]).tolist()
        for (name, y), (low, high) in zip(ys, bounds):
            if low < 0 or (classes is not None and high >= classes):
                bad = low if low < 0 else high
                task = int((y == bad).flatten(1).any(1).nonzero()[0, 0])
                within = f"0 .. {classes - 1} (the model returns {classes} logits)" if classes else ">= 0"
                hint = _inferred("classification", y.dtype) if self._task_type is None else ""
                raise ValueError(
                    f"{who}: {name} of task {task} holds the label {int(bad)}, outside {within}: relabel "
                    f"each task's classes 0 .. ways - 1, or give the model as many outputs as classes{hint}"
                )

    def _loss_of(self, kind: TaskType) -> LossFn:
        if self._loss is not None:
            return self._loss
        return _DEFAULT_LOSSES[kind, self._task_type is None]

    def _engine_check(self, theta: dict[str, nn.Parameter], who: str) -> BatchedModel:
        """The `BatchedModel` of this call, refusing a model that draws random numbers under vmap.

        ``torch.func.vmap`` cannot batch random operations (dropout in training mode): say so and
        how to get out, instead of torch.func's randomness error from deep in the inner loop.
        """
        bm = self._batched(theta)
        if self._vectorize and bm is not self._structured:
            for name, m in self._model.named_modules():
                if isinstance(m, _RANDOM_MODULES) and m.training and m.p > 0:
                    raise ValueError(
                        _randomness_message(who, type(self).__name__, f"{type(m).__name__} {name!r}")
                    )
        return bm

    # -- the API
    def step(
        self, tasks: Tasks, *, return_stats: bool = False, task_chunk: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, MetaStats]:
        """Meta-gradient of a meta-batch, added to ``p.grad`` of every trainable ``p`` of the model.

        ``.grad`` accumulates like ``loss.backward()``: call ``optimizer.zero_grad()`` before each
        step (or not, to accumulate several meta-batches).  The value added is the mean over the B
        tasks of the algorithm's task meta-gradient, exactly ``meta_gradient(...)[0]``; for `Reptile`
        it is the mean of ``theta - phi_i`` (an SGD step of size 1 moves theta to the mean phi).

        Args:
            tasks: a `Task` whose tensors have a leading task dimension B, or a list of single
                tasks of one format (stacked with `stack_tasks`).  Moved to the model's device;
                inputs must have the parameters' dtype.
            return_stats: also return the per-task `MetaStats` (losses, inner-solver and CG
                diagnostics).
            task_chunk: compute the meta-batch this many tasks at a time (`meta_gradient`'s
                ``task_chunk``): the same gradient to rounding, with one chunk's graphs in
                memory at a time; ``None``: all B tasks at once.

        Returns:
            The mean query loss after adaptation (a detached 0-d tensor), and the `MetaStats` if
            ``return_stats``.

        Raises:
            TypeError: ``tasks`` is not a Task or a list of Tasks; boolean or complex labels.
            ValueError: no leading task dimension, no tasks, empty support or query sets,
                disagreeing shapes, inputs of another dtype than the parameters, labels of the other
                kind than ``task_type``, class labels outside ``0 .. outputs - 1`` (with the default
                loss), model outputs that do not fit the labels (the message names the labels'
                dtype and the task type inferred from it), a model that draws random numbers
                (dropout in training mode) under ``vectorize=True``.
            NonFiniteError: NaN or infinity in a task's inputs or targets (the message names the
                task and the tensor), or the inner solve diverged (lower the inner step size or
                raise lam).
            bilevel.StructureError: inputs the model cannot take (the model's own error is quoted
                with the inputs' shapes).
        """
        who = f"{type(self).__name__}.step"
        check_flag(who, "return_stats", return_stats)
        theta = self._theta()
        first = next(iter(theta.values()))
        bm = self._engine_check(theta, who)
        batch = self._batch(tasks, who, first)
        kind = self._kind(batch, who)
        with _engine_errors(who, type(self).__name__):
            g, _, stats = meta_gradient(
                self._algorithm,
                self._fn,
                self._loss_of(kind),
                self._engine_theta(theta),
                batch,
                classification=kind == "classification",
                vectorize=self._vectorize,
                batched=bm,
                task_chunk=task_chunk,
            )
        with torch.no_grad():
            for n, p in {**theta, **self._meta_extra()}.items():
                if p.grad is None:
                    p.grad = g[n].detach().clone()
                else:
                    p.grad.add_(g[n])
        loss = stats.query_loss.mean().detach()
        return (loss, stats) if return_stats else loss

    def adapt(self, tasks: Tasks, *, inner: InnerSolver | None = None) -> AdaptedModel:
        """Adapt theta to each task's support set with the algorithm's inner solver (no gradient kept).

        Args:
            tasks: as in `step` (the query sets are not used and may be empty).
            inner: adapt with this inner solver instead of the algorithm's (e.g. more steps at test
                time, as MAML does).

        Returns:
            The `AdaptedModel` of the B tasks.

        Raises:
            TypeError, ValueError, NonFiniteError: as in `step` (empty query sets are allowed);
                ``inner`` not a solver instance.
        """
        who = f"{type(self).__name__}.adapt"
        theta = self._theta()
        bm = self._engine_check(theta, who)
        batch = self._batch(tasks, who, next(iter(theta.values())), query=False)
        kind = self._kind(batch, who)
        algorithm = self._algorithm_for(inner, who)
        with _engine_errors(who, type(self).__name__):
            phi = adapt(
                algorithm,
                self._fn,
                self._loss_of(kind),
                self._engine_theta(theta),
                batch.support_x,
                batch.support_y,
                vectorize=self._vectorize,
                batched=bm,
            )
        return AdaptedModel(phi, bm)

    def evaluate(
        self,
        tasks: Tasks,
        *,
        inner: InnerSolver | None = None,
        batch_size: int | None = None,
    ) -> EvalResult:
        """Adapt to each task and score its query set (`evaluate_tasks` of `as_run`).

        Returns:
            `EvalResult`: per-task ``query_loss`` and ``query_acc`` (NaN for regression),
            ``predictions``, and ``mean_accuracy`` / ``ci95`` in percent.

        Raises:
            TypeError, ValueError, NonFiniteError: as in `step`; ``inner`` not a solver instance.
        """
        who = f"{type(self).__name__}.evaluate"
        theta = self._theta()
        self._engine_check(theta, who)
        batch = self._batch(tasks, who, next(iter(theta.values())))
        run = self.as_run(self._kind(batch, who), inner=inner)
        with _engine_errors(who, type(self).__name__):
            return evaluate_tasks(run, batch, batch_size=batch_size)

    def as_run(self, task_type: TaskType | None = None, *, inner: InnerSolver | None = None) -> Run:
        """The current theta as a `Run` (for `evaluate_tasks`, `evaluate_fixed`).

        Args:
            task_type: the run's task type (default: the learner's; required when it infers).

        Raises:
            ValueError: no task type given or fixed.
        """
        kind = task_type or self._task_type
        if kind not in _TASK_TYPES:
            raise ValueError(
                f"{type(self).__name__}.as_run: give task_type='classification' or 'regression' "
                "(the learner infers it from each batch)"
            )
        theta = self._theta()
        return Run(
            model_fn=self._fn,
            params=self._engine_theta(theta),
            algorithm=self._algorithm_for(inner, f"{type(self).__name__}.as_run"),
            loss=self._loss_of(kind),
            classification=kind == "classification",
            batched=self._batched(theta),
        )

    def _algorithm_for(self, inner: InnerSolver | None, who: str) -> MetaAlgorithm:
        if inner is None:
            return self._algorithm
        _inner_solver(who, inner)
        return dataclasses.replace(self._algorithm, inner=inner)

    def _config(self) -> str:
        return f"algorithm={self._algorithm!r}"

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self._model.parameters())
        model = f"{type(self._model).__name__} ({n:,} parameters)"
        return f"{type(self).__name__}(model={model}, {self._config()}, task_type={self._task_type!r})"


class IMAML(MetaLearner):
    """iMAML (Rajeswaran et al. 2019): the implicit meta-gradient of G = Lhat + lam/2 ||phi - theta||^2.

    The task meta-gradient solves ``(I + Lhat''(phi)/lam) g = grad L(phi)`` with ``cg_iters`` CG steps
    at the inner answer phi (`Implicit`); the inner solver's path is not stored.

    Args:
        model: as in `MetaLearner`.
        lam: proximal weight (> 0; 2 in the paper's Omniglot settings).
        inner: the inner solver, a `bilevel.solvers` instance: `GradientDescent` (iMAML-GD;
            ``line_search=StepHalving()`` recommended), `Nesterov`, `NewtonCG` (iMAML-HF) or
            `TrustRegionNewtonCG`; default 16 steps of 0.1 (``tol=0``: a fixed budget).
        cg_iters: CG steps of the backward solve.
        damping: solve ``((1 + damping) I + Lhat''/lam) g = v`` (the authors' code); 0 is the paper's.
        task_type, loss, vectorize: as in `MetaLearner`.

    Raises:
        TypeError: ``lam`` or ``damping`` not a number, ``cg_iters`` not an int, ``inner`` not a
            solver instance (e.g. the class ``GradientDescent`` itself), or as in `MetaLearner`.
        ValueError: ``lam`` not finite and > 0, ``cg_iters`` or ``damping`` negative (or
            ``damping`` infinite), or as in `MetaLearner`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lam: float = 2.0,
        inner: InnerSolver = _DEFAULT_INNER,
        cg_iters: int = 5,
        damping: float = 0.0,
        task_type: TaskType | None = None,
        loss: LossFn | None = None,
        vectorize: bool = True,
    ) -> None:
        who = type(self).__name__
        lam = _number(who, "lam", lam, positive=True)
        cg_iters = _count(who, "cg_iters", cg_iters)
        damping = _number(who, "damping", damping, positive=False)
        _inner_solver(who, inner)
        algo = MetaAlgorithm(inner, Implicit(cg_iters=cg_iters, damping=damping), lam)
        super().__init__(model, algo, task_type=task_type, loss=loss, vectorize=vectorize)

    def _config(self) -> str:
        mg = self.algorithm.meta_gradient
        assert isinstance(mg, Implicit)
        a = self.algorithm
        return f"lam={a.lam}, inner={a.inner!r}, cg_iters={mg.cg_iters}, damping={mg.damping}"


class MAML(MetaLearner):
    """MAML (Finn et al. 2017): backpropagation through ``inner.max_iter`` steps of GD on the support loss.

    Memory grows with the inner steps (`Unrolled`).

    Args:
        model: as in `MetaLearner`.
        inner: fixed-step `GradientDescent` (``tol=0``, no line search: a fixed path).
        task_type, loss, vectorize: as in `MetaLearner`.

    Raises:
        TypeError: ``inner`` not a `GradientDescent` instance, or as in `MetaLearner`.
        ValueError: ``inner`` with a tolerance or a line search, or as in `MetaLearner`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner: GradientDescent = _DEFAULT_INNER,
        task_type: TaskType | None = None,
        loss: LossFn | None = None,
        vectorize: bool = True,
    ) -> None:
        who = type(self).__name__
        _inner_solver(who, inner, (GradientDescent,))
        if inner.tol or inner.line_search is not None:
            raise ValueError(
                f"{who}(inner={inner!r}): MAML differentiates through a fixed inner path; give "
                "GradientDescent(lr=..., max_iter=..., tol=0.0, line_search=None)"
            )
        super().__init__(
            model, MetaAlgorithm(inner, Unrolled(), 0.0), task_type=task_type, loss=loss, vectorize=vectorize
        )

    def _config(self) -> str:
        return f"inner={self.algorithm.inner!r}"


class _SolveOnly(MetaLearner):
    """A meta-gradient formed from the inner solve alone (no second derivatives, lam = 0)."""

    kind: ClassVar[FirstOrder | ReptileStep]

    def __init__(
        self,
        model: nn.Module,
        *,
        inner: InnerSolver = _DEFAULT_INNER,
        task_type: TaskType | None = None,
        loss: LossFn | None = None,
        vectorize: bool = True,
    ) -> None:
        _inner_solver(type(self).__name__, inner)
        super().__init__(
            model,
            MetaAlgorithm(inner, self.kind, 0.0),
            task_type=task_type,
            loss=loss,
            vectorize=vectorize,
        )

    def _config(self) -> str:
        return f"inner={self.algorithm.inner!r}"


class FOMAML(_SolveOnly):
    """First-order MAML: the query gradient at the adapted parameters, taken as the meta-gradient.

    Args:
        model: as in `MetaLearner`.
        inner: the inner solver on the support loss.
        task_type, loss, vectorize: as in `MetaLearner`.
    """

    kind = FirstOrder()


class Reptile(_SolveOnly):
    """Reptile (Nichol et al. 2018): ``theta - phi_i`` taken as the meta-gradient.

    Args:
        model: as in `MetaLearner`.
        inner: the inner solver on the support loss (whose answer is phi_i).
        task_type, loss, vectorize: as in `MetaLearner`.
    """

    kind = ReptileStep()


def _linear_head(who: str, model: nn.Module, head: Any) -> str:
    """The name of ANIL's head: ``head`` if it names an ``nn.Linear`` of ``model``, else (``None``)
    the module owning the model's last parameter, which must be an ``nn.Linear``.

    Raises:
        TypeError: ``head`` is not a string or ``None``.
        ValueError: no such ``nn.Linear`` (the message lists the model's Linear layers).
    """
    if head is not None and not isinstance(head, str):
        raise TypeError(f"{who}(head={head!r}): name the head module (a string), or None for the last layer")
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if head is None:
        names = [n for n, _ in model.named_parameters()]
        head = names[-1].rpartition(".")[0] if names else ""
        if not isinstance(modules.get(head), nn.Linear):
            raise ValueError(
                f"{who}: the model's last parameter belongs to {head!r}, not an nn.Linear; name the head "
                f"layer, one of {linear}, as head=..."
            )
        return head
    if not isinstance(modules.get(head), nn.Linear):
        what = (
            "is not a module of the model" if head not in modules else f"is a {type(modules[head]).__name__}"
        )
        raise ValueError(f"{who}(head={head!r}): {what}; the head must be an nn.Linear, one of {linear}")
    return head


class ANIL(MetaLearner):
    """ANIL (Raghu et al. 2020): MAML with the inner loop on the head alone, the body frozen.

    ``inner.max_iter`` GD steps of ``inner.lr`` adapt only the head (a ``Linear`` layer that must be
    the model's last operation); the body's features of each task's support and query sets are
    computed once.  The meta-gradient is autograd through that path, in every trainable parameter
    (`HeadOnly`).

    Args:
        model: as in `MetaLearner`.
        head: the head's module name (``"head"`` of a `ConvNet`, ``"net.fc2"`` of the sinusoid
            `MLP`); ``None``: the module owning the model's last parameter, which must be an
            ``nn.Linear``.
        inner: fixed-step `GradientDescent` (``tol=0``, no line search); default 5 steps of 0.1.
        task_type, loss, vectorize: as in `MetaLearner`.

    Raises:
        TypeError: ``head`` not a string, ``inner`` not a `GradientDescent`, or as in `MetaLearner`.
        ValueError: ``head`` not an ``nn.Linear`` of the model, ``inner`` with a tolerance or a
            line search, or as in `MetaLearner`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        head: str | None = None,
        inner: GradientDescent = _ANIL_INNER,
        task_type: TaskType | None = None,
        loss: LossFn | None = None,
        vectorize: bool = True,
    ) -> None:
        who = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{who}(model={type(model).__name__}): expected a torch.nn.Module")
        name = _linear_head(who, model, head)
        _inner_solver(who, inner, (GradientDescent,))
        if inner.tol or inner.line_search is not None:
            raise ValueError(
                f"{who}(inner={inner!r}): ANIL differentiates through a fixed inner path; give "
                "GradientDescent(lr=..., max_iter=..., tol=0.0, line_search=None)"
            )
        algo = MetaAlgorithm(inner, HeadOnly(name), 0.0)
        super().__init__(model, algo, task_type=task_type, loss=loss, vectorize=vectorize)

    @property
    def head(self) -> str:
        """The head module's name."""
        mg = self.algorithm.meta_gradient
        assert isinstance(mg, HeadOnly) and mg.head is not None
        return mg.head

    def _config(self) -> str:
        return f"head={self.head!r}, inner={self.algorithm.inner!r}"


class MetaSGD(MetaLearner):
    """Meta-SGD (Li et al. 2017): GD with a learned step size per parameter entry, meta-learned with theta.

    ``steps`` inner steps phi <- phi - alpha * grad Lhat(phi) (elementwise; one step in the paper),
    alpha shaped like each trainable parameter and starting at ``lr`` (`LearnedSteps`).  The step
    sizes are meta-parameters: `step_sizes` holds them as ``nn.Parameter``, `step` fills their
    ``.grad`` with the model's, and `parameters` yields both, for the optimizer::

        learner = MetaSGD(model, lr=0.4, steps=1)
        opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    Args:
        model: as in `MetaLearner`.
        lr: every step size's initial value (finite, > 0).
        steps: inner steps (>= 1: with none the step sizes would never be used).
        task_type, loss, vectorize: as in `MetaLearner`.

    Raises:
        TypeError: ``lr`` not a number, ``steps`` not an int, or as in `MetaLearner`.
        ValueError: ``lr`` not finite and > 0, ``steps`` < 1, or as in `MetaLearner`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.1,
        steps: int = 1,
        task_type: TaskType | None = None,
        loss: LossFn | None = None,
        vectorize: bool = True,
    ) -> None:
        who = type(self).__name__
        lr = _number(who, "lr", lr, positive=True)
        steps = _count(who, "steps", steps)
        if steps < 1:
            raise ValueError(f"{who}(steps={steps}): {NO_STEP}")
        algo = MetaAlgorithm(GradientDescent(lr=lr, max_iter=steps, tol=0.0), LearnedSteps(lr), 0.0)
        super().__init__(model, algo, task_type=task_type, loss=loss, vectorize=vectorize)
        theta = {n: p.detach() for n, p in self._theta().items()}
        self._steps = {k[len(STEP_PREFIX) :]: nn.Parameter(v) for k, v in algo.meta_parameters(theta).items()}

    @property
    def step_sizes(self) -> dict[str, nn.Parameter]:
        """The learned step sizes by parameter name, each shaped like its parameter."""
        return dict(self._steps)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The model's trainable parameters, then the step sizes: what the optimizer steps."""
        yield from self._theta().values()
        yield from self._steps.values()

    def _meta_extra(self) -> dict[str, nn.Parameter]:
        """The step sizes under their theta-tree keys, refused where they no longer fit the model.

        Raises:
            ValueError: a parameter moved to another device or dtype (or was resized) after the
                learner was built: the step sizes, built with the learner, did not follow.
        """
        for n, p in self._theta().items():
            a = self._steps.get(n)
            if a is None or a.shape != p.shape or a.device != p.device or a.dtype != p.dtype:
                have = "none" if a is None else f"{tuple(a.shape)} {a.dtype} on {a.device}"
                raise ValueError(
                    f"MetaSGD: parameter {n!r} is {tuple(p.shape)} {p.dtype} on {p.device} but its step "
                    f"sizes are {have}: build the learner after moving or changing the model (model.to(...))"
                )
        return {STEP_PREFIX + k: v for k, v in self._steps.items()}

    def _config(self) -> str:
        mg = self.algorithm.meta_gradient
        assert isinstance(mg, LearnedSteps)
        inner = self.algorithm.inner
        assert isinstance(inner, GradientDescent)
        return f"lr={mg.init_lr}, steps={inner.max_iter}"
