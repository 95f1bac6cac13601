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

    Status: ``CONVERGED`` when ||grad G|| <= tol at the returned point, as measured by
    PyTorch (SciPy is given ``gtol = tol / sqrt(n)`` on the largest gradient entry, which
    implies it), or when SciPy's line search failed at f's rounding floor (below);
    otherwise ``MAX_ITER`` when SciPy ran out of iterations or evaluations,
    ``LINE_SEARCH_FAILED`` when its line search failed or f stopped decreasing,
    ``NONFINITE`` for NaN or infinity, and ``FAILED`` if SciPy stopped for another
    reason (e.g. on a positive ``ftol``).  SciPy's message, status and counts are in
    ``info``.

    Rounding floor: SciPy's line search compares values of f, and near the minimizer the
    decrease (about ||g||^2 / L) falls below the rounding of f (about eps * |f|, or
    the size of the terms summed into f): ||grad|| below roughly
    sqrt(mu * eps * |f|) (~1e-8 in float64 for f ~ 1, ~1e-3 in float32) is out of
    reach.  A failed line search is reported ``CONVERGED`` when both

    * ||g|| <= eps^(1/3) * (1 + |f|): the gradient test of Gill, Murray & Wright's
      stopping rule (U3, with f's relative accuracy eps of its dtype), and
    * 1/2 g^T H g <= 100 * eps * (1 + |f|), with H L-BFGS's inverse-Hessian
      approximation at the answer (the identity before its first update): the decrease
      the quasi-Newton model predicts from the answer is within a hundred roundings of f,

    so no step can show a decrease that f's rounding would not hide; ``info["rounding_floor"]``
    then says so.  A line search that fails far from a minimizer (a wrong gradient, a
    kink) fails one of the two and stays ``LINE_SEARCH_FAILED``.  The torch solvers'
    `Armijo` search reads slopes there instead, and reaches smaller gradients.

    Args:
        tol: gradient-norm tolerance (> 0); see the rounding floor above for when a larger
            gradient is accepted.
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
        and ``ftol``; for ``LINE_SEARCH_FAILED`` it gives the rounding of f at the answer and
        the likely causes.

    Raises:
        TypeError: a setting is not a number, or is a function or tensor (the class called
            as if it were a solver: create it first, ``ScipyLBFGS(tol=...)``).

    References:
        Gill, Murray & Wright, *Practical Optimization*, Academic Press 1981, section 8.2.3
        (termination criteria U1-U3).
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
        if status is SolverStatus.LINE_SEARCH_FAILED:
            rounding = _at_rounding_floor(res, g[0], gn, fv, oracle.dtype)
            if rounding:
                status = SolverStatus.CONVERGED
                info["rounding_floor"] = (
                    f"ScipyLBFGS: ||grad|| = {gn:.3e} > tol={self.tol:g}, but SciPy's line search found "
                    f"no decrease where f = {fv:.6g} is at its rounding floor ({rounding}): converged "
                    "as far as f's rounding allows"
                )
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
            # Not at the rounding floor (`_at_rounding_floor` said no): either f is not smooth
            # there or its gradient does not match it, or f's rounding is coarser than the
            # floor test assumes (f summed from large terms that cancel).  No step size or
            # number of backtracking steps helps in either case.
            eps = torch.finfo(kw["dtype"]).eps
            dtype = str(kw["dtype"]).replace("torch.", "")
            return (
                f"ScipyLBFGS: no decrease found at {where}, short of f's rounding floor (f = {fv:.6g}, "
                f"resolved to eps * |f| = {eps * abs(fv):.1e} in {dtype}).  Either f is not smooth "
                "there or its gradient does not match it (a kink: abs, relu, max; a detached term), "
                "or f is rounded more coarsely than eps * |f| (large terms that cancel): check the "
                f"gradient, loosen tol (to about {2 * gn:.0e}), scale f to |f| ~ 1 near the minimizer "
                "(a mean instead of a sum), or use NewtonCG or GradientDescent(line_search=Armijo()), "
                "whose line search reads slopes"
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


def _at_rounding_floor(res: Any, g: torch.Tensor, gn: float, fv: float, dtype: torch.dtype) -> str:
    """Why a failed line search ended at f's rounding floor ('' if it did not); see `ScipyLBFGS`.

    Args:
        res: SciPy's ``OptimizeResult``; ``res.hess_inv`` is L-BFGS's inverse-Hessian approximation.
        g: the gradient at ``res.x``, shape (n,), measured by PyTorch.
        gn: its Euclidean norm.
        fv: f at ``res.x``.
        dtype: the dtype f was evaluated in; its eps is f's relative accuracy.
    """
    eps = torch.finfo(dtype).eps
    scale = 1.0 + abs(fv)
    # U3 of Gill, Murray & Wright: a gradient this small relative to f's scale is what
    # a relative accuracy eps in f can resolve.  Alone it would accept a wrong gradient
    # on a large f, whence the model test below.
    if gn > eps ** (1.0 / 3.0) * scale:
        return ""
    gd = g.detach().double().cpu().numpy()
    hess_inv = getattr(res, "hess_inv", None)
    hg = hess_inv.matvec(gd) if hess_inv is not None else gd
    predicted = 0.5 * float(np.dot(gd, hg))
    # The decrease L-BFGS's own model promises from here: below the rounding of f (100 ulps
    # of 1 + |f|, room for f summed from many rounded terms) a line search cannot see it.
    if not (math.isfinite(predicted) and predicted <= 100.0 * eps * scale):
        return ""
    return (
        f"||grad|| <= eps^(1/3) * (1 + |f|) = {eps ** (1.0 / 3.0) * scale:.1e} and the L-BFGS model "
        f"predicts a decrease of {predicted:.1e} <= 100 * eps * (1 + |f|) = {100.0 * eps * scale:.1e}"
    )


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
