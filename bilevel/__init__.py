"""bilevel: solver-agnostic bilevel optimization and implicit differentiation on PyTorch.

    import bilevel as bl
    phi = bl.implicit_argmin(objective, init, theta, solver=bl.solvers.ScipyLBFGS())

See `implicit_argmin` for the contract, and the README for an overview.
"""

from . import conditions as conditions
from . import hyperopt as hyperopt
from . import layers as layers
from . import projections as projections
from . import prox as prox
from . import solvers as solvers
from . import theory as theory
from . import tree as tree
from ._errors import BilevelError as BilevelError
from ._errors import BilevelWarning as BilevelWarning
from ._errors import CheckpointError as CheckpointError
from ._errors import ConvergenceError as ConvergenceError
from ._errors import LinearSolveError as LinearSolveError
from ._errors import NegativeCurvatureError as NegativeCurvatureError
from ._errors import NonFiniteError as NonFiniteError
from ._errors import OptimalityError as OptimalityError
from ._errors import StructureError as StructureError
from ._hvp import Damped as Damped
from ._hvp import DenseHessian as DenseHessian
from ._hvp import FiniteDifferenceHVP as FiniteDifferenceHVP
from ._hvp import ForwardOverReverse as ForwardOverReverse
from ._hvp import HVPOracle as HVPOracle
from ._hvp import ReverseOverReverse as ReverseOverReverse
from ._implicit import ImplicitArgmin as ImplicitArgmin
from ._implicit import ImplicitInfo as ImplicitInfo
from ._implicit import fixed_point as fixed_point
from ._implicit import implicit_argmin as implicit_argmin
from ._implicit import implicit_root as implicit_root
from ._linear_solve import CG as CG
from ._linear_solve import GMRES as GMRES
from ._linear_solve import MINRES as MINRES
from ._linear_solve import BiCGStab as BiCGStab
from ._linear_solve import DenseSolve as DenseSolve
from ._linear_solve import Neumann as Neumann
from ._linear_solve import Nystrom as Nystrom
from ._nystrom import NystromApproximation as NystromApproximation
from ._nystrom import NystromPreconditioner as NystromPreconditioner
from ._nystrom import gaussian_test_matrix as gaussian_test_matrix
from ._nystrom import nystrom_approximation as nystrom_approximation
from ._policy import ImplicitPolicy as ImplicitPolicy
from ._preconditioners import DiagonalPreconditioner as DiagonalPreconditioner
from ._preconditioners import HutchinsonDiagonal as HutchinsonDiagonal
from ._preconditioners import PreconditionerRecipe as PreconditionerRecipe
from ._preconditioners import hutchinson_diagonal as hutchinson_diagonal
from ._results import HostValues as HostValues
from ._results import LinearSolveResult as LinearSolveResult
from ._results import SolverResult as SolverResult
from ._status import LinearStatus as LinearStatus
from ._status import SolverStatus as SolverStatus
from ._sync import defer_check as defer_check
from ._sync import deferred_checks as deferred_checks
from ._types import HVPFn as HVPFn
from ._types import LinearSolver as LinearSolver
from ._types import Matvec as Matvec
from ._types import Objective as Objective
from ._types import RootFn as RootFn
from ._types import Solver as Solver
from ._types import TensorTree as TensorTree
from .spectrum import lanczos_extremes as lanczos_extremes

__version__ = "0.1.0"

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "BiCGStab",
    "BilevelError",
    "BilevelWarning",
    "CheckpointError",
    "ConvergenceError",
    "Damped",
    "DenseHessian",
    "DenseSolve",
    "DiagonalPreconditioner",
    "FiniteDifferenceHVP",
    "ForwardOverReverse",
    "HVPFn",
    "HVPOracle",
    "HostValues",
    "HutchinsonDiagonal",
    "ImplicitArgmin",
    "ImplicitInfo",
    "ImplicitPolicy",
    "LinearSolveError",
    "LinearSolveResult",
    "LinearSolver",
    "LinearStatus",
    "Matvec",
    "NegativeCurvatureError",
    "Neumann",
    "NonFiniteError",
    "Nystrom",
    "NystromApproximation",
    "NystromPreconditioner",
    "Objective",
    "OptimalityError",
    "PreconditionerRecipe",
    "ReverseOverReverse",
    "RootFn",
    "Solver",
    "SolverResult",
    "SolverStatus",
    "StructureError",
    "TensorTree",
    "conditions",
    "defer_check",
    "deferred_checks",
    "fixed_point",
    "gaussian_test_matrix",
    "hutchinson_diagonal",
    "hyperopt",
    "implicit_argmin",
    "implicit_root",
    "lanczos_extremes",
    "layers",
    "nystrom_approximation",
    "projections",
    "prox",
    "solvers",
    "theory",
    "tree",
]
