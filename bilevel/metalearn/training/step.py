"""One meta-step of Algorithm 1 (iMAML), data-parallel: meta-gradient, one all-reduce, Adam.

`TrainState` is what meta-training changes and a checkpoint keeps (theta, a learned lambda, Adam's
state, the step count); `MetaStep` takes it one meta-batch further and returns a `StepRecord`.

Each rank computes the meta-gradient of its tasks (``range(rank, B, world)`` of a meta-batch of B);
the per-task gradient sums and the `StepSums` scalars travel in one all-reduce, so that every rank
takes the same Adam step from the same state and the parameters stay identical.  The step reads the
device once for the finiteness of the meta-gradient and once for the summed scalars; the
diagnostics are read by the log, on logged steps only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ... import CheckpointError, NonFiniteError, deferred_checks
from ...tree import all_finite, pack
from ..algorithms import MetaStats, meta_gradient
from ..models import Params
from ..proximal import ProximalWeight, lam_from_config
from ..registry import ALGORITHMS
from ..tasks import Task, check_finite
from .checkpoint import shape_mismatch
from .config import TrainConfig
from .distributed import Dist, allreduce_, broadcast_
from .experiment import Experiment

__all__ = ["MetaStep", "StepRecord", "StepSums", "TrainState", "advice"]


#: Every field that only some algorithms read (`AlgorithmEntry.flags`); the others every one reads.
_SPECIFIC = frozenset().union(*(e.flags for e in ALGORITHMS.values()))


def advice(cfg: TrainConfig, moves: Sequence[tuple[str, str]]) -> str:
    """What to change, in flags this run's algorithm reads: ``"lower --inner-lr (now 0.1) or raise
    --lam (now 2)"``.

    Args:
        cfg: the run.
        moves: ``(verb, field)`` pairs in order of preference: ``"lower"`` or ``"raise"`` a
            number (shown with its value), ``"use"`` a switch (left out where it is on already).
            A field only some algorithms read (the registry's `AlgorithmEntry.flags`) is left out
            where ``cfg.algo`` does not read it, so that no advice names a flag the command line
            would refuse.

    Returns:
        The moves that apply, as alternatives ("a, b or c"); ``""`` if none does.
    """
    reads = ALGORITHMS[cfg.algo].flags
    said = []
    for verb, field in moves:
        if field in _SPECIFIC and field not in reads:
            continue
        flag, value = "--" + field.replace("_", "-"), getattr(cfg, field)
        if verb == "use":
            if not value:
                said.append(f"use {flag}")
        else:
            said.append(f"{verb} {flag} (now {value:g})")
    return " or ".join([", ".join(said[:-1]), said[-1]] if len(said) > 2 else said)


#: What may stop a diverging inner solve, most direct first.
_DIVERGED = (("lower", "inner_lr"), ("raise", "lam"), ("use", "backtrack"), ("lower", "meta_lr"))


@dataclasses.dataclass(eq=False)
class TrainState:
    """What meta-training changes and a checkpoint keeps.

    Attributes:
        theta: the meta-parameters by name (leaves that require grad, views of one buffer:
            `bilevel.tree.pack`).
        lam: the proximal weight; its learned log-lambda leaves are trained with theta.
        optimizer: Adam over `leaves`.
        step: meta-steps done.
    """

    theta: Params
    lam: ProximalWeight
    optimizer: torch.optim.Optimizer
    step: int = 0

    @classmethod
    def start(cls, cfg: TrainConfig, exp: Experiment, d: Dist) -> TrainState:
        """The state before the first meta-step: ``exp.theta`` and ``cfg.lam``, rank 0's on every rank."""
        # packed: the meta-step reads theta raveled without copying it
        theta = {k: v.requires_grad_(True) for k, v in pack(exp.theta).items()}  # type: ignore[union-attr]
        lam = lam_from_config(cfg.learn_lam, cfg.lam, list(theta), device=exp.device, dtype=exp.dtype)
        leaves = [*theta.values(), *lam.leaves().values()]
        broadcast_([t.detach() for t in leaves], d)
        return cls(theta, lam, torch.optim.Adam(leaves, lr=cfg.meta_lr, eps=cfg.adam_eps))

    @property
    def leaves(self) -> list[torch.Tensor]:
        """What Adam trains: theta's tensors, then the learned log-lambda leaves."""
        return [*self.theta.values(), *self.lam.leaves().values()]

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``theta``, ``log_lam``, ``optimizer`` and ``step``."""
        return {
            "theta": {k: v.detach() for k, v in self.theta.items()},
            "log_lam": {k: v.detach() for k, v in self.lam.leaves().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, ck: Mapping[str, Any], path: object) -> None:
        """Continue from a checkpoint (`load_checkpoint`): its parameters, Adam's state and step.

        Raises:
            CheckpointError: its theta or log-lambda does not fit this state's (names or shapes).
        """
        log_lam = self.lam.leaves()
        for what, mine, saved in (("theta", self.theta, ck["theta"]), ("log_lam", log_lam, ck["log_lam"])):
            diff = shape_mismatch(mine, saved)
            if diff:
                raise CheckpointError(
                    f"cannot resume {path}: its {what} does not fit the model of the configuration "
                    f"(they differ at {diff[:3]})"
                )
        with torch.no_grad():
            for k, v in ck["theta"].items():
                self.theta[k].copy_(v)
            for k, v in ck["log_lam"].items():
                log_lam[k].copy_(v)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.step = int(ck["step"])


@dataclasses.dataclass(frozen=True)
class StepSums:
    """The scalars the ranks sum after a meta-step, in one float64 all-reduce with the meta-gradient.

    The all-reduced vector holds the fields in their order (`local`, `from_tensor`).

    Attributes:
        query_loss: the tasks' query losses, summed.
        query_acc: their query accuracies (fractions; NaN, as in regression, counts 0), summed.
        negative_curvature: how many tasks' CG met negative curvature.
        clock: rank 0's training clock in seconds (the other ranks add 0): every rank then takes
            the same scheduled step and stops after the same step, though their own clocks
            differ (rank 0 leaves out the evaluations the others wait for).
        stop: how many ranks were asked to stop (a rank leaving the loop alone would break the
            others' next all-reduce).
    """

    query_loss: float
    query_acc: float
    negative_curvature: float
    clock: float
    stop: float

    @classmethod
    def local(cls, stats: MetaStats | None, clock: float, stop: bool, device: torch.device) -> torch.Tensor:
        """This rank's terms as the float64 vector to all-reduce (built on the device, not read)."""
        terms: dict[str, float | torch.Tensor] = {"clock": clock, "stop": 1.0 if stop else 0.0}
        if stats is not None:
            terms["query_loss"] = stats.query_loss.double().sum()
            terms["query_acc"] = stats.query_acc.double().nan_to_num(0.0).sum()
            terms["negative_curvature"] = stats.negative_curvature.double().sum()
        t = torch.zeros(len(_SUMMED), device=device, dtype=torch.float64)
        for i, name in enumerate(_SUMMED):
            if name in terms:
                t[i] = terms[name]
        return t

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StepSums:
        """The all-reduced vector, read in one host transfer."""
        return cls(*t.tolist())


_SUMMED = tuple(f.name for f in dataclasses.fields(StepSums))


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one meta-step did.

    Attributes:
        step: its index (meta-steps done before it).
        logged: whether it measured diagnostics (every ``log_every`` steps and the last step).
        sums: the all-reduced `StepSums` of the meta-batch.
        lr: Adam's step size.
        halt: every rank stops after this step (a stop was requested, or the time limit passed).
        stats: this rank's per-task `MetaStats` (on the device); ``None`` where it had no task.
        grad_norm: the meta-gradient's norm before clipping, on the device; ``None`` unless the
            step clipped or was logged.
    """

    step: int
    logged: bool
    sums: StepSums
    lr: float
    halt: bool
    stats: MetaStats | None
    grad_norm: torch.Tensor | None


class MetaStep:
    """``meta_step(state, batch) -> StepRecord``: one meta-step of this rank's tasks, in place.

    Args:
        cfg: the run.
        exp: its problem (`build_experiment`).
        d: this process's place among the ranks.
        n_tasks: how many tasks of each meta-batch this rank computes (0: it contributes zeros).
        clock: rank 0's training clock, read when the ranks sum.
        stop_requested: whether this rank was asked to stop.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        exp: Experiment,
        d: Dist,
        n_tasks: int,
        clock: Callable[[], float],
        stop_requested: Callable[[], bool],
    ) -> None:
        self.cfg = cfg
        self.exp = exp
        self.d = d
        self.n_tasks = n_tasks
        self.clock = clock
        self.stop_requested = stop_requested

    def __call__(self, state: TrainState, batch: Task | None) -> StepRecord:
        """Take ``state`` one meta-step further on ``batch`` (this rank's tasks; ``None`` if none).

        Raises:
            NonFiniteError: the meta-gradient has NaN or infinity (the inner solver diverged).
        """
        cfg, step = self.cfg, state.step
        logged = step % cfg.log_every == 0 or step == cfg.meta_steps - 1
        if batch is not None:
            g, lam_grad, stats = self._meta_gradient(state, batch, logged)
        else:  # more ranks than tasks: this rank contributes zeros
            g, lam_grad, stats = {k: torch.zeros_like(v) for k, v in state.theta.items()}, None, None
        # per-task sums, so that the all-reduce adds the ranks' tasks
        grads = [g[k].detach() * self.n_tasks for k in state.theta]
        grads += [gk * self.n_tasks for gk in state.lam.chain_rule(lam_grad).values()]
        local = StepSums.local(
            stats, self.clock() if self.d.main else 0.0, self.stop_requested(), self.exp.device
        )
        allreduce_([*grads, local], self.d)
        leaves = state.leaves
        for leaf, gr in zip(leaves, grads):
            leaf.grad = (gr / cfg.meta_batch).to(leaf.dtype)
        grad_norm = None
        if cfg.clip_grad_norm is not None:
            # rescales on the device (no host read); the log reads the norm on logged steps only
            grad_norm = torch.nn.utils.clip_grad_norm_(leaves, cfg.clip_grad_norm)
        elif logged:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(x.grad) for x in leaves])
            )
        sums = StepSums.from_tensor(local)
        lr = cfg.scheduled_lr(step, sums.clock)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step = step + 1
        halt = sums.stop > 0 or cfg.past_time_limit(sums.clock)
        return StepRecord(step, logged, sums, lr, halt, stats, grad_norm)

    def _meta_gradient(
        self, state: TrainState, batch: Task, logged: bool
    ) -> tuple[Params, dict[str, torch.Tensor] | None, MetaStats]:
        cfg, exp = self.cfg, self.exp
        try:
            # On an accelerator the meta-step's checks read the device once it is queued, not
            # while it is.  On the CPU a read is free, and a queued check keeps what it reads
            # to the end of the step: with task chunks, every chunk's answers (measured: 21
            # against 8 MiB of saved tensors at 32 tasks of 5-way 1-shot MAML, one per chunk).
            deferred = deferred_checks() if exp.device.type != "cpu" else contextlib.nullcontext()
            with deferred:
                g, lam_grad, stats = meta_gradient(
                    exp.algorithm,
                    exp.model_fn,
                    exp.loss,
                    state.theta,
                    batch,
                    lam=state.lam,
                    classification=exp.classification,
                    vectorize=cfg.vectorize,
                    batched=exp.batched,
                    diagnostics=logged,
                    lanczos_steps=cfg.lanczos_steps if logged else 0,
                    task_chunk=cfg.task_chunk,
                )
        except NonFiniteError as err:
            self._check_inputs(state, batch)
            raise NonFiniteError(
                f"{cfg.algo}: meta-step {state.step}: NaN or infinity in the meta-step (the inner loop or "
                f"the meta-gradient's solve diverged; the cause is chained below): {self._diverged_advice()}"
            ) from err
        # one device read for the whole meta-gradient
        if not bool(all_finite(list(g.values())).all()):
            self._check_inputs(state, batch)
            raise NonFiniteError(
                f"{cfg.algo}: meta-step {state.step}: the meta-gradient has NaN or infinity (query loss "
                f"{stats.query_loss.tolist()}); the inner solver probably diverged: "
                f"{self._diverged_advice()}"
            )
        return g, lam_grad, stats

    def _check_inputs(self, state: TrainState, batch: Task) -> None:
        """On a non-finite meta-step only (no device read on healthy steps): were the tasks broken?"""
        d = self.d
        check_finite(
            batch,
            f"{self.cfg.algo}: meta-step {state.step}",
            index=range(d.rank, d.rank + d.world * batch.support_x.shape[0], d.world),
        )

    def _diverged_advice(self) -> str:
        return advice(self.cfg, _DIVERGED)
