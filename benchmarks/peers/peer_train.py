"""Train a meta-learning peer (learn2learn, betty, higher) for a CPU-time budget on our Omniglot tasks.

The peer is one of ``meta_peers.PAIRS`` at its example's settings (``meta_peers.py``), on the problem
our training CLI builds for the same task format (`bilevel.metalearn.build_experiment`): our
Omniglot copy, our class split (vinyals, no validation characters), our task sampler for the training
stream (meta-batch ``t`` = the CLI's meta-batch ``t`` for the same seed) and for the fixed test tasks
(the CLI's final evaluation tasks), our Conv4 and its initial parameters.  One thread, pinned with
``--cpu``.

The budget is this process's CPU time (``time.process_time``) spent training, drawing tasks
included, evaluations excluded (our CLI's ``--clock cpu`` likewise).  At each ``--eval-at`` mark
(CPU minutes) and at the end, the peer adapts to ``--test-tasks`` fixed test tasks its own way (its
example's adaptation: learn2learn ``clone`` + ``adapt``; higher's inner loop; betty's validation: SGD
on the support loss alone from the outer weights) and the query accuracy is recorded (percent, mean
and 95% interval over the tasks).  ``metrics.json`` in ``--out`` is rewritten after every evaluation.

Run (after ``bash benchmarks/peers/setup_meta.sh``)::

    BILEVEL_DATA_ROOT=../shared/data taskset -c 0 benchmarks/.venv-meta/bin/python \\
        benchmarks/peers/peer_train.py --pair l2l-maml --ways 5 --cpu-minutes 30 \\
        --eval-at 5 10 20 --out results/peer_train/l2l-maml-5w1s

Ours at the same settings and budget (the pair's settings are printed at the start and saved)::

    python -m bilevel.metalearn train --algo maml --ways 5 --shots 1 --queries 1 --meta-batch 32 \\
        --inner-steps 1 --inner-lr 0.5 --meta-lr 0.003 --init torch --threads 1 --clock cpu \\
        --time-limit 30 --meta-steps 1000000 --test-tasks 600 --out runs/maml-5w1s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meta_peers as mp


def evaluate(peer: Any, exp: Any, n_tasks: int, chunk: int = 50) -> dict[str, float]:
    """The peer's query accuracy (percent) on the first ``n_tasks`` fixed test tasks."""
    accs: list[float] = []
    for s in range(0, n_tasks, chunk):
        tasks = exp.test_sampler.fixed_batch(range(s, min(n_tasks, s + chunk)))
        accs += mp.evaluate_peer(peer.predict, tasks)
    return {
        "accuracy": 100.0 * sum(accs) / len(accs),
        "ci95": 100.0 * mp.ci95(accs),
        "n_tasks": len(accs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=tuple(mp.PAIRS), required=True)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=None, help="query images per class (default: shots)")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=None, help="default: the peer's example's")
    p.add_argument("--cpu-minutes", type=float, required=True, help="training budget in CPU minutes")
    p.add_argument("--eval-at", type=float, nargs="*", default=[], help="CPU minutes of the evaluations")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", type=int, default=None, help="pin to this core")
    p.add_argument("--data-root", default=None, help="default: $BILEVEL_DATA_ROOT")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    queries = args.queries if args.queries is not None else args.shots
    exp, settings = mp.pair_experiment(
        args.pair,
        ways=args.ways,
        shots=args.shots,
        queries=queries,
        meta_batch=args.meta_batch,
        inner_steps=args.inner_steps,
        seed=args.seed,
        data_root=args.data_root,
    )
    peer = mp.make_peer(
        args.pair,
        exp,
        inner_steps=settings["inner_steps"],
        inner_lr=settings["inner_lr"],
        meta_lr=settings["meta_lr"],
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "pair": args.pair,
        "settings": settings,
        "task": {"ways": args.ways, "shots": args.shots, "queries": queries, "meta_batch": args.meta_batch},
        "seed": args.seed,
        "cpu_minutes": args.cpu_minutes,
        "split": exp.data.split.name if exp.data is not None else None,
        "evaluations": [],
        "argv": sys.argv,
    }
    print(f"{args.pair}: {json.dumps(record['settings'])}, {json.dumps(record['task'])}", flush=True)
    marks = [*sorted(m for m in args.eval_at if m < args.cpu_minutes), args.cpu_minutes]
    budget = args.cpu_minutes * 60
    train_cpu, step, wall0 = 0.0, 0, time.perf_counter()
    for mark in marks:
        while train_cpu < mark * 60 and train_cpu < budget:
            c0 = time.process_time()
            peer.step(exp.train_sampler.meta_batch(step, range(args.meta_batch)))
            train_cpu += time.process_time() - c0
            step += 1
        e0 = time.process_time()
        res = evaluate(peer, exp, args.test_tasks)
        ev = {
            **res,
            "meta_steps": step,
            "train_cpu_s": train_cpu,
            "eval_cpu_s": time.process_time() - e0,
            "wall_s": time.perf_counter() - wall0,
            "load": [round(x, 2) for x in os.getloadavg()],
        }
        record["evaluations"].append(ev)
        print(
            f"{train_cpu / 60:.2f} CPU-min, {step} meta-steps: "
            f"test {res['accuracy']:.2f} +- {res['ci95']:.2f}% ({res['n_tasks']} tasks)",
            flush=True,
        )
        (out / "metrics.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
