"""Command line: ``python -m bilevel.metalearn {train,eval} ...``; ``--help`` documents every flag.

Examples::

    python -m bilevel.metalearn train --algo imaml-gd --preset omniglot-5w1s \\
        --meta-steps 5000 --meta-batch 16 --data-root ../shared/data/omniglot --out runs/imaml
    python -m bilevel.metalearn eval --checkpoint runs/imaml/checkpoint.pt --data-root ...
    torchrun --nproc_per_node=2 -m bilevel.metalearn train ...    # one meta-batch split over 2 ranks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .config import ALGOS, DATASETS, PRESETS, TrainConfig
from .evaluation import evaluate_fixed
from .experiment import build_experiment, load_run
from .train import train

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bilevel.metalearn",
        description="Meta-learning with implicit gradients (iMAML), MAML, first-order MAML and Reptile.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="meta-train, then evaluate on the fixed test tasks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = TrainConfig()
    t.add_argument("--algo", choices=ALGOS, default=d.algo, help="how the meta-gradient is formed")
    t.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="the paper's settings (Appendix F.2); explicit flags override them",
    )
    t.add_argument("--dataset", choices=DATASETS, default=None, help=f"task family (default {d.dataset})")
    t.add_argument("--ways", type=int, default=None, help=f"classes per task (default {d.ways})")
    t.add_argument("--shots", type=int, default=None, help=f"support examples per class (default {d.shots})")
    t.add_argument(
        "--queries", type=int, default=None, help=f"query examples per class (default {d.queries})"
    )
    t.add_argument("--meta-steps", type=int, default=None, help=f"outer Adam steps (default {d.meta_steps})")
    t.add_argument(
        "--meta-batch", type=int, default=None, help=f"tasks per meta-step (default {d.meta_batch})"
    )
    t.add_argument("--meta-lr", type=float, default=None, help=f"Adam learning rate (default {d.meta_lr})")
    t.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=None,
        help="Adam step size: constant, or cosine decay to 0 over --meta-steps or --time-limit, "
        "whichever runs out first (default constant)",
    )
    t.add_argument("--inner-steps", type=int, default=None, help=f"inner GD steps (default {d.inner_steps})")
    t.add_argument("--inner-lr", type=float, default=None, help=f"inner GD step size (default {d.inner_lr})")
    t.add_argument(
        "--eval-inner-steps",
        type=int,
        default=None,
        help="inner steps when adapting at evaluation (default: --inner-steps)",
    )
    t.add_argument(
        "--lam", type=float, default=None, help=f"proximal weight lambda of iMAML (default {d.lam})"
    )
    t.add_argument(
        "--learn-lam",
        choices=("none", "scalar", "per-tensor"),
        default=None,
        help="learn log(lambda) by the implicit gradient (iMAML only; default none)",
    )
    t.add_argument(
        "--cg-iters", type=int, default=None, help=f"CG steps of the meta-gradient (default {d.cg_iters})"
    )
    t.add_argument(
        "--newton-iters", type=int, default=None, help=f"Newton steps of imaml-hf (default {d.newton_iters})"
    )
    t.add_argument(
        "--init",
        choices=("glorot", "torch"),
        default=None,
        help="weight initialization: Glorot uniform (default) or PyTorch's module defaults",
    )
    t.add_argument(
        "--backtrack",
        action="store_true",
        default=None,
        help="inner GD halves a task's step size whenever G would not decrease enough (Armijo); "
        "robust to sharp support losses; not for maml",
    )
    t.add_argument(
        "--damping",
        type=float,
        default=None,
        help="solve ((1+damping) I + H/lam) g = v; 0 is the paper's system (default 0)",
    )
    t.add_argument("--split", choices=("vinyals", "lake"), default=None, help="Omniglot class split")
    t.add_argument("--n-val", type=int, default=None, help="validation characters out of the 1200 (vinyals)")
    t.add_argument("--data-root", default=None, help="dataset folder (or env BILEVEL_DATA_ROOT)")
    t.add_argument(
        "--seed", type=int, default=None, help=f"seed of the init and task streams (default {d.seed})"
    )
    t.add_argument("--test-tasks", type=int, default=None, help=f"fixed test tasks (default {d.test_tasks})")
    t.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between accuracy checks on --eval-tasks fixed test tasks (0: never)",
    )
    t.add_argument(
        "--eval-tasks", type=int, default=None, help=f"tasks per periodic check (default {d.eval_tasks})"
    )
    t.add_argument(
        "--eval-batch", type=int, default=None, help=f"tasks per evaluation call (default {d.eval_batch})"
    )
    t.add_argument(
        "--time-limit", type=float, default=None, help="stop meta-training after this many minutes"
    )
    t.add_argument(
        "--log-every", type=int, default=None, help=f"steps between log records (default {d.log_every})"
    )
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help=f"steps between checkpoints (default {d.checkpoint_every})",
    )
    t.add_argument("--no-vmap", action="store_true", help="loop over tasks instead of torch.func.vmap")
    t.add_argument(
        "--no-batched",
        action="store_true",
        help="use torch.func.vmap (or the loop) instead of the batched models in one call, the default "
        "for the CNNs and the MLP",
    )
    t.add_argument("--dtype", choices=("float32", "float64"), default=None, help="parameter dtype")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    t.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default=None,
        help="what --time-limit and the curves measure: elapsed or process CPU time (default wall)",
    )
    t.add_argument("--out", default=None, help=f"output folder (default {d.out})")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a saved checkpoint on the fixed test tasks")
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train")
    e.add_argument("--data-root", default=None, help="dataset folder (or env BILEVEL_DATA_ROOT)")
    e.add_argument("--test-tasks", type=int, default=None, help="fixed test tasks (default: as trained)")
    e.add_argument("--eval-inner-steps", type=int, default=None, help="inner steps at adaptation")
    e.add_argument("--device", default=None, help="device (default: cpu)")
    e.add_argument("--out", default=None, help="write the metrics as JSON here (default: print only)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the preset, then every flag given explicitly."""
    values: dict[str, Any] = {}
    if args.preset:
        values.update(PRESETS[args.preset])
    for name in FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    values["algo"] = args.algo
    if args.no_vmap:
        values["vectorize"] = False
    if args.no_batched:
        values["batched"] = False
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        cfg = config_from_args(args)
        metrics = train(cfg, resume=args.resume, progress=not args.no_progress)
        if metrics:
            print(
                f"{cfg.algo}: test accuracy {metrics['test_accuracy']:.2f} +- {metrics['test_ci95']:.2f} % "
                f"over {metrics['test_tasks']} tasks, test loss {metrics['test_loss']:.4f}; "
                f"wrote {Path(cfg.out) / 'metrics.json'}"
            )
        return 0
    overrides: dict[str, Any] = {}
    for name in ("data_root", "test_tasks", "eval_inner_steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    device = args.device or "cpu"
    run = load_run(args.checkpoint, device, **overrides)
    assert run.config is not None  # load_run always records the configuration
    test_tasks = build_experiment(run.config, device=device).test_sampler
    res: dict[str, Any] = evaluate_fixed(run, test_tasks, run.config.test_tasks).summary()
    res["checkpoint"] = str(args.checkpoint)
    res["step"] = run.step
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
