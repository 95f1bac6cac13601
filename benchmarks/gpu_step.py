"""One meta-step of the Omniglot CNN, counted and timed: ops, launches, busy fraction.

For each algorithm (the CLI's presets of the paper's Omniglot protocol: imaml-gd 16 inner GD steps
of 0.1, lam 2, 5 CG steps; fomaml 5 steps of 0.4; maml 1 step of 0.4; imaml-hf 3 x 5 Newton-CG;
anil 5 head steps of 0.1; meta-sgd 1 step, learned sizes from 0.4)
and each engine (``eager``, ``compiled`` = ``BatchedModel.compiled()``, the CLI's ``--compile``),
one ``meta_gradient(..., diagnostics=False, batched=batched_model(model))`` call on a 5-way
1-shot meta-batch of 32 tasks (15 queries per class, random 28 x 28 images, float32):

* ``ops``: every ``__torch_dispatch__`` call during one call after two warm-up calls (a
  ``TorchDispatchMode`` counter: a device-independent proxy for kernel launches), with the host
  reads (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``; ``nonzero``) counted apart: those
  made during the meta-step, and those of its checks, which run (as in the training loop) at the
  end of a `bilevel.deferred_checks` block around it;
* ``ms``: the median wall time of ``--repeats`` calls (CUDA: synchronized), engines interleaved;
* on CUDA, from ``torch.profiler`` around one call: the GPU kernel time, the number of kernel
  launches and the busy fraction (kernel time / wall time);
* the projected wall time of the paper's 20,000 meta-steps at that speed.

Run::

    python benchmarks/gpu_step.py --out results/gpu_step            # CPU (1 thread) or CUDA
    python benchmarks/gpu_step.py --device cuda --algos imaml-gd,fomaml,maml

Writes ``results.json`` and ``table.md`` into ``--out``.  Needs no GPU; uses one when asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bilevel as bl  # noqa: E402
from bilevel.metalearn import make_algorithm, meta_gradient  # noqa: E402
from bilevel.metalearn.batched import batched_model  # noqa: E402
from bilevel.metalearn.models import make_functional, omniglot_cnn  # noqa: E402
from bilevel.metalearn.tasks import Task  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "imaml-gd": dict(inner_steps=16, inner_lr=0.1, lam=2.0, cg_iters=5),
    "fomaml": dict(inner_steps=5, inner_lr=0.4),
    "maml": dict(inner_steps=1, inner_lr=0.4),
    "imaml-hf": dict(lam=2.0, cg_iters=5, newton_iters=3),
    "anil": dict(inner_steps=5, inner_lr=0.1),
    "meta-sgd": dict(inner_steps=1, inner_lr=0.4),
}
PROTOCOL_STEPS = 20_000


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def reads(self) -> int:
        """Host reads so far: scalar reads and data-dependent shapes."""
        return self.ops["_local_scalar_dense"] + self.ops["nonzero"] + self.ops["is_nonzero"]


def problem(device: torch.device, B: int, ways: int, shots: int, seed: int) -> tuple[Any, ...]:
    model = omniglot_cnn(ways)
    fn, theta = make_functional(model, torch.Generator().manual_seed(seed), device=device)
    g = torch.Generator().manual_seed(seed + 1)
    q = 15
    batch = Task(
        torch.randn(B, ways * shots, 1, 28, 28, generator=g),
        torch.arange(ways).repeat(shots).expand(B, -1).contiguous(),
        torch.randn(B, ways * q, 1, 28, 28, generator=g),
        torch.arange(ways).repeat(q).expand(B, -1).contiguous(),
    ).to(device)
    return model, fn, theta, batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_cuda(call: Any, device: torch.device) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        sync(device)
    wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_s = sum(e.device_time for e in kernels) / 1e6  # microseconds
    return {"kernel_ms": 1e3 * kernel_s, "launches": len(kernels), "profiled_wall_ms": 1e3 * wall,
            "busy": kernel_s / wall if wall > 0 else float("nan")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/gpu_step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--algos", default="imaml-gd,fomaml,maml")
    p.add_argument("--engines", default="eager,compiled")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--double-backward",
        default="auto",
        choices=("auto", "native", "few-ops"),
        help="batched_model(double_backward=...): few-ops counts on CPU what an accelerator dispatches",
    )
    p.add_argument(
        "--as-accelerator",
        action="store_true",
        help="run as on an accelerator (solver loops without host reads to skip masked work, all B "
        "query sets in one call, NCHW activations), to count on CPU the ops and host reads a GPU "
        "step would make",
    )
    args = p.parse_args()
    if args.as_accelerator:
        import bilevel._sync
        import bilevel.metalearn.batched

        bilevel._sync.host_checks = lambda x: False  # type: ignore[assignment]
        bilevel.metalearn.batched.CPU_CHANNELS_LAST = False
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, fn, theta, batch = problem(device, args.meta_batch, args.ways, args.shots, args.seed)
    eager = batched_model(model, double_backward=args.double_backward)
    assert eager is not None
    if args.as_accelerator:
        eager = dataclasses.replace(eager, cpu_chunk=None)
    engines = {
        "eager": eager,
        "compiled": eager.compiled("reduce-overhead" if device.type == "cuda" else None),
    }
    engines = {k: v for k, v in engines.items() if k in args.engines.split(",")}
    rows: list[dict[str, Any]] = []

    during: dict[str, int] = {}

    def step(algo: Any, bm: Any, counter: OpCounter | None = None) -> Any:
        # as the training loop runs it: the checks read the device once the step is queued
        tree = {**theta, **algo.meta_parameters(theta)}  # Meta-SGD's step sizes; none for the others
        with bl.deferred_checks():
            out = meta_gradient(algo, fn, F.cross_entropy, tree, batch, diagnostics=False, batched=bm)
            if counter is not None:
                during["reads"] = counter.reads()
        return out

    for name in args.algos.split(","):
        algo = make_algorithm(name, **PRESETS[name])
        calls = {e: functools.partial(step, algo, bm) for e, bm in engines.items()}
        warm: dict[str, float] = {}
        for e, call in calls.items():
            t0 = time.perf_counter()
            call()
            sync(device)
            warm[e] = time.perf_counter() - t0
            call()
            sync(device)
        times: dict[str, list[float]] = {e: [] for e in calls}
        for r in range(args.repeats):
            for e in calls if r % 2 == 0 else list(calls)[::-1]:
                sync(device)
                t0 = time.perf_counter()
                calls[e]()
                sync(device)
                times[e].append(time.perf_counter() - t0)
        ref = calls["eager"]()[0] if "eager" in calls else None
        for e, call in calls.items():
            got = call()[0]
            # torch.compile runs a model eagerly while a dispatch mode is active: the compiled
            # engine's count is that of its eager ops, an upper bound of what it dispatches
            with OpCounter() as c:
                call(counter=c)
            sync(device)
            ms = 1e3 * statistics.median(times[e])
            row: dict[str, Any] = {
                "algo": name, "engine": e, "ms": ms, "first_call_s": warm[e],
                "ops": sum(c.ops.values()), "host_reads": during["reads"],
                "reads_at_end": c.reads() - during["reads"],
                "top_ops": c.ops.most_common(8),
                "protocol_hours": ms * PROTOCOL_STEPS / 3.6e6,
            }  # fmt: skip
            if ref is not None:
                num = sum(float((got[k] - ref[k]).double().square().sum()) for k in ref) ** 0.5
                den = sum(float(ref[k].double().square().sum()) for k in ref) ** 0.5
                row["rel_diff_vs_eager"] = num / den
            if device.type == "cuda":
                row.update(profile_cuda(call, device))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top_ops"}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "meta_batch": args.meta_batch,
        "ways": args.ways,
        "shots": args.shots,
        "double_backward": args.double_backward,
        "as_accelerator": args.as_accelerator,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cuda = device.type == "cuda"
    head = (
        "| algorithm | engine | ms / meta-step | ops | host reads in the step / at its end | "
        + ("kernel ms | launches | busy | " if cuda else "")
        + "20,000 steps (h) | rel. diff vs eager |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        gpu = f"{r['kernel_ms']:.1f} | {r['launches']} | {100 * r['busy']:.0f}% | " if cuda else ""
        lines.append(
            f"| {r['algo']} | {r['engine']} | {r['ms']:.1f} | {r['ops']:,} | {r['host_reads']} / "
            f"{r['reads_at_end']} | {gpu}"
            f"{r['protocol_hours']:.2f} | {r.get('rel_diff_vs_eager', float('nan')):.1e} |"
        )
    (out / "table.md").write_text(
        f"`{meta['command']}` — {meta['device_name']}, torch {meta['torch']}, {args.ways}-way "
        f"{args.shots}-shot, meta-batch {args.meta_batch}, double backward {args.double_backward}"
        + (", loops as on an accelerator" if args.as_accelerator else "")
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
