"""Reading run folders: `read_run` gives a `RunLog` (a run's configuration, logged steps,
periodic evaluations and final metrics); `summarize` writes them as a text table.

A run folder is what `bilevel.metalearn.training.train` writes: ``log.jsonl`` (one record per logged
meta-step, one per periodic evaluation; written as training goes, so a running or stopped run can
be read), ``metrics.json`` (the final evaluation, once training has ended) and ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

from ... import BilevelError

__all__ = ["Record", "RunFormatError", "RunLog", "is_finite", "read_run", "read_runs", "summarize"]

#: One record of ``log.jsonl``: a logged meta-step, or a periodic evaluation.
Record = dict[str, Any]


class RunFormatError(BilevelError, ValueError):
    """A run folder's file exists but cannot be read (not JSON, or records of the wrong form)."""


@dataclasses.dataclass(frozen=True, eq=False)
class RunLog:
    """What a run folder holds, as read by `read_run`.

    Attributes:
        name: the label in plots (the folder's name, or more of its path where names repeat).
        folder: the run folder.
        config: the run's configuration (``config.json``, else ``metrics.json``'s; may be empty).
        steps: one record per logged meta-step, sorted by step (a step logged twice, as after
            ``--resume``, keeps its last record): ``step``, ``time`` (training clock, seconds),
            ``query_loss``, ``query_acc`` (percent; ``None`` for regression), ``support_loss``,
            ``inner_grad_norm``, ``cg_residual`` (NaN or ``None`` without CG),
            ``negative_curvature`` (tasks of the meta-batch).
        evals: one record per periodic evaluation, sorted by step: ``step``, ``time``,
            ``accuracy``, ``ci95`` (percent), ``loss``, ``loss_ci95``, ``n_tasks``.
        metrics: ``metrics.json`` (``test_accuracy``, ``test_ci95``, ``test_loss``, ...), or
            ``None`` while the run has not finished.
    """

    name: str
    folder: Path
    config: dict[str, Any]
    steps: tuple[Record, ...]
    evals: tuple[Record, ...]
    metrics: dict[str, Any] | None

    @property
    def algo(self) -> str:
        """The algorithm's name (``"?"`` if the configuration is missing)."""
        return str(self.config.get("algo", "?"))

    @property
    def classification(self) -> bool:
        """Whether the run is scored by accuracy (every dataset but the sinusoid)."""
        if "dataset" in self.config:
            return self.config["dataset"] != "sinusoid"
        return any(is_finite(e.get("accuracy")) for e in self.evals)

    @property
    def meta_batch(self) -> int | None:
        mb = self.config.get("meta_batch")
        return int(mb) if isinstance(mb, (int, float)) and mb > 0 else None

    @property
    def clock(self) -> str:
        """``wall`` or ``cpu``: what the ``time`` fields measure."""
        return str(self.config.get("clock", "wall"))

    @property
    def task_format(self) -> str:
        """E.g. ``"omniglot 5-way 1-shot"`` or ``"sinusoid 5-shot"``."""
        c = self.config
        if not c:
            return ""
        if c.get("dataset") == "sinusoid":
            return f"sinusoid {c.get('shots')}-shot"
        return f"{c.get('dataset')} {c.get('ways')}-way {c.get('shots')}-shot"

    def final(self, *, loss: bool = False) -> str:
        """The final evaluation in words, e.g. ``"96.64 ± 0.33% (600 tasks, 10600 steps, 117.8 min)"``.

        Args:
            loss: give the query loss even where there is an accuracy.
        """
        m = self.metrics
        if m is None:
            last = self.evals[-1] if self.evals else None
            if last is None:
                return "running, not evaluated yet"
            score = self._score(last, "accuracy", "ci95", "loss", "loss_ci95", loss)
            return f"running; {score} at step {last['step']}"
        score = self._score(m, "test_accuracy", "test_ci95", "test_loss", "test_loss_ci95", loss)
        return (
            f"{score} ({m.get('test_tasks', '?')} tasks, {m.get('meta_steps_done', '?')} steps, "
            f"{_minutes(m.get('train_seconds'))})"
        )

    def _score(self, rec: Record, acc: str, ci: str, loss: str, loss_ci: str, want_loss: bool = False) -> str:
        if self.classification and not want_loss and is_finite(rec.get(acc)):
            return f"{_pm(rec.get(acc), rec.get(ci))}%"
        return f"{'loss' if self.classification else 'MSE'} {_pm(rec.get(loss), rec.get(loss_ci))}"

    def __repr__(self) -> str:
        done = "finished" if self.metrics is not None else "running"
        return (
            f"RunLog({self.name!r}, {self.algo}, {self.task_format or 'no config'}, {len(self.steps)} logged "
            f"steps, {len(self.evals)} evaluations, {done})"
        )


def is_finite(x: Any) -> TypeGuard[float]:
    """Whether ``x`` is a finite int or float (not a bool, ``None`` or a string)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pm(x: Any, h: Any) -> str:
    """``x ± h``, ``h`` to two significant digits and ``x`` to as many decimals."""
    if not is_finite(x):
        return "n/a"
    if not is_finite(h) or h <= 0:
        return f"{x:.4g}"
    dec = max(0, min(8, 1 - math.floor(math.log10(h))))
    return f"{x:.{dec}f} ± {h:.{dec}f}"


def _minutes(seconds: Any) -> str:
    if not is_finite(seconds):
        return "? min"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{path}: not valid JSON ({e}); the file is damaged") from None
    if not isinstance(value, dict):
        raise RunFormatError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _read_log(path: Path) -> tuple[list[Record], list[Record]]:
    steps: list[Record] = []
    evals: list[Record] = []
    text = path.read_text()
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                # The last line of a run killed while writing it: keep what came before.
                warnings.warn(
                    f"{path}: line {i} is incomplete (a run stopped while writing); skipped", stacklevel=3
                )
                continue
            raise RunFormatError(f"{path}: line {i} is not valid JSON ({e}); the file is damaged") from None
        if not isinstance(rec, dict):
            raise RunFormatError(f"{path}: line {i} is not a JSON object")
        if "eval" in rec:
            if not isinstance(rec["eval"], dict) or "step" not in rec["eval"]:
                raise RunFormatError(f"{path}: line {i}: an evaluation record without a step")
            evals.append(rec["eval"])
        elif "step" in rec:
            steps.append(rec)
        else:
            raise RunFormatError(f"{path}: line {i}: neither a step nor an evaluation record")
    return steps, evals


def _by_step(records: Sequence[Record]) -> tuple[Record, ...]:
    """Sorted by step; a step recorded twice (a resumed run repeats steps) keeps its last record."""
    last: dict[int, Record] = {}
    for r in records:
        last[int(r["step"])] = r
    return tuple(last[k] for k in sorted(last))


def read_run(folder: str | Path, name: str | None = None) -> RunLog:
    """Read a run folder written by `bilevel.metalearn.training.train`.

    ``log.jsonl`` gives the curves; without it, the curves saved in ``metrics.json`` are used.

    Args:
        folder: the run's ``--out`` folder.
        name: its label in plots (default: the folder's name).

    Returns:
        The `RunLog`.

    Raises:
        FileNotFoundError: no such folder, or neither ``log.jsonl`` nor ``metrics.json`` in it.
        RunFormatError: a file that is not valid JSON or holds records of the wrong form (the
            message names the file and line).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such run folder (the --out of `python -m bilevel.metalearn train`)"
        )
    log, metrics_path, config_path = folder / "log.jsonl", folder / "metrics.json", folder / "config.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else None
    if log.is_file():
        steps, evals = _read_log(log)
    elif metrics is not None:
        curves = metrics.get("curves")
        if not isinstance(curves, dict):
            raise RunFormatError(f"{metrics_path}: no 'curves' (and no {log.name} in {folder})")
        steps, evals = list(curves.get("steps", [])), list(curves.get("eval", []))
    else:
        raise FileNotFoundError(
            f"{folder}: neither log.jsonl nor metrics.json; is this a folder written by "
            "`python -m bilevel.metalearn train`?"
        )
    config: dict[str, Any] = {}
    if config_path.is_file():
        config = _read_json(config_path)
    elif metrics is not None and isinstance(metrics.get("config"), dict):
        config = metrics["config"]
    for r in (*steps, *evals):
        if not isinstance(r.get("step"), (int, float)):
            raise RunFormatError(f"{folder}: a record has no numeric 'step': {str(r)[:80]}")
    return RunLog(
        name=name or folder.resolve().name,
        folder=folder,
        config=config,
        steps=_by_step(steps),
        evals=_by_step(evals),
        metrics=metrics,
    )


def _names(folders: Sequence[Path]) -> list[str]:
    """Folder names, with parents added where they would repeat."""
    parts = [Path(f).resolve().parts for f in folders]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["/".join(p) for p in parts]


def read_runs(folders: Sequence[str | Path]) -> list[RunLog]:
    """`read_run` of each folder, with distinct names."""
    paths = [Path(f) for f in folders]
    return [read_run(p, n) for p, n in zip(paths, _names(paths))]


def summarize(runs: Sequence[RunLog]) -> str:
    """A text table: each run's periodic evaluations and its final result."""
    out: list[str] = []
    for r in runs:
        out.append(f"{r.name}: {r.algo}, {r.task_format or 'no config'} (clock: {r.clock})")
        for e in r.evals:
            score = r._score(e, "accuracy", "ci95", "loss", "loss_ci95")
            out.append(f"  step {int(e['step']):6d}  {_minutes(e.get('time')):>10}  {score}")
        out.append(f"  final: {r.final()}")
    return "\n".join(out)
