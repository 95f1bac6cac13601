"""Prefetched meta-batches: the same tasks as drawing them on the spot; errors surface."""

from __future__ import annotations

import threading

import pytest
import torch

from bilevel.metalearn.data.prefetch import Prefetcher
from bilevel.metalearn.tasks import Task


def _draw(step: int) -> Task:
    g = torch.Generator().manual_seed(step)
    return Task(
        torch.randn(2, 3, generator=g), torch.arange(2), torch.randn(2, 4, generator=g), torch.arange(2)
    )


def test_prefetched_batches_equal_plain_draws_and_run_ahead() -> None:
    threads: list[str] = []

    def draw(step: int) -> Task:
        threads.append(threading.current_thread().name)
        return _draw(step)

    with Prefetcher(draw, "cpu", last=5) as pf:
        for step in range(6):
            got = pf.get(step)
            for a, b in zip(got, _draw(step)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the first draw happens on the spot, every later one ahead on the background thread
    assert threads[0] == threading.current_thread().name
    assert all(t.startswith("bilevel-prefetch") for t in threads[1:]) and len(threads) == 6


def test_prefetcher_draws_nothing_past_the_last_step_and_handles_jumps() -> None:
    drawn: list[int] = []

    def draw(step: int) -> Task:
        drawn.append(step)
        return _draw(step)

    with Prefetcher(draw, "cpu", last=3) as pf:
        pf.get(0)
        got = pf.get(2)  # a jump (resumed run): drawn on the spot, the stale prefetch dropped
        for a, b in zip(got, _draw(2)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        pf.get(3)
    assert 4 not in drawn and drawn.count(2) == 1


def test_prefetcher_raises_the_draws_error_at_its_step() -> None:
    def draw(step: int) -> Task:
        if step == 1:
            raise OSError("damaged image file")
        return _draw(step)

    with Prefetcher(draw, "cpu", last=2) as pf:
        pf.get(0)
        with pytest.raises(OSError, match="damaged image file"):
            pf.get(1)
