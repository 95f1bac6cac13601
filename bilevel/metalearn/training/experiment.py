"""A run's problem, built from its `TrainConfig` (`build_experiment`) or its checkpoint (`load_run`).

The configuration fixes everything: the dataset and its class split, the task samplers (meta-training
stream and fixed test tasks), the model and its initialization, the loss, and the algorithm::

    exp = build_experiment(TrainConfig(dataset="sinusoid", algo="imaml-gd", shots=5))
    batch = exp.train_sampler.meta_batch(0, range(exp.config.meta_batch))
    g, _, stats = meta_gradient(exp.algorithm, exp.model_fn, exp.loss, exp.theta, batch,
                                classification=exp.classification, batched=exp.batched)

    run = load_run("runs/imaml/checkpoint.pt")   # the trained theta, ready for evaluate_tasks
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ... import CheckpointError
from ..algorithms import MetaAlgorithm
from ..batched import BatchedModel, batched_model
from ..data.datasets import FewShotData
from ..data.samplers import SinusoidTasks, TaskPool, TaskSampler
from ..data.splits import ClassSplit
from ..evaluation import LamValue, Run, evaluate_fixed
from ..models import (
    LossFn,
    ModelFn,
    Params,
    default_model,
    init_params,
    make_functional,
    miniimagenet_conv4,
    mse,
    omniglot_cnn,
    sinusoid_mlp,
)
from ..proximal import coerce, lam_from_config
from ..registry import ALGORITHMS, readers
from .checkpoint import load_checkpoint, saved_config, shape_mismatch
from .config import ConfigError, TrainConfig
from .distributed import training_device
from .provenance import Provenance

__all__ = ["Experiment", "build_experiment", "load_run"]


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
    """Everything a run of ``config`` computes with, before any meta-training.

    Attributes:
        config: the run's configuration.
        device, dtype: where and in which dtype the parameters and tasks live.
        model: the module (its own parameters are never read; see `make_functional`).
        model_fn: ``model_fn(params, x) -> out`` for one task: images ``(N, C, H, W)`` to logits
            ``(N, ways)``, or sinusoid inputs ``(N, 1)`` to outputs ``(N, 1)``.
        theta: the initial meta-parameters by name (by ``config.init`` and ``config.seed``).
        batched: the `BatchedModel` of ``model`` where ``config.batched`` and the model has one.
        loss: ``F.cross_entropy`` (classification) or `mse` (sinusoid).
        classification: whether tasks are scored by accuracy.
        train_sampler: the meta-training task stream (``meta_batch(step, indices)``).
        test_sampler: the fixed test tasks (``fixed_batch(indices)``).
        data: the image dataset (``None`` for sinusoid).
        algorithm: the `MetaAlgorithm` of meta-training (``config.algorithm()``).
        eval_algorithm: the one that adapts at evaluation (``config.algorithm(evaluation=True)``).
        provenance: what the run was trained on (`Provenance`): the saved one of a run rebuilt
            from its checkpoint, else this experiment's data.
        notes: how this experiment's data differs from the data the run was trained on, each a
            line that says what is done about it (`Provenance.notes`); empty for a new run.
    """

    config: TrainConfig
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    model_fn: ModelFn
    theta: Params
    batched: BatchedModel | None
    loss: LossFn
    classification: bool
    train_sampler: TaskSampler | SinusoidTasks | TaskPool
    test_sampler: TaskSampler | SinusoidTasks
    data: FewShotData | None
    algorithm: MetaAlgorithm
    eval_algorithm: MetaAlgorithm
    provenance: Provenance = dataclasses.field(default_factory=Provenance)
    notes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        n = sum(v.numel() for v in self.theta.values())
        c = self.config
        return (
            f"Experiment({c.algo} on {c.dataset}, model={type(self.model).__name__} ({n:,} parameters), "
            f"{str(self.dtype).replace('torch.', '')} on {self.device}, "
            f"train_sampler={self.train_sampler!r}, data={self.data!r})"
        )

    @property
    def split(self) -> ClassSplit | None:
        """The class split of an image dataset (saved as ``split.json``); ``None`` for sinusoid."""
        return None if self.data is None else self.data.split

    def run(self, params: Params | None = None, lam: LamValue | None = None) -> Run:
        """A `Run` of this experiment's model with ``params`` (default: the initial theta).

        Args:
            params: meta-parameters by name (e.g. the current theta of training).
            lam: the run's `ProximalWeight` (`lam_from_config`), or a learned lambda as `adapt`
                takes it; ``None`` or a configured fixed lambda: the evaluation algorithm's own.
                The configuration's ``eval_lam`` replaces either where it is set.
        """
        return Run(
            model_fn=self.model_fn,
            params=self.theta if params is None else params,
            algorithm=self.eval_algorithm,
            loss=self.loss,
            classification=self.classification,
            lam=self.config.evaluation_lam(
                None if lam is None else coerce(lam).resolve(self.eval_algorithm.lam)
            ),
            batched=self.batched,
            config=self.config,
        )

    def evaluate(
        self,
        params: Params,
        n_tasks: int,
        lam: LamValue | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """`evaluate_fixed` of ``params`` on the first ``n_tasks`` fixed test tasks, summarized.

        Args:
            params: meta-parameters by name.
            n_tasks: how many fixed test tasks.
            lam: as in `run`.
            progress: called with the number of tasks done after each batch (`evaluate_fixed`).

        Returns:
            ``accuracy``, ``ci95`` (percent; NaN for regression), ``loss``, ``loss_ci95``, ``n_tasks``.
        """
        run = self.run(params, lam)
        return evaluate_fixed(
            run, self.test_sampler, n_tasks, device=self.device, progress=progress
        ).summary()


def _architecture(cfg: TrainConfig, image_shape: tuple[int, int, int] | None) -> nn.Module:
    """The model of ``cfg``; only an image folder's model depends on the data (its image shape)."""
    if cfg.dataset == "sinusoid":
        return sinusoid_mlp()
    if cfg.dataset == "omniglot":
        return omniglot_cnn(cfg.ways)
    if cfg.dataset == "miniimagenet":
        return miniimagenet_conv4(cfg.ways)
    if image_shape is None:
        raise ValueError(f"TrainConfig(dataset={cfg.dataset!r}): the model needs the images' shape")
    return default_model(image_shape, cfg.ways)


def _loss(cfg: TrainConfig) -> tuple[LossFn, bool]:
    """The task loss of ``cfg`` and whether it is a classification."""
    if cfg.dataset == "sinusoid":
        return mse, False
    return F.cross_entropy, True


def _functional(
    model: nn.Module, cfg: TrainConfig, gen: torch.Generator, dtype: torch.dtype, device: torch.device
) -> tuple[ModelFn, Params]:
    """The model's function and initial parameters, by ``cfg.init``."""
    if cfg.init == "glorot":
        return make_functional(model, gen, dtype=dtype, device=device)
    if cfg.init == "released":
        theta = init_params(model, gen, dtype=dtype, device=device, gain=1.73, bias=(0.0, 0.05))
        return make_functional(model, dtype=dtype, device=device)[0], theta
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if m is not model and callable(reset):
                reset()
        return make_functional(model, None, dtype=dtype, device=device)


def _load_data(cfg: TrainConfig, saved: ClassSplit | None) -> FewShotData:
    """The image dataset of ``cfg``, on the ``saved`` split where there is one (never recomputed)."""
    if cfg.dataset == "omniglot":
        from ..data.omniglot import load_omniglot

        split = cfg.split if cfg.split in ("vinyals", "lake") else "vinyals"
        return load_omniglot(
            cfg.data_root,
            split=split if saved is None else saved,  # type: ignore[arg-type]
            seed=cfg.seed,
            n_val=cfg.n_val,
        )
    if cfg.dataset == "miniimagenet":
        from ..data.miniimagenet import load_miniimagenet

        return load_miniimagenet(cfg.data_root, split=saved)
    from ..data.folder import load_image_folder

    return load_image_folder(cfg.data_root, seed=cfg.seed, split=saved)


def _recorded(saved: Provenance | None, data: FewShotData | None) -> Provenance:
    """What the experiment's checkpoints record: the saved provenance, where it says what was trained on."""
    if saved is None or (data is not None and saved.split is None) or not (saved.version or saved.split):
        return Provenance.of(data)
    return saved


def build_experiment(
    cfg: TrainConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    provenance: Provenance | None = None,
) -> Experiment:
    """Build the problem of the run ``cfg`` describes: data, samplers, model, initial theta, algorithms.

    Loads (and on first use decodes into the cache) the image dataset; draws no task.

    Args:
        cfg: the run's configuration.
        device: where parameters and tasks go (default: ``cfg.device``, else CUDA if available).
        dtype: parameter and input dtype (default: ``cfg.dtype``).
        provenance: what a trained run was trained on (`saved_provenance` of its checkpoint): its
            saved class split is used as it is, never recomputed; ``None``: a new run, split afresh.

    Returns:
        The `Experiment`; ``theta`` is the deterministic initialization of ``cfg.init`` and ``cfg.seed``;
        ``notes`` says how the data differs from ``provenance``'s.

    Raises:
        DatasetNotFoundError: the dataset is not under ``cfg.data_root`` (or ``BILEVEL_DATA_ROOT``).
        SplitMismatchError: the data lacks classes of ``provenance``'s split.
        DatasetFormatError: the data is malformed or has too few classes or images for the task format.
        ConfigError: ``cfg.device`` names a CUDA device this machine does not have (without ``device``).
    """
    dev = torch.device(device) if device is not None else training_device(cfg.device)
    dt = cfg.torch_dtype if dtype is None else dtype
    gen = torch.Generator().manual_seed(cfg.seed)
    train: TaskSampler | SinusoidTasks | TaskPool
    test: TaskSampler | SinusoidTasks
    data: FewShotData | None = None
    notes: list[str] = []
    if cfg.dataset == "sinusoid":
        train = SinusoidTasks(cfg.shots, cfg.queries, seed=cfg.seed, dtype=dt)
        test = SinusoidTasks(cfg.shots, cfg.queries, seed=cfg.seed, eval_seed=cfg.seed + 10_000, dtype=dt)
        model = _architecture(cfg, None)
        fn, theta = _functional(model, cfg, gen, dt, dev)
    else:
        data = _load_data(cfg, None if provenance is None else provenance.split)
        if provenance is not None:
            notes = provenance.notes(data)
        model = _architecture(cfg, data.image_shape)
        fn, theta = _functional(model, cfg, gen, dt, dev)
        train = TaskSampler(data.train, cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed, dtype=dt)
        test = TaskSampler(
            data.test, cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed, eval_seed=cfg.seed + 1, dtype=dt
        )
    # meta-parameters the algorithm learns beyond the model's (Meta-SGD's step sizes)
    theta = {**theta, **cfg.algorithm().meta_parameters(theta)}
    if cfg.task_pool:
        train = TaskPool(train, cfg.task_pool)
    loss, classification = _loss(cfg)
    batched = batched_model(model) if cfg.batched else None
    if cfg.compile != "none":
        base = batched if batched is not None else BatchedModel.from_function(fn, vectorize=cfg.vectorize)
        batched = base.compiled(None if cfg.compile == "default" else cfg.compile)
    return Experiment(
        config=cfg,
        device=dev,
        dtype=dt,
        model=model,
        model_fn=fn,
        theta=theta,
        batched=batched,
        loss=loss,
        classification=classification,
        train_sampler=train,
        test_sampler=test,
        data=data,
        algorithm=cfg.algorithm(),
        eval_algorithm=cfg.algorithm(evaluation=True),
        provenance=_recorded(provenance, data),
        notes=tuple(notes),
    )


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
#: The fields that only some algorithms read (`AlgorithmEntry.flags`).
_ALGORITHM_FIELDS = frozenset(f for e in ALGORITHMS.values() for f in e.flags)


def load_run(
    checkpoint_path: str | os.PathLike[str], device: str | torch.device = "cpu", **overrides: Any
) -> Run:
    """Read a checkpoint written by `train` into a `Run`: model function, theta, algorithm and lambda.

    Needs no data, except for an image-folder run whose checkpoint lacks the optional
    ``image_shape`` (its images are then loaded to learn their shape).

    Args:
        checkpoint_path: the run's ``checkpoint.pt``.
        device: where the parameters go (also recorded as the configuration's ``device``).
        **overrides: `TrainConfig` fields replacing the saved ones, e.g. ``eval_inner_steps=20`` (the
            adaptation of ``run.algorithm``), ``eval_batch``, ``data_root``.

    Returns:
        `Run` with ``params`` the checkpoint's theta, ``algorithm`` equal to
        ``config.algorithm(evaluation=True)``, ``lam`` a `bilevel.metalearn.proximal.ProximalWeight`:
        `FixedLam` of the configuration's ``eval_lam`` where set, else the learned lambda
        (`LearnedScalar` or `LearnedPerTensor`), else `FixedLam` of the algorithm's own; ``config``
        the saved configuration with the overrides, and ``step``.

    Raises:
        FileNotFoundError: no file at ``checkpoint_path``.
        CheckpointError: the file is not a readable checkpoint of `train` (`load_checkpoint`), or
            its parameters do not fit the model of its configuration.
        TypeError: an override is not a `TrainConfig` field.
        ConfigError: an override has a value no run can use, or is a setting the run's algorithm
            does not read (`bilevel.metalearn.registry.readers`; e.g. ``eval_lam`` for maml).
    """
    unknown = sorted(set(overrides) - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"load_run: {unknown} are not TrainConfig fields")
    ck = load_checkpoint(checkpoint_path, device)
    trained = saved_config(ck, checkpoint_path)
    for name, value in overrides.items():
        # the registry's rule, as for the command line's flags: a setting the algorithm never reads
        # would be applied to an adaptation that is not the algorithm's (a proximal term in MAML's)
        if name in _ALGORITHM_FIELDS and trained.algo not in readers(name):
            raise ConfigError(
                name, value, f"{trained.algo} does not read it (it applies to {', '.join(readers(name))})"
            )
    cfg = saved_config(ck, checkpoint_path, **overrides, device=str(device))
    shape = ck.get("image_shape")
    if shape is None and cfg.dataset == "folder":
        from ..data.folder import load_image_folder

        shape = load_image_folder(cfg.data_root, seed=cfg.seed).image_shape
    with torch.random.fork_rng(devices=[]):  # building the module draws from the global generator
        model = _architecture(cfg, None if shape is None else (int(shape[0]), int(shape[1]), int(shape[2])))
    theta: dict[str, torch.Tensor] = ck["theta"]
    algorithm = cfg.algorithm(evaluation=True)
    # the model's parameters and those the algorithm learns beyond them (Meta-SGD's step sizes)
    model_params = {n: p.detach() for n, p in model.named_parameters()}
    wanted = {**model_params, **algorithm.meta_parameters(model_params)}
    diff = shape_mismatch(wanted, theta)
    if diff:
        raise CheckpointError(
            f"load_run({str(checkpoint_path)!r}): the checkpoint's parameters do not fit the "
            f"{cfg.dataset} model of its configuration ({cfg.ways}-way); they differ at {diff[:3]}"
        )
    # the saved lambda, or the evaluation algorithm's own where it is not learned
    lam = lam_from_config(cfg.learn_lam, cfg.lam, list(theta), leaves=ck["log_lam"]).resolve(algorithm.lam)
    loss, classification = _loss(cfg)
    return Run(
        model_fn=make_functional(model)[0],
        params={n: theta[n] for n in wanted},
        algorithm=algorithm,
        loss=loss,
        classification=classification,
        lam=cfg.evaluation_lam(lam),
        batched=batched_model(model) if cfg.batched else None,
        config=cfg,
        step=int(ck["step"]),
    )
