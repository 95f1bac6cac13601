"""Where the time of the new user's iMAML meta-gradient goes, ours against TorchOpt.

Profiles the ``newuser`` computation of ``engine_speed.py`` (one task, Omniglot CNN, 16 inner GD
steps, 5 CG steps, float32) for ``bl.implicit_argmin`` and for TorchOpt's ``custom_root``, phase by
phase:

* phases are marked by wrapping what the user passes in (the objective G, the inner solver, the
  linear solver / TorchOpt's ``solve``) and, in this process only, by wrapping a few library
  functions at run time (``_Call.solve`` / ``_Call.backward`` / ``Point.F`` /
  ``Point.vjp_theta`` / ``Oracle.value_and_grad`` of bilevel; ``functorch.vjp`` as TorchOpt's
  implicit decorator calls it).  Nothing on disk is changed;
* ``ops``: every ``__torch_dispatch__`` call per phase (a ``TorchDispatchMode`` counter), with
  ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``: host syncs), ops that
  return float64 tensors (the problem is float32), and copy/reshape ops (cat, split, clone, copy,
  view, reshape, _to_copy, stack, expand) counted apart;
* ``calls``: G evaluations, ``torch.autograd.grad`` calls and matrix-vector products per phase;
* ``ms``: exclusive wall time per phase (median over ``--repeats`` calls without the op counter;
  ours and TorchOpt interleaved);
* ``cProfile``: Python time by file and the top functions;
* ``primitives``: the time of one gradient of G, the linearization, one HVP and the query
  gradient with plain autograd, and the "ideal" sum 16 grad + lin + 5 HVP + query.

Run::

    benchmarks/.venv-peers/bin/python benchmarks/engine_profile.py --out results/engine_profile

Writes ``profile.json`` and ``profile.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_speed as es

COPY_OPS = {
    "cat", "split", "split_with_sizes", "clone", "copy_", "_to_copy", "view", "reshape", "_unsafe_view",
    "stack", "expand", "detach", "alias", "t", "unsqueeze", "squeeze", "flatten", "contiguous",
}  # fmt: skip


class Phases:
    """A stack of phase names with exclusive wall time, op counts and event counts per phase path."""

    def __init__(self) -> None:
        self.stack = ["top"]
        self.t = time.perf_counter()
        self.ms: defaultdict[str, float] = defaultdict(float)
        self.ops: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.opnames: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.events: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.float32 = True

    def reset(self) -> None:
        self.ms.clear()
        self.ops.clear()
        self.opnames.clear()
        self.events.clear()
        self.stack = ["top"]
        self.t = time.perf_counter()

    def _switch(self) -> None:
        now = time.perf_counter()
        self.ms[self.path] += 1e3 * (now - self.t)
        self.t = now

    @property
    def path(self) -> str:
        return "/".join(self.stack[1:]) or "top"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()

    def event(self, name: str) -> None:
        self.events[self.path][name] += 1


PH = Phases()


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches ``__torch_dispatch__``, by the current phase."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        p = PH.path
        name = func.overloadpacket.__name__
        c = PH.ops[p]
        c["ops"] += 1
        PH.opnames[p][name] += 1
        if name == "_local_scalar_dense":
            c["host_syncs"] += 1
        if name in COPY_OPS:
            c["copy_reshape"] += 1
        leaves, _ = tree_flatten(out)
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in leaves):
            c["float64"] += 1
        return out


class Instrument:
    """Hooks given to the engine_speed builders: mark phases around what the user passes in."""

    def __init__(self, cg_iters: int) -> None:
        self.cg_iters = cg_iters
        self.vjp_calls = 0

    phase = staticmethod(lambda name: PH(name))

    def G(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapped(*a: Any) -> torch.Tensor:
            PH.event("G")
            with PH("G"):
                return fn(*a)

        return wrapped

    def solver(self, solver: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any) -> Any:
            with PH("inner_solve"):
                return solver(*a)

        return wrapped

    def _matvec(self, matvec: Callable[..., Any], first: str, rest: str, limit: int) -> Callable[..., Any]:
        k = 0

        def wrapped(u: Any) -> Any:
            nonlocal k
            k += 1
            name = first if k == 1 else rest if k <= limit else "final_residual_matvec"
            PH.event("matvec")
            with PH(name):
                return matvec(u)

        return wrapped

    def linear_solver(self, ls: Callable[..., Any]) -> Callable[..., Any]:
        """bilevel: ``ls(matvec, b, x0)``; matvecs 1..cg_iters are CG's, the next one _finish's."""

        def wrapped(matvec: Callable[..., Any], b: torch.Tensor, x0: Any = None) -> Any:
            with PH("cg"):
                return ls(self._matvec(matvec, "matvec", "matvec", self.cg_iters), b, x0)

        return wrapped

    def solve(self, solve: Callable[..., Any]) -> Callable[..., Any]:
        """TorchOpt: ``solve(matvec, b)``; its CG spends its first matvec on A(x0) with x0 = 0."""

        def wrapped(matvec: Callable[..., Any], b: Any, **kw: Any) -> Any:
            with PH("cg"):
                return solve(self._matvec(matvec, "matvec_at_x0", "matvec", self.cg_iters + 1), b, **kw)

        return wrapped


def _wrap_method(cls: Any, name: str, phase: str, when: Callable[[Any], bool] | None = None) -> None:
    fn = getattr(cls, name, None)
    if fn is None:
        print(f"note: {cls.__name__}.{name} not found; phase {phase!r} not marked")
        return

    def wrapped(self: Any, *a: Any, **k: Any) -> Any:
        if when is not None and not when(self):
            return fn(self, *a, **k)
        with PH(phase):
            return fn(self, *a, **k)

    setattr(cls, name, wrapped)


def patch_libraries() -> None:
    """Phase marks inside the libraries, in this process only."""
    import bilevel._hvp as hvp
    import bilevel._implicit as imp
    import bilevel.solvers._common as common

    _wrap_method(imp._Call, "solve", "layer_forward")
    _wrap_method(imp._Call, "backward", "layer_backward")
    _wrap_method(hvp.Point, "F", "linearize", when=lambda self: getattr(self, "_F", 1) is None)
    _wrap_method(hvp.Point, "vjp_theta", "cross")
    _wrap_method(common.Oracle, "value_and_grad", "value_and_grad")

    grad = torch.autograd.grad

    def counted_grad(*a: Any, **k: Any) -> Any:
        PH.event("autograd.grad")
        return grad(*a, **k)

    torch.autograd.grad = counted_grad

    import torchopt.diff.implicit.decorator as dec

    real = dec.functorch

    class Shim:
        """``functorch`` as TorchOpt's decorator sees it: vjp marked as linearization or cross term."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def vjp(fn: Callable[..., Any], *primals: Any, **kw: Any) -> Any:
            INST.vjp_calls += 1
            name = "linearize" if INST.vjp_calls % 2 == 1 else "cross_linearize"
            with PH(name):
                out, vjp_fn, *rest = real.vjp(fn, *primals, **kw)

            def marked(*a: Any) -> Any:
                if name == "cross_linearize":
                    with PH("cross"):
                        return vjp_fn(*a)
                return vjp_fn(*a)

            return (out, marked, *rest)

    dec.functorch = Shim()


INST = Instrument(es.CG_ITERS)


# ------------------------------------------------------------------------------------ measurements
def group(path: str) -> str:
    """A phase path, without the G / value_and_grad refinements, as a row label."""
    return path


def run_counted(fn: Callable[[], Any]) -> dict[str, Any]:
    PH.reset()
    INST.vjp_calls = 0
    with OpCounter():
        fn()
    PH._switch()
    return {
        "ops": {p: dict(c) for p, c in PH.ops.items()},
        "events": {p: dict(c) for p, c in PH.events.items()},
        "opnames": {p: dict(c.most_common(12)) for p, c in PH.opnames.items()},
    }


def run_timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    per: dict[str, defaultdict[str, list[float]]] = {n: defaultdict(list) for n in fns}
    totals: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(repeats + 1):
        for n in names if r % 2 == 0 else names[::-1]:
            PH.reset()
            INST.vjp_calls = 0
            t0 = time.perf_counter()
            fns[n]()
            PH._switch()
            if r == 0:
                continue  # warm-up
            totals[n].append(1e3 * (time.perf_counter() - t0))
            for p, v in PH.ms.items():
                per[n][p].append(v)
    out = {}
    for n in names:
        out[n] = {p: statistics.median(v + [0.0] * (repeats - len(v))) for p, v in per[n].items()}
        out[n]["TOTAL"] = statistics.median(totals[n])
    return out


def run_cprofile(fn: Callable[[], Any], calls: int) -> dict[str, Any]:
    fn()  # warm-up (TorchOpt's first call imports and traces)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    st = pstats.Stats(prof)
    by_file: Counter[str] = Counter()
    for (file, _line, _fn), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        key = file
        for marker in ("bilevel/", "torchopt/", "torch/", "site-packages/"):
            if marker in file:
                key = file[file.index(marker) :]
                break
        by_file[key] += tt
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    buf2 = io.StringIO()
    pstats.Stats(prof, stream=buf2).sort_stats("cumulative").print_stats("bilevel|torchopt", 30)
    return {
        "tottime_ms_per_call_by_file": {k: 1e3 * v / calls for k, v in by_file.most_common(25)},
        "top_tottime": buf.getvalue(),
        "top_cumulative_library": buf2.getvalue(),
    }


def primitives(pb: es.OneTask, repeats: int) -> dict[str, float]:
    """Milliseconds of the building blocks with plain autograd on one task."""
    ps = [v.clone().requires_grad_(True) for v in pb.values]
    th = [v.clone() for v in pb.values]

    def G() -> torch.Tensor:
        p = dict(zip(pb.names, ps))
        return F.cross_entropy(pb.fn(p, pb.xs), pb.ys) + 0.5 * es.LAM * sum(
            ((a - b) ** 2).sum() for a, b in zip(ps, th)
        )

    g = torch.autograd.grad(G(), ps, create_graph=True)
    u = [torch.randn_like(t) for t in ps]
    fns = {
        "grad_G": lambda: torch.autograd.grad(G(), ps),
        "linearize": lambda: torch.autograd.grad(G(), ps, create_graph=True),
        "hvp": lambda: torch.autograd.grad(g, ps, u, retain_graph=True),
        "query_grad": lambda: torch.autograd.grad(
            F.cross_entropy(pb.fn(dict(zip(pb.names, ps)), pb.xq), pb.yq), ps
        ),
    }
    out = {}
    for n, f in fns.items():
        f()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append(1e3 * (time.perf_counter() - t0))
        out[n] = statistics.median(ts)
    out["ideal"] = 16 * out["grad_G"] + out["linearize"] + 5 * out["hvp"] + out["query_grad"]
    return out


def table(counted: dict[str, dict[str, Any]], timed: dict[str, dict[str, float]]) -> str:
    lines = []
    for impl in counted:
        ops, ev, ms = counted[impl]["ops"], counted[impl]["events"], timed[impl]
        paths = sorted(set(ops) | set(ev) | {p for p in ms if p != "TOTAL"})
        n_ops = sum(c.get("ops", 0) for c in ops.values())
        head = ["phase (exclusive)", "ms", "ops", "host syncs", "float64 ops", "copy/reshape ops"]
        head += ["G calls", "autograd.grad", "matvecs"]
        lines += [
            f"\n#### {impl}: total {ms['TOTAL']:.1f} ms, {n_ops} ops\n",
            es._row(head),
            "|" + "---|" * len(head),
        ]
        for p in paths:
            o, e = ops.get(p, {}), ev.get(p, {})
            cells: list[object] = [p, f"{ms.get(p, 0.0):.2f}"]
            cells += [o.get(k, 0) for k in ("ops", "host_syncs", "float64", "copy_reshape")]
            cells += [e.get(k, 0) for k in ("G", "autograd.grad", "matvec")]
            lines.append(es._row(cells))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", default="results/engine_profile")
    p.add_argument("--setting", default="5w1s", choices=sorted(es.SETTINGS))
    p.add_argument("--repeats", type=int, default=15, help="timed calls per implementation")
    p.add_argument("--cprofile-calls", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # BilevelWarning (counted by engine_speed) and TorchOpt's FutureWarning
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import bilevel

    ways, shots = es.SETTINGS[args.setting]
    pb = es.one_task(ways, shots, torch.float32)
    probe = es._probe(pb)
    structure, extra = probe["structure"], probe["extra_kwargs"]
    plain = {"ours": es.ours_newuser(pb, structure, extra), "torchopt": es.torchopt_newuser(pb)}
    prof = {n: run_cprofile(f, args.cprofile_calls) for n, f in plain.items()}
    prims = primitives(pb, args.repeats)
    patch_libraries()
    inst = {"ours": es.ours_newuser(pb, structure, extra, INST), "torchopt": es.torchopt_newuser(pb, INST)}
    for f in inst.values():
        f()  # warm-up
    counted = {n: run_counted(f) for n, f in inst.items()}
    timed = run_timed(inst, args.repeats)
    res = {
        "bilevel": bilevel.__file__,
        "setting": args.setting,
        "structure": structure,
        "extra_kwargs": extra,
        "primitives_ms": prims,
        "phases_ms": timed,
        "counted": counted,
        "cprofile": prof,
    }
    (out_dir / "profile.json").write_text(json.dumps(res, indent=1))
    md = [f"### {args.setting}, bilevel from {bilevel.__file__}\n", table(counted, timed)]
    md.append("\nprimitives (ms, plain autograd): " + ", ".join(f"{k} {v:.2f}" for k, v in prims.items()))
    for n, pr in prof.items():
        md.append(f"\n#### cProfile {n}: tottime ms per call by file\n")
        md += [f"- {k}: {v:.2f}" for k, v in list(pr["tottime_ms_per_call_by_file"].items())[:15]]
    (out_dir / "profile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    for n, pr in prof.items():
        print(f"\n===== cProfile {n} (cumulative, library) =====\n{pr['top_cumulative_library']}")
        print(f"\n===== cProfile {n} (tottime) =====\n{pr['top_tottime']}")
    for n, c in counted.items():
        print(f"\n===== top ops per phase: {n} =====")
        for ph, names in c["opnames"].items():
            print(f"  {ph}: {names}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
