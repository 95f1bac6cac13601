"""scikit-learn estimators as inner solvers of hyperparameter problems, with their exact objectives.

An implicit gradient is the gradient of the argmin of *the objective given to the
implicit layer*; it is right for a scikit-learn estimator only if that objective is
the one the estimator minimizes, scaling of ``alpha`` and ``C`` included.  These
adapters state it and provide it in torch:

==============================  ===========================================================
`SklearnRidge`                  ``||y - X w - b||^2 + alpha ||w||^2`` (no 1/n, no 1/2;
                                the intercept b is not penalized), theta = alpha
`SklearnLogisticRegression`     ``C * sum_i log(1 + exp(-s_i (x_i'w + b))) + 1/2 ||w||^2``
                                with s_i = +1 for the larger class label and -1 for the other
                                (binary, L2 penalty, b not penalized), theta = C
==============================  ===========================================================

Use the adapter for both arguments so they agree::

    inner = SklearnRidge(X_train, y_train)
    w, b = bl.implicit_argmin(inner.objective, (w0, b0), alpha, solver=inner)

phi is the tuple ``(w, b)`` (or ``w`` without an intercept), or a dict read by name,
``{"w": w0, "b": b0}`` in any order (``{"w": w0}`` without an intercept); the answer has
the structure of ``init``.  theta is one one-entry tensor, bare or as the only leaf of a
tuple or dict.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import StructureError
from .._results import SolverResult
from .._status import SolverStatus
from .._types import Objective, TensorTree
from ..tree import all_finite, leaves
from ._common import lazy_import, measure, tree_from_arrays
from ._messages import check_setting

__all__ = [
    "SklearnLogisticRegression",
    "SklearnRidge",
    "sklearn_logistic_objective",
    "sklearn_ridge_objective",
]


def _as_float64(a: Any, name: str, who: str, ndim: int) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{who}: {name} must be {ndim}-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{who}: {name} contains NaN or infinity")
    return arr


def _check_data(X: Any, y: Any, who: str) -> tuple[np.ndarray, np.ndarray]:
    Xa = _as_float64(X, "X", who, 2)
    ya = _as_float64(y, "y", who, 1)
    if Xa.shape[0] != ya.shape[0]:
        raise ValueError(f"{who}: X has {Xa.shape[0]} rows but y has {ya.shape[0]} entries")
    return Xa, ya


def _signs(y: np.ndarray, who: str) -> np.ndarray:
    classes = np.unique(y)
    if classes.size != 2:
        raise ValueError(
            f"{who}: y must hold exactly two classes (binary), got {classes.size}: {classes[:5]}"
        )
    return np.where(y == classes[1], 1.0, -1.0)


def _scalar_theta(theta: TensorTree, who: str, name: str) -> torch.Tensor:
    ls = leaves(theta, name="theta")
    if len(ls) != 1 or ls[0].numel() != 1:
        raise StructureError(
            f"{who}: theta must be one tensor holding {name} (one entry); got shapes "
            f"{[tuple(t.shape) for t in ls]}"
        )
    return ls[0].reshape(())


def _phi_keys(fit_intercept: bool) -> tuple[str, ...]:
    return ("w", "b") if fit_intercept else ("w",)


def _check_phi_keys(phi: Mapping[str, Any], fit_intercept: bool, who: str, name: str = "phi") -> None:
    """A dict phi is read by name: exactly the keys "w" (and "b" with an intercept), in any order."""
    want = _phi_keys(fit_intercept)
    if set(phi.keys()) != set(want):
        missing = [k for k in want if k not in phi]
        extra = [k for k in phi if k not in want]
        raise StructureError(
            f"{who}(fit_intercept={fit_intercept}): {name} is a dict with keys {list(phi.keys())}; "
            f"expected the keys {list(want)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else "")
        )


def _split_phi(phi: TensorTree, fit_intercept: bool, who: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(phi, Mapping):
        _check_phi_keys(phi, fit_intercept, who)
        leaves(phi, name="phi")  # a TypeError naming a non-tensor entry
        if fit_intercept and phi["b"].numel() != 1:
            raise StructureError(f"{who}(fit_intercept=True): phi['b'] must have one entry")
        return phi["w"].reshape(-1), phi["b"].reshape(()) if fit_intercept else None
    ls = leaves(phi, name="phi")
    if fit_intercept:
        if len(ls) != 2 or ls[1].numel() != 1:
            raise StructureError(f"{who}(fit_intercept=True): phi must be (w, b) with a one-entry b")
        return ls[0].reshape(-1), ls[1].reshape(())
    if len(ls) != 1:
        raise StructureError(f"{who}(fit_intercept=False): phi must be the tensor w")
    return ls[0].reshape(-1), None


def sklearn_ridge_objective(X: Any, y: Any, fit_intercept: bool = True) -> Objective:
    """The objective scikit-learn's ``Ridge(alpha)`` minimizes, in torch.

    ``G(phi, alpha) = ||y - X w - b||^2 + alpha * ||w||^2`` with phi = (w, b) (or the
    dict ``{"w": w, "b": b}``), or phi = w (``{"w": w}``) and b = 0 when
    ``fit_intercept`` is False.  No 1/n and no 1/2 (scikit-learn's scaling); the
    intercept is not penalized.

    Args:
        X: design matrix, shape (n, d) (NumPy or torch).
        y: targets, shape (n,).
        fit_intercept: whether phi includes the intercept b.

    Returns:
        ``objective(phi, alpha) -> scalar`` with w of shape (d,), b with one entry and
        alpha a one-entry tensor; computed in w's dtype and on its device.
    """
    Xa, ya = _check_data(X, y, "sklearn_ridge_objective")
    Xt, yt = torch.from_numpy(Xa), torch.from_numpy(ya)

    def objective(phi: TensorTree, theta: TensorTree) -> torch.Tensor:
        w, b = _split_phi(phi, fit_intercept, "sklearn_ridge_objective")
        alpha = _scalar_theta(theta, "sklearn_ridge_objective", "alpha")
        Xd, yd = Xt.to(w.device, w.dtype), yt.to(w.device, w.dtype)
        r = yd - Xd @ w if b is None else yd - Xd @ w - b
        return (r * r).sum() + alpha * (w * w).sum()

    return objective


def sklearn_logistic_objective(X: Any, y: Any, fit_intercept: bool = True) -> Objective:
    """The objective scikit-learn's binary ``LogisticRegression(C)`` (L2) minimizes, in torch.

    ``G(phi, C) = C * sum_i log(1 + exp(-s_i (x_i'w + b))) + 1/2 ||w||^2``, with
    s_i = +1 where y_i is the larger of the two labels, -1 elsewhere; phi = (w, b) (or
    ``{"w": w, "b": b}``), or phi = w (``{"w": w}``) and b = 0 when ``fit_intercept`` is
    False.  The intercept is not penalized.

    Args:
        X: design matrix, shape (n, d).
        y: binary labels, shape (n,) (two distinct values).
        fit_intercept: whether phi includes the intercept b.

    Returns:
        ``objective(phi, C) -> scalar``, computed in w's dtype and on its device.
    """
    Xa, ya = _check_data(X, y, "sklearn_logistic_objective")
    Xt, st = torch.from_numpy(Xa), torch.from_numpy(_signs(ya, "sklearn_logistic_objective"))

    def objective(phi: TensorTree, theta: TensorTree) -> torch.Tensor:
        w, b = _split_phi(phi, fit_intercept, "sklearn_logistic_objective")
        C = _scalar_theta(theta, "sklearn_logistic_objective", "C")
        Xd, sd = Xt.to(w.device, w.dtype), st.to(w.device, w.dtype)
        z = Xd @ w if b is None else Xd @ w + b
        return C * F.softplus(-sd * z).sum() + 0.5 * (w * w).sum()

    return objective


def _fit(estimator: Any, X: np.ndarray, y: np.ndarray, who: str) -> tuple[SolverStatus, str]:
    exceptions = lazy_import("sklearn.exceptions", "sklearn", who)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", exceptions.ConvergenceWarning)
        estimator.fit(X, y)
    msgs = [str(w.message) for w in caught if issubclass(w.category, exceptions.ConvergenceWarning)]
    if msgs:
        return SolverStatus.MAX_ITER, msgs[0]
    return SolverStatus.CONVERGED, ""


def _finish(
    estimator: Any,
    status: SolverStatus,
    message: str,
    objective: Objective,
    init: TensorTree,
    theta: TensorTree,
    fit_intercept: bool,
    measure_grad: bool,
    who: str,
) -> SolverResult:
    named: dict[str, Any] = {"w": np.asarray(estimator.coef_, dtype=np.float64).reshape(-1)}
    if fit_intercept:
        named["b"] = np.asarray(estimator.intercept_, dtype=np.float64).reshape(-1)
    if isinstance(init, Mapping):
        # A dict phi is placed by name, in init's key order.
        _check_phi_keys(init, fit_intercept, who, "init")
        arrays: list[Any] = [named[k] for k in init]
    else:
        arrays = list(named.values())
    x = tree_from_arrays(arrays, init, who, "the fitted (coef_, intercept_)")
    n_iter_raw = getattr(estimator, "n_iter_", None)
    n_iter = int(np.max(n_iter_raw)) if n_iter_raw is not None else 0
    info: dict[str, Any] = {"estimator": repr(estimator)}
    if message:
        info["message"] = message
    if not bool(all_finite(x).all()):
        why = f"{who}: the fitted coefficients hold NaN or infinity: check the data and theta"
        return SolverResult(x=x, status=SolverStatus.NONFINITE, n_iter=n_iter, info=info, message=why)
    fun, gn, n_gev = measure(objective, x, theta, who) if measure_grad else (math.nan, math.nan, 0)
    why = (
        f"{who}: scikit-learn warned: {message}; raise max_iter or loosen tol in estimator_kwargs"
        if status is SolverStatus.MAX_ITER
        else ""
    )
    return SolverResult(
        x=x, status=status, n_iter=n_iter, grad_norm=gn, n_gev=n_gev, fun=fun, info=info, message=why
    )


def _check_kwargs(kwargs: Mapping[str, Any], reserved: tuple[str, ...], who: str) -> None:
    for key in reserved:
        if key in kwargs:
            raise ValueError(
                f"{who}(estimator_kwargs={{{key!r}: ...}}): {key} is set by the adapter (theta or "
                "fit_intercept); other penalties would change the objective"
            )


@dataclasses.dataclass(frozen=True, eq=False)
class SklearnRidge:
    """``sklearn.linear_model.Ridge(alpha=theta).fit(X, y)`` as an inner solver.

    Minimizes ``||y - X w - b||^2 + alpha ||w||^2`` (see `sklearn_ridge_objective`,
    available as ``self.objective``): theta is alpha (one entry), phi is ``(w, b)``
    or ``{"w": w, "b": b}`` (w of shape (d,), b one entry), or ``w`` (``{"w": w}``)
    when ``fit_intercept`` is False.

    Args:
        X: training inputs, shape (n, d).
        y: training targets, shape (n,).
        fit_intercept: fit and return the unpenalized intercept b.
        estimator_kwargs: more arguments of ``Ridge`` (e.g. ``solver``, ``tol``);
            not ``alpha`` or ``fit_intercept``.
        measure_grad: evaluate the gradient of the ``objective`` given to the call at
            the answer (one gradient, ``n_gev = 1``) and report its norm and value:
            a mismatch between objective and estimator shows up here.

    Call:
        ``solver(objective, init, theta) -> SolverResult``: ``CONVERGED`` unless
        scikit-learn warned about convergence (``MAX_ITER``, message in ``info``).

    Raises:
        ImportError: scikit-learn is not installed (``pip install bilevel[sklearn]``).
    """

    X: Any
    y: Any
    fit_intercept: bool = True
    estimator_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    measure_grad: bool = True
    _objective: Objective = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_setting("SklearnRidge", "X", self.X, allow_tensor=True)
        lazy_import("sklearn.linear_model", "sklearn", "SklearnRidge")
        X, y = _check_data(self.X, self.y, "SklearnRidge")
        _check_kwargs(self.estimator_kwargs, ("alpha", "fit_intercept"), "SklearnRidge")
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "estimator_kwargs", types.MappingProxyType(dict(self.estimator_kwargs)))
        object.__setattr__(self, "_objective", sklearn_ridge_objective(X, y, self.fit_intercept))

    @property
    def objective(self) -> Objective:
        """The torch objective this estimator minimizes: `sklearn_ridge_objective` of the data."""
        return self._objective

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        lm = lazy_import("sklearn.linear_model", "sklearn", "SklearnRidge")
        alpha = float(_scalar_theta(theta, "SklearnRidge", "alpha"))
        if not alpha >= 0:
            raise ValueError(f"SklearnRidge: alpha = {alpha} from theta must be >= 0")
        est = lm.Ridge(alpha=alpha, fit_intercept=self.fit_intercept, **self.estimator_kwargs)
        status, message = _fit(est, self.X, self.y, "SklearnRidge")
        return _finish(
            est,
            status,
            message,
            objective,
            init,
            theta,
            self.fit_intercept,
            self.measure_grad,
            "SklearnRidge",
        )


@dataclasses.dataclass(frozen=True, eq=False)
class SklearnLogisticRegression:
    """Binary ``sklearn.linear_model.LogisticRegression(C=theta)`` (L2 penalty) as an inner solver.

    Minimizes ``C * sum_i log(1 + exp(-s_i (x_i'w + b))) + 1/2 ||w||^2`` (see
    `sklearn_logistic_objective`, available as ``self.objective``): theta is C (one
    entry, > 0), phi is ``(w, b)`` or ``{"w": w, "b": b}``, or ``w`` (``{"w": w}``)
    when ``fit_intercept`` is False.

    The defaults ``tol=1e-10, max_iter=10000`` replace scikit-learn's (1e-4, 100):
    the implicit gradient is exact only at the argmin, so the inner solve must be
    accurate.  Override them in ``estimator_kwargs``.

    Args:
        X: training inputs, shape (n, d).
        y: binary labels, shape (n,).
        fit_intercept: fit and return the unpenalized intercept b.
        estimator_kwargs: more arguments of ``LogisticRegression`` (``solver``,
            ``tol``, ``max_iter``); not ``C``, ``penalty``, ``l1_ratio`` or
            ``fit_intercept``, which would change the objective.
        measure_grad: as in `SklearnRidge`.

    Call:
        ``solver(objective, init, theta) -> SolverResult``: ``MAX_ITER`` if
        scikit-learn warned about convergence, else ``CONVERGED``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install bilevel[sklearn]``).
    """

    X: Any
    y: Any
    fit_intercept: bool = True
    estimator_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    measure_grad: bool = True
    _objective: Objective = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_setting("SklearnLogisticRegression", "X", self.X, allow_tensor=True)
        lazy_import("sklearn.linear_model", "sklearn", "SklearnLogisticRegression")
        X, y = _check_data(self.X, self.y, "SklearnLogisticRegression")
        _signs(y, "SklearnLogisticRegression")
        _check_kwargs(
            self.estimator_kwargs, ("C", "penalty", "l1_ratio", "fit_intercept"), "SklearnLogisticRegression"
        )
        kwargs = {"tol": 1e-10, "max_iter": 10_000, **self.estimator_kwargs}
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "estimator_kwargs", types.MappingProxyType(kwargs))
        object.__setattr__(self, "_objective", sklearn_logistic_objective(X, y, self.fit_intercept))

    @property
    def objective(self) -> Objective:
        """The torch objective this estimator minimizes: `sklearn_logistic_objective` of the data."""
        return self._objective

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        lm = lazy_import("sklearn.linear_model", "sklearn", "SklearnLogisticRegression")
        C = float(_scalar_theta(theta, "SklearnLogisticRegression", "C"))
        if not (C > 0 and math.isfinite(C)):
            raise ValueError(f"SklearnLogisticRegression: C = {C} from theta must be finite and > 0")
        # The default penalty is L2 in every supported scikit-learn version; it is not
        # passed explicitly because `penalty` is deprecated since 1.8.
        est = lm.LogisticRegression(C=C, fit_intercept=self.fit_intercept, **self.estimator_kwargs)
        status, message = _fit(est, self.X, self.y, "SklearnLogisticRegression")
        return _finish(
            est,
            status,
            message,
            objective,
            init,
            theta,
            self.fit_intercept,
            self.measure_grad,
            "SklearnLogisticRegression",
        )
