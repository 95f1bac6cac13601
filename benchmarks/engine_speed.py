"""Speed of the implicit engine as a new user meets it, and of a training meta-step across two checkouts.

Two sections, each measured side by side in one run of this script:

1. ``newuser``: ONE iMAML task meta-gradient written with the public core API, the way a new
   user writes it: the Omniglot CNN (``bilevel.metalearn.models.omniglot_cnn(ways)``, float32)
   called through ``torch.func.functional_call``, random 28 x 28 images, N-way K-shot support
   and 15 query images per class (5-way 1-shot and 20-way 5-shot).  Inner objective
   G(phi, theta) = CE(support) + lam/2 ||phi - theta||^2 with lam = 2, and::

       phi = bl.implicit_argmin(G, init, theta,
                                solver=bl.solvers.GradientDescent(lr=0.1, max_iter=16, tol=0),
                                linear_solver=bl.CG(max_iter=5, rtol=0, atol=0),
                                optimality_tol=None)
       torch.autograd.grad(CE(query at phi), theta)

   against TorchOpt: ``torchopt.diff.implicit.custom_root(grad G, argnums=1,
   solve=torchopt.linear_solve.solve_cg(maxiter=5, rtol=0, atol=0))`` around the same 16 GD
   steps (``torchopt.sgd``), the structure of ``benchmarks/peers/bench.py::torchopt_imaml``.
   theta is passed as a dict of tensors if ``implicit_argmin`` accepts one, else as a tuple
   (recorded).  If the call above raises (a 5-step CG with rtol=0 never "converges", which
   ``throw=True`` turns into a ``LinearSolveError``), the script records the error and times
   the call with ``throw=False``.  The library's warnings (BilevelWarning: inner solver or CG
   stopped at its iteration cap) are counted once, then silenced in the timed loop.  The two
   gradients are compared in float64 (relative error ||ours - theirs|| / ||theirs||).
   Reported ratio: torchopt / ours of the median times (> 1: ours is faster).

2. ``metastep``: one meta-training step of the command line (``bilevel.metalearn.training.train``),
   a baseline checkout against a candidate: ``meta_gradient(make_algorithm(name, ...), fn,
   F.cross_entropy, theta, batch, lam=None, classification=True, vectorize=True,
   batched=batched_model(model), diagnostics=(step % 10 == 0))`` (train's default
   ``log_every=10``), the finiteness check, ``leaf.grad = g`` and ``Adam.step()`` /
   ``zero_grad``, exactly as ``train`` does them.  5-way 1-shot Omniglot CNN, meta-batch 16, 15
   queries per class, random images; algorithms ``imaml-gd`` (the paper preset: 16 inner GD steps
   of 0.1, lam 2, 5 CG steps) and ``fomaml`` (5 inner steps of 0.4).  Baseline and candidate run
   in two long-lived worker processes of this script (``--worker``; labelled ``old`` and ``new``
   in the output), the baseline with ``PYTHONPATH=--old-root`` (default ``/work/baseline``, a
   ``git worktree`` of the baseline commit), the candidate with ``PYTHONPATH=--new-root``
   (default: this checkout).  Both build the same problem from the same seed; the parent sends
   "step" over a pipe to one, then the other, alternating the order every round, and each replies
   with the wall and CPU seconds of that step measured inside the worker.  Reported ratio:
   baseline / candidate (``old / new``) of the median times (target >= 0.95).  The worker uses
   only public names that exist in both checkouts (``make_algorithm``, ``meta_gradient``,
   ``batched_model``, ``make_functional``, ``omniglot_cnn``, ``Task``) and only keyword arguments
   of the baseline's signatures.  The two meta-gradients are compared once in float64 from the
   same seed (largest per-tensor relative difference).

Timing: ``time.perf_counter`` around complete calls, ``time.process_time`` beside it (CPU
seconds exclude waiting for a core on this shared machine; their ratio is printed in
parentheses), one warm-up call per implementation (two per worker), then A B B A ... over
``--repeats`` rounds; medians reported, and the median of the per-round ratios with its quartiles
("paired": a round times both back to back, which cancels slow drifts).  ``os.getloadavg()`` is
recorded before and after each comparison.  One torch thread per process.  On the shared 2-core
machine an A/A run (baseline == candidate) read 0.99-1.04 wall and up to 1.12 CPU-time ratio at
load ~2: a ratio within a few percent of its target needs a quiet machine and more rounds.

Run (after ``bash benchmarks/peers/setup.sh`` and
``git -C . worktree add --detach /work/baseline BASELINE_COMMIT``)::

    benchmarks/.venv-peers/bin/python benchmarks/engine_speed.py --out results/engine_speed
    benchmarks/.venv-peers/bin/python benchmarks/engine_speed.py --quick --out /tmp/es   # smoke run

The ``newuser`` section imports ``bilevel`` in this process (the peers venv's editable install of
this checkout); ``PYTHONPATH=/work/baseline`` in front of the command times the baseline instead
(and ``--new-root /work/baseline`` makes ``metastep`` an A/A check of the harness).

Writes ``results.json`` (every sample) and ``tables.md`` into ``--out``, and the workers' stderr
into ``worker-old.log`` / ``worker-new.log`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.func as tf
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
LAM = 2.0
INNER_STEPS, INNER_LR, CG_ITERS = 16, 0.1, 5
QUERIES = 15
SETTINGS = {"5w1s": (5, 1), "20w5s": (20, 5)}
LOG_EVERY = 10  # train's default: diagnostics on every 10th step
META_LR = 1e-3  # train's default Adam step size
ALGOS = {
    # name -> keyword arguments of make_algorithm (all exist in the baseline's signature)
    "imaml-gd": dict(inner_steps=16, inner_lr=0.1, lam=2.0, cg_iters=5),
    "fomaml": dict(inner_steps=5, inner_lr=0.4),
    "maml": dict(inner_steps=1, inner_lr=0.4),
    # the same work in a baseline without ``cg_warm_start`` and a candidate with it: CG from the
    # first-order gradient (6 HVPs), a baseline's only start (a version without the keyword gets
    # the rest)
    "imaml-gd-warm": dict(
        algo="imaml-gd", inner_steps=16, inner_lr=0.1, lam=2.0, cg_iters=5, cg_warm_start=True
    ),
}


# ------------------------------------------------------------------------------------------ timing
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


@dataclasses.dataclass
class Comparison:
    """Samples of several implementations of one computation, measured in the same rounds."""

    section: str
    case: str
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    ratio_of: tuple[str, str]  # (numerator, denominator): > 1 means the denominator is faster
    load_before: list[float]
    load_after: list[float]
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)

    def ms(self, name: str, cpu: bool = False) -> float:
        return 1e3 * median((self.cpu if cpu else self.wall)[name])

    def ratio(self, cpu: bool = False) -> float:
        a, b = self.ratio_of
        return self.ms(a, cpu) / self.ms(b, cpu)

    def paired(self, cpu: bool = False, of: tuple[str, str] | None = None) -> tuple[float, float, float]:
        """Median and quartiles of the per-round ratios numerator / denominator.

        Each round times both implementations back to back, so a per-round ratio cancels slow
        drifts (load, and in ``metastep`` the training trajectory changing the work per step).
        """
        a, b = of or self.ratio_of
        xs = self.cpu if cpu else self.wall
        r = [x / y for x, y in zip(xs[a], xs[b])]
        if len(r) < 2:
            return r[0], r[0], r[0]
        q1, _, q3 = statistics.quantiles(r, n=4)
        return statistics.median(r), q1, q3

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["median_ms"] = {n: self.ms(n) for n in self.wall}
        d["median_cpu_ms"] = {n: self.ms(n, cpu=True) for n in self.cpu}
        d["mean_ms"] = {n: 1e3 * statistics.fmean(v) for n, v in self.wall.items()}
        d["ratio"] = self.ratio()
        d["cpu_ratio"] = self.ratio(cpu=True)
        d["paired_ratio_median_q1_q3"] = self.paired()
        d["paired_cpu_ratio_median_q1_q3"] = self.paired(cpu=True)
        return d

    def line(self) -> str:
        a, b = self.ratio_of
        parts = ", ".join(f"{n} {self.ms(n):.1f} ms (cpu {self.ms(n, True):.1f})" for n in self.wall)
        return (
            f"[{self.section}] {self.case}: {parts}; {a}/{b} {self.ratio():.3f} (cpu {self.ratio(True):.3f}, "
            f"paired {self.paired()[0]:.3f}); load {self.load_before} -> {self.load_after}"
        )


def interleaved(
    impls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, self_timed: bool = False
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call, order A B B A ... so that load drifts hit every implementation alike.

    With ``self_timed`` every implementation returns its own ``(wall, cpu)`` (a worker process
    timing itself); otherwise calls are timed here.
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
            own = impls[n]()
            w, c = time.perf_counter() - t0, time.process_time() - c0
            if self_timed:
                w, c = own
            wall[n].append(w)
            cpu[n].append(c)
    return wall, cpu


def compare(
    section: str,
    case: str,
    impls: dict[str, Callable[[], Any]],
    ratio_of: tuple[str, str],
    repeats: int,
    warmup: int = 1,
    checks: dict[str, Any] | None = None,
    self_timed: bool = False,
) -> Comparison:
    before = loadavg()
    wall, cpu = interleaved(impls, repeats, warmup, self_timed)
    c = Comparison(section, case, wall, cpu, ratio_of, before, loadavg(), checks or {})
    print(c.line(), flush=True)
    return c


def rel_err(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors (float64)."""
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b, strict=True))
    den = sum(float((y.double() ** 2).sum()) for y in b)
    return math.sqrt(num / den)


# ------------------------------------------------------------------------------ (1) newuser
@dataclasses.dataclass
class OneTask:
    """The Omniglot CNN, its parameter values and one N-way K-shot task with random images."""

    model: torch.nn.Module
    names: list[str]
    values: list[torch.Tensor]  # theta's values, in named_parameters order
    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    def fn(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return tf.functional_call(self.model, params, (x,))

    def as_dict(self, p: Any) -> dict[str, torch.Tensor]:
        return p if isinstance(p, dict) else dict(zip(self.names, p))


def one_task(ways: int, shots: int, dtype: torch.dtype, seed: int = 0) -> OneTask:
    from bilevel.metalearn.models import omniglot_cnn

    torch.manual_seed(seed)
    model = omniglot_cnn(ways).to(dtype)  # torch's default initialization, seeded
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.rand(ways * shots, 1, 28, 28, generator=g, dtype=dtype)
    xq = torch.rand(ways * QUERIES, 1, 28, 28, generator=g, dtype=dtype)
    ys = torch.arange(ways).repeat_interleave(shots)
    yq = torch.arange(ways).repeat_interleave(QUERIES)
    return OneTask(model, names, values, xs, ys, xq, yq)


def ours_newuser(
    pb: OneTask, structure: str, extra: dict[str, Any], inst: Any = None
) -> Callable[[], list[torch.Tensor]]:
    """The new user's meta-gradient with bilevel's public core API (``structure``: dict or tuple).

    ``inst`` (``engine_profile.py``) wraps G, the solvers and the phases; ``None`` for timing.
    """
    import bilevel as bl

    inst = inst or _NoInstrument()

    def G(phi: Any, theta: Any) -> torch.Tensor:
        p, t = pb.as_dict(phi), pb.as_dict(theta)
        loss = F.cross_entropy(pb.fn(p, pb.xs), pb.ys)
        return loss + 0.5 * LAM * sum(((p[k] - t[k]) ** 2).sum() for k in p)

    def run() -> list[torch.Tensor]:
        leaves = [v.clone().requires_grad_(True) for v in pb.values]
        theta: Any = dict(zip(pb.names, leaves)) if structure == "dict" else tuple(leaves)
        init: Any = (
            {k: v.detach().clone() for k, v in theta.items()}
            if structure == "dict"
            else tuple(t.detach().clone() for t in theta)
        )
        phi = bl.implicit_argmin(
            inst.G(G),
            init,
            theta,
            solver=inst.solver(bl.solvers.GradientDescent(lr=INNER_LR, max_iter=INNER_STEPS, tol=0)),
            linear_solver=inst.linear_solver(bl.CG(max_iter=CG_ITERS, rtol=0, atol=0)),
            optimality_tol=None,
            **extra,
        )
        with inst.phase("query_forward"):
            query_loss = F.cross_entropy(pb.fn(pb.as_dict(phi), pb.xq), pb.yq)
        with inst.phase("backward"):
            return list(torch.autograd.grad(query_loss, leaves))

    return run


def torchopt_newuser(pb: OneTask, inst: Any = None) -> Callable[[], list[torch.Tensor]]:
    """TorchOpt's iMAML for one task (bench.py's ``torchopt_imaml``, without the task loop)."""
    import torchopt

    inst = inst or _NoInstrument()

    def G_(
        params: tuple[torch.Tensor, ...], meta: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor
    ) -> Any:
        loss = F.cross_entropy(pb.fn(dict(zip(pb.names, params)), x), y)
        for a, b in zip(params, meta):
            loss = loss + 0.5 * LAM * torch.sum(torch.square(a - b))
        return loss

    G = inst.G(G_)

    @torchopt.diff.implicit.custom_root(
        tf.grad(G, argnums=0),
        argnums=1,
        solve=inst.solve(torchopt.linear_solve.solve_cg(maxiter=CG_ITERS, rtol=0.0, atol=0.0)),
    )
    def inner(
        params: tuple[torch.Tensor, ...], meta: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor
    ) -> Any:
        opt = torchopt.sgd(lr=INNER_LR)
        state = opt.init(params)
        with torch.enable_grad(), inst.phase("inner_solve"):
            for _ in range(INNER_STEPS):
                grads = torch.autograd.grad(G(params, meta, x, y), params)
                updates, state = opt.update(grads, state, inplace=True)
                params = torchopt.apply_updates(params, updates, inplace=True)
        return params

    def run() -> list[torch.Tensor]:
        meta = tuple(v.clone().requires_grad_(True) for v in pb.values)
        init = tuple(t.detach().clone().requires_grad_(True) for t in meta)
        with inst.phase("layer_forward"):
            phi = inner(init, meta, pb.xs, pb.ys)
        with inst.phase("query_forward"):
            query_loss = F.cross_entropy(pb.fn(dict(zip(pb.names, phi)), pb.xq), pb.yq)
        with inst.phase("backward"):
            return list(torch.autograd.grad(query_loss, meta))

    return run


def floor_newuser(pb: OneTask) -> Callable[[], list[torch.Tensor]]:
    """The least work any implicit layer must do for the newuser computation, by hand in plain autograd.

    16 gradients of G without a graph, the query gradient, ONE linearization of grad_phi G at the
    answer (``create_graph``), 5 CG steps from 0 whose matvecs reuse that graph (no matvec for the
    initial residual), and the cross term through the same graph: no checks, no diagnostics, no
    tree handling, no library.  ``TorchOpt / floor`` is therefore the largest speed-up over
    TorchOpt that any layer computing these same numbers can reach on this machine.
    """

    def G(phi: list[torch.Tensor], theta: list[torch.Tensor]) -> torch.Tensor:
        loss = F.cross_entropy(pb.fn(dict(zip(pb.names, phi)), pb.xs), pb.ys)
        return loss + 0.5 * LAM * sum(((p - t) ** 2).sum() for p, t in zip(phi, theta))

    shapes = [v.shape for v in pb.values]
    sizes = [v.numel() for v in pb.values]

    def views(flat: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(sh) for t, sh in zip(flat.split(sizes), shapes)]

    def cat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def run() -> list[torch.Tensor]:
        leaves = [v.clone().requires_grad_(True) for v in pb.values]
        fixed = [t.detach() for t in leaves]
        phi = [t.clone() for t in fixed]
        for _ in range(INNER_STEPS):
            ps = [p.requires_grad_(True) for p in phi]
            grads = torch.autograd.grad(G(ps, fixed), ps)
            phi = torch._foreach_add([p.detach() for p in ps], grads, alpha=-INNER_LR)
        ps = [p.requires_grad_(True) for p in phi]
        v = cat(torch.autograd.grad(F.cross_entropy(pb.fn(dict(zip(pb.names, ps)), pb.xq), pb.yq), ps))
        thetas = [t.detach().requires_grad_(True) for t in leaves]
        Fg = torch.autograd.grad(G(ps, thetas), ps, create_graph=True)
        # CG from 0 on flat vectors (one op per vector update)
        x, r, p = torch.zeros_like(v), v, v
        rr = r @ r
        for _ in range(CG_ITERS):
            Ap = cat(torch.autograd.grad(Fg, ps, views(p), retain_graph=True))
            alpha = rr / (p @ Ap)
            x = x + alpha * p
            r = r - alpha * Ap
            rr_new = r @ r
            p = r + (rr_new / rr) * p
            rr = rr_new
        # d(query)/d(theta) = -(d grad_phi G / d theta)^T x, through the same graph
        return [-g for g in torch.autograd.grad(Fg, thetas, views(x))]

    return run


class _NoInstrument:
    """The identity hooks: what ``engine_profile.py`` replaces to mark phases."""

    @staticmethod
    def G(f: Any) -> Any:
        return f

    solver = linear_solver = solve = G

    @staticmethod
    def phase(name: str) -> Any:
        return contextlib.nullcontext()


def _probe(pb: OneTask) -> dict[str, Any]:
    """How the brief's call runs today: the structure accepted for theta, whether throw=False is needed,
    and the warnings of one call (counted by category and message)."""
    import bilevel as bl

    attempts = []
    for structure in ("dict", "tuple"):
        extra: dict[str, Any] = {}
        for _ in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    ours_newuser(pb, structure, extra)()
                except (TypeError, bl.StructureError) as err:
                    attempts.append(f"{structure}: {type(err).__name__}: {str(err)[:200]}")
                    break
                except (bl.LinearSolveError, bl.NegativeCurvatureError, bl.OptimalityError) as err:
                    attempts.append(
                        f"{structure}, {extra or 'defaults'}: {type(err).__name__}: {str(err)[:300]}"
                    )
                    extra = {"throw": False}
                    continue
            msgs = Counter(f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught)
            return {
                "structure": structure,
                "extra_kwargs": extra,
                "failed_attempts": attempts,
                "warnings_per_call": sum(msgs.values()),
                "warnings": dict(msgs),
            }
    raise RuntimeError(f"implicit_argmin accepts neither a dict nor a tuple theta: {attempts}")


def _diagnostics64(pb64: OneTask, structure: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Our work counts at the float64 check point (evaluations, matvecs, statuses), via return_info."""
    import bilevel as bl

    leaves = [v.clone().requires_grad_(True) for v in pb64.values]
    theta: Any = dict(zip(pb64.names, leaves)) if structure == "dict" else tuple(leaves)
    init: Any = (
        {k: v.detach().clone() for k, v in theta.items()}
        if structure == "dict"
        else tuple(t.detach().clone() for t in leaves)
    )

    def G(phi: Any, th: Any) -> torch.Tensor:
        p, t = pb64.as_dict(phi), pb64.as_dict(th)
        return F.cross_entropy(pb64.fn(p, pb64.xs), pb64.ys) + 0.5 * LAM * sum(
            ((p[k] - t[k]) ** 2).sum() for k in p
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        phi, info = bl.implicit_argmin(
            G,
            init,
            theta,
            solver=bl.solvers.GradientDescent(lr=INNER_LR, max_iter=INNER_STEPS, tol=0),
            linear_solver=bl.CG(max_iter=CG_ITERS, rtol=0, atol=0),
            optimality_tol=None,
            return_info=True,
            **extra,
        )
        torch.autograd.grad(F.cross_entropy(pb64.fn(pb64.as_dict(phi), pb64.xq), pb64.yq), leaves)
    sr, lb = info.solver_result, info.last_backward
    return {
        "inner_status": getattr(getattr(sr, "status", None), "name", None),
        "inner_n_gev": getattr(sr, "n_gev", None),
        "inner_n_iter": getattr(sr, "n_iter", None),
        "residual_norm": info.residual_norm,
        "cg_status": getattr(getattr(lb, "status", None), "name", None),
        "cg_n_iter": getattr(lb, "n_iter", None),
        "cg_n_matvec": getattr(lb, "n_matvec", None),
        "cg_relative_residual": getattr(lb, "relative_residual", None),
    }


def section_newuser(args: argparse.Namespace) -> list[Comparison]:
    import bilevel as bl

    out = []
    for key in args.settings:
        ways, shots = SETTINGS[key]
        pb = one_task(ways, shots, torch.float32)
        probe = _probe(pb)
        structure, extra = probe["structure"], probe["extra_kwargs"]
        print(f"[newuser] {key}: theta as {structure}, extra {extra}; one call warns: {probe['warnings']}")
        for a in probe["failed_attempts"]:
            print(f"[newuser] {key}: attempt failed: {a}")
        pb64 = one_task(ways, shots, torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bl.BilevelWarning)
            ours64 = ours_newuser(pb64, structure, extra)()
        err = rel_err(ours64, torchopt_newuser(pb64)())
        err_floor = rel_err(floor_newuser(pb64)(), ours64)
        diag = _diagnostics64(pb64, structure, extra)
        print(f"[newuser] {key}: float64 agreement ours vs TorchOpt {err:.2e}, floor vs ours {err_floor:.2e}")
        print(f"[newuser] {key}: ours' work: {diag}")
        impls = {
            "ours": ours_newuser(pb, structure, extra),
            "torchopt": torchopt_newuser(pb),
            "floor": floor_newuser(pb),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bl.BilevelWarning)  # counted once above
            out.append(
                compare(
                    "newuser",
                    f"{ways}-way {shots}-shot, 1 task",
                    impls,
                    ("torchopt", "ours"),
                    args.repeats,
                    checks={
                        "agreement_float64": err,
                        "floor_agreement_float64": err_floor,
                        **probe,
                        "work_float64": diag,
                    },
                )
            )
        c = out[-1]
        print(
            f"[newuser] {key}: TorchOpt / floor {c.ms('torchopt') / c.ms('floor'):.3f} (paired "
            f"{c.paired(of=('torchopt', 'floor'))[0]:.3f}), ours / floor {c.ms('ours') / c.ms('floor'):.3f} "
            f"(paired {c.paired(of=('ours', 'floor'))[0]:.3f})",
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------ (2) metastep
class _Step:
    """One algorithm's training state in a worker: model, theta, Adam, the fixed random meta-batch."""

    def __init__(self, algo: str, dtype: torch.dtype, seed: int, meta_batch: int) -> None:
        from bilevel.metalearn import Task, batched_model, make_algorithm, make_functional, meta_gradient
        from bilevel.metalearn.models import omniglot_cnn

        self.meta_gradient = meta_gradient
        ways, shots = SETTINGS["5w1s"]
        model = omniglot_cnn(ways).to(dtype)
        fn, theta0 = make_functional(model, torch.Generator().manual_seed(seed), dtype=dtype)
        self.fn = fn
        self.bm = batched_model(model)
        spec = dict(ALGOS[algo])
        name = str(spec.pop("algo", algo))
        params = inspect.signature(make_algorithm).parameters
        # keyword arguments this version takes (all of them where it takes **settings)
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in spec.items() if takes_all or k in params}
        self.algo = make_algorithm(name, **kwargs)  # type: ignore[arg-type]
        self.theta = {k: v.detach().clone().requires_grad_(True) for k, v in theta0.items()}
        self.opt = torch.optim.Adam(list(self.theta.values()), lr=META_LR)
        g = torch.Generator().manual_seed(seed + 1)
        B = meta_batch
        protos = torch.rand(B, ways, 1, 1, 28, 28, generator=g, dtype=dtype)

        def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = (protos + 0.3 * torch.randn(B, ways, k, 1, 28, 28, generator=g, dtype=dtype)).clamp(0, 1)
            y = torch.arange(ways).repeat_interleave(k).expand(B, -1).contiguous()
            return x.reshape(B, ways * k, 1, 28, 28), y

        xs, ys = draw(shots)
        xq, yq = draw(QUERIES)
        self.batch = Task(xs, ys, xq, yq)
        self.B = B
        self.step_i = 0
        # keyword arguments train passes, kept to those this version's meta_gradient accepts
        sig = inspect.signature(meta_gradient).parameters
        want: dict[str, Any] = dict(lam=None, classification=True, vectorize=True, batched=self.bm)
        self.kwargs = {k: v for k, v in want.items() if k in sig}
        self.dropped = sorted(set(want) - set(self.kwargs))

    def grad(self, diagnostics: bool) -> tuple[dict[str, torch.Tensor], Any]:
        out = self.meta_gradient(
            self.algo,
            self.fn,
            F.cross_entropy,
            self.theta,
            self.batch,
            diagnostics=diagnostics,
            **self.kwargs,
        )
        return out[0], out[2]

    def train_step(self, diagnostics: bool) -> None:
        """What one iteration of ``train``'s loop costs on one rank (no logging, no all-reduce)."""
        g, stats = self.grad(diagnostics)
        if not bool(torch.stack([torch.isfinite(t).all() for t in g.values()]).all()):
            raise FloatingPointError("the meta-gradient has NaN or infinity")
        grads = [g[k].detach() * self.B for k in self.theta]
        scal = torch.zeros(5, dtype=torch.float64)
        scal[0] = stats.query_loss.double().sum()
        scal[1] = stats.query_acc.double().nan_to_num(0.0).sum()
        scal[2] = stats.negative_curvature.double().sum()
        for leaf, gr in zip(self.theta.values(), grads):
            leaf.grad = (gr / self.B).to(leaf.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(scal[0]), float(scal[1])
        if diagnostics:  # train reads these for its log record
            float(stats.support_loss.mean()), float(stats.inner_grad_norm.mean())


def worker_main(args: argparse.Namespace) -> int:
    """Serve JSON commands on stdin; replies on the original stdout (library output goes to stderr)."""
    torch.set_num_threads(1)
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr
    import bilevel

    states: dict[str, _Step] = {}

    def reply(obj: dict[str, Any]) -> None:
        reply_to.write(json.dumps(obj) + "\n")

    for raw in sys.stdin:
        cmd = json.loads(raw)
        try:
            if cmd["cmd"] == "hello":
                reply(
                    {
                        "bilevel": bilevel.__file__,
                        "torch": torch.__version__,
                        "threads": torch.get_num_threads(),
                    }
                )
            elif cmd["cmd"] == "setup":
                st = _Step(cmd["algo"], torch.float32, cmd["seed"], cmd["meta_batch"])
                states[cmd["algo"]] = st
                reply({"ok": True, "dropped_kwargs": st.dropped})
            elif cmd["cmd"] == "step":
                st = states[cmd["algo"]]
                mode = cmd["diagnostics"]
                diag = st.step_i % LOG_EVERY == 0 if mode == "train" else mode == "on"
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    c0, t0 = time.process_time(), time.perf_counter()
                    st.train_step(diag)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                st.step_i += 1
                reply({"wall": wall, "cpu": cpu, "diagnostics": diag, "warnings": len(caught)})
            elif cmd["cmd"] == "grad64":
                st = _Step(cmd["algo"], torch.float64, cmd["seed"], cmd["meta_batch"])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g, stats = st.grad(True)
                torch.save(
                    {"grad": {k: v.detach() for k, v in g.items()}, "query_loss": stats.query_loss.detach()},
                    cmd["path"],
                )
                reply({"ok": True})
            elif cmd["cmd"] == "quit":
                reply({"ok": True})
                return 0
            else:
                reply({"error": f"unknown command {cmd['cmd']!r}"})
        except Exception as err:  # report to the parent, which stops the run with the message
            reply({"error": f"{type(err).__name__}: {err}"})
    return 0


class Worker:
    """A worker process of this script with ``root`` first on its import path."""

    def __init__(self, label: str, root: Path, log: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.label = label
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            cwd=tempfile.gettempdir(),  # no bilevel/ in the working directory
            env=env,
        )
        self.hello = self.ask({"cmd": "hello"})
        where = Path(self.hello["bilevel"]).resolve()
        if root.resolve() not in where.parents:
            raise RuntimeError(f"worker {label}: imported bilevel from {where}, not from {root}")

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died; see {self.log.name}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"worker {self.label}: {out['error']} (command {cmd})")
        return out

    def close(self) -> None:
        try:
            self.ask({"cmd": "quit"})
        finally:
            self.proc.wait(timeout=30)
            self.log.close()


def _git(root: Path) -> dict[str, Any]:
    """Commit and number of modified tracked files of a checkout (read-only git commands)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        return {"commit": head, "modified_tracked_files": len(dirty)}
    except OSError:
        return {}


def section_metastep(args: argparse.Namespace) -> list[Comparison]:
    out_dir = Path(args.out)
    old_root, new_root = Path(args.old_root), Path(args.new_root)
    workers = {
        "old": Worker("old", old_root, out_dir / "worker-old.log"),
        "new": Worker("new", new_root, out_dir / "worker-new.log"),
    }
    comps = []
    try:
        origin = {n: {**w.hello, **_git(r)} for (n, w), r in zip(workers.items(), (old_root, new_root))}
        print(f"[metastep] workers: {origin}", flush=True)
        for algo in args.algos:
            for w in workers.values():
                dropped = w.ask(
                    {"cmd": "setup", "algo": algo, "seed": args.seed, "meta_batch": args.meta_batch}
                )
                if dropped["dropped_kwargs"]:
                    print(f"[metastep] {w.label}: meta_gradient lacks {dropped['dropped_kwargs']}")
            # agreement, float64, same seed, a fresh theta
            with tempfile.TemporaryDirectory() as tmp:
                got = {}
                for n, w in workers.items():
                    path = str(Path(tmp) / f"{n}.pt")
                    w.ask(
                        {
                            "cmd": "grad64",
                            "algo": algo,
                            "seed": args.seed,
                            "meta_batch": args.meta_batch,
                            "path": path,
                        }
                    )
                    got[n] = torch.load(path)
            ga, gb = got["new"]["grad"], got["old"]["grad"]
            per = {k: float((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-300)) for k in gb}
            agree = {
                "max_rel_diff_per_tensor": max(per.values()),
                "total_rel_err": rel_err([ga[k] for k in gb], list(gb.values())),
                "query_loss_max_abs_diff": float(
                    (got["new"]["query_loss"] - got["old"]["query_loss"]).abs().max()
                ),
            }
            print(f"[metastep] {algo}: float64 new vs old {agree}", flush=True)
            samples: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}

            def stepper(
                name: str, algo: str = algo, samples: dict[str, list[dict[str, Any]]] = samples
            ) -> Callable[[], tuple[float, float]]:
                def run() -> tuple[float, float]:
                    r = workers[name].ask({"cmd": "step", "algo": algo, "diagnostics": args.diagnostics})
                    samples[name].append(r)
                    return r["wall"], r["cpu"]

                return run

            c = compare(
                "metastep",
                f"{algo}, 5-way 1-shot, meta-batch {args.meta_batch}",
                {"old": stepper("old"), "new": stepper("new")},
                ("old", "new"),
                args.metastep_repeats,
                warmup=2,
                self_timed=True,
                checks={"agreement_float64": agree, "workers": origin, "diagnostics": args.diagnostics},
            )
            # every reply, warm-up steps included (the first 2 of each worker)
            c.checks["warnings_per_step"] = {n: [s["warnings"] for s in v] for n, v in samples.items()}
            c.checks["diagnostic_steps"] = {n: [s["diagnostics"] for s in v] for n, v in samples.items()}
            comps.append(c)
    finally:
        for w in workers.values():
            w.close()
    return comps


# ----------------------------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": str(os.cpu_count()),
    }
    for name in ("torch", "torchopt", "numpy", "bilevel"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _iqr(m: tuple[float, float, float]) -> str:
    return f"{m[0]:.3f} ({m[1]:.2f}-{m[2]:.2f})"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def tables(comps: list[Comparison]) -> str:
    lines = []
    nu = [c for c in comps if c.section == "newuser"]
    if nu:
        head = ["case", "ours (ms)", "TorchOpt (ms)", "floor (ms)", "**TorchOpt / ours**", "CPU-time ratio"]
        head += ["paired ratio, median (IQR)", "theta as", "extra kwargs", "warnings per call"]
        head += ["agreement (float64)", "TorchOpt / floor (paired)", "ours / floor (paired)"]
        head += ["load before -> after"]
        lines += [
            "\n### newuser: one iMAML task meta-gradient, public core API vs TorchOpt (float32)\n",
            _row(head),
            "|" + "---|" * len(head),
        ]
        for c in nu:
            k = c.checks
            cells = [c.case, f"{c.ms('ours'):.1f}", f"{c.ms('torchopt'):.1f}", f"{c.ms('floor'):.1f}"]
            cells += [f"**{c.ratio():.2f}**"]
            cells += [f"{c.ratio(True):.2f}", _iqr(c.paired()), k["structure"], k["extra_kwargs"] or "-"]
            cells += [k["warnings_per_call"], f"{k['agreement_float64']:.1e}"]
            cells += [_iqr(c.paired(of=("torchopt", "floor"))), _iqr(c.paired(of=("ours", "floor")))]
            cells += [f"{c.load_before[0]} -> {c.load_after[0]}"]
            lines.append(_row(cells))
    ms = [c for c in comps if c.section == "metastep"]
    if ms:
        head = [
            "case",
            "old (ms)",
            "new (ms)",
            "**old / new**",
            "CPU-time ratio",
            "paired ratio, median (IQR)",
        ]
        head += ["old mean (ms)", "new mean (ms)", "max rel. diff (float64)", "load before -> after"]
        lines += [
            "\n### metastep (meta_gradient + Adam, float32): baseline (old) vs candidate (new)\n",
            _row(head),
            "|" + "---|" * len(head),
        ]
        for c in ms:
            a = c.checks["agreement_float64"]
            mean = {n: 1e3 * statistics.fmean(c.wall[n]) for n in ("old", "new")}
            cells = [c.case, f"{c.ms('old'):.1f}", f"{c.ms('new'):.1f}", f"**{c.ratio():.3f}**"]
            cells += [f"{c.ratio(True):.3f}", _iqr(c.paired()), f"{mean['old']:.1f}", f"{mean['new']:.1f}"]
            cells += [f"{a['max_rel_diff_per_tensor']:.1e}", f"{c.load_before[0]} -> {c.load_after[0]}"]
            lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", default="results/engine_speed", help="folder for results.json and tables.md")
    p.add_argument("--quick", action="store_true", help="3 rounds per comparison (a smoke run, minutes)")
    p.add_argument("--sections", default="newuser,metastep")
    p.add_argument("--settings", default="5w1s,20w5s", help="newuser settings")
    p.add_argument("--algos", default="imaml-gd,fomaml", help="metastep algorithms")
    p.add_argument("--repeats", type=int, default=None, help="newuser rounds (default 21, quick 3)")
    p.add_argument("--metastep-repeats", type=int, default=None, help="metastep rounds (default 20, quick 3)")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument(
        "--diagnostics",
        choices=("train", "on", "off"),
        default="train",
        help="metastep: diagnostics every 10th step as train does (default), always or never",
    )
    p.add_argument("--old-root", default="/work/baseline", help="checkout of the baseline (a git worktree)")
    p.add_argument("--new-root", default=str(ROOT), help="checkout of the candidate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TorchOpt's functorch.vjp deprecation
    args.settings = args.settings.split(",")
    args.algos = args.algos.split(",")
    args.repeats = args.repeats or (3 if args.quick else 21)
    args.metastep_repeats = args.metastep_repeats or (3 if args.quick else 20)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import bilevel

    started = datetime.datetime.now(datetime.timezone.utc)
    meta: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "started": started.isoformat(timespec="seconds"),
        "versions": versions(),
        "bilevel_file": bilevel.__file__,
        "checkout": _git(ROOT),
        "threads": torch.get_num_threads(),
        "load_start": loadavg(),
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
    }
    print(json.dumps(meta), flush=True)
    sections = {"newuser": section_newuser, "metastep": section_metastep}
    comps: list[Comparison] = []
    for name in args.sections.split(","):
        comps += sections[name](args)
        meta["load_end"] = loadavg()
        meta["minutes"] = round(
            (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60, 1
        )
        (out_dir / "results.json").write_text(
            json.dumps({"meta": meta, "comparisons": [c.to_json() for c in comps]}, indent=1, default=str)
        )
        (out_dir / "tables.md").write_text(tables(comps))
    print(tables(comps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
