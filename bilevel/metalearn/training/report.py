"""Plots of meta-training runs: `read_run` reads a run folder, `write_report` draws its figures.

Command line::

    python -m bilevel.metalearn report runs/fomaml runs/imaml --out runs/report

A run folder is what `bilevel.metalearn.training.train` writes: ``log.jsonl`` (one record per logged
meta-step, one per periodic evaluation; written as training goes, so a running or stopped run can
be read), ``metrics.json`` (the final evaluation, once training has ended) and ``config.json``.
`write_report` draws, for one run or several overlaid (one colour per run throughout):

* ``test_accuracy.png`` (classification runs): accuracy on the fixed test tasks after adaptation,
  with its 95% interval as a band, against meta-steps and against training time; the final
  evaluation (``--test-tasks`` tasks) as a point with its interval;
* ``test_loss.png``: the same for the test query loss (mean squared error for regression);
* ``train_loss.png``: the meta-batch's query loss and support loss after adaptation, against
  meta-steps (every logged step, and a moving average);
* ``diagnostics.png``: the inner solver's ||grad_phi G|| at its answer, CG's residual (iMAML only)
  and the fraction of tasks where CG met negative curvature, against meta-steps.

Every figure has a title with the final figures, axis labels and a legend.  Plotting needs
matplotlib (``pip install 'bilevel[plot]'``); reading does not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from ... import BilevelError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["RunFormatError", "RunLog", "read_run", "summarize", "write_report"]

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
        return any(_finite(e.get("accuracy")) for e in self.evals)

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
        if self.classification and not want_loss and _finite(rec.get(acc)):
            return f"{_pm(rec.get(acc), rec.get(ci))}%"
        return f"{'loss' if self.classification else 'MSE'} {_pm(rec.get(loss), rec.get(loss_ci))}"

    def __repr__(self) -> str:
        done = "finished" if self.metrics is not None else "running"
        return (
            f"RunLog({self.name!r}, {self.algo}, {self.task_format or 'no config'}, {len(self.steps)} logged "
            f"steps, {len(self.evals)} evaluations, {done})"
        )


def _finite(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any) -> str:
    return f"{x:.3g}" if _finite(x) else "n/a"


def _pm(x: Any, h: Any) -> str:
    """``x ± h``, ``h`` to two significant digits and ``x`` to as many decimals."""
    if not _finite(x):
        return "n/a"
    if not _finite(h) or h <= 0:
        return f"{x:.4g}"
    dec = max(0, min(8, 1 - math.floor(math.log10(h))))
    return f"{x:.{dec}f} ± {h:.{dec}f}"


def _minutes(seconds: Any) -> str:
    if not _finite(seconds):
        return "? min"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# ------------------------------------------------------------------------------------------ reading
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


# ------------------------------------------------------------------------------------------ plotting
@dataclasses.dataclass(frozen=True)
class _Canvas:
    """What every figure shares: pyplot, one colour per run, the resolution."""

    plt: Any
    colors: dict[str, str]
    dpi: int


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("report: plotting needs matplotlib: pip install 'bilevel[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(records: Sequence[Record], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records whose ``key`` is a finite number."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if _finite(v):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return xs, ys


def _smooth(ys: Sequence[float]) -> list[float]:
    """Centred moving average over about a twentieth of the points (at least 3)."""
    w = max(1, len(ys) // 40)
    out = []
    for i in range(len(ys)):
        lo, hi = max(0, i - w), min(len(ys), i + w + 1)
        out.append(sum(ys[lo:hi]) / (hi - lo))
    return out


def _last(ys: Sequence[float]) -> float:
    """Mean of the last tenth of a series (NaN if empty)."""
    if not ys:
        return math.nan
    tail = ys[-max(1, len(ys) // 10) :]
    return sum(tail) / len(tail)


def _label(r: RunLog) -> str:
    return f"{r.name} ({r.algo})"


def _heading(what: str, runs: Sequence[RunLog]) -> str:
    fmt = sorted({r.task_format for r in runs if r.task_format})
    return what + (f" — {', '.join(fmt)}" if fmt else "")


def _per_run(lines: list[str], limit: int = 6) -> list[str]:
    if len(lines) <= limit:
        return lines
    return [*lines[:limit], f"... and {len(lines) - limit} more runs"]


def _log_if_wide(ax: Axes, ys: Sequence[float]) -> None:
    """Log scale where the values span more than a factor 30 (and are positive)."""
    pos = [y for y in ys if y > 0]
    if pos and len(pos) == len(ys) and max(pos) / min(pos) > 30:
        ax.set_yscale("log")


def _finish(
    fig: Any, axes: Sequence[Axes], path: Path, cv: _Canvas, title: Sequence[str], extra: dict[str, Any]
) -> Path:
    """Grid, one legend under the panels (every run and marker once), the title; save and close."""
    handles: dict[str, Any] = {}
    for ax in axes:
        ax.grid(alpha=0.3)
        for h, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("_"):
                handles.setdefault(label, h)
    handles.update(extra)
    if handles:
        ncol = max(1, min(3, len(handles)))
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncol=ncol,
            fontsize=8.5,
            frameon=False,
        )
    fig.suptitle("\n".join(title), fontsize=10.5)
    fig.savefig(path, dpi=cv.dpi)
    cv.plt.close(fig)
    return path


def _figure(
    cv: _Canvas, ncols: int, width: float, n_runs: int, n_title: int, **kw: Any
) -> tuple[Any, list[Axes]]:
    """A row of ``ncols`` panels, its height grown for the title lines and the legend rows."""
    height = 3.6 + 0.2 * n_title + 0.2 * math.ceil((n_runs + 2) / 3)
    fig, axes = cv.plt.subplots(1, ncols, figsize=(width, height), layout="constrained", **kw)
    return fig, list(axes)


def _eval_figure(
    runs: Sequence[RunLog],
    cv: _Canvas,
    path: Path,
    *,
    key: str,
    ci: str,
    final_key: str,
    final_ci: str,
    ylabel: str,
    what: str,
    percent: bool,
) -> Path:
    """Periodic evaluations with their 95% bands against meta-steps and time; the final one as a star."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    title = [
        _heading(what, runs),
        *_per_run([f"{_label(r)}: final {r.final(loss=not percent)}" for r in runs]),
    ]
    fig, axes = _figure(cv, 2, 12, len(runs), len(title), sharey=True)
    longest = max((float(e["time"]) for r in runs for e in r.evals if _finite(e.get("time"))), default=0.0)
    longest = max(
        [longest]
        + [
            float(r.metrics["train_seconds"])
            for r in runs
            if r.metrics and _finite(r.metrics.get("train_seconds"))
        ]
    )
    scale, unit = (60.0, "min") if longest > 120 else (1.0, "s")
    clocks = "/".join(sorted({r.clock for r in runs}))
    lows: list[float] = []
    highs: list[float] = []
    for r in runs:
        c = cv.colors[r.name]
        m = r.metrics or {}
        for ax, xkey in ((axes[0], "step"), (axes[1], "time")):
            div = scale if xkey == "time" else 1.0
            pts = [e for e in r.evals if _finite(e.get(key)) and _finite(e.get(xkey))]
            xs = [float(e[xkey]) / div for e in pts]
            ys = [float(e[key]) for e in pts]
            half = [float(e[ci]) if _finite(e.get(ci)) else 0.0 for e in pts]
            band_lo = [y - h for y, h in zip(ys, half)]
            band_hi = [y + h for y, h in zip(ys, half)]
            if xs:
                ax.plot(xs, ys, "o-", color=c, ms=3.5, lw=1.5, label=_label(r))
                ax.fill_between(xs, band_lo, band_hi, color=c, alpha=0.18, lw=0)
                lows += band_lo
                highs += band_hi
            fx = m.get("meta_steps_done") if xkey == "step" else m.get("train_seconds")
            if _finite(m.get(final_key)) and _finite(fx):
                fy, fh = float(m[final_key]), float(m[final_ci]) if _finite(m.get(final_ci)) else 0.0
                ax.errorbar(
                    [float(fx) / div],
                    [fy],
                    yerr=[fh],
                    fmt="*",
                    ms=12,
                    color=c,
                    ecolor=c,
                    capsize=4,
                    mec="black",
                    mew=0.6,
                    label=_label(r),
                )
                lows.append(fy - fh)
                highs.append(fy + fh)
    axes[0].set_xlabel("meta-steps")
    axes[1].set_xlabel(f"training time ({unit}, {clocks} clock; evaluations not counted)")
    axes[0].set_ylabel(ylabel)
    axes[1].tick_params(labelleft=True)
    if lows:
        lo, hi = min(lows), max(highs)
        pad = 0.06 * max(hi - lo, 1e-12)
        lo, hi = lo - pad, hi + pad
        if percent:
            lo, hi = max(0.0, lo), min(100.0, hi)
        elif min(lows) >= 0:
            lo = max(0.0, lo)
        axes[0].set_ylim(lo, hi)
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes)
    extra = {
        "periodic evaluation (--eval-tasks), 95% band": Patch(color="grey", alpha=0.3),
        "final evaluation (--test-tasks), 95% interval": Line2D(
            [], [], marker="*", ls="", ms=11, color="grey", mec="black", mew=0.6
        ),
    }
    return _finish(fig, axes, path, cv, title, extra)


def _curve(ax: Axes, xs: list[float], ys: list[float], color: str, label: str) -> None:
    """Every logged value as a faint dot, and its moving average as the line."""
    ax.plot(xs, ys, ".", color=color, ms=2.5, alpha=0.35)
    ax.plot(xs, _smooth(ys), "-", color=color, lw=1.6, label=label)


def _train_figure(runs: Sequence[RunLog], cv: _Canvas, path: Path) -> Path:
    fig, axes = _figure(cv, 2, 12, len(runs), min(len(runs), 7) + 2)
    lines: list[str] = []
    seen: tuple[list[float], list[float]] = ([], [])
    for r in runs:
        q, s = _values(r.steps, "query_loss"), _values(r.steps, "support_loss")
        for ax, (xs, ys), acc in ((axes[0], q, seen[0]), (axes[1], s, seen[1])):
            if xs:
                _curve(ax, xs, ys, cv.colors[r.name], _label(r))
                acc.extend(ys)
        lines.append(f"{_label(r)}: query loss {_num(_last(q[1]))}, support loss {_num(_last(s[1]))}")
    axes[0].set_title("query loss after adaptation (meta-batch mean)", fontsize=10)
    axes[1].set_title("support loss after adaptation (without the proximal term)", fontsize=10)
    for ax, ys in zip(axes, seen):
        ax.set_xlabel("meta-steps")
        ax.set_ylabel("loss")
        if ys:
            _log_if_wide(ax, ys)
        else:
            ax.text(0.5, 0.5, "no logged steps", ha="center", va="center", transform=ax.transAxes)
    title = [
        _heading("Training losses (dots: logged steps; lines: moving average)", runs),
        *_per_run(lines),
        "(numbers: mean over the last tenth of the logged steps)",
    ]
    return _finish(fig, axes, path, cv, title, {})


def _diagnostics_figure(runs: Sequence[RunLog], cv: _Canvas, path: Path) -> Path:
    fig, axes = _figure(cv, 3, 15, len(runs), min(len(runs), 7) + 2)
    lines = []
    seen: tuple[list[float], list[float], list[float]] = ([], [], [])
    for r in runs:
        c = cv.colors[r.name]
        g, cg = _values(r.steps, "inner_grad_norm"), _values(r.steps, "cg_residual")
        neg: tuple[list[float], list[float]] = ([], [])
        if r.meta_batch is not None and cg[0]:
            xs, counts = _values(r.steps, "negative_curvature")
            neg = (xs, [n / r.meta_batch for n in counts])
        for ax, (xs, ys), acc in ((axes[0], g, seen[0]), (axes[1], cg, seen[1]), (axes[2], neg, seen[2])):
            if xs:
                _curve(ax, xs, ys, c, _label(r))
                acc.extend(ys)
        line = f"{_label(r)}: inner ‖∇G‖ {_num(_last(g[1]))}"
        if cg[0]:
            line += f", CG residual {_num(_last(cg[1]))}"
        else:
            line += ", no CG"
        if neg[0]:
            line += f", negative curvature in {100 * sum(neg[1]) / len(neg[1]):.1f}% of tasks (whole run)"
        lines.append(line)
    axes[0].set_title(r"inner gradient norm $\|\nabla_\phi G_i(\phi_i, \theta)\|$ (task mean)", fontsize=10)
    axes[1].set_title(r"CG residual $\|(I + \hat L_i''/\lambda)\, g_i - v_i\|$ (task mean)", fontsize=10)
    axes[2].set_title("fraction of tasks where CG met negative curvature", fontsize=10)
    axes[0].set_ylabel(r"$\|\nabla_\phi G\|$")
    axes[1].set_ylabel("residual (units of the query gradient)")
    axes[2].set_ylabel("fraction of the meta-batch")
    for i, (ax, ys) in enumerate(zip(axes, seen)):
        ax.set_xlabel("meta-steps")
        if not ys:
            why = "no logged steps" if i == 0 else "no CG in these runs (iMAML only)"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        elif i < 2:
            _log_if_wide(ax, ys)
        else:
            ax.set_ylim(-0.03, 1.03)
    title = [
        _heading("Inner solver and CG diagnostics", runs),
        *_per_run(lines),
        "(numbers: mean over the last tenth of the logged steps unless said)",
    ]
    return _finish(fig, axes, path, cv, title, {})


def write_report(runs: Sequence[RunLog | str | Path], out: str | Path, *, dpi: int = 110) -> list[Path]:
    """Draw the figures of the module docstring for ``runs`` (overlaid) into the folder ``out``.

    Args:
        runs: `RunLog` values, or run folders (read with `read_runs`).
        out: the folder to write PNGs into (created).
        dpi: resolution of the PNGs (110: about 1300 x 500 pixels for two panels).

    Returns:
        The paths written: ``test_accuracy.png`` (only with a classification run),
        ``test_loss.png``, ``train_loss.png``, ``diagnostics.png``.

    Raises:
        ValueError: no runs.
        FileNotFoundError, RunFormatError: as `read_run`.
        ImportError: matplotlib is not installed.
    """
    if not runs:
        raise ValueError("write_report: no runs")
    folders = [r for r in runs if not isinstance(r, RunLog)]
    read = iter(read_runs(folders) if folders else [])
    logs = [r if isinstance(r, RunLog) else next(read) for r in runs]
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cv = _Canvas(plt, {r.name: cycle[i % len(cycle)] for i, r in enumerate(logs)}, dpi)
    written = []
    cls = [r for r in logs if r.classification]
    if cls:
        written.append(
            _eval_figure(
                cls,
                cv,
                out / "test_accuracy.png",
                key="accuracy",
                ci="ci95",
                final_key="test_accuracy",
                final_ci="test_ci95",
                percent=True,
                ylabel="accuracy on the fixed test tasks (%)",
                what="Test accuracy after adaptation, with 95% intervals",
            )
        )
    regression = not cls
    loss_name = "mean squared error" if regression else ("cross-entropy" if len(cls) == len(logs) else "loss")
    written.append(
        _eval_figure(
            logs,
            cv,
            out / "test_loss.png",
            key="loss",
            ci="loss_ci95",
            final_key="test_loss",
            final_ci="test_loss_ci95",
            percent=False,
            ylabel=f"query loss on the fixed test tasks ({loss_name})",
            what=f"Test {'MSE' if regression else 'query loss'} after adaptation, with 95% intervals",
        )
    )
    written.append(_train_figure(logs, cv, out / "train_loss.png"))
    written.append(_diagnostics_figure(logs, cv, out / "diagnostics.png"))
    return written


def main(folders: Sequence[str | Path], out: str | Path) -> int:
    """The ``report`` command: print the summary table, write the figures, print their paths."""
    runs = read_runs(folders)
    print(summarize(runs))
    for p in write_report(runs, out):
        print(f"wrote {p}")
    return 0
