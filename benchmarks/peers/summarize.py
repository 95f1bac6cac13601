"""Spread of the ratios of a ``bench.py`` run: per-round paired ratios, wall and CPU time.

``bench.py`` reports theirs / ours as the ratio of the two medians.  The calls of one comparison run
in alternating rounds, so the ratio can also be formed round by round (the two calls of a round
saw nearly the same load); this prints the median and the range of those paired ratios, and the
same for CPU time where the run recorded it.

Run: ``python benchmarks/peers/summarize.py results/peers/results.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    r = sorted(x / y for x, y in zip(a, b))
    return r[0], statistics.median(r), r[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    args = p.parse_args(argv)
    d = json.loads(args.results.read_text())
    print(
        "| section | case | ratio | of medians (wall) | paired: median [min, max] (wall) | of medians (CPU) |"
    )
    print("|---|---|---|---|---|---|")
    for c in d["comparisons"]:
        if c["section"] == "roofline":
            continue
        wall, cpu = c["samples"], c.get("cpu") or {}
        for o in [c["ours"], *c.get("also", [])]:
            for peer in c["peers"]:
                lo, med, hi = paired(wall[peer], wall[o])
                mm = statistics.median(wall[peer]) / statistics.median(wall[o])
                cm = f"{statistics.median(cpu[peer]) / statistics.median(cpu[o]):.2f}" if cpu else "-"
                head = f"| {c['section']} | {c['case']} | {peer} / {o} |"
                print(f"{head} {mm:.2f} | {med:.2f} [{lo:.2f}, {hi:.2f}] | {cm} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
