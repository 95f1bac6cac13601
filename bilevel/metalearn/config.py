"""What defines a meta-training run: `TrainConfig`, the paper's `PRESETS`, the algorithm and dataset names.

A `TrainConfig` is saved with every run (``config.json``, and inside ``checkpoint.pt``) and is
enough to rebuild the run's problem (`bilevel.metalearn.build_experiment`) or to reload its result
(`bilevel.metalearn.load_run`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .algorithms import MetaAlgorithm, make_algorithm

__all__ = ["ALGOS", "DATASETS", "PRESETS", "TrainConfig"]

#: Names of ``TrainConfig.algo`` (and ``--algo``).
ALGOS = ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile")
#: Names of ``TrainConfig.dataset`` (and ``--dataset``).
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

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype (``torch.float32`` or ``torch.float64``)."""
        return torch.float64 if self.dtype == "float64" else torch.float32

    def algorithm(self, *, evaluation: bool = False) -> MetaAlgorithm:
        """The run's `MetaAlgorithm` (`make_algorithm` of ``algo`` with this configuration's settings).

        Args:
            evaluation: the algorithm that adapts at evaluation: ``eval_inner_steps`` inner steps
                where that is set, else ``inner_steps``.
        """
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

    def past_time_limit(self, elapsed: float) -> bool:
        """Whether ``elapsed`` seconds of the training clock exceed ``time_limit`` minutes."""
        return self.time_limit is not None and elapsed > self.time_limit * 60

    def scheduled_lr(self, step: int, elapsed: float) -> float:
        """Adam's step size at meta-step ``step`` after ``elapsed`` seconds of the training clock.

        ``meta_lr`` for ``lr_schedule="constant"``; for ``"cosine"``, ``meta_lr * (1 + cos(pi * p)) / 2``
        with ``p = step / meta_steps``, or with a ``time_limit`` the larger of that and
        ``elapsed / time_limit``, capped at 1.
        """
        if self.lr_schedule == "constant":
            return self.meta_lr
        p = step / max(self.meta_steps, 1)
        if self.time_limit is not None:
            p = max(p, elapsed / (self.time_limit * 60))
        return self.meta_lr * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


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
