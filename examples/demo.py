"""The main job of ``make demo``: every result below is computed on this machine, on data the
project generates (no download), in a few minutes on 2 CPU cores.

1. A hypergradient through SciPy's L-BFGS-B, beside finite differences of re-solves.
2. Figure 2 of the iMAML paper, quick versions: (a) meta-gradient accuracy against inner steps
   on synthetic regression tasks, (b) compute and memory against inner steps for the Omniglot
   CNN (random images of Omniglot's shape).
3. Sinusoid regression: iMAML, MAML and first-order MAML against a jointly trained model.

Run: ``python examples/demo.py --out results/demo``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(title: str, cmd: list[str]) -> bool:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    ok = subprocess.run(cmd, cwd=ROOT).returncode == 0
    print(f"--- {'done' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f}s", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/demo", help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    py = sys.executable
    steps = [
        (
            "1. hypergradient through SciPy L-BFGS-B vs finite differences",
            [py, str(HERE / "hypergradient_check.py")],
            [],
        ),
        (
            "2a. Figure 2a: meta-gradient error vs inner GD steps (quick)",
            [py, str(HERE / "synthetic_meta_gradient.py"), "--quick", "--out", str(out / "fig2")],
            [out / "fig2" / "fig2a.png", out / "fig2" / "fig2a.csv"],
        ),
        (
            "2b. Figure 2b: time and memory vs inner GD steps, Omniglot CNN (quick)",
            [py, str(ROOT / "benchmarks" / "compute_memory.py"), "--quick", "--out", str(out / "fig2")],
            [out / "fig2" / "fig2b.png", out / "fig2" / "fig2b.csv"],
        ),
        (
            "3. sinusoid regression: iMAML vs MAML vs first-order MAML (quick)",
            [py, str(HERE / "sinusoid.py"), "--quick", "--out", str(out / "sinusoid")],
            [out / "sinusoid" / "sinusoid.png", out / "sinusoid" / "sinusoid.csv"],
        ),
    ]
    failed = []
    made: list[Path] = []
    for title, cmd, files in steps:
        if run(title, cmd):
            made += [f for f in files if f.exists()]
        else:
            failed.append(title)
    print("\n=== outputs")
    for f in made:
        print(f"  {f}")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
