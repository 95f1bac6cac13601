"""bilevel.hyperopt: hypergradients against closed forms and finite differences; the drivers.

References: ridge regression with per-feature weights, whose hypergradient has a closed
form (dense float64 solve, independent of bilevel); central differences of a logistic
regression re-solved by Newton to 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch

import bilevel as bl
from bilevel.hyperopt import HyperProblem, HyperResult, HyperStep, HyperStop, minimize_hyper, search_hyper

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread() -> Iterator[None]:
    # SciPy's L-BFGS-B calls BLAS on tiny vectors; a multithreaded OpenBLAS on a busy
    # machine spends ~10x the work synchronizing (measured).  SciPy must be loaded first.
    import scipy.optimize  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _data(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    w = torch.randn(d, generator=g, dtype=D) * (torch.arange(d, dtype=D) < d // 2)
    return X, X @ w + 0.5 * torch.randn(n, generator=g, dtype=D)


X_TR, Y_TR = _data(30, 6, 0)
X_VA, Y_VA = _data(20, 6, 1)


def ridge(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """G(w, theta) = 1/2 ||X w - y||^2 + 1/2 sum_j exp(theta_j) w_j^2."""
    return 0.5 * ((X_TR @ w - Y_TR) ** 2).sum() + 0.5 * (theta.exp() * w**2).sum()


def val_mse(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((X_VA @ w - Y_VA) ** 2).mean()


def ridge_reference(theta: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """w*(theta), the validation loss and its hypergradient by dense linear algebra."""
    H = X_TR.T @ X_TR + torch.diag(theta.exp())
    w = torch.linalg.solve(H, X_TR.T @ Y_TR)
    r = X_VA @ w - Y_VA
    loss = float(0.5 * (r**2).mean())
    u = torch.linalg.solve(H, X_VA.T @ r / len(r))
    # d/dtheta_j of grad_w G = exp(theta_j) w_j e_j, so dL/dtheta_j = -u_j exp(theta_j) w_j.
    return w, loss, -u * theta.exp() * w


def ridge_solver(objective: object, init: torch.Tensor, theta: torch.Tensor) -> bl.SolverResult:
    """An exact inner solver for `ridge` (Cholesky on the normal equations)."""
    H = X_TR.T @ X_TR + torch.diag(theta.exp())
    w = torch.cholesky_solve((X_TR.T @ Y_TR)[:, None], torch.linalg.cholesky(H))[:, 0]
    return bl.SolverResult(w.to(init.dtype), bl.SolverStatus.CONVERGED, n_iter=1)


def ridge_problem() -> HyperProblem:
    return HyperProblem(ridge, val_mse, ridge_solver, linear_solver=bl.CG(rtol=1e-12))


def test_evaluate_matches_ridge_closed_form() -> None:
    theta = torch.linspace(-1.0, 2.0, 6, dtype=D).requires_grad_(True)
    ev = ridge_problem().evaluate(theta, torch.zeros(6, dtype=D))
    ev.loss.backward()
    w_ref, loss_ref, grad_ref = ridge_reference(theta.detach())
    torch.testing.assert_close(ev.params, w_ref, rtol=1e-12, atol=1e-12)
    assert math.isclose(float(ev.loss.detach()), loss_ref, rel_tol=1e-12)
    assert theta.grad is not None
    torch.testing.assert_close(theta.grad, grad_ref, rtol=1e-9, atol=1e-12)  # CG rtol 1e-12
    assert ev.info.last_backward is not None and ev.info.last_backward.converged


def test_hypergradient_matches_finite_differences_logistic() -> None:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 4, generator=g, dtype=D)
    s = torch.sign(
        X @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=D) + 0.3 * torch.randn(40, generator=g, dtype=D)
    )
    Xv, sv = X[:15], s[:15]
    Xt, st = X[15:], s[15:]

    def G(p: tuple[torch.Tensor, torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
        w, b = p
        return torch.nn.functional.softplus(-st * (Xt @ w + b)).sum() + 0.5 * (theta.exp() * w**2).sum()

    def L(p: tuple[torch.Tensor, torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
        w, b = p
        return torch.nn.functional.softplus(-sv * (Xv @ w + b)).mean()

    # Newton reaches ||grad|| ~ 1e-13, so a re-solve is exact to far below eps^2.
    solver = bl.solvers.NewtonCG(newton_iters=50, cg_iters=10, tol=1e-12)
    problem = HyperProblem(G, L, solver, linear_solver=bl.CG(rtol=1e-12), optimality_tol=1e-10)
    init = (torch.zeros(4, dtype=D), torch.zeros((), dtype=D))
    theta = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=D, requires_grad=True)
    problem.evaluate(theta, init).loss.backward()
    assert theta.grad is not None
    eps = 1e-4  # central differences: truncation ~eps^2 * |L'''| ~ 1e-9
    fd = torch.empty(4, dtype=D)
    for j in range(4):
        e = torch.zeros(4, dtype=D)
        e[j] = eps
        with torch.no_grad():
            hi = float(problem.evaluate(theta.detach() + e, init).loss)
            lo = float(problem.evaluate(theta.detach() - e, init).loss)
        fd[j] = (hi - lo) / (2 * eps)
    torch.testing.assert_close(theta.grad, fd, rtol=1e-6, atol=1e-9)


def test_minimize_hyper_descends_and_records() -> None:
    res = minimize_hyper(
        ridge_problem(),
        torch.zeros(6, dtype=D),
        torch.zeros(6, dtype=D),
        outer=lambda ps: torch.optim.Adam(ps, lr=0.2),
        steps=15,
    )
    assert isinstance(res, HyperResult)
    assert res.n_solves == 15 == len(res.history)
    assert [r.solve for r in res.history] == list(range(1, 16))
    assert [r.outer_step for r in res.history] == list(range(15))
    assert res.outer_loss == min(res.outer_losses) < res.outer_losses[0]
    assert res.history[res.best_solve - 1].outer_loss == res.outer_loss
    assert all(a >= b for a, b in zip(res.best_so_far, res.best_so_far[1:]))
    assert all(r.inner_status is bl.SolverStatus.CONVERGED for r in res.history)
    assert all(r.backward_status is bl.LinearStatus.CONVERGED and r.backward_matvecs > 0 for r in res.history)
    assert all(math.isfinite(h) and h > 0 for h in res.hypergrad_norms)
    # The best point's params and loss are those of the closed form at the best hyper.
    assert isinstance(res.hyper, torch.Tensor)
    w_ref, loss_ref, _ = ridge_reference(res.hyper)
    torch.testing.assert_close(res.params, w_ref, rtol=1e-12, atol=1e-12)
    assert math.isclose(res.outer_loss, loss_ref, rel_tol=1e-9)
    assert not res.hyper.requires_grad and not res.last_hyper.requires_grad  # type: ignore[union-attr]


def test_warm_start_saves_inner_and_backward_iterations_not_answers() -> None:
    # Logistic regression with 40 weights: L-BFGS iterations depend on the starting point,
    # and CG reaches rtol=1e-6 in fewer than 40 iterations, earlier from a warm start.
    g = torch.Generator().manual_seed(5)
    d = 40
    X = torch.randn(150, d, generator=g, dtype=D)
    s = torch.sign(X[:, 0] - X[:, 1] + 0.5 * torch.randn(150, generator=g, dtype=D))

    def G(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-s[:100] * (X[:100] @ w)).sum() + 0.5 * (theta.exp() * w**2).sum()

    def L(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(-s[100:] * (X[100:] @ w)).mean()

    problem = HyperProblem(G, L, bl.solvers.ScipyLBFGS(tol=1e-8), linear_solver=bl.CG(rtol=1e-6))
    runs = {
        warm: minimize_hyper(
            problem,
            torch.zeros(d, dtype=D),
            torch.zeros(d, dtype=D),
            outer=lambda ps: torch.optim.Adam(ps, lr=0.03),
            steps=8,
            warm_start=warm,
        )
        for warm in (False, True)
    }
    cold, warm = runs[False], runs[True]
    # Measured: 221 vs 273 inner iterations, 119 vs 154 CG iterations (about -20%).
    assert warm.inner_iters < 0.9 * cold.inner_iters, (warm.inner_iters, cold.inner_iters)
    cold_back = sum(r.backward_iters for r in cold.history)
    warm_back = sum(r.backward_iters for r in warm.history)
    assert warm_back < 0.9 * cold_back, (warm_back, cold_back)
    # Same trajectory up to the solvers' tolerances.
    for a, b in zip(cold.outer_losses, warm.outer_losses):
        assert math.isclose(a, b, rel_tol=1e-6)


def test_lbfgs_outer_counts_every_evaluation() -> None:
    # L-BFGS's line search tries far points (exp(theta) >> 1e6), Hessians of condition
    # beyond 1e8 on which CG stalls: a dense solve is exact there, and cheap at n = 6.
    res = minimize_hyper(
        HyperProblem(ridge, val_mse, ridge_solver, linear_solver=bl.DenseSolve()),
        torch.zeros(6, dtype=D),
        torch.zeros(6, dtype=D),
        outer=lambda ps: torch.optim.LBFGS(ps, lr=1.0, max_iter=6, line_search_fn="strong_wolfe"),
        steps=2,
    )
    # Each LBFGS step evaluates the closure more than once; each evaluation is one solve.
    assert res.n_solves > 2
    assert {r.outer_step for r in res.history} == {0, 1}
    assert res.outer_loss < res.outer_losses[0]


def test_search_hyper_picks_lowest_and_counts() -> None:
    grid = [torch.full((6,), t, dtype=D) for t in (-2.0, 0.0, 2.0, 4.0)]
    res = search_hyper(ridge_problem(), grid, torch.zeros(6, dtype=D))
    refs = [ridge_reference(t)[1] for t in grid]
    assert res.n_solves == 4
    assert res.best_solve == 1 + min(range(4), key=lambda i: refs[i])
    for got, ref in zip(res.outer_losses, refs):
        assert math.isclose(got, ref, rel_tol=1e-9)
    assert all(math.isnan(h) for h in res.hypergrad_norms)
    assert all(r.backward_status is None for r in res.history)
    assert torch.equal(res.last_hyper, grid[-1])  # type: ignore[arg-type]


def test_callback_stops_the_run() -> None:
    seen: list[int] = []

    def cb(step: HyperStep) -> bool:
        seen.append(step.solve)
        return len(seen) == 3

    res = minimize_hyper(
        ridge_problem(), torch.zeros(6, dtype=D), torch.zeros(6, dtype=D), steps=10, callback=cb
    )
    assert res.n_solves == 3 and seen == [1, 2, 3]
    assert res.stop is HyperStop.CALLBACK and res.stopped_at == 2 and res.stopped_early
    seen.clear()
    grid = [torch.full((6,), float(t), dtype=D) for t in range(5)]
    found = search_hyper(ridge_problem(), grid, torch.zeros(6, dtype=D), callback=cb)
    assert found.n_solves == 3 and found.stop is HyperStop.CALLBACK and found.stopped_at == 2


def test_tuple_hyper_and_direct_outer_dependence() -> None:
    # hyper = (log weights, a scalar shift); L depends on hyper directly too.
    def G(w: torch.Tensor, h: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return ridge(w, h[0] + h[1])

    def L(w: torch.Tensor, h: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return val_mse(w, h[0]) + 0.01 * (h[1] ** 2)

    problem = HyperProblem(
        G, L, lambda g, w, h: ridge_solver(g, w, h[0] + h[1]), linear_solver=bl.CG(rtol=1e-12)
    )
    h0 = torch.zeros(6, dtype=D, requires_grad=True)
    h1 = torch.tensor(0.5, dtype=D, requires_grad=True)
    problem.evaluate((h0, h1), torch.zeros(6, dtype=D)).loss.backward()
    _, _, ref = ridge_reference(torch.full((6,), 0.5, dtype=D))
    assert h0.grad is not None and h1.grad is not None
    torch.testing.assert_close(h0.grad, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h1.grad, ref.sum() + 0.01, rtol=1e-9, atol=1e-12)
    res = minimize_hyper(problem, (h0, h1), torch.zeros(6, dtype=D), steps=3)
    assert isinstance(res.hyper, tuple) and len(res.hyper) == 2
    assert float(h1.detach()) == 0.5  # the initial hyperparameters are copied, not modified


def test_float32_runs() -> None:
    res = minimize_hyper(
        HyperProblem(
            lambda w, t: ridge(w.double(), t.double()).float(),
            lambda w, t: val_mse(w.double(), t.double()).float(),
            bl.solvers.ScipyLBFGS(tol=1e-4),
            # f ~ 10 in float32: ||grad|| below ~1e-2 is under its rounding (ScipyLBFGS's docs).
            optimality_tol=2e-2,
        ),
        torch.zeros(6),
        torch.zeros(6),
        steps=3,
    )
    assert res.params.dtype == torch.float32  # type: ignore[union-attr]
    assert res.outer_loss <= res.outer_losses[0]


@pytest.mark.gpu  # deselected by default; run with -m gpu on a CUDA machine
def test_cuda_matches_cpu() -> None:
    dev = torch.device("cuda")
    Xt, yt = X_TR.to(dev), Y_TR.to(dev)
    Xv, yv = X_VA.to(dev), Y_VA.to(dev)

    def G(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((Xt @ w - yt) ** 2).sum() + 0.5 * (t.exp() * w**2).sum()

    def L(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    problem = HyperProblem(G, L, bl.solvers.ScipyLBFGS(tol=1e-10), linear_solver=bl.CG(rtol=1e-12))
    theta = torch.zeros(6, dtype=D, device=dev, requires_grad=True)
    problem.evaluate(theta, torch.zeros(6, dtype=D, device=dev)).loss.backward()
    assert theta.grad is not None and theta.grad.device.type == "cuda"
    torch.testing.assert_close(
        theta.grad.cpu(), ridge_reference(torch.zeros(6, dtype=D))[2], rtol=1e-7, atol=1e-10
    )


# ------------------------------------------------------------------------------ bad input
def test_problem_rejects_bad_configuration() -> None:
    with pytest.raises(TypeError, match="inner_objective"):
        HyperProblem(1, val_mse, bl.solvers.ScipyLBFGS())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="solver"):
        HyperProblem(ridge, val_mse, "lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimality_tol"):
        HyperProblem(ridge, val_mse, bl.solvers.ScipyLBFGS(), optimality_tol=-1.0)


def test_drivers_reject_bad_arguments() -> None:
    p, z = ridge_problem(), torch.zeros(6, dtype=D)
    with pytest.raises(ValueError, match="steps"):
        minimize_hyper(p, z, z, steps=0)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        minimize_hyper(p, z, z, outer=lambda ps: ps)  # type: ignore[arg-type,return-value]
    # an optimizer on other tensors would never move hyper, and its gradients would pile up
    other = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match="does not hold the params it was given"):
        minimize_hyper(p, z, z, steps=2, outer=lambda ps: torch.optim.Adam(other))
    with pytest.raises(TypeError, match=r"minimize_hyper\(warm_start='no'\)"):
        minimize_hyper(p, z, z, warm_start="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="candidates must be an iterable of hyperparameter values"):
        search_hyper(p, 3, z)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"search_hyper\(warm_start=1\)"):
        search_hyper(p, [z], z, warm_start=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating point"):
        minimize_hyper(p, torch.zeros(6, dtype=torch.int64), z)
    with pytest.raises(bl.NonFiniteError, match="hyper"):
        minimize_hyper(p, torch.full((6,), math.nan, dtype=D), z)
    with pytest.raises(TypeError, match="HyperProblem"):
        minimize_hyper(ridge, z, z)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        search_hyper(p, [], z)


def test_non_scalar_or_nonfinite_outer_loss_raises() -> None:
    p = HyperProblem(ridge, lambda w, t: X_VA @ w, bl.solvers.ScipyLBFGS(tol=1e-8))
    with pytest.raises(bl.StructureError, match="scalar"):
        p.evaluate(torch.zeros(6, dtype=D), torch.zeros(6, dtype=D))
    p = HyperProblem(ridge, lambda w, t: w.sum() / 0.0, bl.solvers.ScipyLBFGS(tol=1e-8))
    with pytest.raises(bl.NonFiniteError, match="outer loss"):
        p.evaluate(torch.zeros(6, dtype=D), torch.zeros(6, dtype=D))


def test_inexact_inner_solve_is_refused() -> None:
    p = HyperProblem(ridge, val_mse, bl.solvers.GradientDescent(lr=1e-4, max_iter=1), optimality_tol=1e-6)
    with pytest.raises(bl.OptimalityError, match="optimality_tol"):
        minimize_hyper(p, torch.zeros(6, dtype=D), torch.zeros(6, dtype=D), steps=1)


def test_result_repr_is_short() -> None:
    """The history (one record per solve) is counted, not printed."""
    res = minimize_hyper(ridge_problem(), torch.zeros(6, dtype=D), torch.zeros(6, dtype=D), steps=30)
    r = repr(res)
    assert r.startswith("HyperResult(outer_loss=") and "n_solves=30" in r and len(r) < 250, r
    assert "Tensor(6,) float64" in r


# ------------------------------------------------------------------ callback, score, patience
X_HO, Y_HO = _data(50, 6, 2)  # a held-out split, drawn like the validation set


def heldout_mse(step: HyperStep) -> float:
    assert isinstance(step.params, torch.Tensor)
    return float(0.5 * ((X_HO @ step.params - Y_HO) ** 2).mean())


def test_callback_sees_hyper_answer_and_evaluation() -> None:
    steps: list[HyperStep] = []
    res = minimize_hyper(
        ridge_problem(),
        torch.zeros(6, dtype=D),
        torch.zeros(6, dtype=D),
        outer=lambda ps: torch.optim.Adam(ps, lr=0.2),
        steps=5,
        callback=steps.append,  # returns None: go on
    )
    assert res.n_solves == 5 and res.stop is HyperStop.COMPLETED and res.stopped_at is None
    assert not res.stopped_early
    assert [s.outer_step for s in steps] == list(range(5)) and [s.solve for s in steps] == [1, 2, 3, 4, 5]
    assert torch.equal(steps[0].hyper, torch.zeros(6, dtype=D))  # type: ignore[arg-type]
    for s, record in zip(steps, res.history):
        assert s.record == record and s.record.score == s.outer_loss == record.outer_loss
        hyper = s.hyper
        assert isinstance(hyper, torch.Tensor) and not hyper.requires_grad
        # The answer and loss are those at the hyperparameters the step reports (closed form),
        # so the copies were taken before the optimizer moved theta.
        w_ref, loss_ref, _ = ridge_reference(hyper)
        torch.testing.assert_close(s.params, w_ref, rtol=1e-12, atol=1e-12)
        assert math.isclose(float(s.evaluation.loss), loss_ref, rel_tol=1e-12)
        assert not s.evaluation.loss.requires_grad and s.evaluation.info.last_backward is not None
    assert not torch.equal(steps[1].hyper, steps[4].hyper)  # type: ignore[arg-type]


def test_score_chooses_the_returned_hyperparameters() -> None:
    """The held-out score ranks the same trajectory; the result is its argmin, not the outer loss's."""
    kw = dict(outer=lambda ps: torch.optim.Adam(ps, lr=0.3), steps=30)
    hypers: list[torch.Tensor] = []
    res = minimize_hyper(
        ridge_problem(),
        torch.zeros(6, dtype=D),
        torch.zeros(6, dtype=D),
        callback=lambda s: hypers.append(s.hyper),  # type: ignore[arg-type]
        score=heldout_mse,
        **kw,  # type: ignore[arg-type]
    )
    # Independent reference: the held-out loss of the closed-form answer at each recorded hyper.
    ref = [float(0.5 * ((X_HO @ ridge_reference(h)[0] - Y_HO) ** 2).mean()) for h in hypers]
    for got, want in zip(res.scores, ref):
        assert math.isclose(got, want, rel_tol=1e-9)
    best = min(range(len(ref)), key=ref.__getitem__)
    assert res.best_solve == best + 1 and math.isclose(res.score, ref[best], rel_tol=1e-9)
    assert torch.equal(res.hyper, hypers[best])  # type: ignore[arg-type]
    assert res.outer_loss == res.outer_losses[best]
    plain = minimize_hyper(ridge_problem(), torch.zeros(6, dtype=D), torch.zeros(6, dtype=D), **kw)  # type: ignore[arg-type]
    assert plain.outer_losses == res.outer_losses  # the score changes the choice, not the run
    assert plain.best_solve == 1 + min(range(30), key=plain.outer_losses.__getitem__) != res.best_solve


def test_patience_stops_when_the_score_stops_improving() -> None:
    # A score whose best is at solve 4: with patience 3, solves 5, 6, 7 do not improve it.
    def score(step: HyperStep) -> float:
        assert math.isnan(step.record.score)  # not yet computed when score runs
        return abs(step.solve - 4.0)

    hypers: dict[int, torch.Tensor] = {}

    def remember(step: HyperStep) -> bool:
        assert step.record.score == abs(step.solve - 4.0)  # the callback sees it
        hypers[step.solve] = step.hyper  # type: ignore[assignment]
        return False

    z = torch.zeros(6, dtype=D)
    res = minimize_hyper(ridge_problem(), z, z, steps=20, score=score, patience=3, callback=remember)
    assert res.n_solves == 7 and res.stop is HyperStop.PATIENCE and res.stopped_at == 6
    assert res.best_solve == 4 and res.score == 0.0
    assert torch.equal(res.hyper, hypers[4])  # type: ignore[arg-type]
    assert "stop=PATIENCE at outer step 6" in repr(res)
    assert minimize_hyper(ridge_problem(), z, z, steps=10, score=score).n_solves == 10
    grid = [torch.full((6,), float(t), dtype=D) for t in range(10)]
    found = search_hyper(ridge_problem(), grid, z, score=score, patience=2)
    assert found.n_solves == 6 and found.stopped_at == 5 and torch.equal(found.hyper, grid[3])  # type: ignore[arg-type]


def test_callback_and_score_are_checked() -> None:
    p, z = ridge_problem(), torch.zeros(6, dtype=D)
    with pytest.raises(ValueError, match=r"minimize_hyper\(patience=0\): patience must be an int >= 1"):
        minimize_hyper(p, z, z, patience=0)
    with pytest.raises(TypeError, match=r"search_hyper\(callback=3\): expected a function"):
        search_hyper(p, [z], z, callback=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"minimize_hyper\(score='heldout'\)"):
        minimize_hyper(p, z, z, score="heldout")  # type: ignore[arg-type]
    # A tensor verdict would be silently ignored by a test for True: it is refused.
    with pytest.raises(TypeError, match=r"callback returned Tensor; it must return True to stop"):
        minimize_hyper(p, z, z, steps=3, callback=lambda s: torch.tensor(True))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"score\(step\) returned str"):
        minimize_hyper(p, z, z, steps=3, score=lambda s: "low")  # type: ignore[arg-type,return-value]
    with pytest.raises(bl.NonFiniteError, match=r"score\(step\) is nan at outer step 0"):
        minimize_hyper(p, z, z, steps=3, score=lambda s: math.nan)
    # A one-element tensor score is read as its value.
    res = minimize_hyper(p, z, z, steps=3, score=lambda s: torch.tensor(float(-s.solve)))  # type: ignore[arg-type,return-value]
    assert res.best_solve == 3 and res.score == -3.0


# ------------------------------------------------------------------ non-finite outer loss, missing grad
def _flaky_outer(bad: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """val_mse, except on its third call, where it returns bad(w)."""
    calls: list[int] = []

    def L(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return bad(w) if len(calls) == 3 else val_mse(w, theta)

    return L


def test_nonfinite_outer_loss_gradient_is_named_at_its_outer_step() -> None:
    # sqrt at 0: the loss is finite (0), its gradient with respect to w is NaN (inf * 0).
    def sqrt_at_zero(w: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(0.0 * (w**2).sum())

    z = torch.zeros(6, dtype=D)
    p = HyperProblem(ridge, _flaky_outer(sqrt_at_zero), ridge_solver, linear_solver=bl.CG(rtol=1e-12))
    with pytest.raises(
        bl.NonFiniteError, match=r"gradient of the outer loss \(= 0\) at outer step 2 .*inner answer"
    ):
        minimize_hyper(p, z, z, steps=5)
    theta = torch.zeros(6, dtype=D, requires_grad=True)
    ev = HyperProblem(ridge, lambda w, t: sqrt_at_zero(w), ridge_solver).evaluate(theta, z)
    with pytest.raises(bl.NonFiniteError, match=r"gradient of the outer loss .* inner answer") as err:
        ev.loss.backward()
    assert "backward linear solve" not in str(err.value)
    # Deferred, the check is queued before the backward solve's and still reports first.
    ev = HyperProblem(ridge, lambda w, t: sqrt_at_zero(w), ridge_solver).evaluate(theta, z)
    with pytest.raises(bl.NonFiniteError, match=r"gradient of the outer loss .* inner answer"):
        with bl.deferred_checks():
            ev.loss.backward()
    p = HyperProblem(ridge, _flaky_outer(lambda w: w.sum() / 0.0), ridge_solver)
    with pytest.raises(
        bl.NonFiniteError, match=r"outer loss is -?(nan|inf) at outer step 2 \(inner solve 3\)"
    ):
        minimize_hyper(p, z, z, steps=5)
    p = HyperProblem(ridge, _flaky_outer(lambda w: w.sum() / 0.0), ridge_solver)
    grid = [torch.full((6,), float(t), dtype=D) for t in range(5)]
    with pytest.raises(bl.NonFiniteError, match=r"outer loss is -?(nan|inf) at candidate 2"):
        search_hyper(p, grid, z)


def test_nonfinite_hypergradient_from_the_direct_term_names_the_step() -> None:
    # The outer loss depends on theta directly through sqrt(theta_0^2): NaN gradient at theta_0 = 0.
    p = HyperProblem(
        ridge,
        lambda w, t: val_mse(w, t) + torch.sqrt(t[0] ** 2),
        ridge_solver,
        linear_solver=bl.CG(rtol=1e-12),
    )
    z = torch.zeros(6, dtype=D)
    with pytest.raises(bl.NonFiniteError, match=r"hypergradient has NaN or infinity at outer step 0"):
        minimize_hyper(p, z, z, steps=3)


def test_an_outer_loss_blind_to_params_and_hyper_is_named() -> None:
    p = HyperProblem(ridge, lambda w, t: torch.tensor(1.0, dtype=D), bl.solvers.ScipyLBFGS(tol=1e-8))
    z = torch.zeros(6, dtype=D)
    with pytest.raises(bl.BilevelError, match="depends on neither the inner answer nor the hyperparameters"):
        minimize_hyper(p, z, z, steps=2)


def test_hyper_without_requires_grad_is_named() -> None:
    z = torch.zeros(6, dtype=D)
    ev = ridge_problem().evaluate(torch.zeros(6, dtype=D), z)
    assert math.isclose(float(ev.loss.detach()), ridge_reference(z)[1], rel_tol=1e-12)  # value unchanged
    with pytest.raises(bl.BilevelError, match=r"no tensor of hyper requires grad.*requires_grad=True"):
        ev.loss.backward()
    with torch.no_grad():  # a value-only evaluation has no graph at all
        assert not ridge_problem().evaluate(z, z).loss.requires_grad
    # One leaf of a tuple requiring grad is enough: no error, the gradient reaches it.
    h = (torch.zeros(6, dtype=D, requires_grad=True), torch.tensor(0.0, dtype=D))
    p = HyperProblem(
        lambda w, h: ridge(w, h[0] + h[1]),
        lambda w, h: val_mse(w, h[0]),
        lambda g, w, h: ridge_solver(g, w, h[0]),
    )
    p.evaluate(h, z).loss.backward()
    assert h[0].grad is not None and h[1].grad is None
