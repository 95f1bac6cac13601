"""Inner solvers of iMAML's G on real Omniglot tasks: how close each gets to a minimum.

One meta-batch of 5-way 1-shot Omniglot training tasks (the run's own sampler), G_i(phi) =
Lhat_i(phi) + lam/2 ||phi - theta||^2 with theta from a checkpoint (``--theta checkpoint``) or the
run's fresh initialization (``--theta init``).  Each inner solver (backtracking GD, the paper's
line-search Newton-CG, trust-region Newton-CG at several radii and budgets) runs from theta on the
same tasks, and at its answers this measures, per task: G, ||grad G||, the smallest eigenvalue of
I + H/lam (``--lanczos`` Lanczos steps of HVPs), ||phi - theta||, the support loss, the query
accuracy, plus the solver's HVP and gradient counts and its CPU time.  Reported: medians over the
tasks, and how many tasks have a negative smallest eigenvalue (an answer that is no minimum).

It runs the meta-learning engine's inner solvers alone, through
`bilevel.metalearn.metabatch.MetaBatch` (the objects `bilevel.metalearn.meta_gradient` builds per
meta-batch) and `bilevel.metalearn.algorithms.min_eig` (what ``--lanczos-steps`` logs).

Run::

    python benchmarks/inner_solvers.py --checkpoint runs/x/checkpoint.pt --theta init \\
        --data-root ../shared/data/omniglot --lam 0.5 --out results/inner_init.json

Needs a checkpoint (for its configuration; with ``--theta init`` its parameters are not used).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bilevel import solvers as S
from bilevel.metalearn.algorithms import min_eig
from bilevel.metalearn.metabatch import InnerSolver, MetaBatch
from bilevel.metalearn.proximal import FixedLam
from bilevel.metalearn.training.checkpoint import load_checkpoint, saved_config
from bilevel.metalearn.training.experiment import build_experiment


def _tr(newton_iters: int, cg_iters: int, radius: float) -> S.TrustRegionNewtonCG:
    return S.TrustRegionNewtonCG(newton_iters=newton_iters, cg_iters=cg_iters, radius=radius, tol=0.0)


SOLVERS: dict[str, InnerSolver] = {
    "GD 16 x 0.1, backtracking": S.GradientDescent(lr=0.1, max_iter=16, tol=0.0, line_search=S.StepHalving()),
    "GD 32 x 0.1, backtracking": S.GradientDescent(lr=0.1, max_iter=32, tol=0.0, line_search=S.StepHalving()),
    "Newton-CG 3 x 5, line search": S.NewtonCG(newton_iters=3, cg_iters=5),
    "trust region 3 x 5, radius 0.3": _tr(3, 5, 0.3),
    "trust region 3 x 5, radius 1": _tr(3, 5, 1.0),
    "trust region 3 x 5, radius 3": _tr(3, 5, 3.0),
    "trust region 6 x 5, radius 1": _tr(6, 5, 1.0),
    "trust region 10 x 10, radius 1": _tr(10, 10, 1.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--theta", choices=("checkpoint", "init"), default="checkpoint")
    p.add_argument("--data-root", required=True)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--lanczos", type=int, default=20, help="Lanczos steps for the smallest eigenvalue")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(args.checkpoint)
    cfg = saved_config(ck, args.checkpoint, data_root=args.data_root, device="cpu", dtype="float32")
    ex = build_experiment(cfg, device="cpu", dtype=torch.float32)
    theta = dict(ck["theta"]) if args.theta == "checkpoint" else ex.theta
    batch = ex.train_sampler.meta_batch(12345, range(args.tasks), device="cpu")
    mb = MetaBatch(ex.batched, F.cross_entropy, True, batch, theta, FixedLam(args.lam))
    G = mb.objective(exact=False)
    th = mb.theta_values()
    rows = {}
    for name, inner in SOLVERS.items():
        t0 = time.process_time()
        res = mb.minimize(inner)
        cpu = time.process_time() - t0
        X: torch.Tensor = res.x  # type: ignore[assignment]
        with torch.enable_grad():
            Xr = X.detach().requires_grad_(True)
            g = G(Xr, th)
            (gr,) = torch.autograd.grad(g.sum(), Xr)
        lo = min_eig(mb, X, args.lanczos)  # the engine's own estimate (`MetaStats.min_eig`)
        support = mb.objective(exact=False, prox=False)(X, th)
        _, qacc = mb.query(X)
        med = lambda t: statistics.median(t.tolist())  # noqa: E731
        rows[name] = {
            "G": med(g.detach()),
            "grad_norm": med(gr.norm(dim=1)),
            "min_eig": med(lo),
            "negative": int((lo < 0).sum()),
            "distance": med((X - mb.theta_flat).norm(dim=1)),
            "support_loss": med(support.detach()),
            "query_acc": float(qacc.mean()),
            "n_hvp": res.n_hvp,
            "n_gev": res.n_gev,
            "cpu_s": cpu,
        }
        r = rows[name]
        print(
            f"| {name} | {r['G']:.3f} | {r['grad_norm']:.3f} | {r['min_eig']:+.2f} ({r['negative']}/"
            f"{args.tasks}) | {r['distance']:.2f} | {r['support_loss']:.3f} | {r['n_hvp']} / {r['n_gev']} "
            f"| {cpu:.1f} |",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "solvers": rows}, indent=1))


if __name__ == "__main__":
    main()
