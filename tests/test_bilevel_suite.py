"""The benchmark suite's problems (benchmarks/bilevel_suite): shapes, closed forms and metrics.

References are independent of the code under test: the quadratic's value function against a
dense solve of the inner problem's autograd Hessian; hypergradients against float64 central
differences of re-solves; mini-batch oracles against per-sample loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.bilevel_suite import problems as P
from benchmarks.bilevel_suite import report as R


@pytest.fixture(scope="module")
def small_quadratic() -> P.SuiteProblem:
    return P.quadratic(n_inner=64, n_outer=48, dim_inner=8, dim_outer=4, seed=3)


@pytest.fixture(scope="module")
def small_ijcnn1() -> P.SuiteProblem:
    return P.ijcnn1(n_train=600, n_val=400, seed=1)


@pytest.fixture(scope="module")
def small_covtype() -> P.SuiteProblem:
    return P.covtype(n_train=800, n_val=300, seed=1)


def test_shapes_of_the_benchmark_problems() -> None:
    ij = P.ijcnn1()
    assert ij.arrays["X_train"].shape == (49_990, 22) and ij.arrays["X_val"].shape == (91_701, 22)
    assert set(np.unique(ij.arrays["y_train"])) == {-1.0, 1.0}
    assert (ij.dim_inner, ij.dim_outer, ij.n_inner, ij.n_outer) == (22, 22, 49_990, 91_701)
    cov = P.covtype()
    assert cov.arrays["X_train"].shape == (20_000, 54) and cov.arrays["y_train"].shape == (20_000, 7)
    assert (cov.arrays["y_train"].sum(1) == 1).all()  # one-hot
    assert np.allclose(cov.arrays["X_train"].mean(0), 0, atol=1e-10)  # standardized on the train set
    assert (cov.dim_inner, cov.dim_outer) == (54 * 7, 7)
    # every class present: no class is separable by absence
    assert (cov.arrays["y_train"].sum(0) > 100).all()


def test_gen_matrices_structure() -> None:
    rng = np.random.default_rng(0)
    Hz, Hx, C, a, b = P.gen_matrices(200, 6, 3, 1.0, 1.0, 0.1, 0.1, rng)
    assert Hz.shape == (200, 6, 6) and Hx.shape == (200, 3, 3) and C.shape == (200, 3, 6)
    assert a.shape == (200, 6) and b.shape == (200, 3)
    # per-sample Hessians are symmetric rank-one PSD (x_i x_i^T), as in gen_matrices.py
    assert np.allclose(Hz, Hz.transpose(0, 2, 1))
    assert np.linalg.matrix_rank(Hz[0]) == 1 and np.linalg.eigvalsh(Hz[0]).min() > -1e-12
    # cross terms are rank one: U D x (x V^T)
    assert np.linalg.matrix_rank(C[0]) == 1
    # the mean Hessian's expected spectrum is the log-spaced [mu, L] (sample mean: loosely)
    eig = np.linalg.eigvalsh(Hz.mean(0))
    assert 0.02 < eig.min() < 0.3 and 0.5 < eig.max() < 2.0


def test_quadratic_value_function_against_dense_solve(small_quadratic: P.SuiteProblem) -> None:
    p = small_quadratic
    full_in = torch.arange(p.n_inner)
    full_out = torch.arange(p.n_outer)
    x = torch.randn(p.dim_outer, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z0 = torch.zeros(p.dim_inner, dtype=torch.float64)
    # z*(x) by one Newton step on the autograd Hessian and gradient (exact on a quadratic)
    H = torch.autograd.functional.hessian(lambda z: p.inner(z, x, full_in), z0)
    g = torch.autograd.functional.jacobian(lambda z: p.inner(z, x, full_in), z0)
    z_star = torch.linalg.solve(H, -g)
    torch.testing.assert_close(p.inner_solution(x), z_star, rtol=1e-10, atol=1e-10)
    h, grad = p.value_and_grad(x)
    assert h == pytest.approx(float(p.outer(z_star, x, full_out)), rel=1e-10)
    # grad h against central differences of h through the dense re-solve
    eps = 1e-6
    for j in range(p.dim_outer):
        e = torch.zeros_like(x)
        e[j] = eps

        def dense_h(xx: torch.Tensor) -> float:
            gg = torch.autograd.functional.jacobian(lambda z: p.inner(z, xx, full_in), z0)
            return float(p.outer(torch.linalg.solve(H, -gg), xx, full_out))

        fd = (dense_h(x + e) - dense_h(x - e)) / (2 * eps)
        assert float(grad[j]) == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_quadratic_optimum_is_stationary_and_strongly_convex(small_quadratic: P.SuiteProblem) -> None:
    qv = P.quadratic_value(small_quadratic)
    assert float(torch.linalg.eigvalsh(qv.A)[0]) > 0
    h_star, x_star = P.reference_optimum(small_quadratic)
    _, g = small_quadratic.value_and_grad(torch.from_numpy(x_star))
    assert float(g.norm()) < 1e-10
    assert h_star < small_quadratic.value_and_grad(small_quadratic.x0)[0]


@pytest.mark.parametrize("name", ["quadratic", "ijcnn1", "covtype"])
def test_oracles_are_means_over_the_batch(
    name: str, small_quadratic: P.SuiteProblem, small_ijcnn1: P.SuiteProblem, small_covtype: P.SuiteProblem
) -> None:
    p = {"quadratic": small_quadratic, "ijcnn1": small_ijcnn1, "covtype": small_covtype}[name]
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(p.dim_inner, dtype=torch.float64, generator=gen)
    x = torch.randn(p.dim_outer, dtype=torch.float64, generator=gen) * 0.5
    idx = torch.tensor([3, 7, 11, 20])
    loop_in = sum(float(p.inner(z, x, idx[i : i + 1])) for i in range(4)) / 4
    loop_out = sum(float(p.outer(z, x, idx[i : i + 1])) for i in range(4)) / 4
    assert float(p.inner(z, x, idx)) == pytest.approx(loop_in, rel=1e-12)
    assert float(p.outer(z, x, idx)) == pytest.approx(loop_out, rel=1e-12)


@pytest.mark.parametrize("name", ["quadratic", "ijcnn1", "covtype"])
def test_full_batch_oracles_equal_the_gathered_ones(
    name: str, small_quadratic: P.SuiteProblem, small_ijcnn1: P.SuiteProblem, small_covtype: P.SuiteProblem
) -> None:
    p = {"quadratic": small_quadratic, "ijcnn1": small_ijcnn1, "covtype": small_covtype}[name]
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(p.dim_inner, dtype=torch.float64, generator=gen)
    x = torch.randn(p.dim_outer, dtype=torch.float64, generator=gen) * 0.5
    for oracle, n in ((p.inner, p.n_inner), (p.outer, p.n_outer)):
        assert float(oracle(z, x, None)) == pytest.approx(float(oracle(z, x, torch.arange(n))), rel=1e-12)


def test_covtype_inner_solution_where_the_penalty_vanishes(small_covtype: P.SuiteProblem) -> None:
    """At log-weights of -18 the training features' null space (one-hot groups summing to one)
    is curved by exp(-18) only: z*(x) must still be stationary for the oracle, and orthogonal to
    that null space (where the penalty puts it)."""
    p = small_covtype
    X = torch.from_numpy(p.arrays["X_train"])
    assert int(torch.linalg.matrix_rank(X)) < X.shape[1]  # the case this test is about
    x = torch.full((p.dim_outer,), -18.0, dtype=torch.float64)
    z = p.inner_solution(x)
    zr = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(p.inner(zr, x, None), zr)
    assert float(gz.norm()) < 1e-9
    _, sv, Vt = torch.linalg.svd(X, full_matrices=False)
    null = Vt[int((sv > 1e-10 * sv[0]).sum()) :]
    assert float((null @ z.reshape(54, 7)).abs().max()) < 1e-8 * float(z.abs().max())


@pytest.mark.parametrize("name", ["ijcnn1", "covtype"])
def test_logistic_value_function_and_hypergradient(
    name: str, small_ijcnn1: P.SuiteProblem, small_covtype: P.SuiteProblem
) -> None:
    p = small_ijcnn1 if name == "ijcnn1" else small_covtype
    full_in, full_out = torch.arange(p.n_inner), torch.arange(p.n_outer)
    x = p.x0.clone()
    z = p.inner_solution(x)
    zr = z.clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(p.inner(zr, x, full_in), zr)
    assert float(gz.norm()) < 1e-9  # z*(x) is stationary for the oracle itself
    h, grad = p.value_and_grad(x)
    assert h == pytest.approx(float(p.outer(z, x, full_out)), rel=1e-12)
    eps = 1e-5
    for j in range(p.dim_outer):
        e = torch.zeros_like(x)
        e[j] = eps
        fd = (p.value_and_grad(x + e)[0] - p.value_and_grad(x - e)[0]) / (2 * eps)
        assert float(grad[j]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_validation_error_against_a_direct_count(
    small_ijcnn1: P.SuiteProblem, small_covtype: P.SuiteProblem
) -> None:
    z = torch.randn(22, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    Xv, yv = small_ijcnn1.arrays["X_val"], small_ijcnn1.arrays["y_val"]
    expected = np.mean([(1.0 if Xv[i] @ z.numpy() > 0 else -1.0) != yv[i] for i in range(len(yv))])
    assert small_ijcnn1.validation_error is not None
    assert small_ijcnn1.validation_error(z) == pytest.approx(expected)
    Z = torch.randn(54 * 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Xc, Yc = small_covtype.arrays["X_val"], small_covtype.arrays["y_val"]
    W = Z.numpy().reshape(54, 7)
    expected = np.mean([np.argmax(Xc[i] @ W) != np.argmax(Yc[i]) for i in range(len(Yc))])
    assert small_covtype.validation_error is not None
    assert small_covtype.validation_error(Z) == pytest.approx(expected)


def test_ijcnn1_reference_optimum_is_stationary(small_ijcnn1: P.SuiteProblem) -> None:
    h_star, x_star = P.reference_optimum(small_ijcnn1)
    h0 = small_ijcnn1.value_and_grad(small_ijcnn1.x0)[0]
    assert h_star < h0
    assert float(small_ijcnn1.value_and_grad(torch.from_numpy(x_star))[1].norm()) < 1e-6


def test_newton_refuses_a_failed_line_search() -> None:
    # a concave function: no step decreases along -H^-1 g with H negative definite
    def value(z: torch.Tensor) -> torch.Tensor:
        return -(z**2).sum() + z.sum()

    def grad_hess(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return value(z), -2 * z + 1, -2 * torch.eye(z.numel(), dtype=z.dtype)

    with pytest.raises(RuntimeError, match="line search failed"):
        P._newton(value, grad_hess, torch.zeros(3, dtype=torch.float64))


def test_npz_round_trip(small_covtype: P.SuiteProblem, tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    path = small_covtype.save_npz(tmp_path)
    data = np.load(path)
    np.testing.assert_array_equal(data["X_train"], small_covtype.arrays["X_train"])
    np.testing.assert_array_equal(data["x0"], small_covtype.x0.numpy())


def _run(
    times: list[float], metrics: list[float], iters: list[int], batch: int | None = 64
) -> dict[str, object]:
    return dict(
        solver="S", framework="bilevel (torch)", stochastic=batch is not None, batch_size=batch,
        records=[dict(t=t, iter=i, metric=m, x=[0.0], z=[0.0])
                 for t, i, m in zip(times, iters, metrics, strict=True)],
    )  # fmt: skip


def test_report_time_to_level_and_epoch_time() -> None:
    run = _run([0.0, 1.0, 2.0, 4.0], [1.0, 5e-3, 5e-5, 2e-5], [0, 100, 200, 400])
    assert R.time_to(run, 1e-2) == 1.0
    assert R.time_to(run, 1e-4) == 2.0
    assert math.isinf(R.time_to(run, 1e-6))
    # windows after the first: 100 iterations in 1 s, 200 in 2 s; 1280 / 64 = 20 iterations
    # per epoch at 0.01 s each
    assert R.epoch_time(run, 1280) == pytest.approx(0.2)
    run["records"][-1]["z"] = [math.nan]  # type: ignore[index]
    assert math.isnan(R.epoch_time(run, 1280))


def test_per_epoch_leaves_out_the_first_window_and_takes_the_median() -> None:
    # the first window holds the compilation; one later window an outlier (a second graph)
    window_s = [30.0, 0.10, 0.11, 5.0, 0.12, 0.10]
    per_it = 0.11 / 64  # median of [0.10, 0.11, 5.0, 0.12, 0.10] / 64
    assert R.per_epoch(window_s, [64] * 6, 64, 20_000) == pytest.approx(per_it * 20_000 / 64)
    assert math.isnan(R.per_epoch([1.0], [64], 64, 20_000))


def test_report_thinning_keeps_ends_and_order() -> None:
    recs = [dict(t=0.01 * i, iter=i) for i in range(1000)]
    kept = R._thin(recs)
    assert len(kept) <= R.MAX_POINTS + 2
    assert kept[0] is recs[0] and kept[-1] is recs[-1]
    assert [r["t"] for r in kept] == sorted(r["t"] for r in kept)


def test_reference_optimum_in_a_box_is_stationary_on_its_faces(
    small_covtype: P.SuiteProblem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """covtype's h* is a box's minimum: inside, grad h = 0; on a face, grad h points out of it."""
    lo, hi = -6.0, 10.0
    monkeypatch.setitem(P.OPTIMUM_BOUNDS, "covtype", (lo, hi))
    h_star, x_star = P.reference_optimum(small_covtype)
    assert h_star < small_covtype.value_and_grad(small_covtype.x0)[0]
    assert (x_star >= lo).all() and (x_star <= hi).all()
    g = small_covtype.value_and_grad(torch.from_numpy(x_star))[1].numpy()
    interior = (x_star > lo + 1e-8) & (x_star < hi - 1e-8)
    assert np.abs(g[interior]).max(initial=0.0) < 1e-6
    assert (g[x_star <= lo + 1e-8] >= -1e-6).all()  # h would grow into the box
