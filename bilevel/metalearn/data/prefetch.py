"""Meta-batches sampled ahead: the next one is drawn while the current meta-step runs.

Drawing a meta-batch (choosing classes, decoding and rotating images, stacking) is host work
that would otherwise sit between two meta-steps while the device waits.  `Prefetcher` draws
meta-batch ``step + 1`` on a background thread while step ``step`` runs; on an accelerator it
pins the host tensors, so that the copy to the device is asynchronous (``non_blocking``).

Meta-batches depend only on ``(seed, step, task index)`` (`TaskSampler.meta_batch`), so the
prefetched run draws exactly the tasks of the plain one.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..tasks import Task

__all__ = ["Prefetcher"]


class Prefetcher:
    """Meta-batch ``step`` on ``device``, with meta-batch ``step + 1`` drawn in the background.

    Args:
        draw: ``draw(step) -> Task`` on the host (e.g. ``lambda s: sampler.meta_batch(s, B)``);
            called from one background thread, one step at a time.
        device: where the meta-batches are used.
        last: the last step that will be asked for (nothing is drawn beyond it).

    Use as a context manager (the thread is stopped on exit), and ask for steps in increasing
    order; a step that was not prefetched (the first, or after a jump) is drawn on the spot.
    An exception raised by ``draw`` is raised by `get` of that step.
    """

    def __init__(self, draw: Callable[[int], Task], device: torch.device | str, last: int) -> None:
        self.draw = draw
        self.device = torch.device(device)
        self.last = last
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bilevel-prefetch")
        self._pending: dict[int, Future[Task]] = {}

    def _host(self, step: int) -> Task:
        task = self.draw(step)
        if self.device.type == "cuda":
            task = Task(*(t.pin_memory() for t in task))
        return task

    def get(self, step: int) -> Task:
        """Meta-batch ``step`` on the device (the copy may still be in flight, in stream order)."""
        fut = self._pending.pop(step, None)
        for stale in [s for s in self._pending if s < step]:
            self._pending.pop(stale).cancel()
        task = fut.result() if fut is not None else self._host(step)
        if step + 1 <= self.last and step + 1 not in self._pending:
            self._pending[step + 1] = self._pool.submit(self._host, step + 1)
        return task.to(self.device, non_blocking=self.device.type == "cuda")

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
