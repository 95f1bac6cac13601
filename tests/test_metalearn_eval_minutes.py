"""Periodic evaluations on the training clock (``eval_every_minutes``): curves at equal compute."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_config
from helpers import run_cli

from bilevel.metalearn import ConfigError, TrainConfig
from bilevel.metalearn.training.report import read_run
from bilevel.metalearn.training.train import _TimeMarks, train


def test_time_marks_fire_once_per_multiple_passed() -> None:
    marks = _TimeMarks(0.5, 0.0)  # every 30 s
    assert [marks.passed(t) for t in (0.0, 29.9, 30.0, 31.0, 59.0, 95.0, 100.0, 120.0)] == [
        False, False, True, False, False, True, False, True,
    ]  # fmt: skip
    # several multiples passed at once count as one evaluation, the next mark after the clock
    assert marks.next == 150.0
    # a resumed run's marks go on from its clock: 70 s trained, the next is at 90 s
    resumed = _TimeMarks(0.5, 70.0)
    assert resumed.next == 90.0 and not resumed.passed(89.0) and resumed.passed(90.0)
    never = _TimeMarks(None, 0.0)
    assert not never.passed(1e12)


def test_a_run_evaluates_each_time_its_clock_passes_a_mark(tmp_path: Path) -> None:
    # marks every 1e-7 minutes (6 us): every step passes one, so every step is followed by one
    cfg = tiny_config(tmp_path / "often", meta_steps=4, eval_every_minutes=1e-7, eval_tasks=3, clock="cpu")
    train(cfg, progress=False)
    run = read_run(tmp_path / "often")
    assert [e["step"] for e in run.evals] == [1, 2, 3, 4]
    times = [e["time"] for e in run.evals]
    assert times == sorted(times) and times[0] > 0
    # marks far apart: none passed, no periodic evaluation (the final one still runs)
    train(tiny_config(tmp_path / "never", meta_steps=4, eval_every_minutes=1e3), progress=False)
    assert len(read_run(tmp_path / "never").evals) == 0
    assert math.isfinite(json.loads((tmp_path / "never" / "metrics.json").read_text())["test_loss"])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "10"])
def test_bad_minutes_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="eval_every_minutes"):
        TrainConfig(eval_every_minutes=bad)  # type: ignore[arg-type]


def test_the_flag_and_its_eval_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sine = ["train", "--dataset", "sinusoid", "--meta-batch", "2", "--inner-steps", "1", "--meta-steps", "3"]
    sine += ["--test-tasks", "4", "--eval-batch", "2", "--checkpoint-every", "0"]
    code, _, err = run_cli(
        [*sine, "--eval-every-minutes", "1e-7", "--eval-tasks", "2", "--out", str(tmp_path / "a")], capsys
    )
    assert code == 0, err
    assert len(read_run(tmp_path / "a").evals) == 3 and "on 2 test tasks" in err
    code, _, err = run_cli([*sine, "--eval-tasks", "2", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--eval-every N or --eval-every-minutes M" in err
