"""What a run records as it trains: the training clock, ``log.jsonl``, the curves, the checkpoint
and what the console shows (`bilevel.metalearn.training.runlog` reads a run folder back).

`Recorder` opens a run's record (the banner, ``config.json``, ``split.json``, a resumed run's log cut
back to its checkpoint) and then takes each `StepRecord`: a progress bar with running averages, a
log record on logged steps, periodic evaluations, checkpoints.  Only rank 0 writes; the other
ranks' `Recorder` keeps the clock and counts silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import IO, Any

import torch

from ... import BilevelWarning
from ..algorithms import Implicit, MetaStats
from ..metabatch import step_size_summary
from .checkpoint import atomic_json, save_checkpoint, strict_json
from .config import IMAML_ALGOS, TrainConfig
from .console import Console
from .distributed import Dist
from .experiment import Experiment
from .step import StepRecord, TrainState, advice

__all__ = ["ALARMS", "Alarm", "Recorder", "TrainClock", "alarm_values", "banner", "score", "trim_log"]

#: The curves: a log record per logged step (``steps``) and the periodic evaluations (``eval``).
History = dict[str, list[dict[str, Any]]]


class TrainClock:
    """Seconds of meta-training: the process's CPU time or wall time, evaluations left out.

    Args:
        kind: ``cpu`` (`time.process_time`) or ``wall`` (`time.perf_counter`).
        elapsed: seconds trained before (a resumed run's), kept as `start`.
    """

    def __init__(self, kind: str, elapsed: float) -> None:
        self.now = time.process_time if kind == "cpu" else time.perf_counter
        self.start = elapsed
        self._t0 = self.now() - elapsed
        self._wall0 = time.perf_counter()
        self._left_out = 0.0

    def __call__(self) -> float:
        """Seconds of training so far, the earlier ones of a resumed run included."""
        return self.now() - self._t0 - self._left_out

    def wall(self) -> float:
        """Wall seconds since this clock started (this process's, evaluations included)."""
        return time.perf_counter() - self._wall0

    def leave_out(self, seconds: float) -> None:
        """Stop counting ``seconds`` spent on something other than training (an evaluation)."""
        self._left_out += seconds


@dataclasses.dataclass(frozen=True)
class Alarm:
    """A diagnostic a run warns about (once) when it crosses a threshold, and what to change then.

    Attributes:
        kind: the diagnostic's name (``cg_residual``, ``inner_residual``, ``failed_tasks``).
        threshold: the value above which the run warns.
        meaning: what a value above the threshold means, for the message.
        moves: ``(verb, field)`` remedies, in order of preference (`advice`: only the flags
            of the run's algorithm are named).
    """

    kind: str
    threshold: float
    meaning: str
    moves: tuple[tuple[str, str], ...]

    def message(self, cfg: TrainConfig, step: int, value: float) -> str:
        """The warning for ``value`` at meta-step ``step``."""
        todo = advice(cfg, self.moves)
        return (
            f"{cfg.algo}: meta-step {step}: {self.kind} {value:.3g} is above {self.threshold:g}: "
            f"{self.meaning}" + (f"; {todo}" if todo else "")
        )


#: The thresholds a training run warns at (`Recorder.step`; documented in
#: docs/tutorials/diagnostics.md).  Each warns once per run, as a `BilevelWarning`:
#:
#: * ``cg_residual`` > 0.25: the task mean of CG's relative residual ||A g_i - v_i|| / ||v_i||
#:   (`MetaStats.cg_relative_residual`) over the tasks where CG met no negative curvature, on a
#:   logged step.  Above a quarter the implicit meta-gradient is a rough direction: CG stopped
#:   far from the solution of its system.  Not with ``cg_iters=0`` (first-order on purpose).
#: * ``inner_residual`` > 1: iMAML's inner answers, mean ||grad G_i(phi_i)|| / (lam mean
#:   ||phi_i - theta||), on a logged step.  Where G_i is lam-strongly convex, ||grad G_i|| / lam
#:   bounds the distance from phi_i to the exact minimizer, which the implicit gradient
#:   assumes; above 1 that bound exceeds the distance the inner loop moved.
#: * ``failed_tasks`` > 0.5: the fraction of a meta-batch's tasks whose CG met negative
#:   curvature (I + Lhat''/lam not positive definite there; CG then keeps its last iterate), on
#:   any step.
ALARMS: dict[str, Alarm] = {
    a.kind: a
    for a in (
        Alarm(
            "cg_residual",
            0.25,
            "CG's relative residual: the implicit meta-gradient is solved only roughly",
            (("raise", "cg_iters"), ("raise", "lam"), ("raise", "damping"), ("lower", "meta_lr")),
        ),
        Alarm(
            "inner_residual",
            1.0,
            "||grad G|| / (lam ||phi - theta||) at the inner answers: they are far from the minimizers "
            "the implicit gradient assumes",
            (("raise", "inner_steps"), ("raise", "newton_iters"), ("raise", "lam"), ("lower", "meta_lr")),
        ),
        Alarm(
            "failed_tasks",
            0.5,
            "the fraction of tasks whose CG met negative curvature (their meta-gradients are truncated)",
            (("raise", "lam"), ("raise", "damping"), ("use", "backtrack"), ("lower", "meta_lr")),
        ),
    )
}


def _mean(x: torch.Tensor) -> float:
    return float(x.nanmean()) if x.numel() else math.nan


def alarm_values(cfg: TrainConfig, exp: Experiment, state: TrainState, rec: StepRecord) -> dict[str, float]:
    """The `ALARMS` diagnostics of a step that it measured (logged steps: all; others: the fraction
    of failed tasks), NaN where they do not apply."""
    values = {"failed_tasks": rec.sums.negative_curvature / cfg.meta_batch}
    stats: MetaStats | None = rec.stats
    if stats is None or not rec.logged:
        return values
    if stats.cg_relative_residual is not None and cfg.cg_iters > 0:
        values["cg_residual"] = _mean(stats.cg_relative_residual[~stats.negative_curvature])
    if isinstance(exp.algorithm.meta_gradient, Implicit) and stats.distance is not None:
        learned = state.lam.values()
        lam = min(learned.values()) if learned else state.lam.resolve(exp.algorithm.lam).strong_convexity()
        distance = _mean(stats.distance)
        if lam and distance > 0:
            values["inner_residual"] = _mean(stats.inner_grad_norm) / (lam * distance)
    return values


def banner(cfg: TrainConfig, exp: Experiment, device: torch.device, world: int) -> list[str]:
    """What this run is, where it runs, what it reads and writes."""
    if cfg.dataset == "sinusoid":
        task = f"sinusoid regression, {cfg.shots} support and {cfg.queries} query points"
    else:
        queries = "1 query" if cfg.queries == 1 else f"{cfg.queries} queries"
        task = f"{cfg.dataset} {cfg.ways}-way {cfg.shots}-shot, {queries} per class"
    if cfg.algo == "imaml-hf":
        region = " (trust region)" if cfg.inner_solver == "trust-region" else " (line search)"
        inner = f"{cfg.newton_iters} Newton steps of {cfg.cg_iters} CG" + region
    else:
        inner = f"{cfg.inner_steps} GD steps of {cfg.inner_lr:g}" + (
            " (backtracking)" if cfg.backtrack else ""
        )
    if cfg.algo == "anil":
        inner += " on the head alone (the body's features once per task)"
    if cfg.algo == "meta-sgd":
        inner = f"{cfg.inner_steps} GD steps of learned per-parameter step sizes from {cfg.inner_lr:g}"
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
        f"  device {device} ({cfg.dtype}, {torch.get_num_threads()} threads, {world} rank(s)); "
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


def score(ev: dict[str, float], classification: bool) -> str:
    """An evaluation's result in words: accuracy for classification, MSE for regression."""
    if classification:
        return f"accuracy {ev['accuracy']:.2f} +- {ev['ci95']:.2f} % (loss {ev['loss']:.4f})"
    return f"query MSE {ev['loss']:.4f} +- {ev['loss_ci95']:.4f}"


def trim_log(path: Path, start: int) -> None:
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


class Recorder:
    """A run's record while it trains; use as a context manager (the bar and the log close on exit).

    On rank 0 the constructor shows the banner (and the step a resumed run continues from), writes
    ``config.json`` and ``split.json``, and starts ``log.jsonl`` afresh (a new run: an overwritten
    run's records would mix with its own) or after the checkpoint's step (a resumed run).

    Args:
        cfg: the run.
        exp: its problem.
        console: where progress goes.
        d: this process's place among the ranks (only rank 0 writes).
        device: the training device (for the banner).
        state: the state training starts from (a resumed run's step).
        checkpoint: the checkpoint a resumed run continues (its curves and clock); ``None``: a new run.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        exp: Experiment,
        console: Console,
        d: Dist,
        device: torch.device,
        state: TrainState,
        checkpoint: dict[str, Any] | None,
    ) -> None:
        self.cfg, self.exp, self.console, self.main = cfg, exp, console, d.main
        self.out = Path(cfg.out)
        self.history: History = {"steps": [], "eval": []}
        elapsed = 0.0
        if checkpoint is not None:
            self.history = json.loads(checkpoint["history"])
            elapsed = float(checkpoint["elapsed"])
        self._file: IO[str] | None = None
        if d.main:
            self._open(device, d.world, state.step, elapsed, checkpoint is not None)
            self._file = open(self.out / "log.jsonl", "a" if checkpoint is not None else "w")
        self.bar = console.progress(
            cfg.meta_steps, cfg.algo, unit="step", initial=state.step, every=cfg.log_every
        )
        self.clock = TrainClock(cfg.clock, elapsed)
        self._loss = self._acc = math.nan  # running averages for the bar
        self.warned: set[str] = set()  # the `ALARMS` this run has warned about

    def _open(self, device: torch.device, world: int, start: int, elapsed: float, resumed: bool) -> None:
        cfg, console = self.cfg, self.console
        for text in banner(cfg, self.exp, device, world):
            console.line(text)
        if resumed:
            console.line(
                f"  resuming from step {start} ({elapsed / 60:.1f} min of training) of "
                f"{self.out / 'checkpoint.pt'}"
            )
        if console.hint:
            console.line(console.hint)
        atomic_json(dataclasses.asdict(cfg), self.out / "config.json")
        if self.exp.split is not None and not resumed:  # a resumed run's saved split is never rewritten
            atomic_json(self.exp.split.to_dict(), self.out / "split.json")
        if resumed:
            trim_log(self.out / "log.jsonl", start)

    def step(self, rec: StepRecord, state: TrainState) -> None:
        """Show a meta-step on the bar; on rank 0, log it where it measured diagnostics."""
        loss = rec.sums.query_loss / self.cfg.meta_batch
        acc = rec.sums.query_acc / self.cfg.meta_batch * 100
        self._loss = loss if math.isnan(self._loss) else 0.95 * self._loss + 0.05 * loss
        self._acc = acc if math.isnan(self._acc) else 0.95 * self._acc + 0.05 * acc
        if self.exp.classification:
            self.bar.update(1, loss=f"{self._loss:.3f}", acc=f"{self._acc:.1f}%")
        else:
            self.bar.update(1, mse=f"{self._loss:.4f}")
        if self.main:
            self._alarms(rec, state)
        if self._file is None or rec.stats is None or not rec.logged:
            return
        stats = rec.stats
        entry: dict[str, Any] = {
            "step": rec.step,
            "time": self.clock(),
            "wall_time": self.clock.wall(),
            "meta_lr": rec.lr,
            "query_loss": loss,
            "query_acc": acc if self.exp.classification else None,
            "support_loss": float(stats.support_loss.mean()),
            "inner_grad_norm": float(stats.inner_grad_norm.mean()),
            "distance": float(stats.distance.mean()) if stats.distance is not None else None,
            "cg_residual": float(stats.cg_residual.nanmean()) if stats.cg_residual.numel() else None,
            "negative_curvature": int(rec.sums.negative_curvature),
            "meta_grad_norm": float(rec.grad_norm) if rec.grad_norm is not None else None,
        }
        if self.cfg.lanczos_steps and stats.min_eig is not None:
            entry["min_eig"] = float(stats.min_eig.min())
            entry["min_eig_mean"] = float(stats.min_eig.mean())
        lam = state.lam.values()
        if lam is not None:
            entry["lam"] = lam
        steps = step_size_summary(state.theta)
        if steps is not None:  # Meta-SGD's learned step sizes, mean per parameter
            entry["inner_lr"] = steps
        self.history["steps"].append(entry)
        self._write(entry)

    def _alarms(self, rec: StepRecord, state: TrainState) -> None:
        """Warn (a `BilevelWarning`, once per kind) where a diagnostic crosses its `ALARMS` threshold."""
        for kind, value in alarm_values(self.cfg, self.exp, state, rec).items():
            alarm = ALARMS[kind]
            if kind not in self.warned and value > alarm.threshold:
                self.warned.add(kind)
                warnings.warn(alarm.message(self.cfg, rec.step, value), BilevelWarning, stacklevel=3)

    def evaluate(self, state: TrainState) -> None:
        """Evaluate on ``eval_tasks`` test tasks (rank 0), off the training clock; show and log it."""
        cfg, clock = self.cfg, self.clock
        t0 = clock.now()
        ev: dict[str, Any] = self.exp.evaluate(state.theta, cfg.eval_tasks, state.lam)
        clock.leave_out(clock.now() - t0)
        ev.update(step=state.step, time=clock())
        self.console.line(
            f"step {state.step}: {score(ev, self.exp.classification)} on {cfg.eval_tasks} test tasks "
            f"[{clock.now() - t0:.0f} s]"
        )
        self.history["eval"].append(ev)
        self._write({"eval": ev})

    def save(self, state: TrainState) -> None:
        """Write ``checkpoint.pt`` (rank 0): the state, the curves, the clock and the configuration."""
        if self.main:
            image_shape = None if self.exp.data is None else list(self.exp.data.image_shape)
            save_checkpoint(
                self.out / "checkpoint.pt",
                state.state_dict(),
                self.cfg,
                self.history,
                self.clock(),
                image_shape,
                self.exp.provenance,
            )

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(strict_json(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        """Close the bar and ``log.jsonl``."""
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
