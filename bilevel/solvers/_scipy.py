"""SciPy's L-BFGS-B on the flattened parameters, with gradients from PyTorch."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import numpy as np
import torch

from .._results import SolverResult
from .._status import SolverStatus
from .._types import Objective, TensorTree
from ._common import Oracle, check_int, check_positive
from ._messages import check_setting

__all__ = ["ScipyLBFGS"]


@dataclasses.dataclass(frozen=True)
class ScipyLBFGS:
    """``scipy.optimize.minimize(method="L-BFGS-B")`` on phi raveled to one float64 vector.

    The objective and its gradient are evaluated by PyTorch in ``init``'s dtype and
    on its device (any device: points are copied from the host and gradients back);
    SciPy's own arithmetic is float64.  The answer is cast back to ``init``'s dtype
    and device.

    Status: ``CONVERGED`` iff ||grad G|| <= tol at the returned point, as measured by
    PyTorch (SciPy is given ``gtol = tol / sqrt(n)`` on the largest gradient entry, which
    implies it); otherwise ``MAX_ITER`` when SciPy ran out of iterations or evaluations,
    ``LINE_SEARCH_FAILED`` when its line search failed or f stopped decreasing,
    ``NONFINITE`` for NaN or infinity, and ``FAILED`` if SciPy stopped for another
    reason (e.g. on a positive ``ftol``).  SciPy's message, status and counts are in
    ``info``.

    Limit: SciPy's line search compares values of f, and near the minimizer the
    decrease (about ||g||^2 / L) falls below the rounding of f (about eps * |f|, or
    the size of the terms summed into f): ||grad|| below roughly
    sqrt(mu * eps * |f|) (~1e-8 in float64 for f ~ 1, ~1e-3 in float32) is out of
    reach, and the status then says ``LINE_SEARCH_FAILED``.  The torch solvers'
    `Armijo` search reads slopes there instead.

    Args:
        tol: gradient-norm tolerance (> 0).
        max_iter: L-BFGS iteration cap (>= 1).
        max_fun: cap on objective+gradient evaluations (``None``: 2 * max_iter + 20).
        history: number of stored correction pairs (``maxcor``), >= 1.
        ftol: SciPy's relative-decrease stopping rule (>= 0); the default 0 disables
            it, so that SciPy stops on the gradient.

    Call:
        ``solver(objective, init, theta) -> SolverResult``; every SciPy evaluation is
        one gradient (``n_gev``); a last one is added if SciPy's final point was not
        the last evaluated.  Unless it converged, ``message`` (`SolverResult.reason`,
        also ``info["reason"]``) says why in terms of ``tol``, ``max_iter``, ``max_fun``
        and ``ftol``; for ``LINE_SEARCH_FAILED`` it gives the rounding of f at the answer.

    Raises:
        TypeError: a setting is not a number, or is a function or tensor (the class called
            as if it were a solver: create it first, ``ScipyLBFGS(tol=...)``).
    """

    tol: float = 1e-6
    max_iter: int = 1000
    max_fun: int | None = None
    history: int = 10
    ftol: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tol", "max_iter", "max_fun"):
            check_setting("ScipyLBFGS", name, getattr(self, name))
        check_positive("ScipyLBFGS", "tol", self.tol)
        check_int("ScipyLBFGS", "max_iter", self.max_iter, 1)
        if self.max_fun is not None:
            check_int("ScipyLBFGS", "max_fun", self.max_fun, 1)
        check_int("ScipyLBFGS", "history", self.history, 1)
        check_positive("ScipyLBFGS", "ftol", self.ftol, allow_zero=True)

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        import scipy.optimize  # imported here: it costs ~0.4 s and only this solver needs it

        oracle = Oracle(objective, init, theta, batched=False, who="ScipyLBFGS", need_values=True)
        n = oracle.x0.shape[1]
        cache: dict[str, Any] = {}

        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            X = torch.from_numpy(np.array(z, dtype=np.float64)).to(oracle.device, oracle.dtype)[None, :]
            f, g = oracle.value_and_grad(X)
            cache.update(z=np.array(z, copy=True), f=f, g=g)
            return float(f[0]), g[0].detach().double().cpu().numpy()

        x0 = oracle.x0[0].detach().double().cpu().numpy()
        max_fun = self.max_fun if self.max_fun is not None else 2 * self.max_iter + 20
        with _one_blas_thread():
            res = scipy.optimize.minimize(
                fun,
                x0,
                jac=True,
                method="L-BFGS-B",
                options={
                    "maxiter": self.max_iter,
                    "maxfun": max_fun,
                    "gtol": self.tol / math.sqrt(max(n, 1)),
                    "ftol": self.ftol,
                    "maxcor": self.history,
                },
            )
        if "z" not in cache or not np.array_equal(cache["z"], res.x):
            fun(res.x)
        X = torch.from_numpy(np.array(res.x, dtype=np.float64)).to(oracle.device, oracle.dtype)[None, :]
        f, g = cache["f"], cache["g"]
        gn = float(torch.linalg.vector_norm(g.double()))
        fv = float(f[0])
        message = res.message if isinstance(res.message, str) else str(res.message)
        if not (math.isfinite(gn) and math.isfinite(fv) and bool(torch.isfinite(X).all())):
            status = SolverStatus.NONFINITE
        elif gn <= self.tol:
            status = SolverStatus.CONVERGED
        elif res.status == 1:
            status = SolverStatus.MAX_ITER
        elif "ABNORMAL" in message.upper() or "LINE SEARCH" in message.upper():
            status = SolverStatus.LINE_SEARCH_FAILED
        elif self.ftol == 0.0 and "REDUCTION OF F" in message.upper():
            # With ftol = 0 this rule fires only when f did not decrease at all: the
            # line search accepted no decrease, typically at the rounding floor of f.
            status = SolverStatus.LINE_SEARCH_FAILED
        else:
            status = SolverStatus.FAILED
        info: dict[str, Any] = {
            "message": message,
            "scipy_status": int(res.status),
            "scipy_nfev": int(res.nfev),
        }
        why = self._explain(status, message, gn, fv, n_fev=int(res.nfev), max_fun=max_fun, dtype=oracle.dtype)
        if why:
            info["reason"] = why
        return SolverResult(
            x=oracle.answer(X),
            status=status,
            n_iter=int(res.nit),
            grad_norm=gn,
            n_fev=oracle.n_fev,
            n_gev=oracle.n_gev,
            n_hvp=0,
            fun=fv,
            info=info,
            message=why,
        )

    def _explain(self, status: SolverStatus, scipy_message: str, gn: float, fv: float, **kw: Any) -> str:
        """Why SciPy stopped, in terms of this solver's settings ('' when it converged)."""
        if status is SolverStatus.CONVERGED:
            return ""
        where = f"||grad|| = {gn:.3e} > tol={self.tol:g} (SciPy: {scipy_message})"
        if status is SolverStatus.MAX_ITER:
            cap = f"max_fun={kw['max_fun']}" if kw["n_fev"] >= kw["max_fun"] else f"max_iter={self.max_iter}"
            return f"ScipyLBFGS stopped at {cap} with {where}: raise max_iter and max_fun, or loosen tol"
        if status is SolverStatus.LINE_SEARCH_FAILED:
            # Near a minimizer the decrease along a step, about ||g||^2 / L, falls below the rounding
            # of f, eps * |f|: SciPy's line search then sees no decrease.  No step size or number of
            # backtracking steps helps there; only tol or the objective's scale does.
            eps = torch.finfo(kw["dtype"]).eps
            dtype = str(kw["dtype"]).replace("torch.", "")
            return (
                f"ScipyLBFGS: no decrease found at {where}: f = {fv:.6g} is resolved only to "
                f"eps * |f| = {eps * abs(fv):.1e} ({dtype}), less than a step can gain this close to the "
                f"minimizer, so tol is likely below what f's rounding allows: loosen tol (to about "
                f"{2 * gn:.0e}), scale f to "
                "|f| ~ 1 near the minimizer (a mean instead of a sum), or use NewtonCG or "
                "GradientDescent(line_search=Armijo()), whose line search reads slopes"
            )
        if status is SolverStatus.NONFINITE:
            return (
                f"ScipyLBFGS: the objective or its gradient is NaN or infinite at SciPy's point ({where}): "
                "check the objective's domain (log, sqrt, division) or bound phi"
            )
        if self.ftol > 0 and "REDUCTION OF F" in scipy_message.upper():
            return (
                f"ScipyLBFGS stopped on ftol={self.ftol:g} (relative decrease of f) with {where}: "
                "set ftol=0 (the default) so that SciPy stops on the gradient"
            )
        return f"ScipyLBFGS: SciPy stopped before tol with {where}"


def _one_blas_thread() -> Any:
    """Limit BLAS to one thread during L-BFGS-B's small dense updates, where threads only contend.

    Measured on a shared 2-core machine: each call of SciPy's L-BFGS-B core took 7-11 ms with
    OpenBLAS's default threads, 8x less with one.  A no-op when threadpoolctl is not installed.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
