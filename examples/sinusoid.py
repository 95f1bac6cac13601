"""Sinusoid regression (Finn et al. 2017): iMAML against MAML and first-order MAML.

Tasks: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; K support points
(5 by default) and 10 query points; an MLP 1-40-40-1 with ReLU; mean squared error.  Every
algorithm gets the same number of meta-steps, the same meta-batch and the same task stream.

The baseline is the same MLP trained on all tasks jointly (no adaptation, the same number of
Adam steps on the same tasks, support and query points pooled): its mean squared error on
the test tasks' query points, before any adaptation, is what meta-learning must beat.

Writes ``OUT/sinusoid.csv`` (method, meta_steps, test_mse, test_mse_ci95, ratio_to_joint) and
``OUT/sinusoid.png`` (a few new sine curves: the truth, the K support points, the jointly
trained model, and each meta-learned model after adaptation).

Run: ``python examples/sinusoid.py --out results/sinusoid [--quick]``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

from bilevel.metalearn import SinusoidTasks, TrainConfig, adapt, load_checkpoint, make_functional, mse, train
from bilevel.metalearn.models import sinusoid_mlp

#: Per-algorithm inner settings, shared by training and evaluation; the rest is common.
SETTINGS = {
    # lam = 20 keeps the adapted model near theta, as the one 0.01-step of MAML does (lam ~ 1 / (steps lr));
    # lam = 0.5-2 with the same budget gave 3.1-5.5 (worse than joint training).  Fixed-step GD on G
    # diverged after 200-900 meta-steps at every lr tried (0.005-0.02), so the inner GD backtracks.
    "imaml-gd": dict(inner_steps=25, inner_lr=0.02, lam=20.0, cg_iters=5, backtrack=True),
    # Finn et al.: one step of 0.01 in training, ten at test time
    "maml": dict(inner_steps=1, inner_lr=0.01, eval_inner_steps=10),
    "fomaml": dict(inner_steps=1, inner_lr=0.01, eval_inner_steps=10),
}


def train_joint(tasks: SinusoidTasks, steps: int, meta_batch: int, seed: int) -> dict[str, torch.Tensor]:
    """The MLP fit to all tasks at once (pooled support and query points), Adam, no adaptation."""
    fn, params = make_functional(sinusoid_mlp(), torch.Generator().manual_seed(seed))
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    for step in range(steps):
        b = tasks.meta_batch(step, range(meta_batch))
        x = torch.cat([b.support_x, b.query_x], 1).reshape(-1, 1)
        y = torch.cat([b.support_y, b.query_y], 1).reshape(-1, 1)
        loss = mse(fn(params, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/sinusoid", help="output folder")
    p.add_argument("--meta-steps", type=int, default=3000, help="meta-steps for every method")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-step")
    p.add_argument("--shots", type=int, default=5, choices=(5, 10, 20), help="support points K")
    p.add_argument("--test-tasks", type=int, default=600, help="fixed test tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small version (about a minute)")
    args = p.parse_args(argv)
    if args.quick:
        args.meta_steps, args.test_tasks = 600, 200
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    # A 1-40-40-1 MLP on 15 points: a second thread only adds synchronization (measured 40x slower
    # with 2 threads on a busy 2-core machine).
    torch.set_num_threads(1)

    tasks = SinusoidTasks(args.shots, 10, seed=args.seed)
    test = SinusoidTasks(args.shots, 10, seed=args.seed, eval_seed=args.seed + 10_000)
    fn, _ = make_functional(sinusoid_mlp())

    t0 = time.perf_counter()
    joint = train_joint(tasks, args.meta_steps, args.meta_batch, args.seed)
    tb = test.fixed_batch(list(range(args.test_tasks)))
    with torch.no_grad():
        joint_err = torch.stack([mse(fn(joint, x), y) for x, y in zip(tb.query_x, tb.query_y)]).double()
    joint_mse = float(joint_err.mean())
    joint_ci = float(1.96 * joint_err.std() / math.sqrt(joint_err.numel()))
    print(
        f"joint training (no adaptation): test MSE {joint_mse:.3f} +- {joint_ci:.3f} "
        f"[{time.perf_counter() - t0:.0f}s]"
    )

    rows = [
        {
            "method": "joint (no adaptation)",
            "meta_steps": args.meta_steps,
            "test_mse": joint_mse,
            "test_mse_ci95": joint_ci,
            "ratio_to_joint": 1.0,
        }
    ]
    thetas = {}
    for algo, kw in SETTINGS.items():
        t0 = time.perf_counter()
        cfg = TrainConfig(
            algo=algo,
            dataset="sinusoid",
            shots=args.shots,
            queries=10,
            meta_batch=args.meta_batch,
            meta_steps=args.meta_steps,
            test_tasks=args.test_tasks,
            seed=args.seed,
            log_every=100,
            checkpoint_every=0,
            out=str(out / algo),
            **kw,  # type: ignore[arg-type]
        )
        m = train(cfg, progress=False, overwrite=True)  # a rerun replaces the earlier runs' files
        thetas[algo] = (cfg, load_checkpoint(out / algo / "checkpoint.pt")["theta"])
        ratio = joint_mse / m["test_loss"]
        rows.append(
            {
                "method": algo,
                "meta_steps": args.meta_steps,
                "test_mse": m["test_loss"],
                "test_mse_ci95": m["test_loss_ci95"],
                "ratio_to_joint": ratio,
            }
        )
        print(
            f"{algo}: test MSE after adaptation {m['test_loss']:.3f} +- {m['test_loss_ci95']:.3f} "
            f"({ratio:.1f}x lower than joint) [{time.perf_counter() - t0:.0f}s]"
        )

    with open(out / "sinusoid.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(out / "sinusoid.png", fn, joint, thetas, test, args.shots, rows)
    print(f"wrote {out / 'sinusoid.csv'} and {out / 'sinusoid.png'}")
    return 0


def plot(path: Path, fn, joint, thetas, test: SinusoidTasks, shots: int, rows: list[dict]) -> None:  # type: ignore[no-untyped-def]
    """Three test tasks: the truth, the support points, the joint model and each adapted model.

    The title gives every method's test MSE over all the test tasks; each panel's legend gives
    each model's MSE on that task's query points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-5, 5, 200).reshape(-1, 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), sharey=True, layout="constrained")
    for ax, idx in zip(axes, (0, 1, 2)):
        task = test.fixed_batch([idx])
        qx, qy = task.query_x[0], task.query_y[0]
        amp, phase = test.function_of(0, idx, fixed=True)
        ax.plot(grid, amp * torch.sin(grid - phase), "k-", lw=2, label="truth")
        ax.plot(task.support_x[0], task.support_y[0], "k^", ms=9, label=f"{shots} support points")
        with torch.no_grad():
            err = float(mse(fn(joint, qx), qy))
            ax.plot(grid, fn(joint, grid), ":", color="gray", label=f"joint (no adaptation): MSE {err:.2f}")
        for algo, (cfg, theta) in thetas.items():
            phi = adapt(cfg.algorithm(evaluation=True), fn, mse, theta, task.support_x, task.support_y)
            one = {k: v[0] for k, v in phi.items()}
            with torch.no_grad():
                err = float(mse(fn(one, qx), qy))
                ax.plot(grid, fn(one, grid), "--", label=f"{algo}, adapted: MSE {err:.2f}")
        ax.set_title(f"test task {idx}: A = {amp:.2f}, phase = {phase:.2f}", fontsize=10)
        ax.set_xlabel("x")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("y")
    summary = ", ".join(f"{r['method']} {r['test_mse']:.3f} ± {r['test_mse_ci95']:.3f}" for r in rows)
    fig.suptitle(
        f"Sinusoid regression, {shots} support points, {rows[0]['meta_steps']} meta-steps: test MSE after "
        f"adaptation over the fixed test tasks (95% interval)\n{summary}\n"
        "(panel legends: MSE on that task's query points)",
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
