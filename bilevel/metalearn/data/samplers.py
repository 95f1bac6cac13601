"""Few-shot tasks: N-way K-shot image classification and sinusoid regression, sampled reproducibly.

Every sampler has one configuration (ways, shots, queries, seed) and three ways to draw tasks:

* ``sample_task(rng)``: one task from a ``numpy.random.Generator``;
* ``task(step, index)`` / ``meta_batch(step, indices, device=...)``: task ``index`` of meta-step
  ``step`` is drawn from ``numpy.random.SeedSequence([seed, 0, step, index])``, so it does not depend
  on which process draws it or on what was drawn before.  ``R`` distributed ranks taking the disjoint
  indices ``range(rank, B, R)`` of a meta-batch of ``B`` together see exactly the tasks of one process;
* ``fixed_task(index)`` / ``fixed_batch(indices)`` / ``fixed_batches(n, batch_size)``: a fixed list of
  evaluation tasks, task ``i`` drawn from ``SeedSequence([eval_seed, 1, i])`` (stream 1 never meets
  the training stream 0), e.g. the 600 test tasks of the Omniglot protocol.

A task is a `Task` (a named tuple of tensors); a meta-batch is a `Task` whose tensors have a leading
task dimension ``B``, ready for ``torch.func.vmap``::

    sampler = TaskSampler(data.train, ways=5, shots=1, queries=15, seed=0)
    batch = sampler.meta_batch(step, range(16), device="cuda")
    batch.support_x.shape  # (16, 5, 1, 28, 28); support_y (16, 5) int64; query_x (16, 75, 1, 28, 28)
    for chunk in TaskSampler(data.test, 5, 1, 15).fixed_batches(600, batch_size=50): ...

Images come out as ``float32`` in [0, 1] (the cached ``uint8`` divided by 255), class-major: the
support set is ``shots`` images of label 0, then of label 1, ...; the query set likewise with
``queries`` images per label.  Labels are assigned to the drawn classes in random order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from ..tasks import Task, stack_tasks
from .datasets import DatasetFormatError
from .images import ClassPool

__all__ = [
    "EVAL_STREAM",
    "POOL_STREAM",
    "TRAIN_STREAM",
    "SinusoidTasks",
    "TaskPool",
    "TaskSampler",
    "TaskSource",
    "sample_task",
    "task_rng",
]

#: First word after the seed in the ``SeedSequence`` of meta-training tasks.
TRAIN_STREAM = 0
#: First word after the seed in the ``SeedSequence`` of fixed evaluation tasks.
EVAL_STREAM = 1
#: Stream of the tasks of a finite training pool (`TaskPool`).
POOL_STREAM = 2


def task_rng(seed: int, step: int, index: int, stream: int = TRAIN_STREAM) -> np.random.Generator:
    """Generator of task ``index`` of meta-step ``step``: ``SeedSequence([seed, stream, step, index])``."""
    for name, v in (("seed", seed), ("step", step), ("index", index), ("stream", stream)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"task_rng({name}={v!r}): must be an int >= 0")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(step), int(index)]))


class TaskSource(Protocol):
    """Anything that draws one task from a generator (`TaskSampler`, `SinusoidTasks`)."""

    seed: int
    eval_seed: int

    def sample_task(self, rng: np.random.Generator) -> Task: ...


def _indices(indices: int | Sequence[int] | range, who: str) -> list[int]:
    if isinstance(indices, (int, np.integer)) and not isinstance(indices, bool):
        if indices < 1:
            raise ValueError(f"{who}(indices={indices}): a count must be >= 1")
        return list(range(int(indices)))
    if isinstance(indices, bool):
        raise TypeError(f"{who}(indices={indices!r}): expected a count or a sequence of ints")
    out = [int(i) for i in indices]
    if not out:
        raise ValueError(f"{who}: no task indices")
    return out


class _Streams:
    """The step/index and fixed-evaluation streams, shared by both samplers (needs ``sample_task``)."""

    seed: int
    eval_seed: int

    def sample_task(self, rng: np.random.Generator) -> Task:  # pragma: no cover - overridden
        raise NotImplementedError

    def task(self, step: int, index: int) -> Task:
        """Task ``index`` of meta-step ``step`` (depends only on ``(seed, step, index)``)."""
        return self.sample_task(task_rng(self.seed, step, index, TRAIN_STREAM))

    def meta_batch(
        self, step: int, indices: int | Sequence[int] | range, *, device: torch.device | str | None = None
    ) -> Task:
        """Tasks ``indices`` of meta-step ``step``, stacked along a new leading dimension ``len(indices)``.

        Args:
            step: meta-step (>= 0).
            indices: task indices (>= 0), or a count ``B`` meaning ``range(B)``.
            device: where to put the tensors.
        """
        idx = _indices(indices, "meta_batch")
        return stack_tasks([self.task(step, i) for i in idx]).to(device)

    def fixed_task(self, index: int) -> Task:
        """Fixed evaluation task ``index`` (depends only on ``(eval_seed, index)``)."""
        return self.sample_task(task_rng(self.eval_seed, 0, index, EVAL_STREAM))

    def fixed_batch(
        self, indices: int | Sequence[int] | range, *, device: torch.device | str | None = None
    ) -> Task:
        """Fixed evaluation tasks ``indices``, stacked (see `meta_batch`)."""
        idx = _indices(indices, "fixed_batch")
        return stack_tasks([self.fixed_task(i) for i in idx]).to(device)

    def fixed_batches(
        self, n: int = 600, batch_size: int = 50, *, device: torch.device | str | None = None
    ) -> Iterator[Task]:
        """The first ``n`` fixed evaluation tasks in stacked chunks of at most ``batch_size``.

        Chunks keep memory bounded (600 Mini-ImageNet tasks stacked at once would take gigabytes).
        """
        if n < 1 or batch_size < 1:
            raise ValueError(f"fixed_batches(n={n}, batch_size={batch_size}): both must be >= 1")
        for start in range(0, n, batch_size):
            yield self.fixed_batch(range(start, min(n, start + batch_size)), device=device)


def _check_seed(who: str, seed: object) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{who}(seed={seed!r}): must be an int >= 0")
    return int(seed)


def sample_task(
    pool: ClassPool,
    rng: np.random.Generator,
    ways: int,
    shots: int,
    queries: int,
    dtype: torch.dtype = torch.float32,
) -> Task:
    """Draw one N-way K-shot task from ``pool`` (no decoding: images come from the cached array).

    ``ways`` distinct pool classes are drawn without replacement and labelled ``0..ways-1`` in the
    order drawn; from each, ``shots + queries`` distinct images, rotated by the pool class's
    rotation.

    Args:
        pool: classes to draw from; each must have ``>= shots + queries`` images (not re-checked
            here; `TaskSampler` checks at construction).
        rng: the generator (consumed).
        ways, shots, queries: task size.
        dtype: floating dtype of the images.

    Returns:
        Task with ``support_x`` ``(ways * shots, C, H, W)``, ``support_y`` ``(ways * shots,)`` int64,
        ``query_x`` ``(ways * queries, C, H, W)``, ``query_y`` ``(ways * queries,)`` int64, class-major.
    """
    images = pool.collection.images
    offsets = pool.collection.offsets
    per = shots + queries
    chosen = rng.choice(pool.n_classes, size=ways, replace=False)
    c, h, w = pool.image_shape
    out = np.empty((ways, per, c, h, w), dtype=np.uint8)
    for j, k in enumerate(chosen):
        cls, rot = int(pool.classes[k]), int(pool.rotations[k])
        start, count = int(offsets[cls]), int(offsets[cls + 1] - offsets[cls])
        imgs = images[start + rng.choice(count, size=per, replace=False)]
        out[j] = np.rot90(imgs, k=rot, axes=(-2, -1)) if rot else imgs
    x = torch.from_numpy(out).to(dtype).div_(255.0)
    labels = torch.arange(ways, dtype=torch.int64)
    return Task(
        x[:, :shots].reshape(ways * shots, c, h, w),
        labels.repeat_interleave(shots),
        x[:, shots:].reshape(ways * queries, c, h, w),
        labels.repeat_interleave(queries),
    )


class TaskSampler(_Streams):
    """N-way K-shot classification tasks from a `ClassPool`.

    Args:
        pool: the classes (e.g. ``data.train``, ``data.test``).
        ways: classes per task (>= 1, <= ``pool.n_classes``).
        shots: support images per class (>= 1).
        queries: query images per class (>= 1).
        seed: seed of the meta-training stream (``task``, ``meta_batch``).
        eval_seed: seed of the fixed evaluation tasks (default: ``seed``).
        dtype: floating dtype of the images.

    Raises:
        ValueError: bad sizes or seeds.
        DatasetFormatError: the pool has fewer than ``ways`` classes, or a class with fewer than
            ``shots + queries`` images.
    """

    def __init__(
        self,
        pool: ClassPool,
        ways: int,
        shots: int,
        queries: int,
        *,
        seed: int = 0,
        eval_seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        who = f"TaskSampler(ways={ways}, shots={shots}, queries={queries})"
        for name, v in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{who}: {name} must be an int >= 1, got {v!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"{who}: dtype must be floating, got {dtype}")
        if ways > pool.n_classes:
            raise DatasetFormatError(
                f"{who}: the {pool.name or 'given'} pool has only {pool.n_classes} classes; need ways <= that"
            )
        counts = pool.counts
        if counts.size and counts.min() < shots + queries:
            k = int(np.argmin(counts))
            raise DatasetFormatError(
                f"{who}: class {pool.label(k)!r} of the {pool.name or 'given'} pool has only "
                f"{int(counts[k])} images; every class needs shots + queries = {shots + queries}"
            )
        self.pool = pool
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed = _check_seed("TaskSampler", seed)
        self.eval_seed = self.seed if eval_seed is None else _check_seed("TaskSampler", eval_seed)
        self.dtype = dtype

    def sample_task(self, rng: np.random.Generator) -> Task:
        """One task drawn with ``rng`` (see the module function `sample_task`)."""
        return sample_task(self.pool, rng, self.ways, self.shots, self.queries, self.dtype)

    def __repr__(self) -> str:
        return (
            f"TaskSampler(pool={self.pool.name!r} ({self.pool.n_classes} classes), ways={self.ways}, "
            f"shots={self.shots}, queries={self.queries}, seed={self.seed}, eval_seed={self.eval_seed})"
        )


class SinusoidTasks(_Streams):
    """Sinusoid regression tasks (Finn et al. 2017): ``y = A sin(x - phase)``.

    ``A ~ U[amplitude]``, ``phase ~ U[phase]``, every ``x ~ U[x_range]`` independently for support and
    query points.

    Args:
        shots: support points K (5, 10 or 20 in the literature).
        queries: query points.
        amplitude: ``(low, high)``, default ``(0.1, 5.0)``.
        phase: ``(low, high)``, default ``(0, pi)``.
        x_range: ``(low, high)``, default ``(-5, 5)``.
        seed: seed of the meta-training stream.
        eval_seed: seed of the fixed evaluation tasks (default: ``seed``).
        dtype: floating dtype.

    Raises:
        ValueError: non-positive sizes, empty or reversed ranges, bad seeds.
    """

    def __init__(
        self,
        shots: int,
        queries: int = 10,
        *,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
        eval_seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, v in (("shots", shots), ("queries", queries)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SinusoidTasks({name}={v!r}): must be an int >= 1")
        for name, r in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if len(r) != 2 or not (math.isfinite(r[0]) and math.isfinite(r[1])) or r[0] > r[1]:
                raise ValueError(f"SinusoidTasks({name}={r!r}): must be finite (low, high) with low <= high")
        if not dtype.is_floating_point:
            raise ValueError(f"SinusoidTasks(dtype={dtype}): must be floating")
        self.shots, self.queries = shots, queries
        self.amplitude = (float(amplitude[0]), float(amplitude[1]))
        self.phase = (float(phase[0]), float(phase[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))
        self.seed = _check_seed("SinusoidTasks", seed)
        self.eval_seed = self.seed if eval_seed is None else _check_seed("SinusoidTasks", eval_seed)
        self.dtype = dtype

    def sample_function(self, rng: np.random.Generator) -> tuple[float, float]:
        """Draw ``(amplitude, phase)``; `sample_task` draws these first from the same generator."""
        return float(rng.uniform(*self.amplitude)), float(rng.uniform(*self.phase))

    def function_of(self, step: int, index: int, *, fixed: bool = False) -> tuple[float, float]:
        """``(amplitude, phase)`` of ``task(step, index)``, or of ``fixed_task(index)`` if ``fixed``."""
        rng = task_rng(self.eval_seed, 0, index, EVAL_STREAM) if fixed else task_rng(self.seed, step, index)
        return self.sample_function(rng)

    def sample_task(self, rng: np.random.Generator) -> Task:
        """One task: support x and y ``(shots, 1)``, query x and y ``(queries, 1)``."""
        amp, ph = self.sample_function(rng)
        x = rng.uniform(*self.x_range, size=(self.shots + self.queries, 1))
        y = amp * np.sin(x - ph)
        xt = torch.from_numpy(x).to(self.dtype)
        yt = torch.from_numpy(y).to(self.dtype)
        return Task(xt[: self.shots], yt[: self.shots], xt[self.shots :], yt[self.shots :])

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(shots={self.shots}, queries={self.queries}, amplitude={self.amplitude}, "
            f"phase={self.phase}, x_range={self.x_range}, seed={self.seed}, eval_seed={self.eval_seed})"
        )


class TaskPool(_Streams):
    """A finite pool of ``n`` training tasks of ``source``, drawn with replacement at every meta-step.

    Pool task ``j`` is ``source.sample_task(SeedSequence([seed, 2, 0, j]))``: the same classes,
    images and labels whenever it is drawn (made on demand, nothing is stored).  Task ``index`` of
    meta-step ``step`` is pool task ``j`` drawn uniformly from ``SeedSequence([seed, 0, step,
    index])``, so ranks and resumed runs see the same tasks (see the module docstring).  The
    released iMAML code trains on 200,000 pre-drawn tasks this way.  The fixed evaluation tasks
    are ``source``'s.

    Raises:
        ValueError: ``n < 1``.
    """

    def __init__(self, source: TaskSampler | SinusoidTasks, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"TaskPool(n={n!r}): the pool needs n >= 1 tasks")
        self.source = source
        self.n = n
        self.seed = source.seed
        self.eval_seed = source.eval_seed

    def __repr__(self) -> str:
        return f"TaskPool({self.source!r}, n={self.n})"

    def sample_task(self, rng: np.random.Generator) -> Task:
        return self.source.sample_task(rng)

    def pool_index(self, step: int, index: int) -> int:
        """Which pool task is task ``index`` of meta-step ``step``."""
        return int(task_rng(self.seed, step, index, TRAIN_STREAM).integers(self.n))

    def task(self, step: int, index: int) -> Task:
        """Pool task `pool_index` ``(step, index)``."""
        return self.source.sample_task(task_rng(self.seed, 0, self.pool_index(step, index), POOL_STREAM))
