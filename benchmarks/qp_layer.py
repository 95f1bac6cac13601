"""QPLayer against cvxpylayers and qpth: values, gradients and time per forward+backward.

The same random feasible QPs for all (float64, CPU, one thread):

    minimize 1/2 x'Qx + q'x  subject to  Gx <= h,      Q = L L'/n + 0.1 I,  m = n rows of G,

h = G x0 + s0 (s0 uniform in [0, 1]: feasible, with some constraints active at the optimum), every
input batched, loss sum(w * x) for a fixed random w, gradients with respect to q, G and h.
Implementations:

    bilevel     bilevel.layers.QPLayer() (interior point in torch, default tol 1e-9)
    qpth        qpth.qp.QPFunction(verbose=-1) (its batched PDIPM, eps 1e-12, 20 iterations)
    cvxpylayers CvxpyLayer over 1/2 ||L'x||^2 + q'x s.t. Gx <= h (diffcp + SCS), twice:
                solver_args={"eps": 1e-9, "mode": "dense"} (matched accuracy: diffcp's default
                derivative, mode="lsqr", is an iterative least-squares solve whose gradients
                were off by O(1) from finite differences of its own forward pass at n = 50),
                and the defaults; both with n_jobs_forward = n_jobs_backward = 1 (diffcp
                otherwise spreads a batch over a thread pool of every core)

Times: median over rounds of one forward+backward each, the implementations interleaved in each
round (order reversed every other round) so they see the same machine load.  cvxpylayers is
capped: at most ``--cvx-budget`` seconds per cell (at least one round), and skipped where
B x n exceeds ``--cvx-max-work`` (batch 256 at n = 200 by default: minutes per call).

Run (after ``bash benchmarks/peers/setup_qp.sh``; nothing is installed here):

    PYTHONPATH=. benchmarks/.venv-qp/bin/python benchmarks/qp_layer.py

Writes ``results/qp_layer/qp_layer.json`` and ``results/qp_layer/qp_layer.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bilevel.layers import QPLayer

Solve = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
F64 = torch.float64


def problems(B: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """B random feasible QPs with n variables and m = n inequalities."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = L @ L.mT / n + 0.1 * torch.eye(n, dtype=F64)
    q = torch.randn(B, n, generator=g, dtype=F64)
    G = torch.randn(B, n, n, generator=g, dtype=F64)
    x0 = torch.randn(B, n, generator=g, dtype=F64)
    s0 = torch.rand(B, n, generator=g, dtype=F64)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + s0
    return dict(Q=Q, q=q, G=G, h=h, w=torch.randn(B, n, generator=g, dtype=F64))


def bilevel_solver() -> Solve:
    layer = QPLayer()
    return lambda Q, q, G, h: layer(Q, q, G, h)


def qpth_solver() -> Solve:
    from qpth.qp import QPFunction

    empty = torch.empty(0, dtype=F64)
    return lambda Q, q, G, h: QPFunction(verbose=-1)(Q, q, G, h, empty, empty)


def cvxpylayers_solver(n: int, solver_args: dict[str, Any]) -> Solve:
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    x = cp.Variable(n)
    Lt = cp.Parameter((n, n))
    qp = cp.Parameter(n)
    Gp = cp.Parameter((n, n))
    hp = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lt @ x) + qp @ x), [Gp @ x <= hp])
    layer = CvxpyLayer(prob, parameters=[Lt, qp, Gp, hp], variables=[x])

    def solve(Q: torch.Tensor, q: torch.Tensor, G: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # Q = L L' and 1/2 ||L'x||^2 = 1/2 x'Qx; Q is a constant here (no gradient compared)
        Lt_val = torch.linalg.cholesky(Q.detach()).mT.contiguous()
        (xs,) = layer(Lt_val, q, G, h, solver_args=solver_args)
        return xs

    return solve


def run_once(
    solve: Solve, data: dict[str, torch.Tensor]
) -> tuple[float, float, torch.Tensor, list[torch.Tensor]]:
    """One forward+backward; returns (wall seconds, the process's CPU seconds, x, [dq, dG, dh]).

    CPU time is what a loaded machine leaves comparable: wall time then includes the waits for
    a core."""
    leaves = [data[k].clone().requires_grad_() for k in ("q", "G", "h")]
    t0, c0 = time.perf_counter(), time.process_time()
    x = solve(data["Q"], *leaves)
    (x * data["w"]).sum().backward()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return dt, dc, x.detach(), [t.grad for t in leaves]  # type: ignore[misc]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (fewer at large cells)")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per implementation and cell")
    ap.add_argument("--cvx-budget", type=float, default=30.0)
    ap.add_argument("--cvx-max-work", type=int, default=64 * 200, help="skip cvxpylayers above B * n")
    ap.add_argument(
        "--cells",
        nargs="+",
        default=None,
        metavar="BxN",
        help="only these cells, e.g. 1x10 64x50 (instead of --batches x --sizes)",
    )
    ap.add_argument("--out", default="results/qp_layer")
    args = ap.parse_args()
    torch.set_num_threads(1)

    versions = {}
    for name in ("torch", "cvxpy", "cvxpylayers", "diffcp", "qpth", "scs", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    if args.cells:
        grid = [(int(c.split("x")[0]), int(c.split("x")[1])) for c in args.cells]
    else:
        grid = [(B, n) for n in args.sizes for B in args.batches]
    cells = []
    for B, n in grid:
        data = problems(B, n, seed=1000 * n + B)
        impls: dict[str, Solve] = {"bilevel": bilevel_solver(), "qpth": qpth_solver()}
        skipped = []
        if B * n <= args.cvx_max_work:
            serial = {"n_jobs_forward": 1, "n_jobs_backward": 1}
            matched = {"eps": 1e-9, "mode": "dense", **serial}
            impls["cvxpylayers eps=1e-9"] = cvxpylayers_solver(n, matched)
            impls["cvxpylayers default"] = cvxpylayers_solver(n, serial)
        else:
            skipped = ["cvxpylayers eps=1e-9", "cvxpylayers default"]
        # accuracy: one call each (also the warm-up, not timed), against bilevel's answer
        _, _, ref_x, ref_g = run_once(impls["bilevel"], data)
        acc: dict[str, dict[str, float]] = {}
        times: dict[str, list[float]] = {k: [] for k in impls}
        cpu: dict[str, list[float]] = {k: [] for k in impls}
        for name, solve in impls.items():
            if name == "bilevel":
                continue
            _, _, x, g = run_once(solve, data)
            acc[name] = {
                "x": max_diff(x, ref_x),
                **{f"d{k}": max_diff(a, c) for k, a, c in zip("qGh", g, ref_g)},
            }
        # timing rounds, interleaved
        order = list(impls)
        for r in range(args.rounds):
            names = order if r % 2 == 0 else order[::-1]
            for name in names:
                budget = args.cvx_budget if name.startswith("cvxpylayers") else args.budget
                if sum(times[name]) > budget:
                    continue
                wall, cpu_s, _, _ = run_once(impls[name], data)
                times[name].append(wall)
                cpu[name].append(cpu_s)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        cell = {
            "B": B,
            "n": n,
            "m": n,
            "median_s": med,
            "rounds": {k: len(v) for k, v in times.items()},
            "speedup": {k: med[k] / med["bilevel"] for k in med if k != "bilevel"},
            "median_cpu_s": med_cpu,
            "speedup_cpu": {k: med_cpu[k] / med_cpu["bilevel"] for k in med_cpu if k != "bilevel"},
            "max_diff_vs_bilevel": acc,
            "skipped": skipped,
        }
        cells.append(cell)
        line = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items())
        line_cpu = ", ".join(
            f"{k} {1e3 * v:.2f} ms" + ("" if k == "bilevel" else f" ({v / med_cpu['bilevel']:.2f}x)")
            for k, v in med_cpu.items()
        )
        print(f"B={B:4d} n={n:4d}: {line}; CPU time: {line_cpu}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": "float64",
    }
    (out / "qp_layer.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2))
    (out / "qp_layer.md").write_text(table(cells, meta))
    print(table(cells, meta))


def table(cells: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    names = ["qpth", "cvxpylayers eps=1e-9", "cvxpylayers default"]  # the first: also mode="dense"
    head = "| B | n = m | bilevel (ms) | " + " | ".join(f"{k} (ms, x slower)" for k in names)
    head += " | max diff x / grad vs bilevel: qpth, cvx 1e-9, cvx default |"
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for c in cells:
        med, sp, acc = c["median_s"], c["speedup"], c["max_diff_vs_bilevel"]
        cols = [str(c["B"]), str(c["n"]), f"{1e3 * med['bilevel']:.1f}"]
        for k in names:
            cols.append(f"{1e3 * med[k]:.1f} ({sp[k]:.1f}x)" if k in med else "skipped")
        diffs = []
        for k in names:
            if k in acc:
                a = acc[k]
                diffs.append(f"{a['x']:.0e} / {max(a['dq'], a['dG'], a['dh']):.0e}")
            else:
                diffs.append("-")
        cols.append(", ".join(diffs))
        rows.append("| " + " | ".join(cols) + " |")
    v = meta["versions"]
    rows.append("")
    rows.append(
        f"float64, CPU, {meta['threads']} thread; torch {v['torch']}, qpth {v['qpth']}, cvxpylayers "
        f"{v['cvxpylayers']} (diffcp {v['diffcp']}, scs {v['scs']}; 'eps=1e-9' also mode='dense', both "
        "serial); median of interleaved rounds "
        "(rounds per cell in the JSON); 'x slower' = that implementation's time / bilevel's."
    )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
