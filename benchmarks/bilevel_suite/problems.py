"""Benchopt's bilevel benchmark problems, offline: generators, mini-batch oracles and metrics.

Three problems of ``benchmark_bilevel`` (https://github.com/benchopt/benchmark_bilevel), built
here from seeded NumPy generators, so nothing is downloaded:

* ``quadratic``: the simulated quadratic of ``datasets/simulated.py``, with the generator of
  ``benchmark_utils/gen_matrices.py`` written in NumPy (same construction: per-sample rank-one
  Hessians with a log-spaced spectrum in [mu, L], per-sample rank-one cross terms with a
  log-spaced spectrum in [mu, L_cross], Gaussian linear terms; JAX's random bits cannot be
  reproduced, so the matrices are equal in law, not bit for bit).  As in the benchmark, the
  data are redrawn (at most 20 times) until the value function is strongly convex.
* ``ijcnn1``: L2-regularized binary logistic regression with one weight per feature,
  G(z, x) = mean_i log(1 + exp(-y_i a_i.z)) + 1/2 sum_j exp(x_j) z_j^2 (``datasets/ijcnn1.py``
  with ``reg_parametrization='exp'``), F = the mean logistic loss on the validation set, at
  ijcnn1's shape (49,990 x 22 train, 91,701 validation) on data drawn from a logistic model.
* ``covtype``: multinomial logistic regression with one L2 weight per class,
  G(z, x) = mean_i CE(a_i Z, y_i) + 1/2 sum_k exp(x_k) ||Z[:, k]||^2 with Z = z.reshape(54, 7)
  (``datasets/covtype.py``), F = the mean cross-entropy on the validation set, at covtype's
  width (10 continuous + 4 + 40 one-hot features, standardized; 7 classes) and 20,000 training
  and 5,000 validation samples (what two CPU cores run in a minute).

The metric of ``quadratic`` and ``ijcnn1`` is the value function h(x) = F(z*(x), x) at the
solver's outer variable, reported
as relative suboptimality (h(x) - h*) / (h(x0) - h*) from the shared start x0; beside it the
benchmark's own ``value`` metric ||grad h(x)||^2.  h and grad h are computed in float64:
z*(x) by Newton's method on the full training set, grad h by implicit differentiation with a
dense solve.  h* is closed form for the quadratic; for the other two it is the minimum found by
L-BFGS on these exact (h, grad h), run to ||grad h|| <= 1e-9 (`reference_optimum`).  On
ijcnn1's shape the optimum lies at infinity in some coordinates (features worth no penalty, or
worth removing: x_j -> -inf or +inf); h* is then the infimum, which L-BFGS reaches where the
gradient underflows.  ``covtype``'s metric is the benchmark's: the validation misclassification
rate at the solver's own inner iterate (its value function has no interior minimizer either, and
its inner problem loses strong convexity as exp(x) -> 0, softmax logits being invariant to a shift
shared by all classes).

Oracles follow the package's mini-batch contract: ``inner(z, x, idx)`` and ``outer(z, x, idx)``
return the mean loss over the samples ``idx`` (a LongTensor; ``None``: all samples, without a
gather); the regularizer is added once per call, as in the benchmark's ``f_inner``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: ``(z, x, idx) -> scalar``: the mean loss over the samples ``idx``, or over all of them for
#: ``idx=None`` (what a full-batch method calls: no gather copies the data).
Oracle = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

DATA_DIR = Path("results/bilevel_suite/data")


@dataclasses.dataclass(frozen=True, eq=False)
class SuiteProblem:
    """One benchmark problem: data, mini-batch oracles, the shared start and the exact metric.

    Attributes:
        name: ``"quadratic"``, ``"ijcnn1"`` or ``"covtype"``.
        arrays: the data as float64 NumPy arrays (what `save_npz` writes for the JAX runner).
        inner, outer: ``(z, x, idx) -> scalar`` mean inner / outer loss over samples ``idx``.
        n_inner, n_outer: sample counts.
        z0, x0: the shared start, float64 of shapes (dim_inner,), (dim_outer,).
        inner_solution: ``x -> z*(x)``, float64, exact to Newton's precision.
        value_and_grad: ``x -> (h(x), grad h(x))``, float64.
    """

    name: str
    arrays: dict[str, np.ndarray]
    inner: Oracle
    outer: Oracle
    n_inner: int
    n_outer: int
    z0: torch.Tensor
    x0: torch.Tensor
    inner_solution: Callable[[torch.Tensor], torch.Tensor]
    value_and_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]]
    validation_error: Callable[[torch.Tensor], float] | None = None

    @property
    def dim_inner(self) -> int:
        return int(self.z0.numel())

    @property
    def dim_outer(self) -> int:
        return int(self.x0.numel())

    def save_npz(self, directory: Path = DATA_DIR) -> Path:
        """Write ``arrays`` plus ``z0``, ``x0`` to ``directory/<name>.npz``; returns the path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.npz"
        np.savez(path, z0=self.z0.numpy(), x0=self.x0.numpy(), **self.arrays)
        return path


# ---------------------------------------------------------------------------------------------
# The simulated quadratic


def gen_matrices(
    n_samples: int,
    d_inner: int,
    d_outer: int,
    L_inner: float,
    L_outer: float,
    L_cross: float,
    mu: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``benchmark_utils/gen_matrices.py`` in NumPy.

    Returns:
        (hess_inner (n, d_inner, d_inner), hess_outer (n, d_outer, d_outer),
        cross (n, d_outer, d_inner), linear_inner (n, d_inner), linear_outer (n, d_outer)).
    """
    U, *_ = np.linalg.svd(rng.standard_normal((d_inner, 1)))
    D = np.diag(np.logspace(np.log10(mu) / 2, np.log10(L_inner) / 2, d_inner))
    A = U @ D @ U.T
    X = rng.standard_normal((n_samples, 1, d_inner)) @ A
    hess_inner = X.transpose(0, 2, 1) @ X / X.shape[1]

    U, *_ = np.linalg.svd(rng.standard_normal((d_outer, 1)))
    D = np.diag(np.r_[0, np.logspace(np.log10(mu) / 2, np.log10(L_outer) / 2, d_outer - 1)])
    A = U @ D @ U.T
    X = rng.standard_normal((n_samples, 1, d_outer)) @ A
    hess_outer = X.transpose(0, 2, 1) @ X / X.shape[1]

    U, _, V = np.linalg.svd(rng.standard_normal((d_outer, d_inner)))
    k = min(d_outer, d_inner)
    D = np.zeros((d_outer, d_inner))
    D[:k, :k] = np.diag(np.logspace(np.log10(mu), np.log10(L_cross), k))
    X = rng.standard_normal((n_samples, 1, d_inner))
    X1 = U @ D @ X.transpose(0, 2, 1)
    X2 = X @ V.T
    cross = X1 @ X2
    return (
        hess_inner,
        hess_outer,
        cross,
        rng.standard_normal((n_samples, d_inner)),
        rng.standard_normal((n_samples, d_outer)),
    )


@dataclasses.dataclass(frozen=True)
class QuadraticValue:
    """The quadratic's value function in closed form, from the full-batch (mean) matrices.

    With G(z, x) = 1/2 z'Hz z + 1/2 x'Hx x + x'C z + a'z + b'x (inner) and F likewise with
    primed matrices, z*(x) = J x + c with J = -Hz^-1 C', c = -Hz^-1 a, and
    h(x) = F(J x + c, x) = 1/2 x'A x + g'x + const, A = J'Hz'J + Hx' + C'J + (C'J)' .

    Attributes:
        J (d_inner, d_outer), c (d_inner,), A (d_outer, d_outer), g (d_outer,), const: as above.
    """

    J: torch.Tensor
    c: torch.Tensor
    A: torch.Tensor
    g: torch.Tensor
    const: float

    @staticmethod
    def from_means(inner: dict[str, torch.Tensor], outer: dict[str, torch.Tensor]) -> QuadraticValue:
        Hz, C, a = inner["hess_inner"], inner["cross"], inner["linear_inner"]
        Hzo, Hxo, Co, ao, bo = (
            outer["hess_inner"],
            outer["hess_outer"],
            outer["cross"],
            outer["linear_inner"],
            outer["linear_outer"],
        )
        J = -torch.linalg.solve(Hz, C.T)
        c = -torch.linalg.solve(Hz, a)
        CoJ = Co @ J
        A = J.T @ Hzo @ J + Hxo + CoJ + CoJ.T
        g = J.T @ Hzo @ c + Co @ c + J.T @ ao + bo
        const = float(0.5 * c @ Hzo @ c + ao @ c)
        return QuadraticValue(J, c, 0.5 * (A + A.T), g, const)

    def value_and_grad(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        x = x.double()
        return float(0.5 * x @ self.A @ x + self.g @ x + self.const), self.A @ x + self.g

    def argmin(self) -> torch.Tensor:
        """x* = -A^-1 g (A is positive definite by construction of the data)."""
        return -torch.linalg.solve(self.A, self.g)


def _quadratic_loss(arr: dict[str, torch.Tensor]) -> Oracle:
    """Mean over idx of the benchmark's ``quadratic`` (1/2 z'H z + 1/2 x'H x + x'C z + a'z + b'x)."""

    n = arr["hess_inner"].shape[0]
    full = {k: v.mean(0) for k, v in arr.items()}

    def loss(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        # The loss is linear in the matrices, so the batch mean of the losses is the loss of the
        # batch means; on the full data those are computed once (the gather would copy them all).
        m = full if idx is None or idx.numel() == n else {k: v[idx].mean(0) for k, v in arr.items()}
        return (
            0.5 * z @ m["hess_inner"] @ z + 0.5 * x @ m["hess_outer"] @ x + x @ m["cross"] @ z
            + m["linear_inner"] @ z + m["linear_outer"] @ x
        )  # fmt: skip

    return loss


_KEYS = ("hess_inner", "hess_outer", "cross", "linear_inner", "linear_outer")


def quadratic(
    n_inner: int = 1024,
    n_outer: int = 1024,
    dim_inner: int = 100,
    dim_outer: int = 10,
    mu: float = 0.1,
    L_cross: float = 0.1,
    seed: int = 2442,
    dtype: torch.dtype = torch.float64,
) -> SuiteProblem:
    """The simulated quadratic (defaults: the benchmark's ``quadratics_021424`` shape at its
    default 1024 samples per level; mu_inner=0.1, L=1, L_cross=0.1).

    Raises:
        ValueError: no strongly convex value function in 20 draws (as the benchmark).
    """
    rng = np.random.default_rng(seed)
    for _ in range(20):
        inner_np = dict(zip(_KEYS, gen_matrices(n_inner, dim_inner, dim_outer, 1.0, 1.0, L_cross, mu, rng)))
        outer_np = dict(zip(_KEYS, gen_matrices(n_outer, dim_inner, dim_outer, 1.0, 1.0, L_cross, mu, rng)))
        means_in = {k: torch.from_numpy(v.mean(0)) for k, v in inner_np.items()}
        means_out = {k: torch.from_numpy(v.mean(0)) for k, v in outer_np.items()}
        qv = QuadraticValue.from_means(means_in, means_out)
        if float(torch.linalg.eigvalsh(qv.A)[0]) >= 1e-12:
            break
    else:
        raise ValueError("quadratic: no draw gave a strongly convex value function in 20 tries; change seed")
    arrays = {f"inner_{k}": v for k, v in inner_np.items()} | {f"outer_{k}": v for k, v in outer_np.items()}
    t_in = {k: torch.from_numpy(v).to(dtype) for k, v in inner_np.items()}
    t_out = {k: torch.from_numpy(v).to(dtype) for k, v in outer_np.items()}
    # The benchmark's start (objective.py without init_var): z0 = 0, x0 = -2.
    z0 = torch.zeros(dim_inner, dtype=torch.float64)
    x0 = torch.full((dim_outer,), -2.0, dtype=torch.float64)

    def inner_solution(x: torch.Tensor) -> torch.Tensor:
        return qv.J @ x.double() + qv.c

    return SuiteProblem(
        "quadratic", arrays, _quadratic_loss(t_in), _quadratic_loss(t_out), n_inner, n_outer,
        z0, x0, inner_solution, qv.value_and_grad,
    )  # fmt: skip


def quadratic_value(problem: SuiteProblem) -> QuadraticValue:
    """The closed form of a `quadratic` problem's value function, from its arrays."""
    means = [
        {k: torch.from_numpy(problem.arrays[f"{s}_{k}"].mean(0)) for k in _KEYS} for s in ("inner", "outer")
    ]
    return QuadraticValue.from_means(*means)


# ---------------------------------------------------------------------------------------------
# Logistic regressions


def _newton(
    value: Callable[[torch.Tensor], torch.Tensor],
    grad_hess: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    z: torch.Tensor,
    tol: float = 1e-13,
    max_iter: int = 50,
) -> torch.Tensor:
    """Damped Newton on a strongly convex objective; ``grad_hess(z) -> (value, grad, Hessian)``.

    Raises:
        RuntimeError: ||grad|| > tol after ``max_iter`` steps.
    """
    for _ in range(max_iter):
        f, g, H = grad_hess(z)
        if float(g.norm()) <= tol:
            return z
        step = torch.linalg.solve(H, g)
        decrement = float(g @ step)  # the Newton decrement squared: twice the predicted decrease
        if 0 <= decrement < 1e-10 * max(1.0, abs(float(f))):
            # The predicted decrease is below what float64 can see in f: Armijo's test would
            # reject a correct step by rounding; here, well inside the region of quadratic
            # convergence, the full step is the right one.
            z = z - step
            continue
        # Armijo backtracking; Newton on these self-concordant losses takes full steps near z*.
        # Far from z* with a nearly flat direction (curvature exp(x_k) only) the Newton step
        # can be orders of magnitude too long: backtrack until the step is below z's rounding.
        t = 1.0
        z_new = z - step
        floor = 1e-15 * (1.0 + float(z.norm())) / max(float(step.norm()), 1e-300)
        while float(value(z_new)) > float(f) - 0.25 * t * float(g @ step) and t > floor:
            t *= 0.5
            z_new = z - t * step
        if t <= floor:
            # No decrease left at float64 resolution: z is the minimizer to precision if the
            # gradient is small, otherwise the problem is too ill-conditioned to trust z.
            if float(g.norm()) <= 1e-7:
                return z
            raise RuntimeError(f"Newton: line search failed at ||grad|| = {float(g.norm()):.3g}")
        z = z_new
    f, g, H = grad_hess(z)
    if float(g.norm()) > 1e3 * tol:
        raise RuntimeError(f"Newton: ||grad|| = {float(g.norm()):.3g} after {max_iter} steps")
    return z


def _logreg_problem(
    name: str,
    Xtr: np.ndarray,
    Ytr: np.ndarray,
    Xval: np.ndarray,
    Yval: np.ndarray,
    z0: np.ndarray,
    x0: np.ndarray,
    dtype: torch.dtype,
) -> SuiteProblem:
    """Binary (Y 1-d in {-1, 1}) or multinomial (Y one-hot (n, K)) logistic regression with
    exp-parametrized L2 weights: one per feature (binary) or per class (multinomial)."""
    binary = Ytr.ndim == 1
    d = Xtr.shape[1]
    K = 1 if binary else Ytr.shape[1]
    Xt, Yt = torch.from_numpy(Xtr).to(dtype), torch.from_numpy(Ytr).to(dtype)
    Xv, Yv = torch.from_numpy(Xval).to(dtype), torch.from_numpy(Yval).to(dtype)

    def data_loss(z: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        if binary:
            return F.softplus(-Y * (X @ z)).mean()
        logits = X @ z.reshape(d, K)
        return (torch.logsumexp(logits, 1) - (logits * Y).sum(1)).mean()

    def penalty(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if binary:
            return 0.5 * (torch.exp(x) * z * z).sum()
        return 0.5 * torch.exp(x) @ (z.reshape(d, K) ** 2).sum(0)

    def inner(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return data_loss(z, Xt, Yt) + penalty(z, x)
        return data_loss(z, Xt[idx], Yt[idx]) + penalty(z, x)

    def outer(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return data_loss(z, Xv, Yv)
        return data_loss(z, Xv[idx], Yv[idx])

    X64, Y64 = torch.from_numpy(Xtr).double(), torch.from_numpy(Ytr).double()
    Xv64, Yv64 = torch.from_numpy(Xval).double(), torch.from_numpy(Yval).double()
    n = X64.shape[0]
    # Multinomial: the metric solves the inner problem in the row space of the training
    # features: writing z = Q w per class, Q an orthonormal basis of that space, is exact, since
    # the data term sees only X z and the penalty, the same on every feature of a class, puts
    # z*'s component in the null space of X at zero.  Without it a rank-deficient X (covtype's
    # one-hot groups each sum to one, and a category absent from training is a zero column)
    # leaves Newton directions of curvature exp(x_k) only.  Binary: one weight per feature,
    # which a rotation would mix, so Q = I (ijcnn1's X has full rank).
    if binary:
        Q = torch.eye(d, dtype=torch.float64)
    else:
        _, sv, Vt = torch.linalg.svd(X64, full_matrices=False)
        Q = Vt[: int((sv > 1e-10 * sv[0]).sum())].T  # (d, r)
    r = Q.shape[1]
    Xr, Xvr = X64 @ Q, Xv64 @ Q

    def lift(w: torch.Tensor) -> torch.Tensor:
        """z = Q w per class, flattened row-major (d, K) as the oracles' z."""
        return Q @ w if binary else (Q @ w.reshape(r, K)).reshape(-1)

    def reg_diag(x: torch.Tensor) -> torch.Tensor:
        """The penalty's Hessian diagonal exp(x) per coordinate of w (row-major (r, K))."""
        return torch.exp(x) if binary else torch.exp(x).repeat(r)

    def data_grad_hess(
        z: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, hess: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, p = X.shape
        if binary:
            s = X @ z
            f = F.softplus(-Y * s).mean()
            pr = torch.sigmoid(-Y * s)  # d/ds softplus(-y s) = -y sigmoid(-y s)
            g = X.T @ (-Y * pr) / m
            H = (X * (pr * (1 - pr))[:, None]).T @ X / m if hess else torch.empty(0)
            return f, g, H
        logits = X @ z.reshape(p, K)
        f = (torch.logsumexp(logits, 1) - (logits * Y).sum(1)).mean()
        P = torch.softmax(logits, 1)
        g = (X.T @ (P - Y) / m).reshape(-1)
        if not hess:
            return f, g, torch.empty(0)
        # H[(i,k),(j,l)] = mean_n X_ni X_nj (P_nk d_kl - P_nk P_nl)
        H = torch.zeros(p, K, p, K, dtype=X.dtype)
        for k in range(K):
            H[:, k, :, k] = (X * P[:, k : k + 1]).T @ X / m
        M = (X[:, :, None] * P[:, None, :]).reshape(m, p * K)
        return f, g, H.reshape(p * K, p * K) - M.T @ M / m

    # The start's component in the row space (z0 = 0 for covtype; ijcnn1's X has full rank).
    z0_64 = torch.from_numpy(z0).double()
    w0 = Q.T @ z0_64 if binary else Q.T @ z0_64.reshape(d, K)
    cache: dict[str, torch.Tensor] = {"w": w0.reshape(-1).clone()}

    def reduced_solution(x: torch.Tensor) -> torch.Tensor:
        """w*(x), float64 (r K,), by Newton warm-started from the last answer (the metric is
        evaluated along trajectories)."""
        x = x.double()
        lam = reg_diag(x)

        def gh(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            f, g, H = data_grad_hess(w, Xr, Y64)
            return f + 0.5 * (lam * w * w).sum(), g + lam * w, H + torch.diag(lam)

        def val(w: torch.Tensor) -> torch.Tensor:
            return data_loss(lift(w), X64, Y64) + 0.5 * (lam * w * w).sum()

        w = _newton(val, gh, cache["w"])
        cache["w"] = w
        return w

    def inner_solution(x: torch.Tensor) -> torch.Tensor:
        return lift(reduced_solution(x))

    def value_and_grad(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        x = x.double()
        w = reduced_solution(x)
        lam = reg_diag(x)
        _, _, H = data_grad_hess(w, Xr, Y64)
        fval, gw, _ = data_grad_hess(w, Xvr, Yv64, hess=False)
        u = torch.linalg.solve(H + torch.diag(lam), gw)
        # d2G/dx dw: d/dx_j of exp(x) w (the inner gradient's penalty part) is exp(x_j) w on the
        # coordinates x_j weighs; grad h = dF/dx - (d2G/dx dw) u with dF/dx = 0.
        if binary:
            gx = -torch.exp(x) * w * u
        else:
            gx = -torch.exp(x) * (w * u).reshape(r, K).sum(0)
        return float(fval), gx

    def validation_error(z: torch.Tensor) -> float:
        """Misclassification rate on the validation set at the inner variable ``z`` (covtype's
        ``value`` metric in the benchmark, computed there at the solver's own inner iterate)."""
        z = z.double()
        if binary:
            return float((torch.sign(Xv64 @ z) != Yv64).double().mean())
        return float(((Xv64 @ z.reshape(d, K)).argmax(1) != Yv64.argmax(1)).double().mean())

    return SuiteProblem(
        name, {"X_train": Xtr, "y_train": Ytr, "X_val": Xval, "y_val": Yval}, inner, outer,
        n, Xv64.shape[0], torch.from_numpy(z0).double(), torch.from_numpy(x0).double(),
        inner_solution, value_and_grad, validation_error,
    )  # fmt: skip


def ijcnn1(
    n_train: int = 49_990, n_val: int = 91_701, seed: int = 2442, dtype: torch.dtype = torch.float64
) -> SuiteProblem:
    """Logistic regression with one L2 weight per feature at ijcnn1's shape (22 features).

    Data: correlated Gaussian features scaled into ijcnn1's range, labels in {-1, 1} from a
    logistic model whose weights span three orders of magnitude (so some features are worth
    penalizing and some are not); the start as the benchmark's ``init_var``: z0 ~ N(0, I),
    x0 = log U(0, 1).
    """
    rng = np.random.default_rng(seed)
    d = 22
    L = np.tril(rng.standard_normal((d, d))) / np.sqrt(d) + np.eye(d)
    scale = rng.uniform(0.1, 1.0, d)
    X = (rng.standard_normal((n_train + n_val, d)) @ L.T) * scale
    w = rng.standard_normal(d) * np.logspace(-2, 1, d)
    logits = X @ w
    y = np.where(rng.random(n_train + n_val) < 1 / (1 + np.exp(-logits)), 1.0, -1.0)
    z0 = rng.standard_normal(d)
    x0 = np.log(rng.uniform(size=d))
    return _logreg_problem(
        "ijcnn1", X[:n_train], y[:n_train], X[n_train:], y[n_train:], z0, x0, dtype
    )  # fmt: skip


def covtype(
    n_train: int = 20_000, n_val: int = 5_000, seed: int = 2442, dtype: torch.dtype = torch.float64
) -> SuiteProblem:
    """Multinomial logistic regression with one L2 weight per class at covtype's width.

    Features: 10 continuous (correlated Gaussian), one-hot of 4 (wilderness area) and of 40
    (soil type) categories, standardized like the benchmark's ``StandardScaler``; 7 classes
    from a softmax model with unequal class frequencies (no class separable, so the
    unregularized fit exists and z*(x) is well defined for every x).  Start: the benchmark's (objective.py
    without ``init_var``): z0 = 0, x0 = -2.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    cont = rng.standard_normal((n, 10)) @ (np.eye(10) + 0.3 * rng.standard_normal((10, 10)))
    wild = np.eye(4)[rng.choice(4, n, p=[0.45, 0.05, 0.43, 0.07])]
    soil = np.eye(40)[rng.choice(40, n, p=rng.dirichlet(np.full(40, 0.5)))]
    X = np.concatenate([cont, wild, soil], 1)
    W = rng.standard_normal((54, 7)) * 0.15
    bias = np.log([0.36, 0.45, 0.06, 0.02, 0.03, 0.04, 0.04])
    logits = X @ W + bias
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    labels = (P.cumsum(1) > rng.random((n, 1))).argmax(1)
    Y = np.eye(7)[labels]
    Xtr, Xval = X[:n_train], X[n_train:]
    mean, std = Xtr.mean(0), Xtr.std(0)
    std[std == 0] = 1.0
    Xtr, Xval = (Xtr - mean) / std, (Xval - mean) / std
    z0 = np.zeros(54 * 7)
    x0 = np.full(7, -2.0)
    return _logreg_problem("covtype", Xtr, Y[:n_train], Xval, Y[n_train:], z0, x0, dtype)


PROBLEMS: dict[str, Callable[..., SuiteProblem]] = {
    "quadratic": quadratic,
    "ijcnn1": ijcnn1,
    "covtype": covtype,
}


#: Boxes on x for `reference_optimum`.  covtype's h has no minimizer: it keeps falling as five of
#: the seven log-weights go to -inf, where the inner problem loses strong convexity (softmax
#: logits are invariant to a shift shared by all classes, so the data term is flat along it and
#: only exp(x) curves it; beyond x ~ -20 float64 Newton no longer solves it).  Its h* is the
#: minimum over this box, and x* sits on the box's lower face in those coordinates.
OPTIMUM_BOUNDS: dict[str, tuple[float, float]] = {"covtype": (-15.0, 10.0)}


def reference_optimum(
    problem: SuiteProblem, gtol: float = 1e-9, max_iter: int = 3000
) -> tuple[float, np.ndarray]:
    """h* and x*: closed form for the quadratic; otherwise L-BFGS(-B) on the exact (h, grad h),
    within `OPTIMUM_BOUNDS` where the problem has a box there.

    Returns:
        (h*, x*) in float64.

    Raises:
        RuntimeError: L-BFGS stopped with a (projected) ||grad h|| > 1e3 gtol (h* would not be
            trustworthy).
    """
    if problem.name == "quadratic":
        qv = quadratic_value(problem)
        x = qv.argmin()
        return qv.value_and_grad(x)[0], x.numpy()
    from scipy.optimize import minimize

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = problem.value_and_grad(torch.from_numpy(x))
        return v, g.numpy()

    box = OPTIMUM_BOUNDS.get(problem.name)
    res = minimize(fun, problem.x0.numpy(), jac=True, method="L-BFGS-B",
                   bounds=None if box is None else [box] * problem.dim_outer,
                   options={"gtol": gtol, "ftol": 1e-16, "maxiter": max_iter})  # fmt: skip
    g = fun(res.x)[1]
    if box is not None:  # the projected gradient: no component pushing out through a face
        g = np.where(((res.x <= box[0]) & (g > 0)) | ((res.x >= box[1]) & (g < 0)), 0.0, g)
    gnorm = float(np.linalg.norm(g))
    if gnorm > 1e3 * gtol:
        raise RuntimeError(f"reference_optimum({problem.name}): L-BFGS stopped at ||grad h|| = {gnorm:.3g}")
    return float(res.fun), res.x


def main() -> None:
    """Write every problem's arrays to ``results/bilevel_suite/data/<name>.npz`` (for the JAX runner)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--problems", default=",".join(PROBLEMS))
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    a = p.parse_args()
    for name in a.problems.split(","):
        print(PROBLEMS[name]().save_npz(a.data_dir))


if __name__ == "__main__":
    main()
