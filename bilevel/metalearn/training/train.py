"""The meta-training loop: Algorithm 1 of iMAML with any of the five meta-gradients.

One `TrainConfig` describes a run; `train` builds its problem (`build_experiment`), meta-trains
with Adam, evaluates on the fixed test tasks (`Experiment.evaluate`) and writes, under ``config.out``:

* ``metrics.json``: ``test_accuracy`` and ``test_ci95`` (percent, over the fixed test
  tasks), the test loss, the configuration, the environment and the curves;
* ``split.json``: ``train_classes``, ``val_classes``, ``test_classes`` (image datasets);
* ``checkpoint.pt``: theta, a learned lambda, the Adam state and the step, written
  atomically (a temporary file renamed over the old one) and read back with
  ``torch.load(..., weights_only=True)`` (`bilevel.metalearn.training.checkpoint`); ``--resume`` continues
  from it, `load_run` turns it into a `Run` for `evaluate_tasks`;
* ``log.jsonl``: one JSON record per logged step (losses, accuracies, inner-solver
  and CG diagnostics, wall time).

Nothing is overwritten without a word: a resumed run must have the configuration of its
checkpoint (up to the fields of `bilevel.metalearn.training.config.RESUMABLE`, e.g. more meta-steps), a
new run refuses a folder that holds one (unless ``overwrite``), and an earlier ``metrics.json``
is kept as ``metrics.step<N>.json``.  A resumed run drops the log records after its checkpoint's
step (a killed run logged steps its checkpoint does not hold) and redoes those steps.

Progress goes to standard error (`bilevel.metalearn.training.console.Console`): a banner (configuration,
device, data, output folder, resumed step), a bar or plain lines for meta-training and the final
evaluation, and the periodic evaluations' results.

Distributed (``torchrun --nproc_per_node=N``): rank r computes tasks
``range(r, B, N)`` of every meta-batch of B tasks, the per-task gradient sums are
all-reduced (`bilevel.metalearn.training.distributed`), and every rank takes the same Adam step from the
same state, so the parameters stay identical.  Task i of step t is drawn from
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import CheckpointError, NonFiniteError, deferred_checks
from ...tree import all_finite
from ..algorithms import meta_gradient
from ..data.prefetch import Prefetcher
from ..models import Params
from .checkpoint import atomic_json, atomic_save, keep_earlier, load_checkpoint, saved_config, shape_mismatch
from .config import IMAML_ALGOS, ConfigError, TrainConfig
from .console import Console, ProgressMode
from .distributed import Dist, allreduce_, broadcast_, finish, init_distributed, rank_device
from .experiment import Experiment, build_experiment, learned_lam

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


def _device(cfg: TrainConfig) -> torch.device:
    """The training device of ``cfg``, checked against this machine."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device",
                cfg.device,
                "CUDA is not available here (torch.cuda.is_available() is False): use cpu",
            )
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ConfigError("device", cfg.device, f"this machine has {n} GPU(s): cuda:0 to cuda:{n - 1}")
    return device


def _open_run(cfg: TrainConfig, resume: bool, overwrite: bool, device: torch.device) -> dict[str, Any] | None:
    """Check ``cfg.out`` against the request: the checkpoint to resume from, or ``None`` for a new run.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, a damaged one or one of another
            configuration; or a new run over an existing one without ``overwrite``.
    """
    path = Path(cfg.out) / "checkpoint.pt"
    if not resume:
        if path.is_file() and not overwrite:
            raise CheckpointError(
                f"{cfg.out} already holds a run ({path}): resume it (--resume, resume=True), start over "
                "there (--overwrite, overwrite=True; its metrics.json is kept), or choose another --out"
            )
        return None
    if not path.is_file():
        raise CheckpointError(
            f"nothing to resume: no checkpoint at {path}; drop --resume (resume=False) to start a new run, "
            "or pass the --out of the run to continue"
        )
    ck = load_checkpoint(path, device)
    conflicts = cfg.resume_conflicts(saved_config(ck, path))
    if conflicts:
        raise CheckpointError(
            f"cannot resume {path}: the run was started with another configuration ({'; '.join(conflicts)}); "
            "resume with the run's settings (see its config.json), or start a new run in another --out"
        )
    return ck


def _restore(ck: dict[str, Any], path: Path, theta: Params, log_lam: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's parameters into ``theta`` and ``log_lam``, checking that they fit."""
    for what, mine, saved in (("theta", theta, ck["theta"]), ("log_lam", log_lam, ck["log_lam"])):
        diff = shape_mismatch(mine, saved)
        if diff:
            raise CheckpointError(
                f"cannot resume {path}: its {what} does not fit the model of the configuration "
                f"(they differ at {diff[:3]})"
            )
    with torch.no_grad():
        for k, v in ck["theta"].items():
            theta[k].copy_(v)
        for k, v in ck["log_lam"].items():
            log_lam[k].copy_(v)


def _trim_log(path: Path, start: int) -> None:
    """Keep the log records of the steps a resumed run does not redo (``step < start``)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if not isinstance(rec, dict):
            continue
        ev = rec.get("eval")
        step = ev.get("step") if isinstance(ev, dict) else rec.get("step")
        # a step record is written after step `step` (steps_done = step + 1), an eval after steps_done
        if isinstance(step, int) and (step <= start if isinstance(ev, dict) else step < start):
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _describe(cfg: TrainConfig, exp: Experiment, device: torch.device, d: Dist) -> list[str]:
    """The banner: what this run is, where it runs, what it reads and writes."""
    if cfg.dataset == "sinusoid":
        task = f"sinusoid regression, {cfg.shots} support and {cfg.queries} query points"
    else:
        task = f"{cfg.dataset} {cfg.ways}-way {cfg.shots}-shot, {cfg.queries} queries per class"
    if cfg.algo == "imaml-hf":
        region = " (trust region)" if cfg.inner_solver == "trust-region" else " (line search)"
        inner = f"{cfg.newton_iters} Newton steps of {cfg.cg_iters} CG" + region
    else:
        inner = f"{cfg.inner_steps} GD steps of {cfg.inner_lr:g}" + (
            " (backtracking)" if cfg.backtrack else ""
        )
    if cfg.algo in IMAML_ALGOS:
        lam = "learned " + cfg.learn_lam + f" from {cfg.lam:g}" if cfg.learn_lam != "none" else f"{cfg.lam:g}"
        inner += f", lambda {lam}, {cfg.cg_iters} CG steps" + (
            f", damping {cfg.damping:g}" if cfg.damping else ""
        )
    limit = f", at most {cfg.time_limit:g} min" if cfg.time_limit is not None else ""
    lines = [
        f"bilevel.metalearn train: {cfg.algo} on {task}",
        f"  meta-training: {cfg.meta_steps} steps of {cfg.meta_batch} tasks{limit}, Adam {cfg.meta_lr:g} "
        f"({cfg.lr_schedule}); inner: {inner}",
        f"  device {device} ({cfg.dtype}, {torch.get_num_threads()} threads, {d.world} rank(s)); "
        f"seed {cfg.seed}",
    ]
    if exp.data is not None:
        root = cfg.data_root or os.environ.get("BILEVEL_DATA_ROOT", "")
        lines.append(
            f"  data {root}: {len(exp.data.train.classes)} training and {len(exp.data.test.classes)} test "
            f"classes (images {'x'.join(str(n) for n in exp.data.image_shape)})"
        )
    periodic = f"every {cfg.eval_every} steps on {cfg.eval_tasks} test tasks, " if cfg.eval_every else ""
    lines.append(
        f"  evaluation: {periodic}final on {cfg.test_tasks} test tasks; output {Path(cfg.out).resolve()}"
    )
    return lines


def _score(ev: dict[str, float], classification: bool) -> str:
    """An evaluation's result in words: accuracy for classification, MSE for regression."""
    if classification:
        return f"accuracy {ev['accuracy']:.2f} +- {ev['ci95']:.2f} % (loss {ev['loss']:.4f})"
    return f"query MSE {ev['loss']:.4f} +- {ev['loss_ci95']:.4f}"


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: ProgressMode = True, overwrite: bool = False
) -> dict[str, Any]:
    """Meta-train with Adam (Algorithm 1), then evaluate on the fixed test tasks.

    Args:
        cfg: the run.
        resume: continue the run in ``cfg.out`` from its ``checkpoint.pt``; ``cfg`` must equal the
            saved configuration except in the fields of `bilevel.metalearn.training.config.RESUMABLE` (e.g.
            more ``meta_steps``, another ``test_tasks``).
        progress: what to show on standard error (`bilevel.metalearn.training.console.ProgressMode`): ``True``
            a banner, then a bar on a terminal or plain lines elsewhere, and periodic results;
            ``"lines"`` plain lines; ``False`` nothing.
        overwrite: start a new run in ``cfg.out`` although it holds one (its checkpoint and log are
            replaced, its ``metrics.json`` is kept as ``metrics.step<N>.json``).

    Returns:
        The metrics dictionary also written to ``metrics.json`` (on rank 0).

    Raises:
        CheckpointError: ``resume`` without a checkpoint in ``cfg.out``, a damaged one, or one of
            another configuration (the differing fields are listed); a new run in a folder that
            holds one, without ``overwrite``.
        ConfigError: ``cfg.device`` is not on this machine.
        DatasetNotFoundError, DatasetFormatError: the data cannot be read (nothing is written then).
        NonFiniteError: a meta-gradient has NaN or infinity (the inner solver diverged).
    """
    console = Console(progress)
    device = _device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = cfg.torch_dtype
    d = init_distributed(device)
    device = rank_device(device, d)
    if not d.main:
        console = Console(False)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    # Every check that can refuse the run comes before the first file is written.
    ck = _open_run(cfg, resume, overwrite, device)
    exp = build_experiment(cfg, device=device, dtype=dtype)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in exp.theta.items()}
    log_lam = _lam_params(cfg, theta, device, dtype)
    leaves = list(theta.values()) + list(log_lam.values())
    broadcast_([t.data for t in leaves], d)
    opt = torch.optim.Adam(leaves, lr=cfg.meta_lr, eps=cfg.adam_eps)
    algo = exp.algorithm
    history: dict[str, list[dict[str, Any]]] = {"steps": [], "eval": []}
    start, elapsed0 = 0, 0.0
    if ck is not None:
        _restore(ck, ckpt_path, theta, log_lam)
        opt.load_state_dict(ck["optimizer"])
        start = int(ck["step"])
        history = json.loads(ck["history"])
        elapsed0 = float(ck["elapsed"])
    if d.main:
        for text in _describe(cfg, exp, device, d):
            console.line(text)
        if ck is not None:
            console.line(f"  resuming from step {start} ({elapsed0 / 60:.1f} min of training) of {ckpt_path}")
        if console.hint:
            console.line(console.hint)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        if exp.split is not None:
            atomic_json(exp.split.to_dict(), out / "split.json")
        if ck is not None:
            _trim_log(out / "log.jsonl", start)
    local = list(range(d.rank, cfg.meta_batch, d.world))
    # a new run starts its log afresh (an overwritten run's records would mix with its own)
    log_f = open(out / "log.jsonl", "a" if ck is not None else "w") if d.main else None
    bar = console.progress(cfg.meta_steps, cfg.algo, unit="step", initial=start, every=cfg.log_every)
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

    # the next meta-batch is drawn while this one runs (same tasks as drawing it on the spot)
    prefetch = Prefetcher(lambda s: exp.train_sampler.meta_batch(s, local), device, cfg.meta_steps - 1)
    try:
        for step in range(start, cfg.meta_steps):
            if halt:
                break
            logged = step % cfg.log_every == 0 or step == cfg.meta_steps - 1
            if local:
                batch = prefetch.get(step)
                # the meta-step's checks read the device once it is queued, not while it is
                with deferred_checks():
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
                        diagnostics=logged,
                        lanczos_steps=cfg.lanczos_steps if logged else 0,
                    )
                n_local = len(local)
                # one device sync for the whole meta-gradient
                if not bool(all_finite(list(g.values())).all()):
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
            grad_norm = None
            if cfg.clip_grad_norm is not None:
                # rescales on the device (no host read); the norm is read below on logged steps only
                grad_norm = torch.nn.utils.clip_grad_norm_(leaves, cfg.clip_grad_norm)
            elif logged:
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(leaf.grad) for leaf in leaves])
                )
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
            if exp.classification:
                bar.update(1, loss=f"{run_loss:.3f}", acc=f"{run_acc:.1f}%")
            else:
                bar.update(1, mse=f"{run_loss:.4f}")
            if d.main and stats is not None and logged:
                rec: dict[str, Any] = {
                    "step": step,
                    "time": clock(),
                    "wall_time": time.perf_counter() - wall0,
                    "meta_lr": lr_now,
                    "query_loss": loss_mean,
                    "query_acc": acc_mean if exp.classification else None,
                    "support_loss": float(stats.support_loss.mean()),
                    "inner_grad_norm": float(stats.inner_grad_norm.mean()),
                    "distance": float(stats.distance.mean()) if stats.distance is not None else None,
                    "cg_residual": float(stats.cg_residual.nanmean()) if stats.cg_residual.numel() else None,
                    "negative_curvature": int(scal[2]),
                    "meta_grad_norm": float(grad_norm) if grad_norm is not None else None,
                }
                if cfg.lanczos_steps and stats.min_eig is not None:
                    rec["min_eig"] = float(stats.min_eig.min())
                    rec["min_eig_mean"] = float(stats.min_eig.mean())
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
                console.line(
                    f"step {steps_done}: {_score(ev, exp.classification)} on {cfg.eval_tasks} test tasks "
                    f"[{now() - t_ev:.0f} s]"
                )
                history["eval"].append(ev)
                if log_f is not None:
                    log_f.write(json.dumps({"eval": ev}) + "\n")
                    log_f.flush()
            if cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0:
                save(steps_done)
        save(steps_done)
    finally:
        prefetch.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
        if log_f is not None:
            log_f.close()
    train_time = clock()
    if steps_done < cfg.meta_steps:
        if stop["requested"]:
            why = "stop requested (SIGTERM or Ctrl-C)"
        elif cfg.time_limit is not None:
            why = f"time limit of {cfg.time_limit:g} min reached"
        else:
            why = "another rank was asked to stop"
        console.line(f"stopped after {steps_done} of {cfg.meta_steps} meta-steps: {why}")
    elif start >= cfg.meta_steps and ck is not None:
        console.line(f"the checkpoint is at step {start} >= meta_steps={cfg.meta_steps}: nothing to train")
    metrics: dict[str, Any] = {}
    if d.main:
        with console.progress(
            cfg.test_tasks, "final evaluation", unit="task", every=cfg.eval_batch
        ) as ev_bar:
            final = exp.evaluate(theta, cfg.test_tasks, learned_lam(cfg, log_lam), progress=ev_bar.update)
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
        kept = keep_earlier(out / "metrics.json")
        if kept is not None:
            metrics["earlier_metrics"] = kept.name
            console.line(f"kept the earlier metrics.json as {kept}")
        atomic_json(metrics, out / "metrics.json")
    finish(d)  # the other ranks wait here while rank 0 evaluates
    return metrics
