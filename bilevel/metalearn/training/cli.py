"""Command line: ``python -m bilevel.metalearn {train,eval,report} ...``; ``--help`` documents every flag.

Examples::

    python -m bilevel.metalearn train --algo imaml-gd --preset omniglot-5w1s \\
        --meta-steps 5000 --meta-batch 16 --data-root ../shared/data/omniglot --out runs/imaml
    python -m bilevel.metalearn eval --checkpoint runs/imaml/checkpoint.pt --data-root ...
    python -m bilevel.metalearn report runs/imaml runs/fomaml --out runs/report   # PNG plots
    torchrun --nproc_per_node=2 -m bilevel.metalearn train ...    # one meta-batch split over 2 ranks

Installed, the same is the ``bilevel-metalearn`` command.  A bad value or a flag that does not
apply to the chosen algorithm or dataset is a usage error (exit code 2) that names the flag; a
run that cannot go on (missing data, a damaged checkpoint, a diverging inner loop) ends with a
one-line error (exit code 1).  Progress, the start-up banner and periodic results go to standard
error; the final result to standard output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from ... import BilevelError, BilevelWarning, CheckpointError
from ..evaluation import evaluate_fixed
from ..proximal import LAM_KINDS
from ..registry import INNER_KINDS, readers
from .checkpoint import CheckpointWriteError, atomic_json, load_checkpoint, saved_config, strict_json
from .config import ALGOS, DATASET_DEFAULTS, DATASETS, PRESETS, RECIPES, ConfigError, TrainConfig
from .console import Console, ProgressMode
from .experiment import build_experiment, load_run
from .provenance import saved_provenance
from .train import train

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

#: What each flag that only some algorithms read is (the registry says which algorithms read it).
_ALGO_FLAG_MEANINGS: dict[str, str] = {
    "lam": "iMAML's proximal weight",
    "learn_lam": "iMAML's learned proximal weight",
    "cg_iters": "the CG steps of iMAML's meta-gradient",
    "damping": "the damping of iMAML's meta-gradient system",
    "cg_warm_start": "the starting point of iMAML's CG",
    "lanczos_steps": "the smallest eigenvalue of I + H/lam, iMAML's system",
    "newton_iters": "the Newton steps of imaml-hf",
    "inner_steps": "inner GD steps (imaml-hf takes Newton steps)",
    "inner_lr": "the inner GD step size (imaml-hf takes Newton steps)",
    "eval_inner_steps": "inner GD steps at evaluation (imaml-hf takes Newton steps)",
    "eval_lam": "iMAML's proximal weight at evaluation",
    "backtrack": "inner GD's backtracking line search",
    "inner_solver": "the inner solver (GD or accelerated GD; imaml-hf: line search or trust region)",
}
#: Flags that only some algorithms read: field -> (the algorithms, what the flag is).
ALGO_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    name: (readers(name), meaning) for name, meaning in _ALGO_FLAG_MEANINGS.items()
}
_IMAGE_DATASETS = tuple(x for x in DATASETS if x != "sinusoid")
#: Flags that only some datasets read: field -> (the datasets, what the flag is).
DATASET_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "ways": (_IMAGE_DATASETS, "classes per task (a sinusoid task has none)"),
    "data_root": (_IMAGE_DATASETS, "the image folder (sinusoid tasks are generated)"),
    "split": (("omniglot",), "Omniglot's class split"),
    "n_val": (("omniglot",), "Omniglot's validation characters"),
}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _choice_flags(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    """--algo, --recipe, --preset: what is run."""
    t.add_argument(
        "--algo",
        choices=ALGOS,
        default=None,
        help=f"how the meta-gradient is formed (default: the --recipe's, else {d.algo}); imaml-released "
        "is the authors' released code, not the paper's method",
    )
    t.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="every setting of a published procedure (released: the authors' released iMAML code, "
        "which is not the paper's algorithm); --preset and explicit flags override it",
    )
    t.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a task format with each algorithm's settings: measured here where the README says so "
        "(omniglot-5w1s: imaml-gd, fomaml, maml), else the paper's (Appendix F.2); paper-<name>: the "
        "paper's for every algorithm; explicit flags override them",
    )


def _task_flags(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The task format."""
    t.add_argument("--dataset", choices=DATASETS, default=None, help=f"task family (default {d.dataset})")
    t.add_argument("--ways", type=int, default=None, help=f"classes per task (default {d.ways})")
    sine = DATASET_DEFAULTS["sinusoid"]
    t.add_argument(
        "--shots",
        type=int,
        default=None,
        help=f"support examples per class (default {d.shots}; sinusoid: {sine['shots']} points)",
    )
    t.add_argument(
        "--queries",
        type=int,
        default=None,
        help=f"query examples per class (default {d.queries}; sinusoid: {sine['queries']} points)",
    )


def _outer_flags(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The outer loop (Adam)."""
    t.add_argument("--meta-steps", type=int, default=None, help=f"outer Adam steps (default {d.meta_steps})")
    t.add_argument(
        "--meta-batch", type=int, default=None, help=f"tasks per meta-step (default {d.meta_batch})"
    )
    t.add_argument("--meta-lr", type=float, default=None, help=f"Adam learning rate (default {d.meta_lr})")
    t.add_argument("--adam-eps", type=float, default=None, help=f"Adam's epsilon (default {d.adam_eps:g})")
    t.add_argument(
        "--clip-grad-norm",
        type=float,
        default=None,
        help="rescale the meta-gradient to at most this norm before Adam's step (default: no clipping)",
    )
    t.add_argument(
        "--task-pool",
        type=int,
        default=None,
        help="train on a fixed pool of this many tasks, drawn with replacement (default 0: fresh tasks)",
    )
    t.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=None,
        help="Adam step size: constant, or cosine decay to 0 over --meta-steps or --time-limit, "
        "whichever runs out first (default constant)",
    )


def _inner_flags(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The inner solver, iMAML's lambda and its meta-gradient system."""
    t.add_argument("--inner-steps", type=int, default=None, help=f"inner GD steps (default {d.inner_steps})")
    t.add_argument(
        "--inner-lr",
        type=float,
        default=None,
        help=f"inner GD step size; meta-sgd: its learned step sizes' initial value (default {d.inner_lr})",
    )
    t.add_argument(
        "--eval-inner-steps",
        type=int,
        default=None,
        help="inner steps when adapting at evaluation (default: --inner-steps)",
    )
    t.add_argument(
        "--eval-lam",
        type=float,
        default=None,
        help="iMAML's lambda when adapting at evaluation (default: as trained; 0: plain GD on the "
        "support loss)",
    )
    t.add_argument(
        "--lam", type=float, default=None, help=f"proximal weight lambda of iMAML (default {d.lam})"
    )
    t.add_argument(
        "--learn-lam",
        choices=LAM_KINDS,
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
        choices=("glorot", "torch", "released"),
        default=None,
        help="weight initialization: Glorot uniform (default), PyTorch's module defaults, or the released "
        "iMAML code's (Glorot gain 1.73, biases in [0, 0.05])",
    )
    t.add_argument(
        "--inner-solver",
        choices=tuple(INNER_KINDS),
        default=None,
        help="inner GD, or Nesterov's accelerated GD with Theorem 2's momentum (default gd); for "
        "imaml-hf, trust-region replaces the paper's line-search Newton-CG by Steihaug's trust region",
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
    t.add_argument(
        "--cg-warm-start",
        action="store_true",
        default=None,
        help="start CG from the first-order gradient (0 steps = first-order MAML; one more HVP) "
        "instead of 0 as in the paper",
    )


def _data_flags(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The data and the seed."""
    t.add_argument(
        "--split", choices=("vinyals", "lake"), default=None, help=f"Omniglot class split (default {d.split})"
    )
    t.add_argument(
        "--n-val",
        type=int,
        default=None,
        help=f"Omniglot validation characters out of the 1200 (vinyals; default {d.n_val})",
    )
    t.add_argument(
        "--data-root", default=None, help="dataset folder (default: the environment's BILEVEL_DATA_ROOT)"
    )
    t.add_argument(
        "--seed", type=int, default=None, help=f"seed of the init and task streams (default {d.seed})"
    )


def _evaluation_flags(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The final and periodic evaluations, logging and checkpoints."""
    t.add_argument("--test-tasks", type=int, default=None, help=f"fixed test tasks (default {d.test_tasks})")
    t.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between accuracy checks on --eval-tasks fixed test tasks, printed and logged "
        f"(default {d.eval_every}: never)",
    )
    t.add_argument(
        "--eval-every-minutes",
        type=float,
        default=None,
        help="the same check each time the training clock (--clock, evaluations left out) passes a "
        "multiple of this many minutes: curves at equal compute (default: never)",
    )
    t.add_argument(
        "--eval-tasks",
        type=int,
        default=None,
        help=f"tasks per periodic check, with --eval-every or --eval-every-minutes (default {d.eval_tasks})",
    )
    t.add_argument(
        "--eval-batch", type=int, default=None, help=f"tasks per evaluation call (default {d.eval_batch})"
    )
    t.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="stop meta-training after this many minutes, then evaluate (default: no limit)",
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
    t.add_argument(
        "--lanczos-steps",
        type=int,
        default=None,
        help="log the smallest eigenvalue of I + H/lam at the inner answers, by this many Lanczos "
        "steps (HVPs) at every logged step (default 0: off; iMAML only)",
    )


def _engine_flags(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    """How the work is run: engine, dtype, device, threads, clock."""
    t.add_argument("--no-vmap", action="store_true", help="loop over tasks instead of torch.func.vmap")
    t.add_argument(
        "--no-batched",
        action="store_true",
        help="use torch.func.vmap (or the loop) instead of the batched models in one call, the default "
        "for the CNNs and the MLP",
    )
    t.add_argument(
        "--task-chunk",
        type=int,
        default=None,
        help="compute the meta-gradient this many tasks at a time (default: the whole meta-batch); "
        "the same step up to rounding, with the peak memory of one chunk",
    )
    t.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        help="run the batched model's inner steps, query gradients and evaluation under torch.compile "
        "with this mode (bare --compile: default; reduce-overhead uses CUDA graphs on a GPU; the "
        "first meta-step compiles, tens of seconds on CPU; same values to rounding)",
    )
    t.add_argument(
        "--dtype", choices=("float32", "float64"), default=None, help=f"parameter dtype (default {d.dtype})"
    )
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    t.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default=None,
        help="what --time-limit and the curves measure: elapsed or process CPU time (default wall)",
    )


def _output_flags(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The output folder, resuming and the console."""
    t.add_argument("--out", default=None, help=f"output folder (default {d.out})")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint.pt; its settings must be the run's, except "
        "--meta-steps and --time-limit (constant schedule), evaluation, logging, checkpointing, "
        "--device, --threads and --data-root",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that holds one (its metrics.json is kept as metrics.step<N>.json)",
    )
    t.add_argument(
        "--no-progress", action="store_true", help="plain progress lines instead of a progress bar"
    )
    t.add_argument("--quiet", action="store_true", help="print nothing but the final result")


def _eval_parser(sub: Any) -> None:
    """The ``eval`` subcommand."""
    e = sub.add_parser(
        "eval",
        help="evaluate a saved checkpoint on the fixed test tasks",
        usage="%(prog)s --checkpoint PATH [flags]   (--help lists every flag)",
    )
    e.set_defaults(subparser=e)
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train")
    e.add_argument("--data-root", default=None, help="dataset folder (or env BILEVEL_DATA_ROOT)")
    e.add_argument("--test-tasks", type=int, default=None, help="fixed test tasks (default: as trained)")
    e.add_argument(
        "--eval-inner-steps",
        type=int,
        default=None,
        help="inner steps at adaptation (default: as trained; not imaml-hf, which takes Newton steps)",
    )
    e.add_argument(
        "--eval-lam",
        type=float,
        default=None,
        help="iMAML's lambda at adaptation (0: plain GD on the support loss; iMAML only)",
    )
    e.add_argument("--device", default=None, help="device (default: cpu)")
    e.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    e.add_argument("--out", default=None, help="write the metrics as JSON here (default: print only)")
    e.add_argument(
        "--no-progress", action="store_true", help="plain progress lines instead of a progress bar"
    )
    e.add_argument("--quiet", action="store_true", help="print nothing but the result")


def _report_parser(sub: Any) -> None:
    """The ``report`` subcommand."""
    rp = sub.add_parser(
        "report",
        help="plot run folders written by train: accuracy or MSE, losses, inner-solver and CG diagnostics",
        usage="%(prog)s RUN [RUN...] --out DIR",
    )
    rp.set_defaults(subparser=rp)
    rp.add_argument("runs", nargs="+", help="run folders (the --out of train), overlaid in every plot")
    rp.add_argument("--out", required=True, help="folder for the PNGs (created)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bilevel.metalearn",
        description="Meta-learning with implicit gradients (iMAML), MAML, first-order MAML and Reptile.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="meta-train, then evaluate on the fixed test tasks",
        usage="%(prog)s [flags]   (--help lists every flag)",
        description="Meta-train, then evaluate on the fixed test tasks. Flags left out take the "
        "--preset's values, else the defaults shown.",
    )
    t.set_defaults(subparser=t)
    d = TrainConfig()
    for group in (
        _choice_flags,
        _task_flags,
        _outer_flags,
        _inner_flags,
        _data_flags,
        _evaluation_flags,
        _engine_flags,
        _output_flags,
    ):
        group(t, d)
    _eval_parser(sub)
    _report_parser(sub)
    return p


class UsageError(ValueError):
    """A flag value or combination the command refuses (the message names the flag)."""


def _check_applies(args: argparse.Namespace, algo: str, dataset: str) -> None:
    """Refuse explicit flags that the chosen algorithm or dataset would ignore.

    Raises:
        UsageError: such a flag was given (a preset's values are not flags and are not checked).
    """
    for table, chosen, what in ((ALGO_FLAGS, algo, "--algo"), (DATASET_FLAGS, dataset, "--dataset")):
        for name, (applies, meaning) in table.items():
            if getattr(args, name, None) is not None and chosen not in applies:
                raise UsageError(
                    f"argument {_flag(name)}: {meaning}; {what} {chosen} does not use it (it applies to "
                    f"{', '.join(applies)}): drop it"
                )
    if (
        getattr(args, "eval_tasks", None) is not None
        and not getattr(args, "eval_every", None)
        and getattr(args, "eval_every_minutes", None) is None
    ):
        raise UsageError(
            "argument --eval-tasks: sizes the periodic evaluation; give --eval-every N or "
            "--eval-every-minutes M too"
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the recipe, the preset, the dataset's task format (`DATASET_DEFAULTS`), then every
    flag given explicitly.

    Raises:
        UsageError: a flag that the chosen algorithm or dataset does not use.
        ConfigError: a value no run can use (`TrainConfig`'s checks).
    """
    values: dict[str, Any] = {}
    if args.recipe:
        values.update(RECIPES[args.recipe])
    if args.preset:
        algo = args.algo or values.get("algo", TrainConfig().algo)
        values.update(PRESETS[args.preset].values(algo))
    dataset = args.dataset or values.get("dataset", TrainConfig().dataset)
    for name, value in DATASET_DEFAULTS.get(dataset, {}).items():
        values.setdefault(name, value)  # under a preset's, a recipe's and an explicit flag's value
    for name in FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    values["algo"] = args.algo or values.get("algo", TrainConfig().algo)
    _check_applies(args, values["algo"], values.get("dataset", TrainConfig().dataset))
    if args.no_vmap:
        values["vectorize"] = False
    if args.no_batched:
        values["batched"] = False
    return TrainConfig(**values)


def _usage(parser: argparse.ArgumentParser, err: Exception) -> NoReturn:
    """Exit with argparse's usage error (code 2), naming the flag of a `ConfigError`."""
    if isinstance(err, ConfigError):
        parser.error(f"argument {_flag(err.field)}: {err.value!r} is refused: {err.problem}")
    parser.error(str(err))


def _fail(parser: argparse.ArgumentParser, err: BaseException) -> int:
    """A one-line error for a run that cannot go on (exit code 1)."""
    print(f"{parser.prog}: error: {err}", file=sys.stderr)
    return 1


def _progress(args: argparse.Namespace) -> ProgressMode:
    return "none" if args.quiet else ("lines" if args.no_progress else "auto")


def _train(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.subparser
    try:
        cfg = config_from_args(args)
    except ValueError as err:  # UsageError, ConfigError, the algorithm's own checks
        _usage(parser, err)
    try:
        metrics = train(cfg, resume=args.resume, progress=_progress(args), overwrite=args.overwrite)
    except CheckpointWriteError as err:  # a full disk, no permission: not the flags' fault
        return _fail(parser, err)
    except (CheckpointError, ConfigError) as err:  # the flags asked for something impossible
        _usage(parser, err)
    except BilevelError as err:  # data, divergence, distributed setup: what to do is in the message
        return _fail(parser, err)
    except ImportError as err:
        if "pip install" not in str(err):
            raise
        return _fail(parser, err)
    if metrics:
        if cfg.dataset == "sinusoid":
            score = f"test MSE {metrics['test_loss']:.4f} +- {metrics['test_loss_ci95']:.4f}"
        else:
            score = (
                f"test accuracy {metrics['test_accuracy']:.2f} +- {metrics['test_ci95']:.2f} %, "
                f"test loss {metrics['test_loss']:.4f}"
            )
        print(
            f"{cfg.algo}: {score} over {metrics['test_tasks']} tasks after {metrics['meta_steps_done']} "
            f"meta-steps; wrote {Path(cfg.out) / 'metrics.json'}"
        )
    return 0


#: The evaluation's settings that ``eval`` flags replace (each refused where train refuses it).
_EVAL_OVERRIDES = ("data_root", "test_tasks", "eval_inner_steps", "eval_lam", "threads")


def differences(trained: TrainConfig, now: TrainConfig) -> dict[str, dict[str, Any]]:
    """The settings in which ``now`` differs from ``trained``: ``{field: {"trained": .., "now": ..}}``.

    A training that left its device to the machine (``None``) differs from an evaluation in
    no device: which one ran is in each output already.
    """
    return {
        f.name: {"trained": getattr(trained, f.name), "now": getattr(now, f.name)}
        for f in dataclasses.fields(TrainConfig)
        if getattr(trained, f.name) != getattr(now, f.name)
        and not (f.name == "device" and getattr(trained, f.name) is None)
    }


def _eval(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.subparser
    console = Console(_progress(args))
    overrides = {name: getattr(args, name) for name in _EVAL_OVERRIDES if getattr(args, name) is not None}
    device = args.device or "cpu"
    try:
        ck = load_checkpoint(args.checkpoint, device)
        trained = saved_config(ck, args.checkpoint)
        # the one rule of train: a flag the run's algorithm or dataset does not read is refused
        _check_applies(args, trained.algo, trained.dataset)
        run = load_run(args.checkpoint, device, **overrides)
    except (FileNotFoundError, CheckpointError, ConfigError, UsageError) as err:
        _usage(parser, err)
    cfg = run.config
    if cfg is None:  # load_run records it; a Run built otherwise has none
        return _fail(parser, CheckpointError(f"{args.checkpoint}: the run has no configuration"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    changed = differences(trained, cfg)
    console.line(
        f"bilevel.metalearn eval: {args.checkpoint} ({cfg.algo}, {cfg.dataset}, step {run.step}) on "
        f"{cfg.test_tasks} test tasks, device {device}"
    )
    if changed:
        console.line(
            "settings that differ from training: "
            + ", ".join(f"{k} {v['trained']!r} -> {v['now']!r}" for k, v in changed.items())
        )
    try:
        provenance = saved_provenance(ck, args.checkpoint)
        exp = build_experiment(cfg, device=device, provenance=provenance)
        for note in exp.notes:
            console.line(note)
        with console.progress(cfg.test_tasks, "evaluation", unit="task", every=cfg.eval_batch) as bar:
            res: dict[str, Any] = evaluate_fixed(
                run, exp.test_sampler, cfg.test_tasks, progress=bar.update
            ).summary()
    except BilevelError as err:
        return _fail(parser, err)
    res["checkpoint"] = str(args.checkpoint)
    res["step"] = run.step
    res["differs_from_training"] = changed
    res["data_notes"] = list(exp.notes)
    res["trained_with_version"] = provenance.version or None
    print(strict_json(res, indent=2))
    if args.out:
        try:
            atomic_json(res, Path(args.out))
        except CheckpointWriteError as err:
            return _fail(parser, err)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import RunFormatError, read_runs, summarize, write_report

    parser: argparse.ArgumentParser = args.subparser
    try:
        runs = read_runs(args.runs)
    except (FileNotFoundError, RunFormatError) as err:
        _usage(parser, err)
    print(summarize(runs))
    try:
        written = write_report(runs, args.out)
    except (ImportError, OSError) as err:
        return _fail(parser, err)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Raises:
        SystemExit: a usage error (code 2) or ``--help`` (code 0).
    """
    args, extra = _parser().parse_known_args(argv)
    if extra:  # the subcommand's own usage line, not the top-level one
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    with _one_line_warnings():
        if args.command == "train":
            return _train(args)
        if args.command == "report":
            return _report(args)
        return _eval(args)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """The library's warnings as one ``warning: ...`` line each on stderr.

    A command-line user acts on the message; the file and source line of the ``warn``
    call that Python prints by default say nothing to them.  Other warnings keep
    Python's format.
    """
    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, BilevelWarning):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, *rest, **kw)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
