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
  and CG diagnostics, wall time);
* ``run.lock``: held while the run trains, so a second run into the folder is refused (`runlock`).

Nothing is overwritten without a word: a resumed run must have the configuration of its
checkpoint (up to the fields of `bilevel.metalearn.training.config.RESUMABLE`, e.g. more meta-steps), a
new run refuses a folder that holds one (unless ``overwrite``), and an earlier ``metrics.json``
is kept as ``metrics.step<N>.json``.  A resumed run drops the log records after its checkpoint's
step (a killed run logged steps its checkpoint does not hold) and redoes those steps.

Progress goes to standard error (`bilevel.metalearn.training.console.Console`): a banner (configuration,
device, data, output folder, resumed step), a bar or plain lines for meta-training and the final
evaluation, and the periodic evaluations' results.  A diagnostic that crosses its threshold (CG's
relative residual, the inner residual, the fraction of tasks whose CG met negative curvature:
`bilevel.metalearn.training.recorder.ALARMS`) is warned about once, as a `bilevel.BilevelWarning`.

Distributed (``torchrun --nproc_per_node=N``): rank r computes tasks
``range(r, B, N)`` of every meta-batch of B tasks, the per-task gradient sums are
all-reduced (`bilevel.metalearn.training.distributed`), and every rank takes the same Adam step from the
same state, so the parameters stay identical.  Task i of step t is drawn from
``SeedSequence([seed, 0, t, i])`` whatever rank draws it, so N ranks see exactly the
tasks of one process.  Only rank 0 writes files.  The backend is ``nccl`` on CUDA and
``gloo`` otherwise.

`train` only wires the pieces: `open_run` (`checkpoint`) checks the folder, `TrainState` and
`MetaStep` (`step`) take the meta-steps, `Recorder` (`recorder`) shows, logs, evaluates and
checkpoints them, `StopSignal` (`signals`) turns SIGTERM into a stop after the current step, and
`final_metrics` (`results`) evaluates the result and writes ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from ..data.prefetch import Prefetcher
from .checkpoint import open_run
from .config import TrainConfig
from .console import Console, ProgressMode
from .distributed import Dist, finish, init_distributed, rank_device, training_device
from .experiment import build_experiment
from .provenance import saved_provenance
from .recorder import Recorder
from .results import environment, final_metrics, stop_reason
from .runlock import RunLock
from .signals import StopSignal
from .step import MetaStep, TrainState

__all__ = ["train"]


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
            holds one, without ``overwrite``; a checkpoint that cannot be written
            (`CheckpointWriteError`).
        RunLockedError: another run is training in ``cfg.out`` (`RunLock`).
        SplitMismatchError: resuming, the data lacks classes of the run's saved split.
        ConfigError: ``cfg.device`` is not on this machine.
        DatasetNotFoundError, DatasetFormatError: the data cannot be read (nothing is written then).
        NonFiniteError: a task of a meta-batch holds NaN or infinity (the message names it), or
            a meta-gradient has NaN or infinity (the inner solver diverged; the message names the
            flags of ``cfg.algo`` to change).

    Warns:
        BilevelWarning: once per kind, where a diagnostic crosses its threshold
            (`bilevel.metalearn.training.recorder.ALARMS`).
    """
    console = Console(progress)
    device = training_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = init_distributed(device)
    device = rank_device(device, d)
    if not d.main:
        console = Console(False)
    # one run per folder, from its first check to its last file (rank 0 writes for all ranks)
    with RunLock(cfg.out) if d.main else contextlib.nullcontext():
        return _train(cfg, resume, overwrite, console, device, d)


def _train(
    cfg: TrainConfig, resume: bool, overwrite: bool, console: Console, device: torch.device, d: Dist
) -> dict[str, Any]:
    """`train` in a folder it holds."""
    # Every check that can refuse the run comes before the first file is written.
    ck = open_run(cfg, resume, overwrite, device)
    # a resumed run keeps the class split it was trained on, whatever the data holds now
    saved = None if ck is None else saved_provenance(ck, Path(cfg.out) / "checkpoint.pt")
    exp = build_experiment(cfg, device=device, dtype=cfg.torch_dtype, provenance=saved)
    for note in exp.notes:
        console.line(note)
    if d.main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    state = TrainState.start(cfg, exp, d)
    if ck is not None:
        state.load_state_dict(ck, Path(cfg.out) / "checkpoint.pt")
    start = state.step
    tasks = list(range(d.rank, cfg.meta_batch, d.world))
    with (
        Recorder(cfg, exp, console, d, device, state, ck) as recorder,
        StopSignal() as stop,
        # the next meta-batch is drawn while this one runs (same tasks as drawing it on the spot)
        Prefetcher(lambda s: exp.train_sampler.meta_batch(s, tasks), device, cfg.meta_steps - 1) as prefetch,
    ):
        meta_step = MetaStep(cfg, exp, d, len(tasks), recorder.clock, stop)
        halt = cfg.past_time_limit(recorder.clock.start)
        marks = _TimeMarks(cfg.eval_every_minutes, recorder.clock.start)
        while state.step < cfg.meta_steps and not halt:
            record = meta_step(state, prefetch.get(state.step) if tasks else None)
            halt = record.halt
            recorder.step(record, state)
            # rank 0's clock, summed with the step (record.sums.clock): every rank decides alike
            due = marks.passed(record.sums.clock)
            if ((cfg.eval_every and state.step % cfg.eval_every == 0) or due) and d.main:
                recorder.evaluate(state)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                recorder.save(state)
        recorder.save(state)
    train_seconds = recorder.clock()
    said = stop_reason(cfg, start, state.step, stop.requested, resumed=ck is not None)
    if said is not None:
        console.line(said)
    metrics: dict[str, Any] = {}
    if d.main:
        metrics = final_metrics(
            cfg, exp, state, console, recorder, train_seconds, environment(device, d.world)
        )
    finish(d)  # the other ranks wait here while rank 0 evaluates
    return metrics


class _TimeMarks:
    """The multiples of ``minutes`` (None: none) on the training clock, from ``start`` seconds on:
    `passed` says whether the clock has passed the next one since the last call (several passed
    at once count as one)."""

    def __init__(self, minutes: float | None, start: float) -> None:
        self.step = None if minutes is None else 60.0 * minutes
        self.next = math.inf if self.step is None else (math.floor(start / self.step) + 1) * self.step

    def passed(self, seconds: float) -> bool:
        if seconds < self.next:
            return False
        assert self.step is not None
        self.next = (math.floor(seconds / self.step) + 1) * self.step
        return True
