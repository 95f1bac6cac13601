"""Run Benchopt benchmark_bilevel's own JAX solvers on the suite's offline problems.

The solvers are the benchmark's files as they are (``solvers/soba.py``, ``saba.py``,
``amigo.py``, ``jaxopt_gd.py``, ``jaxopt_itd.py`` with ``benchmark_utils/``), imported from a
copy of the benchmark that you point to; the oracles are built the way its ``datasets/*.py``
build them (``get_function`` of ``simulated.py``, the module-level ``loss`` of ``ijcnn1.py`` and
``covtype.py``, sliced with ``jax.lax.dynamic_slice``) on the arrays that
``problems.py`` wrote to ``results/bilevel_suite/data/<problem>.npz``.  Nothing is downloaded.

Benchopt itself is not needed: small shims stand in for ``benchopt.BaseSolver`` (parameters
as attributes, ``run_once``), ``BaseDataset``, ``safe_import_context`` and
``SufficientProgressCriterion``, and for the dataset files' unused imports (``joblib``,
``libsvmdata``, ``sklearn``) when those are not installed.  As in Benchopt, the solver is
compiled by its own ``set_objective`` warm-up (``run_once(2)``) before the clock starts, and
the time spent in the callback (copying the iterates out) is not counted.

Precision is float64 (``jax_enable_x64``), like our runs; XLA runs single-threaded.

Run (in the env with jax and jaxopt)::

    git -C /work/.mirror/benchopt+benchmark_bilevel/repo archive HEAD | tar -x -C results/benchmark_bilevel
    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 \\
      benchmarks/.venv-peers/bin/python benchmarks/bilevel_suite/run_reference.py \\
      --benchmark-dir results/benchmark_bilevel --problem quadratic --max-time 60 \\
      --out results/bilevel_suite/reference_quadratic.json

Output: JSON with, per solver, its parameters and records (time, iterations, x, z).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
import time
import types
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

# Iterations between two records of a stochastic solver (the scan length of one jitted call).
EVAL_FREQ = {"quadratic": 64, "ijcnn1": 512, "covtype": 256}
BEST_PARAMS_FILE = {
    "quadratic": "quadratics_021424_best_params.yml",
    "ijcnn1": "ijcnn1_best_params.yml",
    "covtype": "covtype_best_params.yml",
}
# The steps of the timing mode (``--timing``): (step_size, outer_ratio), the same as
# run_ours.TIMING_STEPS (this runner's interpreter has no torch to import them from).
TIMING_STEPS = {
    "quadratic": {"SOBA": (0.1, 1.0), "SABA": (0.1, 1.0)},
    "ijcnn1": {"SOBA": (0.03125, 1.0), "SABA": (0.125, 1.0)},
    "covtype": {"SOBA": (1.0, 0.01), "SABA": (0.1, 1.0)},
}
SOLVER_FILES = {
    "SOBA": "soba", "SABA": "saba", "AmIGO": "amigo", "jaxopt_GD": "jaxopt_gd", "jaxopt_ITD": "jaxopt_itd",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Shims for benchopt (and for the dataset files' unused imports)


class _BaseSolver:
    parameters: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self, **kwargs: Any) -> None:
        for k, v in self.parameters.items():
            setattr(self, k, v[0])
        for k, v in kwargs.items():
            setattr(self, k, v)

    def run_once(self, stop_val: int = 1) -> None:
        count = 0

        def callback() -> bool:
            nonlocal count
            count += 1
            return count <= stop_val

        self.run(callback)  # type: ignore[attr-defined]


class _SufficientProgressCriterion:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@contextlib.contextmanager
def _safe_import_context() -> Any:
    yield types.SimpleNamespace(failed_import=False)


def _install_shims() -> None:
    benchopt = types.ModuleType("benchopt")
    benchopt.BaseSolver = _BaseSolver  # type: ignore[attr-defined]
    benchopt.BaseDataset = object  # type: ignore[attr-defined]
    benchopt.BaseObjective = object  # type: ignore[attr-defined]
    benchopt.safe_import_context = _safe_import_context  # type: ignore[attr-defined]
    stop = types.ModuleType("benchopt.stopping_criterion")
    stop.SufficientProgressCriterion = _SufficientProgressCriterion  # type: ignore[attr-defined]
    benchopt.stopping_criterion = stop  # type: ignore[attr-defined]
    sys.modules["benchopt"] = benchopt
    sys.modules["benchopt.stopping_criterion"] = stop

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("run_reference: this runner is offline; the data come from the suite's .npz")

    def maybe(name: str, **attrs: Any) -> None:
        try:
            importlib.import_module(name)
        except ImportError:
            mod = types.ModuleType(name)
            for k, v in attrs.items():
                setattr(mod, k, v)
            sys.modules[name] = mod

    class _Memory:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def cache(self, f: Any) -> Any:
            return f

    maybe("joblib", Memory=_Memory)
    maybe("libsvmdata", fetch_libsvm=offline)
    maybe("sklearn")
    maybe("sklearn.datasets", fetch_covtype=offline)
    maybe("sklearn.model_selection", train_test_split=offline)
    maybe("sklearn.preprocessing", StandardScaler=offline, OneHotEncoder=offline)


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"run_reference: cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# The problems, built as the benchmark's datasets build them


def build_problem(bench: Path, name: str, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """``set_objective``'s arguments (f_inner, f_outer, sample counts, start) for problem ``name``."""
    from functools import partial

    z0, x0 = jnp.asarray(data["z0"]), jnp.asarray(data["x0"])
    if name == "quadratic":
        sim = _load(bench / "datasets" / "simulated.py", "bb_simulated")
        keys = ("hess_inner", "hess_outer", "cross", "linear_inner", "linear_outer")
        f_inner = sim.get_function(*(jnp.asarray(data[f"inner_{k}"]) for k in keys))
        f_outer = sim.get_function(*(jnp.asarray(data[f"outer_{k}"]) for k in keys))
        n_in, n_out = data["inner_hess_inner"].shape[0], data["outer_hess_inner"].shape[0]
        return dict(f_inner=f_inner, f_outer=f_outer, n_inner_samples=n_in, n_outer_samples=n_out,
                    inner_var0=z0, outer_var0=x0)  # fmt: skip
    Xtr, ytr = jnp.asarray(data["X_train"]), jnp.asarray(data["y_train"])
    Xv, yv = jnp.asarray(data["X_val"]), jnp.asarray(data["y_val"])
    mod = _load(bench / "datasets" / f"{name}.py", f"bb_{name}")
    loss = mod.loss
    multi = ytr.ndim == 2

    def sl(X: Any, y: Any, start: Any, batch_size: int) -> tuple[Any, Any]:
        x = jax.lax.dynamic_slice(X, (start, 0), (batch_size, X.shape[1]))
        if multi:
            return x, jax.lax.dynamic_slice(y, (start, 0), (batch_size, y.shape[1]))
        return x, jax.lax.dynamic_slice(y, (start,), (batch_size,))

    n_features = Xtr.shape[1]
    n_classes = ytr.shape[1] if multi else 1

    # The bodies of datasets/ijcnn1.py's and datasets/covtype.py's f_inner / f_outer
    # (reg_parametrization='exp').
    @partial(jax.jit, static_argnames=("batch_size",))
    def f_inner(inner_var: Any, outer_var: Any, start: Any = 0, batch_size: int = 1) -> Any:
        x, y = sl(Xtr, ytr, start, batch_size)
        res = loss(inner_var, outer_var, x, y)
        if multi:
            iv = inner_var.reshape(n_features, n_classes)
            res += 0.5 * jnp.exp(outer_var) @ (iv * iv).sum(axis=0)
        else:
            res += jnp.dot(jnp.exp(outer_var) * inner_var, inner_var) / 2
        return res

    @partial(jax.jit, static_argnames=("batch_size",))
    def f_outer(inner_var: Any, outer_var: Any, start: Any = 0, batch_size: int = 1) -> Any:
        x, y = sl(Xv, yv, start, batch_size)
        return loss(inner_var, outer_var, x, y)

    return dict(f_inner=f_inner, f_outer=f_outer, n_inner_samples=Xtr.shape[0], n_outer_samples=Xv.shape[0],
                inner_var0=z0, outer_var0=x0)  # fmt: skip


def best_params(bench: Path, problem: str, solver: str) -> dict[str, Any]:
    """The solver's entry in ``config/<problem>_best_params.yml`` (step_size, outer_ratio, ...).

    SOBA has no entry for the quadratic there: it takes SABA's (the same two step sizes).
    """
    text = (bench / "config" / BEST_PARAMS_FILE[problem]).read_text()
    for name in (solver, "SABA"):
        m = re.search(rf"^\s*-\s*{name}\[(.*)\]\s*$", text, re.M)
        if m:
            break
    else:
        return {}
    params: dict[str, Any] = {}
    for key in ("step_size", "outer_ratio", "n_inner_steps", "batch_size"):
        km = re.search(rf"\b{key}=([0-9.e-]+)", m.group(1))
        if km:
            val = float(km.group(1))
            params[key] = int(val) if key in ("n_inner_steps", "batch_size") else val
    return params


def run_solver(
    bench: Path, problem: str, solver_name: str, obj: dict[str, Any], max_time: float, seed: int
) -> dict[str, Any]:
    mod = _load(bench / "solvers" / f"{SOLVER_FILES[solver_name]}.py", f"bb_solver_{solver_name}")
    stochastic = solver_name in ("SOBA", "SABA", "AmIGO")
    if stochastic:
        params = best_params(bench, problem, solver_name)
        params.update(eval_freq=EVAL_FREQ[problem], random_state=seed)
        if solver_name == "SABA":
            params["mode_init_memory"] = "zero"
    elif solver_name == "jaxopt_ITD":
        params = dict(inner_solver="gd", step_size_outer=10, n_inner_steps=10, warm_start=True)
    else:
        params = dict(inner_solver="gd", step_size_outer=10, n_inner_steps=100)
    solver = mod.Solver(**params)
    t0 = time.perf_counter()
    solver.set_objective(**obj)  # compiles, and runs 2 epochs to warm up (as Benchopt)
    compile_s = time.perf_counter() - t0

    records: list[dict[str, Any]] = []
    state = {"elapsed": 0.0, "calls": 0, "t": time.perf_counter()}
    per_call = EVAL_FREQ[problem] if stochastic else 1

    def callback() -> bool:
        jax.block_until_ready((solver.inner_var, solver.outer_var)) if state["calls"] else None
        now = time.perf_counter()
        if state["calls"]:
            state["elapsed"] += now - state["t"]
        x = np.asarray(solver.outer_var if state["calls"] else obj["outer_var0"], dtype=np.float64)
        z = np.asarray(solver.inner_var if state["calls"] else obj["inner_var0"], dtype=np.float64)
        records.append(dict(t=state["elapsed"], iter=state["calls"] * per_call, x=x.tolist(), z=z.tolist()))
        state["calls"] += 1
        go = state["elapsed"] < max_time and bool(np.all(np.isfinite(x)))
        state["t"] = time.perf_counter()
        return go

    solver.run(callback)
    return dict(
        solver=solver_name, framework="jax (benchmark_bilevel)", params=params, stochastic=stochastic,
        batch_size=int(getattr(solver, "batch_size", 0)) if stochastic else None,
        compile_s=compile_s, records=records,
    )  # fmt: skip


def time_solver(
    bench: Path, problem: str, solver_name: str, obj: dict[str, Any], windows: int, seed: int
) -> dict[str, Any]:
    """Time per window of ``EVAL_FREQ`` iterations (one jitted ``lax.scan`` call) of the
    benchmark's SOBA or SABA at the timing steps, compiled beforehand (Benchopt's warm-up).

    Each window is timed to ``block_until_ready`` on the iterates; report.py turns the median
    over the windows after the first into a time per epoch as for run_ours.py's records.
    """
    mod = _load(bench / "solvers" / f"{SOLVER_FILES[solver_name]}.py", f"bb_solver_{solver_name}")
    step, ratio = TIMING_STEPS[problem][solver_name]
    params: dict[str, Any] = dict(step_size=step, outer_ratio=ratio, batch_size=64,
                                  eval_freq=EVAL_FREQ[problem], random_state=seed)  # fmt: skip
    if solver_name == "SABA":
        params["mode_init_memory"] = "zero"
    solver = mod.Solver(**params)
    solver.set_objective(**obj)
    window_s: list[float] = []
    state = {"calls": 0, "t": 0.0}

    def callback() -> bool:
        if state["calls"]:
            jax.block_until_ready((solver.inner_var, solver.outer_var))
            window_s.append(time.perf_counter() - state["t"])
        state["calls"] += 1
        state["t"] = time.perf_counter()
        return state["calls"] <= windows

    solver.run(callback)
    finite = all(bool(np.isfinite(np.asarray(t)).all()) for t in (solver.outer_var, solver.inner_var))
    return dict(solver=solver_name, config="jax scan", steps=[step, ratio], batch_size=solver.batch_size,
                iters_per_window=EVAL_FREQ[problem], window_s=window_s, finite=finite)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark-dir", type=Path, required=True, help="a copy of benchmark_bilevel")
    p.add_argument("--problem", choices=sorted(EVAL_FREQ), required=True)
    p.add_argument("--data-dir", type=Path, default=Path("results/bilevel_suite/data"))
    p.add_argument("--solvers", default="SOBA,SABA,AmIGO,jaxopt_GD,jaxopt_ITD")
    p.add_argument("--max-time", type=float, default=60.0, help="seconds per solver (solver time only)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 s per solver: a smoke run")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timing", action="store_true", help="time per epoch of SOBA / SABA at the timing steps")
    p.add_argument("--windows", type=int, default=20, help="with --timing: windows of EVAL_FREQ iterations")
    p.add_argument("--repeats", type=int, default=1, help="with --timing: passes over the solvers")
    a = p.parse_args()
    bench = a.benchmark_dir.resolve()
    if not (bench / "solvers" / "soba.py").exists():
        raise SystemExit(f"run_reference: {bench} is not a copy of benchmark_bilevel (no solvers/soba.py)")
    npz = a.data_dir / f"{a.problem}.npz"
    if not npz.exists():
        raise SystemExit(f"run_reference: {npz} missing: run `python -m benchmarks.bilevel_suite.run_ours "
                         f"--problem {a.problem}` (or problems.py's save_npz) first")  # fmt: skip
    _install_shims()
    sys.path.insert(0, str(bench))
    data = dict(np.load(npz))
    obj = build_problem(bench, a.problem, data)
    if a.timing:
        names = [n for n in a.solvers.split(",") if n in ("SOBA", "SABA")] or ["SOBA", "SABA"]
        runs = []
        for rep in range(a.repeats):
            for name in names:
                run = time_solver(bench, a.problem, name, obj, a.windows, a.seed)
                w = sorted(run["window_s"][1:])
                ms = w[len(w) // 2] * 1e3
                print(f"{a.problem} {name} jax (pass {rep}): median {ms:.2f} ms per "
                      f"{run['iters_per_window']} iterations, finite={run['finite']}",
                      flush=True)  # fmt: skip
                runs.append(run)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        out = dict(problem=a.problem, side="reference", jax=jax.__version__, runs=runs)
        a.out.write_text(json.dumps(out))
        return
    max_time = 3.0 if a.quick else a.max_time
    runs = []
    for name in a.solvers.split(","):
        run = run_solver(bench, a.problem, name, obj, max_time, a.seed)
        last = run["records"][-1]
        print(f"{a.problem} {name}: {last['iter']} iterations in {last['t']:.1f} s", flush=True)
        runs.append(run)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(problem=a.problem, jax=jax.__version__, runs=runs)))


if __name__ == "__main__":
    main()
