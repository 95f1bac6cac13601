"""Run reports (`bilevel.metalearn.training.report`): reading run folders and writing the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_config

from bilevel.metalearn import train
from bilevel.metalearn.training.report import RunFormatError, read_run, read_runs, summarize, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder: Path, *, algo: str = "imaml-gd", steps: int = 40, finished: bool = True) -> Path:
    """A classification run folder in the format `train` writes (log.jsonl, config.json, metrics.json)."""
    folder.mkdir(parents=True)
    cfg = {"algo": algo, "dataset": "omniglot", "ways": 5, "shots": 1, "meta_batch": 8, "clock": "wall"}
    (folder / "config.json").write_text(json.dumps(cfg))
    lines = []
    for s in range(steps):
        lines.append(
            {
                "step": s,
                "time": 2.0 * s,
                "query_loss": 1.5 * math.exp(-s / 20),
                "query_acc": 40 + s,
                "support_loss": 0.5 * math.exp(-s / 20),
                "inner_grad_norm": 0.1 / (1 + s),
                "cg_residual": 1e-3 if algo.startswith("imaml") else float("nan"),
                "negative_curvature": s % 3,
            }
        )
        if s % 10 == 9:
            ev = {"step": s + 1, "time": 2.0 * s, "accuracy": 50 + s, "ci95": 2.0, "loss": 1 / (s + 1)}
            lines.append({"eval": {**ev, "loss_ci95": 0.01, "n_tasks": 100}})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if finished:
        metrics = {
            "test_accuracy": 91.25,
            "test_ci95": 0.5,
            "test_loss": 0.3,
            "test_loss_ci95": 0.02,
            "test_tasks": 600,
            "meta_steps_done": steps,
            "train_seconds": 2.0 * steps,
            "config": cfg,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_read_run_fields_and_summary(tmp_path: Path) -> None:
    run = read_run(fake_run(tmp_path / "a"))
    assert run.name == "a" and run.algo == "imaml-gd" and run.classification and run.meta_batch == 8
    assert len(run.steps) == 40 and [e["step"] for e in run.evals] == [10, 20, 30, 40]
    assert run.final() == "91.25 ± 0.50% (600 tasks, 40 steps, 1.3 min)"
    assert (
        repr(run) == "RunLog('a', imaml-gd, omniglot 5-way 1-shot, 40 logged steps, 4 evaluations, finished)"
    )
    text = summarize([run])
    assert "step     40" in text and "final: 91.25 ± 0.50%" in text
    running = read_run(fake_run(tmp_path / "b", finished=False))
    assert running.metrics is None and running.final() == "running; 89.0 ± 2.0% at step 40"


def test_resumed_run_keeps_the_last_record_of_a_step(tmp_path: Path) -> None:
    folder = fake_run(tmp_path / "r", steps=5)
    with open(folder / "log.jsonl", "a") as f:  # a resumed run repeats steps 3 and 4
        for s in (3, 4):
            f.write(json.dumps({"step": s, "time": 100.0, "query_loss": 9.0}) + "\n")
    run = read_run(folder)
    assert [r["step"] for r in run.steps] == [0, 1, 2, 3, 4] and run.steps[3]["query_loss"] == 9.0


def test_write_report_overlays_runs(tmp_path: Path) -> None:
    a, b = fake_run(tmp_path / "x" / "run"), fake_run(tmp_path / "y" / "run", algo="fomaml", finished=False)
    runs = read_runs([a, b])
    assert [r.name for r in runs] == ["x/run", "y/run"]  # the same folder name: parents added
    written = write_report(runs, tmp_path / "out", dpi=40)  # low resolution: a faster test
    names = [p.name for p in written]
    assert names == ["test_accuracy.png", "test_loss.png", "train_loss.png", "diagnostics.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5_000


def test_seeds_of_one_algorithm_share_a_colour_and_differ_in_line_style(tmp_path: Path) -> None:
    """Runs of one algorithm (seeds, settings) are one family: one colour each algorithm, in order
    of first appearance; solid, dashed, dotted, dash-dot lines within it."""
    from bilevel.metalearn.training.figures import _looks

    specs = [("a0", "maml"), ("b0", "anil"), ("a1", "maml"), ("a2", "maml"), ("b1", "anil")]
    runs = read_runs([fake_run(tmp_path / n, algo=algo, steps=10) for n, algo in specs])
    colors, styles = _looks(runs, ["red", "blue", "green"])
    assert [colors[n] for n, _ in specs] == ["red", "blue", "red", "red", "blue"]
    assert [styles[n] for n, _ in specs] == ["-", "-", "--", ":", "--"]
    assert write_report(runs, tmp_path / "out", dpi=40)[0].read_bytes()[:8] == PNG


def test_report_of_a_real_regression_run(tmp_path: Path) -> None:
    """`train` writes a folder; the report reads it (no accuracy plot for regression)."""
    cfg = tiny_config(
        tmp_path / "sine",
        algo="imaml-gd",
        queries=4,
        inner_steps=3,
        backtrack=True,
        meta_steps=6,
        eval_every=2,
        eval_tasks=4,
        test_tasks=4,
        log_every=1,
    )
    train(cfg, progress=False)
    run = read_run(tmp_path / "sine")
    assert not run.classification and len(run.steps) == 6 and len(run.evals) == 3
    assert run.final().startswith("MSE ")
    written = write_report([tmp_path / "sine"], tmp_path / "out", dpi=40)
    assert [p.name for p in written] == ["test_loss.png", "train_loss.png", "diagnostics.png"]
    assert all(p.read_bytes()[:8] == PNG for p in written)


def test_missing_and_damaged_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        read_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither log\.jsonl nor metrics\.json"):
        read_run(tmp_path / "empty")
    folder = fake_run(tmp_path / "bad", steps=5)
    lines = (folder / "log.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFormatError, match=r"log\.jsonl: line 3 is not valid JSON"):
        read_run(folder)
    (folder / "log.jsonl").write_text('{"what": 1}\n')
    with pytest.raises(RunFormatError, match="line 1: neither a step nor an evaluation"):
        read_run(folder)
    (folder / "log.jsonl").write_text('{"step": 0}\n')
    (folder / "metrics.json").write_text("{not json")
    with pytest.raises(RunFormatError, match=r"metrics\.json: not valid JSON"):
        read_run(folder)
    with pytest.raises(ValueError, match="no runs"):
        write_report([], tmp_path / "out")


def test_a_last_line_cut_short_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """A run killed while writing its log leaves a partial last line: the rest is still read."""
    folder = fake_run(tmp_path / "cut", steps=5, finished=False)
    (folder / "log.jsonl").write_text((folder / "log.jsonl").read_text() + '{"step": 5, "ti')
    with pytest.warns(UserWarning, match="incomplete"):
        run = read_run(folder)
    assert len(run.steps) == 5


def test_metrics_curves_stand_in_for_a_missing_log(tmp_path: Path) -> None:
    folder = fake_run(tmp_path / "m", steps=5)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["curves"] = {"steps": [{"step": 0, "query_loss": 1.0}], "eval": []}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "log.jsonl").unlink()
    assert len(read_run(folder).steps) == 1


def test_report_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m bilevel.metalearn report RUN... --out DIR`: the table, the figures, clear usage errors."""
    from bilevel.metalearn.training import report
    from bilevel.metalearn.training.cli import main

    drawn: list[tuple[list[str], str]] = []

    def fake_write(runs: list[report.RunLog], out: str) -> list[Path]:  # the plots are tested above
        drawn.append(([r.name for r in runs], out))
        return [Path(out) / "test_accuracy.png"]

    monkeypatch.setattr(report, "write_report", fake_write)
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", algo="fomaml")
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    assert drawn == [(["a", "b"], str(tmp_path / "out"))]
    out = capsys.readouterr().out
    assert "final: 91.25 ± 0.50%" in out and "wrote " in out
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "no such run folder" in capsys.readouterr().err
