"""Failures the implicit layer must not pass silently: each raises or warns."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl

D = torch.float64


def _exact(objective, init, theta):  # type: ignore[no-untyped-def]
    """argmin of 1/2 ||phi - a theta||^2 + ...: a black box that knows the answer a * theta."""
    return 2.0 * theta


def _G(phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((phi - 2.0 * theta) ** 2).sum()


def test_double_backward_is_refused_not_silently_wrong() -> None:
    theta = torch.tensor([0.7, -0.3], dtype=D, requires_grad=True)
    phi = bl.implicit_argmin(_G, torch.zeros(2, dtype=D), theta, _exact)
    # L = ||phi||^2 theta_0 + theta_0^3: its second derivative has an implicit part
    L = (phi**2).sum() * theta[0] + theta[0] ** 3
    with pytest.raises(NotImplementedError, match="cannot be differentiated again"):
        torch.autograd.grad(L, theta, create_graph=True)
    # the first derivative is right (against the closed form phi = 2 theta)
    phi = bl.implicit_argmin(_G, torch.zeros(2, dtype=D), theta, _exact)
    (g,) = torch.autograd.grad((phi**2).sum() * theta[0] + theta[0] ** 3, theta)
    t = theta.detach()
    ref = torch.tensor([8 * t[0] * t[0] + 4 * (t**2).sum() + 3 * t[0] ** 2, 8 * t[1] * t[0]], dtype=D)
    torch.testing.assert_close(g, ref)


def test_a_closure_rebound_in_a_loop_is_differentiated_with_its_own_data() -> None:
    """A lambda in a loop over tasks closes over the loop variable; were backward() to evaluate it
    again, it would differentiate the last task's problem.  The layer keeps the linearization it
    built at the call, so each task is differentiated with its own data: phi_i = theta / a_i."""
    theta = torch.tensor([0.5, 1.0], dtype=D, requires_grad=True)
    outs = []
    for a in (1.0, 4.0):

        def solver(objective, init, th):  # type: ignore[no-untyped-def]
            return th.detach() / a  # noqa: B023 (called at once, in the loop)

        outs.append(
            bl.implicit_argmin(
                lambda p, th: 0.5 * a * (p**2).sum() - (th * p).sum(),  # noqa: B023 (the pattern under test)
                torch.zeros(2, dtype=D),
                theta,
                solver,
            )
        )
    (outs[0].sum() + outs[1].sum()).backward()
    torch.testing.assert_close(theta.grad, torch.full((2,), 1.0 + 1.0 / 4.0, dtype=D))  # stale: 0.5


def test_an_objective_that_ignores_theta_warns() -> None:
    theta = torch.tensor([0.5, 1.0], dtype=D, requires_grad=True)
    frozen = theta.detach().clone()
    phi = bl.implicit_argmin(
        lambda p, th: 0.5 * ((p - frozen) ** 2).sum(), torch.zeros(2, dtype=D), theta, lambda o, i, t: frozen
    )
    with pytest.warns(bl.BilevelWarning, match="does not depend on theta.*detached copy"):
        phi.sum().backward()


def test_an_infinite_objective_at_the_answer_raises() -> None:
    theta = torch.tensor([0.5, 1.0], dtype=D, requires_grad=True)

    def G(p: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return _G(p, th) - torch.log(torch.zeros((), dtype=D))  # + inf, with a finite gradient

    with pytest.raises(bl.NonFiniteError, match=r"objective is inf at the solver's answer"):
        bl.implicit_argmin(G, torch.zeros(2, dtype=D), theta, _exact)


def test_forward_warnings_point_at_the_callers_line() -> None:
    theta = torch.ones(2, dtype=D, requires_grad=True)
    capped = lambda o, i, th: bl.SolverResult(2.0 * th + 0.1, bl.SolverStatus.MAX_ITER, 5)  # noqa: E731
    with pytest.warns(bl.BilevelWarning, match="did not converge") as rec:
        bl.implicit_argmin(_G, torch.zeros(2, dtype=D), theta, capped, optimality_tol=None)
    with pytest.warns(bl.BilevelWarning, match="exceeds optimality_tol") as rec2:
        bl.implicit_argmin(_G, torch.zeros(2, dtype=D), theta, lambda o, i, th: 2.0 * th + 0.1, throw=False)
    assert {w.filename for w in [*rec, *rec2]} == {__file__}


def test_an_objective_blind_to_phi_is_named_before_the_solver_blames_the_hessian() -> None:
    # phi detached inside the objective: grad_phi G has no graph to phi, the Hessian is zero
    theta = torch.tensor([0.7, -0.3], dtype=D, requires_grad=True)
    blind = lambda phi, th: _G(phi.detach(), th) + 0.0 * phi.sum()  # noqa: E731
    phi = bl.implicit_argmin(blind, torch.zeros(2, dtype=D), theta, _exact, optimality_tol=None)
    with pytest.warns(bl.BilevelWarning, match="does not depend on phi") as record:
        with pytest.raises(bl.LinearSolveError):
            phi.sum().backward()
    assert sum("does not depend on phi" in str(w.message) for w in record) == 1  # once per point


def test_a_solver_call_that_fails_on_mixed_dtypes_names_them() -> None:
    """A float32 init with float64 theta: the objective's own dtype error comes back as a
    StructureError naming both dtypes (its cause kept); with one dtype the call runs, and an
    error of the objective that has nothing to do with dtypes is not rewritten."""
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
    theta = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)

    def G(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * p @ A @ p - t @ p

    with pytest.raises(
        bl.StructureError, match=r"init's leaves are torch.float32 and theta's torch.float64"
    ) as e:
        bl.implicit_argmin(G, torch.zeros(2), theta, bl.solvers.ScipyLBFGS())
    assert isinstance(e.value.__cause__, RuntimeError)
    x = bl.implicit_argmin(G, torch.zeros(2, dtype=D), theta, bl.solvers.ScipyLBFGS(tol=1e-10))
    torch.testing.assert_close(x, torch.linalg.solve(A, theta.detach()), rtol=1e-7, atol=1e-9)

    def broken(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the objective's own failure")

    with pytest.raises(RuntimeError, match="the objective's own failure"):
        bl.implicit_argmin(broken, torch.zeros(2, dtype=D), theta, bl.solvers.ScipyLBFGS())
