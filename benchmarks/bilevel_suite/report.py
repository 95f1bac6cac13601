"""Plot and tabulate the suite: our solvers (solid) against benchmark_bilevel's JAX solvers (dashed).

Reads ``results/bilevel_suite/ours_<problem>.json`` (``run_ours.py``) and
``reference_<problem>.json`` (``run_reference.py``), computes every record's metric with
``problems.py`` in float64 (the same code for both sides):

* every problem: relative suboptimality of the value function (h(x) - h*) / (h(x0) - h*), with
  h* from `problems.reference_optimum` (covtype: the minimum over `problems.OPTIMUM_BOUNDS`);
* covtype, beside it: the validation misclassification rate at the solver's inner iterate (the
  benchmark's own metric there).

Writes ``results/bilevel_suite/<problem>.png`` and prints a markdown table: time to reach
relative suboptimality 1e-2, 1e-4, 1e-6 (covtype also: to come within 0.002 of the lowest
validation error any solver reached), and, for SOBA and SABA, time per epoch ours / reference.

Time per epoch, one definition for both sides (`per_epoch`): the median over the windows
between records (the first, which holds the compilation on either side, left out) of the
time per iteration, times the iterations per epoch n_inner / batch size.  ``--timing`` prints
it from the runners' timing mode (``run_ours.py --timing``, ``run_reference.py --timing``:
fixed iterations at steps that keep both sides finite), ours in each configuration run.

Run::

    PYTHONPATH=. python -m benchmarks.bilevel_suite.report --problems quadratic,ijcnn1,covtype
    PYTHONPATH=. python -m benchmarks.bilevel_suite.report --timing
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .problems import OPTIMUM_BOUNDS, PROBLEMS, SuiteProblem, reference_optimum

RESULTS = Path("results/bilevel_suite")
LEVELS = (1e-2, 1e-4, 1e-6)
COVTYPE_SLACK = 0.002
MAX_POINTS = 80  # records scored per run (log-spaced in time): the metric costs a solve each


def _thin(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(records) <= MAX_POINTS:
        return records
    t = np.array([r["t"] for r in records])
    grid = np.geomspace(max(t[1], 1e-4), t[-1], MAX_POINTS)
    keep = sorted({0, len(records) - 1, *np.searchsorted(t, grid).clip(0, len(records) - 1).tolist()})
    return [records[i] for i in keep]


def optimum(problem: SuiteProblem) -> float:
    """h*, cached in ``results/bilevel_suite/optimum_<name>.json``."""
    path = RESULTS / f"optimum_{problem.name}.json"
    if path.exists():
        return float(json.loads(path.read_text())["h_star"])
    h_star, x_star = reference_optimum(problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(h_star=h_star, x_star=x_star.tolist())))
    return h_star


def score(problem: SuiteProblem, runs: list[dict[str, Any]], h_star: float, val_error: bool = False) -> None:
    """Add ``metric`` (relative suboptimality) and, with ``val_error``, ``val_error`` to every kept
    record (in place) and thin the records.  A record outside `OPTIMUM_BOUNDS` (where h* is the
    box's minimum) is counted in the run's ``outside_box``."""
    h0 = problem.value_and_grad(problem.x0)[0]
    box = OPTIMUM_BOUNDS.get(problem.name)
    for run in runs:
        run["records"] = _thin(run["records"])
        run["outside_box"] = 0
        for r in run["records"]:
            x = torch.tensor(r["x"], dtype=torch.float64)
            z = torch.tensor(r["z"], dtype=torch.float64)
            # A NaN z would score as the error of argmax(NaN) = class 0 on covtype.
            if not bool(torch.isfinite(x).all() and torch.isfinite(z).all()):
                r["metric"] = r["val_error"] = math.inf
                continue
            if box is not None and bool(((x < box[0]) | (x > box[1])).any()):
                run["outside_box"] += 1
            r["metric"] = max((problem.value_and_grad(x)[0] - h_star) / (h0 - h_star), 0.0)
            if val_error:
                assert problem.validation_error is not None
                r["val_error"] = problem.validation_error(z)


def time_to(run: dict[str, Any], level: float, key: str = "metric") -> float:
    for r in run["records"]:
        if r[key] <= level:
            return float(r["t"])
    return math.inf


def per_epoch(window_s: list[float], window_iters: list[int], batch_size: int, n_inner: int) -> float:
    """Seconds per epoch: the median over the windows but the first of the time per iteration,
    times the iterations per epoch n_inner / batch_size; NaN with fewer than two windows."""
    rates = sorted(t / k for t, k in zip(window_s[1:], window_iters[1:], strict=True) if k > 0)
    if not rates:
        return math.nan
    mid = len(rates) // 2
    rate = rates[mid] if len(rates) % 2 else 0.5 * (rates[mid - 1] + rates[mid])
    return rate * n_inner / batch_size


def epoch_time(run: dict[str, Any], n_inner: int) -> float:
    """`per_epoch` from a run's records (every record a window end); NaN for a run that ended
    non-finite (its later windows time NaN arithmetic)."""
    recs = run["records"]
    if not all(math.isfinite(v) for v in recs[-1]["x"] + recs[-1]["z"]):
        return math.nan
    pairs = list(itertools.pairwise(recs))
    return per_epoch(
        [b["t"] - a["t"] for a, b in pairs],
        [b["iter"] - a["iter"] for a, b in pairs],
        run["batch_size"],
        n_inner,
    )


def plot(problem: str, runs: list[dict[str, Any]], ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ref = run["framework"].startswith("jax")
        t = [max(r["t"], 1e-3) for r in run["records"]]
        m = [max(r["metric"], 1e-12) if math.isfinite(r["metric"]) else np.nan for r in run["records"]]
        ax.plot(t, m, ls="--" if ref else "-", marker="." if ref else None,
                label=f"{run['solver']} ({'benchmark, JAX' if ref else 'ours'})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time (s, one thread)")
    ax.set_ylabel(ylabel)
    ax.set_title(problem)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(t: float) -> str:
    return "—" if not math.isfinite(t) else f"{t:.2f}"


def report(name: str) -> str:
    problem = PROBLEMS[name]()
    runs: list[dict[str, Any]] = []
    for side in ("ours", "ours-exact", "ours-compile", "reference"):
        path = RESULTS / f"{side}_{name}.json"
        if path.exists():
            runs += json.loads(path.read_text())["runs"]
    if not runs:
        return f"{name}: no results in {RESULTS}\n"
    covtype = name == "covtype"
    h_star = optimum(problem)
    for run in runs:  # before score() thins the records
        run["s_per_epoch"] = epoch_time(run, problem.n_inner) if run["stochastic"] else math.nan
    score(problem, runs, h_star, val_error=covtype)
    ylabel = "relative suboptimality (h(x) - h*) / (h(x0) - h*)"
    plot(name, runs, ylabel, RESULTS / f"{name}.png")
    out = [f"### {name}\n"]
    head = "| solver | side | time to 1e-2 (s) | 1e-4 | 1e-6 | final subopt. | s / epoch |"
    rule = "|---|---|---|---|---|---|---|"
    if covtype:
        best = min(r["val_error"] for run in runs for r in run["records"])
        out.append(f"h* = {h_star:.10g} (minimum over x in {OPTIMUM_BOUNDS[name]}^7); lowest validation "
                   f"error reached: {best:.4f}.\n")  # fmt: skip
        head += f" final val. error | time to val. error <= {best + COVTYPE_SLACK:.4f} (s) |"
        rule += "---|---|"
    else:
        out.append(f"h* = {h_star:.10g}.\n")
    out += [head, rule]
    for run in runs:
        side = "benchmark (JAX)" if run["framework"].startswith("jax") else "ours"
        final = run["records"][-1]["metric"]
        cells = [fmt(time_to(run, lv)) for lv in LEVELS] + [f"{final:.2e}", fmt(run["s_per_epoch"])]
        if covtype:
            cells += [f"{run['records'][-1]['val_error']:.4f}",
                      fmt(time_to(run, best + COVTYPE_SLACK, "val_error"))]  # fmt: skip
        out.append(f"| {run['solver']} | {side} | " + " | ".join(cells) + " |")
    outside = [f"{run['solver']} ({run['outside_box']})" for run in runs if run["outside_box"]]
    if outside:
        out.append(
            "\nRecords outside the box of h* (their suboptimality is clamped at 0): " + ", ".join(outside)
        )
    pairs = []
    for s in ("SOBA", "SABA"):
        ours = [r for r in runs if r["solver"] == f"{s}-compile"] or [
            r for r in runs if r["solver"] == s and not r["framework"].startswith("jax")
        ]
        ref = [r for r in runs if r["solver"] == s and r["framework"].startswith("jax")]
        if ours and ref:
            a, b = ours[0]["s_per_epoch"], ref[0]["s_per_epoch"]
            pairs.append(f"{ours[0]['solver']} {a:.3f} s / {b:.3f} s = {a / b:.2f}x")
    if pairs:
        out.append("\nTime per epoch, ours / benchmark: " + "; ".join(pairs) + ".")
    out.append(f"\n![{name}](../results/bilevel_suite/{name}.png)\n")
    return "\n".join(out) + "\n"


def timing_report(names: list[str]) -> str:
    """The per-epoch table from ``timing_ours_<problem>*.json`` and ``timing_reference_<problem>*.json``.

    One row per problem and solver: the JAX scan's seconds per epoch, ours in each
    configuration with its ratio to JAX (the median over ``--repeats`` passes), and the best.
    """
    rows, configs = [], []
    for name in names:
        n_inner = PROBLEMS[name]().n_inner
        sides = {}
        for side in ("ours", "reference"):  # timing_<side>_<problem>[<suffix>].json: all passes
            for path in sorted(RESULTS.glob(f"timing_{side}_{name}*.json")):
                sides.setdefault(side, []).extend(json.loads(path.read_text())["runs"])
        if len(sides) < 2:
            continue
        cell: dict[tuple[str, str], list[float]] = {}
        finite: dict[tuple[str, str], bool] = {}
        for side, runs in sides.items():
            for run in runs:
                key = (run["solver"], run["config"])
                k = run["iters_per_window"]
                value = per_epoch(run["window_s"], [k] * len(run["window_s"]), run["batch_size"], n_inner)
                cell.setdefault(key, []).append(value)
                finite[key] = finite.get(key, True) and run["finite"]
                if side == "ours" and run["config"] not in configs:
                    configs.append(run["config"])
        for solver in ("SOBA", "SABA"):
            if (solver, "jax scan") not in cell:
                continue
            jax_s = float(np.median(cell[(solver, "jax scan")]))
            ours = {c: float(np.median(cell[(solver, c)])) for c in configs if (solver, c) in cell}
            flag = "" if all(f for (s, _), f in finite.items() if s == solver) else " (non-finite end)"
            best = min(ours, key=lambda c: ours[c]) if ours else None
            cells = [f"{ours[c]:.4f} ({ours[c] / jax_s:.2f}x)" if c in ours else "—" for c in configs]
            best_cell = f"{best}: **{ours[best] / jax_s:.2f}x**" if best else "—"
            rows.append(
                f"| {name} | {solver}{flag} | {jax_s:.4f} | " + " | ".join(cells) + f" | {best_cell} |"
            )
    head = (
        "| problem | solver | JAX (s / epoch) | "
        + " | ".join(f"ours {c}" for c in configs)
        + " | best / JAX |"
    )
    rule = "|---" * (4 + len(configs)) + "|"
    return "\n".join([head, rule, *rows]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="quadratic,ijcnn1,covtype")
    p.add_argument("--timing", action="store_true", help="the per-epoch table of the timing mode")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.timing:
        text = timing_report(a.problems.split(","))
        (RESULTS / "timing.md").write_text(text)
        print(text)
        return
    text = "".join(report(name) for name in a.problems.split(","))
    (RESULTS / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
