"""The equal-compute summary's arithmetic: the seeds' interval and which algorithm is ahead."""

from __future__ import annotations

import math
import statistics

import pytest

from benchmarks import equal_compute as EC


def test_the_interval_is_the_seeds_t_interval_or_one_seeds_own() -> None:
    rows = [(0, 96.0, 0.4, 100), (1, 97.0, 0.4, 101), (2, 95.5, 0.5, 99)]
    mean, half = EC.mean_interval(rows)
    assert mean == pytest.approx(96.1666666667)
    # t with 2 degrees of freedom, 4.303, times the standard error of the three accuracies
    assert half == pytest.approx(4.303 * statistics.stdev([96.0, 97.0, 95.5]) / math.sqrt(3))
    assert EC.mean_interval(rows[:1]) == (96.0, 0.4)


def test_pick_names_the_leader_the_algorithms_level_with_it_and_what_is_missing() -> None:
    at = {"maml": (97.9, 0.3, 3), "meta-sgd": (97.5, 0.2, 3), "fomaml": (96.4, 0.3, 3)}
    text = EC.pick(100, at, ["maml", "meta-sgd", "fomaml"], seeds=3)
    # 97.9 - 97.5 <= 0.3 + 0.2: level; 97.9 - 96.4 > 0.3 + 0.3: behind, not named
    assert text == (
        "100 CPU-min: **maml 97.90 +- 0.30** ahead, level with meta-sgd 97.50 +- 0.20 (overlapping intervals)"
    )
    alone = EC.pick(10, {"anil": (93.3, 0.1, 3), "fomaml": (90.0, 0.5, 2)}, ["anil", "fomaml", "maml"], 3)
    assert alone == (
        "10 CPU-min: **anil 93.30 +- 0.10** ahead of all; provisional: fomaml, maml short of 3 seeds"
    )
    assert EC.pick(30, {}, ["anil"], 3) == "30 CPU-min: no run has reached it"
