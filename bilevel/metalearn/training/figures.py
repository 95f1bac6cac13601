"""Figures of run folders: `write_report` draws the plots described in `.report`.

Plotting needs matplotlib (``pip install 'bilevel[plot]'``), imported on the first figure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runlog import Record, RunLog, is_finite, read_runs

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["write_report"]


def _num(x: Any) -> str:
    return f"{x:.3g}" if is_finite(x) else "n/a"


@dataclasses.dataclass(frozen=True)
class _Canvas:
    """What every figure shares: pyplot, each run's colour (one per algorithm) and line style (one
    per run of that algorithm: seeds or settings), the resolution."""

    plt: Any
    colors: dict[str, str]
    styles: dict[str, str]
    dpi: int


def _looks(runs: Sequence[RunLog], cycle: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Colours and line styles by run name: one colour per algorithm, in order of first
    appearance, so that seeds of one algorithm read as one family; its runs take solid, dashed,
    dotted and dash-dot lines in turn."""
    algos: dict[str, int] = {}
    seen: dict[str, int] = {}
    colors: dict[str, str] = {}
    styles: dict[str, str] = {}
    for r in runs:
        k = algos.setdefault(r.algo, len(algos))
        nth = seen[r.algo] = seen.get(r.algo, -1) + 1
        colors[r.name] = cycle[k % len(cycle)]
        styles[r.name] = _STYLES[nth % len(_STYLES)]
    return colors, styles


#: line styles of the runs that share an algorithm's colour
_STYLES = ("-", "--", ":", "-.")


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
        if is_finite(v):
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
    scale, unit = _time_unit(runs)
    clocks = "/".join(sorted({r.clock for r in runs}))
    lows: list[float] = []
    highs: list[float] = []
    for r in runs:
        for ax, xkey in ((axes[0], "step"), (axes[1], "time")):
            div = scale if xkey == "time" else 1.0
            _plot_evals(ax, r, cv.colors[r.name], cv.styles[r.name], xkey, div, key, ci, lows, highs)
            _plot_final(ax, r, cv.colors[r.name], xkey, div, final_key, final_ci, lows, highs)
    axes[0].set_xlabel("meta-steps")
    axes[1].set_xlabel(f"training time ({unit}, {clocks} clock; evaluations not counted)")
    axes[0].set_ylabel(ylabel)
    axes[1].tick_params(labelleft=True)
    if lows:
        axes[0].set_ylim(*_eval_limits(lows, highs, percent))
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


def _time_unit(runs: Sequence[RunLog]) -> tuple[float, str]:
    """(seconds per unit, unit) of the time axis: minutes where the longest run passes 2 minutes."""
    longest = max((float(e["time"]) for r in runs for e in r.evals if is_finite(e.get("time"))), default=0.0)
    longest = max(
        [longest]
        + [
            float(r.metrics["train_seconds"])
            for r in runs
            if r.metrics and is_finite(r.metrics.get("train_seconds"))
        ]
    )
    return (60.0, "min") if longest > 120 else (1.0, "s")


def _plot_evals(
    ax: Axes,
    r: RunLog,
    color: str,
    ls: str,
    xkey: str,
    div: float,
    key: str,
    ci: str,
    lows: list[float],
    highs: list[float],
) -> None:
    """One run's periodic evaluations against ``xkey`` (divided by ``div``) with their 95% band;
    the band's ends are appended to ``lows`` and ``highs``."""
    pts = [e for e in r.evals if is_finite(e.get(key)) and is_finite(e.get(xkey))]
    xs = [float(e[xkey]) / div for e in pts]
    ys = [float(e[key]) for e in pts]
    half = [float(e[ci]) if is_finite(e.get(ci)) else 0.0 for e in pts]
    band_lo = [y - h for y, h in zip(ys, half)]
    band_hi = [y + h for y, h in zip(ys, half)]
    if xs:
        ax.plot(xs, ys, marker="o", ls=ls, color=color, ms=3.5, lw=1.5, label=_label(r))
        ax.fill_between(xs, band_lo, band_hi, color=color, alpha=0.18, lw=0)
        lows += band_lo
        highs += band_hi


def _plot_final(
    ax: Axes,
    r: RunLog,
    color: str,
    xkey: str,
    div: float,
    final_key: str,
    final_ci: str,
    lows: list[float],
    highs: list[float],
) -> None:
    """One run's final evaluation as a star with its 95% interval, where it has one; the
    interval's ends are appended to ``lows`` and ``highs``."""
    m = r.metrics or {}
    fx = m.get("meta_steps_done") if xkey == "step" else m.get("train_seconds")
    if is_finite(m.get(final_key)) and is_finite(fx):
        fy, fh = float(m[final_key]), float(m[final_ci]) if is_finite(m.get(final_ci)) else 0.0
        ax.errorbar(
            [float(fx) / div],
            [fy],
            yerr=[fh],
            fmt="*",
            ms=12,
            color=color,
            ecolor=color,
            capsize=4,
            mec="black",
            mew=0.6,
            label=_label(r),
        )
        lows.append(fy - fh)
        highs.append(fy + fh)


def _eval_limits(lows: list[float], highs: list[float], percent: bool) -> tuple[float, float]:
    """The y range of the evaluation panels: every band and interval with a margin, clipped to
    [0, 100] for percentages and at 0 for non-negative losses."""
    lo, hi = min(lows), max(highs)
    pad = 0.06 * max(hi - lo, 1e-12)
    lo, hi = lo - pad, hi + pad
    if percent:
        lo, hi = max(0.0, lo), min(100.0, hi)
    elif min(lows) >= 0:
        lo = max(0.0, lo)
    return lo, hi


def _curve(ax: Axes, xs: list[float], ys: list[float], color: str, label: str, ls: str = "-") -> None:
    """Every logged value as a faint dot, and its moving average as the line."""
    ax.plot(xs, ys, ".", color=color, ms=2.5, alpha=0.35)
    ax.plot(xs, _smooth(ys), ls=ls, color=color, lw=1.6, label=label)


def _train_figure(runs: Sequence[RunLog], cv: _Canvas, path: Path) -> Path:
    fig, axes = _figure(cv, 2, 12, len(runs), min(len(runs), 7) + 2)
    lines: list[str] = []
    seen: tuple[list[float], list[float]] = ([], [])
    for r in runs:
        q, s = _values(r.steps, "query_loss"), _values(r.steps, "support_loss")
        for ax, (xs, ys), acc in ((axes[0], q, seen[0]), (axes[1], s, seen[1])):
            if xs:
                _curve(ax, xs, ys, cv.colors[r.name], _label(r), cv.styles[r.name])
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
                _curve(ax, xs, ys, c, _label(r), cv.styles[r.name])
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
    """Draw ``runs`` (overlaid) into the folder ``out``: the figures that the module docstring of
    `bilevel.metalearn.training.report` lists.

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
    cv = _Canvas(plt, *_looks(logs, plt.rcParams["axes.prop_cycle"].by_key()["color"]), dpi)
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
