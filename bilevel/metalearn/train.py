"""Meta-training and evaluation: Algorithm 1 of iMAML with any of the five meta-gradients.

One `TrainConfig` describes a run; `train` runs it and writes, under ``config.out``:

* ``metrics.json``: ``test_accuracy`` and ``test_ci95`` (percent, over the fixed test
  tasks), the test loss, the configuration, the environment and the curves;
* ``split.json``: ``train_classes``, ``val_classes``, ``test_classes`` (image datasets);
* ``checkpoint.pt``: theta, a learned lambda, the Adam state and the step, written
  atomically (a temporary file renamed over the old one) and read back with
  ``torch.load(..., weights_only=True)``; ``--resume`` continues from it;
* ``log.jsonl``: one JSON record per logged step (losses, accuracies, inner-solver
  and CG diagnostics, wall time).

Distributed (``torchrun --nproc_per_node=N``): rank r computes tasks
``range(r, B, N)`` of every meta-batch of B tasks, the per-task gradient sums are
all-reduced, and every rank takes the same Adam step from the same state, so the
parameters stay identical.  Task i of step t is drawn from
``SeedSequence([seed, 0, t, i])`` whatever rank draws it, so N ranks see exactly the
tasks of one process.  Only rank 0 writes files.  The backend is ``nccl`` on CUDA and
``gloo`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import NonFiniteError
from .algorithms import MetaAlgorithm, evaluate_batch, make_algorithm, meta_gradient
from .datasets import FewShotData
from .models import (
    BatchedModel,
    Params,
    batched_model,
    default_model,
    make_functional,
    miniimagenet_conv4,
    mse,
    omniglot_cnn,
    sinusoid_mlp,
)
from .tasks import SinusoidTasks, TaskSampler

__all__ = ["PRESETS", "TrainConfig", "evaluate", "load_checkpoint", "train"]

ALGOS = ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile")
DATASETS = ("omniglot", "sinusoid", "miniimagenet", "folder")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a meta-training run (saved with it).

    Attributes:
        algo: one of ``imaml-gd``, ``imaml-hf``, ``maml``, ``fomaml``, ``reptile``.
        dataset: ``omniglot``, ``sinusoid``, ``miniimagenet`` or ``folder``.
        ways, shots, queries: the task format (queries per class; for sinusoid, points).
        meta_steps, meta_batch, meta_lr: outer loop (Adam).
        lr_schedule: ``constant`` or ``cosine``: Adam's step size decays as
            ``meta_lr * (1 + cos(pi * p)) / 2`` where ``p`` is the fraction of the budget used,
            ``step / meta_steps`` or, with a ``time_limit``, the larger of that and
            ``clock / time_limit`` (so a time-limited run ends with a small step size whatever its
            speed; the schedule then depends on the machine's speed, not only on the seed).
        inner_steps, inner_lr: inner GD (train time).
        eval_inner_steps: inner GD steps when adapting at evaluation (None: ``inner_steps``).
        lam: proximal weight of G for the iMAML variants.
        learn_lam: ``none``, ``scalar`` or ``per-tensor``: learn log lam by the implicit gradient.
        cg_iters, newton_iters, damping: iMAML's CG steps, HF's Newton steps, damping of the system.
        backtrack: inner GD with a per-task backtracking step size (`InnerGD.backtrack`); not for maml.
        split: ``vinyals`` or ``lake`` (Omniglot).
        n_val: validation characters carved out of the 1200 training ones (vinyals).
        data_root: dataset location (or the BILEVEL_DATA_ROOT environment variable).
        seed: seeds the initialization and the task streams.
        init: ``glorot`` (Glorot-uniform conv and linear weights, Finn et al.'s choice for
            convolutions; `bilevel.metalearn.init_params`) or ``torch`` (PyTorch's default
            Kaiming-uniform initialization of the modules, seeded by ``seed``).  Behind batch
            norm, the scale of a conv weight sets the effective inner step size (the gradient
            scales as 1 / ||w||): the default ``torch`` weights are about 1.7x smaller.
        test_tasks: fixed test tasks for the final evaluation (600 in the protocol).
        eval_every, eval_tasks: a curve of accuracy on the first ``eval_tasks`` fixed test
            tasks every ``eval_every`` steps (monitoring only: nothing is selected on it).
        eval_batch: tasks per vmapped evaluation call.
        time_limit: stop meta-training after this many minutes (None: no limit).
        log_every: steps between log records.
        checkpoint_every: steps between checkpoints.
        vectorize: vmap over tasks (else a loop); for models without a batched form, and for MAML.
        batched: run the meta-batch's per-task models in one call with plain autograd where the
            model has a `BatchedModel` (ConvNet, MLP); measured 1.3-2.5x faster per meta-step on
            CPU than vmap, same gradients (tested in float64).
        dtype: ``float32`` or ``float64``.
        device: ``cpu``, ``cuda``, ... (None: cuda if available).
        threads: torch intra-op threads (None: torch's default).
        clock: ``wall`` (elapsed time) or ``cpu`` (this process's CPU time, all its threads):
            what ``time_limit`` and the curves' ``time`` measure.  With one thread on a shared
            machine, ``cpu`` is the time the run would take on a dedicated core; ``wall`` is
            also logged either way (``wall_time``).
        out: output folder.
    """

    algo: str = "imaml-gd"
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_steps: int = 1000
    meta_batch: int = 16
    meta_lr: float = 1e-3
    lr_schedule: str = "constant"
    inner_steps: int = 16
    inner_lr: float = 0.1
    eval_inner_steps: int | None = None
    lam: float = 2.0
    learn_lam: str = "none"
    cg_iters: int = 5
    newton_iters: int = 3
    damping: float = 0.0
    backtrack: bool = False
    split: str = "vinyals"
    n_val: int = 0
    data_root: str | None = None
    seed: int = 0
    init: str = "glorot"
    test_tasks: int = 600
    eval_every: int = 0
    eval_tasks: int = 100
    eval_batch: int = 25
    time_limit: float | None = None
    log_every: int = 10
    checkpoint_every: int = 200
    vectorize: bool = True
    batched: bool = True
    dtype: str = "float32"
    device: str | None = None
    threads: int | None = None
    clock: str = "wall"
    out: str = "runs/default"

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"TrainConfig(algo={self.algo!r}): choose one of {', '.join(ALGOS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"TrainConfig(dataset={self.dataset!r}): choose one of {', '.join(DATASETS)}")
        if self.learn_lam not in ("none", "scalar", "per-tensor"):
            raise ValueError(f"TrainConfig(learn_lam={self.learn_lam!r}): none, scalar or per-tensor")
        if self.learn_lam != "none" and not self.algo.startswith("imaml"):
            raise ValueError("TrainConfig: a learned lambda needs an iMAML algorithm")
        for name in ("ways", "shots", "queries", "meta_batch", "eval_batch", "test_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig({name}={getattr(self, name)}): must be >= 1")
        if self.meta_steps < 0:
            raise ValueError(f"TrainConfig(meta_steps={self.meta_steps}): must be >= 0")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"TrainConfig(clock={self.clock!r}): wall or cpu")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"TrainConfig(dtype={self.dtype!r}): float32 or float64")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig(lr_schedule={self.lr_schedule!r}): constant or cosine")
        if self.init not in ("glorot", "torch"):
            raise ValueError(f"TrainConfig(init={self.init!r}): glorot or torch")
        self.algorithm()  # the algorithm's own checks (e.g. maml with backtrack)

    def algorithm(self, *, evaluation: bool = False) -> MetaAlgorithm:
        steps = (
            self.eval_inner_steps if (evaluation and self.eval_inner_steps is not None) else self.inner_steps
        )
        return make_algorithm(
            self.algo,
            inner_steps=steps,
            inner_lr=self.inner_lr,
            lam=self.lam,
            cg_iters=self.cg_iters,
            newton_iters=self.newton_iters,
            damping=self.damping,
            backtrack=self.backtrack,
        )


#: The paper's settings (Appendix F.2).  Keys are ``--preset`` names.
PRESETS: dict[str, dict[str, Any]] = {
    "omniglot-5w1s": dict(dataset="omniglot", ways=5, shots=1, inner_steps=16, lam=2.0, cg_iters=5),
    "omniglot-5w5s": dict(dataset="omniglot", ways=5, shots=5, inner_steps=16, lam=2.0, cg_iters=5),
    "omniglot-20w1s": dict(dataset="omniglot", ways=20, shots=1, inner_steps=25, lam=2.0, cg_iters=5),
    "omniglot-20w5s": dict(dataset="omniglot", ways=20, shots=5, inner_steps=25, lam=2.0, cg_iters=5),
    "miniimagenet-5w1s": dict(dataset="miniimagenet", ways=5, shots=1, inner_steps=10, lam=0.5, cg_iters=5),
    "sinusoid-5s": dict(
        dataset="sinusoid", ways=1, shots=5, queries=10, inner_steps=10, inner_lr=0.01, lam=2.0, meta_batch=10
    ),
}


# ------------------------------------------------------------------------------ distributed context
@dataclasses.dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # the process group was created by `train`, which then destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), owned)


def _allreduce_(tensors: list[torch.Tensor], d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        for t, c in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
            t.copy_(c.view_as(t))


def _broadcast_(tensors: list[torch.Tensor], d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src=0)


# ------------------------------------------------------------------------------ problem set-up
@dataclasses.dataclass
class _Problem:
    model: Callable[[Params, torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    classification: bool
    theta: Params
    train: Any
    test: Any
    split: dict[str, Any] | None
    batched: BatchedModel | None = None


def _functional(
    model: nn.Module, cfg: TrainConfig, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> tuple[Callable[[Params, torch.Tensor], torch.Tensor], Params]:
    """The model's function and initial parameters, by ``cfg.init``."""
    if cfg.init == "glorot":
        return make_functional(model, gen, dtype=dtype, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if m is not model and callable(reset):
                reset()
        return make_functional(model, None, dtype=dtype, device=device)


def _build(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> _Problem:
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset == "sinusoid":
        train = SinusoidTasks(cfg.shots, cfg.queries, seed=cfg.seed, dtype=dtype)
        test = SinusoidTasks(cfg.shots, cfg.queries, seed=cfg.seed, eval_seed=cfg.seed + 10_000, dtype=dtype)
        mlp = sinusoid_mlp()
        fn, theta = _functional(mlp, cfg, gen, dtype, device)
        bm = batched_model(mlp) if cfg.batched else None
        return _Problem(fn, mse, False, theta, train, test, None, bm)
    data: FewShotData
    model: nn.Module
    if cfg.dataset == "omniglot":
        from .omniglot import load_omniglot

        split = cfg.split if cfg.split in ("vinyals", "lake") else "vinyals"
        data = load_omniglot(cfg.data_root, split=split, seed=cfg.seed, n_val=cfg.n_val)  # type: ignore[arg-type]
        model = omniglot_cnn(cfg.ways)
    elif cfg.dataset == "miniimagenet":
        from .miniimagenet import load_miniimagenet

        data = load_miniimagenet(cfg.data_root)
        model = miniimagenet_conv4(cfg.ways)
    else:
        from .folder import load_image_folder

        data = load_image_folder(cfg.data_root, seed=cfg.seed)
        model = default_model(data.image_shape, cfg.ways)
    fn, theta = _functional(model, cfg, gen, dtype, device)
    sampler = TaskSampler(data.train, cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed, dtype=dtype)
    tests = TaskSampler(
        data.test, cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed, eval_seed=cfg.seed + 1, dtype=dtype
    )
    bm = batched_model(model) if cfg.batched else None
    return _Problem(fn, F.cross_entropy, True, theta, sampler, tests, data.split.to_dict(), bm)


def _environment(device: torch.device, d: _Dist) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "world_size": d.world,
        "argv": sys.argv,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ------------------------------------------------------------------------------ checkpoints
def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `train` (``weights_only=True``: no code is unpickled).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}: pass the checkpoint.pt written by `train`")
    ck: dict[str, Any] = torch.load(p, map_location=device, weights_only=True)
    return ck


# ------------------------------------------------------------------------------ evaluation
def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def evaluate(
    cfg: TrainConfig,
    model: Callable[[Params, torch.Tensor], torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    classification: bool,
    theta: Params,
    sampler: Any,
    n_tasks: int,
    device: torch.device,
    lam: Any = None,
    batched: BatchedModel | None = None,
) -> dict[str, float]:
    """Adapt to ``n_tasks`` fixed tasks and score the query sets.

    Returns:
        ``accuracy`` and ``ci95`` (percent; NaN for regression), ``loss`` and
        ``loss_ci95`` (the mean query loss and its 95% half-width), ``n_tasks``.
    """
    algo = cfg.algorithm(evaluation=True)
    losses, accs = [], []
    for idx in _chunks(n_tasks, cfg.eval_batch):
        batch = sampler.fixed_batch(list(idx), device=device)
        ql, qa = evaluate_batch(
            algo,
            model,
            loss,
            theta,
            batch,
            lam=lam,
            classification=classification,
            vectorize=cfg.vectorize,
            batched=batched,
        )
        losses.append(ql.double().cpu())
        accs.append(qa.double().cpu())
    ls, acs = torch.cat(losses), torch.cat(accs)

    def ci(x: torch.Tensor) -> float:
        return float(1.96 * x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")

    return {
        "accuracy": float(acs.mean() * 100),
        "ci95": ci(acs) * 100,
        "loss": float(ls.mean()),
        "loss_ci95": ci(ls),
        "n_tasks": int(ls.numel()),
    }


def _evaluate_problem(
    cfg: TrainConfig, prob: _Problem, theta: Params, n_tasks: int, device: torch.device, lam: Any
) -> dict[str, float]:
    """`evaluate` on ``prob``'s fixed test tasks with its model, loss and batched model."""
    return evaluate(
        cfg, prob.model, prob.loss, prob.classification, theta, prob.test, n_tasks, device, lam, prob.batched
    )


def _lam_params(
    cfg: TrainConfig, theta: Params, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Learned log-lambda leaves (empty when lambda is fixed)."""
    if cfg.learn_lam == "none":
        return {}
    init = math.log(cfg.lam)
    names = ["lam"] if cfg.learn_lam == "scalar" else list(theta)
    return {n: torch.tensor(init, device=device, dtype=dtype, requires_grad=True) for n in names}


# ------------------------------------------------------------------------------ training


def _lam_value(cfg: TrainConfig, log_lam: dict[str, torch.Tensor]) -> Any:
    if not log_lam:
        return None
    if cfg.learn_lam == "scalar":
        return log_lam["lam"].exp()
    return {k: v.exp() for k, v in log_lam.items()}


def _past_time_limit(cfg: TrainConfig, elapsed: float) -> bool:
    """Whether ``elapsed`` seconds of the training clock exceed ``cfg.time_limit`` minutes."""
    return cfg.time_limit is not None and elapsed > cfg.time_limit * 60


def _scheduled_lr(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Adam's step size at meta-step ``step`` after ``elapsed`` seconds of the training clock."""
    if cfg.lr_schedule == "constant":
        return cfg.meta_lr
    p = step / max(cfg.meta_steps, 1)
    if cfg.time_limit is not None:
        p = max(p, elapsed / (cfg.time_limit * 60))
    return cfg.meta_lr * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Meta-train with Adam (Algorithm 1), then evaluate on the fixed test tasks.

    Returns:
        The metrics dictionary also written to ``metrics.json`` (on rank 0).
    """
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    d = _init_distributed(device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    prob = _build(cfg, device, dtype)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in prob.theta.items()}
    log_lam = _lam_params(cfg, theta, device, dtype)
    leaves = list(theta.values()) + list(log_lam.values())
    _broadcast_([t.data for t in leaves], d)
    opt = torch.optim.Adam(leaves, lr=cfg.meta_lr)
    algo = cfg.algorithm()
    history: dict[str, list[dict[str, Any]]] = {"steps": [], "eval": []}
    start, elapsed0 = 0, 0.0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, device)
        with torch.no_grad():
            for k, v in ck["theta"].items():
                theta[k].copy_(v)
            for k, v in ck["log_lam"].items():
                log_lam[k].copy_(v)
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        history = json.loads(ck["history"])
        elapsed0 = float(ck["elapsed"])
    if d.main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        if prob.split is not None:
            _atomic_json(prob.split, out / "split.json")
    local = list(range(d.rank, cfg.meta_batch, d.world))
    log_f = open(out / "log.jsonl", "a") if d.main else None
    bar = None
    if progress and d.main:
        try:
            from tqdm import tqdm

            bar = tqdm(total=cfg.meta_steps, initial=start, desc=cfg.algo, dynamic_ncols=True)
        except ImportError:
            bar = None
    now = time.process_time if cfg.clock == "cpu" else time.perf_counter
    t0 = now() - elapsed0
    wall0 = time.perf_counter()
    eval_seconds = 0.0  # excluded from the training clock

    def clock() -> float:
        return now() - t0 - eval_seconds

    steps_done = start
    halt = _past_time_limit(cfg, elapsed0)
    run_loss = run_acc = float("nan")
    # SIGTERM (or SIGINT) ends meta-training after the current step; the run is then
    # checkpointed and evaluated as if it had reached meta_steps.
    stop = {"requested": False}

    def request_stop(signum: int, frame: Any) -> None:
        stop["requested"] = True

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: no handler, stop by time_limit only
            pass

    def save(step_: int) -> None:
        if not d.main:
            return
        _atomic_save(
            {
                "theta": {k: v.detach() for k, v in theta.items()},
                "log_lam": {k: v.detach() for k, v in log_lam.items()},
                "optimizer": opt.state_dict(),
                "step": step_,
                "history": json.dumps(history),
                "elapsed": clock(),
                "config": json.dumps(dataclasses.asdict(cfg)),
            },
            ckpt_path,
        )

    try:
        for step in range(start, cfg.meta_steps):
            if halt:
                break
            if local:
                batch = prob.train.meta_batch(step, local, device=device)
                g, lam_g, stats = meta_gradient(
                    algo,
                    prob.model,
                    prob.loss,
                    theta,
                    batch,
                    lam=_lam_value(cfg, log_lam),
                    classification=prob.classification,
                    vectorize=cfg.vectorize,
                    batched=prob.batched,
                    diagnostics=step % cfg.log_every == 0 or step == cfg.meta_steps - 1,
                )
                n_local = len(local)
                # one device sync for the whole meta-gradient
                if not bool(torch.stack([torch.isfinite(t).all() for t in g.values()]).all()):
                    raise NonFiniteError(
                        f"{cfg.algo}: meta-step {step}: the meta-gradient has NaN or infinity (query loss "
                        f"{stats.query_loss.tolist()}); the inner solver probably diverged: lower "
                        f"--inner-lr (now {cfg.inner_lr}) or raise --lam"
                    )
            else:  # more ranks than tasks: this rank contributes zeros
                g = {k: torch.zeros_like(v) for k, v in theta.items()}
                lam_g, stats, n_local = None, None, 0
            grads = [g[k].detach() * n_local for k in theta]
            if log_lam:
                # chain rule through lam = exp(log_lam)
                lam_now = _lam_value(cfg, log_lam)
                for k in log_lam:
                    lv = lam_now if cfg.learn_lam == "scalar" else lam_now[k]
                    gk = lam_g[k] if (lam_g is not None and k in lam_g) else torch.zeros((), device=device)
                    grads.append((gk * lv).detach().reshape(()) * n_local)
            scal = torch.zeros(5, device=device, dtype=torch.float64)
            # Rank 0's clock (summed with zeros) and any rank's SIGTERM: every rank then takes the
            # same scheduled step and stops after the same step.  Ranks' own clocks differ (rank 0
            # leaves out the evaluations the others wait for), and a rank leaving the loop alone
            # would break the others' next all-reduce.
            scal[3] = clock() if d.main else 0.0
            scal[4] = 1.0 if stop["requested"] else 0.0
            if stats is not None:
                scal[0] = stats.query_loss.double().sum()
                scal[1] = stats.query_acc.double().nan_to_num(0.0).sum()
                scal[2] = stats.negative_curvature.double().sum()
            _allreduce_([*grads, scal], d)
            for leaf, gr in zip(leaves, grads):
                leaf.grad = (gr / cfg.meta_batch).to(leaf.dtype)
            lr_now = _scheduled_lr(cfg, step, float(scal[3]))
            halt = bool(scal[4] > 0) or _past_time_limit(cfg, float(scal[3]))
            for group in opt.param_groups:
                group["lr"] = lr_now
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_mean = float(scal[0]) / cfg.meta_batch
            acc_mean = float(scal[1]) / cfg.meta_batch * 100
            run_loss = loss_mean if math.isnan(run_loss) else 0.95 * run_loss + 0.05 * loss_mean
            run_acc = acc_mean if math.isnan(run_acc) else 0.95 * run_acc + 0.05 * acc_mean
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.1f}" if prob.classification else "-")
            if d.main and stats is not None and not math.isnan(float(stats.inner_grad_norm[0])):
                rec: dict[str, Any] = {
                    "step": step,
                    "time": clock(),
                    "wall_time": time.perf_counter() - wall0,
                    "meta_lr": lr_now,
                    "query_loss": loss_mean,
                    "query_acc": acc_mean if prob.classification else None,
                    "support_loss": float(stats.support_loss.mean()),
                    "inner_grad_norm": float(stats.inner_grad_norm.mean()),
                    "cg_residual": float(stats.cg_residual.nanmean()) if stats.cg_residual.numel() else None,
                    "negative_curvature": int(scal[2]),
                }
                if log_lam:
                    rec["lam"] = {k: float(v.detach().exp()) for k, v in log_lam.items()}
                history["steps"].append(rec)
                assert log_f is not None
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
            steps_done = step + 1
            if cfg.eval_every and steps_done % cfg.eval_every == 0 and d.main:
                t_ev = now()
                ev = _evaluate_problem(cfg, prob, theta, cfg.eval_tasks, device, _lam_value(cfg, log_lam))
                eval_seconds += now() - t_ev
                ev.update(step=steps_done, time=clock())
                history["eval"].append(ev)
                if log_f is not None:
                    log_f.write(json.dumps({"eval": ev}) + "\n")
                    log_f.flush()
            if cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0:
                save(steps_done)
        save(steps_done)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.close()
        if log_f is not None:
            log_f.close()
    train_time = clock()
    metrics: dict[str, Any] = {}
    if d.main:
        final = _evaluate_problem(cfg, prob, theta, cfg.test_tasks, device, _lam_value(cfg, log_lam))
        metrics = {
            "test_accuracy": final["accuracy"],
            "test_ci95": final["ci95"],
            "test_loss": final["loss"],
            "test_loss_ci95": final["loss_ci95"],
            "test_tasks": final["n_tasks"],
            "meta_steps_done": steps_done,
            "stopped_early": steps_done < cfg.meta_steps,
            "train_seconds": train_time,
            "train_clock": cfg.clock,
            "wall_seconds": time.perf_counter() - wall0,
            "config": dataclasses.asdict(cfg),
            "environment": _environment(device, d),
            "curves": history,
        }
        if log_lam:
            metrics["lam"] = {k: float(v.detach().exp()) for k, v in log_lam.items()}
        _atomic_json(metrics, out / "metrics.json")
    if d.world > 1:
        import torch.distributed as dist

        # the other ranks wait here while rank 0 evaluates: a rank that exits while its peers
        # still hold gloo connections can abort in the teardown ("terminate called without an
        # active exception")
        dist.barrier()
        if d.owned:
            dist.destroy_process_group()
    return metrics
