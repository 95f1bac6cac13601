"""Time per iteration of SOBA and SABA: ours (eager, compiled, chunked) beside the JAX reference.

The problem has ijcnn1's shape: logistic regression with one L2 weight per feature,

    inner  G(z, x) = mean_i log(1 + exp(-y_i a_i.z)) + 0.5 sum_k exp(x_k) z_k^2   (n = 49,990)
    outer  F(z, x) = mean_j log(1 + exp(-y'_j a'_j.z))                           (m = 91,701)

with d = 22 features, on synthetic data (features uniform in [-1, 1], labels from a random
linear model with 10 % flipped), float64, batches of 64 on both levels; one epoch is
ceil(n / 64) = 782 iterations.

The reference is Benchopt's ``benchmark_bilevel`` as its solvers run it: the iteration bodies
of ``solvers/soba.py`` and ``solvers/saba.py`` (``soba_one_iter``, ``saba_one_iter`` and
``variance_reduction``, copied here as they are written), its own mini-batch sampler and step
size scheduler (imported from the benchmark's ``benchmark_utils``), and the loss of
``datasets/ijcnn1.py`` (contiguous batches cut by ``jax.lax.dynamic_slice``), run as the
benchmark runs them: ``eval_freq`` iterations per jitted ``jax.lax.scan`` call.  Compilation is
done before the clock starts.

Ours: ``SOBA`` / ``SABA`` ``.run`` with ``compile=False`` (eager), ``compile=True``
(one compiled call per iteration) and ``compile=True, chunk=K``.  The time per iteration is
taken from the run's own records between iteration ``warm`` (after every graph has been
compiled: both levels have seen their shorter last batch) and the end, so compilation is
excluded; it is reported on its own as the first-call cost.

Both sides run on one thread (``torch.set_num_threads(1)``; XLA with
``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``), in the same run; the
JAX side runs in its own interpreter (the environment with jax), started by this script.

Run (from the repository root)::

    mkdir -p results/benchmark_bilevel && \\
      git -C /work/.mirror/benchopt+benchmark_bilevel/repo archive HEAD | tar -x -C results/benchmark_bilevel
    taskset -c 0 .venv/bin/python benchmarks/stochastic_speed.py \\
      --benchmark-dir results/benchmark_bilevel --peers-python benchmarks/.venv-peers/bin/python

Output: one table (µs per iteration, ms per epoch, first-call seconds) on stdout; ``--json``
writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

N_INNER, N_OUTER, DIM, BATCH = 49_990, 91_701, 22, 64
INNER_LR, OUTER_LR = 0.05, 0.005
EPOCH = math.ceil(N_INNER / BATCH)


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    """The synthetic ijcnn1-shaped data set (the same arrays in both interpreters)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=DIM)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        a = rng.uniform(-1.0, 1.0, size=(n, DIM))
        y = np.sign(a @ w + 1e-12)
        flip = rng.random(n) < 0.1
        return a, np.where(flip, -y, y)

    a, y = part(N_INNER)
    a2, y2 = part(N_OUTER)
    return {"a": a, "y": y, "a2": a2, "y2": y2}


# ------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------


def run_ours(ks: list[int], warm: int, measured: int, eager_iters: int) -> list[dict[str, Any]]:
    import torch

    from bilevel.hyperopt import SABA, SOBA, StochasticBilevel, StochasticRecord

    torch.set_num_threads(1)
    d = {k: torch.tensor(v) for k, v in make_data().items()}
    a, y, a2, y2 = d["a"], d["y"], d["a2"], d["y2"]

    def inner(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        margin = y[idx] * (a[idx] @ z)
        return torch.nn.functional.softplus(-margin).mean() + 0.5 * (x.exp() * z * z).sum()

    def outer(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-(y2[idx] * (a2[idx] @ z))).mean()

    problem = StochasticBilevel(inner, outer, N_INNER, N_OUTER)
    z0 = torch.zeros(DIM, dtype=torch.float64)
    x0 = torch.zeros(DIM, dtype=torch.float64)
    rows = []
    for solver in (SOBA, SABA):
        configs: list[tuple[str, dict[str, Any]]] = [("eager", {}), ("compiled", {"compile": True})]
        configs += [(f"chunk={k}", {"compile": True, "chunk": k}) for k in ks]
        for mode, kw in configs:
            recs: list[StochasticRecord] = []
            if mode == "eager":
                every, total = eager_iters, 2 * eager_iters
            else:
                every, total = warm, warm + measured

            def keep(rec: StochasticRecord, recs: list[StochasticRecord] = recs) -> None:
                recs.append(rec)

            solver_obj = solver(INNER_LR, OUTER_LR, batch_size=BATCH, **kw)
            tic = time.perf_counter()
            res = solver_obj.run(problem, z0, x0, max_iter=total, eval_every=every, callback=keep)
            wall = time.perf_counter() - tic
            # records at 0, every, 2 every, ...: the time from the first record after iteration
            # 0 (compilation and first shapes behind) to the end
            first = recs[1]
            last = recs[-1]
            us = 1e6 * (last.time - first.time) / (last.iteration - first.iteration)
            rows.append(
                {
                    "solver": solver.__name__,
                    "impl": f"ours {mode}",
                    "us_per_iter": us,
                    "ms_per_epoch": us * EPOCH / 1e3,
                    "first_call_s": first.time - us * 1e-6 * first.iteration,
                    "wall_s": wall,
                    "final_outer_loss": last.outer_loss,
                    "finite": bool(torch.isfinite(res.x).all()),
                }
            )
            print(_fmt(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------------------
# The JAX reference (run in the peers interpreter with --mode jax)
# ------------------------------------------------------------------------------------------


def run_jax(bench: Path, eval_freq: int, calls: int) -> list[dict[str, Any]]:
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(bench))
    from benchmark_utils.learning_rate_scheduler import init_lr_scheduler, update_lr
    from benchmark_utils.minibatch_sampler import init_sampler

    data = {k: jnp.asarray(v) for k, v in make_data().items()}
    x_train, y_train, x_val, y_val = data["a"], data["y"], data["a2"], data["y2"]

    # datasets/ijcnn1.py
    def loss_sample(inner_var: Any, outer_var: Any, x: Any, y: Any) -> Any:
        return -jax.nn.log_sigmoid(y * jnp.dot(inner_var, x))

    def loss(inner_var: Any, outer_var: Any, X: Any, y: Any) -> Any:
        batched_loss = jax.vmap(loss_sample, in_axes=(None, None, 0, 0))
        return jnp.mean(batched_loss(inner_var, outer_var, X, y), axis=0)

    def f_inner(inner_var: Any, outer_var: Any, start: Any = 0, batch_size: int = BATCH) -> Any:
        x = jax.lax.dynamic_slice(x_train, (start, 0), (batch_size, x_train.shape[1]))
        y = jax.lax.dynamic_slice(y_train, (start,), (batch_size,))
        res = loss(inner_var, outer_var, x, y)
        res += jnp.dot(jnp.exp(outer_var) * inner_var, inner_var) / 2
        return res

    def f_outer(inner_var: Any, outer_var: Any, start: Any = 0, batch_size: int = BATCH) -> Any:
        x = jax.lax.dynamic_slice(x_val, (start, 0), (batch_size, x_val.shape[1]))
        y = jax.lax.dynamic_slice(y_val, (start,), (batch_size,))
        return loss(inner_var, outer_var, x, y)

    grad_inner = jax.grad(f_inner, argnums=0)
    grad_outer = jax.grad(f_outer, argnums=(0, 1))
    inner_sampler, state_inner = init_sampler(N_INNER, BATCH, key=jax.random.PRNGKey(0))
    outer_sampler, state_outer = init_sampler(N_OUTER, BATCH, key=jax.random.PRNGKey(1))

    # solvers/soba.py, SOBA.get_step
    def soba_one_iter(carry: Any, _: Any) -> Any:
        (inner_step_size, outer_step_size), carry["state_lr"] = update_lr(carry["state_lr"])
        start_inner, *_, carry["state_inner_sampler"] = inner_sampler(carry["state_inner_sampler"])
        grad_inner_var, vjp_train = jax.vjp(
            lambda z, x: grad_inner(z, x, start_inner), carry["inner_var"], carry["outer_var"]
        )
        hvp, cross_v = vjp_train(carry["v"])
        start_outer, *_, carry["state_outer_sampler"] = outer_sampler(carry["state_outer_sampler"])
        grad_in_outer, grad_out_outer = grad_outer(carry["inner_var"], carry["outer_var"], start_outer)
        carry["inner_var"] -= inner_step_size * grad_inner_var
        carry["v"] -= inner_step_size * (hvp + grad_in_outer)
        carry["outer_var"] -= outer_step_size * (cross_v + grad_out_outer)
        return carry, _

    # solvers/saba.py, variance_reduction and SABA.get_step
    def variance_reduction(memory: Any, grad: Any, idx: Any, weigth: Any) -> Any:
        diff = grad - memory[idx]
        direction = diff + memory[-2]
        return memory.at[-1].set(direction).at[-2].add(weigth * diff).at[idx].set(grad)

    def saba_one_iter(carry: Any, _: Any) -> Any:
        memory, carry = carry
        (inner_lr, outer_lr), carry["state_lr"] = update_lr(carry["state_lr"])
        start_inner, id_inner, weight_inner, carry["state_inner_sampler"] = inner_sampler(
            carry["state_inner_sampler"]
        )
        grad_inner_var, vjp_train = jax.vjp(
            lambda z, x: grad_inner(z, x, start_inner), carry["inner_var"], carry["outer_var"]
        )
        hvp, cross_v = vjp_train(carry["v"])
        start_outer, id_outer, weight_outer, carry["state_outer_sampler"] = outer_sampler(
            carry["state_outer_sampler"]
        )
        grad_in_outer, grad_out_outer = grad_outer(carry["inner_var"], carry["outer_var"], start_outer)
        updates = {
            "inner_grad": (grad_inner_var, id_inner, weight_inner),
            "hvp": (hvp, id_inner, weight_inner),
            "cross_v": (cross_v, id_inner, weight_inner),
            "grad_in_outer": (grad_in_outer, id_outer, weight_outer),
            "grad_out_outer": (grad_out_outer, id_outer, weight_outer),
        }
        memory = jax.tree_util.tree_map(lambda mem, up: variance_reduction(mem, *up), memory, updates)
        carry["inner_var"] -= inner_lr * memory["inner_grad"][-1]
        carry["v"] -= inner_lr * (memory["hvp"][-1] + memory["grad_in_outer"][-1])
        carry["outer_var"] -= outer_lr * (memory["cross_v"][-1] + memory["grad_out_outer"][-1])
        return (memory, carry), _

    def carry0() -> dict[str, Any]:
        return {
            "inner_var": jnp.zeros(DIM),
            "outer_var": jnp.zeros(DIM),
            "v": jnp.zeros(DIM),
            "state_lr": init_lr_scheduler(jnp.array([INNER_LR, OUTER_LR]), jnp.array([0.0, 0.0])),
            "state_inner_sampler": state_inner,
            "state_outer_sampler": state_outer,
        }

    nb_in, nb_out = len(state_inner["batch_order"]), len(state_outer["batch_order"])
    memory0 = {
        "inner_grad": jnp.zeros((nb_in + 2, DIM)),
        "hvp": jnp.zeros((nb_in + 2, DIM)),
        "cross_v": jnp.zeros((nb_in + 2, DIM)),
        "grad_in_outer": jnp.zeros((nb_out + 2, DIM)),
        "grad_out_outer": jnp.zeros((nb_out + 2, DIM)),
    }

    @jax.jit
    def soba_epoch(carry: Any) -> Any:
        carry, _ = jax.lax.scan(soba_one_iter, carry, None, length=eval_freq)
        return carry

    @jax.jit
    def saba_epoch(state: Any) -> Any:
        state, _ = jax.lax.scan(saba_one_iter, state, None, length=eval_freq)
        return state

    rows = []
    for name, fn, state in (("SOBA", soba_epoch, carry0()), ("SABA", saba_epoch, (memory0, carry0()))):
        tic = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        first = time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(calls):
            state = fn(state)
            # the benchmark's callback reads the iterates after every call
            jax.block_until_ready(state)
        us = 1e6 * (time.perf_counter() - tic) / (calls * eval_freq)
        rows.append(
            {
                "solver": name,
                "impl": f"JAX reference (scan of {eval_freq})",
                "us_per_iter": us,
                "ms_per_epoch": us * EPOCH / 1e3,
                "first_call_s": first,
                "wall_s": first + us * 1e-6 * calls * eval_freq,
                "final_outer_loss": math.nan,
                "finite": True,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------
# The floor: one SOBA iteration without any library, compiled by each side (--floor)
# ------------------------------------------------------------------------------------------

FLOOR_STEP = (0.03, 0.003)  # (rho, gamma): constant; the time does not depend on them


def floor_indices(sampling: str, iters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(iters, BATCH) inner and outer row indices: random rows, or consecutive row blocks at
    random starts (the benchmark's batches), the same arrays for both sides."""
    rng = np.random.default_rng(seed)
    if sampling == "random":
        return rng.integers(0, N_INNER, (iters, BATCH)), rng.integers(0, N_OUTER, (iters, BATCH))
    block = np.arange(BATCH)
    starts = rng.integers(0, N_INNER - BATCH, (iters, 1)), rng.integers(0, N_OUTER - BATCH, (iters, 1))
    return starts[0] + block, starts[1] + block


def floor_torch(sampling: str, k: int, reps: int) -> dict[str, Any]:
    """K SOBA iterations unrolled into one ``torch.compile``-d graph: the same derivatives as
    `SOBA` (grad of the inner loss, one vector-Jacobian product of it for the HVP and the cross
    term, the outer gradient), no checks, no schedule, no Python between iterations."""
    import torch
    from torch.func import grad, vjp

    torch.set_num_threads(1)
    d = {key: torch.tensor(v) for key, v in make_data().items()}
    a, y, a2, y2 = d["a"], d["y"], d["a2"], d["y2"]
    rho, gamma = FLOOR_STEP

    def inner(z: Any, x: Any, ab: Any, yb: Any) -> Any:
        return torch.nn.functional.softplus(-yb * (ab @ z)).mean() + 0.5 * (x.exp() * z * z).sum()

    def outer(z: Any, ab: Any, yb: Any) -> Any:
        return torch.nn.functional.softplus(-yb * (ab @ z)).mean()

    def chunk(z: Any, v: Any, x: Any, ii: Any, oo: Any) -> Any:
        for t in range(k):
            i, o = ii[t], oo[t]
            g, pull = vjp(lambda zz, xx, i=i: grad(inner)(zz, xx, a[i], y[i]), z, x)
            hv, cross = pull(v)
            go = grad(outer)(z, a2[o], y2[o])
            z, v, x = z - rho * g, v - rho * (hv + go), x - gamma * cross
        return z, v, x

    fn = torch.compile(chunk, fullgraph=True, dynamic=False)
    ii, oo = (torch.as_tensor(q) for q in floor_indices(sampling, k * reps))
    z = v = x = torch.zeros(DIM, dtype=torch.float64)
    tic = time.perf_counter()
    fn(z, v, x, ii[:k], oo[:k])
    first = time.perf_counter() - tic
    times = []
    for r in range(reps):
        tic = time.perf_counter()
        z, v, x = fn(z, v, x, ii[r * k : (r + 1) * k], oo[r * k : (r + 1) * k])
        times.append(time.perf_counter() - tic)
    us = 1e6 * float(np.median(times)) / k
    return {"solver": "SOBA", "impl": f"floor torch unrolled K={k}, {sampling}", "us_per_iter": us,
            "ms_per_epoch": us * EPOCH / 1e3, "first_call_s": first}  # fmt: skip


def floor_ours(sampling: str, k: int, windows: int = 8, every: int = 512) -> dict[str, Any]:
    """This package's `SOBA` (``compile=True, chunk=k``) on the same problem and steps, with
    ``contiguous_batches`` for the blocks: the median window of ``every`` iterations after the
    first (which holds the compilation), per iteration."""
    import torch

    from bilevel.hyperopt import SOBA, StochasticBilevel

    torch.set_num_threads(1)
    d = {key: torch.tensor(v) for key, v in make_data().items()}
    a, y, a2, y2 = d["a"], d["y"], d["a2"], d["y2"]

    def inner(z: Any, x: Any, idx: Any) -> Any:
        return torch.nn.functional.softplus(-(y[idx] * (a[idx] @ z))).mean() + 0.5 * (x.exp() * z * z).sum()

    def outer(z: Any, x: Any, idx: Any) -> Any:
        return torch.nn.functional.softplus(-(y2[idx] * (a2[idx] @ z))).mean()

    rho, gamma = FLOOR_STEP
    solver = SOBA(
        rho, gamma, batch_size=BATCH, compile=True, chunk=k, contiguous_batches=sampling == "blocks"
    )
    z0 = torch.zeros(DIM, dtype=torch.float64)
    problem = StochasticBilevel(inner, outer, N_INNER, N_OUTER)
    res = solver.run(problem, z0, z0.clone(), max_iter=windows * every, eval_every=every)
    t = [r.time for r in res.history]
    us = 1e6 * float(np.median([b - a_ for a_, b in itertools.pairwise(t[1:])])) / every
    return {"solver": "SOBA", "impl": f"ours SOBA chunk={k}, {sampling}", "us_per_iter": us,
            "ms_per_epoch": us * EPOCH / 1e3, "first_call_s": t[1] - us * 1e-6 * every}  # fmt: skip


def floor_jax(sampling: str, k: int, reps: int) -> dict[str, Any]:
    """The same K iterations as one jitted ``jax.lax.scan``, on the same index arrays."""
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    d = {key: jnp.asarray(v) for key, v in make_data().items()}
    a, y, a2, y2 = d["a"], d["y"], d["a2"], d["y2"]
    rho, gamma = FLOOR_STEP

    def inner(z: Any, x: Any, ab: Any, yb: Any) -> Any:
        return jax.nn.softplus(-yb * (ab @ z)).mean() + 0.5 * (jnp.exp(x) * z * z).sum()

    def outer(z: Any, ab: Any, yb: Any) -> Any:
        return jax.nn.softplus(-yb * (ab @ z)).mean()

    def step(carry: Any, io: Any) -> Any:
        z, v, x = carry
        i, o = io
        g, pull = jax.vjp(lambda zz, xx: jax.grad(inner)(zz, xx, a[i], y[i]), z, x)
        hv, cross = pull(v)
        go = jax.grad(outer)(z, a2[o], y2[o])
        return (z - rho * g, v - rho * (hv + go), x - gamma * cross), None

    fn = jax.jit(lambda c, ii, oo: jax.lax.scan(step, c, (ii, oo))[0])
    ii, oo = (jnp.asarray(q) for q in floor_indices(sampling, k * reps))
    c = (jnp.zeros(DIM), jnp.zeros(DIM), jnp.zeros(DIM))
    tic = time.perf_counter()
    jax.block_until_ready(fn(c, ii[:k], oo[:k]))
    first = time.perf_counter() - tic
    times = []
    for r in range(reps):
        tic = time.perf_counter()
        c = jax.block_until_ready(fn(c, ii[r * k : (r + 1) * k], oo[r * k : (r + 1) * k]))
        times.append(time.perf_counter() - tic)
    us = 1e6 * float(np.median(times)) / k
    return {"solver": "SOBA", "impl": f"floor JAX scan of {k}, {sampling}", "us_per_iter": us,
            "ms_per_epoch": us * EPOCH / 1e3, "first_call_s": first}  # fmt: skip


def _fmt(r: dict[str, Any]) -> str:
    return (
        f"{r['solver']:5s} {r['impl']:34s} {r['us_per_iter']:9.1f} us/iter {r['ms_per_epoch']:9.1f} ms/epoch "
        f"first call {r['first_call_s']:7.2f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["all", "ours", "jax", "floor-jax"], default="all")
    p.add_argument("--benchmark-dir", type=Path, help="a copy of benchmark_bilevel (for the JAX side)")
    p.add_argument("--peers-python", default="benchmarks/.venv-peers/bin/python", help="python with jax")
    p.add_argument("--chunks", default="16", help="chunk sizes K to time, comma-separated")
    p.add_argument("--warm", type=int, default=1536, help="iterations before the timed window (compiled)")
    p.add_argument("--measured", type=int, default=3072, help="timed iterations (compiled)")
    p.add_argument("--eager-iters", type=int, default=256, help="timed iterations (eager)")
    p.add_argument("--eval-freq", type=int, default=512, help="iterations per jitted call (JAX)")
    p.add_argument("--calls", type=int, default=8, help="timed jitted calls (JAX)")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--floor", action="store_true",
                   help="instead: SOBA's bare iteration compiled by torch (unrolled, --floor-k) and by JAX "
                        "(scan), on random rows and on consecutive row blocks")  # fmt: skip
    p.add_argument(
        "--floor-k", type=int, default=16, help="with --floor: iterations per torch call (unrolled)"
    )
    p.add_argument("--floor-jax-k", type=int, default=256, help="with --floor: iterations per JAX scan call")
    p.add_argument("--floor-reps", type=int, default=40, help="with --floor: timed calls per side")
    a = p.parse_args()
    rows: list[dict[str, Any]] = []
    if a.floor:
        main_floor(a)
        return
    if a.mode in ("all", "jax"):
        if a.benchmark_dir is None:
            p.error("the JAX side needs --benchmark-dir (a copy of benchmark_bilevel)")
        if a.mode == "jax":
            rows = run_jax(a.benchmark_dir, a.eval_freq, a.calls)
            print(json.dumps(rows))
            return
        env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        cmd = [a.peers_python, __file__, "--mode", "jax", "--benchmark-dir", str(a.benchmark_dir)]
        cmd += ["--eval-freq", str(a.eval_freq), "--calls", str(a.calls)]
        out = subprocess.run(
            cmd,
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        for r in rows:
            print(_fmt(r), flush=True)
    if a.mode in ("all", "ours"):
        ks = [int(k) for k in a.chunks.split(",") if k]
        rows += run_ours(ks, a.warm, a.measured, a.eager_iters)
    ref = {r["solver"]: r["us_per_iter"] for r in rows if r["impl"].startswith("JAX")}
    print("\nsolver impl                                  us/iter   ms/epoch  first call (s)  x JAX")
    for r in rows:
        ratio = r["us_per_iter"] / ref[r["solver"]] if r["solver"] in ref else math.nan
        print(
            f"{r['solver']:6s} {r['impl']:36s} {r['us_per_iter']:9.1f} {r['ms_per_epoch']:10.1f} "
            f"{r['first_call_s']:14.2f} {ratio:7.2f}"
        )
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))


def main_floor(a: argparse.Namespace) -> None:
    """``--floor``: JAX, torch, JAX again per sampling (alternating in one run: the machine is
    noisy); the JAX side in the peers interpreter (``--mode floor-jax``)."""
    if a.mode == "floor-jax":
        print(json.dumps([floor_jax(s, a.floor_jax_k, a.floor_reps) for s in ("random", "blocks")]))
        return
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    cmd = [a.peers_python, __file__, "--floor", "--mode", "floor-jax"]
    cmd += ["--floor-jax-k", str(a.floor_jax_k), "--floor-reps", str(a.floor_reps)]
    rows: list[dict[str, Any]] = []
    for _ in range(2):  # JAX before and after ours
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        if not any(r["impl"].startswith("floor torch") for r in rows):
            rows += [floor_torch(s, a.floor_k, a.floor_reps) for s in ("random", "blocks")]
            rows += [floor_ours(s, a.floor_k) for s in ("random", "blocks")]
    for sampling in ("random", "blocks"):
        ref = float(
            np.mean(
                [
                    r["us_per_iter"]
                    for r in rows
                    if r["impl"].startswith("floor JAX") and sampling in r["impl"]
                ]
            )
        )
        for r in rows:
            if sampling in r["impl"]:
                print(f"{r['impl']:44s} {r['us_per_iter']:8.1f} us/iter  x JAX (mean of both passes) "
                      f"{r['us_per_iter'] / ref:5.2f}  first call {r['first_call_s']:6.2f} s")  # fmt: skip
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
