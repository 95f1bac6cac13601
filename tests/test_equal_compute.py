"""The equal-compute summary: the seeds' interval, which algorithm is ahead, the files it writes."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from test_metalearn_report import fake_run

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


def test_summary_writes_the_table_the_pick_and_the_curves(tmp_path: Path) -> None:
    """Two algorithms x two seeds of fake runs (evaluations at 18, 38, 58 and 78 s): the table's
    cells, the pick and curves.png from the same numbers."""
    for algo, shift in (("maml", 0.0), ("anil", -5.0)):
        for seed in (0, 1):
            folder = fake_run(EC.run_dir(tmp_path, "5w1s", algo, seed), algo=algo)
            lines = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
            for rec in lines:
                if "eval" in rec:
                    rec["eval"]["accuracy"] += shift + seed
            (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = ["summary", "--algos", "maml", "anil", "--seeds", "0", "1", "--every", "0.5"]
    assert EC.main([*args, "--minutes", "1", "--marks", "0.5", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "5w1s" / "summary.md").read_text()
    # at 0.5 min (30 s) the evaluation at 38 s: maml 69 and 70, anil 64 and 65
    assert "| maml | 69.50 +- 6.35 [s0: 69.00 (20), s1: 70.00 (20)] |" in text
    assert "0.5 CPU-min: **maml 69.50 +- 6.35** ahead, level with anil 64.50 +- 6.35" in text
    assert (tmp_path / "5w1s" / "curves.png").read_bytes()[:4] == b"\x89PNG"
