"""Side-by-side speed of `bilevel` against TorchOpt, higher and JAXopt on identical problems.

Five sections, all measured in one run of this script:

1. ``imaml``: one iMAML meta-gradient of the Omniglot CNN (4 x 64 filters, stride 2, batch-statistics
   norm) at 5-way 1-shot and 20-way 5-shot: 16 inner GD steps on G = CE + lam/2 ||phi - theta||^2,
   lam = 2, 5 CG steps from 0 on (I + H/lam) g = v (ours: ``Implicit(5, warm_start=False)``; TorchOpt:
   ``custom_root`` + ``solve_cg(maxiter=5)``, the structure of TorchOpt's own iMAML example).  For one
   task, and per task within a meta-batch (ours vmapped or looped, TorchOpt's loop as in its example).
2. ``maml``: the unrolled MAML meta-gradient (5 inner SGD steps, lr 0.4), ours
   (``make_algorithm("maml")``) against ``higher.innerloop_ctx``.
3. ``hyper``: a ridge hypergradient d(val loss)/d(log lam) and a logistic-regression hypergradient
   with per-feature L2 weights, ours (``bl.implicit_argmin``) against JAXopt (``custom_root``, jitted)
   and TorchOpt (``custom_root``).  Every implementation runs the same inner solver (ridge: a dense
   solve; logistic: a fixed number of Newton steps with a dense Hessian, written in each framework)
   and the same backward solve (CG from 0 to a relative residual of 1e-10), all in float64, so the
   difference is the differentiation machinery.
4. ``variants``: prototype iMAML engine changes (``variants.py``: every task in a Python loop, an
   explicit batched model without torch.func, a fused norm for first-order gradients), each checked
   against the engine in float64 and timed in the same rounds as TorchOpt: what each change buys.
   (Section 2 likewise times ``variants.maml_batched``, unrolled MAML on the batched model.)
5. ``roofline``: the time of one iMAML meta-step (per task) divided by the time of the same number of
   gradient-equivalents (16 inner gradients, the linearization, 5 HVPs, the query gradient), each
   timed alone at the best batch size found (vmap or the batched model over 1, 4, 16, 32, 64 tasks,
   or one task with plain autograd).

Timing: ``time.perf_counter`` around complete calls (``block_until_ready`` for JAX); one warm-up
call each (JAX compiles there), then the implementations of a comparison alternate A B B A A B ...
over ``--repeats`` rounds and the median of each is reported, with the ratio theirs / ours of the
medians.  The machine is shared, so ``os.getloadavg()`` is recorded before and after every
comparison, and every call's CPU time (``time.process_time``) is recorded next to its wall time: the
ratio of median CPU times, shown in parentheses, does not count the time spent waiting for a core.
Everything runs on one thread: ``torch.set_num_threads(1)`` and, for JAX,
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` (set before JAX is
imported).  Timing is in float32 for the networks and float64 for the hypergradients; gradient
agreement is checked in float64 (relative error ||a - b|| / ||b||, target 1e-5).

Run (after ``bash benchmarks/peers/setup.sh``)::

    benchmarks/.venv-peers/bin/python benchmarks/peers/bench.py --out results/peers
    benchmarks/.venv-peers/bin/python benchmarks/peers/bench.py --out /tmp/q --quick   # minutes

Writes ``results.json`` (every sample) and ``tables.md`` (the tables of ``benchmarks/RESULTS.md``)
into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.func as tf
import torch.nn.functional as F

import bilevel as bl
from bilevel.metalearn.algorithms import Implicit, MetaAlgorithm, make_algorithm, meta_gradient
from bilevel.metalearn.batched import BatchedModel, batched_model
from bilevel.metalearn.models import make_functional, omniglot_cnn
from bilevel.metalearn.tasks import Task
from bilevel.solvers import GradientDescent

Params = dict[str, torch.Tensor]
XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
AGREE_RTOL = 1e-5


# ------------------------------------------------------------------------------------------ timing
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def interleaved(
    impls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each implementation, alternating A B B A ... so that load drifts hit all alike.

    CPU seconds (``time.process_time``, all threads of this process) exclude the time the process
    waits for a core, so they are a cross-check that is far less sensitive to the other jobs on a
    shared machine than wall time.
    """
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    names = list(impls)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            impls[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    return wall, cpu


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def rel_err(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all leaves (float64)."""
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b, strict=True))
    den = sum(float((y.double() ** 2).sum()) for y in b)
    return math.sqrt(num / den)


@dataclasses.dataclass
class Comparison:
    """One timed comparison: several implementations of one computation, measured together."""

    section: str
    case: str
    unit: str  # what one timed call computes ("per task", "per call")
    per: int  # divide a call's time by this to get the unit
    samples: dict[str, list[float]]
    ours: str
    peers: list[str]
    agreement: dict[str, float]  # peer -> relative error against ours (float64)
    load_before: list[float]
    load_after: list[float]
    notes: str = ""
    also: list[str] = dataclasses.field(default_factory=list)  # other variants of ours, for more ratios
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # CPU seconds, same rounds

    def cpu_ratio(self, peer: str, ours: str | None = None) -> float:
        return median(self.cpu[peer]) / median(self.cpu[ours or self.ours])

    def pairs(self) -> list[tuple[str, str]]:
        """(peer, ours-variant) pairs whose ratio peer / ours-variant is reported."""
        return [(p, o) for o in [self.ours, *self.also] for p in self.peers]

    def ms(self, name: str) -> float:
        return 1e3 * median(self.samples[name]) / self.per

    def ratio(self, peer: str, ours: str | None = None) -> float:
        return median(self.samples[peer]) / median(self.samples[ours or self.ours])

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["median_ms"] = {n: self.ms(n) for n in self.samples}
        d["ratios"] = {f"{p}/{o}": self.ratio(p, o) for p, o in self.pairs()}
        if self.cpu:
            d["cpu_ratios"] = {f"{p}/{o}": self.cpu_ratio(p, o) for p, o in self.pairs()}
        return d


def compare(
    section: str,
    case: str,
    impls: dict[str, Callable[[], Any]],
    *,
    ours: str,
    peers: list[str],
    repeats: int,
    per: int = 1,
    unit: str = "per call",
    agreement: dict[str, float] | None = None,
    notes: str = "",
    also: Sequence[str] = (),
) -> Comparison:
    before = loadavg()
    samples, cpu = interleaved(impls, repeats)
    c = Comparison(
        section,
        case,
        unit,
        per,
        samples,
        ours,
        peers,
        agreement or {},
        before,
        loadavg(),
        notes,
        list(also),
        cpu,
    )
    line = ", ".join(f"{n} {c.ms(n):.2f} ms" for n in impls)
    ratios = ", ".join(f"{p}/{o} {c.ratio(p, o):.2f} (cpu {c.cpu_ratio(p, o):.2f})" for p, o in c.pairs())
    print(f"[{section}] {case}: {line} ({unit}); {ratios}; load {before} -> {c.load_after}", flush=True)
    return c


# ------------------------------------------------------------------------------- few-shot problems
@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    ways: int
    shots: int
    queries: int


SETTINGS = {
    "5w1s": Setting("5-way 1-shot", 5, 1, 15),
    "20w5s": Setting("20-way 5-shot", 20, 5, 5),
}


def fewshot(setting: Setting, B: int, dtype: torch.dtype, seed: int = 0) -> tuple[Any, Params, Any, Task]:
    """The Omniglot CNN (its module, fn, theta) and a meta-batch of B synthetic tasks.

    Images are class prototypes plus noise in [0, 1] (28 x 28): timing does not depend on the
    pixels, and the agreement checks need only a well-defined, reproducible problem.
    """
    model = omniglot_cnn(setting.ways).to(dtype)
    fn, theta = make_functional(model, torch.Generator().manual_seed(seed), dtype=dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta[n])
    g = torch.Generator().manual_seed(seed + 1)
    w, s, q = setting.ways, setting.shots, setting.queries
    protos = torch.rand(B, w, 1, 1, 28, 28, generator=g, dtype=dtype)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (protos + 0.3 * torch.randn(B, w, k, 1, 28, 28, generator=g, dtype=dtype)).clamp(0, 1)
        y = torch.arange(w).repeat_interleave(k).expand(B, -1).contiguous()
        return x.reshape(B, w * k, 1, 28, 28), y

    xs, ys = draw(s)
    xq, yq = draw(q)
    return model, theta, fn, Task(xs, ys, xq, yq)


def sub(batch: Task, b: int) -> Task:
    return Task(*(t[:b] for t in batch))


# ------------------------------------------------------------------------------ (1) iMAML: TorchOpt
def torchopt_imaml(fn: Any, names: list[str], lam: float, lr: float, steps: int, cg_iters: int) -> Any:
    """TorchOpt's iMAML (its ``examples/iMAML/imaml_omniglot_functional.py``, adapted to ``fn``).

    ``custom_root(grad G, argnums=1, solve=solve_cg(maxiter=cg_iters))`` around ``steps`` GD steps
    done with ``torchopt.sgd``; a Python loop over the tasks of a meta-batch; the meta-gradient by
    ``torch.autograd.grad`` of the mean query loss.  The example uses ``solve_normal_cg``; plain CG
    (one HVP per step instead of two) solves the same symmetric system and is faster, so it is used
    here.  ``rtol=0`` makes TorchOpt run exactly ``cg_iters`` steps, as ours does.
    """
    import torchopt

    def G(
        params: tuple[torch.Tensor, ...], meta: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        loss = F.cross_entropy(fn(dict(zip(names, params)), x), y)
        for a, b in zip(params, meta):
            loss = loss + 0.5 * lam * torch.sum(torch.square(a - b))
        return loss

    @torchopt.diff.implicit.custom_root(
        tf.grad(G, argnums=0),
        argnums=1,
        solve=torchopt.linear_solve.solve_cg(maxiter=cg_iters, rtol=0.0, atol=0.0),
    )
    def inner(
        params: tuple[torch.Tensor, ...], meta: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor
    ) -> Any:
        opt = torchopt.sgd(lr=lr)
        state = opt.init(params)
        with torch.enable_grad():
            for _ in range(steps):
                grads = torch.autograd.grad(G(params, meta, x, y), params)
                updates, state = opt.update(grads, state, inplace=True)
                params = torchopt.apply_updates(params, updates, inplace=True)
        return params

    def meta_grad(theta: Params, batch: Task) -> list[torch.Tensor]:
        meta = tuple(theta[k].detach().clone().requires_grad_(True) for k in names)
        losses = []
        for i in range(batch.support_x.shape[0]):
            init = tuple(t.detach().clone().requires_grad_(True) for t in meta)
            phi = inner(init, meta, batch.support_x[i], batch.support_y[i])
            losses.append(F.cross_entropy(fn(dict(zip(names, phi)), batch.query_x[i]), batch.query_y[i]))
        return list(torch.autograd.grad(torch.stack(losses).mean(), meta))

    return meta_grad


IMAML = MetaAlgorithm(
    GradientDescent(lr=0.1, max_iter=16, tol=0.0), Implicit(cg_iters=5, warm_start=False), 2.0
)


def ours_imaml(
    fn: Any, theta: Params, batch: Task, vectorize: bool = True, bm: BatchedModel | None = None
) -> list[torch.Tensor]:
    g, _, stats = meta_gradient(
        IMAML, fn, F.cross_entropy, theta, batch, vectorize=vectorize, diagnostics=False, batched=bm
    )
    if bool(stats.negative_curvature.any()):
        # our CG stops a task at negative curvature and TorchOpt's does not: the work would differ
        warnings.warn("negative curvature met: the two CG runs differ", stacklevel=2)
    return list(g.values())


def _one_task_and_meta_batch(
    section: str,
    args: argparse.Namespace,
    st: Setting,
    mb: int,
    problem: tuple[torch.nn.Module, Params, Any, Task],
    ours: Callable[..., list[torch.Tensor]],
    peer: str,
    theirs: Callable[[Task], list[torch.Tensor]],
    agreement: dict[str, float],
    notes: str,
) -> list[Comparison]:
    """Ours (batched model), ours-vmap and the peer, timed on 1 task and on the whole meta-batch."""
    model, th, fn, batch = problem
    bm = batched_model(model)
    out = []
    for label, b, reps, per in (
        ("1 task", sub(batch, 1), args.repeats, 1),
        (f"meta-batch of {mb}", batch, args.repeats_batched, mb),
    ):
        impls = {
            "ours": functools.partial(ours, fn, th, b, bm=bm),
            "ours-vmap": functools.partial(ours, fn, th, b),
            peer: functools.partial(theirs, b),
        }
        out.append(
            compare(
                section,
                f"{st.name}, {label}",
                impls,
                ours="ours",
                peers=[peer],
                repeats=reps,
                per=per,
                unit="per task",
                agreement=agreement,
                notes=notes,
                also=["ours-vmap"],
            )
        )
    return out


def section_imaml(args: argparse.Namespace) -> list[Comparison]:
    out = []
    for key in args.settings:
        st = SETTINGS[key]
        mb = args.meta_batch[key]
        # agreement, float64, on a meta-batch of 2 tasks
        m64, th64, fn64, b64 = fewshot(st, 2, torch.float64)
        names = list(th64)
        theirs = torchopt_imaml(fn64, names, IMAML.lam, IMAML.inner.lr, IMAML.inner.max_iter, 5)(th64, b64)  # type: ignore[union-attr]
        err = rel_err(ours_imaml(fn64, th64, b64, bm=batched_model(m64)), theirs)
        err_v = rel_err(ours_imaml(fn64, th64, b64), theirs)
        print(f"[imaml] {st.name}: float64 agreement ours vs TorchOpt {err:.2e} (ours-vmap {err_v:.2e})")
        model, th, fn, batch = fewshot(st, mb, torch.float32)
        top = torchopt_imaml(fn, names, IMAML.lam, IMAML.inner.lr, IMAML.inner.max_iter, 5)  # type: ignore[union-attr]
        out += _one_task_and_meta_batch(
            "imaml",
            args,
            st,
            mb,
            (model, th, fn, batch),
            ours_imaml,
            "torchopt",
            lambda b, top=top, th=th: top(th, b),
            {"torchopt": err, "torchopt (vs ours-vmap)": err_v},
            "ours: the engine with the batched model (the default in training); "
            "ours-vmap: batched=None, torch.func.vmap over tasks",
        )
    return out


# -------------------------------------------------------------------------------- (2) MAML: higher
MAML_STEPS, MAML_LR = 5, 0.4


def higher_maml(model: torch.nn.Module, batch: Task) -> list[torch.Tensor]:
    """higher's MAML (its ``examples/maml-omniglot.py``): innerloop_ctx + SGD, a loop over tasks."""
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=MAML_LR)
    params = list(model.parameters())
    B = batch.support_x.shape[0]
    total = 0.0
    for i in range(B):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(MAML_STEPS):
                diffopt.step(F.cross_entropy(fmodel(batch.support_x[i]), batch.support_y[i]))
            total = total + F.cross_entropy(fmodel(batch.query_x[i]), batch.query_y[i])
    return list(torch.autograd.grad(total / B, params))


MAML = make_algorithm("maml", inner_steps=MAML_STEPS, inner_lr=MAML_LR)


def ours_maml(
    fn: Any, theta: Params, batch: Task, vectorize: bool = True, bm: BatchedModel | None = None
) -> list[torch.Tensor]:
    g, _, _ = meta_gradient(
        MAML, fn, F.cross_entropy, theta, batch, vectorize=vectorize, diagnostics=False, batched=bm
    )
    return list(g.values())


def section_maml(args: argparse.Namespace) -> list[Comparison]:
    out = []
    for key in args.settings:
        st = SETTINGS[key]
        mb = args.meta_batch[key]
        m64, th64, fn64, b64 = fewshot(st, 2, torch.float64)
        ref = higher_maml(m64, b64)
        err = rel_err(ours_maml(fn64, th64, b64, bm=batched_model(m64)), ref)
        err_v = rel_err(ours_maml(fn64, th64, b64), ref)
        print(f"[maml] {st.name}: float64 agreement ours vs higher {err:.2e} (ours-vmap {err_v:.2e})")
        model, th, fn, batch = fewshot(st, mb, torch.float32)
        out += _one_task_and_meta_batch(
            "maml",
            args,
            st,
            mb,
            (model, th, fn, batch),
            ours_maml,
            "higher",
            lambda b, model=model: higher_maml(model, b),
            {"higher": err, "higher (vs ours-vmap)": err_v},
            "ours: the engine with the batched model; ours-vmap: torch.func.vmap",
        )
    return out


# ---------------------------------------------------------------------------- (3) hypergradients
CG_RTOL = 1e-10
NEWTON_STEPS = 12


@dataclasses.dataclass(frozen=True)
class HyperProblem:
    """Training and validation data, the hyperparameter theta and which inner problem."""

    kind: str  # "ridge" (theta = log lam, a scalar) or "logistic" (theta = log of per-feature L2 weights)
    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor
    theta: torch.Tensor

    @property
    def d(self) -> int:
        return self.X.shape[1]


def hyper_problem(kind: str, n: int, d: int, seed: int = 0) -> HyperProblem:
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    w_true = torch.randn(d, generator=g, dtype=dt) / math.sqrt(d)
    X = torch.randn(n, d, generator=g, dtype=dt)
    Xv = torch.randn(n, d, generator=g, dtype=dt)
    if kind == "ridge":
        y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=dt)
        yv = Xv @ w_true + 0.5 * torch.randn(n, generator=g, dtype=dt)
        theta = torch.tensor(0.0, dtype=dt)  # lam = 1
    else:
        y = torch.sign(X @ w_true + 0.3 * torch.randn(n, generator=g, dtype=dt))
        yv = torch.sign(Xv @ w_true + 0.3 * torch.randn(n, generator=g, dtype=dt))
        theta = math.log(0.1) + 0.5 * torch.randn(d, generator=g, dtype=dt)
    return HyperProblem(kind, X, y, Xv, yv, theta)


# torch versions of G, the inner solver and the outer loss, shared by ours and TorchOpt's
def t_inner(
    w: torch.Tensor, theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor, kind: str
) -> torch.Tensor:
    n = X.shape[0]
    if kind == "ridge":
        r = X @ w - y
        return 0.5 * (r @ r) / n + 0.5 * torch.exp(theta) * (w @ w)
    return F.softplus(-y * (X @ w)).mean() + 0.5 * (torch.exp(theta) * w * w).sum()


def t_outer(w: torch.Tensor, p: HyperProblem) -> torch.Tensor:
    if p.kind == "ridge":
        r = p.Xv @ w - p.yv
        return 0.5 * (r @ r) / p.Xv.shape[0]
    return F.softplus(-p.yv * (p.Xv @ w)).mean()


def t_solve(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Ridge: the normal equations, one dense solve.  Logistic: NEWTON_STEPS Newton steps from 0."""
    n, d = X.shape
    lam = torch.exp(theta)
    if kind == "ridge":
        return torch.linalg.solve(X.T @ X / n + lam * torch.eye(d, dtype=X.dtype), X.T @ y / n)
    w = torch.zeros(d, dtype=X.dtype)
    for _ in range(NEWTON_STEPS):
        s = torch.sigmoid(-y * (X @ w))
        grad = -(X.T @ (y * s)) / n + lam * w
        H = (X.T * (s * (1 - s))) @ X / n + torch.diag(lam)
        w = w - torch.linalg.solve(H, grad)
    return w


def reference_hypergrad(p: HyperProblem) -> torch.Tensor:
    """Dense float64: dL/dtheta = -(d2G/dtheta dw)^T H^-1 grad_w L at w*(theta)."""
    w = t_solve(p.theta, p.X, p.y, p.kind)
    H = torch.func.hessian(lambda w_: t_inner(w_, p.theta, p.X, p.y, p.kind))(w)
    gL = torch.func.grad(lambda w_: t_outer(w_, p))(w)
    u = torch.linalg.solve(H, gL)
    cross = torch.func.jacrev(lambda th: torch.func.grad(t_inner)(w, th, p.X, p.y, p.kind))(
        p.theta
    )  # (d, *theta)
    return -(cross.reshape(w.shape[0], -1).T @ u).reshape(p.theta.shape)


def ours_hyper(p: HyperProblem, hvp: Any = None) -> Callable[[], torch.Tensor]:
    def solver(objective: Any, init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return t_solve(theta, p.X, p.y, p.kind)

    def objective(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return t_inner(w, theta, p.X, p.y, p.kind)

    def run() -> torch.Tensor:
        theta = p.theta.detach().requires_grad_(True)
        w = bl.implicit_argmin(
            objective, torch.zeros(p.d, dtype=p.X.dtype), theta, solver, hvp, bl.CG(rtol=CG_RTOL)
        )
        (g,) = torch.autograd.grad(t_outer(w, p), theta)
        return g

    return run


def torchopt_hyper(p: HyperProblem) -> Callable[[], torch.Tensor]:
    import torchopt

    kind = p.kind

    def optimality(w: torch.Tensor, theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return tf.grad(t_inner)(w, theta, X, y, kind)

    @torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(rtol=CG_RTOL, atol=0.0, maxiter=1000)
    )
    def solver(init: torch.Tensor, theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return t_solve(theta, X, y, kind)

    def run() -> torch.Tensor:
        theta = p.theta.detach().clone().requires_grad_(True)
        w = solver(torch.zeros(p.d, dtype=p.X.dtype), theta, p.X, p.y)
        (g,) = torch.autograd.grad(t_outer(w, p), theta)
        return g

    return run


def jaxopt_hyper(p: HyperProblem) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """JAXopt's ``custom_root`` around the same solver, ``jax.jit(jax.grad(outer))``.

    Returns the hypergradient call and the jitted inner solve alone (for reference).
    """
    import jax
    import jax.numpy as jnp
    from jaxopt import implicit_diff, linear_solve

    kind = p.kind

    def inner(w: Any, theta: Any, X: Any, y: Any) -> Any:
        n = X.shape[0]
        if kind == "ridge":
            r = X @ w - y
            return 0.5 * (r @ r) / n + 0.5 * jnp.exp(theta) * (w @ w)
        return jnp.mean(jax.nn.softplus(-y * (X @ w))) + 0.5 * jnp.sum(jnp.exp(theta) * w * w)

    def solve_inner(theta: Any, X: Any, y: Any) -> Any:
        n, d = X.shape
        lam = jnp.exp(theta)
        if kind == "ridge":
            return jnp.linalg.solve(X.T @ X / n + lam * jnp.eye(d), X.T @ y / n)
        w = jnp.zeros(d)
        for _ in range(NEWTON_STEPS):
            s = jax.nn.sigmoid(-y * (X @ w))
            grad = -(X.T @ (y * s)) / n + lam * w
            H = (X.T * (s * (1 - s))) @ X / n + jnp.diag(lam)
            w = w - jnp.linalg.solve(H, grad)
        return w

    @implicit_diff.custom_root(
        jax.grad(inner), solve=functools.partial(linear_solve.solve_cg, tol=CG_RTOL, atol=0.0, maxiter=1000)
    )
    def solver(init: Any, theta: Any, X: Any, y: Any) -> Any:
        return solve_inner(theta, X, y)

    def outer(theta: Any, X: Any, y: Any, Xv: Any, yv: Any) -> Any:
        w = solver(None, theta, X, y)
        if kind == "ridge":
            r = Xv @ w - yv
            return 0.5 * (r @ r) / Xv.shape[0]
        return jnp.mean(jax.nn.softplus(-yv * (Xv @ w)))

    hg = jax.jit(jax.grad(outer))
    sol = jax.jit(solve_inner)
    data = [jnp.asarray(t.numpy()) for t in (p.theta, p.X, p.y, p.Xv, p.yv)]
    return (lambda: hg(*data).block_until_ready()), (lambda: sol(*data[:3]).block_until_ready())


def section_hyper(args: argparse.Namespace) -> list[Comparison]:
    import jax

    jax.config.update("jax_enable_x64", True)
    out = []
    for kind in ("ridge", "logistic"):
        for d in args.hyper_dims:
            p = hyper_problem(kind, args.hyper_n, d)
            ref = reference_hypergrad(p)
            impls = {
                "ours": ours_hyper(p),
                "ours-fwd": ours_hyper(p, bl.ForwardOverReverse()),
                "torchopt": torchopt_hyper(p),
            }
            jx, jsolve = jaxopt_hyper(p)
            errs = {n: rel_err([f()], [ref]) for n, f in impls.items()}
            errs["jaxopt"] = rel_err([torch.from_numpy(__import__("numpy").asarray(jx()))], [ref])
            agree = {
                "torchopt": rel_err([impls["torchopt"]()], [impls["ours"]()]),
                "jaxopt": rel_err([torch.from_numpy(__import__("numpy").asarray(jx()))], [impls["ours"]()]),
            }
            print(f"[hyper] {kind} d={d}: errors against the dense reference {errs}")
            th_det = p.theta.detach()
            impls.update(
                {
                    "jaxopt": jx,
                    "solve-torch": lambda p=p, th=th_det: t_solve(th, p.X, p.y, p.kind),
                    "solve-jax": jsolve,
                }
            )
            c = compare(
                "hyper",
                f"{kind}, n={args.hyper_n}, d={d}",
                impls,
                ours="ours",
                peers=["jaxopt", "torchopt"],
                repeats=args.repeats_hyper,
                agreement=agree,
                also=["ours-fwd"],
                notes="ours: the default HVP (ReverseOverReverse); ours-fwd: bl.ForwardOverReverse(); "
                "solve-*: the inner solve alone. Errors against the dense reference: "
                + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
            )
            # the differentiation machinery alone: total minus the framework's own inner solve
            mach = {
                n: c.ms(n) - c.ms("solve-jax" if n == "jaxopt" else "solve-torch")
                for n in impls
                if "solve" not in n
            }
            c.notes += "; total minus the inner solve (ms): " + ", ".join(
                f"{k} {v:.2f}" for k, v in mach.items()
            )
            print(
                f"   machinery (total - solve), ms: { {k: round(v, 2) for k, v in mach.items()} }", flush=True
            )
            out.append(c)
    return out


# ---------------------------------------------------------------- (4) engine variants, (5) roofline
def section_variants(args: argparse.Namespace) -> list[Comparison]:
    """What each proposed engine change buys (see variants.py), with TorchOpt in the same rounds."""
    import variants

    out = []
    for key in args.settings:
        st = SETTINGS[key]
        mb = args.meta_batch[key]
        m64, th64, fn64, b64 = fewshot(st, 2, torch.float64)
        errs = variants.check(m64, fn64, th64, b64, IMAML)
        print(f"[variants] {st.name}: float64 agreement with the engine {errs}", flush=True)
        model, th, fn, batch = fewshot(st, mb, torch.float32)
        vs = variants.variants(model, fn, IMAML)
        top = torchopt_imaml(fn, list(th), IMAML.lam, IMAML.inner.lr, IMAML.inner.max_iter, 5)  # type: ignore[union-attr]
        impls = {n: functools.partial(f, th, batch) for n, f in vs.items()}
        impls["torchopt"] = functools.partial(top, th, batch)
        c = compare(
            "variants",
            f"{st.name}, meta-batch of {mb}",
            impls,
            ours="engine",
            peers=["torchopt"],
            repeats=args.repeats_batched,
            per=mb,
            unit="per task",
            agreement={k: v for k, v in errs.items() if k != "engine"},
            notes="agreement: each variant against the engine, float64",
            also=[v for v in vs if v != "engine"],
        )
        out.append(c)
    return out


def _primitives(
    method: str, B: int, fn: Any, bfn: Any, th: Params, big: Task, lam: float
) -> dict[str, Callable[[], Any]]:
    """grad (of G, support), lin (the linearization), hvp, query for B tasks with one method."""
    b = sub(big, B)

    def support(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(fn(p, x), y)

    def G(p: Params, theta: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return support(p, x, y) + sum(0.5 * lam * ((p[k] - theta[k]) ** 2).sum() for k in p)

    if method == "vmap":
        phi = {k: v.unsqueeze(0).expand(B, *v.shape).clone() for k, v in th.items()}
        gG = tf.vmap(tf.grad(G), in_dims=(0, None, 0, 0))
        gs = tf.vmap(tf.grad(support))

        def lin() -> Any:
            return tf.vjp(lambda p: gs(p, b.support_x, b.support_y), phi)[1]

        return {
            "grad": functools.partial(gG, phi, th, b.support_x, b.support_y),
            "lin": lin,
            "hvp": functools.partial(lin(), phi),
            "query": functools.partial(gs, phi, b.query_x, b.query_y),
        }
    if method == "batched":
        import variants

        names = list(th)
        thl = [th[k].unsqueeze(0) for k in names]
        leaves = [t.expand(B, *t.shape[1:]).clone().requires_grad_(True) for t in thl]
        pd = dict(zip(names, leaves))

        def grad(x: torch.Tensor = b.support_x, y: torch.Tensor = b.support_y, create: bool = False) -> Any:
            gs = torch.autograd.grad(variants.batched_loss(bfn, pd, x, y), leaves, create_graph=create)
            return torch._foreach_add(
                list(gs), torch._foreach_sub([t.detach() for t in leaves], thl), alpha=lam
            )

        gl = torch.autograd.grad(
            variants.batched_loss(bfn, pd, b.support_x, b.support_y), leaves, create_graph=True
        )
        u = [torch.randn_like(t) for t in leaves]
        return {
            "grad": grad,
            "lin": lambda: grad(create=True),
            "hvp": lambda: torch.autograd.grad(gl, leaves, u, retain_graph=True),
            "query": lambda: torch.autograd.grad(
                variants.batched_loss(bfn, pd, b.query_x, b.query_y), leaves
            ),
        }
    # one task, plain autograd
    p1 = {k: v.clone().requires_grad_(True) for k, v in th.items()}
    ps = list(p1.values())
    x1, y1, q1, qy1 = big.support_x[0], big.support_y[0], big.query_x[0], big.query_y[0]
    g1 = torch.autograd.grad(support(p1, x1, y1), ps, create_graph=True)
    u1 = [torch.randn_like(t) for t in ps]
    return {
        "grad": lambda: torch.autograd.grad(G(p1, th, x1, y1), ps),
        "lin": lambda: torch.autograd.grad(support(p1, x1, y1), ps, create_graph=True),
        "hvp": lambda: torch.autograd.grad(g1, ps, u1, retain_graph=True),
        "query": lambda: torch.autograd.grad(support(p1, q1, qy1), ps),
    }


def section_roofline(args: argparse.Namespace) -> list[Comparison]:
    """Meta-step time per task over the sum of its gradient-equivalents at their best batch size.

    Gradient-equivalents of one iMAML task meta-gradient: 16 inner gradients of G, the
    linearization (a support gradient with its graph kept), 5 HVPs (one backward each through the
    linearization) and the query gradient.  Each is timed alone, per task, for every method (vmap,
    the explicit batched model of variants.py, one task with plain autograd) and batch size; the
    ideal is the sum of the best of each.
    """
    import variants

    out = []
    for key in args.settings:
        st = SETTINGS[key]
        sizes = [b for b in args.roofline_batches if b <= args.roofline_max[key]]
        model, th, fn, big = fewshot(st, max(sizes), torch.float32)
        bfn = variants.batched_convnet(model)
        lam = IMAML.lam
        impls: dict[str, Callable[[], Any]] = {}
        per: dict[str, int] = {}
        fused = batched_model(model)
        assert fused is not None
        for method in ("vmap", "batched", "fused"):
            for B in sizes:
                f_b = fused.fast if method == "fused" else bfn
                for prim, f in _primitives(
                    "batched" if method == "fused" else method, B, fn, f_b, th, big, lam
                ).items():
                    if method == "fused" and prim in ("lin", "hvp"):
                        continue  # the fused norm's double backward is not trusted
                    if prim == "query" and B > args.roofline_query_max[key]:
                        continue  # the query gradient is larger; big batches are slow and never best
                    impls[f"{prim}@{method}{B}"] = f
                    per[f"{prim}@{method}{B}"] = B
        for prim, f in _primitives("loop", 1, fn, bfn, th, big, lam).items():
            impls[f"{prim}@loop"] = f
            per[f"{prim}@loop"] = 1
        mb = args.meta_batch[key]
        mbatch = sub(big, mb)
        impls["metastep"] = functools.partial(ours_imaml, fn, th, mbatch, bm=batched_model(model))
        impls["metastep-vmap"] = functools.partial(ours_imaml, fn, th, mbatch)
        per.update({"metastep": mb, "metastep-vmap": mb})
        before = loadavg()
        samples, cpu = interleaved(impls, args.repeats_roofline)
        per_task = {name: median(s) / per[name] for name, s in samples.items()}
        cpu_task = {name: median(s) / per[name] for name, s in cpu.items()}
        best = {}
        for prim in ("grad", "lin", "hvp", "query"):
            cands = {k: v for k, v in per_task.items() if k.startswith(prim + "@")}
            best[prim] = min(cands.items(), key=lambda kv: kv[1])
        ideal = 16 * best["grad"][1] + best["lin"][1] + 5 * best["hvp"][1] + best["query"][1]
        ratios = {m: per_task[m] / ideal for m in ("metastep", "metastep-vmap")}
        cbest = {
            prim: min(v for k, v in cpu_task.items() if k.startswith(prim + "@"))
            for prim in ("grad", "lin", "hvp", "query")
        }
        cideal = 16 * cbest["grad"] + cbest["lin"] + 5 * cbest["hvp"] + cbest["query"]
        cpu_ratios = {m: cpu_task[m] / cideal for m in ratios}
        c = Comparison(
            "roofline",
            f"{st.name}, meta-batch of {mb}",
            "per task",
            1,
            {k: [v] for k, v in per_task.items()},
            "metastep",
            [],
            {},
            before,
            loadavg(),
            notes=json.dumps(
                {
                    "best": {k: [n, 1e3 * v] for k, (n, v) in best.items()},
                    "ideal_ms": 1e3 * ideal,
                    "ratios": ratios,
                    "cpu_ideal_ms": 1e3 * cideal,
                    "cpu_ratios": cpu_ratios,
                }
            ),
        )
        print(
            f"[roofline] {st.name}: ideal {1e3 * ideal:.1f} ms/task; "
            + ", ".join(f"{m} {1e3 * per_task[m]:.1f} ms/task (ratio {r:.2f})" for m, r in ratios.items())
            + f"; best { ({k: (n, round(1e3 * v, 2)) for k, (n, v) in best.items()}) }; CPU-time ratios "
            + str({k: round(v, 2) for k, v in cpu_ratios.items()}),
            flush=True,
        )
        print("   per task ms:", {k: round(1e3 * v, 2) for k, v in per_task.items()}, flush=True)
        out.append(c)
    return out


# ----------------------------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": str(os.cpu_count()),
    }
    for name in ("torch", "torchopt", "higher", "jax", "jaxlib", "jaxopt", "numpy", "bilevel"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def tables(comps: list[Comparison]) -> str:
    lines = []
    for section in ("imaml", "maml", "hyper", "variants"):
        cs = [c for c in comps if c.section == section]
        if not cs:
            continue
        pairs = list(dict.fromkeys(pr for c in cs for pr in c.pairs()))
        names = [n for n in dict.fromkeys(n for c in cs for n in c.samples)]
        lines.append(f"\n### {section}\n")
        lines.append(
            "| case | unit | "
            + " | ".join(f"{n} (ms)" for n in names)
            + " | "
            + " | ".join(f"{p} / {o}" for p, o in pairs)
            + " | agreement (rel. err., float64) | load before -> after |"
        )
        lines.append("|" + "---|" * (3 + len(names) + len(pairs) + 1))
        for c in cs:
            cells = [f"{c.ms(n):.2f}" if n in c.samples else "" for n in names]
            rats = [
                (f"**{c.ratio(p, o):.2f}**" if o == c.ours else f"{c.ratio(p, o):.2f}")
                if (p, o) in c.pairs()
                else ""
                for p, o in pairs
            ]
            agree = ", ".join(f"{k} {v:.1e}" for k, v in c.agreement.items())
            lines.append(
                f"| {c.case} | {c.unit} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(rats)
                + f" | {agree} | {c.load_before[0]} -> {c.load_after[0]} |"
            )
    rl = [c for c in comps if c.section == "roofline"]
    if rl:
        lines.append("\n### roofline\n")
        lines.append(
            "| case | ideal (ms/task) | engine (ms/task) | ratio | engine, vmap (ms/task) | ratio "
            "| best method@batch per primitive (ms/task) |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for c in rl:
            n = json.loads(c.notes)
            r = n["ratios"]
            best = ", ".join(f"{k} {v[0].split('@')[1]}: {v[1]:.2f}" for k, v in n["best"].items())
            ms = {m: 1e3 * c.samples[m][0] for m in r}
            lines.append(
                f"| {c.case} | {n['ideal_ms']:.1f} | {ms['metastep']:.1f} | **{r['metastep']:.2f}** | "
                f"{ms['metastep-vmap']:.1f} | {r['metastep-vmap']:.2f} | {best} |"
            )
            cr = n["cpu_ratios"]
            lines.append(
                f"| (CPU time) | {n['cpu_ideal_ms']:.1f} | | {cr['metastep']:.2f} | | "
                f"{cr['metastep-vmap']:.2f} | |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for results.json and tables.md")
    p.add_argument("--quick", action="store_true", help="few repeats and small meta-batches (a smoke run)")
    p.add_argument("--sections", default="imaml,maml,hyper,roofline", help="also: variants (prototypes)")
    p.add_argument("--settings", default="5w1s,20w5s")
    p.add_argument("--repeats", type=int, default=None, help="rounds per comparison (default 11, quick 3)")
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = XLA_FLAGS  # read when JAX is first imported (in section_hyper)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt's functorch.vjp deprecation
    args.settings = args.settings.split(",")
    r = args.repeats or (3 if args.quick else 11)
    args.repeats = r
    args.repeats_batched = max(3, r // 2) if not args.quick else 3
    args.repeats_hyper = 2 * r if not args.quick else 5
    args.repeats_roofline = max(3, r // 2) if not args.quick else 3
    args.meta_batch = {"5w1s": 4 if args.quick else 16, "20w5s": 2 if args.quick else 4}
    args.hyper_n = 500
    args.hyper_dims = [50, 500]
    args.roofline_batches = [1, 4, 16, 32, 64]
    args.roofline_max = {"5w1s": 16 if args.quick else 64, "20w5s": 4 if args.quick else 16}
    args.roofline_query_max = {"5w1s": 16, "20w5s": 4}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started.isoformat(timespec="seconds"),
        "versions": versions(),
        "threads": {"torch": torch.get_num_threads(), "XLA_FLAGS": XLA_FLAGS},
        "load_start": loadavg(),
    }
    print(json.dumps(meta), flush=True)
    comps: list[Comparison] = []
    sections = {
        "imaml": section_imaml,
        "maml": section_maml,
        "hyper": section_hyper,
        "variants": section_variants,
        "roofline": section_roofline,
    }
    for name in args.sections.split(","):
        comps += sections[name](args)
        meta["load_end"] = loadavg()
        meta["minutes"] = round(
            (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60, 1
        )
        (out_dir / "results.json").write_text(
            json.dumps({"meta": meta, "comparisons": [c.to_json() for c in comps]}, indent=1)
        )
        (out_dir / "tables.md").write_text(tables(comps))
    print(tables(comps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
