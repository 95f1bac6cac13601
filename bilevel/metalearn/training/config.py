"""What defines a meta-training run: `TrainConfig`, the `PRESETS`, the algorithm and dataset names.

A `TrainConfig` is saved with every run (``config.json``, and inside ``checkpoint.pt``) and is
enough to rebuild the run's problem (`bilevel.metalearn.build_experiment`) or to reload its result
(`bilevel.metalearn.load_run`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..gradients import MetaAlgorithm
from ..proximal import LAM_KINDS
from ..registry import ALGORITHMS, INNER_KINDS, Settings, readers

__all__ = [
    "ALGOS",
    "DATASETS",
    "DATASET_DEFAULTS",
    "PRESETS",
    "RECIPES",
    "ConfigError",
    "Preset",
    "TrainConfig",
]

#: Names of ``TrainConfig.algo`` (and ``--algo``): the registry's entries.
ALGOS = tuple(ALGORITHMS)
#: Names of ``TrainConfig.dataset`` (and ``--dataset``).
DATASETS = ("omniglot", "sinusoid", "miniimagenet", "folder")
#: The iMAML algorithms: those with a proximal weight ``lam``, CG steps and damping.
IMAML_ALGOS = readers("lam")
#: The algorithms whose meta-gradient is the paper's implicit one (a learned lam needs it).
IMPLICIT_ALGOS = readers("learn_lam")

_CHOICES: dict[str, tuple[str, ...]] = {
    "algo": ALGOS,
    "dataset": DATASETS,
    "learn_lam": LAM_KINDS,
    "lr_schedule": ("constant", "cosine"),
    "split": ("vinyals", "lake"),
    "init": ("glorot", "torch", "released"),
    "inner_solver": tuple(INNER_KINDS),
    "dtype": ("float32", "float64"),
    "clock": ("wall", "cpu"),
    "compile": ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"),
}
# integer fields: the smallest value and what the field is, for the message
_INTS: dict[str, tuple[int, str]] = {
    "ways": (1, "classes per task"),
    "shots": (1, "support examples per class"),
    "queries": (1, "query examples per class"),
    "meta_steps": (0, "outer Adam steps"),
    "meta_batch": (1, "tasks per meta-step"),
    "inner_steps": (0, "inner GD steps"),
    "cg_iters": (0, "CG steps of the meta-gradient (0: first-order)"),
    "newton_iters": (1, "Newton steps of imaml-hf"),
    "n_val": (0, "validation characters"),
    "seed": (0, "the seed of the init and the task streams"),
    "test_tasks": (1, "fixed test tasks of the final evaluation"),
    "eval_every": (0, "steps between periodic evaluations (0: never)"),
    "eval_tasks": (1, "tasks per periodic evaluation"),
    "eval_batch": (1, "tasks per evaluation call"),
    "log_every": (1, "steps between log records"),
    "checkpoint_every": (0, "steps between checkpoints (0: only at the end)"),
    "task_pool": (0, "pre-drawn training tasks (0: a fresh task every draw)"),
    "lanczos_steps": (0, "Lanczos steps for the logged smallest eigenvalue (0: off)"),
}
_OPTIONAL_INTS: dict[str, tuple[int, str]] = {
    "eval_inner_steps": (0, "inner steps at evaluation"),
    "threads": (1, "torch intra-op threads"),
    "task_chunk": (1, "tasks per meta-gradient chunk (None: the whole meta-batch at once)"),
}
# float fields: whether 0 is allowed, and what the field is
_FLOATS: dict[str, tuple[bool, str]] = {
    "meta_lr": (False, "Adam's learning rate"),
    "adam_eps": (False, "Adam's epsilon"),
    "inner_lr": (False, "the inner GD step size"),
    "lam": (False, "iMAML's proximal weight"),
    "damping": (True, "the damping of the meta-gradient system"),
}
# optional float fields (None allowed): whether 0 is allowed, and what the field is
_OPTIONAL_FLOATS: dict[str, tuple[bool, str]] = {
    "time_limit": (False, "minutes of meta-training (None: no limit)"),
    "eval_every_minutes": (False, "minutes of training between periodic evaluations (None: never)"),
    "clip_grad_norm": (False, "the largest meta-gradient norm (None: no clipping)"),
    "eval_lam": (True, "lambda when adapting at evaluation (None: as trained)"),
}
#: Fields a resumed run may change: they do not alter the meta-training trajectory (the
#: evaluation, logging, checkpointing, where the data and outputs are, how the work is run).
#: ``meta_steps`` and ``time_limit`` set a cosine schedule, so they may change only with
#: ``lr_schedule="constant"``.
RESUMABLE = frozenset(
    {
        "meta_steps",
        "time_limit",
        "eval_inner_steps",
        "eval_lam",
        "test_tasks",
        "eval_every",
        "eval_every_minutes",
        "eval_tasks",
        "eval_batch",
        "log_every",
        "checkpoint_every",
        "lanczos_steps",
        "vectorize",
        "batched",
        "task_chunk",
        "compile",
        "device",
        "threads",
        "data_root",
        "out",
    }
)


class ConfigError(ValueError):
    """A `TrainConfig` field has a value that no run can use.

    Attributes:
        field: the offending field's name (``log_every``; the command line's ``--log-every``).
        value: its value.
    """

    def __init__(self, field: str, value: Any, problem: str) -> None:
        super().__init__(f"TrainConfig({field}={value!r}): {problem}")
        self.field = field
        self.value = value
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a meta-training run (saved with it).

    Attributes:
        algo: one of ``imaml-gd``, ``imaml-hf``, ``maml``, ``fomaml``, ``reptile``, ``imaml-released``,
            ``anil``, ``meta-sgd`` (`ALGOS`).
        dataset: ``omniglot``, ``sinusoid``, ``miniimagenet`` or ``folder``.
        ways, shots, queries: the task format (queries per class; for sinusoid, points).
        meta_steps, meta_batch, meta_lr: outer loop (Adam).
        adam_eps: Adam's epsilon (PyTorch's 1e-8; the released iMAML code uses 1e-3).
        clip_grad_norm: rescale the meta-gradient (theta's and a learned log lambda's, together)
            to at most this Euclidean norm before Adam's step (None: never): imaml-gd's outer loop
            showed instabilities (a query-loss jump mid-training with a healthy inner solve,
            measured); the norm before clipping is logged either way (``meta_grad_norm``).
        task_pool: draw the meta-batches from a fixed pool of this many training tasks (task ``j``
            of the pool always has the same classes and images; the released iMAML code pre-draws
            200,000); 0: a fresh task at every draw.
        lr_schedule: ``constant`` or ``cosine``: Adam's step size decays as
            ``meta_lr * (1 + cos(pi * p)) / 2`` where ``p`` is the fraction of the budget used,
            ``step / meta_steps`` or, with a ``time_limit``, the larger of that and
            ``clock / time_limit`` (so a time-limited run ends with a small step size whatever its
            speed; the schedule then depends on the machine's speed, not only on the seed).
        inner_steps, inner_lr: inner GD (train time).
        eval_inner_steps: inner GD steps when adapting at evaluation (None: ``inner_steps``).
        eval_lam: lambda of the proximal term when adapting at evaluation (None: as trained,
            the learned lambda where it is learned).  ``0`` adapts by plain GD on the support loss,
            as the authors' released code evaluates (`benchmarks/RESULTS.md` measures both).
        lam: proximal weight of G for the iMAML variants.
        learn_lam: ``none``, ``scalar`` or ``per-tensor``: learn log lam by the implicit gradient.
        cg_iters, newton_iters, damping: iMAML's CG steps, HF's Newton steps, damping of the system.
        cg_warm_start: start iMAML's CG from the first-order gradient (one more HVP) instead of 0.
        backtrack: inner GD with a per-task backtracking step size (`bilevel.solvers.StepHalving`,
            `bilevel.metalearn.registry.Settings`); not for maml.
        inner_solver: ``gd`` or ``nesterov`` (accelerated GD with the momentum of Theorem 2,
            `bilevel.solvers.Nesterov`; imaml-gd, fomaml and reptile, not with ``backtrack``), or,
            for imaml-hf, ``trust-region`` (Steihaug trust-region Newton-CG,
            `bilevel.solvers.TrustRegionNewtonCG`, in place of the paper's line-search Newton-CG,
            which ``gd`` keeps).  Which algorithm takes which is the registry's
            (`bilevel.metalearn.registry.ALGORITHMS`).
        split: ``vinyals`` or ``lake`` (Omniglot).
        n_val: validation characters carved out of the 1200 training ones (vinyals).
        data_root: dataset location (or the BILEVEL_DATA_ROOT environment variable).
        seed: seeds the initialization and the task streams.
        init: ``glorot`` (Glorot-uniform conv and linear weights, Finn et al.'s choice for
            convolutions; `bilevel.metalearn.init_params`), ``torch`` (PyTorch's default
            Kaiming-uniform initialization of the modules, seeded by ``seed``) or ``released``
            (the released iMAML code's: Glorot-uniform with gain 1.73, conv and linear biases
            uniform in [0, 0.05]).  Behind batch
            norm, the scale of a conv weight sets the effective inner step size (the gradient
            scales as 1 / ||w||): the default ``torch`` weights are about 1.7x smaller.
        test_tasks: fixed test tasks for the final evaluation (600 in the protocol).
        eval_every, eval_tasks: a curve of accuracy on the first ``eval_tasks`` fixed test
            tasks every ``eval_every`` steps (monitoring only: nothing is selected on it).
        eval_every_minutes: the same evaluation each time the training clock (``clock``,
            evaluations left out) passes a multiple of this many minutes, at the first step
            boundary after it: curves at equal compute (accuracy after 10, 20, 30 ... minutes),
            whatever a step costs.  None: never.  With ``eval_every`` too, both apply.
        eval_batch: tasks per vmapped evaluation call.
        time_limit: stop meta-training after this many minutes (None: no limit).
        log_every: steps between log records.
        checkpoint_every: steps between checkpoints.
        lanczos_steps: at every logged step, estimate the smallest eigenvalue of
            I + Lhat''/lam at each task's inner answer with this many Lanczos steps (one HVP of
            the meta-batch each; `MetaStats.min_eig`) and log its minimum and mean over the tasks
            (``min_eig``, ``min_eig_mean``); 0: off.  iMAML algorithms only (lam > 0).
        vectorize: vmap over tasks (else a loop); for models without a batched form, and for MAML.
        batched: run the meta-batch's per-task models in one call with plain autograd where the
            model has a `BatchedModel` (ConvNet, MLP); measured 1.3-2.5x faster per meta-step on
            CPU than vmap, same gradients (tested in float64).
        task_chunk: compute each meta-gradient this many tasks at a time and add the chunks up
            (`bilevel.metalearn.meta_gradient`'s ``task_chunk``): the same meta-step up to
            rounding, its peak memory that of one chunk instead of the whole meta-batch (None:
            all tasks at once, the fastest where memory allows).
        compile: run the batched model's first-order forward (inner steps, query gradients,
            evaluation) under ``torch.compile`` with this mode (`BatchedModel.compiled`);
            ``none``: eagerly.  Same values to rounding; the HVPs stay eager.
        dtype: ``float32`` or ``float64``.
        device: ``cpu``, ``cuda``, ... (None: cuda if available).
        threads: torch intra-op threads (None: torch's default).
        clock: ``wall`` (elapsed time) or ``cpu`` (this process's CPU time, all its threads):
            what ``time_limit`` and the curves' ``time`` measure.  With one thread on a shared
            machine, ``cpu`` is the time the run would take on a dedicated core; ``wall`` is
            also logged either way (``wall_time``).
        out: output folder.

    Raises:
        ConfigError: a field has the wrong type or a value no run can use (the message names the
            field, the value and the allowed values), or a switch the algorithm's registry entry
            does not read (a learned lambda, ``backtrack`` or an ``inner_solver`` it has not;
            `AlgorithmEntry.refusal`).
        ValueError: the algorithm's own checks (`AlgorithmEntry.build`).
    """

    algo: str = "imaml-gd"
    dataset: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_steps: int = 1000
    meta_batch: int = 16
    meta_lr: float = 1e-3
    adam_eps: float = 1e-8
    clip_grad_norm: float | None = None
    task_pool: int = 0
    lr_schedule: str = "constant"
    inner_steps: int = 16
    inner_lr: float = 0.1
    eval_inner_steps: int | None = None
    eval_lam: float | None = None
    lam: float = 2.0
    learn_lam: str = "none"
    cg_iters: int = 5
    newton_iters: int = 3
    damping: float = 0.0
    cg_warm_start: bool = False
    backtrack: bool = False
    inner_solver: str = "gd"
    split: str = "vinyals"
    n_val: int = 0
    data_root: str | None = None
    seed: int = 0
    init: str = "glorot"
    test_tasks: int = 600
    eval_every: int = 0
    eval_every_minutes: float | None = None
    eval_tasks: int = 100
    eval_batch: int = 25
    time_limit: float | None = None
    log_every: int = 10
    checkpoint_every: int = 200
    lanczos_steps: int = 0
    vectorize: bool = True
    batched: bool = True
    task_chunk: int | None = None
    compile: str = "none"
    dtype: str = "float32"
    device: str | None = None
    threads: int | None = None
    clock: str = "wall"
    out: str = "runs/default"

    def __post_init__(self) -> None:
        _check_values(self)
        _check_types(self)
        if self.dataset != "sinusoid" and self.ways < 2:
            raise ConfigError(
                "ways", self.ways, f"a {self.dataset} task needs ways >= 2 (1-way is always right)"
            )
        entry = ALGORITHMS[self.algo]
        for name in ("learn_lam", "backtrack", "inner_solver"):  # the switches an algorithm may refuse
            why = entry.refusal(name, getattr(self, name))
            if why is not None:
                raise ConfigError(name, getattr(self, name), why)
        fewest, why = entry.min_inner_steps
        if self.inner_steps < fewest:
            raise ConfigError("inner_steps", self.inner_steps, why)
        self.algorithm()  # the algorithm's own checks

    def resume_conflicts(self, saved: TrainConfig) -> list[str]:
        """How this configuration differs from ``saved`` in fields that a resumed run must keep.

        Args:
            saved: the configuration of the run being resumed (from its checkpoint).

        Returns:
            ``"name: saved X, now Y"`` for each field outside `RESUMABLE` that differs (with a
            cosine schedule, also ``meta_steps`` and ``time_limit``); empty if the run can resume.
        """
        fixed = set(_field_names()) - RESUMABLE
        if self.lr_schedule == "cosine" or saved.lr_schedule == "cosine":
            fixed |= {"meta_steps", "time_limit"}
        return [
            f"{name}: saved {getattr(saved, name)!r}, now {getattr(self, name)!r}"
            for name in _field_names()
            if name in fixed and getattr(saved, name) != getattr(self, name)
        ]

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype (``torch.float32`` or ``torch.float64``)."""
        return torch.float64 if self.dtype == "float64" else torch.float32

    def algorithm(self, *, evaluation: bool = False) -> MetaAlgorithm:
        """The run's `MetaAlgorithm`: the registry entry of ``algo`` built with this configuration's settings.

        Args:
            evaluation: the algorithm that adapts at evaluation: ``eval_inner_steps`` inner steps
                where that is set, else ``inner_steps``.
        """
        steps = (
            self.eval_inner_steps if (evaluation and self.eval_inner_steps is not None) else self.inner_steps
        )
        fields = {f.name for f in dataclasses.fields(Settings)} - {"inner_steps", "inner_tol"}
        settings = Settings(inner_steps=steps, **{name: getattr(self, name) for name in fields})
        return ALGORITHMS[self.algo].build(settings)

    def evaluation_lam(self, trained: Any) -> Any:
        """lambda of the adaptation at evaluation: ``eval_lam`` where set, else ``trained``.

        Args:
            trained: the lambda training used: its `ProximalWeight` (`lam_from_config`), a float, or
                the learned lambda as `adapt` takes it; ``None``: the algorithm's own.

        Returns:
            ``trained``, or ``eval_lam`` as a float (which `meta_gradient` and `adapt` read as a
            fixed lambda that replaces the trained one).
        """
        return trained if self.eval_lam is None else float(self.eval_lam)

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


def _check_values(cfg: TrainConfig) -> None:
    """Each field's own range: choices, integers, numbers."""
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(
                name, getattr(cfg, name), f"choose one of {', '.join(choices[:-1])} or {choices[-1]}"
            )
    for name, (lo, what) in _INTS.items():
        _check_int(name, getattr(cfg, name), lo, what)
    for name, (lo, what) in _OPTIONAL_INTS.items():
        if getattr(cfg, name) is not None:
            _check_int(name, getattr(cfg, name), lo, what)
    for name, (zero, what) in _FLOATS.items():
        _check_float(name, getattr(cfg, name), zero, what)
    for name, (zero, what) in _OPTIONAL_FLOATS.items():
        if getattr(cfg, name) is not None:
            _check_float(name, getattr(cfg, name), zero, what)


def _check_types(cfg: TrainConfig) -> None:
    """Booleans, strings and the device."""
    for name in ("backtrack", "vectorize", "batched"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(name, getattr(cfg, name), "must be True or False")
    for name in ("data_root", "device"):
        if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), str):
            raise ConfigError(name, getattr(cfg, name), "must be a string or None")
    if not isinstance(cfg.out, str) or not cfg.out:
        raise ConfigError("out", cfg.out, "must name an output folder")
    if cfg.device is not None:
        try:
            torch.device(cfg.device)
        except (RuntimeError, ValueError) as err:
            raise ConfigError("device", cfg.device, f"not a device ({err}): cpu, cuda, cuda:1, ...") from err


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_int(name: str, value: Any, lo: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, f"must be an integer ({what})")
    if value < lo:
        raise ConfigError(name, value, f"must be >= {lo} ({what})")


def _check_float(name: str, value: Any, zero: bool, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, value, f"must be a number ({what})")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ConfigError(name, value, f"must be finite and {'>= 0' if zero else '> 0'} ({what})")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A task format with each algorithm's settings for it (``--preset``).

    Attributes:
        task: the task format (dataset, ways, shots, ...).
        paper: the paper's settings (Appendix F.2), for every algorithm without a measured entry.
        measured: per algorithm, the settings that measurements on this project's machines chose
            (`benchmarks/RESULTS.md`), replacing the paper's; empty where none were made.
        published: per algorithm whose own paper is not iMAML's, the settings of its published
            examples (not measured here), replacing iMAML's paper's; a measured entry wins.
    """

    task: dict[str, Any]
    paper: dict[str, Any]
    measured: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    published: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def values(self, algo: str) -> dict[str, Any]:
        """The `TrainConfig` fields this preset sets for ``algo``."""
        return {**self.task, **self.paper, **self.published.get(algo, {}), **self.measured.get(algo, {})}

    def as_paper(self) -> Preset:
        """The same task with the paper's settings for every algorithm (its own paper's, for those
        with published settings)."""
        return Preset(self.task, self.paper, published=self.published)


# The outer loop every measured Omniglot 5-way 1-shot run shared (imaml-gd, first-order MAML and MAML
# side by side at equal meta-steps).
_OUTER = dict(meta_batch=16, meta_lr=1e-3, lr_schedule="constant", init="torch")
# What the measured imaml-gd (all but its inner step count) and first-order MAML presets share.
_IMAML_GD = dict(inner_lr=0.1, lam=0.5, backtrack=True, cg_iters=5, clip_grad_norm=1.0, **_OUTER)
_FOMAML = dict(inner_steps=5, inner_lr=0.4, eval_inner_steps=10, **_OUTER)

# ANIL and Meta-SGD on image tasks, from their published examples (not measured here).  ANIL:
# learn2learn's examples/vision/anil_fc100.py (head step 0.1, 5 steps, Adam 1e-3, 32 tasks per
# meta-step).  Meta-SGD: one inner step as in Li et al. 2017 (Omniglot: Adam 1e-3), the step sizes
# starting at 0.4, the MAML step measured best here (``omniglot-5w1s``: 1 step of 0.4) and near
# learn2learn's examples/vision/maml_omniglot.py (0.5), so that Meta-SGD starts from MAML's path.
_ANIL = dict(inner_steps=5, inner_lr=0.1, meta_batch=32, meta_lr=1e-3)
_META_SGD = dict(inner_steps=1, inner_lr=0.4, meta_batch=32, meta_lr=1e-3)
_IMAGES = {"anil": _ANIL, "meta-sgd": _META_SGD}

#: Keys are ``--preset`` names.  ``omniglot-5w1s`` holds the settings measured best here for imaml-gd
#: (lam 0.5 with backtracking, against the paper's lam 2 without it, which stalled; Adam 1e-3 on a
#: cosine schedule with the meta-gradient clipped to norm 1: 97.08 +- 0.33% after 100 CPU-minutes,
#: 1,915 meta-steps of 16 tasks, where without clipping a meta-gradient spike set it back to 91.19%),
#: first-order MAML (5 steps of 0.4, 10 at test: 91.19 +- 0.55% at 1,200 steps) and MAML (1 step of 0.4:
#: 92.76 +- 0.50% at 800 steps).  ``omniglot-20w1s`` holds the imaml-gd and first-order MAML settings
#: that trained side by side without collapse for 300 meta-steps (imaml-gd 72.38% with the clipping,
#: 70.73% without; first-order MAML 72.15%).  The other algorithms and presets keep the paper's
#: settings.  ``paper-<name>`` is ``<name>`` with the paper's settings for every algorithm.
_PRESETS: dict[str, Preset] = {
    "omniglot-5w1s": Preset(
        dict(dataset="omniglot", ways=5, shots=1),
        dict(inner_steps=16, lam=2.0, cg_iters=5),
        {
            "imaml-gd": {**_IMAML_GD, "inner_steps": 16, "lr_schedule": "cosine"},
            "fomaml": _FOMAML,
            "maml": dict(inner_steps=1, inner_lr=0.4, **_OUTER),
        },
        _IMAGES,
    ),
    "omniglot-5w5s": Preset(
        dict(dataset="omniglot", ways=5, shots=5), dict(inner_steps=16, lam=2.0, cg_iters=5), {}, _IMAGES
    ),
    "omniglot-20w1s": Preset(
        dict(dataset="omniglot", ways=20, shots=1),
        dict(inner_steps=25, lam=2.0, cg_iters=5),
        {
            "imaml-gd": {**_IMAML_GD, "inner_steps": 25},
            "fomaml": _FOMAML,
        },
        _IMAGES,
    ),
    "omniglot-20w5s": Preset(
        dict(dataset="omniglot", ways=20, shots=5), dict(inner_steps=25, lam=2.0, cg_iters=5), {}, _IMAGES
    ),
    "miniimagenet-5w1s": Preset(
        dict(dataset="miniimagenet", ways=5, shots=1), dict(inner_steps=10, lam=0.5, cg_iters=5), {}, _IMAGES
    ),
    "sinusoid-5s": Preset(
        dict(dataset="sinusoid", ways=1, shots=5, queries=10),
        dict(inner_steps=10, inner_lr=0.01, lam=2.0, meta_batch=10),
        # learn2learn's examples/maml_sine.py (5 steps of 0.01) for ANIL's head; one step for
        # Meta-SGD (Li et al. 2017), its step sizes starting at that 0.01
        {},
        {"anil": dict(inner_steps=5, inner_lr=0.01), "meta-sgd": dict(inner_steps=1, inner_lr=0.01)},
    ),
}
PRESETS: dict[str, Preset] = {
    **_PRESETS,
    **{f"paper-{name}": p.as_paper() for name, p in _PRESETS.items() if p.measured},
}

#: A dataset's task format where it differs from `TrainConfig`'s defaults (those of Omniglot,
#: 1 support and 15 query examples per class), for the command line: a flag, a preset or a recipe
#: that sets the field wins.  A sinusoid task is the iMAML/MAML paper's 5 support and 10 query
#: points, as `SinusoidTasks` examples and the tutorials draw them (1 support point cannot fix
#: a sine's amplitude and phase).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {"sinusoid": {"shots": 5, "queries": 10}}


#: Named recipes (``--recipe``): every setting of a published procedure, applied before the preset
#: and the flags.  ``released`` is the authors' released iMAML code (aravindr93/imaml_dev,
#: ``examples/omniglot_implicit_maml.py`` with the settings of its ``examples/README.md``), which is
#: NOT the paper's algorithm: 16 SGD steps of 0.1 on the support loss without the proximal term,
#: one step of 0.1 on the proximal term (lam 2), CG from 0 (5 steps) on (2 I + H / 12) g = v,
#: Adam 1e-3 with eps 1e-3, 32 tasks per meta-step from 200,000 pre-drawn tasks, Glorot-uniform
#: weights with gain 1.73 and biases in [0, 0.05], evaluation by 16 SGD steps without the proximal
#: term.  (Its network pads the 7 x 7 map by one zero row and column before the third stride-2
#: convolution; with padding 1 that gives the same 4 x 4 output as ours, so it needs no flag.)
RECIPES: dict[str, dict[str, Any]] = {
    "released": dict(
        algo="imaml-released",
        inner_steps=16,
        inner_lr=0.1,
        lam=2.0,
        cg_iters=5,
        damping=1.0,
        meta_batch=32,
        meta_lr=1e-3,
        adam_eps=1e-3,
        task_pool=200_000,
        init="released",
        eval_inner_steps=16,
        eval_lam=0.0,
    ),
}
