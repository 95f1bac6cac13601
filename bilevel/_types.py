"""Type aliases and protocols shared by the whole package."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, Union

import torch

if TYPE_CHECKING:
    from ._results import LinearSolveResult, SolverResult

__all__ = [
    "HVPFn",
    "LinearSolver",
    "Matvec",
    "Objective",
    "RootFn",
    "Solver",
    "TensorTree",
]

#: A Tensor, a tuple of Tensors or a dict str -> Tensor (the structures every entry point accepts;
#: see `bilevel.tree`).
TensorTree = Union[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]

#: G(phi, theta) -> scalar Tensor.  ``Callable[..., Tensor]`` so that user functions typed
#: ``(phi: Tensor, theta: Tensor)`` type-check (parameters are contravariant).
Objective = Callable[..., torch.Tensor]

#: F(x, theta) -> tree like x: an optimality condition F(x, theta) = 0.
RootFn = Callable[..., TensorTree]

#: v -> A v on flat 1-D tensors.
Matvec = Callable[[torch.Tensor], torch.Tensor]

#: hvp(phi, theta, v) -> d2G/dphi2 v, v and the result trees like phi.
HVPFn = Callable[[TensorTree, TensorTree, TensorTree], TensorTree]


class Solver(Protocol):
    """An inner solver: ``solver(objective, init, theta) -> SolverResult | TensorTree``.

    Called without autograd.  It may leave PyTorch entirely (NumPy, SciPy,
    cvxpy, another process) as long as the answer comes back with the
    structure, shapes, dtypes and devices of ``init``.
    """

    def __call__(
        self, objective: Objective, init: TensorTree, theta: TensorTree
    ) -> SolverResult | TensorTree: ...


class LinearSolver(Protocol):
    """``linear_solver(matvec, b, x0=None) -> LinearSolveResult`` on flat 1-D tensors."""

    def __call__(
        self, matvec: Matvec, b: torch.Tensor, x0: torch.Tensor | None = None
    ) -> LinearSolveResult: ...
