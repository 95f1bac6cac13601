"""Linear solvers against torch.linalg.solve on their matrix classes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import bilevel as bl
from bilevel._linear_solve import default_rtol

D = torch.float64


def spd(n: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    return Q @ torch.diag(eig) @ Q.T


def sym_indefinite(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    eig = torch.linspace(1, 10, n, dtype=D) * torch.tensor([(-1) ** i for i in range(n)], dtype=D)
    return Q @ torch.diag(eig) @ Q.T


def nonsym(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(n, dtype=D) * 3 + torch.randn(n, n, generator=g, dtype=D) / n**0.5


CASES = [
    (bl.CG(), spd),
    (bl.CG(M=None), spd),
    (bl.CG(M=bl.HutchinsonDiagonal(probes=16)), spd),
    (bl.CG(M=bl.NystromPreconditioner(rank=1)), spd),
    (bl.MINRES(), spd),
    (bl.MINRES(), sym_indefinite),
    (bl.GMRES(), spd),
    (bl.GMRES(), nonsym),
    (bl.GMRES(restart=5), nonsym),
    (bl.BiCGStab(), nonsym),
    (bl.DenseSolve(), nonsym),
    (bl.DenseSolve(), sym_indefinite),
]


def make(kind, n: int, seed: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return kind(n, 20.0, seed) if kind is spd else kind(n, seed)


@pytest.mark.parametrize(("solver", "kind"), CASES, ids=lambda c: getattr(c, "__name__", type(c).__name__))
@pytest.mark.parametrize("n", [1, 7, 40])
def test_agrees_with_dense_solve(solver, kind, n: int) -> None:  # type: ignore[no-untyped-def]
    A = make(kind, n, seed=n)
    b = torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(1))
    res = solver(lambda v: A @ v, b)
    ref = torch.linalg.solve(A, b)
    assert res.converged, res.status
    assert res.relative_residual <= 1e-10
    # Forward error <= cond(A) * relative residual.
    cond = float(torch.linalg.cond(A))
    assert torch.linalg.vector_norm(res.x - ref) <= 2 * cond * 1e-10 * torch.linalg.vector_norm(ref)
    # The reported residual is the true one.
    assert res.residual_norm == pytest.approx(
        float(torch.linalg.vector_norm(A @ res.x - b)), rel=1e-6, abs=1e-14
    )


def test_neumann_converges_inside_its_radius() -> None:
    A = spd(10, 10.0, 0)
    b = torch.ones(10, dtype=D)
    lmax = float(torch.linalg.eigvalsh(A).max())
    res = bl.Neumann(max_iter=2000, alpha=1.0 / lmax)(lambda v: A @ v, b)
    assert res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-8, atol=0)
    # Outside the radius (alpha * lambda_max > 2) it diverges and says so.
    bad = bl.Neumann(max_iter=50, alpha=3.0 / lmax)(lambda v: A @ v, b)
    assert not bad.converged


def test_cg_reaches_1e10_in_float64_by_default() -> None:
    A = spd(100, 100.0, 3)
    b = torch.randn(100, dtype=D, generator=torch.Generator().manual_seed(0))
    res = bl.CG()(lambda v: A @ v, b)
    assert res.converged and res.relative_residual <= 1e-10
    assert default_rtol(torch.float64) == 1e-10


def test_cg_counts_matvecs_and_warm_start() -> None:
    A = spd(30, 50.0, 4)
    b = torch.randn(30, dtype=D, generator=torch.Generator().manual_seed(0))
    calls = 0

    def mv(v: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return A @ v

    res = bl.CG(max_iter=5, rtol=0.0)(mv, b)
    # no tolerance: the fixed budget was asked for, and no convergence claim needs checking
    assert res.n_iter == 5 and res.status is bl.LinearStatus.BUDGET and not res.converged
    assert calls == res.n_matvec == 5
    true = float(torch.linalg.vector_norm(A @ res.x - b))
    assert res.residual_norm == pytest.approx(true, rel=1e-8)  # the recursive residual, exact enough
    calls = 0
    capped = bl.CG(max_iter=5, rtol=1e-12)(mv, b)  # a tolerance it cannot meet in 5 steps
    assert capped.status is bl.LinearStatus.MAX_ITER and calls == capped.n_matvec == 5
    calls = 0
    done = bl.CG(rtol=1e-10)(mv, b)  # converges: the claim is checked with one more matvec
    assert done.converged and calls == done.n_matvec == done.n_iter + 1
    exact = torch.linalg.solve(A, b)
    warm = bl.CG()(lambda v: A @ v, b, x0=exact)
    assert warm.converged and warm.n_iter == 0


def test_cg_preconditioner_reduces_iterations() -> None:
    d = torch.logspace(0, 4, 50, dtype=D)
    A = torch.diag(d) + 1e-3 * spd(50, 2.0, 0)
    b = torch.ones(50, dtype=D)
    plain = bl.CG(max_iter=500)(lambda v: A @ v, b)
    jacobi = bl.CG(max_iter=500, M=lambda r: r / torch.diag(A))(lambda v: A @ v, b)
    assert plain.converged and jacobi.converged
    assert jacobi.n_iter < plain.n_iter / 3
    torch.testing.assert_close(jacobi.x, torch.linalg.solve(A, b), rtol=1e-7, atol=0)


def test_cg_reports_negative_curvature() -> None:
    A = sym_indefinite(6, 0)
    res = bl.CG()(lambda v: A @ v, torch.ones(6, dtype=D))
    assert res.status is bl.LinearStatus.NEGATIVE_CURVATURE
    assert not res.converged


def test_nonfinite_matvec_is_reported() -> None:
    res = bl.CG()(lambda v: v * float("nan"), torch.ones(3, dtype=D))
    assert res.status is bl.LinearStatus.NONFINITE


def test_singular_dense_is_breakdown() -> None:
    A = torch.zeros(3, 3, dtype=D)
    res = bl.DenseSolve()(lambda v: A @ v, torch.ones(3, dtype=D))
    assert res.status is bl.LinearStatus.BREAKDOWN


@pytest.mark.parametrize(
    ("make_solver", "match"),
    [
        (lambda: bl.CG(rtol=-1.0), r"CG\(rtol=-1.0\): rtol must be >= 0"),
        (lambda: bl.CG(max_iter=-2), r"max_iter must be >= 0"),
        (lambda: bl.GMRES(restart=0), r"restart must be >= 1"),
        (lambda: bl.Neumann(alpha=0.0), r"alpha must be > 0"),
        (lambda: bl.MINRES(atol=-1.0), r"atol must be >= 0"),
    ],
)
def test_bad_configuration(make_solver, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make_solver()


@pytest.mark.parametrize(
    "cls", [bl.CG, bl.MINRES, bl.GMRES, bl.BiCGStab, bl.Neumann], ids=lambda c: c.__name__
)
def test_an_infinite_tolerance_or_a_non_number_is_refused(cls: type) -> None:
    # rtol = inf would report CONVERGED at x = 0 after no iteration: a zero gradient, silently
    for bad in ({"rtol": math.inf}, {"atol": math.inf}, {"rtol": math.nan}):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\({next(iter(bad))}=.*must be >= 0"):
            cls(**bad)
    for bad in ({"max_iter": "5"}, {"max_iter": 2.5}, {"max_iter": True}, {"rtol": "1e-3"}, {"atol": None}):
        with pytest.raises(TypeError, match=rf"{cls.__name__}\({next(iter(bad))}="):
            cls(**bad)


def test_cg_refuses_a_non_bool_flag_and_a_preconditioner_class() -> None:
    with pytest.raises(TypeError, match=r"CG\(check_residual='no'\): check_residual must be True or False"):
        bl.CG(check_residual="no")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"CG\(M=HutchinsonDiagonal\): pass an instance, e.g. M=HutchinsonDiagonal\(\)"
    ):
        bl.CG(M=bl.HutchinsonDiagonal)  # type: ignore[arg-type]


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="b must be a 1-D tensor"):
        bl.CG()(lambda v: v, torch.ones(2, 2, 2, dtype=D))
    with pytest.raises(ValueError, match="matvec returned shape"):
        bl.CG()(lambda v: v[:2], torch.ones(3, dtype=D))


SOLVERS = [
    bl.CG(),
    bl.MINRES(),
    bl.GMRES(),
    bl.BiCGStab(),
    bl.Neumann(),
    bl.DenseSolve(),
    bl.Nystrom(1, rho=1.0),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_empty_integer_or_non_tensor_inputs_are_named(solver: Any) -> None:
    who = type(solver).__name__
    for empty in (torch.zeros(0, 2, dtype=D), torch.zeros(0, dtype=D)):
        with pytest.raises(ValueError, match=rf"{who}: b of shape .* is empty"):
            solver(lambda v: v, empty)
    with pytest.raises(TypeError, match=rf"{who}: b has dtype torch.int64; it must be floating point"):
        solver(lambda v: v, torch.tensor([1, 2]))
    for out in ((lambda v: (v,)), (lambda v: None)):
        with pytest.raises(TypeError, match=r"matvec returned a (tuple|NoneType); it must return a tensor"):
            solver(out, torch.ones(2, dtype=D))


def test_a_preconditioner_of_the_wrong_shape_is_named() -> None:
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
    with pytest.raises(
        ValueError, match=r"preconditioner M returned shape \(1,\) for a residual of shape \(2,\)"
    ):
        bl.CG(M=lambda r: r[..., :1])(lambda v: A @ v, torch.ones(2, dtype=D))
    with pytest.raises(TypeError, match="preconditioner M returned a NoneType"):
        bl.CG(M=lambda r: None)(lambda v: A @ v, torch.ones(2, dtype=D))
    res = bl.CG(M=lambda r: r / 4)(lambda v: A @ v, torch.ones(2, dtype=D))
    torch.testing.assert_close(res.x, torch.linalg.solve(A, torch.ones(2, dtype=D)))


# ---------------------------------------------------------------------------------- batched mode
def _blocks(kind, B: int, n: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.stack([make(kind, n, seed=10 + i) for i in range(B)])


@pytest.mark.parametrize(("solver", "kind"), CASES, ids=lambda c: getattr(c, "__name__", type(c).__name__))
def test_batched_equals_single_solves_and_dense(solver, kind) -> None:  # type: ignore[no-untyped-def]
    B, n = 4, 7
    As = _blocks(kind, B, n)
    b = torch.randn(B, n, dtype=D, generator=torch.Generator().manual_seed(3))
    res = solver(lambda V: torch.einsum("bij,bj->bi", As, V), b)
    assert res.x.shape == (B, n)
    assert res.problem_status is not None and len(res.problem_status) == B
    assert res.problem_residual_norm is not None and res.problem_residual_norm.shape == (B,)
    assert res.problem_n_iter is not None and res.problem_n_iter.shape == (B,)
    assert res.converged and res.failed_problems() == []
    ref = torch.linalg.solve(As, b)
    for i in range(B):
        single = solver(lambda v, A=As[i]: A @ v, b[i])
        assert single.converged
        torch.testing.assert_close(res.x[i], ref[i], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(res.x[i], single.x, rtol=1e-7, atol=1e-9)
        true = torch.linalg.vector_norm(As[i] @ res.x[i] - b[i])
        assert float(res.problem_residual_norm[i]) == pytest.approx(float(true), rel=1e-6, abs=1e-13)


def test_batched_cg_iterates_equal_single_cg() -> None:
    """Same iterations per problem as B separate CG calls: each problem stops on its own."""
    B, n = 3, 12
    As = torch.stack([spd(n, cond, seed=i) for i, cond in enumerate([2.0, 50.0, 1e4])])
    b = torch.randn(B, n, dtype=D, generator=torch.Generator().manual_seed(0))
    for cg in (bl.CG(), bl.CG(max_iter=4, rtol=0.0), bl.CG(check_residual=False)):
        # the same products row by row as in the single solves, so that rounding agrees too
        res = cg(lambda V: torch.stack([A @ v for A, v in zip(As, V)]), b)
        for i in range(B):
            single = cg(lambda v, A=As[i]: A @ v, b[i])
            assert int(res.problem_n_iter[i]) == single.n_iter  # type: ignore[index]
            assert res.problem_status[i] is single.status  # type: ignore[index]
            torch.testing.assert_close(res.x[i], single.x, rtol=1e-9, atol=1e-12)
    # the easy problem stops first
    res = bl.CG()(lambda V: torch.einsum("bij,bj->bi", As, V), b)
    assert int(res.problem_n_iter[0]) < int(res.problem_n_iter[2])  # type: ignore[index]


def test_batched_cg_reports_each_failing_problem() -> None:
    """An indefinite block and a capped block do not hide behind the converged ones."""
    n = 6
    good, bad = spd(n, 10.0, seed=1), sym_indefinite(n, seed=2)
    As = torch.stack([good, bad, good])
    b = torch.randn(3, n, dtype=D, generator=torch.Generator().manual_seed(0))
    res = bl.CG()(lambda V: torch.einsum("bij,bj->bi", As, V), b)
    assert res.problem_status == (
        bl.LinearStatus.CONVERGED,
        bl.LinearStatus.NEGATIVE_CURVATURE,
        bl.LinearStatus.CONVERGED,
    )
    assert res.status is bl.LinearStatus.NEGATIVE_CURVATURE
    assert res.failed_problems() == [1]
    assert res.problem_curvature is not None
    assert float(res.problem_curvature[1]) <= 0 and torch.isnan(res.problem_curvature[[0, 2]]).all()
    capped = bl.CG(max_iter=2)(lambda V: torch.einsum("bij,bj->bi", As[[0, 2]], V), b[[0, 2]])
    assert capped.problem_status == (bl.LinearStatus.MAX_ITER, bl.LinearStatus.MAX_ITER)


def test_batched_block_diagonal_fallback_judges_each_problem() -> None:
    """Solvers without a batched loop solve the block-diagonal system and judge each block."""
    n = 5
    As = torch.stack([spd(n, 5.0, seed=1), spd(n, 5.0, seed=2)])
    b = torch.randn(2, n, dtype=D, generator=torch.Generator().manual_seed(0))
    b[1] = 0.0
    res = bl.GMRES()(lambda V: torch.einsum("bij,bj->bi", As, V), b)
    assert res.problem_status == (bl.LinearStatus.CONVERGED, bl.LinearStatus.CONVERGED)
    torch.testing.assert_close(res.x[1], torch.zeros(n, dtype=D))


# ----------------------------------------------------------------------------- Steihaug's CG (a radius)


def _model_decrease(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """q(0) - q(x) with q(x) = x'Ax/2 - b'x, per row, by dense algebra."""
    return (b * x).sum(1) - 0.5 * torch.einsum("bi,bij,bj->b", x, A, x)


def _cauchy_decrease(A: torch.Tensor, b: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """The model decrease at the Cauchy point: the best step along b (= -grad q(0)) within the radius."""
    bAb = torch.einsum("bi,bij,bj->b", b, A, b)
    bb = (b * b).sum(1)
    edge = radius / bb.sqrt()
    t = torch.where(bAb > 0, torch.minimum(bb / bAb.clamp_min(1e-300), edge), edge)
    return _model_decrease(A, b, t[:, None] * b)


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_cg_with_a_radius_against_dense_algebra(kind: str) -> None:
    """Steihaug's CG: inside the region it is CG; otherwise it stops on the boundary, with a model
    decrease (tracked by the recursion) equal to the dense one and at least the Cauchy point's."""
    from bilevel._linear_solve import cg_solve

    B, n = 4, 8
    A = torch.stack([spd(n, 50.0, s) if kind == "spd" else sym_indefinite(n, s) for s in range(B)])
    b = torch.randn(B, n, dtype=D, generator=torch.Generator().manual_seed(7))
    mv = lambda V: torch.einsum("bij,bj->bi", A, V)  # noqa: E731
    tol = torch.full((B,), 1e-12, dtype=D)
    if kind == "spd":
        free = bl.CG(max_iter=50, rtol=1e-12)(mv, b)
        big = cg_solve(mv, b, max_iter=50, tol=tol, radius=torch.full((B,), 1e6, dtype=D))
        torch.testing.assert_close(big.x, free.x, rtol=0, atol=1e-10)
        assert big.problem_status == free.problem_status
        torch.testing.assert_close(big.problem_decrease, _model_decrease(A, b, big.x), rtol=1e-9, atol=1e-12)
        exact = torch.linalg.solve(A, b)
        radius = 0.5 * torch.linalg.vector_norm(exact, dim=1)
    else:
        radius = torch.full((B,), 0.7, dtype=D)
    res = cg_solve(mv, b, max_iter=50, tol=tol, radius=radius)
    want = bl.LinearStatus.BOUNDARY if kind == "spd" else bl.LinearStatus.NEGATIVE_CURVATURE
    assert all(s in (bl.LinearStatus.BOUNDARY, want) for s in res.problem_status)
    if kind == "indefinite":
        assert want in res.problem_status
    mask = res.status_mask(bl.LinearStatus.BOUNDARY)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [s is bl.LinearStatus.BOUNDARY for s in res.problem_status]
    torch.testing.assert_close(torch.linalg.vector_norm(res.x, dim=1), radius, rtol=1e-12, atol=0)
    dense = _model_decrease(A, b, res.x)
    torch.testing.assert_close(res.problem_decrease, dense, rtol=1e-9, atol=1e-12)
    assert bool((dense >= _cauchy_decrease(A, b, radius) - 1e-12).all())


def test_cg_radius_guards() -> None:
    from bilevel._linear_solve import cg_solve

    A = spd(4, 10.0, 0)[None]
    b = torch.ones(1, 4, dtype=D)
    mv = lambda V: torch.einsum("bij,bj->bi", A, V)  # noqa: E731
    tol = torch.zeros(1, dtype=D)
    with pytest.raises(ValueError, match="needs x0=None and no preconditioner"):
        cg_solve(mv, b, b.clone(), max_iter=3, tol=tol, radius=torch.ones(1, dtype=D))
    with pytest.raises(ValueError, match="needs x0=None and no preconditioner"):
        cg_solve(mv, b, max_iter=3, tol=tol, preconditioner=lambda r: r, radius=torch.ones(1, dtype=D))
    for bad in (torch.zeros(1, dtype=D), torch.ones(2, dtype=D)):
        with pytest.raises(ValueError, match="radius must be positive and of shape"):
            cg_solve(mv, b, max_iter=3, tol=tol, radius=bad)


@pytest.mark.parametrize(
    "solver",
    [
        bl.CG(),
        bl.CG(M=bl.HutchinsonDiagonal(probes=8)),
        bl.MINRES(),
        bl.GMRES(),
        bl.BiCGStab(),
        bl.Neumann(max_iter=500, alpha=0.1),
        bl.DenseSolve(),
        bl.Nystrom(rank=5, rtol=1e-10),  # n = 5: an exact solve, judged on a tolerance
    ],
    ids=lambda c: type(c).__name__,
)
def test_batched_nan_in_one_problem_names_that_problem_only(solver) -> None:  # type: ignore[no-untyped-def]
    """A NaN in one problem's matvec makes that problem NONFINITE; the others are solved (a joint
    block-diagonal solve, where the NaN spreads to every block, is redone problem by problem)."""
    B, n = 4, 5
    As = torch.stack([spd(n, 5.0, seed=i) for i in range(B)])
    b = torch.randn(B, n, dtype=D, generator=torch.Generator().manual_seed(0))

    def matvec(V: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bij,bj->bi", As, V)
        out[2] = out[2] * float("nan")
        return out

    if isinstance(solver.M if isinstance(solver, bl.CG) else None, bl.HutchinsonDiagonal):
        with pytest.warns(bl.BilevelWarning, match=r"problems \[2\] .* left unpreconditioned"):
            res = solver(matvec, b)
    else:
        res = solver(matvec, b)
    assert res.problem_status is not None
    assert res.problem_status[2] is bl.LinearStatus.NONFINITE
    assert res.problems_with(bl.LinearStatus.NONFINITE) == [2] and res.failed_problems() == [2]
    ref = torch.linalg.solve(As, b)
    for i in (0, 1, 3):
        assert res.problem_status[i] is bl.LinearStatus.CONVERGED
        torch.testing.assert_close(res.x[i], ref[i], rtol=1e-7, atol=1e-8)


def test_a_fixed_budget_is_not_a_failure() -> None:
    B, n = 3, 8
    As = torch.stack([spd(n, 50.0, seed=i) for i in range(B)])
    b = torch.randn(B, n, dtype=D, generator=torch.Generator().manual_seed(0))
    res = bl.CG(max_iter=2, rtol=0.0, atol=0.0)(lambda V: torch.einsum("bij,bj->bi", As, V), b)
    assert res.problem_status == (bl.LinearStatus.BUDGET,) * B
    assert res.failed_problems() == [] and res.problems_with(bl.LinearStatus.BUDGET) == [0, 1, 2]
    capped = bl.CG(max_iter=2)(lambda V: torch.einsum("bij,bj->bi", As, V), b)
    assert capped.failed_problems() == [0, 1, 2]
    single = bl.CG(max_iter=2, rtol=0.0, atol=0.0)(lambda v: As[0] @ v, b[0])
    assert single.status is bl.LinearStatus.BUDGET and single.failed_problems() == []


# ---------------------------------------------------------------- preconditioned CG


def dominant(n: int, spread: float, seed: int) -> torch.Tensor:
    """Diagonally dominant SPD with diagonal entries spread over [1, spread]: A = diag(d) + E with
    E_ij = 0.5 min(d_i, d_j) S_ij / n (S symmetric Gaussian, zero diagonal), so that each row's
    off-diagonal mass is about 0.3 d_i and Jacobi scaling leaves a condition number below 2."""
    g = torch.Generator().manual_seed(seed)
    d = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), n, dtype=D)
    S = torch.randn(n, n, generator=g, dtype=D)
    S = (S + S.T) / 2
    S.fill_diagonal_(0.0)
    return torch.diag(d) + 0.5 * torch.minimum(d[:, None], d[None, :]) * S / n


def test_pcg_with_estimated_diagonal_equals_cg_in_fewer_iterations() -> None:
    n, probes = 200, 16
    A = dominant(n, 1e4, seed=0)
    margin = torch.diag(A) - (A - torch.diag(torch.diag(A))).abs().sum(dim=1)
    assert float(margin.min()) > 0  # diagonally dominant
    assert float(torch.linalg.cond(A)) > 5e3  # ill-conditioned
    b = torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(1))
    calls = 0

    def mv(v: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return A @ v

    plain = bl.CG(max_iter=1000)(mv, b)
    calls = 0
    pcg = bl.CG(max_iter=1000, M=bl.HutchinsonDiagonal(probes=probes))(mv, b)
    assert plain.converged and pcg.converged
    torch.testing.assert_close(pcg.x, plain.x, rtol=1e-8, atol=0)
    torch.testing.assert_close(pcg.x, torch.linalg.solve(A, b), rtol=1e-8, atol=0)
    # measured: 6 iterations against 663 (exact Jacobi also takes 6); the probes count as matvecs
    assert pcg.n_iter <= 10 and plain.n_iter >= 300
    assert calls == pcg.n_matvec == probes + pcg.n_iter + 1
    assert pcg.n_matvec < plain.n_matvec / 4


def test_pcg_recipe_in_batched_mode_equals_single_solves() -> None:
    B, n = 3, 40
    As = torch.stack([dominant(n, 10.0 ** (i + 2), seed=i) for i in range(B)])
    b = torch.randn(B, n, dtype=D, generator=torch.Generator().manual_seed(0))
    cg = bl.CG(M=bl.HutchinsonDiagonal(probes=8))
    res = cg(lambda V: torch.einsum("bij,bj->bi", As, V), b)
    assert res.problem_status == (bl.LinearStatus.CONVERGED,) * B
    assert res.problem_n_iter is not None
    for i in range(B):
        one = cg(lambda v, i=i: As[i] @ v, b[i])
        torch.testing.assert_close(res.x[i], one.x, rtol=1e-9, atol=1e-12)
        assert int(res.problem_n_iter[i]) == one.n_iter


def test_hutchinson_diagonal_converges_to_the_diagonal() -> None:
    n = 30
    A = spd(n, 20.0, seed=5)
    off = A - torch.diag(torch.diag(A))
    std1 = off.pow(2).sum(dim=1).sqrt()  # the standard deviation of one probe's estimate

    def mv(v: torch.Tensor) -> torch.Tensor:
        return A @ v

    errors = []
    for probes in (100, 1600):
        est = bl.hutchinson_diagonal(mv, torch.zeros(n, dtype=D), probes=probes, seed=3)
        z = (est - torch.diag(A)) / (std1 / probes**0.5)
        assert float(z.abs().max()) < 5.0  # within five standard deviations, entry by entry
        errors.append(float((est - torch.diag(A)).norm()))
    assert errors[1] < errors[0] / 2  # the error falls like 1 / sqrt(probes): 4x here
    # a diagonal matrix is read exactly by one probe (z_i^2 = 1)
    d = torch.linspace(1, 5, n, dtype=D)
    torch.testing.assert_close(bl.hutchinson_diagonal(lambda v: d * v, d, probes=1), d, rtol=0, atol=0)
    # batched: row b is problem b's diagonal, from the same probes as a single call
    As = torch.stack([A, 2 * A])
    est = bl.hutchinson_diagonal(lambda V: torch.einsum("bij,bj->bi", As, V), torch.zeros(2, n, dtype=D), 50)
    one = bl.hutchinson_diagonal(mv, torch.zeros(n, dtype=D), 50)
    torch.testing.assert_close(est, torch.stack([one, 2 * one]), rtol=1e-12, atol=1e-12)


def test_preconditioner_guards() -> None:
    like = torch.zeros(3, dtype=D)
    with pytest.raises(ValueError, match=r"hutchinson_diagonal\(probes=0\): probes must be >= 1"):
        bl.hutchinson_diagonal(lambda v: v, like, probes=0)
    with pytest.raises(ValueError, match=r"like must be \(n,\) or \(B, n\)"):
        bl.hutchinson_diagonal(lambda v: v, torch.zeros(2, 2, 2, dtype=D), probes=1)
    with pytest.raises(ValueError, match="2 diagonal entries are not finite and > 0"):
        bl.DiagonalPreconditioner(torch.tensor([1.0, 0.0, float("nan")], dtype=D))
    with pytest.raises(ValueError, match="diagonal must be a"):
        bl.DiagonalPreconditioner(torch.ones(2, 2, 2, dtype=D))
    with pytest.raises(ValueError, match=r"floor=0.0\): floor must be in \(0, 1\]"):
        bl.DiagonalPreconditioner.estimate(lambda v: v, like, probes=1, floor=0.0)
    for sick in (lambda v: v * float("nan"), lambda v: -v):
        with pytest.warns(bl.BilevelWarning, match=r"\[0\] has NaN or infinity or no positive entry"):
            M = bl.DiagonalPreconditioner.estimate(sick, like, probes=1)
        assert torch.equal(M.diagonal, torch.ones(3, dtype=D))  # left unpreconditioned
    d = torch.tensor([1.0, -1e-3, 2.0], dtype=D)
    with pytest.warns(bl.BilevelWarning, match="1 of 3 estimated diagonal entries were below 1e-06"):
        M = bl.DiagonalPreconditioner.estimate(lambda v: d * v, like, probes=1)
    torch.testing.assert_close(M.diagonal, torch.tensor([1.0, 2e-6, 2.0], dtype=D))
    for kwargs, err, match in [
        (dict(probes=0), ValueError, r"HutchinsonDiagonal\(probes=0\): probes must be >= 1"),
        (dict(probes=2.5), TypeError, "probes must be an int"),
        (dict(floor=0.0), ValueError, "floor must be in"),
        (dict(floor=2.0), ValueError, "floor must be in"),
        (dict(floor=float("nan")), ValueError, "floor must be in"),
        (dict(floor="1e-6"), TypeError, "floor must be a number"),
    ]:
        with pytest.raises(err, match=match):
            bl.HutchinsonDiagonal(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"CG\(M=5\): expected a callable"):
        bl.CG(M=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "M",
    [lambda r: 0 * r, lambda r: -r, lambda r: r * torch.tensor([1.0, -1.0], dtype=D)],
    ids=["zero", "neg", "mixed"],
)
def test_an_indefinite_preconditioner_is_blamed_not_the_matrix(M) -> None:  # type: ignore[no-untyped-def]
    """A is SPD; M is zero, negative definite or indefinite: CG stops on r'M(r) <= 0 and says
    INDEFINITE_PRECONDITIONER (before, the next p'Ap <= 0 read as A's negative curvature)."""
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
    b = torch.tensor([1.0, 2.0], dtype=D)  # r'M(r) = 1 - 4 < 0 for the mixed one at the start
    res = bl.CG(M=M)(lambda v: A @ v, b)
    assert res.status is bl.LinearStatus.INDEFINITE_PRECONDITIONER
    assert "preconditioner is not positive definite" in res.status.message
    # batched: the problem whose M is negative stops, the other converges untouched
    sign = torch.tensor([[-1.0], [1.0]], dtype=D)
    both = bl.CG(M=lambda R: sign * R)(lambda V: V @ A.T, torch.stack([b, b]))
    assert both.problem_status == (bl.LinearStatus.INDEFINITE_PRECONDITIONER, bl.LinearStatus.CONVERGED)
    torch.testing.assert_close(both.x[1], torch.linalg.solve(A, b))


def test_an_implicit_backward_names_an_indefinite_preconditioner() -> None:
    """In the implicit layer's backward, a preconditioner that is not positive definite raises a
    LinearSolveError that names it, not a NegativeCurvatureError blaming the Hessian."""
    theta = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    x = bl.implicit_argmin(
        lambda x, t: 0.5 * (x * x).sum() * 2.0 - (x * t).sum(),
        torch.zeros(2, dtype=D),
        theta,
        lambda f, x0, t: t.detach() / 2.0,
        linear_solver=bl.CG(M=lambda r: -r),
    )
    with pytest.raises(
        bl.LinearSolveError, match=r"INDEFINITE_PRECONDITIONER.*preconditioner is not positive"
    ):
        x.sum().backward()


def test_a_diagonal_preconditioner_of_another_size_is_named() -> None:
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
    M = bl.DiagonalPreconditioner(torch.ones(3, dtype=D))
    with pytest.raises(
        ValueError, match=r"diagonal of shape \(3,\) cannot precondition a residual of shape \(2,\)"
    ):
        bl.CG(M=M)(lambda v: A @ v, torch.ones(2, dtype=D))
    rows = bl.DiagonalPreconditioner(torch.ones(3, 2, dtype=D))
    with pytest.raises(
        ValueError, match=r"diagonal of shape \(3, 2\) cannot precondition a residual of shape \(2, 2\)"
    ):
        bl.CG(M=rows)(lambda V: V @ A.T, torch.ones(2, 2, dtype=D))
    # a (n,) diagonal serves every row of a batched solve
    res = bl.CG(M=bl.DiagonalPreconditioner(torch.diag(A)))(lambda V: V @ A.T, torch.ones(2, 2, dtype=D))
    assert res.problem_status == (bl.LinearStatus.CONVERGED,) * 2
