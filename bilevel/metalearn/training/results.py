"""A run's result: why meta-training ended, the final evaluation and ``metrics.json``."""

from __future__ import annotations

import dataclasses
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metabatch import step_size_summary
from .checkpoint import atomic_json, keep_earlier
from .config import TrainConfig
from .console import Console
from .experiment import Experiment
from .recorder import Recorder
from .step import TrainState

__all__ = ["environment", "final_metrics", "stop_reason"]


def environment(device: torch.device, world: int) -> dict[str, Any]:
    """Where the run ran: versions (``bilevel``'s too), platform, device, threads, ranks and command line."""
    import bilevel  # the package's version; bilevel imports this package, so not at the top

    env: dict[str, Any] = {
        "bilevel": bilevel.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "world_size": world,
        "argv": sys.argv,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def stop_reason(cfg: TrainConfig, start: int, done: int, stop_requested: bool, resumed: bool) -> str | None:
    """A line on why meta-training ended before ``meta_steps`` (or never began); ``None`` if it did not.

    Args:
        cfg: the run.
        start: the step training started from.
        done: meta-steps done.
        stop_requested: this rank received SIGTERM or SIGINT.
        resumed: the run continued a checkpoint.
    """
    if done < cfg.meta_steps:
        if stop_requested:
            why = "stop requested (SIGTERM or Ctrl-C)"
        elif cfg.time_limit is not None:
            why = f"time limit of {cfg.time_limit:g} min reached"
        else:
            why = "another rank was asked to stop"
        return f"stopped after {done} of {cfg.meta_steps} meta-steps: {why}"
    if start >= cfg.meta_steps and resumed:
        return f"the checkpoint is at step {start} >= meta_steps={cfg.meta_steps}: nothing to train"
    return None


def final_metrics(
    cfg: TrainConfig,
    exp: Experiment,
    state: TrainState,
    console: Console,
    recorder: Recorder,
    train_seconds: float,
    env: dict[str, Any],
) -> dict[str, Any]:
    """Evaluate on the fixed test tasks and write ``metrics.json`` (an earlier one is kept aside).

    Args:
        cfg: the run.
        exp: its problem.
        state: the trained state.
        console: where the evaluation's progress goes.
        recorder: the run's record (its curves and wall clock).
        train_seconds: seconds of the training clock.
        env: `environment` of the run.

    Returns:
        The metrics written.
    """
    with console.progress(cfg.test_tasks, "final evaluation", unit="task", every=cfg.eval_batch) as bar:
        final = exp.evaluate(state.theta, cfg.test_tasks, state.lam, progress=bar.update)
    metrics: dict[str, Any] = {
        "test_accuracy": final["accuracy"],
        "test_ci95": final["ci95"],
        "test_loss": final["loss"],
        "test_loss_ci95": final["loss_ci95"],
        "test_tasks": final["n_tasks"],
        "meta_steps_done": state.step,
        "stopped_early": state.step < cfg.meta_steps,
        "train_seconds": train_seconds,
        "train_clock": cfg.clock,
        "wall_seconds": recorder.clock.wall(),
        "config": dataclasses.asdict(cfg),
        "environment": env,
        "curves": recorder.history,
    }
    lam = state.lam.values()
    if lam is not None:
        metrics["lam"] = lam
    steps = step_size_summary(state.theta)
    if steps is not None:  # Meta-SGD's learned step sizes, mean per parameter
        metrics["inner_lr"] = steps
        console.line("learned inner step sizes (mean per parameter): " + _steps_line(steps))
    path = Path(cfg.out) / "metrics.json"
    kept = keep_earlier(path)
    if kept is not None:
        metrics["earlier_metrics"] = kept.name
        console.line(f"kept the earlier metrics.json as {kept}")
    atomic_json(metrics, path)
    return metrics


def _steps_line(steps: dict[str, float]) -> str:
    """Learned step sizes as ``name mean, ...`` for the console."""
    return ", ".join(f"{k} {v:.4g}" for k, v in steps.items())
