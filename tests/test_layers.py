"""bilevel.layers against closed-form Jacobians, central finite differences and gradcheck (float64).

Problems: projection onto the simplex (sparsemax; Jacobian diag(s) - s s'/|S| on the
support S), box-constrained least squares solved by cvxpy (Jacobian of the free
coordinates from the reduced normal equations), an equality-constrained QP through its
KKT system, and a smooth strongly convex argmin.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import bilevel as bl
from bilevel.layers import ArgminLayer, FixedPointLayer, RootLayer

D = torch.float64


# ---------------------------------------------------------------- the simplex projection
def project_simplex(y: torch.Tensor) -> torch.Tensor:
    """Sort-based projection of each row onto the probability simplex (the layer's solver)."""
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    k = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype, device=y.device)
    rho = (u - css / k > 0).sum(dim=-1, keepdim=True)
    tau = css.gather(-1, rho - 1) / rho.to(y.dtype)
    return (y - tau).clamp_min(0.0)


def project_simplex_bisection(y: torch.Tensor) -> torch.Tensor:
    """An independent reference: bisection on tau with sum(max(y - tau, 0)) = 1."""
    lo = y.min(dim=-1, keepdim=True).values - 1.0
    hi = y.max(dim=-1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        over = (y - mid).clamp_min(0).sum(dim=-1, keepdim=True) > 1
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    return (y - (lo + hi) / 2).clamp_min(0.0)


def simplex_map(eta: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def T(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return project_simplex(x - eta * (x - z))

    return T


def sort_solver(T: object, init: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return project_simplex(z)


def simplex_layer(eta: float = 0.5) -> FixedPointLayer:
    return FixedPointLayer(simplex_map(eta), sort_solver, optimality_tol=1e-10)


def z_batch(seed: int = 0, shape: tuple[int, int] = (5, 7)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_simplex_forward_matches_bisection() -> None:
    z = z_batch()
    torch.testing.assert_close(simplex_layer()(z), project_simplex_bisection(z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.25, 0.5, 1.0, 1.5])
def test_simplex_jacobian_matches_closed_form(eta: float) -> None:
    # The step eta changes the backward linear system, never the Jacobian.
    z = z_batch(1, (3, 6)).requires_grad_(True)
    layer = simplex_layer(eta)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t), z)  # (3, 6, 3, 6)
    x = project_simplex_bisection(z.detach())
    for b in range(3):
        s = (x[b] > 0).to(D)
        ref = torch.diag(s) - torch.outer(s, s) / s.sum()
        torch.testing.assert_close(jac[b, :, b, :], ref, rtol=0, atol=1e-12)  # GMRES rtol 1e-10
        for c in range(3):
            if c != b:  # independent rows: block-diagonal Jacobian
                assert float(jac[b, :, c, :].abs().max()) == 0.0


def test_simplex_layer_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    W = torch.randn(7, 4, dtype=D, requires_grad=True)
    inp = torch.randn(5, 4, dtype=D)
    target = torch.softmax(torch.randn(5, 7, dtype=D), dim=-1)
    layer = simplex_layer()

    def loss(Wm: torch.Tensor) -> torch.Tensor:
        return ((layer(inp @ Wm.T) - target) ** 2).sum() + layer(inp @ Wm.T)[:, 0].sum()

    (g,) = torch.autograd.grad(loss(W), W)
    eps = 1e-6  # piecewise linear: no truncation error unless a kink is crossed (none here)
    fd = torch.empty_like(W)
    with torch.no_grad():
        for i in range(W.numel()):
            e = torch.zeros_like(W).view(-1)
            e[i] = eps
            fd.view(-1)[i] = (loss(W + e.view_as(W)) - loss(W - e.view_as(W))) / (2 * eps)
    err = float((g - fd).abs().max())
    assert err < 1e-6, err
    assert layer.last_info is not None


def test_simplex_layer_gradcheck() -> None:
    z = (z_batch(2, (4, 5)) * 0.5).requires_grad_(True)
    layer = simplex_layer()
    assert torch.autograd.gradcheck(lambda t: layer(t), (z,), eps=1e-6, atol=1e-8)


def test_fixed_point_layer_diagnostics_and_warm_start() -> None:
    layer = FixedPointLayer(simplex_map(0.5), sort_solver, warm_start=True)
    z = z_batch().requires_grad_(True)
    x = layer(z)
    info = layer.last_info
    assert info is not None and info.residual_norm < 1e-12 and info.last_backward is None
    x.pow(2).sum().backward()
    assert info.last_backward is not None and info.last_backward.converged
    # The Jacobian of F = T - x is eta J - I, with eigenvalues -1 and eta - 1: two GMRES steps.
    assert info.last_backward.n_iter == 2
    # Warm start: the next call starts from this answer (same shape) ...
    seen: list[torch.Tensor] = []

    def spy(T: object, init: torch.Tensor, z_: torch.Tensor) -> torch.Tensor:
        seen.append(init)
        return project_simplex(z_)

    layer.solver = spy
    layer(z)
    torch.testing.assert_close(seen[-1], x.detach())
    # ... but not when the batch size changes.
    layer(z[:2])
    assert torch.equal(seen[-1], torch.zeros(2, 7, dtype=D))


# ---------------------------------------------------------------- box-constrained least squares by cvxpy
def test_box_least_squares_by_cvxpy_matches_reduced_normal_equations() -> None:
    import cvxpy as cp

    g = torch.Generator().manual_seed(4)
    m, n = 12, 6
    A = torch.randn(m, n, generator=g, dtype=D)
    b0 = torch.randn(m, generator=g, dtype=D) * 2
    x, bp = cp.Variable(n), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(A.numpy() @ x - bp)), [x >= 0, x <= 1])
    kwargs = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}
    solver = bl.solvers.Cvxpy(prob, [x], [bp], solver="CLARABEL", solve_kwargs=kwargs)
    eta = 1.0 / float(torch.linalg.matrix_norm(A, 2) ** 2)

    def T(x_: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (x_ - eta * A.T @ (A @ x_ - b)).clamp(0.0, 1.0)

    layer = FixedPointLayer(T, solver, torch.zeros(n, dtype=D), optimality_tol=1e-7)
    b = b0.clone().requires_grad_(True)
    xs = layer(b)
    xd = xs.detach()
    free = (xd > 1e-6) & (xd < 1 - 1e-6)
    assert 0 < int(free.sum()) < n  # both kinds of coordinates are exercised
    jac = torch.autograd.functional.jacobian(lambda t: layer(t), b)
    # Free coordinates solve A_F'A_F x_F = A_F'(b - A_C x_C): dx_F/db = (A_F'A_F)^-1 A_F'.
    AF = A[:, free]
    ref = torch.zeros(n, m, dtype=D)
    ref[free] = torch.linalg.solve(AF.T @ AF, AF.T)
    # cvxpy's answer is accurate to ~1e-9, and the Jacobian is evaluated there.
    torch.testing.assert_close(jac, ref, rtol=0, atol=1e-7)
    assert isinstance(layer.last_info.solver_result, bl.SolverResult)  # type: ignore[union-attr]
    assert layer.last_info.solver_result.status is bl.SolverStatus.CONVERGED  # type: ignore[union-attr]


# ---------------------------------------------------------------- KKT system with tuple unknowns
def test_root_layer_kkt_of_equality_constrained_qp() -> None:
    # min_x 1/2 x'Qx - q'x  s.t.  1'x = 1.  Unknowns (x, nu); F = (Qx - q + nu 1, 1'x - 1).
    g = torch.Generator().manual_seed(5)
    n = 5
    M = torch.randn(n, n, generator=g, dtype=D)
    Q = M @ M.T + n * torch.eye(n, dtype=D)
    one = torch.ones(n, dtype=D)

    def F(u: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, nu = u
        return Q @ x - q + nu * one, (one @ x - 1.0).reshape(())

    K = torch.zeros(n + 1, n + 1, dtype=D)
    K[:n, :n], K[:n, n], K[n, :n] = Q, one, one

    def kkt_solver(
        F_: object, init: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        sol = torch.linalg.solve(K, torch.cat([q, torch.ones(1, dtype=D)]))
        return sol[:n].clone(), sol[n].clone()

    init = (torch.zeros(n, dtype=D), torch.zeros((), dtype=D))
    layer = RootLayer(F, kkt_solver, init, optimality_tol=1e-10)
    q = torch.randn(n, generator=g, dtype=D).requires_grad_(True)
    x, _ = layer(q)
    assert abs(float(x.detach().sum()) - 1.0) < 1e-12
    # dx/dq is the top-left block of K^-1.
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0], q)
    torch.testing.assert_close(jac, torch.linalg.inv(K)[:n, :n], rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: layer(t), (q,), eps=1e-6, atol=1e-8)
    # Buffers follow the module: init was registered, so .to(dtype) converts it.
    assert layer.to(torch.float32).init_0.dtype == torch.float32


# ---------------------------------------------------------------- smooth argmin, batched
def smooth(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sum over rows of 1/2||x_b - z_b||^2 + 1/4 sum x_b^4: independent per-row problems."""
    return (0.5 * (x - z) ** 2 + 0.25 * x**4).sum()


# Newton reaches ||grad|| ~ 1e-14, so finite differences of re-solves are limited by eps only.
NEWTON = bl.solvers.NewtonCG(newton_iters=30, cg_iters=20, tol=1e-12)


def test_argmin_layer_gradients_and_batches() -> None:
    z = z_batch(6, (3, 4)).requires_grad_(True)
    layer = ArgminLayer(smooth, NEWTON, optimality_tol=1e-11)
    x = layer(z)
    # Stationarity x + x^3 = z, so dx/dz = 1 / (1 + 3 x^2) elementwise.
    (g,) = torch.autograd.grad(x.sum(), z)
    torch.testing.assert_close(g, 1.0 / (1.0 + 3.0 * x.detach() ** 2), rtol=1e-9, atol=1e-12)
    assert layer.last_info is not None and layer.last_info.last_backward is not None
    z_small = z.detach()[:2, :2].clone().requires_grad_(True)  # each probe is a Newton solve
    assert torch.autograd.gradcheck(lambda t: layer(t), (z_small,), eps=1e-6, atol=1e-8)
    # The same batch solved by a batched solver (per-row losses) gives the same answer.
    per_row = bl.solvers.BatchedObjective(lambda x_, z_: (0.5 * (x_ - z_) ** 2 + 0.25 * x_**4).sum(dim=1))
    batched = ArgminLayer(per_row, bl.solvers.NewtonCG(newton_iters=30, tol=1e-12, batched=True))
    xb = batched(z)
    torch.testing.assert_close(xb, x, rtol=1e-9, atol=1e-10)
    (gb,) = torch.autograd.grad(xb.sum(), z)
    torch.testing.assert_close(gb, g, rtol=1e-8, atol=1e-10)
    # SciPy's L-BFGS stops at its rounding floor (~1e-9 here): the gradient is as accurate.
    lbfgs = ArgminLayer(smooth, bl.solvers.ScipyLBFGS(tol=1e-8), optimality_tol=1e-7)
    (gl,) = torch.autograd.grad(lbfgs(z).sum(), z)
    torch.testing.assert_close(gl, g, rtol=1e-7, atol=1e-8)


def test_argmin_layer_with_several_inputs_and_callable_init() -> None:
    # G(x, (z, s)) = 1/2 s ||x - z||^2 + 1/4 ||x||^4_4: gradients to both inputs.
    def G(x: torch.Tensor, th: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        z, s = th
        return (0.5 * s * (x - z) ** 2 + 0.25 * x**4).sum()

    layer = ArgminLayer(G, NEWTON, init=lambda th: th[0].detach().clone(), optimality_tol=1e-11)
    z = z_batch(7, (2, 3)).requires_grad_(True)
    s = torch.tensor(2.0, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b), (z, s), eps=1e-6, atol=1e-8)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3, dtype=D))
    out = layer(net(z), s)
    out.sum().backward()
    assert net[0].weight.grad is not None and float(net[0].weight.grad.abs().sum()) > 0


@pytest.mark.gpu  # deselected by default; run with -m gpu on a CUDA machine
def test_layers_on_cuda() -> None:
    dev = torch.device("cuda")
    z = z_batch().to(dev).requires_grad_(True)
    x = simplex_layer()(z)
    assert x.device.type == "cuda"
    x.pow(2).sum().backward()
    assert z.grad is not None and z.grad.device.type == "cuda"
    layer = RootLayer(lambda x_, q: x_ - q, lambda F, i, q: q.clone(), torch.zeros(3, dtype=D)).to(dev)
    assert layer.init_0.device.type == "cuda"
    assert layer(torch.ones(3, dtype=D, device=dev)).device.type == "cuda"


# ---------------------------------------------------------------- bad input
def test_layers_reject_bad_arguments() -> None:
    with pytest.raises(TypeError, match="solver must be a callable"):
        ArgminLayer(smooth, "lbfgs")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be callable"):
        FixedPointLayer(3, sort_solver)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="init must be"):
        RootLayer(lambda x, t: x, sort_solver, init=[1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating point"):
        RootLayer(lambda x, t: x, sort_solver, init=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="optimality_tol"):
        ArgminLayer(smooth, sort_solver, optimality_tol=-1.0)
    with pytest.raises(ValueError, match="pass them as inputs"):
        ArgminLayer(torch.nn.Bilinear(3, 3, 1, dtype=D), sort_solver)
    layer = simplex_layer()
    with pytest.raises(TypeError, match="at least one input"):
        layer()
    with pytest.raises(TypeError, match="expected a Tensor"):
        layer(z_batch(), 3.0)  # type: ignore[arg-type]


def test_layer_refuses_a_wrong_answer() -> None:
    # A "solver" that returns z unprojected: ||T(x) - x|| is large, the gradient would be wrong.
    layer = FixedPointLayer(simplex_map(0.5), lambda T, init, z: z.clone())
    with pytest.raises(bl.OptimalityError, match="optimality residual"):
        layer(z_batch())
