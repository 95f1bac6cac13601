"""Accuracy against CPU-minutes for every meta-learning algorithm: which to pick for a budget.

Each (algorithm, seed) is one training run of ``python -m bilevel.metalearn train`` at the task
format's preset (``--preset omniglot-5w1s`` or ``omniglot-20w1s``: each algorithm's own settings),
one thread, ``--clock cpu --time-limit MINUTES`` (the budget is the process's CPU time, evaluations
left out), evaluated on the first ``--eval-tasks`` fixed test tasks (600: the protocol's) each time
its clock passes a multiple of ``--every`` minutes (``--eval-every-minutes``).  A run is one
curve: its accuracy at 10 minutes is that of a run planned for ``MINUTES`` (a cosine schedule,
imaml-gd's preset, is then still early), not of a run planned for 10.

``run`` trains the missing runs, ``--jobs`` at a time (one per core, each pinned), and resumes a
run whose folder holds a checkpoint (``--resume``): the runs can be spread over several sessions.
``summary`` reads the runs' evaluations (a stopped or running run too) and writes
``summary.md``: per algorithm and mark, the accuracy of each seed (the first evaluation at or after
the mark, with its 95% interval over the test tasks) and their mean with the 95% interval of the
seeds' spread (t-distribution; one seed: its own interval); per mark, which algorithm is ahead
and which are level with it (`pick`); ``curves.png``, each algorithm's mean accuracy over its
seeds against CPU-minutes with the band of that interval; and ``report/``, the ``report``
command's figures of all runs overlaid (one colour per algorithm, a line style per seed).

Run (from the repository root; about 100 CPU-minutes per run)::

    python benchmarks/equal_compute.py run --task 5w1s --seeds 0 1 2 --jobs 2 \\
        --data-root ../shared/data --out results/equal_compute
    python benchmarks/equal_compute.py summary --task 5w1s --out results/equal_compute
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ALGOS = ("imaml-gd", "fomaml", "maml", "anil", "meta-sgd")
PRESETS = {"5w1s": "omniglot-5w1s", "20w1s": "omniglot-20w1s"}
# two-sided 95% t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def run_dir(out: Path, task: str, algo: str, seed: int) -> Path:
    return out / task / f"{algo}-s{seed}"


def command(args: argparse.Namespace, algo: str, seed: int) -> list[str]:
    """The training command of one run (``--resume`` where its folder holds a checkpoint)."""
    folder = run_dir(args.out, args.task, algo, seed)
    cmd = [
        sys.executable, "-m", "bilevel.metalearn", "train",
        "--preset", PRESETS[args.task], "--algo", algo, "--seed", str(seed),
        "--clock", "cpu", "--time-limit", str(args.minutes), "--meta-steps", "1000000000",
        "--eval-every-minutes", str(args.every), "--eval-tasks", str(args.eval_tasks),
        "--test-tasks", str(args.eval_tasks), "--threads", "1", "--checkpoint-every", "100",
        "--out", str(folder),
    ]  # fmt: skip
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if (folder / "checkpoint.pt").exists():
        cmd.append("--resume")
    return cmd


def finished(folder: Path) -> bool:
    return (folder / "metrics.json").exists() and not (folder / "run.lock").exists()


def cmd_run(args: argparse.Namespace) -> int:
    todo = [
        (a, s) for a in args.algos for s in args.seeds if not finished(run_dir(args.out, args.task, a, s))
    ]
    cores = sorted(os.sched_getaffinity(0))
    running: dict[int, tuple[subprocess.Popen[bytes], str, Any]] = {}
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            algo, seed = todo.pop(0)
            core = next(c for c in cores if c not in running)
            folder = run_dir(args.out, args.task, algo, seed)
            folder.mkdir(parents=True, exist_ok=True)
            log = (folder / "train.out").open("ab")
            pinned = ["taskset", "-c", str(core), *command(args, algo, seed)]
            proc = subprocess.Popen(pinned, stdout=log, stderr=log)
            running[core] = (proc, f"{algo} seed {seed}", log)
            print(f"started {algo} seed {seed} on core {core}: {folder}", flush=True)
        time.sleep(5)
        for core, (proc, name, log) in list(running.items()):
            if proc.poll() is not None:
                del running[core]
                log.close()
                print(f"{name}: exit code {proc.returncode}", flush=True)
                if proc.returncode != 0:
                    failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)} (see train.out in their folders)", file=sys.stderr)
    return 1 if failed else 0


def at_mark(evals: list[dict[str, Any]], minutes: float) -> dict[str, Any] | None:
    """The first evaluation at or after ``minutes`` of training (None: the run is not there yet)."""
    for e in evals:
        if e["time"] >= 60.0 * minutes - 1e-6:
            return e
    return None


def cmd_summary(args: argparse.Namespace) -> int:
    from bilevel.metalearn.training.report import read_run, write_report

    folders = [run_dir(args.out, args.task, a, s) for a in args.algos for s in args.seeds]
    runs = {f: read_run(f) for f in folders if (f / "log.jsonl").exists()}
    marks = args.marks
    lines = [
        f"# Equal CPU time, Omniglot {args.task} (preset {PRESETS[args.task]}), accuracy on "
        f"{args.eval_tasks} test tasks",
        "",
        "| algorithm | " + " | ".join(f"{m:g} CPU-min" for m in marks) + " |",
        "|---|" + "---|" * len(marks),
    ]
    stats: dict[float, dict[str, tuple[float, float, int]]] = {m: {} for m in marks}
    for algo in args.algos:
        cells = []
        for m in marks:
            started = any(run_dir(args.out, args.task, algo, s) in runs for s in args.seeds)
            per_seed = seeds_at(args, runs, algo, m)
            if per_seed:
                stats[m][algo] = (*mean_interval(per_seed), len(per_seed))
            cells.append(
                _cell(per_seed, stats[m][algo]) if per_seed else "not reached" if started else "not run"
            )
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean over the seeds run so far +- the 95% interval of their spread (one seed: its "
              "interval over the test tasks, percent); in brackets each seed's accuracy and meta-steps "
              "by then; not reached: the runs have not trained that long yet.", ""]  # fmt: skip
    for m in marks:
        lines.append(f"- {pick(m, stats[m], args.algos, len(args.seeds))}")
    out = args.out / args.task
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if runs:
        write_report(list(runs), out / "report")
        plot_curves(args, runs, out / "curves.png")
    return 0


def plot_curves(args: argparse.Namespace, runs: dict[Path, Any], path: Path) -> None:
    """Accuracy against CPU-minutes, one line per algorithm: at each evaluation mark, the mean over
    the seeds that reached it, with the band of its 95% interval (as in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    marks = [args.every * k for k in range(1, int(args.minutes / args.every + 1e-9) + 1)]
    for algo in args.algos:
        xs, means, halves, counts = [], [], [], []
        for m in marks:
            per_seed = seeds_at(args, runs, algo, m)
            if per_seed:
                mean, half = mean_interval(per_seed)
                xs.append(m)
                means.append(mean)
                halves.append(half)
                counts.append(len(per_seed))
        if xs:
            line = ax.plot(xs, means, "o-", ms=3.5, label=f"{algo} ({min(counts)}-{max(counts)} seeds)")
            lo = [a - h for a, h in zip(means, halves)]
            hi = [a + h for a, h in zip(means, halves)]
            ax.fill_between(xs, lo, hi, color=line[0].get_color(), alpha=0.15, lw=0)
    ax.set_xlabel("training CPU-minutes (one thread; evaluations not counted)")
    ax.set_ylabel(f"accuracy on {args.eval_tasks} test tasks (%)")
    ax.set_title(f"Omniglot {args.task}, each algorithm at its preset: mean over seeds, 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seeds_at(
    args: argparse.Namespace, runs: dict[Path, Any], algo: str, minutes: float
) -> list[tuple[int, float, float, int]]:
    """``(seed, accuracy, ci95, meta-steps)`` of each seed of ``algo`` that has reached ``minutes``."""
    rows = []
    for s in args.seeds:
        r = runs.get(run_dir(args.out, args.task, algo, s))
        e = at_mark(list(r.evals), minutes) if r is not None else None
        if e is not None:
            rows.append((s, e["accuracy"], e["ci95"], e["step"]))
    return rows


def mean_interval(per_seed: list[tuple[int, float, float, int]]) -> tuple[float, float]:
    """(mean accuracy, half-width of its 95% interval) over ``(seed, accuracy, ci95, steps)`` rows:
    the t interval of the seeds' spread, or one seed's own interval over the test tasks."""
    accs = [a for _, a, _, _ in per_seed]
    mean = statistics.fmean(accs)
    if len(accs) == 1:
        return mean, per_seed[0][2]
    return mean, T95.get(len(accs) - 1, 1.96) * statistics.stdev(accs) / math.sqrt(len(accs))


def _cell(per_seed: list[tuple[int, float, float, int]], stat: tuple[float, float, int]) -> str:
    mean, half, _ = stat
    seeds = ", ".join(f"s{s}: {a:.2f} ({n})" for s, a, _, n in per_seed)
    return f"{mean:.2f} +- {half:.2f} [{seeds}]"


def pick(minutes: float, at: dict[str, tuple[float, float, int]], algos: list[str], seeds: int) -> str:
    """Which algorithm is ahead at ``minutes``, from ``at[algo] = (mean, half-width, seeds)``.

    The leader has the highest mean; an algorithm whose 95% interval overlaps the leader's
    (|difference| <= the sum of the half-widths) is level with it.  Provisional until every
    algorithm has ``seeds`` seeds there.
    """
    if not at:
        return f"{minutes:g} CPU-min: no run has reached it"
    leader = max(at, key=lambda a: at[a][0])
    m, h, _ = at[leader]
    level = [a for a in at if a != leader and m - at[a][0] <= h + at[a][1]]
    fig = lambda a: f"{a} {at[a][0]:.2f} +- {at[a][1]:.2f}"  # noqa: E731
    text = f"{minutes:g} CPU-min: **{fig(leader)}** ahead"
    text += f", level with {', '.join(fig(a) for a in level)} (overlapping intervals)" if level else " of all"
    missing = [a for a in algos if at.get(a, (0, 0, 0))[2] < seeds]
    if missing:
        text += f"; provisional: {', '.join(missing)} short of {seeds} seeds"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("run", "summary"))
    p.add_argument("--task", choices=tuple(PRESETS), default="5w1s")
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=100.0, help="CPU-minutes per run")
    p.add_argument("--every", type=float, default=10.0, help="CPU-minutes between evaluations")
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--marks", nargs="+", type=float, default=[10.0, 30.0, 100.0],
                   help="summary: the CPU-minutes of the table's columns")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one per core")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", type=Path, default=Path("results/equal_compute"))
    args = p.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_summary(args)


if __name__ == "__main__":
    raise SystemExit(main())
