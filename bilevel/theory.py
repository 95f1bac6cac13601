"""Error bounds and iteration budgets for implicit meta-gradients (iMAML, Appendix E).

The setting is the proximal inner problem of iMAML (Rajeswaran et al. 2019, Eq. 4):

    Alg*(theta) = argmin_phi G(phi, theta),   G(phi, theta) = Lhat(phi) + lam/2 ||phi - theta||^2,

with support loss Lhat and query loss L, and the task meta-gradient

    d_theta L(Alg*(theta)) = (I + Lhat''(phi*)/lam)^-1 grad L(phi*),   phi* = Alg*(theta)   (Lemma 1).

`implicit_argmin` computes it as g = lam w, where w solves (Lhat''(phi) + lam I) w = v with
v = grad L(phi) at the computed phi; the CG residual r = (Lhat'' + lam I) w - v is the same
vector as the residual of (I + Lhat''/lam) g = v.

Assumption 2 of the paper, with the names used here:

=========  ===================================================================  ====================
name       meaning                                                              units
=========  ===================================================================  ====================
``B``      L is B-Lipschitz: ||grad L|| <= B                                    loss / phi
``L``      L is L-smooth: ||grad L(a) - grad L(b)|| <= L ||a - b||             loss / phi^2
``rho``    Lhat has a rho-Lipschitz Hessian: ||Lhat''(a) - Lhat''(b)|| <= rho   loss / phi^3
           ||a - b|| (spectral norm)
``mu``     G(., theta) is mu-strongly convex (``mu = lam`` for a convex Lhat)  loss / phi^2
``kappa``  beta / mu, with G(., theta) beta-smooth (beta = lam + smoothness    dimensionless
           of Lhat)
``D``      distance from the inner solver's start to Alg*(theta); the paper's   phi
           ||Alg*(theta)|| <= D for a start at 0
``lam``    the proximal weight                                                  loss / phi^2
=========  ===================================================================  ====================

Here ``phi`` denotes the units of the parameters (phi and theta share them) and
``loss`` the units of the losses; a meta-gradient has units loss / phi, a distance
``delta`` units phi.

A-priori results (what to spend): `lemma3_bound`, `theorem2_iterations`, `budget_for`.
A-posteriori results (what was achieved, from diagnostics the layer measured anyway):
`certify`, `certify_from`.  Constants for logistic losses: `logistic_constants`.

All bounds hold in exact arithmetic.  The rounding error of the computation itself
(of the order of machine epsilon times kappa times ||g||) is not included: in float64
it is far below any error worth certifying; in float32 add it yourself.

References:
    Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients",
    NeurIPS 2019, Appendix E (Lemmas 2 and 3, Theorem 2).
    Nesterov, Lectures on Convex Optimization, 2nd ed., 2018, Section 2.2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ._implicit import ImplicitInfo
from ._linear_solve import CG
from ._results import LinearSolveResult
from ._status import LinearStatus

__all__ = [
    "Budget",
    "Certificate",
    "LossConstants",
    "budget_for",
    "certify",
    "certify_from",
    "lemma2_iterations",
    "lemma3_bound",
    "lemma3_constant",
    "logistic_constants",
    "theorem2_iterations",
]

#: max over z of |d^3/dz^3 log(1 + exp(-z))| = max |sigma(z) sigma(-z) (1 - 2 sigma(z))|,
#: attained where sigma(z) = (3 +- sqrt(3)) / 6.
LOGISTIC_THIRD_DERIVATIVE_MAX = 1.0 / (6.0 * math.sqrt(3.0))


# --------------------------------------------------------------------------- validation


def _measured(call: str, name: str, value: Any) -> float:
    """float(value) for a real number (int, float, NumPy scalar, one-element tensor); NaN allowed."""
    if isinstance(value, (str, bytes, bool)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
        raise TypeError(f"{call}: {name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{call}: {name} must be a real number, got {type(value).__name__}") from None


def _number(call: str, name: str, value: Any) -> float:
    v = _measured(call, name, value)
    if math.isnan(v):
        raise ValueError(f"{call}({name}=nan): {name} must be a number")
    return v


def _positive(call: str, name: str, value: Any) -> float:
    v = _number(call, name, value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{call}({name}={v}): {name} must be finite and > 0")
    return v


def _nonnegative(call: str, name: str, value: Any) -> float:
    v = _number(call, name, value)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{call}({name}={v}): {name} must be finite and >= 0")
    return v


def _kappa(call: str, value: Any) -> float:
    v = _number(call, "kappa", value)
    if not (v >= 1 and math.isfinite(v)):
        raise ValueError(f"{call}(kappa={v}): kappa = beta / mu is a condition number: must be >= 1")
    return v


def _mu(call: str, mu: Any, lam: float) -> float:
    return lam if mu is None else _positive(call, "mu", mu)


# --------------------------------------------------------------------------- Lemma 3


def lemma3_constant(*, lam: float, rho: float, B: float, L: float, mu: float) -> float:
    """B1 = 2 lam rho B / mu^2 + lam L / mu, the sensitivity of the meta-gradient to phi's error.

    Lemma 3 reads ||g - d_theta L(Alg*)|| <= B1 delta + delta'.  Units: loss / phi^2
    (meta-gradient error per unit of distance ||phi - Alg*||).

    Args:
        lam: proximal weight (> 0).
        rho: Lipschitz constant of Lhat'' (>= 0; 0 for a quadratic Lhat).
        B: Lipschitz constant of the query loss L (>= 0).
        L: smoothness constant of the query loss L (>= 0).
        mu: strong convexity constant of G(., theta) (> 0).

    Raises:
        ValueError: a constant is negative, infinite or NaN, or lam or mu is not > 0.
    """
    call = "lemma3_constant"
    lam = _positive(call, "lam", lam)
    rho = _nonnegative(call, "rho", rho)
    B = _nonnegative(call, "B", B)
    L = _nonnegative(call, "L", L)
    mu = _positive(call, "mu", mu)
    return 2.0 * lam * rho * B / mu**2 + lam * L / mu


def _delta_max(rho: float, mu: float) -> float:
    """mu / (2 rho): Lemma 3 needs delta strictly below it (infinite for rho = 0)."""
    return math.inf if rho == 0 else mu / (2.0 * rho)


def lemma3_bound(
    *, lam: float, rho: float, B: float, L: float, mu: float, delta: float, delta_prime: float
) -> float:
    """Lemma 3: the error of an approximate task meta-gradient.

    If ||phi - Alg*(theta)|| <= delta < mu / (2 rho) and
    ||g - (I + Lhat''(phi)/lam)^-1 grad L(phi)|| <= delta', then

        ||g - d_theta L(Alg*(theta))|| <= (2 lam rho B / mu^2 + lam L / mu) delta + delta'.

    Args:
        lam, rho, B, L, mu: the constants of Assumption 2 (see the module docstring).
        delta: bound on ||phi - Alg*(theta)||, in units of phi (>= 0).
        delta_prime: bound on the linear-solve error of g, in units of the
            meta-gradient (loss / phi) (>= 0).

    Returns:
        The bound on ||g - d_theta L(Alg*(theta))||, in units of the meta-gradient.

    Raises:
        ValueError: ``delta >= mu / (2 rho)`` (the lemma does not apply: the Hessian at
            phi may differ too much from the one at Alg*), or an argument is out of range.

    References:
        Rajeswaran et al. 2019, Lemma 3 (Appendix E).
    """
    call = "lemma3_bound"
    B1 = lemma3_constant(lam=lam, rho=rho, B=B, L=L, mu=mu)
    delta = _nonnegative(call, "delta", delta)
    delta_prime = _nonnegative(call, "delta_prime", delta_prime)
    dmax = _delta_max(float(rho), float(mu))
    if delta >= dmax:
        raise ValueError(
            f"{call}(delta={delta:g}): Lemma 3 needs delta < mu / (2 rho) = {dmax:g} "
            f"(mu={float(mu):g}, rho={float(rho):g}); solve the inner problem more accurately"
        )
    return B1 * delta + delta_prime


# --------------------------------------------------------------------------- Lemma 2 and Theorem 2


def _log_budget(kappa: float, argument: float) -> int:
    """ceil(2 sqrt(kappa) log(argument)), and 0 where the argument is <= 1 (no work needed)."""
    if not argument > 1.0:
        return 0
    return max(0, math.ceil(2.0 * math.sqrt(kappa) * math.log(argument)))


def lemma2_iterations(*, kappa: float, distance: float, delta: float) -> int:
    """Lemma 2: gradient evaluations for Nesterov's method to get within delta of the argmin.

    For f beta-smooth and mu-strongly convex (kappa = beta / mu), Nesterov's
    accelerated gradient method with step 1/beta and momentum
    (sqrt(kappa) - 1) / (sqrt(kappa) + 1), started at x0, satisfies ||x - x*|| <= delta after

        ceil(2 sqrt(kappa) log(2 kappa ||x0 - x*|| / delta))

    gradient evaluations (the paper states it for x0 = 0, i.e. ``distance = ||x*||``;
    the method is translation invariant).  It follows from
    f(x_k) - f* <= (1 - 1/sqrt(kappa))^k (f(x0) - f* + mu/2 ||x0 - x*||^2) and
    ||x - x*||^2 <= 2 (f(x) - f*) / mu, with room to spare (sqrt(kappa + 1) <= 2 kappa).

    Args:
        kappa: condition number beta / mu (>= 1).
        distance: bound on ||x0 - x*||, in units of x (>= 0).
        delta: target distance, in units of x (> 0).

    Returns:
        The iteration count, rounded up; 0 when ``2 kappa distance <= delta``.
    """
    call = "lemma2_iterations"
    kappa = _kappa(call, kappa)
    distance = _nonnegative(call, "distance", distance)
    delta = _positive(call, "delta", delta)
    return _log_budget(kappa, 2.0 * kappa * distance / delta)


def theorem2_iterations(
    *, kappa: float, D: float, B: float, L: float, rho: float, mu: float, lam: float, eps: float
) -> tuple[int, int]:
    """Theorem 2: inner Nesterov iterations and CG iterations for a meta-gradient within eps.

    With B1 = 2 lam rho B / mu^2 + lam L / mu, the paper's counts are

        inner_iters = ceil(2 sqrt(kappa) log(8 kappa D (B1 / eps + rho / mu))),
        cg_iters    = ceil(2 sqrt(kappa) log(4 kappa (lam / mu) B / eps)),

    (0 where a logarithm's argument is <= 1), and then ||g - d_theta L(Alg*)|| <= eps.
    The inner count is Lemma 2 with delta = min(eps / (2 B1), mu / (4 rho)) (the
    paper's proof writes mu / (2 rho), which would meet Lemma 3's strict inequality
    only with equality; the constant 8 already pays for mu / (4 rho)).  The CG count
    is Lemma 2 for the linear system, whose solution has norm <= (lam / mu) B, with
    delta' = eps / 2; CG from x0 = 0 satisfies it too, since
    ||e_k|| <= 2 sqrt(kappa) ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k ||x*||.

    Args:
        kappa: beta / mu for G(., theta) (>= 1); the linear system
            (I + Lhat''/lam) has the same condition number.
        D: bound on ||init - Alg*(theta)|| for the inner solver's start ``init``
            (the paper starts at 0 and assumes ||Alg*(theta)|| <= D; started at theta,
            ||theta - Alg*|| = ||grad Lhat(Alg*)|| / lam).  Units of phi.
        B, L: Lipschitz and smoothness constants of the query loss.
        rho: Lipschitz constant of Lhat''.
        mu: strong convexity of G(., theta) (``lam`` for a convex Lhat).
        lam: proximal weight.
        eps: target error of the meta-gradient, units loss / phi (> 0).

    Returns:
        ``(inner_iters, cg_iters)``, both rounded up.  The CG count assumes the
        backward solve starts at 0 (``backward_x0=None``).

    References:
        Rajeswaran et al. 2019, Theorem 2 (Appendix E).
    """
    call = "theorem2_iterations"
    kappa = _kappa(call, kappa)
    D = _nonnegative(call, "D", D)
    eps = _positive(call, "eps", eps)
    B1 = lemma3_constant(lam=lam, rho=rho, B=B, L=L, mu=mu)
    lam, mu, rho, B = float(lam), float(mu), float(rho), float(B)
    inner = _log_budget(kappa, 8.0 * kappa * D * (B1 / eps + rho / mu))
    cg = _log_budget(kappa, 4.0 * kappa * (lam / mu) * B / eps)
    return inner, cg


@dataclasses.dataclass(frozen=True)
class Budget:
    """Iteration budgets for a task meta-gradient within ``eps`` (Theorem 2).

    Attributes:
        eps: the target error ||g - d_theta L(Alg*)||, units loss / phi.
        inner_iters: Nesterov iterations (gradient evaluations of G) for phi.
        cg_iters: CG iterations (Hessian-vector products) for the meta-gradient.
        delta: the accuracy ||phi - Alg*|| those inner iterations guarantee,
            min(eps / (2 B1), mu / (4 rho)), units of phi.
        delta_prime: the accuracy of the linear solve they guarantee, eps / 2.
        inner_grad_tol: mu * delta: an inner solver that stops at
            ||grad_phi G|| <= inner_grad_tol has ||phi - Alg*|| <= delta (strong
            convexity), whatever its iteration count; a stopping rule and a value
            for ``implicit_argmin(optimality_tol=...)``.  Units loss / phi.
        cg_atol: mu * delta' / lam: a backward solve with residual
            ||(Lhat'' + lam I) w - v|| <= cg_atol has linear-solve error <= delta'.
    """

    eps: float
    inner_iters: int
    cg_iters: int
    delta: float
    delta_prime: float
    inner_grad_tol: float
    cg_atol: float

    def cg(self) -> CG:
        """``CG(max_iter=cg_iters, rtol=0, atol=cg_atol)`` for `implicit_argmin`.

        It stops early once the residual certifies delta' a posteriori.  If it runs
        all ``cg_iters`` iterations without meeting ``cg_atol`` it reports
        ``MAX_ITER`` (the layer raises `LinearSolveError` unless ``throw=False``),
        although Theorem 2 still guarantees delta' a priori: the residual test is
        conservative by up to a factor kappa.
        """
        return CG(max_iter=self.cg_iters, rtol=0.0, atol=self.cg_atol)


def budget_for(
    eps: float, *, kappa: float, D: float, B: float, L: float, rho: float, mu: float, lam: float
) -> Budget:
    """The Theorem 2 budget for a meta-gradient within ``eps``, with a-posteriori stopping rules.

    Example (support loss with smoothness ``s``, so beta = lam + s; start at theta)::

        b = bl.theory.budget_for(1e-4, kappa=(lam + s) / lam, D=D, B=B, L=L, rho=rho,
                                 mu=lam, lam=lam)
        inner = bl.solvers.Nesterov(lr=1 / (lam + s), mu=lam, max_iter=b.inner_iters,
                                    tol=b.inner_grad_tol, restart=False)
        phi, info = bl.implicit_argmin(G, theta.detach(), theta, inner, linear_solver=b.cg(),
                                       optimality_tol=None, return_info=True)

    (``restart=False``: Lemma 2 is about the plain constant-momentum scheme.)  The
    a-priori counts are conservative (by about 3-5x for the inner solve and 5-10x for CG
    on the problems of ``benchmarks/theory_tightness.py``); the a-posteriori stopping
    rules ``inner_grad_tol`` and ``cg_atol`` stop as soon as the accuracy is certified.

    Args:
        eps: target error, units loss / phi (> 0).
        kappa, D, B, L, rho, mu, lam: as in `theorem2_iterations`.

    Returns:
        A `Budget`.
    """
    inner, cg = theorem2_iterations(kappa=kappa, D=D, B=B, L=L, rho=rho, mu=mu, lam=lam, eps=eps)
    B1 = lemma3_constant(lam=lam, rho=rho, B=B, L=L, mu=mu)
    eps, mu, lam, rho = float(eps), float(mu), float(lam), float(rho)
    delta = min(eps / (2.0 * B1) if B1 > 0 else math.inf, math.inf if rho == 0 else mu / (4.0 * rho))
    delta_prime = eps / 2.0
    return Budget(
        eps=eps,
        inner_iters=inner,
        cg_iters=cg,
        delta=delta,
        delta_prime=delta_prime,
        inner_grad_tol=mu * delta,
        cg_atol=mu * delta_prime / lam,
    )


# --------------------------------------------------------------------------- a-posteriori certificates


@dataclasses.dataclass(frozen=True)
class Certificate:
    """An a-posteriori bound on the error of one computed task meta-gradient.

    Attributes:
        bound: ||g - d_theta L(Alg*(theta))|| <= bound (units loss / phi); ``inf`` when
            not ``valid``.
        delta: ||phi - Alg*|| <= ||grad_phi G(phi)|| / mu, units of phi.
        delta_prime: ||g - (I + Lhat''(phi)/lam)^-1 v|| <= lam ||r|| / mu with r the
            backward residual, units loss / phi.
        B: the bound on ||grad L(Alg*)|| that was used: the given B, or
            ||grad L(phi)|| + L delta when the query gradient's norm was measured,
            whichever is smaller.
        valid: whether Lemma 3 applies (delta < mu / (2 rho), finite diagnostics,
            positive definite system).
        reason: why not, when not valid; ``""`` otherwise.
    """

    bound: float
    delta: float
    delta_prime: float
    B: float
    valid: bool
    reason: str = ""


def certify_from(
    residual_norm: float,
    cg_residual_norm: float,
    *,
    lam: float,
    rho: float,
    L: float,
    B: float | None = None,
    mu: float | None = None,
    grad_norm: float | None = None,
) -> Certificate:
    """Certify a meta-gradient from its two measured residuals (Lemma 3, a posteriori).

    With G(., theta) mu-strongly convex:

        delta  = ||grad_phi G(phi, theta)|| / mu   >= ||phi - Alg*(theta)||,
        delta' = lam ||(Lhat''(phi) + lam I) w - v|| / mu
               >= ||lam w - (I + Lhat''(phi)/lam)^-1 v||,   v = grad L(phi),

    and, if delta < mu / (2 rho), Lemma 3 bounds the error of g = lam w by
    (2 lam rho B / mu^2 + lam L / mu) delta + delta'.  B only needs to bound
    ||grad L(Alg*)||; when ``grad_norm = ||v||`` is given, ||v|| + L delta does, and the
    smaller of the two is used (``B`` may then be omitted).

    Args:
        residual_norm: ||grad_phi G(phi, theta)|| at the computed phi, units loss / phi.
        cg_residual_norm: ||(Lhat''(phi) + lam I) w - v||, units loss / phi.
        lam: proximal weight (> 0).
        rho: Lipschitz constant of Lhat'' (>= 0).
        L: smoothness constant of the query loss (>= 0).
        B: Lipschitz constant of the query loss, or ``None`` to use ``grad_norm``.
        mu: strong convexity of G(., theta); default ``lam`` (a convex Lhat).
        grad_norm: ||grad L(phi)||, the norm of the backward pass's right-hand side.

    Returns:
        A `Certificate`; never raises for diagnostics that make Lemma 3 inapplicable
        (the certificate then has ``valid=False`` and ``bound=inf``).

    Raises:
        ValueError: a constant is out of range, or neither ``B`` nor ``grad_norm`` is given.
    """
    call = "certify_from"
    lam = _positive(call, "lam", lam)
    mu = _mu(call, mu, lam)
    rho = _nonnegative(call, "rho", rho)
    L = _nonnegative(call, "L", L)
    B_given = math.inf if B is None else _nonnegative(call, "B", B)
    if B is None and grad_norm is None:
        raise ValueError(
            f"{call}: give B (the query loss's Lipschitz constant) or grad_norm (||grad L(phi)||)"
        )
    # Measured diagnostics may be NaN or infinite (a failed solve): that makes the
    # certificate invalid, it is not a usage error.
    r_G = _measured(call, "residual_norm", residual_norm)
    r_cg = _measured(call, "cg_residual_norm", cg_residual_norm)
    delta = r_G / mu
    delta_prime = lam * r_cg / mu
    B_used = B_given
    if grad_norm is not None:
        gn = _measured(call, "grad_norm", grad_norm)
        B_used = min(B_given, gn + L * delta) if math.isfinite(gn) else B_given

    def invalid(reason: str) -> Certificate:
        return Certificate(math.inf, delta, delta_prime, B_used, False, reason)

    if not (math.isfinite(r_G) and r_G >= 0 and math.isfinite(r_cg) and r_cg >= 0):  # NaN fails too
        return invalid(f"non-finite or negative residuals (||grad G|| = {r_G}, CG residual = {r_cg})")
    if not math.isfinite(B_used):
        return invalid(f"no finite bound on ||grad L(Alg*)|| (B = {B}, grad_norm = {grad_norm})")
    dmax = _delta_max(rho, mu)
    if delta >= dmax:
        return invalid(
            f"Lemma 3 does not apply: delta = ||grad G|| / mu = {delta:.3e} >= mu / (2 rho) = {dmax:.3e}; "
            "solve the inner problem more accurately"
        )
    bound = lemma3_constant(lam=lam, rho=rho, B=B_used, L=L, mu=mu) * delta + delta_prime
    return Certificate(bound, delta, delta_prime, B_used, True)


def certify(
    info: ImplicitInfo,
    *,
    lam: float,
    rho: float,
    L: float,
    B: float | None = None,
    mu: float | None = None,
    backward: LinearSolveResult | None = None,
) -> Certificate:
    """Certify the meta-gradient of an `implicit_argmin` call from its diagnostics.

    For G(phi, theta) = Lhat(phi) + lam/2 ||phi - theta||^2 the layer's gradient with
    respect to theta is g = lam w, where w is the backward solve's answer; the layer
    already measured ||grad_phi G|| at phi (``info.residual_norm``), the backward
    residual and ||v|| = ||grad L(phi)|| (``info.last_backward.residual_norm`` and
    ``.b_norm``).  This only does arithmetic on them (`certify_from`).

    Example::

        phi, info = bl.implicit_argmin(G, theta.detach(), theta, solver, return_info=True,
                                       linear_solver=bl.CG(max_iter=5))
        L_query(phi).backward()
        cert = bl.theory.certify(info, lam=lam, rho=rho, L=L_smooth)
        if cert.valid: print(f"||theta.grad - true meta-gradient|| <= {cert.bound:.2e}")

    The bound holds under the assumptions of Lemma 3: G must be exactly the proximal
    objective above (or the "meta-gradient" is not lam w), mu-strongly convex in phi,
    Lhat'' rho-Lipschitz, and L the smoothness constant of the function whose gradient
    flowed into phi (with a meta-batch mean, that of L_i / M).  The residuals are the
    ones the layer measured, with its HVP oracle: with `FiniteDifferenceHVP` the
    truncation error of the differences is not accounted for.

    Args:
        info: the `ImplicitInfo` of ``implicit_argmin(..., return_info=True)``, after
            ``backward()``.
        lam, rho, L, B, mu: as in `certify_from` (``B=None``: use ||v|| + L delta).
        backward: which backward solve to certify; default ``info.last_backward``.

    Returns:
        A `Certificate` (``valid=False``, ``bound=inf`` and a reason when Lemma 3 does
        not apply, e.g. the inner residual is too large or CG met negative curvature).

    Raises:
        ValueError: no backward pass has run yet, or a constant is out of range.
        TypeError: ``info`` is not an `ImplicitInfo`.
    """
    if not isinstance(info, ImplicitInfo):
        raise TypeError(
            f"certify: info must be an ImplicitInfo (from return_info=True), got {type(info).__name__}"
        )
    res = backward if backward is not None else info.last_backward
    if res is None:
        raise ValueError("certify: info has no backward solve yet; call backward() on a loss of phi first")
    cert = certify_from(
        info.residual_norm,
        res.residual_norm,
        lam=lam,
        rho=rho,
        L=L,
        B=B,
        mu=mu,
        grad_norm=res.b_norm,
    )
    if res.status in (LinearStatus.NEGATIVE_CURVATURE, LinearStatus.NONFINITE):
        # Under Assumption 2 the system is positive definite; this says mu or the model is wrong.
        return dataclasses.replace(
            cert,
            bound=math.inf,
            valid=False,
            reason=f"backward solve: {res.status.message}; the system is not mu-strongly positive definite",
        )
    return cert


# --------------------------------------------------------------------------- constants of losses


@dataclasses.dataclass(frozen=True)
class LossConstants:
    """Global constants of a loss f, as Assumption 2 uses them.

    Attributes:
        lipschitz: ||grad f(x)|| <= lipschitz for all x (the paper's B for a query loss).
        smoothness: ||f''(x)|| <= smoothness (L for a query loss; beta - lam for a support loss).
        hessian_lipschitz: ||f''(a) - f''(b)|| <= hessian_lipschitz ||a - b|| (rho for a
            support loss).
    """

    lipschitz: float
    smoothness: float
    hessian_lipschitz: float


def logistic_constants(X: torch.Tensor) -> LossConstants:
    """Constants of the mean logistic loss f(w) = 1/n sum_i log(1 + exp(-y_i x_i'w)).

    Valid for any labels y_i in {-1, +1} (and for binary cross-entropy with labels in
    {0, 1}, whose derivatives in x_i'w have the same bounds).  With l(z) = log(1 + e^-z):
    |l'| < 1, 0 < l'' = sigma(z) sigma(-z) <= 1/4, |l'''| <= 1/(6 sqrt 3).  Then

    * grad f = 1/n sum_i l'(.) y_i x_i, so ||grad f|| <= min(mean_i ||x_i||, ||X|| / sqrt n);
    * f'' = 1/n X' diag(l'') X with 0 <= l'' <= 1/4, so ||f''|| <= ||X||^2 / (4 n);
    * f''(a) - f''(b) = 1/n X' diag(c) X with |c_i| = |l''(y_i x_i'a) - l''(y_i x_i'b)|
      <= |x_i'(a - b)| / (6 sqrt 3) <= max_i ||x_i|| ||a - b|| / (6 sqrt 3), and
      -max|c| X'X <= X' diag(c) X <= max|c| X'X, so
      rho = max_i ||x_i|| ||X||^2 / (6 sqrt(3) n).

    (||X|| is the spectral norm.)  An added ridge term c/2 ||w||^2 adds c to the
    smoothness, nothing to rho, and makes the loss not globally Lipschitz.

    Args:
        X: data, shape (n, d), one example per row; any floating dtype.

    Returns:
        A `LossConstants` with Python floats.

    Raises:
        ValueError: X is not a non-empty 2-D tensor, or has NaN or infinity.
    """
    if not isinstance(X, torch.Tensor) or X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(
            f"logistic_constants: X must be a non-empty 2-D tensor (n, d), got {getattr(X, 'shape', X)}"
        )
    Xd = X.detach().double()
    if not bool(torch.isfinite(Xd).all()):
        raise ValueError("logistic_constants: X has NaN or infinity")
    n = Xd.shape[0]
    row = torch.linalg.vector_norm(Xd, dim=1)
    spec = float(torch.linalg.matrix_norm(Xd, ord=2))
    lipschitz = min(float(row.mean()), spec / math.sqrt(n))
    smoothness = spec**2 / (4.0 * n)
    rho = float(row.max()) * spec**2 * LOGISTIC_THIRD_DERIVATIVE_MAX / n
    return LossConstants(lipschitz=lipschitz, smoothness=smoothness, hessian_lipschitz=rho)
