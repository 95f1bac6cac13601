"""A few-shot task, or a meta-batch of tasks: what the data pipeline hands the algorithms.

A `Task` is a named tuple of tensors; a meta-batch is a `Task` whose tensors have a leading task
dimension ``B`` (`stack_tasks`), ready for the batched model or ``torch.func.vmap``.  The samplers that
draw them reproducibly are in `bilevel.metalearn.data.samplers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["Task", "stack_tasks"]


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
