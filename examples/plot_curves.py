"""Learning curves of meta-training runs side by side: test accuracy against meta-steps and time.

Reads each run folder's ``log.jsonl`` (written during training, so a running or stopped run works
too) and, where present, ``metrics.json`` for the final 600-task accuracy.  Plots the periodic
accuracy on the fixed test tasks (``--eval-every``) with its 95% interval, against meta-steps and
against the training clock (``time``: wall or CPU seconds, whichever the run used), and prints a
table of the same numbers.

Usage::

    python examples/plot_curves.py results/omniglot/fomaml-5w1s results/omniglot/imaml-gd-5w1s \\
        --out results/omniglot/curves.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def read_run(folder: Path) -> dict[str, Any]:
    """``{"name", "clock", "eval": [{step, time, accuracy, ci95}], "final": metrics or None}``."""
    log = folder / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(
            f"{log} not found: pass a folder written by `python -m bilevel.metalearn train`"
        )
    evals = []
    for line in log.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if "eval" in rec:
            evals.append(rec["eval"])
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    metrics_path = folder / "metrics.json"
    final = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    return {"name": folder.name, "clock": cfg.get("clock", "wall"), "eval": evals, "final": final}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with log.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="write the figure here (PNG)")
    args = p.parse_args(argv)
    runs = [read_run(f) for f in args.runs]
    for r in runs:
        print(f"{r['name']} (clock: {r['clock']})")
        for e in r["eval"]:
            print(
                f"  step {e['step']:6d}  {e['time'] / 60:7.1f} min  {e['accuracy']:6.2f} +- {e['ci95']:.2f} %"
            )
        if r["final"]:
            f = r["final"]
            print(
                f"  final: {f['test_accuracy']:.2f} +- {f['test_ci95']:.2f} % on {f['test_tasks']} tasks "
                f"after {f['meta_steps_done']} steps, {f['train_seconds'] / 60:.1f} min"
            )
    if args.out is None:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in runs:
        ev = r["eval"]
        if not ev:
            continue
        acc = [e["accuracy"] for e in ev]
        lo = [e["accuracy"] - e["ci95"] for e in ev]
        hi = [e["accuracy"] + e["ci95"] for e in ev]
        for ax, xs in ((axes[0], [e["step"] for e in ev]), (axes[1], [e["time"] / 60 for e in ev])):
            (line,) = ax.plot(xs, acc, marker="o", label=r["name"])
            ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
    clocks = {r["clock"] for r in runs}
    axes[0].set_xlabel("meta-steps")
    axes[1].set_xlabel(f"training time (min, {'/'.join(sorted(clocks))} clock)")
    axes[0].set_ylabel("test accuracy on the fixed test tasks (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.axhline(95, color="grey", lw=0.8, ls="--")
    axes[0].legend()
    lo_all = [e["accuracy"] for r in runs for e in r["eval"]]
    if lo_all:
        axes[0].set_ylim(max(0.0, math.floor(min(lo_all) / 10) * 10), 100)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
