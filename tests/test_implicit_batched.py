"""The batched implicit layer (B problems in one call) and torch.func transforms through it.

References: the closed-form hypergradients of `problems.batched_quadratic`, B single-problem
calls of the same layer, and dense float64 solves.
"""

from __future__ import annotations

import warnings

import helpers as H
import problems as P
import pytest
import torch
import torch.func

import bilevel as bl
from bilevel.solvers import GradientDescent, NewtonCG

D = torch.float64

SOLVERS = [c.name for c in H.BATCHED]
LINEAR = {
    "cg": bl.CG(),
    "cg-no-check": bl.CG(check_residual=False),
    "minres": bl.MINRES(),
    "gmres": bl.GMRES(),
    "dense": bl.DenseSolve(),
}


@pytest.mark.parametrize("linear", list(LINEAR))
@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_layer_equals_closed_form_and_single_calls(solver: str, linear: str) -> None:
    q = P.batched_quadratic()
    B = q.theta.shape[0]
    theta = q.theta.clone().requires_grad_(True)
    phi, info = bl.implicit_argmin(
        q.per_problem,
        torch.zeros_like(q.theta),
        theta,
        H.solver(solver)(q, 1e-11, batched=True),
        linear_solver=LINEAR[linear],
        batched=True,
        return_info=True,
    )
    torch.testing.assert_close(phi.detach(), q.solution, rtol=0, atol=1e-9)
    (grad,) = torch.autograd.grad(q.outer(phi), theta)
    torch.testing.assert_close(grad, q.hypergrad, rtol=1e-7, atol=1e-9)
    assert info.problem_residual_norm is not None and info.problem_residual_norm.shape == (B,)
    last = info.last_backward
    assert last is not None and last.problem_status == (bl.LinearStatus.CONVERGED,) * B
    # B single-problem calls of the same layer
    single_solver = H.solver(solver)(q, 1e-11)
    for b in range(B):
        th = q.theta[b].clone().requires_grad_(True)
        ph = bl.implicit_argmin(
            q.single(b), torch.zeros_like(th), th, single_solver, linear_solver=LINEAR[linear]
        )
        (g,) = torch.autograd.grad(0.5 * ((ph - q.target[b]) ** 2).sum(), th)
        torch.testing.assert_close(grad[b], g, rtol=1e-7, atol=1e-9)


def test_batched_layer_with_dict_trees_and_a_shared_theta() -> None:
    """iMAML's shape: B task answers (a dict with a leading B) of one shared theta (a dict)."""
    q = P.batched_quadratic()
    B, n = q.theta.shape
    shared = {
        "a": q.theta[0, :3].clone().requires_grad_(True),
        "b": q.theta[0, 3:].clone().requires_grad_(True),
    }

    def per_problem(phi: dict, th: dict) -> torch.Tensor:
        full = torch.cat([phi["a"], phi["b"]], dim=1)
        t = torch.cat([th["a"], th["b"]]).expand(B, n)
        return q.per_problem(full, t)

    init = {"a": torch.zeros(B, 3, dtype=D), "b": torch.zeros(B, n - 3, dtype=D)}
    phi = bl.implicit_argmin(
        per_problem, init, shared, NewtonCG(newton_iters=50, tol=1e-11, batched=True), batched=True
    )
    assert isinstance(phi, dict) and list(phi) == ["a", "b"] and phi["a"].shape == (B, 3)
    full = torch.cat([phi["a"], phi["b"]], dim=1)
    ga, gb = torch.autograd.grad(q.outer(full), [shared["a"], shared["b"]])
    # Closed form: H_b phi_b = lam theta - c_b, so d phi_b / d theta = lam H_b^-1 and the
    # gradient of the shared theta sums the B problems'.
    H = q.A + q.lam * torch.eye(n, dtype=D)
    sol = torch.linalg.solve(H, q.lam * torch.cat([shared["a"], shared["b"]]).detach() - q.c)
    ref = (q.lam * torch.linalg.solve(H, sol - q.target)).sum(0)
    torch.testing.assert_close(torch.cat([ga, gb]), ref, rtol=1e-7, atol=1e-9)


def _indefinite_batch() -> tuple[P.BatchedQuadratic, torch.Tensor]:
    q = P.batched_quadratic()
    A = q.A.clone()
    A[2] = A[2] - 30.0 * torch.eye(A.shape[1], dtype=D)  # problem 2: a saddle, not a minimum
    return q, A


def test_one_failing_problem_is_named_not_hidden() -> None:
    q, A = _indefinite_batch()
    # The solver is a black box that returns the stationary points (exact solves).
    H = A + q.lam * torch.eye(A.shape[1], dtype=D)

    def per_problem(phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        quad = 0.5 * torch.einsum("bi,bij,bj->b", phi, A, phi)
        return quad + (q.c * phi).sum(1) + 0.5 * q.lam * ((phi - theta) ** 2).sum(1)

    def exact(objective, init, theta):  # type: ignore[no-untyped-def]
        return torch.linalg.solve(H, q.lam * theta - q.c)

    theta = q.theta.clone().requires_grad_(True)
    phi = bl.implicit_argmin(per_problem, torch.zeros_like(theta), theta, exact, batched=True)
    with pytest.raises(bl.NegativeCurvatureError, match=r"problem\(s\) \[2\]"):
        q.outer(phi).backward()
    # throw=False, warn=False: recorded per problem, no warning
    phi, info = bl.implicit_argmin(
        per_problem,
        torch.zeros_like(theta),
        theta,
        exact,
        batched=True,
        throw=False,
        warn=False,
        return_info=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.outer(phi).backward()
    st = info.last_backward.problem_status  # type: ignore[union-attr]
    assert st[2] is bl.LinearStatus.NEGATIVE_CURVATURE
    assert all(s is bl.LinearStatus.CONVERGED for i, s in enumerate(st) if i != 2)


def test_batched_optimality_check_names_problems() -> None:
    q = P.batched_quadratic()
    capped = GradientDescent(lr=1 / q.L, max_iter=30, tol=0.0, batched=True)
    with pytest.raises(bl.OptimalityError, match=r"problem\(s\) \[.*3\]"):
        bl.implicit_argmin(
            q.per_problem, torch.zeros_like(q.theta), q.theta, capped, batched=True, optimality_tol=1e-8
        )


def test_batched_guards() -> None:
    q = P.batched_quadratic()
    with pytest.raises(ValueError, match=r"not in batched mode.*batched=True"):
        bl.implicit_argmin(
            q.per_problem, torch.zeros_like(q.theta), q.theta, GradientDescent(lr=0.1), batched=True
        )
    with pytest.raises(bl.StructureError, match="same leading batch dimension"):
        bl.implicit_argmin(
            q.per_problem,
            (torch.zeros(4, 2, dtype=D), torch.zeros(3, 2, dtype=D)),
            q.theta,
            GradientDescent(lr=0.1, batched=True),
            batched=True,
        )
    with pytest.raises(TypeError, match="pass an instance"):
        bl.implicit_argmin(q.per_problem, torch.zeros_like(q.theta), q.theta, GradientDescent, batched=True)


def test_measure_residual_false_trusts_the_solver_and_saves_a_gradient() -> None:
    q = P.batched_quadratic()
    solver = GradientDescent(lr=1 / q.L, max_iter=5000, tol=1e-10, batched=True)
    _, info = bl.implicit_argmin(
        q.per_problem,
        torch.zeros_like(q.theta),
        q.theta,
        solver,
        batched=True,
        optimality_tol=None,
        measure_residual=False,
        return_info=True,
    )
    res = info.solver_result
    assert res is not None and res.problem_grad_norm is not None
    torch.testing.assert_close(info.problem_residual_norm, res.problem_grad_norm.double())
    with pytest.raises(ValueError, match="measure_residual=False"):
        bl.implicit_argmin(
            q.per_problem, torch.zeros_like(q.theta), q.theta, solver, batched=True, measure_residual=False
        )


def test_backward_x0_callable_and_bad_linear_solver() -> None:
    q = P.batched_quadratic()
    theta = q.theta.clone().requires_grad_(True)
    solver = NewtonCG(newton_iters=50, tol=1e-11, batched=True)
    seen = []

    def x0(b: torch.Tensor) -> torch.Tensor:
        seen.append(b.shape)
        return b / q.lam

    phi = bl.implicit_argmin(
        q.per_problem, torch.zeros_like(theta), theta, solver, batched=True, backward_x0=x0
    )
    (g,) = torch.autograd.grad(q.outer(phi), theta)
    assert seen == [q.theta.shape]
    torch.testing.assert_close(g, q.hypergrad, rtol=1e-7, atol=1e-9)
    phi = bl.implicit_argmin(
        q.per_problem,
        torch.zeros_like(theta),
        theta,
        solver,
        batched=True,
        linear_solver=lambda mv, b, x0=None: b,
    )
    with pytest.raises(TypeError, match=r"must return a bilevel\.LinearSolveResult"):
        q.outer(phi).backward()


# ------------------------------------------------------------------------------------ torch.func
def _layer(q: P.BatchedQuadratic, b: int):  # type: ignore[no-untyped-def]
    solver = NewtonCG(newton_iters=50, cg_iters=10, tol=1e-12)

    def f(theta: torch.Tensor) -> torch.Tensor:
        return bl.implicit_argmin(q.single(b), torch.zeros_like(theta), theta, solver)

    return f


def test_vmap_over_the_layer_equals_a_loop() -> None:
    q = P.batched_quadratic()
    f = _layer(q, 0)  # one objective, B different thetas
    thetas = q.theta.clone()
    out = torch.func.vmap(f)(thetas)
    loop = torch.stack([f(t) for t in thetas])
    torch.testing.assert_close(out, loop, rtol=0, atol=1e-12)

    # reverse mode through the vmapped layer (torch.autograd) equals the loop's gradients
    th = thetas.clone().requires_grad_(True)
    (g_vmap,) = torch.autograd.grad(0.5 * ((torch.func.vmap(f)(th) - q.target[0]) ** 2).sum(), th)
    for b in range(thetas.shape[0]):
        t = thetas[b].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(0.5 * ((f(t) - q.target[0]) ** 2).sum(), t)
        torch.testing.assert_close(g_vmap[b], g, rtol=1e-9, atol=1e-12)


def test_forward_mode_matches_the_closed_form_and_func_transforms_are_refused() -> None:
    q = P.batched_quadratic()
    f = _layer(q, 1)
    theta = q.theta[1].clone()
    n = theta.shape[0]
    H = q.A[1] + q.lam * torch.eye(n, dtype=D)
    J = q.lam * torch.linalg.inv(H)  # d phi* / d theta
    t = torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(0))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = f(fwAD.make_dual(theta, t))
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, J @ t, rtol=1e-7, atol=1e-9)

    def outer(th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((f(th) - q.target[1]) ** 2).sum()

    with pytest.raises(NotImplementedError, match=r"torch\.func\.grad"):
        torch.func.grad(outer)(theta)


def test_forward_mode_of_a_root_problem_is_refused_clearly() -> None:
    def F(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return x - theta

    import torch.autograd.forward_ad as fwAD

    theta = torch.ones(3, dtype=D)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="implicit_argmin only"):
        bl.implicit_root(
            F,
            torch.zeros(3, dtype=D),
            fwAD.make_dual(theta, torch.ones(3, dtype=D)),
            lambda F_, init, th: th.clone(),
        )


# ------------------------------------------------------------------------ per-problem failures
def _exact(q: P.BatchedQuadratic, nan_row: int | None = None):  # type: ignore[no-untyped-def]
    """A black-box solver returning the batch's closed-form answers (row ``nan_row`` NaN)."""
    H = q.A + q.lam * torch.eye(q.A.shape[1], dtype=D)

    def solve(objective, init, theta):  # type: ignore[no-untyped-def]
        x = torch.linalg.solve(H, q.lam * theta - q.c)
        if nan_row is not None:
            x[nan_row, 1] = float("nan")
        return x

    return solve


def test_a_nan_answer_names_its_problem() -> None:
    q = P.batched_quadratic()
    with pytest.raises(
        bl.NonFiniteError, match=r"answer contains NaN or infinity in problem\(s\) \[2\] of"
    ) as err:
        bl.implicit_argmin(q.per_problem, torch.zeros_like(q.theta), q.theta, _exact(q, 2), batched=True)
    assert isinstance(err.value.info, bl.ImplicitInfo) and err.value.info.failed_problems == (2,)
    # NaN in init: named by problem too
    init = torch.zeros_like(q.theta)
    init[3, 0] = float("inf")
    with pytest.raises(bl.NonFiniteError, match=r"init contains NaN or infinity in problem\(s\) \[3\]"):
        bl.implicit_argmin(q.per_problem, init, q.theta, _exact(q), batched=True)


def test_a_nan_leaf_of_a_dict_is_named_by_its_key() -> None:
    """The answer's leaf (batched: with its problem) and the theta leaf whose gradient is not finite
    are named by their keys."""
    B = 3
    theta = torch.ones(B, 2, dtype=D)

    def G(phi: dict[str, torch.Tensor], th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((phi["a"] - th) ** 2).sum() + 0.5 * (phi["b"] ** 2).sum()

    def solver(objective, init, th):  # type: ignore[no-untyped-def]
        b = torch.zeros(B, 1, dtype=D)
        b[1, 0] = float("nan")
        return {"a": th.clone(), "b": b}

    init = {"a": torch.zeros(B, 2, dtype=D), "b": torch.zeros(B, 1, dtype=D)}
    with pytest.raises(
        bl.NonFiniteError, match=r"answer\['b'\] contains NaN or infinity in problem\(s\) \[1\] of the batch"
    ):
        bl.implicit_argmin(G, init, theta, solver, batched=True)

    # d2G/dtheta dphi is infinite in theta['v'] (sqrt at 0), finite in theta['w']
    th = {"w": torch.ones(2, dtype=D, requires_grad=True), "v": torch.zeros(1, dtype=D, requires_grad=True)}

    def G2(phi: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((phi - t["w"]) ** 2).sum() + 1e-3 * phi[0] * torch.sqrt(t["v"][0])

    def exact(objective, init, t):  # type: ignore[no-untyped-def]
        return t["w"] - 1e-3 * torch.sqrt(t["v"][0]) * torch.tensor([1.0, 0.0], dtype=D)

    phi = bl.implicit_argmin(G2, torch.zeros(2, dtype=D), th, exact)
    with pytest.raises(bl.NonFiniteError, match=r"gradient with respect to theta\['v'\] has NaN or infinity"):
        phi.sum().backward()


def test_a_nan_objective_names_its_problem() -> None:
    q = P.batched_quadratic()
    bump = torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=D)  # problem 1: +inf, a finite gradient

    def per_problem(phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return q.per_problem(phi, theta) + bump

    theta = q.theta.clone().requires_grad_(True)
    with pytest.raises(
        bl.NonFiniteError, match=r"objective is \[inf\] at the solver's answer in problem\(s\) \[1\]"
    ) as err:
        bl.implicit_argmin(per_problem, torch.zeros_like(theta), theta, _exact(q), batched=True)
    assert err.value.info.failed_problems == (1,)


def test_a_nan_incoming_gradient_names_its_problem() -> None:
    q = P.batched_quadratic()
    theta = q.theta.clone().requires_grad_(True)
    phi = bl.implicit_argmin(q.per_problem, torch.zeros_like(theta), theta, _exact(q), batched=True)
    w = torch.ones_like(phi)
    w[3, 2] = float("nan")
    with pytest.raises(
        bl.NonFiniteError, match=r"incoming gradient dL/dx has NaN or infinity in problem\(s\) \[3\]"
    ):
        (phi * w).sum().backward()


@pytest.mark.parametrize("throw", [True, False])
def test_a_nan_backward_solve_in_a_fixed_budget_blames_only_its_problem(throw: bool) -> None:
    """iMAML's backward: CG with a fixed budget (rtol = atol = 0) runs its steps in every problem,
    which is what was asked for (BUDGET, no failure); only the problem whose HVP is NaN is named."""
    q = P.batched_quadratic()
    H = q.A + q.lam * torch.eye(q.A.shape[1], dtype=D)

    def hvp(phi: torch.Tensor, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("bij,bj->bi", H, v)
        out[1] = float("nan")  # problem 1's Hessian is broken
        return out

    theta = q.theta.clone().requires_grad_(True)
    fixed = bl.CG(max_iter=3, rtol=0.0, atol=0.0, check_residual=False)
    phi, info = bl.implicit_argmin(
        q.per_problem,
        torch.zeros_like(theta),
        theta,
        _exact(q),
        hvp=hvp,
        linear_solver=fixed,
        batched=True,
        throw=throw,
        warn=False,
        return_info=True,
    )
    with pytest.raises(
        bl.NonFiniteError, match=r"backward linear solve produced NaN or infinity in problem\(s\) \[1\] of"
    ):
        q.outer(phi).backward()
    assert info.failed_problems == (1,)
    last = info.last_backward
    assert last is not None and last.problem_status is not None
    assert last.problem_status[1] is bl.LinearStatus.NONFINITE
    assert [s for i, s in enumerate(last.problem_status) if i != 1] == [bl.LinearStatus.BUDGET] * 3


def test_a_fixed_budget_alone_is_no_failure() -> None:
    q = P.batched_quadratic()
    theta = q.theta.clone().requires_grad_(True)
    fixed = bl.CG(max_iter=2, rtol=0.0, atol=0.0)
    phi, info = bl.implicit_argmin(
        q.per_problem,
        torch.zeros_like(theta),
        theta,
        _exact(q),
        linear_solver=fixed,
        batched=True,
        return_info=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.outer(phi).backward()
    last = info.last_backward
    assert last is not None and last.problem_status == (bl.LinearStatus.BUDGET,) * 4
    assert last.failed_problems() == [] and info.failed_problems == ()
    # a capped solve with a tolerance is a failure, named per problem
    capped = bl.CG(max_iter=1, rtol=1e-12)
    phi = bl.implicit_argmin(
        q.per_problem, torch.zeros_like(theta), theta, _exact(q), linear_solver=capped, batched=True
    )
    with pytest.raises(bl.LinearSolveError, match=r"MAX_ITER .*problem\(s\) \[0, 1, 2, 3\] of the batch"):
        q.outer(phi).backward()


def test_a_nan_gradient_names_the_problem_of_a_per_problem_theta() -> None:
    """d2G/dtheta dphi infinite in problem 2 alone (sqrt at 0): the answer, dL/dx and the backward
    solve are finite; the gradient's row 2 is not, and it is named."""
    q = P.batched_quadratic()
    theta = q.theta.clone().requires_grad_(True)
    base = theta.detach()[:, 0] - torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=D)

    def per_problem(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return q.per_problem(phi, th) + 1e-3 * phi[:, 0] * torch.sqrt(th[:, 0] - base)

    def solver(objective, init, th):  # type: ignore[no-untyped-def]
        return NewtonCG(newton_iters=50, tol=1e-12, batched=True)(objective, init, th).x

    phi = bl.implicit_argmin(per_problem, torch.zeros_like(theta), theta, solver, batched=True)
    with pytest.raises(
        bl.NonFiniteError, match=r"gradient with respect to theta has NaN or infinity in problem\(s\) \[2\]"
    ):
        q.outer(phi).backward()


@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_solvers_name_the_problems_of_a_bad_init_or_a_nan_objective(solver: str) -> None:
    q = P.batched_quadratic()
    s = H.solver(solver)(q, 1e-10, batched=True)
    init = torch.zeros_like(q.theta)
    init[1, 0] = float("nan")
    with pytest.raises(
        bl.NonFiniteError, match=r"init contains NaN or infinity in problem\(s\) \[1\] of the batch"
    ):
        s(q.per_problem, init, q.theta)
    uneven = {"a": torch.zeros(4, 2, dtype=D), "b": torch.zeros(3, 2, dtype=D)}
    with pytest.raises(bl.StructureError, match=r"init\['b'\] has leading size 3 but init\['a'\] has 4"):
        s(q.per_problem, uneven, q.theta)

    # problem 3's objective is not finite (log of -|phi|): that problem alone is NONFINITE, and named
    def per_problem(phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        f = q.per_problem(phi, theta)
        return torch.cat([f[:3], f[3:] + torch.log(-phi[3:].abs().sum(1))])

    res = s(per_problem, torch.zeros_like(q.theta), q.theta)
    assert res.problem_status is not None and res.problem_status[3] is bl.SolverStatus.NONFINITE
    assert all(st is not bl.SolverStatus.NONFINITE for st in res.problem_status[:3])
    assert res.status is bl.SolverStatus.NONFINITE and "problems ([3])" in res.reason
    torch.testing.assert_close(res.x[:3], q.solution[:3], rtol=0, atol=1e-6)  # type: ignore[index]


def test_a_solver_that_failed_in_one_problem_is_named() -> None:
    q = P.batched_quadratic()
    exact = _exact(q)
    S = bl.SolverStatus

    def solver(objective, init, theta):  # type: ignore[no-untyped-def]
        statuses = (S.CONVERGED, S.CONVERGED, S.FAILED, S.CONVERGED)
        return bl.SolverResult(x=exact(objective, init, theta), status=S.FAILED, problem_status=statuses)

    with pytest.raises(
        bl.ConvergenceError, match=r"inner solver failed in problem\(s\) \[2\] of the batch"
    ) as err:
        bl.implicit_argmin(q.per_problem, torch.zeros_like(q.theta), q.theta, solver, batched=True)
    assert err.value.info.failed_problems == (2,)
    assert err.value.info.solver_result.problems_with(S.FAILED) == [2]
    # the optimality check records its problems too
    capped = GradientDescent(lr=1 / q.L, max_iter=30, tol=0.0, batched=True)
    with pytest.raises(bl.OptimalityError) as opt:
        bl.implicit_argmin(
            q.per_problem, torch.zeros_like(q.theta), q.theta, capped, batched=True, optimality_tol=1e-8
        )
    assert 3 in opt.value.info.failed_problems and f"{list(opt.value.info.failed_problems)}" in str(opt.value)


def test_a_nan_gradient_of_a_shared_theta_names_its_key_not_a_problem() -> None:
    q = P.batched_quadratic()
    B, n = q.theta.shape
    shared = {"t": q.theta[0].clone().requires_grad_(True), "s": torch.zeros((), dtype=D, requires_grad=True)}

    def per_problem(phi: torch.Tensor, th: dict) -> torch.Tensor:
        # sqrt at 0: a finite value and gradient in phi, an infinite derivative in th["s"]
        return q.per_problem(phi, th["t"].expand(B, n)) + 1e-3 * phi[:, 0] * torch.sqrt(th["s"])

    solver = NewtonCG(newton_iters=50, tol=1e-12, batched=True)
    phi, info = bl.implicit_argmin(
        per_problem, torch.zeros(B, n, dtype=D), shared, solver, batched=True, return_info=True
    )
    with pytest.raises(
        bl.NonFiniteError, match=r"theta\['s'\] has NaN or infinity in a part shared by the problems"
    ):
        q.outer(phi).backward()
    assert info.failed_problems == ()
