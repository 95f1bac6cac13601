"""Speedup of meta-training with 2 torch.distributed ranks (gloo, CPU) over 1 process.

Both runs do the same work: the same meta-steps, meta-batch and tasks (rank r of N takes tasks
r, r + N, ... of every meta-batch), one intra-op thread per process.  The time per meta-step is
read from the runs' own logs (the median over logged intervals, so start-up and data loading
are excluded), and both runs happen in this one invocation (the machine is shared and noisy:
compare ratios measured together, not figures from different days).

Run: ``python benchmarks/distributed_speedup.py --data-root ../shared/data/omniglot``
(without ``--data-root``: sinusoid tasks, where per-step overhead dominates and the speedup
is smaller).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step_seconds(run_dir: Path) -> float:
    """Median wall seconds per meta-step between consecutive log records."""
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "step" in r]
    per = [(b["wall_time"] - a["wall_time"]) / (b["step"] - a["step"]) for a, b in itertools.pairwise(recs)]
    return statistics.median(per)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="Omniglot folder (default: sinusoid tasks)")
    p.add_argument("--algo", default="imaml-gd")
    p.add_argument("--meta-steps", type=int, default=30)
    p.add_argument("--meta-batch", type=int, default=16)
    args = p.parse_args(argv)
    common = [
        "train",
        "--algo",
        args.algo,
        "--meta-steps",
        str(args.meta_steps),
        "--meta-batch",
        str(args.meta_batch),
        "--test-tasks",
        "1",
        "--log-every",
        "5",
        "--threads",
        "1",
        "--no-progress",
        "--checkpoint-every",
        "0",
    ]
    if args.data_root:
        common += ["--preset", "paper-omniglot-5w1s", "--data-root", args.data_root]
    else:
        common += ["--dataset", "sinusoid", "--shots", "5", "--queries", "10", "--inner-lr", "0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = Path(tmp) / f"n{n}"
            launcher = (
                [sys.executable, "-m", "bilevel.metalearn"]
                if n == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nproc_per_node={n}",
                    "--master_addr=127.0.0.1",
                    f"--master_port={_port()}",
                    "-m",
                    "bilevel.metalearn",
                ]
            )
            subprocess.run(
                [*launcher, *common, "--out", str(out)], check=True, env=env, stdout=subprocess.DEVNULL
            )
            results[n] = step_seconds(out)
    speedup = results[1] / results[2]
    task = "Omniglot 5-way 1-shot" if args.data_root else "sinusoid 5-shot"
    print(
        f"{args.algo}, {task}, meta-batch {args.meta_batch}: "
        f"1 process {results[1]:.3f} s/step, 2 gloo ranks {results[2]:.3f} s/step, speedup {speedup:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
