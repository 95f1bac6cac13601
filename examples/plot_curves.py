"""Learning curves of meta-training runs, drawn by the report command.

This script calls ``python -m bilevel.metalearn report RUN [RUN...] --out DIR``
(`bilevel.metalearn.training.report`), which writes test accuracy (or MSE) with its 95% band
against meta-steps and time, the training losses and the inner-solver and CG diagnostics, one PNG
each, several runs overlaid.  An ``--out`` ending in ``.png`` names a file: the PNGs go into that
file's folder.

Usage::

    python examples/plot_curves.py results/omniglot/fomaml-5w1s results/omniglot/imaml-gd-5w1s \\
        --out results/omniglot/curves
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bilevel.metalearn.training.report import main as report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with log.jsonl)")
    p.add_argument("--out", type=Path, default=Path("report"), help="folder for the PNGs")
    args = p.parse_args(argv)
    out = args.out.parent if args.out.suffix == ".png" else args.out
    return report(args.runs, out)


if __name__ == "__main__":
    raise SystemExit(main())
