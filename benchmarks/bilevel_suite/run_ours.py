"""Run this package's bilevel solvers on the suite's problems; record iterates against time.

Solvers (all float64, on one thread):

* exact implicit: `bilevel.hyperopt.minimize_hyper` with L-BFGS on x (torch.optim.LBFGS, strong
  Wolfe, ten iterations per step), each evaluation solving the inner problem on the full
  training set (oracles called with ``idx=None``: no gather) with
  `bilevel.solvers.NewtonCG` (warm-started) and the backward Hessian system with one of
  ``bl.CG()``, ``bl.CG(M=bl.HutchinsonDiagonal())`` (PCG) or ``bl.Nystrom(rank, rho)``;
* stochastic single-loop: `bilevel.hyperopt.SOBA`, `SABA`, `StocBiO` with batch 64 and the
  step sizes of the benchmark's ``config/*_best_params.yml`` (step_size for z and v,
  step_size / outer_ratio for x; SOBA's decreasing schedule 1/sqrt(t+1) as the benchmark's).

The records (time with evaluations excluded, iterations, x, z) go to JSON; ``report.py``
computes the metric for these and for ``run_reference.py``'s records the same way.  The
arrays are also written to ``results/bilevel_suite/data/<problem>.npz`` for the JAX runner.

Run::

    PYTHONPATH=. taskset -c 1 python -m benchmarks.bilevel_suite.run_ours --problem quadratic \\
        --max-time 60 --out results/bilevel_suite/ours_quadratic.json

Timing mode (``--timing``): SOBA and SABA in the configurations ``--configs`` (eager,
``compile=True``, ``compile=True, chunk=K``), ``--windows`` windows of ``EVAL_FREQ`` iterations
each at `TIMING_STEPS` (run_reference.py's ``--timing`` runs the JAX side the same way);
``report.py --timing`` turns both into seconds per epoch::

    PYTHONPATH=. taskset -c 0 python -m benchmarks.bilevel_suite.run_ours --problem covtype --timing \\
        --configs eager,compile,chunk16 --out results/bilevel_suite/timing_ours_covtype.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bilevel as bl
from bilevel import BilevelError
from bilevel import solvers as S
from bilevel.hyperopt import (
    SABA,
    SOBA,
    Decay,
    HyperProblem,
    HyperStep,
    StocBiO,
    StochasticBilevel,
    minimize_hyper,
)

from .problems import DATA_DIR as P_DATA
from .problems import PROBLEMS, SuiteProblem

# The benchmark's best parameters (config/quadratics_021424_best_params.yml,
# ijcnn1_best_params.yml, covtype_best_params.yml): (step_size, outer_ratio).  SOBA has none for
# the quadratic there; it takes SABA's, as run_reference.py does.  SABA has none for covtype:
# run_reference.py then runs the benchmark's SABA at its defaults (0.1, 1.0), and so do we.
BEST = {
    "quadratic": {"SOBA": (0.1, 1.0), "SABA": (0.1, 1.0), "StocBiO": (0.1, 1.0)},
    "ijcnn1": {"SOBA": (0.03125, 0.01), "SABA": (0.125, 1.0), "StocBiO": (0.125, 1.0)},
    "covtype": {"SOBA": (1.0, 0.01), "SABA": (0.1, 1.0), "StocBiO": (0.0625, 0.01)},
}
# The steps of the timing mode (``--timing``), the same in run_reference.py: the best ones,
# except SOBA on ijcnn1, whose best outer step (3.1) diverges on this data on both sides (the
# time of an iteration does not depend on the step while the iterates stay finite; it does
# once they are NaN, so the timing steps keep them finite).
TIMING_STEPS = {
    "quadratic": {"SOBA": (0.1, 1.0), "SABA": (0.1, 1.0)},
    "ijcnn1": {"SOBA": (0.03125, 1.0), "SABA": (0.125, 1.0)},
    "covtype": {"SOBA": (1.0, 0.01), "SABA": (0.1, 1.0)},
}
#: Our configurations the timing mode can run: name -> SOBA / SABA keyword arguments.
TIMING_CONFIGS: dict[str, dict[str, Any]] = {
    "eager": {},
    "compile": {"compile": True},
    **{f"chunk{k}": {"compile": True, "chunk": k} for k in (8, 16, 32, 64)},
    # the benchmark's batches: consecutive row blocks (the suite's rows are i.i.d., so in
    # random order), which its JAX solvers slice; the others draw a random partition
    **{
        f"{name}-blocks": {**options, "contiguous_batches": True}
        for name, options in (("eager", {}), ("chunk16", {"compile": True, "chunk": 16}))
    },
}
# Iterations between records (as run_reference.EVAL_FREQ).
EVAL_FREQ = {"quadratic": 64, "ijcnn1": 512, "covtype": 256}
EXACT = ("exact-CG", "exact-PCG", "exact-Nystrom")
STOCHASTIC = ("SOBA", "SABA", "StocBiO")

Snapshot = dict[str, Any]


def _full(problem: SuiteProblem, which: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    oracle = problem.inner if which == "inner" else problem.outer
    return lambda z, x: oracle(z, x, None)


def run_exact(problem: SuiteProblem, linear: str, max_time: float, max_outer: int = 200) -> list[Snapshot]:
    """minimize_hyper with L-BFGS on x; records after every inner solve."""
    dim = problem.dim_inner
    solvers = {
        "exact-CG": bl.CG(rtol=1e-10),
        "exact-PCG": bl.CG(rtol=1e-10, M=bl.HutchinsonDiagonal(probes=16)),
        # rank = dimension: a direct solve from dim HVPs (where Nystrom is exact); the damping
        # rho only guards the factorization.
        "exact-Nystrom": bl.Nystrom(rank=dim, rho=1e-10),
    }
    hp = HyperProblem(
        _full(problem, "inner"),
        _full(problem, "outer"),
        S.NewtonCG(newton_iters=50, cg_iters=min(dim, 200), tol=1e-10),
        linear_solver=solvers[linear],
        optimality_tol=1e-6,
    )
    records: list[Snapshot] = [dict(t=0.0, iter=0, x=problem.x0.tolist(), z=problem.z0.tolist())]
    clock = {"elapsed": 0.0, "t": time.perf_counter()}

    def callback(step: HyperStep) -> bool:
        clock["elapsed"] += time.perf_counter() - clock["t"]
        z = step.evaluation.params
        assert isinstance(z, torch.Tensor) and isinstance(step.hyper, torch.Tensor)
        records.append(dict(t=clock["elapsed"], iter=step.record.solve, x=step.hyper.tolist(), z=z.tolist()))
        clock["t"] = time.perf_counter()
        return clock["elapsed"] > max_time

    def lbfgs(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        # Ten iterations per optimizer step: torch's L-BFGS evaluates the closure at the start of
        # every step, so with max_iter=1 every step re-solves at the point its previous line
        # search accepted (twice the evaluations); the callback's stop then lands at the end of
        # a step, up to ten evaluations late.
        return torch.optim.LBFGS(
            params, lr=1.0, max_iter=10, line_search_fn="strong_wolfe", tolerance_grad=1e-12
        )

    # The optimizer's first construction imports torch._dynamo (seconds): once per process,
    # outside the clock, as Benchopt's warm-up takes JAX's compilation out.
    lbfgs([torch.zeros(1, requires_grad=True)])
    clock["t"] = time.perf_counter()
    try:
        x0, z0 = problem.x0.clone(), problem.z0.clone()
        minimize_hyper(hp, x0, z0, outer=lbfgs, steps=max_outer, callback=callback)
    except BilevelError as e:  # e.g. an inner solve that misses its tolerance: keep what was run
        print(f"{problem.name} {linear}: stopped by {type(e).__name__}: {str(e).splitlines()[0]}")
    return records


def run_stochastic(
    problem: SuiteProblem, name: str, max_time: float, seed: int, compile: bool = False
) -> list[Snapshot]:
    """One stochastic solver's records.

    With ``compile`` (SOBA, SABA: ``compile=True``) the first iteration compiles the step; a
    warm-up run does not help (each run compiles its own graph), so the compilation is taken out
    of the clock afterwards, as Benchopt's warm-up takes the JAX solvers' out: the first window
    of ``eval_every`` iterations is charged the second window's time, and every later record
    moves earlier by the difference (the compilation time, kept in the first record's
    ``compile_s``).
    """
    solver: Any
    if name in ("SOBA", "SABA"):
        solver = _solver(problem.name, name, BEST[problem.name][name], compile=compile)
    else:
        step, ratio = BEST[problem.name][name]
        solver = StocBiO(step, step / ratio, batch_size=64, n_inner_steps=10, n_neumann_steps=10)
    sp = StochasticBilevel(problem.inner, problem.outer, problem.n_inner, problem.n_outer)
    snaps: list[tuple[list[float], list[float]]] = []

    def grab(z: torch.Tensor, x: torch.Tensor) -> float:
        snaps.append((x.tolist(), z.tolist()))
        return float("nan")

    try:
        res = solver.run(
            sp, problem.z0.clone(), problem.x0.clone(), max_iter=10**9, seed=seed,
            eval_every=EVAL_FREQ[problem.name], time_limit=max_time, metric=grab,
        )  # fmt: skip
    except BilevelError as e:  # divergence with the benchmark's step sizes: say so, record nothing
        print(f"{problem.name} {name}: stopped by {type(e).__name__}: {str(e).splitlines()[0]}")
        return [dict(t=0.0, iter=0, x=problem.x0.tolist(), z=problem.z0.tolist())]
    if len(snaps) != len(res.history):
        raise RuntimeError(f"run_ours: {len(snaps)} snapshots for {len(res.history)} records")
    pairs = zip(res.history, snaps, strict=True)
    records = [dict(t=r.time, iter=r.iteration, x=x, z=z) for r, (x, z) in pairs]
    if compile and name != "StocBiO" and len(records) >= 3:
        compile_s = (records[1]["t"] - records[0]["t"]) - (records[2]["t"] - records[1]["t"])
        for r in records[1:]:
            r["t"] -= compile_s
        records[0]["compile_s"] = compile_s
    return records


def _solver(problem: str, name: str, steps: tuple[float, float], **options: Any) -> SOBA | SABA:
    step, ratio = steps
    common: dict[str, Any] = dict(inner_lr=step, outer_lr=step / ratio, batch_size=64, **options)
    if name == "SOBA":
        return SOBA(**common, inner_schedule=Decay(0.5), outer_schedule=Decay(0.5))
    return SABA(**common)


def time_stochastic(problem: SuiteProblem, name: str, config: str, windows: int, seed: int) -> Snapshot:
    """Time per epoch of SOBA or SABA in one of `TIMING_CONFIGS`, at the `TIMING_STEPS`.

    Runs ``windows`` windows of ``EVAL_FREQ`` iterations (the benchmark's scan length: one
    jitted call on its side) and records each window's solver time (records excluded).  The
    time per iteration is the median window time over the windows after the first, divided
    by the window length: the first window holds the compilation, and a later window holding
    the compilation of a shorter last batch's graph is an outlier the median leaves out.  The
    time per epoch is that times n_inner / 64 (iterations per epoch), as report.py computes
    it for run_reference.py's timing records.
    """
    solver = _solver(problem.name, name, TIMING_STEPS[problem.name][name], **TIMING_CONFIGS[config])
    sp = StochasticBilevel(problem.inner, problem.outer, problem.n_inner, problem.n_outer)
    every = EVAL_FREQ[problem.name]
    res = solver.run(
        sp, problem.z0.clone(), problem.x0.clone(), max_iter=windows * every, seed=seed, eval_every=every
    )
    t = [r.time for r in res.history]
    window_s = [b - a for a, b in itertools.pairwise(t)]
    finite = bool(torch.isfinite(res.x).all() and torch.isfinite(res.z).all())
    return dict(
        solver=name, config=config, steps=TIMING_STEPS[problem.name][name], batch_size=64,
        iters_per_window=every, window_s=window_s, finite=finite,
    )  # fmt: skip


def main_timing(a: argparse.Namespace, problem: SuiteProblem) -> None:
    """``--timing``: the configurations in turn, round-robin ``--repeats`` times (one process)."""
    names = [n for n in a.solvers.split(",") if n in ("SOBA", "SABA")] or ["SOBA", "SABA"]
    runs = []
    for rep in range(a.repeats):
        for name in names:
            for config in a.configs.split(","):
                run = time_stochastic(problem, name, config, a.windows, a.seed)
                w = sorted(run["window_s"][1:])
                ms = w[len(w) // 2] * 1e3
                print(f"{a.problem} {name} {config} (pass {rep}): median {ms:.1f} ms per "
                      f"{run['iters_per_window']} iterations, finite={run['finite']}",
                      flush=True)  # fmt: skip
                runs.append(run)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(problem=a.problem, side="ours", torch=torch.__version__, runs=runs)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", choices=sorted(PROBLEMS), required=True)
    p.add_argument("--solvers", default=",".join(EXACT + STOCHASTIC))
    p.add_argument("--max-time", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 s per solver: a smoke run")
    p.add_argument("--compile", action="store_true", help="SOBA and SABA with compile=True (warmed up)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timing", action="store_true",
                   help="time per epoch of SOBA / SABA (--solvers) in --configs, timing steps")  # fmt: skip
    p.add_argument("--configs", default="compile,chunk16,chunk32",
                   help=f"with --timing: of {sorted(TIMING_CONFIGS)}")  # fmt: skip
    p.add_argument("--windows", type=int, default=20, help="with --timing: windows of EVAL_FREQ iterations")
    p.add_argument("--repeats", type=int, default=1, help="with --timing: passes over the configurations")
    a = p.parse_args()
    torch.set_num_threads(1)
    problem = PROBLEMS[a.problem]()
    if not (P_DATA / f"{a.problem}.npz").exists():  # written once: a reader may be running
        problem.save_npz()
    if a.timing:
        main_timing(a, problem)
        return
    max_time = 3.0 if a.quick else a.max_time
    runs = []
    for name in a.solvers.split(","):
        if name in EXACT:
            records = run_exact(problem, name, max_time)
        elif name in STOCHASTIC:
            records = run_stochastic(problem, name, max_time, a.seed, a.compile)
        else:
            raise SystemExit(f"run_ours: unknown solver {name!r}; choose from {EXACT + STOCHASTIC}")
        print(f"{a.problem} {name}: {records[-1]['iter']} iterations in {records[-1]['t']:.1f} s", flush=True)
        runs.append(
            dict(solver=f"{name}-compile" if a.compile and name in ("SOBA", "SABA") else name,
                 framework="bilevel (torch)", stochastic=name in STOCHASTIC,
                 batch_size=64 if name in STOCHASTIC else None, records=records)
        )  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(problem=a.problem, torch=torch.__version__, runs=runs)))


if __name__ == "__main__":
    main()
