"""Meta-learning with implicit gradients (iMAML), MAML, first-order MAML and Reptile.

Command line: ``python -m bilevel.metalearn {train,eval} --help``.  Library use::

    from bilevel.metalearn import TrainConfig, train, make_algorithm, meta_gradient
"""

from .algorithms import FirstOrder as FirstOrder
from .algorithms import Implicit as Implicit
from .algorithms import InnerGD as InnerGD
from .algorithms import InnerNewtonCG as InnerNewtonCG
from .algorithms import MetaAlgorithm as MetaAlgorithm
from .algorithms import MetaStats as MetaStats
from .algorithms import ReptileStep as ReptileStep
from .algorithms import Unrolled as Unrolled
from .algorithms import adapt as adapt
from .algorithms import evaluate_batch as evaluate_batch
from .algorithms import make_algorithm as make_algorithm
from .algorithms import meta_gradient as meta_gradient
from .datasets import ClassSplit as ClassSplit
from .datasets import DatasetError as DatasetError
from .datasets import DatasetFormatError as DatasetFormatError
from .datasets import DatasetNotFoundError as DatasetNotFoundError
from .datasets import FewShotData as FewShotData
from .folder import load_image_folder as load_image_folder
from .miniimagenet import load_miniimagenet as load_miniimagenet
from .models import BatchedModel as BatchedModel
from .models import batched_model as batched_model
from .models import default_model as default_model
from .models import init_params as init_params
from .models import make_functional as make_functional
from .models import mse as mse
from .omniglot import load_omniglot as load_omniglot
from .tasks import SinusoidTasks as SinusoidTasks
from .tasks import Task as Task
from .tasks import TaskSampler as TaskSampler
from .train import PRESETS as PRESETS
from .train import TrainConfig as TrainConfig
from .train import evaluate as evaluate
from .train import load_checkpoint as load_checkpoint
from .train import train as train

__all__ = [
    "PRESETS",
    "BatchedModel",
    "ClassSplit",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FewShotData",
    "FirstOrder",
    "Implicit",
    "InnerGD",
    "InnerNewtonCG",
    "MetaAlgorithm",
    "MetaStats",
    "ReptileStep",
    "SinusoidTasks",
    "Task",
    "TaskSampler",
    "TrainConfig",
    "Unrolled",
    "adapt",
    "batched_model",
    "default_model",
    "evaluate",
    "evaluate_batch",
    "init_params",
    "load_checkpoint",
    "load_image_folder",
    "load_miniimagenet",
    "load_omniglot",
    "make_algorithm",
    "make_functional",
    "meta_gradient",
    "mse",
    "train",
]
