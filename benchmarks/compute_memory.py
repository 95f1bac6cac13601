"""Figure 2b of iMAML: time and memory of one task meta-gradient against inner GD steps.

The 20-way 5-shot Omniglot CNN (4 x [3x3 conv, 64 filters, stride 2, batch norm, ReLU], linear
head) on one task: 100 support images, ``20 * queries`` query images.  Real images with
``--data-root`` (Omniglot's two official archives), random images of the same shape otherwise:
time and memory do not depend on pixel values.  For each inner step count K and each method
(`bilevel.metalearn.make_algorithm` names), one call of `bilevel.metalearn.meta_gradient`:

* ``maml``: backpropagation through K GD steps on the support loss (second order).
* ``imaml-gd``: K GD steps on G = Lhat + lam/2 ||phi - theta||^2 (lam = 2) without autograd,
  then 5 CG steps on (I + Lhat''/lam) g = grad L(phi) with Hessian-vector products.
* ``fomaml``: K GD steps, then grad L(phi).

Measured:

* ``seconds``: median wall-clock time of ``--repeats`` calls after one warm-up call
  (``torch.cuda.synchronize`` around each call on a GPU).
* ``memory_bytes``: the peak, over the call, of the bytes of live tensors the call allocated
  (`PeakMemory`): every tensor an ATen op returns during the call is counted once per storage
  (views and in-place results share their input's storage and are not counted again) until its
  storage is freed.  This is what the allocator must hold for the computation, activations and
  saved tensors for backward included, the same quantity as ``torch.cuda.max_memory_allocated``
  minus the starting allocation, but device-independent and exact on the CPU; inputs and
  parameters that exist before the call are not counted.  On a GPU, ``fig2b_cuda.csv`` adds
  ``torch.cuda.max_memory_allocated`` above the starting allocation.

Why not saved-tensor hooks: ``torch.autograd.graph.saved_tensors_hooks`` would count only what
autograd saves for backward, but the engine computes every gradient with ``torch.func``, and
``torch.func.grad``/``vjp`` refuse to run under saved-tensor hooks in torch 2.13 ("don't yet
support saved tensor hooks").  A ``TorchDispatchMode`` sits below the ``torch.func`` transforms
and sees every allocation, forward and backward.

Run:
    python benchmarks/compute_memory.py --out results/fig2 [--data-root DIR] [--quick]
writes ``fig2b.csv`` (columns ``method,inner_steps,seconds,memory_bytes``) and ``fig2b.png``.
The full run on one CPU thread took 13 minutes on a loaded 2-core machine, and MAML at 100 steps
holds 6.9 GiB of tensors (the process peaked at about 13 GB resident): leave room for it.
``--quick`` (16 filters, K in 1, 5, 10, 16, one timed call per point, so its times are noisy on
a loaded machine) takes about 30 s.

References:
    Rajeswaran, Finn, Kakade, Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019,
    Figure 2b and Section 4.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bilevel.metalearn.algorithms import make_algorithm, meta_gradient
from bilevel.metalearn.models import make_functional, omniglot_cnn
from bilevel.metalearn.tasks import Task

METHODS = ("maml", "imaml-gd", "fomaml")
FULL_STEPS = (1, 5, 10, 16, 25, 50, 100)
QUICK_STEPS = (1, 5, 10, 16)


def _tensors(x: object) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or results (nested tuples, lists, dicts)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensors allocated while the mode is active.

    Every output of an ATen op whose storage is new (not shared with one of the op's inputs
    and not already counted) adds its storage's bytes; a `weakref.finalize` on the storage
    subtracts them when the storage is freed.  ``peak`` is the maximum of ``current``.

    Usage::

        with PeakMemory() as mem:
            f()
        mem.peak  # bytes

    Works under ``torch.func`` transforms (the mode sees the unwrapped tensors) and on any
    device.  Memory an op uses internally and frees before returning (workspaces) is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[tuple[str, int], int] = {}

    def _free(self, key: tuple[str, int]) -> None:
        self.current -= self._live.pop(key, 0)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[tuple[str, int], torch.UntypedStorage] | None:
        try:
            s = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse, nested: no single storage
            return None
        return (str(t.device), s.data_ptr()), s

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in _tensors((args, kwargs)):
            if (k := self._key(t)) is not None:
                inputs.add(k[0])
        for t in _tensors(out):
            if (k := self._key(t)) is None:
                continue
            key, storage = k
            n = storage.nbytes()
            if n == 0 or key in inputs or key in self._live:
                continue
            self._live[key] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, int, int | None]:
    """``(median seconds, PeakMemory bytes, CUDA peak bytes or None)`` of ``fn()``.

    The memory call doubles as the warm-up; then ``repeats`` timed calls.
    """
    cuda_peak: int | None = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakMemory() as mem:
        fn()
    if device.type == "cuda":
        _sync(device)
        cuda_peak = torch.cuda.max_memory_allocated(device) - base
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak, cuda_peak


def make_task(
    ways: int, shots: int, queries: int, *, data_root: str | None, seed: int, device: torch.device
) -> Task:
    """A meta-batch of one task: Omniglot (meta-training classes) or uniform random images."""
    if data_root is not None:
        from bilevel.metalearn.data.omniglot import load_omniglot
        from bilevel.metalearn.data.samplers import TaskSampler

        data = load_omniglot(data_root, seed=seed)
        return TaskSampler(data.train, ways, shots, queries, seed=seed).meta_batch(0, 1, device=device)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    task = Task(
        torch.rand(1, ways * shots, 1, 28, 28, generator=g),
        labels.repeat_interleave(shots)[None],
        torch.rand(1, ways * queries, 1, 28, 28, generator=g),
        labels.repeat_interleave(queries)[None],
    )
    return task.to(device)


def run(
    *,
    methods: Sequence[str] = METHODS,
    steps: Sequence[int] = FULL_STEPS,
    ways: int = 20,
    shots: int = 5,
    queries: int = 5,
    hidden: int = 64,
    inner_lr: float = 0.1,
    lam: float = 2.0,
    cg_iters: int = 5,
    repeats: int = 3,
    data_root: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    vectorize: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time and memory of one task meta-gradient for each method and inner step count.

    Returns:
        One dict per (method, K) with keys ``method``, ``inner_steps``, ``seconds``,
        ``memory_bytes``, ``cuda_bytes`` (``None`` off the GPU) and ``query_loss`` (a
        finiteness check of the computation that was timed).
    """
    dev = torch.device(device)
    task = make_task(ways, shots, queries, data_root=data_root, seed=seed, device=dev)
    fn, theta = make_functional(
        omniglot_cnn(ways, hidden=hidden), torch.Generator().manual_seed(seed), device=dev
    )
    rows = []
    for method in methods:
        for k in steps:
            algo = make_algorithm(method, inner_steps=k, inner_lr=inner_lr, lam=lam, cg_iters=cg_iters)
            out: list[Any] = []

            def call(algo: Any = algo, out: list[Any] = out) -> None:
                out[:] = meta_gradient(algo, fn, F.cross_entropy, theta, task, vectorize=vectorize)

            seconds, mem, cuda = measure(call, dev, repeats)
            grad, _, stats = out
            finite = all(bool(torch.isfinite(g).all()) for g in grad.values())
            row = {
                "method": method,
                "inner_steps": k,
                "seconds": seconds,
                "memory_bytes": mem,
                "cuda_bytes": cuda,
                "query_loss": float(stats.query_loss[0]) if finite else math.nan,
            }
            rows.append(row)
            if log is not None:
                extra = "" if cuda is None else f"  cuda {cuda / 2**20:9.1f} MiB"
                log(
                    f"{method:>9} K={k:<4d} {seconds:8.3f} s  {mem / 2**20:9.1f} MiB{extra}  "
                    f"query loss {row['query_loss']:.3f}"
                )
    return rows


def write_csv(rows: Sequence[dict[str, Any]], out: Path) -> None:
    with (out / "fig2b.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "inner_steps", "seconds", "memory_bytes"])
        for r in rows:
            w.writerow([r["method"], r["inner_steps"], f"{r['seconds']:.6f}", r["memory_bytes"]])
    if any(r["cuda_bytes"] is not None for r in rows):
        with (out / "fig2b_cuda.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "inner_steps", "cuda_max_memory_allocated_bytes"])
            for r in rows:
                w.writerow([r["method"], r["inner_steps"], r["cuda_bytes"]])


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "plotting needs matplotlib, which is not installed: pip install 'bilevel[plot]'"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"maml": "MAML", "imaml-gd": "iMAML (GD, 5 CG steps)", "fomaml": "first-order MAML"}
    styles = {"maml": "o-", "imaml-gd": "^-", "fomaml": "x:"}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == m]
        ks = [r["inner_steps"] for r in pts]
        ax_t.plot(ks, [r["seconds"] for r in pts], styles.get(m, "o-"), label=labels.get(m, m), ms=4)
        ax_m.plot(
            ks, [r["memory_bytes"] / 2**20 for r in pts], styles.get(m, "o-"), label=labels.get(m, m), ms=4
        )
    ax_t.set_ylabel("seconds per task meta-gradient")
    ax_m.set_ylabel("peak memory of the call (MiB)")
    for ax in (ax_t, ax_m):
        ax.set_xlabel("inner GD steps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--quick", action="store_true", help="16 filters, K in 1 5 10 16, 1 timed repeat")
    p.add_argument("--data-root", default=None, help="Omniglot folder; random images without it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, nargs="+", default=None, help="inner step counts")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 3; quick 1)")
    p.add_argument("--ways", type=int, default=20)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=5, help="query images per class")
    p.add_argument("--hidden", type=int, default=None, help="conv filters (default 64; quick 16)")
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--vectorize", action="store_true", help="vmap over the (single-task) batch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    hidden = args.hidden if args.hidden is not None else (16 if args.quick else 64)
    args.out.mkdir(parents=True, exist_ok=True)
    images = "Omniglot" if args.data_root else "random images"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(
        f"{args.ways}-way {args.shots}-shot, {args.queries} queries per class, {hidden} filters, {images}, "
        f"{args.device}, {args.threads} thread(s), {repeats} timed repeat(s); load average {load:.2f}"
    )
    t0 = time.perf_counter()
    rows = run(
        methods=args.methods,
        steps=steps,
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        hidden=hidden,
        inner_lr=args.inner_lr,
        repeats=repeats,
        data_root=args.data_root,
        device=args.device,
        seed=args.seed,
        vectorize=args.vectorize,
        log=print,
    )
    write_csv(rows, args.out)
    title = (
        f"Fig. 2b: {args.ways}-way {args.shots}-shot Omniglot CNN ({hidden} filters, {images}), one task, "
        f"{args.device}, {args.threads} thread(s)"
    )
    plot(rows, args.out / "fig2b.png", title)
    by = {(r["method"], r["inner_steps"]): r for r in rows}
    for m in args.methods:
        lo, hi = by.get((m, min(steps))), by.get((m, max(steps)))
        if lo and hi:
            print(
                f"{m:>9}: memory x{hi['memory_bytes'] / lo['memory_bytes']:.2f} from K={min(steps)} to "
                f"K={max(steps)}, time x{hi['seconds'] / lo['seconds']:.2f}"
            )
    ks = [k for k in steps if ("imaml-gd", k) in by and ("fomaml", k) in by]
    for k in ks:
        ratio = by[("imaml-gd", k)]["seconds"] / by[("fomaml", k)]["seconds"]
        print(f"K={k}: time imaml-gd / fomaml = {ratio:.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(
        f"wrote {args.out / 'fig2b.csv'} and {args.out / 'fig2b.png'} in {time.perf_counter() - t0:.0f} s "
        f"(load average now {load:.2f})"
    )
    return rows


if __name__ == "__main__":
    main()
