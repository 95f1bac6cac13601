"""Meta-learning with implicit gradients (iMAML), MAML, first-order MAML, Reptile, ANIL and Meta-SGD.

Command line: ``python -m bilevel.metalearn {train,eval,report} --help``.  With your own module and
optimizer (`learner`)::

    learner = IMAML(model, lam=2.0, inner=GradientDescent(lr=0.05, max_iter=10, tol=0.0), cg_iters=5)
    # GradientDescent from bilevel.solvers: any of its solvers is an inner solver
    optimizer.zero_grad(); loss = learner.step(meta_batch); optimizer.step()   # fills p.grad
    adapted = learner.adapt(tasks); predictions = adapted(tasks.query_x)

The package's own training loop and its run seam::

    from bilevel.metalearn import TrainConfig, build_experiment, evaluate_tasks, load_run, train

    exp = build_experiment(cfg)        # a run's data, samplers, model, initial theta and algorithms
    metrics = train(cfg)               # meta-train, evaluate, write OUT/checkpoint.pt
    run = load_run("OUT/checkpoint.pt")            # model function, theta, algorithm, lambda
    res = evaluate_tasks(run, tasks)   # adapt to your tasks: res.predictions, res.query_acc

The package in layers:

- algorithms and models (this folder): `algorithms` (`meta_gradient`, `adapt`), `registry` (the
  algorithm names, what each reads, `make_algorithm`), `gradients` (`MetaAlgorithm` and its
  meta-gradients `Implicit`, `Unrolled`, `FirstOrder`, `ReptileStep`, `ReleasedCG`), `metabatch`
  (the B inner problems of a meta-batch), `proximal` (the proximal weight lambda as a value),
  `learner` (`IMAML`, `MAML`, `FOMAML`, `Reptile`, `ANIL`, `MetaSGD` on any module), `heads`
  (ANIL's body and head split), `evaluation` (`Run`,
  `evaluate_tasks`), `models` (the networks, `init_params`, `make_functional`), `batched`
  (`BatchedModel`: B tasks' models in one call), `tasks` (`Task`);
- `data`: sources, splits, the image cache, the loaders (`load_omniglot`, `load_miniimagenet`,
  `load_image_folder`), the task samplers and the prefetcher;
- `training`: `TrainConfig` and the presets, `build_experiment` / `load_run`, the loop (`train`),
  checkpoints, the distributed seam, the console, reports and the command line.
"""

from .. import CheckpointError as CheckpointError
from .algorithms import FirstOrder as FirstOrder
from .algorithms import HeadOnly as HeadOnly
from .algorithms import Implicit as Implicit
from .algorithms import LearnedSteps as LearnedSteps
from .algorithms import MetaAlgorithm as MetaAlgorithm
from .algorithms import MetaStats as MetaStats
from .algorithms import ReleasedCG as ReleasedCG
from .algorithms import ReptileStep as ReptileStep
from .algorithms import Unrolled as Unrolled
from .algorithms import adapt as adapt
from .algorithms import evaluate_batch as evaluate_batch
from .algorithms import make_algorithm as make_algorithm
from .algorithms import meta_gradient as meta_gradient
from .algorithms import predict_batch as predict_batch
from .batched import BatchedModel as BatchedModel
from .batched import batched_model as batched_model
from .data.datasets import DatasetError as DatasetError
from .data.datasets import DatasetFormatError as DatasetFormatError
from .data.datasets import DatasetNotFoundError as DatasetNotFoundError
from .data.datasets import FewShotData as FewShotData
from .data.folder import load_image_folder as load_image_folder
from .data.miniimagenet import load_miniimagenet as load_miniimagenet
from .data.omniglot import load_omniglot as load_omniglot
from .data.prefetch import Prefetcher as Prefetcher
from .data.samplers import SinusoidTasks as SinusoidTasks
from .data.samplers import TaskPool as TaskPool
from .data.samplers import TaskSampler as TaskSampler
from .data.splits import ClassSplit as ClassSplit
from .evaluation import EvalResult as EvalResult
from .evaluation import Run as Run
from .evaluation import evaluate as evaluate
from .evaluation import evaluate_fixed as evaluate_fixed
from .evaluation import evaluate_tasks as evaluate_tasks
from .learner import ANIL as ANIL
from .learner import FOMAML as FOMAML
from .learner import IMAML as IMAML
from .learner import MAML as MAML
from .learner import AdaptedModel as AdaptedModel
from .learner import MetaLearner as MetaLearner
from .learner import MetaSGD as MetaSGD
from .learner import Reptile as Reptile
from .models import default_model as default_model
from .models import init_params as init_params
from .models import make_functional as make_functional
from .models import mse as mse
from .proximal import FixedLam as FixedLam
from .proximal import LearnedPerTensor as LearnedPerTensor
from .proximal import LearnedScalar as LearnedScalar
from .proximal import ProximalWeight as ProximalWeight
from .proximal import lam_from_config as lam_from_config
from .registry import ALGORITHMS as ALGORITHMS
from .registry import AlgorithmEntry as AlgorithmEntry
from .tasks import Task as Task
from .training.checkpoint import load_checkpoint as load_checkpoint
from .training.config import PRESETS as PRESETS
from .training.config import ConfigError as ConfigError
from .training.config import Preset as Preset
from .training.config import TrainConfig as TrainConfig
from .training.experiment import Experiment as Experiment
from .training.experiment import build_experiment as build_experiment
from .training.experiment import load_run as load_run
from .training.train import (
    train as train,  # the function; the module stays importable as bilevel.metalearn.training.train
)

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "IMAML",
    "MAML",
    "PRESETS",
    "AdaptedModel",
    "AlgorithmEntry",
    "BatchedModel",
    "CheckpointError",
    "ClassSplit",
    "ConfigError",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "EvalResult",
    "Experiment",
    "FewShotData",
    "FirstOrder",
    "FixedLam",
    "HeadOnly",
    "Implicit",
    "LearnedPerTensor",
    "LearnedScalar",
    "LearnedSteps",
    "MetaAlgorithm",
    "MetaLearner",
    "MetaSGD",
    "MetaStats",
    "Prefetcher",
    "Preset",
    "ProximalWeight",
    "ReleasedCG",
    "Reptile",
    "ReptileStep",
    "Run",
    "SinusoidTasks",
    "Task",
    "TaskPool",
    "TaskSampler",
    "TrainConfig",
    "Unrolled",
    "adapt",
    "batched_model",
    "build_experiment",
    "default_model",
    "evaluate",
    "evaluate_batch",
    "evaluate_fixed",
    "evaluate_tasks",
    "init_params",
    "lam_from_config",
    "load_checkpoint",
    "load_image_folder",
    "load_miniimagenet",
    "load_omniglot",
    "load_run",
    "make_algorithm",
    "make_functional",
    "meta_gradient",
    "mse",
    "predict_batch",
    "train",
]
