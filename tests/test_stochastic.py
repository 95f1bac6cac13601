"""Stochastic bilevel solvers (SOBA, SABA, StocBiO) against NumPy references of the papers' updates.

* Iterates: a NumPy implementation, written here from the papers (Dagréou et al. 2022 for SOBA and
  SABA, Ji et al. 2021 for StocBiO) with closed-form derivatives of a ridge problem with one
  log-weight per feature, and the documented batch recipe, gives the same z, v, x for a few
  steps in float64 (to 1e-12).
* Convergence: on a small instance of Benchopt's simulated quadratic (its ``gen_matrices``
  generator, ported to NumPy), whose value function h(x) = F(z*(x), x) is quadratic with a
  closed-form minimizer, SABA and full-batch SOBA reach x* to 1e-6 relative.
* Guards: NaN oracles, oversized batches, diverging step sizes and bad arguments raise errors
  that name the cause and the setting to change.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from bilevel import BilevelError, BilevelWarning, ConvergenceError, NonFiniteError, StructureError
from bilevel.hyperopt import (
    SABA,
    SOBA,
    Constant,
    Decay,
    StocBiO,
    StochasticBilevel,
    StochasticRecord,
    StochasticStop,
    batch_schedule,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# The ridge problem with per-feature weights, and its closed-form derivatives (NumPy)
#   g_i(z, x) = 0.5 (a_i.z - b_i)^2 + 0.5 sum_k exp(x_k) z_k^2        (inner, n samples)
#   f_j(z, x) = 0.5 (c_j.z - d_j)^2 + 0.5 r |x|^2                      (outer, m samples)
# --------------------------------------------------------------------------------------------


class Ridge:
    def __init__(self, n: int, m: int, d: int, seed: int = 0, r: float = 0.1) -> None:
        rng = np.random.default_rng(seed)
        self.a, self.b = rng.normal(size=(n, d)), rng.normal(size=n)
        self.c, self.dv = rng.normal(size=(m, d)), rng.normal(size=m)
        self.n, self.m, self.d, self.r = n, m, d, r

    # closed forms on a batch of indices (means over the batch)
    def g_z(self, z: np.ndarray, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        a = self.a[idx]
        return a.T @ (a @ z - self.b[idx]) / len(idx) + np.exp(x) * z

    def hvp(self, z: np.ndarray, x: np.ndarray, v: np.ndarray, idx: np.ndarray) -> np.ndarray:
        a = self.a[idx]
        return a.T @ (a @ v) / len(idx) + np.exp(x) * v

    def cross(self, z: np.ndarray, x: np.ndarray, v: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # d/dx of <grad_z G, v> = exp(x) * z * v (G's data term does not depend on x)
        return np.exp(x) * z * v

    def f_z(self, z: np.ndarray, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        c = self.c[idx]
        return c.T @ (c @ z - self.dv[idx]) / len(idx)

    def f_x(self, z: np.ndarray, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return self.r * x

    def torch_problem(self) -> StochasticBilevel:
        a, b, c, dv = (torch.tensor(t, dtype=F64) for t in (self.a, self.b, self.c, self.dv))
        r = self.r

        def inner(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return 0.5 * ((a[idx] @ z - b[idx]) ** 2).mean() + 0.5 * (x.exp() * z**2).sum()

        def outer(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return 0.5 * ((c[idx] @ z - dv[idx]) ** 2).mean() + 0.5 * r * (x**2).sum()

        return StochasticBilevel(inner, outer, self.n, self.m)


class RefSampler:
    """The documented batch recipe, written out independently of the library."""

    def __init__(self, n: int, b: int, ss: np.random.SeedSequence, contiguous: bool = False) -> None:
        self.rng = np.random.default_rng(ss)
        # contiguous: Benchopt's batches, consecutive blocks of the stored order
        perm = np.arange(n) if contiguous else self.rng.permutation(n)
        self.batches = [perm[i : i + b] for i in range(0, n, b)]
        self.nb, self.n = len(self.batches), n
        self.order: list[int] = []

    def next(self) -> tuple[int, np.ndarray, float, float]:
        """(batch id, indices, weight |B|/n, scale n_b |B|/n)."""
        if not self.order:
            self.order = list(self.rng.permutation(self.nb))
        j = int(self.order.pop(0))
        w = len(self.batches[j]) / self.n
        return j, self.batches[j], w, self.nb * w


def samplers(p: Ridge, b: int, seed: int, contiguous: bool = False) -> tuple[RefSampler, RefSampler]:
    si, so = np.random.SeedSequence(seed).spawn(2)
    return RefSampler(p.n, b, si, contiguous), RefSampler(p.m, b, so, contiguous)


def ref_soba(
    p: Ridge,
    z: np.ndarray,
    x: np.ndarray,
    steps: int,
    rho: float,
    gamma: float,
    b: int,
    seed: int,
    e_in: float = 0.0,
    e_out: float = 0.0,
    contiguous: bool = False,
) -> tuple[np.ndarray, ...]:
    """SOBA (Dagréou et al. 2022, Algorithm 1), step sizes rho / (t+1)^e_in, gamma / (t+1)^e_out."""
    si, so = samplers(p, b, seed, contiguous)
    z, x, v = z.copy(), x.copy(), np.zeros_like(z)
    for t in range(steps):
        _, i, _, s = si.next()
        _, j, _, s2 = so.next()
        dz = s * p.g_z(z, x, i)
        dv = s * p.hvp(z, x, v, i) + s2 * p.f_z(z, x, j)
        dx = s * p.cross(z, x, v, i) + s2 * p.f_x(z, x, j)
        rt, gt = rho / (t + 1) ** e_in, gamma / (t + 1) ** e_out
        z, v, x = z - rt * dz, v - rt * dv, x - gt * dx
    return z, v, x


def ref_saba(
    p: Ridge, z: np.ndarray, x: np.ndarray, steps: int, rho: float, gamma: float, b: int, seed: int
) -> tuple[np.ndarray, ...]:
    """SABA (Dagréou et al. 2022, Algorithm 2): SAGA on the five terms, memories start at 0."""
    si, so = samplers(p, b, seed)
    z, x, v = z.copy(), x.copy(), np.zeros_like(z)
    mem = {k: np.zeros((si.nb if k in ("g", "h", "c") else so.nb, p.d)) for k in ("g", "h", "c", "fz", "fx")}
    avg = {k: np.zeros(p.d) for k in mem}

    def saga(k: str, j: int, new: np.ndarray, w: float, s: float) -> np.ndarray:
        diff = new - mem[k][j]
        out = s * diff + avg[k]
        avg[k] = avg[k] + w * diff
        mem[k][j] = new
        return out

    for _ in range(steps):
        i, bi, w, s = si.next()
        j, bj, w2, s2 = so.next()
        g = saga("g", i, p.g_z(z, x, bi), w, s)
        h = saga("h", i, p.hvp(z, x, v, bi), w, s)
        c = saga("c", i, p.cross(z, x, v, bi), w, s)
        fz = saga("fz", j, p.f_z(z, x, bj), w2, s2)
        fx = saga("fx", j, p.f_x(z, x, bj), w2, s2)
        z, v, x = z - rho * g, v - rho * (h + fz), x - gamma * (c + fx)
    return z, v, x


def ref_stocbio(
    p: Ridge,
    z: np.ndarray,
    x: np.ndarray,
    steps: int,
    alpha: float,
    gamma: float,
    eta: float,
    n_inner: int,
    n_neumann: int,
    b: int,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """StocBiO (Ji et al. 2021, Algorithm 2 with the Neumann estimator, Algorithm 3)."""
    si, so = samplers(p, b, seed)
    z, x = z.copy(), x.copy()
    v = np.zeros_like(z)
    for _ in range(steps):
        for _ in range(n_inner):
            _, i, _, s = si.next()
            z = z - alpha * s * p.g_z(z, x, i)
        _, j, _, s2 = so.next()
        q, gx = s2 * p.f_z(z, x, j), s2 * p.f_x(z, x, j)
        pk, u = q.copy(), q.copy()
        for _ in range(n_neumann):
            _, i, _, s = si.next()
            pk = pk - eta * s * p.hvp(z, x, pk, i)
            u = u + pk
        v = -eta * u
        _, i, _, s = si.next()
        x = x - gamma * (s * p.cross(z, x, v, i) + gx)
    return z, v, x


def start(p: Ridge) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return 0.5 * rng.normal(size=p.d), 0.3 * rng.normal(size=p.d)


def assert_iterates(res: object, ref: tuple[np.ndarray, ...]) -> None:
    z, v, x = ref
    for got, want in ((res.z, z), (res.v, v), (res.x, x)):  # type: ignore[attr-defined]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


# n = 10 with batches of 3: four batches, the last of one sample (the weighting is exercised);
# with batches of 5 every scale is 1 (the papers' and Benchopt's updates as they are written).
@pytest.mark.parametrize("b", [3, 5])
def test_soba_iterates_equal_reference(b: int) -> None:
    p = Ridge(10, 8, 4)
    z0, x0 = start(p)
    res = SOBA(inner_lr=0.2, outer_lr=0.1, batch_size=b).run(
        p.torch_problem(), torch.tensor(z0), torch.tensor(x0), max_iter=9, seed=3
    )
    assert res.n_iter == 9
    assert_iterates(res, ref_soba(p, z0, x0, 9, 0.2, 0.1, b, seed=3))


def recording(p: Ridge) -> tuple[StochasticBilevel, list[list[int]]]:
    """p's problem whose inner oracle records the batches it is called on."""
    problem = p.torch_problem()
    seen: list[list[int]] = []

    def inner(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        seen.append(idx.tolist())
        return problem.inner(z, x, idx)

    return StochasticBilevel(inner, problem.outer, p.n, p.m), seen


@pytest.mark.parametrize("b", [3, 5])
def test_contiguous_batches_are_consecutive_blocks_and_iterates_equal_reference(b: int) -> None:
    p = Ridge(10, 8, 4)
    problem, seen = recording(p)
    z0, x0 = start(p)
    res = SOBA(inner_lr=0.2, outer_lr=0.1, batch_size=b, contiguous_batches=True).run(
        problem,
        torch.tensor(z0),
        torch.tensor(x0),
        max_iter=9,
        seed=3,
    )
    assert_iterates(res, ref_soba(p, z0, x0, 9, 0.2, 0.1, b, seed=3, contiguous=True))
    blocks = [list(range(i, min(i + b, p.n))) for i in range(0, p.n, b)]
    calls = [q for q in seen if q]  # one inner call per iteration
    assert all(q in blocks for q in calls)
    epoch = len(blocks)
    assert sorted(map(tuple, calls[:epoch])) == sorted(map(tuple, blocks))  # each block once per epoch
    assert calls[:epoch] != blocks or calls[epoch : 2 * epoch] != blocks  # in a random order
    assert batch_schedule(7, 3, np.random.default_rng(0), contiguous=True)[2].tolist() == [6]
    with pytest.raises(TypeError, match="contiguous_batches"):
        SABA(0.1, 0.1, contiguous_batches="yes")  # type: ignore[arg-type]


def test_soba_decreasing_steps_equal_reference() -> None:
    p = Ridge(10, 8, 4)
    z0, x0 = start(p)
    res = SOBA(0.2, 0.1, batch_size=3, inner_schedule=Decay(0.4), outer_schedule=Decay(0.6)).run(
        p.torch_problem(), torch.tensor(z0), torch.tensor(x0), max_iter=9, seed=1
    )
    assert_iterates(res, ref_soba(p, z0, x0, 9, 0.2, 0.1, 3, seed=1, e_in=0.4, e_out=0.6))


@pytest.mark.parametrize("solver", [SOBA, SABA], ids=lambda s: s.__name__)
@pytest.mark.parametrize(
    "factor, shown", [(math.nan, "nan"), (-0.5, "-0.5"), (math.inf, "inf"), ("fast", "'fast'")]
)
def test_a_schedule_that_returns_a_bad_factor_is_named(solver: type, factor: object, shown: str) -> None:
    """A schedule whose factor at some t is NaN, negative, infinite or not a number stops the run
    there with the schedule named, rather than as NONFINITE iterates or a silent reversal."""
    p = Ridge(10, 8, 4)
    z0, x0 = start(p)

    def sick(t: int) -> object:
        return 1.0 if t < 3 else factor

    run = solver(0.2, 0.1, batch_size=3, outer_schedule=sick)
    with pytest.raises(
        ValueError, match=rf"{solver.__name__}: outer_schedule\(3\) returned {shown}; a schedule"
    ):
        run.run(p.torch_problem(), torch.tensor(z0), torch.tensor(x0), max_iter=9)
    # a factor of 0 (the end of a schedule that decays to zero) is a step of 0, not an error
    still = solver(0.2, 0.1, batch_size=3, inner_schedule=lambda t: 0.0, outer_schedule=lambda t: 0.0)
    res = still.run(p.torch_problem(), torch.tensor(z0), torch.tensor(x0), max_iter=4)
    torch.testing.assert_close(res.x, torch.tensor(x0), rtol=0, atol=0)


@pytest.mark.parametrize("b", [3, 5])
def test_saba_iterates_equal_reference(b: int) -> None:
    p = Ridge(10, 8, 4)
    z0, x0 = start(p)
    # 11 steps: past the first epoch, so memories are reused and replaced.
    res = SABA(inner_lr=0.2, outer_lr=0.1, batch_size=b).run(
        p.torch_problem(), torch.tensor(z0), torch.tensor(x0), max_iter=11, seed=5
    )
    assert_iterates(res, ref_saba(p, z0, x0, 11, 0.2, 0.1, b, seed=5))


@pytest.mark.parametrize("b", [3, 5])
def test_stocbio_iterates_equal_reference(b: int) -> None:
    p = Ridge(10, 8, 4)
    z0, x0 = start(p)
    res = StocBiO(
        inner_lr=0.2, outer_lr=0.1, neumann_lr=0.15, n_inner_steps=3, n_neumann_steps=4, batch_size=b
    ).run(p.torch_problem(), torch.tensor(z0), torch.tensor(x0), max_iter=4, seed=2)
    assert_iterates(res, ref_stocbio(p, z0, x0, 4, 0.2, 0.1, 0.15, 3, 4, b, seed=2))


def test_batches_visit_every_sample_once_per_epoch() -> None:
    p = Ridge(10, 8, 4)
    problem, seen = recording(p)
    z0, x0 = start(p)
    res = SOBA(0.1, 0.1, batch_size=3).run(problem, torch.tensor(z0), torch.tensor(x0), max_iter=8)
    assert sorted(i for batch in seen[:4] for i in batch) == list(range(10))
    assert sorted(i for batch in seen[4:] for i in batch) == list(range(10))
    # the partition is fixed: the second epoch reuses the first epoch's batches
    assert sorted(map(sorted, seen[:4])) == sorted(map(sorted, seen[4:]))
    assert res.inner_epochs == pytest.approx(2.0)
    # outer: 8 batches of the 3 (sizes 3, 3, 2) = two epochs and two batches of the third
    assert res.outer_epochs * 8 in (16 + 5, 16 + 6)
    parts = batch_schedule(10, 3, np.random.default_rng(0))
    assert [len(q) for q in parts] == [3, 3, 3, 1]


# --------------------------------------------------------------------------------------------
# Benchopt's simulated quadratic (datasets/simulated.py, benchmark_utils/gen_matrices.py)
# --------------------------------------------------------------------------------------------


def gen_matrices(
    n: int,
    d_in: int,
    d_out: int,
    l_inner: float,
    l_outer: float,
    l_cross: float,
    mu: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, ...]:
    """benchmark_utils/gen_matrices.py in NumPy: per-sample rank-one Hessians x x^T with
    spectrum in [mu, L], cross matrices with singular values in [mu, L_cross], Gaussian linear terms."""
    u, _, _ = np.linalg.svd(rng.normal(size=(d_in, 1)))
    a = u @ np.diag(np.logspace(np.log10(mu) / 2, np.log10(l_inner) / 2, d_in)) @ u.T
    xs = rng.normal(size=(n, 1, d_in)) @ a
    h_in = xs.transpose(0, 2, 1) @ xs
    u, _, _ = np.linalg.svd(rng.normal(size=(d_out, 1)))
    a = u @ np.diag(np.r_[0, np.logspace(np.log10(mu) / 2, np.log10(l_outer) / 2, d_out - 1)]) @ u.T
    xs = rng.normal(size=(n, 1, d_out)) @ a
    h_out = xs.transpose(0, 2, 1) @ xs
    u, _, vt = np.linalg.svd(rng.normal(size=(d_out, d_in)))
    k = min(d_out, d_in)
    dm = np.zeros((d_out, d_in))
    dm[:k, :k] = np.diag(np.logspace(np.log10(mu), np.log10(l_cross), k))
    xs = rng.normal(size=(n, 1, d_in))
    cross = (u @ dm @ xs.transpose(0, 2, 1)) @ (xs @ vt.T)
    return h_in, h_out, cross, rng.normal(size=(n, d_in)), rng.normal(size=(n, d_out))


class Quadratic:
    """Per-sample quadratics q_i(z, x) = z'H_i z / 2 + x'K_i x / 2 + x'C_i z + b_i'z + c_i'x in
    both levels; h(x) = F(z*(x), x) is quadratic, minimized in closed form."""

    def __init__(self, n: int, m: int, d_in: int, d_out: int, mu: float, seed: int) -> None:
        # Like the benchmark's get_data: redraw until h is strongly convex (here with a margin,
        # so that a test of a few thousand steps reaches 1e-6).
        rng = np.random.default_rng(seed)
        for _ in range(50):
            self.inner_data = gen_matrices(n, d_in, d_out, 1.0, 1.0, 0.1, mu, rng)
            self.outer_data = gen_matrices(m, d_in, d_out, 1.0, 1.0, 0.1, mu, rng)
            hzz, _, cg, bz, _ = (t.mean(0) for t in self.inner_data)
            a, b, dm, cz, cx = (t.mean(0) for t in self.outer_data)
            jac = -np.linalg.solve(hzz, cg.T)  # dz*/dx
            k = -np.linalg.solve(hzz, bz)  # z*(0)
            # h''(x): the benchmark's get_hessian_min_eigval, with the x'D z term's full weight
            hess = jac.T @ a @ jac + jac.T @ dm.T + dm @ jac + b
            if np.linalg.eigvalsh(hess).min() > 0.05:
                break
        else:  # pragma: no cover - the generator's distribution makes this vanishingly rare
            raise RuntimeError("no strongly convex instance drawn")
        self.x_star = np.linalg.solve(hess, -(jac.T @ a @ k + jac.T @ cz + dm @ k + cx))
        self.z_star = jac @ self.x_star + k
        self.n, self.m = n, m

    def problem(self) -> StochasticBilevel:
        def loss(data: tuple[np.ndarray, ...]) -> object:
            h, kk, c, b, e = (torch.tensor(t, dtype=F64) for t in data)

            def f(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                hz = torch.einsum("bij,j->bi", h[idx], z)
                kx = torch.einsum("bij,j->bi", kk[idx], x)
                cz = torch.einsum("bij,j->bi", c[idx], z)
                return (0.5 * hz @ z + 0.5 * kx @ x + cz @ x + b[idx] @ z + e[idx] @ x).mean()

            return f

        return StochasticBilevel(loss(self.inner_data), loss(self.outer_data), self.n, self.m)  # type: ignore[arg-type]

    def rel_error(self, res: object) -> tuple[float, float]:
        x, z = res.x.numpy(), res.z.numpy()  # type: ignore[attr-defined]
        return (
            float(np.linalg.norm(x - self.x_star) / np.linalg.norm(self.x_star)),
            float(np.linalg.norm(z - self.z_star) / np.linalg.norm(self.z_star)),
        )


@pytest.fixture(scope="module")
def quad() -> Quadratic:
    return Quadratic(n=32, m=32, d_in=5, d_out=3, mu=0.3, seed=0)


def test_saba_reaches_closed_form_optimum(quad: Quadratic) -> None:
    # Constant steps: SAGA's estimates lose their variance at the solution, so SABA converges
    # (linearly, the problem being strongly convex) to x*, not to a noise floor.
    res = SABA(inner_lr=QUAD_LR, outer_lr=QUAD_LR, batch_size=8).run(
        quad.problem(), torch.zeros(5, dtype=F64), torch.zeros(3, dtype=F64), max_iter=QUAD_ITERS
    )
    ex, ez = quad.rel_error(res)
    assert ex < 1e-6 and ez < 1e-6, (ex, ez)


def test_soba_full_batch_reaches_closed_form_optimum(quad: Quadratic) -> None:
    # SOBA with constant steps and mini-batches stalls at a noise floor proportional to the
    # steps, and the paper's decreasing steps converge at O(T^-2/5): 1e-6 would take ~1e15
    # steps.  With the batch equal to the data its directions are exact, it is gradient
    # descent on the joint (z, v, x) dynamics, and converges linearly to x*.
    res = SOBA(inner_lr=QUAD_LR, outer_lr=QUAD_LR, batch_size=32).run(
        quad.problem(), torch.zeros(5, dtype=F64), torch.zeros(3, dtype=F64), max_iter=QUAD_ITERS
    )
    ex, ez = quad.rel_error(res)
    assert ex < 1e-6 and ez < 1e-6, (ex, ez)


def test_soba_decreasing_steps_beat_the_constant_noise_floor(quad: Quadratic) -> None:
    # Mini-batch SOBA: with constant steps of 1.0 it wanders at a noise floor of the size of the
    # step (tens of percent here); the paper's schedule (Decay(0.4) for z and v, Decay(0.6) for
    # x) from the same base step shrinks it.  No 1e-6: the rate is O(T^-2/5).
    problem = quad.problem()
    z0, x0 = torch.zeros(5, dtype=F64), torch.zeros(3, dtype=F64)
    decaying = SOBA(1.0, 1.0, batch_size=8, inner_schedule=Decay(0.4), outer_schedule=Decay(0.6))
    ex_decay, _ = quad.rel_error(decaying.run(problem, z0, x0, max_iter=1000))
    ex_const, _ = quad.rel_error(SOBA(1.0, 1.0, batch_size=8).run(problem, z0, x0, max_iter=1000))
    assert ex_decay < 0.1 < ex_const, (ex_decay, ex_const)


# Steps below 1 / L for the batch Hessians of this instance; 600 iterations reach 1e-8 or so.
QUAD_LR = 0.3
QUAD_ITERS = 600


# --------------------------------------------------------------------------------------------
# Records, callback, stop rules
# --------------------------------------------------------------------------------------------


def test_history_records_and_callback(quad: Quadratic) -> None:
    seen: list[StochasticRecord] = []
    res = SABA(QUAD_LR, QUAD_LR, batch_size=8).run(
        quad.problem(),
        torch.zeros(5, dtype=F64),
        torch.zeros(3, dtype=F64),
        max_iter=25,
        eval_every=10,
        callback=seen.append,
        metric=lambda z, x: float(x.sum()),
    )
    assert [r.iteration for r in res.history] == [0, 10, 20, 25]
    assert list(res.history) == seen
    assert res.status is StochasticStop.COMPLETED
    last = res.history[-1]
    assert last.metric == pytest.approx(float(res.x.sum()), rel=1e-12)
    assert last.x_norm == pytest.approx(float(res.x.norm()), rel=1e-12)
    assert last.inner_epochs == pytest.approx(25 * 8 / 32)
    # the recorded outer loss is F on all outer samples at the final iterates
    full = quad.problem().outer(res.z, res.x, torch.arange(32))
    assert last.outer_loss == pytest.approx(float(full), rel=1e-12)
    assert [r.time for r in res.history] == sorted(r.time for r in res.history)


def test_callback_and_time_limit_stop(quad: Quadratic) -> None:
    z0, x0 = torch.zeros(5, dtype=F64), torch.zeros(3, dtype=F64)
    res = SOBA(0.1, 0.1, batch_size=8).run(
        quad.problem(), z0, x0, max_iter=100, eval_every=5, callback=lambda r: r.iteration >= 10
    )
    assert res.status is StochasticStop.CALLBACK and res.n_iter == 10
    res = SOBA(0.1, 0.1, batch_size=8).run(quad.problem(), z0, x0, max_iter=10**6, time_limit=0.05)
    assert res.status is StochasticStop.TIME_LIMIT and 0 < res.n_iter < 10**6
    with pytest.raises(TypeError, match="callback returned int"):
        SOBA(0.1, 0.1, batch_size=8).run(
            quad.problem(), z0, x0, max_iter=3, eval_every=1, callback=lambda r: 1
        )


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------


def _nan_after(fn: object, calls: int, shape: tuple[int, ...] = ()) -> object:
    """Wrap a batch loss so that it returns NaN from its ``calls``-th call on."""
    count = [0]

    def wrapped(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        out = fn(z, x, idx)  # type: ignore[operator]
        return out * math.nan if count[0] > calls else out

    return wrapped


SOLVERS = [
    SOBA(0.1, 0.1, batch_size=3),
    SABA(0.1, 0.1, batch_size=3),
    StocBiO(0.1, 0.1, n_inner_steps=2, n_neumann_steps=2, batch_size=3),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_nan_inner_oracle_is_named(solver: object) -> None:
    p = Ridge(10, 8, 4)
    pb = p.torch_problem()
    z0, x0 = (torch.tensor(t) for t in start(p))
    bad = StochasticBilevel(_nan_after(pb.inner, 4), pb.outer, 10, 8)  # type: ignore[arg-type]
    it = 4 if not isinstance(solver, StocBiO) else 0  # StocBiO calls the inner oracle 5 times per iteration
    with pytest.raises(NonFiniteError, match=f"inner oracle's .* NaN or infinite at iteration {it}"):
        solver.run(bad, z0, x0, max_iter=20)  # type: ignore[attr-defined]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_nan_outer_oracle_is_named(solver: object) -> None:
    p = Ridge(10, 8, 4)
    pb = p.torch_problem()
    z0, x0 = (torch.tensor(t) for t in start(p))
    bad = StochasticBilevel(pb.inner, _nan_after(pb.outer, 2), 10, 8)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteError, match="outer oracle's gradient is NaN or infinite at iteration 2"):
        solver.run(bad, z0, x0, max_iter=20)  # type: ignore[attr-defined]


def test_batch_larger_than_data() -> None:
    p = Ridge(10, 8, 4).torch_problem()
    z0, x0 = torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64)
    with pytest.raises(
        ValueError, match=r"batch_size=11\): larger than the data \(n_inner = 10\); the largest batch is 10"
    ):
        SOBA(0.1, 0.1, batch_size=11).run(p, z0, x0)
    with pytest.raises(ValueError, match=r"batch_size=9\): larger than the data \(n_outer = 8\)"):
        SABA(0.1, 0.1, batch_size=9).run(p, z0, x0)
    with pytest.raises(ValueError, match=r"outer_batch_size=9\).*n_outer = 8"):
        StocBiO(0.1, 0.1, batch_size=2, outer_batch_size=9).run(p, z0, x0)


@pytest.mark.parametrize(
    ("solver", "name"),
    [
        (SOBA(5.0, 0.01, batch_size=8), "inner_lr"),
        (SABA(5.0, 0.01, batch_size=8), "inner_lr"),
        (SOBA(0.1, 200.0, batch_size=32), "outer_lr"),
        (StocBiO(5.0, 0.01, batch_size=8, n_inner_steps=2, n_neumann_steps=1), "inner_lr"),
        (StocBiO(0.1, 0.01, neumann_lr=10.0, batch_size=8, n_inner_steps=2, n_neumann_steps=8), "neumann_lr"),
    ],
    ids=["soba-inner", "saba-inner", "soba-outer", "stocbio-inner", "stocbio-neumann"],
)
def test_diverging_steps_name_the_step_size(quad: Quadratic, solver: object, name: str) -> None:
    with pytest.raises(ConvergenceError, match=f"diverged at iteration .*lower {name}"):
        solver.run(
            quad.problem(),
            torch.zeros(5, dtype=F64),
            torch.zeros(3, dtype=F64),  # type: ignore[attr-defined]
            max_iter=5000,
        )


def test_bad_oracles_and_inputs() -> None:
    p = Ridge(10, 8, 4)
    pb = p.torch_problem()
    z0, x0 = torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64)
    per_sample = StochasticBilevel(lambda z, x, i: (p_a[i] @ z) ** 2, pb.outer, 10, 8)
    p_a = torch.tensor(p.a)
    with pytest.raises(StructureError, match=r"inner oracle returned a tensor of shape \(3,\).*\.mean\(\)"):
        SOBA(0.1, 0.1, batch_size=3).run(per_sample, z0, x0)
    detached = StochasticBilevel(lambda z, x, i: z.detach().sum(), pb.outer, 10, 8)
    with pytest.raises(StructureError, match="does not depend on z"):
        SOBA(0.1, 0.1, batch_size=3).run(detached, z0, x0)
    # z detached, the loss still differentiable through x: the same error, not autograd's
    through_x = StochasticBilevel(lambda z, x, i: ((z.detach() - x) ** 2).sum(), pb.outer, 10, 8)
    for solver in (SOBA(0.1, 0.1, batch_size=3), StocBiO(0.1, 0.1, batch_size=3)):
        with pytest.raises(StructureError, match="does not depend on z"):
            solver.run(through_x, z0, x0, max_iter=2)
    with pytest.raises(NonFiniteError, match="z0 has NaN"):
        SOBA(0.1, 0.1, batch_size=3).run(pb, torch.full((4,), math.nan, dtype=F64), x0)
    with pytest.raises(StructureError, match="same dtype and device"):
        SOBA(0.1, 0.1, batch_size=3).run(pb, z0, x0.float())
    with pytest.raises(TypeError, match="ravel a tree"):
        SOBA(0.1, 0.1, batch_size=3).run(pb, (z0,), x0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a StochasticBilevel"):
        SOBA(0.1, 0.1).run(pb.inner, z0, x0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_iter must be an int >= 0"):
        SOBA(0.1, 0.1, batch_size=3).run(pb, z0, x0, max_iter=-1)
    with pytest.raises(ValueError, match="eval_every must be an int >= 1"):
        SOBA(0.1, 0.1, batch_size=3).run(pb, z0, x0, eval_every=0)


def test_bad_settings() -> None:
    f = Ridge(10, 8, 4).torch_problem().inner
    with pytest.raises(TypeError, match=r"StochasticBilevel\(outer=3\): expected a function"):
        StochasticBilevel(f, 3, 10, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"StochasticBilevel\(n_inner=0\): the sample count must be >= 1"):
        StochasticBilevel(f, f, 0, 8)
    with pytest.raises(TypeError, match=r"n_outer=2\.5"):
        StochasticBilevel(f, f, 10, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SOBA\(inner_lr=0\): inner_lr must be > 0"):
        SOBA(0, 0.1)
    with pytest.raises(TypeError, match=r"SOBA\(inner_lr='0.1'\): inner_lr must be a number"):
        SOBA("0.1", 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"SOBA\(outer_batch_size=2.5\): outer_batch_size must be an int"):
        SOBA(0.1, 0.1, outer_batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"StocBiO\(check_every=0\): check_every must be >= 1"):
        StocBiO(0.1, 0.1, check_every=0)
    with pytest.raises(ValueError, match=r"SABA\(outer_lr=nan\)"):
        SABA(0.1, math.nan)
    with pytest.raises(ValueError, match=r"SABA\(batch_size=0\)"):
        SABA(0.1, 0.1, batch_size=0)
    with pytest.raises(ValueError, match=r"StocBiO\(neumann_lr=-1.0\)"):
        StocBiO(0.1, 0.1, neumann_lr=-1.0)
    with pytest.raises(ValueError, match=r"StocBiO\(n_inner_steps=0\): n_inner_steps must be >= 1"):
        StocBiO(0.1, 0.1, n_inner_steps=0)
    with pytest.raises(TypeError, match="expected a schedule"):
        SOBA(0.1, 0.1, inner_schedule=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"SOBA\(inner_schedule=Decay\): pass an instance"):
        SOBA(0.1, 0.1, inner_schedule=Decay)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Decay\(exponent=-1\)"):
        Decay(-1)
    assert Constant()(7) == 1.0 and Decay(0.5)(3) == 0.5


# --------------------------------------------------------------------------------------------
# compile=True: one torch.compile-d graph per iteration (derivatives by torch.func)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # two compilations (the last batch is shorter): tens of seconds on a laptop CPU
@pytest.mark.parametrize("solver", [SOBA, SABA], ids=lambda s: s.__name__)
def test_compiled_iterates_equal_reference(solver: type) -> None:
    p = Ridge(10, 8, 4)
    z0, x0 = start(p)
    res = solver(inner_lr=0.2, outer_lr=0.1, batch_size=3, compile=True).run(
        p.torch_problem(), torch.tensor(z0), torch.tensor(x0), max_iter=11, seed=5
    )
    ref = ref_soba if solver is SOBA else ref_saba
    assert_iterates(res, ref(p, z0, x0, 11, 0.2, 0.1, 3, seed=5))


def test_compile_failure_says_what_to_do() -> None:
    pb = Ridge(10, 8, 4).torch_problem()

    def branching(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # a data-dependent Python branch: fine eagerly, not traceable into one graph
        return pb.inner(z, x, idx) * (2.0 if float(z.detach().sum()) > 1e9 else 1.0)

    problem = StochasticBilevel(branching, pb.outer, 10, 8)
    with pytest.raises(BilevelError, match=r"SOBA\(compile=True\): torch.compile could not .*compile=False"):
        SOBA(0.1, 0.1, batch_size=5, compile=True).run(
            problem, torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64)
        )
    with pytest.raises(TypeError, match=r"SABA\(compile=1\): compile must be True or False"):
        SABA(0.1, 0.1, compile=1)  # type: ignore[arg-type]


def test_nan_oracle_named_with_sparse_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    # On an accelerator the iterates are read every check_every iterations only (no host sync
    # per step); the oracle outputs kept since the last check still name the oracle and the
    # iteration where it first returned NaN.
    import bilevel._stochastic as stochastic

    monkeypatch.setattr(stochastic, "host_checks", lambda t: False)
    p = Ridge(10, 8, 4)
    pb = p.torch_problem()
    z0, x0 = (torch.tensor(t) for t in start(p))
    bad = StochasticBilevel(pb.inner, _nan_after(pb.outer, 6), 10, 8)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteError, match="outer oracle's gradient is NaN or infinite at iteration 6"):
        SABA(0.1, 0.1, batch_size=3, check_every=50).run(bad, z0, x0, max_iter=120)
    # and the divergence check still fires, at a check
    quad = Quadratic(n=32, m=32, d_in=5, d_out=3, mu=0.3, seed=0)
    with pytest.raises(ConvergenceError, match=r"diverged at iteration (19|39|59|79|99)\b.*lower inner_lr"):
        SOBA(5.0, 0.01, batch_size=8, check_every=20).run(
            quad.problem(), torch.zeros(5, dtype=F64), torch.zeros(3, dtype=F64), max_iter=5000
        )


# --------------------------------------------------------------------------------------------
# compile=True, chunk=K: K iterations per compiled call
# --------------------------------------------------------------------------------------------


def _count_chunks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Spy on the chunk checker: one entry (the chunk's first iteration, the iterations it
    took) per chunk run."""
    import bilevel._stochastic as stochastic

    calls: list[tuple[int, int]] = []
    real = stochastic._check_chunk

    def spy(state: object, norms: torch.Tensor, finite: torch.Tensor) -> None:
        calls.append((state.t, len(norms)))  # type: ignore[attr-defined]
        real(state, norms, finite)  # type: ignore[arg-type]

    monkeypatch.setattr(stochastic, "_check_chunk", spy)
    return calls


@pytest.mark.slow  # three compilations per run (chunk, single step, shorter last batch)
@pytest.mark.parametrize("solver", [SOBA, SABA], ids=lambda s: s.__name__)
@pytest.mark.parametrize(
    ("n", "chunk", "eval_every"),
    [
        (12, 4, None),  # every batch full: five full chunks, the last 3 iterations a partial one
        # a batch of one sample every epoch (at most 3 full batches in a row), records every 6:
        # partial chunks of 2 to 6 iterations, single steps (the short batch; a run of 1 < 8 / 4)
        (13, 8, 6),
    ],
)
def test_chunked_iterates_equal_reference(
    monkeypatch: pytest.MonkeyPatch, solver: type, n: int, chunk: int, eval_every: int | None
) -> None:
    calls = _count_chunks(monkeypatch)
    p = Ridge(n, 8, 4)
    z0, x0 = start(p)
    records: list[int] = []
    res = solver(inner_lr=0.2, outer_lr=0.1, batch_size=4, compile=True, chunk=chunk).run(
        p.torch_problem(),
        torch.tensor(z0),
        torch.tensor(x0),
        max_iter=23,
        seed=5,
        eval_every=eval_every,
        callback=lambda r: records.append(r.iteration),
    )
    ref = ref_soba if solver is SOBA else ref_saba
    assert_iterates(res, ref(p, z0, x0, 23, 0.2, 0.1, 4, seed=5))
    assert res.n_iter == 23
    # chunks ran, never across a record, and the records fell where asked
    assert calls
    if eval_every is None:
        assert calls == [(t, 4) for t in range(0, 20, 4)] + [(20, 3)] and records == [23]
    else:
        assert records == [0, 6, 12, 18, 23]
        assert all(t // eval_every == (t + k - 1) // eval_every for t, k in calls)
        assert all(2 <= k <= 6 for _, k in calls) and sum(k for _, k in calls) < 23


@pytest.mark.slow  # compiles
def test_chunked_nan_named_at_its_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_chunks(monkeypatch)
    p = Ridge(12, 32, 4)
    pb = p.torch_problem()
    # poison one sample of the outer batch drawn at iteration 6 (the documented recipe): its
    # gradient is NaN there and only there; iteration 6 is the third of the chunk 4..7
    _, so = samplers(p, 4, seed=2)
    drawn = [so.next()[1] for _ in range(7)]
    poison = torch.zeros(32, dtype=F64)
    poison[int(drawn[6][0])] = math.nan
    assert all(int(drawn[6][0]) not in d for d in drawn[:6])

    def outer(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return pb.outer(z, x, idx) + poison[idx].mean() * z.sum()

    bad = StochasticBilevel(pb.inner, outer, 12, 32)
    z0, x0 = (torch.tensor(t) for t in start(p))
    with pytest.raises(NonFiniteError, match=r"outer oracle's gradient is NaN or infinite at iteration 6\b"):
        SABA(0.1, 0.1, batch_size=4, compile=True, chunk=4).run(bad, z0, x0, max_iter=40, seed=2)
    assert calls == [(0, 4), (4, 4)]


@pytest.mark.slow  # compiles
@pytest.mark.parametrize("solver", [SOBA, SABA], ids=lambda s: s.__name__)
def test_chunk_idle_iterations_change_nothing(monkeypatch: pytest.MonkeyPatch, solver: type) -> None:
    # max_iter = 2 with chunk = 4: one call of 2 iterations and 2 idle ones, which run on the
    # idle batch (sample 0, four times).  The inner oracle is NaN on sample 0, which the two
    # real iterations (seed 3) do not draw: the idle iterations' NaN must not reach z, v, x or
    # SABA's averages, and nothing is reported.
    calls = _count_chunks(monkeypatch)
    p = Ridge(12, 8, 4)
    pb = p.torch_problem()
    si, _ = samplers(p, 4, seed=3)
    assert all(0 not in si.next()[1] for _ in range(2))
    poison = torch.zeros(12, dtype=F64)
    poison[0] = math.nan

    def inner(z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return pb.inner(z, x, idx) + poison[idx].mean() * z.sum()

    z0, x0 = start(p)
    res = solver(inner_lr=0.2, outer_lr=0.1, batch_size=4, compile=True, chunk=4).run(
        StochasticBilevel(inner, pb.outer, 12, 8), torch.tensor(z0), torch.tensor(x0), max_iter=2, seed=3
    )
    assert calls == [(0, 2)]
    ref = ref_soba if solver is SOBA else ref_saba
    assert_iterates(res, ref(p, z0, x0, 2, 0.2, 0.1, 4, seed=3))


@pytest.mark.slow  # compiles
@pytest.mark.parametrize("solver", [SOBA, SABA], ids=lambda s: s.__name__)
def test_chunked_divergence_named_as_one_by_one(solver: type) -> None:
    p = Ridge(12, 8, 4)
    z0, x0 = (torch.tensor(t) for t in start(p))
    messages = []
    for kw in ({}, {"compile": True, "chunk": 4}):
        with pytest.raises(ConvergenceError, match=r"diverged at iteration \d+: .*lower inner_lr") as err:
            solver(40.0, 0.1, batch_size=4, max_norm=1e3, **kw).run(p.torch_problem(), z0, x0, max_iter=400)
        messages.append(str(err.value))
    iteration = [int(m.split("diverged at iteration ")[1].split(":")[0]) for m in messages]
    assert iteration[0] == iteration[1]


@pytest.mark.slow  # compiles
def test_chunked_time_limit_stops_between_chunks() -> None:
    p = Ridge(12, 8, 4)
    z0, x0 = (torch.tensor(t) for t in start(p))
    # the first chunk (compilation included) outlasts the limit: the run stops after it
    res = SOBA(0.1, 0.1, batch_size=4, compile=True, chunk=8).run(
        p.torch_problem(), z0, x0, max_iter=1000, time_limit=1e-3
    )
    assert res.status is StochasticStop.TIME_LIMIT and res.n_iter == 8


def test_bad_chunk_settings() -> None:
    with pytest.raises(ValueError, match=r"SOBA\(chunk=0\): chunk must be >= 1"):
        SOBA(0.1, 0.1, compile=True, chunk=0)
    with pytest.raises(TypeError, match=r"SABA\(chunk=True\): chunk must be an int"):
        SABA(0.1, 0.1, compile=True, chunk=True)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"SABA\(chunk=8\): chunks of iterations are compiled .*compile=True"
    ):
        SABA(0.1, 0.1, chunk=8)


@pytest.mark.parametrize(
    "solver",
    [SOBA(0.1, 0.1, batch_size=3), SABA(0.1, 0.1, batch_size=3), StocBiO(0.1, 0.1, batch_size=3)],
    ids=["SOBA", "SABA", "StocBiO"],
)
def test_an_inner_oracle_blind_to_x_is_warned_once(solver: Any) -> None:
    """x detached in the inner loss: no implicit term, so x moves along grad_x F alone (here 0)."""
    pb = Ridge(10, 8, 4).torch_problem()
    blind = StochasticBilevel(lambda z, x, i: pb.inner(z, x.detach(), i), lambda z, x, i: (z**2).sum(), 10, 8)
    x0 = torch.full((4,), 0.3, dtype=F64)
    with pytest.warns(BilevelWarning, match="does not depend on x") as record:
        res = solver.run(blind, torch.zeros(4, dtype=F64), x0, max_iter=6)
    assert sum("does not depend on x" in str(w.message) for w in record) == 1
    assert torch.equal(res.x, x0)


def test_a_metric_that_returns_no_number_is_named() -> None:
    pb = Ridge(10, 8, 4).torch_problem()
    z0 = torch.zeros(4, dtype=F64)
    for bad, what in ((lambda z, x: "a", "'a'"), (lambda z, x: z, r"a tensor of shape \(4,\)")):
        with pytest.raises(
            TypeError, match=rf"SOBA.run: metric\(z, x\) returned {what}; it must return a number"
        ):
            SOBA(0.1, 0.1, batch_size=3).run(pb, z0, z0, max_iter=2, eval_every=1, metric=bad)
    res = SOBA(0.1, 0.1, batch_size=3).run(pb, z0, z0, max_iter=2, eval_every=1, metric=lambda z, x: z.sum())
    # a one-element tensor is a number: recorded as a float, at the iterates of its record
    assert res.history[0].metric == 0.0 and res.history[-1].iteration == 2
    assert res.history[-1].metric == pytest.approx(float(res.z.sum()), rel=1e-12)
