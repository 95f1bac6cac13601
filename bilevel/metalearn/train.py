"""The meta-training loop: Algorithm 1 of iMAML with any of the five meta-gradients.

One `TrainConfig` describes a run; `train` builds its problem (`build_experiment`), meta-trains
with Adam, evaluates on the fixed test tasks (`Experiment.evaluate`) and writes, under ``config.out``:

* ``metrics.json``: ``test_accuracy`` and ``test_ci95`` (percent, over the fixed test
  tasks), the test loss, the configuration, the environment and the curves;
* ``split.json``: ``train_classes``, ``val_classes``, ``test_classes`` (image datasets);
* ``checkpoint.pt``: theta, a learned lambda, the Adam state and the step, written
  atomically (a temporary file renamed over the old one) and read back with
  ``torch.load(..., weights_only=True)`` (`bilevel.metalearn.checkpoint`); ``--resume`` continues
  from it, `load_run` turns it into a `Run` for `evaluate_tasks`;
* ``log.jsonl``: one JSON record per logged step (losses, accuracies, inner-solver
  and CG diagnostics, wall time).

Distributed (``torchrun --nproc_per_node=N``): rank r computes tasks
``range(r, B, N)`` of every meta-batch of B tasks, the per-task gradient sums are
all-reduced (`bilevel.metalearn.distributed`), and every rank takes the same Adam step from the
same state, so the parameters stay identical.  Task i of step t is drawn from
``SeedSequence([seed, 0, t, i])`` whatever rank draws it, so N ranks see exactly the
tasks of one process.  Only rank 0 writes files.  The backend is ``nccl`` on CUDA and
``gloo`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import NonFiniteError
from .algorithms import meta_gradient
from .checkpoint import atomic_json, atomic_save, load_checkpoint
from .config import TrainConfig
from .distributed import Dist, allreduce_, broadcast_, finish, init_distributed, rank_device
from .experiment import build_experiment, learned_lam
from .models import Params

__all__ = ["train"]


def _lam_params(
    cfg: TrainConfig, theta: Params, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Learned log-lambda leaves (empty when lambda is fixed)."""
    if cfg.learn_lam == "none":
        return {}
    init = math.log(cfg.lam)
    names = ["lam"] if cfg.learn_lam == "scalar" else list(theta)
    return {n: torch.tensor(init, device=device, dtype=dtype, requires_grad=True) for n in names}


def _environment(device: torch.device, d: Dist) -> dict[str, Any]:
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


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Meta-train with Adam (Algorithm 1), then evaluate on the fixed test tasks.

    Returns:
        The metrics dictionary also written to ``metrics.json`` (on rank 0).
    """
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = cfg.torch_dtype
    d = init_distributed(device)
    device = rank_device(device, d)
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    exp = build_experiment(cfg, device=device, dtype=dtype)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in exp.theta.items()}
    log_lam = _lam_params(cfg, theta, device, dtype)
    leaves = list(theta.values()) + list(log_lam.values())
    broadcast_([t.data for t in leaves], d)
    opt = torch.optim.Adam(leaves, lr=cfg.meta_lr)
    algo = exp.algorithm
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
        if exp.split is not None:
            atomic_json(exp.split.to_dict(), out / "split.json")
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
    halt = cfg.past_time_limit(elapsed0)
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
        atomic_save(
            {
                "theta": {k: v.detach() for k, v in theta.items()},
                "log_lam": {k: v.detach() for k, v in log_lam.items()},
                "optimizer": opt.state_dict(),
                "step": step_,
                "history": json.dumps(history),
                "elapsed": clock(),
                "config": json.dumps(dataclasses.asdict(cfg)),
                "image_shape": None if exp.data is None else list(exp.data.image_shape),
            },
            ckpt_path,
        )

    try:
        for step in range(start, cfg.meta_steps):
            if halt:
                break
            if local:
                batch = exp.train_sampler.meta_batch(step, local, device=device)
                g, lam_g, stats = meta_gradient(
                    algo,
                    exp.model_fn,
                    exp.loss,
                    theta,
                    batch,
                    lam=learned_lam(cfg, log_lam),
                    classification=exp.classification,
                    vectorize=cfg.vectorize,
                    batched=exp.batched,
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
                for k in log_lam:
                    lv = log_lam[k].exp()
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
            allreduce_([*grads, scal], d)
            for leaf, gr in zip(leaves, grads):
                leaf.grad = (gr / cfg.meta_batch).to(leaf.dtype)
            lr_now = cfg.scheduled_lr(step, float(scal[3]))
            halt = bool(scal[4] > 0) or cfg.past_time_limit(float(scal[3]))
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
                bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.1f}" if exp.classification else "-")
            if d.main and stats is not None and not math.isnan(float(stats.inner_grad_norm[0])):
                rec: dict[str, Any] = {
                    "step": step,
                    "time": clock(),
                    "wall_time": time.perf_counter() - wall0,
                    "meta_lr": lr_now,
                    "query_loss": loss_mean,
                    "query_acc": acc_mean if exp.classification else None,
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
                ev = exp.evaluate(theta, cfg.eval_tasks, learned_lam(cfg, log_lam))
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
        final = exp.evaluate(theta, cfg.test_tasks, learned_lam(cfg, log_lam))
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
        atomic_json(metrics, out / "metrics.json")
    finish(d)  # the other ranks wait here while rank 0 evaluates
    return metrics
