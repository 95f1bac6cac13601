"""Immutable results returned by inner solvers and linear solves."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import torch

from ._status import LINEAR_SEVERITY, LinearStatus, SolverStatus
from ._types import TensorTree

__all__ = ["HostValues", "LinearSolveResult", "SolverResult"]

_T = TypeVar("_T")
_R = TypeVar("_R")
_NO_DEFAULT: Any = object()
# Linear-solve statuses that did what was asked: a tolerance met, or a fixed budget run.
_DONE = (LinearStatus.CONVERGED, LinearStatus.BUDGET)


class HostValues:
    """Host values that a result computes from device tensors when one is first read.

    A solver on an accelerator ends with its per-problem outcome on the device (status codes,
    iteration counts, norms).  Reading it waits for every queued kernel, so a result holds a
    `HostValues` for those fields instead, and reads them all at once, the first time any of them
    is accessed (each result field given as the same `HostValues` then keeps its value).

    Args:
        read: ``read() -> {field name: host value}`` for every field given this object; called
            at most once.
    """

    __slots__ = ("_read", "_values")

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read: Callable[[], dict[str, Any]] | None = read
        self._values: dict[str, Any] | None = None

    def __getitem__(self, name: str) -> Any:
        if self._values is None:
            assert self._read is not None
            self._values, self._read = self._read(), None
        return self._values[name]

    def __repr__(self) -> str:
        return "HostValues(read)" if self._values is None else f"HostValues({self._values})"


class _Lazy(Generic[_T]):
    """A result field that may be given as `HostValues`: those are read on first access and kept.

    A data descriptor used as the dataclass field's default (``status: SolverStatus =
    _Lazy()``): the generated ``__init__`` stores through ``__set__``, attribute access comes
    through ``__get__``.
    """

    def __init__(self, default: Any = _NO_DEFAULT) -> None:
        self._default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self._name, self._slot = name, f"_{name}_held"

    def __get__(self, obj: object | None, owner: type | None = None) -> _T:
        if obj is None:  # the dataclass asks for the field's default
            if self._default is _NO_DEFAULT:
                raise AttributeError(self._name)
            return self._default
        value = obj.__dict__[self._slot]
        if isinstance(value, HostValues):
            value = value[self._name]
            obj.__dict__[self._slot] = value
        return value

    def __set__(self, obj: object, value: Any) -> None:
        obj.__dict__[self._slot] = value

    def held(self, obj: object) -> Any:
        """The stored value, `HostValues` included (nothing is read)."""
        return obj.__dict__[self._slot]


def _held(result: Any, name: str) -> Any:
    """Field ``name`` of ``result`` as stored: unread `HostValues` stay unread."""
    lazy = type(result).__dict__.get(name)
    return lazy.held(result) if isinstance(lazy, _Lazy) else getattr(result, name)


def _replace(result: _R, changes: dict[str, Any]) -> _R:
    fields = dataclasses.fields(result)  # type: ignore[arg-type]
    values = {f.name: changes[f.name] if f.name in changes else _held(result, f.name) for f in fields}
    return type(result)(**values)


@dataclasses.dataclass(frozen=True)
class SolverResult:
    """What an inner solver returns.

    Attributes:
        x: the solution, with the structure, shapes, dtypes and devices of ``init``.
        status: why the solver stopped.
        n_iter: iterations taken (the solver's own unit: GD steps, Newton steps, ...).
        grad_norm: Euclidean norm of grad_phi G at ``x`` as measured by the solver,
            or NaN where the solver does not report it.
        n_fev: objective evaluations.
        n_gev: gradient evaluations.
        n_hvp: Hessian-vector products.
        fun: objective value at ``x`` (NaN if unknown).
        info: solver-specific extras (a SciPy message, the HVP backend, ...).
            Read-only mapping.
        problem_status: batched mode only (``None`` otherwise): each problem's status,
            a tuple of B `SolverStatus`; ``status`` is then the worst of them.
        problem_n_iter: batched mode: iterations per problem, int64 (B,); ``n_iter`` is
            their maximum.
        problem_grad_norm: batched mode: ||grad_phi G_b|| per problem, float64 (B,);
            ``grad_norm`` is the norm of the whole gradient.
        problem_fun: batched mode: objective value per problem, float64 (B,) (NaN where
            the objective returned only the sum); ``fun`` is their sum.
        message: the solver's own account of why it stopped and what to do, in terms of
            its settings ("NewtonCG stopped at newton_iters=3 with ||grad|| = ...: raise
            newton_iters ..."), or the cause of a failure (an external program that could
            not start); ``""`` where the generic ``status.message`` says it all.  Read
            `reason`, which falls back to ``status.message``.

    ``status``, ``n_iter``, ``grad_norm``, ``fun``, the ``problem_*`` fields and ``message`` may be
    given as `HostValues`: the torch solvers do, so that nothing waits for an accelerator until one of them
    is read (the first read reads them all).  Use `replace`, not ``dataclasses.replace``, to copy a
    result with changes without reading them.
    """

    x: TensorTree
    status: _Lazy[SolverStatus] = _Lazy()
    n_iter: _Lazy[int] = _Lazy(0)
    grad_norm: _Lazy[float] = _Lazy(float("nan"))
    n_fev: int = 0
    n_gev: int = 0
    n_hvp: int = 0
    fun: _Lazy[float] = _Lazy(float("nan"))
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    problem_status: _Lazy[tuple[SolverStatus, ...] | None] = _Lazy(None)
    problem_n_iter: _Lazy[torch.Tensor | None] = _Lazy(None)
    problem_grad_norm: _Lazy[torch.Tensor | None] = _Lazy(None)
    problem_fun: _Lazy[torch.Tensor | None] = _Lazy(None)
    message: _Lazy[str] = _Lazy("")

    def __post_init__(self) -> None:
        status = _held(self, "status")
        if not isinstance(status, (SolverStatus, HostValues)):
            raise TypeError(f"SolverResult(status={status!r}): expected a SolverStatus")
        message = _held(self, "message")
        if not isinstance(message, (str, HostValues)):
            raise TypeError(f"SolverResult(message={message!r}): expected a str")

    @property
    def converged(self) -> bool:
        return self.status is SolverStatus.CONVERGED

    def replace(self, **changes: Any) -> SolverResult:
        """A copy with ``changes`` (``dataclasses.replace``) that reads no `HostValues`."""
        return _replace(self, changes)

    def facts(self) -> SolverResult:
        """This result without its answer (``x=None``): statuses, counts, norms and message.

        What a message composed late or a check queued to the end of a
        `bilevel.deferred_checks` block keeps, so that neither keeps the answer alive, nor the
        graph of a differentiable solver's path.  Reads no `HostValues`."""
        return _replace(self, {"x": None})

    @property
    def reason(self) -> str:
        """Why the solver stopped and what to do: `message` where the solver gave one, else
        ``status.message``.  What error messages and warnings about this result should quote."""
        return self.message or self.status.message

    def problems_with(self, *statuses: SolverStatus) -> list[int]:
        """Indices of the problems whose status is one of ``statuses`` (batched mode; one problem,
        index 0, otherwise)."""
        per = self.problem_status if self.problem_status is not None else (self.status,)
        return [i for i, s in enumerate(per) if s in statuses]

    @property
    def problem_converged(self) -> torch.Tensor | None:
        """Batched mode: bool (B,), True where that problem converged; ``None`` otherwise."""
        if self.problem_status is None:
            return None
        return torch.tensor([s is SolverStatus.CONVERGED for s in self.problem_status])

    def __repr__(self) -> str:
        batch = "" if self.problem_status is None else f", B={len(self.problem_status)}"
        return (
            f"SolverResult(status={self.status.name}, n_iter={self.n_iter}, "
            f"grad_norm={self.grad_norm:.3e}, fun={self.fun:.6g}{batch})"
        )

    @property
    def gradient_equivalents(self) -> float:
        """Work in units of one gradient: gradients + objective values/2 + HVPs*2.

        The weights follow the usual cost model (Griewank): f costs about half a
        gradient and an HVP about two.
        """
        return self.n_gev + 0.5 * self.n_fev + 2.0 * self.n_hvp


@dataclasses.dataclass(frozen=True)
class LinearSolveResult:
    """What a linear solve returns.

    Attributes:
        x: the solution, a 1-D tensor like the right-hand side ``b``.
        status: why the solve stopped.
        n_iter: iterations taken.
        n_matvec: matrix-vector products (HVPs) spent, the final residual check included.
        residual_norm: ||A x - b|| at the returned ``x`` (in batched mode over all problems).
        b_norm: ||b||, so the relative residual is ``residual_norm / b_norm``.
        problem_status: batched mode only (``b`` of shape (B, n); ``None`` otherwise): each
            problem's status, a tuple of B `LinearStatus`; ``status`` is the worst of them.
        problem_n_iter: batched mode: iterations per problem, int64 (B,) on ``x``'s device (each
            problem stops on its own; ``n_iter`` is the largest).
        problem_residual_norm: batched mode: ||A_b x_b - b_b|| per problem, shape (B,).
        problem_b_norm: batched mode: ||b_b|| per problem, shape (B,).
        problem_curvature: CG only: p'Ap of the direction on which a problem met
            non-positive curvature, NaN for the others; shape (B,) in batched mode, (1,)
            otherwise; ``None`` for other solvers.
        problem_decrease: CG with a trust-region radius only: the decrease of CG's quadratic
            model, q(0) - q(x) with q(x) = x'Ax / 2 - b'x, at the returned ``x``, shape (B,),
            tracked by the recursion (no extra matvec): a trust-region method's predicted
            reduction; ``None`` otherwise.
        problem_codes: batched mode: each problem's status as its index in `CODES`, int8 (B,) on
            ``x``'s device: what ``problem_status`` is read from, and `status_mask` uses.

    ``status``, ``residual_norm``, ``b_norm`` and ``problem_status`` may be given as one
    `HostValues` (the batched solves do: nothing waits for an accelerator until one of
    them is read).
    """

    x: torch.Tensor
    status: _Lazy[LinearStatus] = _Lazy()  # no default (the descriptor says so at run time)
    n_iter: int  # type: ignore[misc]  # mypy takes the descriptor above for a default
    n_matvec: int  # type: ignore[misc]
    residual_norm: _Lazy[float] = _Lazy()
    b_norm: _Lazy[float] = _Lazy()
    problem_status: _Lazy[tuple[LinearStatus, ...] | None] = _Lazy(None)
    problem_n_iter: torch.Tensor | None = None
    problem_residual_norm: torch.Tensor | None = None
    problem_b_norm: torch.Tensor | None = None
    problem_curvature: torch.Tensor | None = None
    problem_decrease: torch.Tensor | None = None
    problem_codes: torch.Tensor | None = None

    #: ``problem_codes[b]`` is the index of problem b's status here (from the mildest to the worst).
    CODES: ClassVar[tuple[LinearStatus, ...]] = LINEAR_SEVERITY

    @property
    def converged(self) -> bool:
        return self.status is LinearStatus.CONVERGED

    def replace(self, **changes: Any) -> LinearSolveResult:
        """A copy with ``changes`` (``dataclasses.replace``) that reads no `HostValues`."""
        return _replace(self, changes)

    def facts(self) -> LinearSolveResult:
        """This result without its solution (``x`` empty, shape (0,), on ``x``'s dtype and
        device): statuses, counts and norms, for a check queued to the end of a
        `bilevel.deferred_checks` block.  Reads no `HostValues`."""
        return _replace(self, {"x": self.x.new_empty(0)})

    @property
    def relative_residual(self) -> float:
        return self.residual_norm / self.b_norm if self.b_norm > 0 else self.residual_norm

    def status_mask(self, *statuses: LinearStatus) -> torch.Tensor:
        """Bool mask on ``x``'s device: the problems whose status is one of ``statuses``, shape (B,)
        in batched mode, (1,) otherwise (from ``problem_codes`` on the device where the solve gave
        them: nothing is read on the host)."""
        if self.problem_codes is not None:
            mask = torch.zeros(self.problem_codes.shape, dtype=torch.bool, device=self.problem_codes.device)
            for s in statuses:
                mask |= self.problem_codes == self.CODES.index(s)
            return mask.to(self.x.device)
        per = self.problem_status if self.problem_status is not None else (self.status,)
        return torch.tensor([s in statuses for s in per], dtype=torch.bool, device=self.x.device)

    def problems_with(self, *statuses: LinearStatus) -> list[int]:
        """Indices of the problems whose status is one of ``statuses`` (batched mode; one problem,
        index 0, otherwise)."""
        per = self.problem_status if self.problem_status is not None else (self.status,)
        return [i for i, s in enumerate(per) if s in statuses]

    def failed_problems(self) -> list[int]:
        """Indices of the problems that failed: neither converged nor ran the fixed budget they were
        given (``BUDGET``: rtol = atol = 0, a number of iterations asked for; not a failure).  Batched
        mode; ``[0]`` or ``[]`` otherwise."""
        return [i for i, s in enumerate(self.problem_status or (self.status,)) if s not in _DONE]

    def __repr__(self) -> str:
        batch = "" if self.problem_status is None else f", B={len(self.problem_status)}"
        return (
            f"LinearSolveResult(status={self.status.name}, n_iter={self.n_iter}, n_matvec={self.n_matvec}, "
            f"residual_norm={self.residual_norm:.3e}, b_norm={self.b_norm:.3e}{batch})"
        )
