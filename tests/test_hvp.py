"""HVP oracles against a dense Hessian computed independently by torch.autograd.functional."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import bilevel as bl
from bilevel._hvp import Point, gradient_condition

D = torch.float64


def G(phi: tuple[torch.Tensor, torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    a, b = phi
    return (
        torch.logsumexp(a * theta[:3], 0)
        + (b**4).sum() / 4
        + (a.sum() * b.sum()) ** 2
        + torch.exp(theta[3]) * (a**2).sum()
    )


PHI = (torch.tensor([0.3, -0.2, 0.5], dtype=D), torch.tensor([[0.1, 0.7], [-0.4, 0.2]], dtype=D))
THETA = torch.tensor([1.0, -0.5, 2.0, 0.1], dtype=D)


def dense_reference() -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian in phi and the cross block d2G/dtheta dphi, flattened."""

    def g_flat(flat: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return G((flat[:3], flat[3:].view(2, 2)), th)

    flat = torch.cat([PHI[0], PHI[1].reshape(-1)])
    H = torch.autograd.functional.hessian(lambda f: g_flat(f, THETA), flat)
    cross = torch.autograd.functional.jacobian(
        lambda th: torch.autograd.functional.jacobian(lambda f: g_flat(f, th), flat, create_graph=True), THETA
    )
    return H, cross  # cross[i, j] = d2G / dphi_i dtheta_j


ORACLES = [
    bl.ForwardOverReverse(),
    bl.ReverseOverReverse(),
    bl.FiniteDifferenceHVP(),
    bl.DenseHessian(),
    bl._hvp.UserHVP(lambda phi, th, v: _exact_hvp(phi, th, v)),
]


def _exact_hvp(phi, th, v):  # type: ignore[no-untyped-def]
    return torch.autograd.functional.hvp(lambda a, b: G((a, b), th), phi, v)[1]


@pytest.mark.parametrize("oracle", ORACLES, ids=lambda o: type(o).__name__)
def test_oracles_agree_with_dense_hessian(oracle) -> None:  # type: ignore[no-untyped-def]
    H, cross = dense_reference()
    point = Point(gradient_condition(G), PHI, THETA, PHI, (THETA,), (True,))
    lin = oracle.linearize(G, point)
    # FD carries O(eps^(2/3)) ~ 1e-10 error: a looser but still meaningful tolerance.
    tol = 1e-7 if isinstance(oracle, bl.FiniteDifferenceHVP) else 1e-12
    for seed in range(3):
        v = torch.randn(7, dtype=D, generator=torch.Generator().manual_seed(seed))
        vs = (v[:3], v[3:].view(2, 2))
        Hv = torch.cat([t.reshape(-1) for t in lin.matvec(vs)])
        torch.testing.assert_close(Hv, H @ v, rtol=tol, atol=tol)
        (c,) = lin.cross(vs)
        torch.testing.assert_close(c, cross.T @ v, rtol=tol, atol=tol)
    assert lin.n_matvec == 3


def test_forward_over_reverse_falls_back_with_a_warning() -> None:
    class Cube(torch.autograd.Function):
        """x**3 with a backward only: no forward-mode rule, but double-backward works."""

        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            (x,) = ctx.saved_tensors
            return 3 * x**2 * g

    def obj(phi: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return Cube.apply(phi).sum() + 0.5 * ((phi - th) ** 2).sum()

    phi = torch.tensor([0.5, 1.0], dtype=D)
    point = Point(gradient_condition(obj), phi, phi, (phi,), (phi,), (True,))
    lin = bl.ForwardOverReverse().linearize(obj, point)
    v = torch.tensor([1.0, -2.0], dtype=D)
    with pytest.warns(bl.BilevelWarning, match="falling back to reverse-over-reverse"):
        (hv,) = lin.matvec((v,))
    torch.testing.assert_close(hv, (6 * phi + 1) * v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warns once, then stays on the fallback silently
        lin.matvec((v,))
    with pytest.raises(RuntimeError):
        bl.ForwardOverReverse(fallback=False).linearize(obj, point).matvec((v,))


def test_bad_hvp_argument() -> None:
    with pytest.raises(TypeError, match="expected None, an HVP oracle"):
        bl.implicit_argmin(lambda p, t: (p**2).sum(), torch.zeros(2), torch.zeros(2), lambda *a: a[1], hvp=3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        bl.FiniteDifferenceHVP(eps=0.0)


def _damped_grad(shift: Any, keys: tuple[str, ...] = ("a", "b")) -> tuple[torch.Tensor, ...]:
    """theta's gradient of sum(c * phi) through argmin 0.5 p'Ap - t'p with Damped(shift): the
    damped backward system gives (A + S)^-1 c, S the shifts on each leaf's coordinates."""
    g = torch.Generator().manual_seed(3)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = M @ M.T + 5 * torch.eye(5, dtype=torch.float64)
    c = torch.randn(5, dtype=torch.float64, generator=g)
    sizes = {"a": 2, "b": 3}

    def G(p: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([p["a"], p["b"]])
        return 0.5 * flat @ A @ flat - t @ flat

    def solve(obj: Any, init: Any, t: torch.Tensor) -> bl.SolverResult:
        x = torch.linalg.solve(A, t.detach())
        return bl.SolverResult({"a": x[:2], "b": x[2:]}, status=bl.SolverStatus.CONVERGED)

    t = torch.randn(5, dtype=torch.float64, generator=g).requires_grad_(True)
    init = {k: torch.zeros(sizes[k], dtype=torch.float64) for k in keys}
    phi = bl.implicit_argmin(G, init, t, solve, hvp=bl.Damped(shift), linear_solver=bl.DenseSolve())
    (torch.cat([phi["a"], phi["b"]]) @ c).backward()
    assert t.grad is not None
    return t.grad, A, c


def test_damped_shifts_each_leaf_by_its_own_number_whatever_the_dict_order() -> None:
    got, A, c = _damped_grad(0.5)
    torch.testing.assert_close(got, torch.linalg.solve(A + 0.5 * torch.eye(5, dtype=torch.float64), c))
    S = torch.diag(torch.tensor([1.0, 1.0, 4.0, 4.0, 4.0], dtype=torch.float64))
    for shift in ({"a": 1.0, "b": 4.0}, {"b": 4.0, "a": 1.0}):
        for keys in (("a", "b"), ("b", "a")):  # phi's own key order
            got, A, c = _damped_grad(shift, keys)
            torch.testing.assert_close(got, torch.linalg.solve(A + S, c))


def test_damped_takes_a_tensor_shift_per_coordinate_or_one_for_every_leaf() -> None:
    S = torch.diag(torch.tensor([1.0, 1.0, 4.0, 4.0, 4.0], dtype=torch.float64))
    got, A, c = _damped_grad((torch.tensor([1.0, 1.0]), torch.tensor([4.0, 4.0, 4.0])))
    torch.testing.assert_close(got, torch.linalg.solve(A + S, c))
    got, A, c = _damped_grad(torch.tensor(0.5))  # 0-d: every leaf
    torch.testing.assert_close(got, torch.linalg.solve(A + 0.5 * torch.eye(5, dtype=torch.float64), c))


def test_damped_refuses_shifts_that_do_not_fit_phi() -> None:
    with pytest.raises(bl.StructureError, match=r"3 shifts for the 2 leaves of phi"):
        _damped_grad((1.0, 2.0, 3.0))
    with pytest.raises(bl.StructureError, match=r"a dict of shifts needs phi's keys \['a', 'b'\]"):
        _damped_grad({"a": 1.0, "c": 2.0})
    for bad in (-1.0, float("nan"), "a", (1.0, None), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="each shift must be a finite number >= 0"):
            bl.Damped(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Damped\(oracle=3\)"):
        bl.Damped(1.0, 3)  # type: ignore[arg-type]
