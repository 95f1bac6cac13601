"""One meta-step of learn2learn, betty and higher beside ours: CPU time, peak memory, gradient agreement.

A meta-step is everything one outer iteration of training does with a meta-batch already drawn:
every task's inner loop, the meta-gradient, and the optimizer step.  Ours is our training loop's
step (`bilevel.metalearn.training.step.MetaStep`, what ``python -m bilevel.metalearn train`` runs per
meta-step); each peer's is its published example's (``meta_peers.py`` says which and how).  Both
sides compute on the same problem: our Omniglot (``--data-root``, default ``$BILEVEL_DATA_ROOT``),
our task sampler and split, our Conv4 with batch statistics, the same initial parameters, float32,
one thread.  The meta-batches are drawn before timing (drawing is not timed, for either side).

Subcommands (each comparison runs in its own processes):

* ``time``: the two steps alternate A B B A ... over ``--repeats`` rounds after one warm-up step
  each, in one process; CPU seconds (``time.process_time``) and wall seconds per step, medians,
  the ratio theirs / ours of the median CPU times, and ``os.getloadavg()`` before and after.
* ``memory``: one side alone in a fresh process: after the set-up (data, model, three meta-batches
  drawn) the kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` <- 5), three meta-steps run
  (the first included, since memory a step frees stays with the allocator), and ``VmHWM`` (peak
  RSS) is read from ``/proc/self/status``; reported: the peak above the RSS before the steps (what
  meta-training adds to the process) and the process's peak, set-up included.
* ``tensors``: both sides in one process, one warm-up step each, then one step each under
  `LiveTensorBytes`: the peak of the bytes held by tensors the step creates (saved activations,
  parameter copies, gradients; not the allocator's cache, oneDNN's kernels or scratch space,
  which the RSS of ``memory`` includes).  Exact and free of the allocator's noise.
* ``allocator``: both sides in one process, one warm-up step each, then one step each under
  ``torch.profiler`` with ``profile_memory``: the peak of the bytes PyTorch's CPU allocator holds
  above the start of the step, every allocation included (the kernels' scratch too, which
  ``tensors`` does not see); not oneDNN's own buffers, Python objects or code pages.
* ``agree``: float64, one meta-step's meta-gradient of each side from the same parameters on the
  same tasks (``--agree-batch`` of them); relative error ||theirs - ours|| / ||ours||.
* ``convshare``: each side's share of CPU time in the convolution kernels, under
  ``torch.profiler`` (two steps after a warm-up step); the ceiling of a rewrite that keeps them.
* ``all``: every case of `CASES` (or ``--pairs``), each subcommand in its own subprocess pinned to
  ``--cpu``; writes ``results.json`` and ``tables.md`` into ``--out``.

Run (after ``bash benchmarks/peers/setup_meta.sh``)::

    BILEVEL_DATA_ROOT=../shared/data benchmarks/.venv-meta/bin/python benchmarks/peers/metastep.py \\
        all --out results/metastep --cpu 0
    benchmarks/.venv-meta/bin/python benchmarks/peers/metastep.py time --pair l2l-maml --ways 5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2] / "tests"))
import meta_peers as mp
from helpers import LiveTensorBytes

from bilevel.metalearn.tasks import Task


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def one_thread(cpu: int | None) -> None:
    torch.set_num_threads(1)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def batches(exp: Any, n: int, start: int = 0) -> list[Task]:
    """``n`` meta-batches of the training stream (steps ``start`` ..), drawn by our sampler."""
    B = exp.config.meta_batch
    return [exp.train_sampler.meta_batch(start + s, range(B)) for s in range(n)]


def build(
    args: argparse.Namespace,
    dtype: str = "float32",
    meta_batch: int | None = None,
    cg_iters: int | None = None,
) -> tuple[Any, Any, Any]:
    """(experiment, ours, peer) for ``args.pair`` at ``args``' task format."""
    exp, s = mp.pair_experiment(
        args.pair,
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        meta_batch=meta_batch or args.meta_batch,
        inner_steps=args.inner_steps,
        cg_iters=cg_iters,
        dtype=dtype,
        data_root=args.data_root,
        task_chunk=args.task_chunk,
    )
    ours = mp.Ours(exp)
    peer = mp.make_peer(
        args.pair, exp, inner_steps=s["inner_steps"], inner_lr=s["inner_lr"], meta_lr=s["meta_lr"]
    )
    return exp, ours, peer


def cmd_time(args: argparse.Namespace) -> dict[str, Any]:
    one_thread(args.cpu)
    exp, ours, peer = build(args)
    bs = batches(exp, args.repeats + 1)
    impls: dict[str, Callable[[Task], None]] = {"ours": ours.step, "peer": peer.step}
    for fn in impls.values():  # warm-up (our first step also logs its diagnostics)
        fn(bs[0])
    cpu: dict[str, list[float]] = {n: [] for n in impls}
    wall: dict[str, list[float]] = {n: [] for n in impls}
    before = loadavg()
    names = list(impls)
    for r in range(args.repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            impls[n](bs[r + 1])
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    med = {n: statistics.median(cpu[n]) for n in names}
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "median_cpu_s": med,
        "median_wall_s": {n: statistics.median(wall[n]) for n in names},
        "ratio_cpu": med["peer"] / med["ours"],
        "load_before": before,
        "load_after": loadavg(),
    }


def cmd_convshare(args: argparse.Namespace) -> dict[str, Any]:
    """Each side's share of CPU time in convolution kernels (forward and backward): self CPU time
    of the ops named ``*convolution*`` over the self time of all ops, under ``torch.profiler``,
    two steps after a warm-up step.  ``time``'s ratio over ours is the ceiling of any rewrite
    of ours that keeps these kernels."""
    from torch.profiler import ProfilerActivity, profile

    one_thread(args.cpu)
    exp, ours, peer = build(args)
    bs = batches(exp, 3)
    out: dict[str, Any] = {"load_before": loadavg()}
    for name, fn in (("ours", ours.step), ("peer", peer.step)):
        fn(bs[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(bs[1])
            fn(bs[2])
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
        # the top-level ops with what they call (copies, sums for the bias, layout changes)
        inclusive = sum(
            e.cpu_time_total for e in events if e.key in ("aten::convolution", "aten::convolution_backward")
        )
        out[name] = {
            "conv_share_inclusive": inclusive / total,
            "conv_share": conv / total,
            "conv_ms_per_step": conv / 2e3,
            "profiled_ms_per_step": total / 2e3,
        }
    out["load_after"] = loadavg()
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cmd_memory(args: argparse.Namespace) -> dict[str, Any]:
    one_thread(args.cpu)
    exp, ours, peer = build(args)
    side = ours if args.side == "ours" else peer
    if args.side == "ours":
        del peer
    else:
        del ours
    bs = batches(exp, 3)
    setup_peak = _status_kib("VmHWM")
    # From the first step on: memory a step frees stays with the allocator and would hide the next
    # step's peak from an RSS measured after a warm-up step.
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    rss0 = _status_kib("VmRSS")
    file0, anon0 = _status_kib("RssFile"), _status_kib("RssAnon")
    for b in bs:
        side.step(b)
    hwm = _status_kib("VmHWM")
    return {
        "side": args.side,
        "rss_before_mib": rss0 / 1024,
        "peak_mib": max(hwm, setup_peak) / 1024,
        "step_peak_mib": (hwm - rss0) / 1024,
        # What the steps left resident, split: file-backed pages (library code read for the first
        # time, shared with other processes) and anonymous memory (heap, allocator caches).
        "file_added_mib": (_status_kib("RssFile") - file0) / 1024,
        "anon_added_mib": (_status_kib("RssAnon") - anon0) / 1024,
    }


def tensor_peak(step: Callable[[], None]) -> float:
    """Peak bytes held by the tensors ``step()`` creates (`LiveTensorBytes`)."""
    with LiveTensorBytes() as count:
        step()
    return float(count.peak)


def allocator_peak(step: Callable[[], None]) -> float:
    """Peak bytes PyTorch's CPU allocator holds during ``step()`` above what it held at its start."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in deltas:
        held += nbytes
        peak = max(peak, held)
    return float(peak)


def _peaks(
    args: argparse.Namespace, measure: Callable[[Callable[[], None]], float], key: str
) -> dict[str, Any]:
    """Both sides in one process: a warm-up step each, then ``measure`` of one step each, MiB."""
    one_thread(args.cpu)
    exp, ours, peer = build(args)
    bs = batches(exp, 2)
    peak = {}
    for name, side in (("peer", peer), ("ours", ours)):
        side.step(bs[0])
        peak[name] = measure(lambda side=side: side.step(bs[1])) / 2**20
    return {key: peak, "ratio": peak["ours"] / peak["peer"], "task_chunk": args.task_chunk}


def cmd_tensors(args: argparse.Namespace) -> dict[str, Any]:
    return _peaks(args, tensor_peak, "tensor_peak_mib")


def cmd_allocator(args: argparse.Namespace) -> dict[str, Any]:
    return _peaks(args, allocator_peak, "allocator_peak_mib")


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return math.sqrt(num / den)


def _agreement(args: argparse.Namespace, cg_iters: int | None = None) -> tuple[float, float]:
    """(relative error, our meta-gradient's norm) of one float64 meta-gradient on the same tasks."""
    exp, ours, peer = build(args, dtype="float64", meta_batch=args.agree_batch, cg_iters=cg_iters)
    (batch,) = batches(exp, 1)
    g_ours = ours.meta_grad(batch)
    g_peer = peer.meta_grad(batch)
    if set(g_ours) != set(g_peer):
        raise RuntimeError(f"parameter names differ: {sorted(set(g_ours) ^ set(g_peer))}")
    return rel_err(g_peer, g_ours), math.sqrt(sum(float((v**2).sum()) for v in g_ours.values()))


def cmd_agree(args: argparse.Namespace) -> dict[str, Any]:
    one_thread(args.cpu)
    torch.set_default_dtype(torch.float64)
    err, norm = _agreement(args)
    out = {"tasks": args.agree_batch, "rel_err": err, "ours_norm": norm}
    if args.pair == "betty-imaml":
        # the released betty's CG departs from CG after its first step (meta_peers.py): one step agrees
        out["rel_err_cg1"] = _agreement(args, cg_iters=1)[0]
    return out


# ------------------------------------------------------------------------------------------ driver
@dataclasses.dataclass(frozen=True)
class Case:
    pair: str
    ways: int
    inner_steps: int
    queries: int
    shots: int = 1

    @property
    def key(self) -> str:
        return f"{self.pair} {self.ways}w{self.shots}s q{self.queries} steps{self.inner_steps}"


#: The comparisons: each peer at its example's settings (learn2learn and betty draw 2 * shots images
#: per class, one query per class at 1-shot; higher's example 15 queries), 5-way and 20-way 1-shot,
#: 32 tasks; learn2learn at 1 inner step (its example) and 5.
CASES = [
    *(Case(p, w, s, 1) for p in ("l2l-maml", "l2l-fomaml") for w in (5, 20) for s in (1, 5)),
    *(Case("betty-imaml", w, 5, 1) for w in (5, 20)),
    *(Case("higher-maml", w, 5, 15) for w in (5, 20)),
]


def _sub(cmd: str, case: Case, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    argv = [
        sys.executable,
        __file__,
        cmd,
        "--pair", case.pair,
        "--ways", str(case.ways),
        "--shots", str(case.shots),
        "--queries", str(case.queries),
        "--inner-steps", str(case.inner_steps),
        "--meta-batch", str(args.meta_batch),
        *(["--cpu", str(args.cpu)] if args.cpu is not None else []),
        *(["--data-root", args.data_root] if args.data_root else []),
        *(["--task-chunk", str(args.task_chunk)] if args.task_chunk else []),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "learn2learn", "betty-ml", "higher", "numpy", "bilevel"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def tables(results: list[dict[str, Any]]) -> str:
    lines = [
        "| peer (ours) | task | inner steps | peer CPU ms | ours CPU ms | peer / ours | "
        "RSS peak MiB above step start: peer / ours | live tensors | allocator | float64 rel. error | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c, t = r["case"], r["time"]
        m = r["memory"]
        live, alloc = r["tensors"]["tensor_peak_mib"], r["allocator"]["allocator_peak_mib"]
        agree = f"{r['agree']['rel_err']:.1e}"
        if "rel_err_cg1" in r["agree"]:
            agree += f" (1 CG step: {r['agree']['rel_err_cg1']:.1e})"
        lines.append(
            f"| {c['pair']} ({mp.PAIRS[c['pair']]['ours']}) | {c['ways']}-way {c['shots']}-shot, "
            f"{c['queries']} q | {c['inner_steps']} | {1e3 * t['median_cpu_s']['peer']:.0f} | "
            f"{1e3 * t['median_cpu_s']['ours']:.0f} | **{t['ratio_cpu']:.2f}** | "
            f"{m['peer']['step_peak_mib']:.0f} / {m['ours']['step_peak_mib']:.0f} | "
            f"{live['peer']:.1f} / {live['ours']:.1f} | {alloc['peer']:.1f} / {alloc['ours']:.1f} | "
            f"{agree} | "
            f"{t['load_before'][0]:.1f}-{t['load_after'][0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def cmd_all(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in CASES if not args.pairs or c.pair in args.pairs]
    results: list[dict[str, Any]] = []
    meta = {
        "versions": versions(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "repeats": args.repeats,
        "meta_batch": args.meta_batch,
        "cpu": args.cpu,
    }
    for case in cases:
        r: dict[str, Any] = {"case": dataclasses.asdict(case)}
        r["agree"] = _sub("agree", case, args, ["--agree-batch", str(args.agree_batch)])
        r["time"] = _sub("time", case, args, ["--repeats", str(args.repeats)])
        r["memory"] = {side: _sub("memory", case, args, ["--side", side]) for side in ("peer", "ours")}
        r["tensors"] = _sub("tensors", case, args, [])
        r["allocator"] = _sub("allocator", case, args, [])
        results.append(r)
        t = r["time"]
        print(
            f"{case.key}: peer {1e3 * t['median_cpu_s']['peer']:.0f} ms, "
            f"ours {1e3 * t['median_cpu_s']['ours']:.0f} ms CPU, ratio {t['ratio_cpu']:.2f}; "
            f"peak +{r['memory']['peer']['step_peak_mib']:.0f} / "
            f"+{r['memory']['ours']['step_peak_mib']:.0f} MiB; agree {r['agree']['rel_err']:.1e}; "
            f"load {t['load_before']} -> {t['load_after']}",
            flush=True,
        )
        (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        (out / "tables.md").write_text(tables(results))
    meta["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return {"out": str(out), "cases": len(results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("time", "memory", "tensors", "allocator", "agree", "convshare", "all"))
    p.add_argument("--pair", choices=tuple(mp.PAIRS), default="l2l-maml")
    p.add_argument("--pairs", nargs="*", choices=tuple(mp.PAIRS), help="all: only these pairs")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=1, help="query images per class")
    p.add_argument("--inner-steps", type=int, default=None, help="default: the peer's example's")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each side one step per round)")
    p.add_argument("--agree-batch", type=int, default=4, help="tasks of the float64 agreement check")
    p.add_argument("--side", choices=("ours", "peer"), default="ours")
    p.add_argument(
        "--task-chunk", type=int, default=None, help="ours: tasks per meta-gradient chunk (default: all)"
    )
    p.add_argument("--cpu", type=int, default=None, help="pin to this core")
    p.add_argument("--data-root", default=None, help="default: $BILEVEL_DATA_ROOT")
    p.add_argument("--out", default="results/metastep")
    args = p.parse_args(argv)
    commands = {
        "time": cmd_time,
        "memory": cmd_memory,
        "tensors": cmd_tensors,
        "allocator": cmd_allocator,
        "agree": cmd_agree,
        "convshare": cmd_convshare,
        "all": cmd_all,
    }
    print(json.dumps(commands[args.command](args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
