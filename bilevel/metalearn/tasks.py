"""A few-shot task, or a meta-batch of tasks: what the data pipeline hands the algorithms.

A `Task` is a named tuple of tensors; a meta-batch is a `Task` whose tensors have a leading task
dimension ``B`` (`stack_tasks`), ready for the batched model or ``torch.func.vmap``.  The samplers that
draw them reproducibly are in `bilevel.metalearn.data.samplers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import NonFiniteError

__all__ = ["Task", "check_finite", "stack_tasks"]


class Task(NamedTuple):
    """One few-shot task, or a meta-batch of them (an extra leading dimension ``B`` on every field).

    Attributes:
        support_x: classification ``(ways * shots, C, H, W)`` float; regression ``(shots, 1)``.
        support_y: classification ``(ways * shots,)`` int64 labels ``0..ways-1``; regression ``(shots, 1)``.
        query_x: like ``support_x`` with ``queries`` in place of ``shots``.
        query_y: like ``support_y`` with ``queries`` in place of ``shots``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: torch.device | str | None, non_blocking: bool = False) -> Task:
        """The task with every tensor moved to ``device`` (``None``: unchanged)."""
        if device is None:
            return self
        return Task(*(t.to(device, non_blocking=non_blocking) for t in self))


def stack_tasks(tasks: Sequence[Task]) -> Task:
    """Stack tasks of equal shapes into a meta-batch (leading dimension ``len(tasks)``).

    Raises:
        ValueError: ``tasks`` is empty.
    """
    if not tasks:
        raise ValueError("stack_tasks: no tasks")
    return Task(*(torch.stack(list(parts)) for parts in zip(*tasks)))


def check_finite(batch: Task, who: str, *, index: Sequence[int] | None = None) -> None:
    """Refuse NaN or infinity in a meta-batch's inputs or targets, naming the task and the tensor.

    One device read for the whole batch; the task is located only when one is broken.  Checked
    at the door, broken data are not mistaken for a diverged inner loop.

    Args:
        batch: a meta-batch (leading task dimension B on every field).
        who: the call, for the message.
        index: the meta-batch position of each of the B tasks (a rank's share of a meta-batch);
            default ``0 .. B - 1``.

    Raises:
        NonFiniteError: a floating field of some task holds NaN or infinity.
    """
    named = [(name, t) for name, t in zip(Task._fields, batch) if t.is_floating_point() and t.numel()]
    if not named:
        return
    ok = torch.stack([torch.isfinite(t).flatten(1).all(1) for _, t in named])  # (fields, B)
    if bool(ok.all()):
        return
    k, b = (~ok).nonzero()[0].tolist()
    name, t = named[k]
    what = "NaN" if bool(torch.isnan(t[b]).any()) else "infinity"
    part, role = name.split("_")
    raise NonFiniteError(
        f"{who}: task {b if index is None else index[b]} of the meta-batch has {what} in {name} (its "
        f"{part} {'inputs' if role == 'x' else 'labels or targets'}); the data are broken, not the "
        "inner loop: fix or drop that task"
    )
