"""Inner solvers: callables ``solver(objective, init, theta) -> SolverResult``.

Every solver is a frozen dataclass (its configuration, validated at construction)
and returns a `bilevel.SolverResult` with the solution (structure, shapes, dtypes
and devices of ``init``), the status, the iterations, the final gradient norm and
the objective, gradient and Hessian-vector-product counts.  The solvers never
raise on non-convergence: they say so in ``status``, and ``reason`` says why in
terms of the solver's own settings (``newton_iters`` of `NewtonCG`, ``tol`` and the
rounding of f for `ScipyLBFGS`) or gives the cause of a failure (`Subprocess`).
A solver is an instance: ``ScipyLBFGS(objective, init, theta)`` (the class called
as a solver) is refused with a `TypeError` that says so.

=================================  ==========================================================
`GradientDescent`                  fixed step or `Armijo` backtracking; batched mode
`Nesterov`                         accelerated gradient (iMAML's Theorem 2); batched mode
`ProjectedGradient`                gradient steps projected onto a convex set; batched mode
`ProximalGradient`                 ISTA / FISTA with restart for f + g, g through its prox; batched
`NewtonCG`                         Hessian-free Newton with a line search (iMAML-HF); batched
`TrustRegionNewtonCG`              Hessian-free Newton in a trust region (Steihaug CG); batched
`ScipyLBFGS`                       SciPy's L-BFGS-B in float64, torch gradients, any device
`Cvxpy`                            a cvxpy problem (constrained problems, with fixed_point)
`SklearnRidge`,                    scikit-learn estimators, with the torch objectives they
`SklearnLogisticRegression`        minimize (`sklearn_ridge_objective`, ...)
`Subprocess`                       an external program exchanging ``.npz`` files
=================================  ==========================================================

Batched mode (``batched=True``): a meta-batch of B independent problems, every leaf
of ``init`` with the leading dimension B and the objective returning the B losses (or
a `BatchedObjective`, whose call returns their sum for the implicit layer).  Each
problem stops on its own criterion; per-problem diagnostics are the ``problem_*`` fields of
the `SolverResult`.
"""

from ._common import BatchedObjective as BatchedObjective
from ._cvxpy import Cvxpy as Cvxpy
from ._gradient_descent import GradientDescent as GradientDescent
from ._line_search import Armijo as Armijo
from ._line_search import StepHalving as StepHalving
from ._nesterov import Nesterov as Nesterov
from ._newton_cg import NewtonCG as NewtonCG
from ._proximal_gradient import ProjectedGradient as ProjectedGradient
from ._proximal_gradient import ProximalGradient as ProximalGradient
from ._scipy import ScipyLBFGS as ScipyLBFGS
from ._sklearn import SklearnLogisticRegression as SklearnLogisticRegression
from ._sklearn import SklearnRidge as SklearnRidge
from ._sklearn import sklearn_logistic_objective as sklearn_logistic_objective
from ._sklearn import sklearn_ridge_objective as sklearn_ridge_objective
from ._subprocess import Subprocess as Subprocess
from ._trust_region import TrustRegionNewtonCG as TrustRegionNewtonCG

__all__ = [
    "Armijo",
    "BatchedObjective",
    "Cvxpy",
    "GradientDescent",
    "Nesterov",
    "NewtonCG",
    "ProjectedGradient",
    "ProximalGradient",
    "ScipyLBFGS",
    "SklearnLogisticRegression",
    "SklearnRidge",
    "StepHalving",
    "Subprocess",
    "TrustRegionNewtonCG",
    "sklearn_logistic_objective",
    "sklearn_ridge_objective",
]
