"""Learning curves of meta-training runs with the report API (`bilevel.metalearn.training.report`).

The same as ``python -m bilevel.metalearn report RUN [RUN...] --out DIR``, written with the API a
script of your own would use: `read_runs` reads the run folders, `summarize` prints their
evaluations, `write_report` draws test accuracy (or MSE) with its 95% band against meta-steps and
time, the training losses and the inner-solver and CG diagnostics, one PNG each, several runs
overlaid.  An ``--out`` ending in ``.png`` names a file: the PNGs go into that
file's folder.

Usage::

    python examples/plot_curves.py results/omniglot/fomaml-5w1s results/omniglot/imaml-gd-5w1s \\
        --out results/omniglot/curves
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bilevel.metalearn.training.report import read_runs, summarize, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with log.jsonl)")
    p.add_argument("--out", type=Path, default=Path("report"), help="folder for the PNGs")
    args = p.parse_args(argv)
    out = args.out.parent if args.out.suffix == ".png" else args.out
    runs = read_runs(args.runs)
    print(summarize(runs))
    for path in write_report(runs, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
