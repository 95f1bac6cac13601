"""QPLayer (bilevel._qp): values against cvxpy and known optima, gradients against a dense
active-set reference, gradcheck and float64 finite differences; batches against loops; every guard.

The random problems have a known optimum: pick x*, an active set, multipliers z_A > 0 and y,
slacks s_I > 0; then h = G x* + s, b = A x*, q = -(Q x* + G'z + A'y) make (x*, z, y) satisfy the
KKT conditions with strict complementarity, so x* is the minimizer and, with Q positive definite,
the solution map is differentiable there with the active set's derivative: the x of the
equality QP  min 1/2 x'Qx + q'x  s.t.  G_A x = h_A, Ax = b  (one dense solve, autograd through it).
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from bilevel import BilevelWarning, ConvergenceError, LinearSolveError, NonFiniteError, StructureError
from bilevel._qp import (
    QPError,
    QPInfeasibleError,
    QPNonConvexError,
    QPStatus,
    QPUnboundedError,
    _adjoint,
    _DualSpace,
    _ipm,
    _Polish,
    _polish,
    _prepare,
    _Solution,
    default_tol,
    solve_qp,
)
from bilevel.layers import QPLayer

F64 = torch.float64
#: tolerances against the references, by dtype
TOL = {
    F64: dict(value=1e-6, grad=1e-6),
    # float32: the interior-point method stops at tol 1e-5, so x is good to about 1e-4
    torch.float32: dict(value=2e-3, grad=5e-3),
}


def known_qp(
    seed: int,
    n: int,
    m: int,
    p: int,
    n_active: int,
    B: int | None = None,
    dtype: torch.dtype = F64,
    shared: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A random strictly convex QP with known optimum x* and active set (the first n_active rows).

    With a batch size B, the matrices named in ``shared`` ("Q", "G", "A") have no batch dimension.
    """
    g = torch.Generator().manual_seed(seed)
    shape = () if B is None else (B,)

    def r(*s: int, name: str = "") -> torch.Tensor:
        return torch.randn(*(() if name in shared else shape), *s, generator=g, dtype=F64)

    L = r(n, n, name="Q")
    Q = L @ L.mT / n + 0.5 * torch.eye(n, dtype=F64)
    G, A = r(m, n, name="G"), r(p, n, name="A")
    x = r(n)
    z = torch.zeros(*shape, m, dtype=F64)
    s = torch.zeros(*shape, m, dtype=F64)
    u = torch.rand(*shape, m, generator=g, dtype=F64)
    z[..., :n_active] = 0.5 + u[..., :n_active]
    s[..., n_active:] = 0.5 + u[..., n_active:]
    y = r(p)
    h = (G @ x.unsqueeze(-1)).squeeze(-1) + s
    b = (A @ x.unsqueeze(-1)).squeeze(-1)
    q = -(
        (Q @ x.unsqueeze(-1)).squeeze(-1)
        + (z.unsqueeze(-2) @ G).squeeze(-2)
        + (y.unsqueeze(-2) @ A).squeeze(-2)
    )
    out = dict(Q=Q, q=q, G=G, h=h, A=A, b=b)
    out = {k: v.to(dtype) for k, v in out.items()}
    return dict(inputs=out, x=x.to(dtype), active=n_active)


def args_of(inputs: dict[str, torch.Tensor], m: int, p: int) -> dict[str, torch.Tensor | None]:
    """The layer's keyword arguments (G, h or A, b left out where there are no rows)."""
    return dict(
        Q=inputs["Q"],
        q=inputs["q"],
        G=inputs["G"] if m else None,
        h=inputs["h"] if m else None,
        A=inputs["A"] if p else None,
        b=inputs["b"] if p else None,
    )


def active_set_solution(Q: Any, q: Any, G: Any, h: Any, A: Any, b: Any, active: int) -> torch.Tensor:
    """x of the equality QP with the first ``active`` rows of G as equalities (one dense solve)."""
    Qs = 0.5 * (Q + Q.mT)
    rows = [M for M in (G[:active] if G is not None else None, A) if M is not None and M.shape[0]]
    rhs = [v for v in (h[:active] if h is not None else None, b) if v is not None and v.shape[0]]
    n = Q.shape[-1]
    if not rows:
        return torch.linalg.solve(Qs, -q)
    E, e = torch.cat(rows), torch.cat(rhs)
    k = E.shape[0]
    K = torch.cat([torch.cat([Qs, E.T], 1), torch.cat([E, E.new_zeros(k, k)], 1)])
    return torch.linalg.solve(K, torch.cat([-q, e]))[:n]


def cvxpy_solution(inputs: dict[str, torch.Tensor | None]) -> np.ndarray:
    """The minimizer by cvxpy (Clarabel, tight tolerances): an independent solver."""
    Q = inputs["Q"].double().numpy()  # type: ignore[union-attr]
    n = Q.shape[0]
    x = cp.Variable(n)
    cons = []
    if inputs["G"] is not None:
        cons.append(inputs["G"].double().numpy() @ x <= inputs["h"].double().numpy())  # type: ignore[union-attr]
    if inputs["A"] is not None:
        cons.append(inputs["A"].double().numpy() @ x == inputs["b"].double().numpy())  # type: ignore[union-attr]
    obj = 0.5 * cp.quad_form(x, cp.psd_wrap(0.5 * (Q + Q.T))) + inputs["q"].double().numpy() @ x  # type: ignore[union-attr]
    cp.Problem(cp.Minimize(obj), cons).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12
    )
    assert x.value is not None
    return np.asarray(x.value)


def grads(x: torch.Tensor, leaves: list[torch.Tensor], w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # materialize: an input the reference does not use (an inactive row) has gradient zero
    return torch.autograd.grad((x * w).sum(), leaves, allow_unused=True, materialize_grads=True)


# ---------------------------------------------------------------------------------------------
# Values and gradients on random problems with a known optimum


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 8),
    kind=st.sampled_from(["inequality", "equality", "both"]),
    data=st.data(),
)
def test_random_qp_matches_cvxpy_and_active_set_gradient(seed: int, n: int, kind: str, data: Any) -> None:
    p = 0 if kind == "inequality" else data.draw(st.integers(1, max(1, n // 2)))
    m = 0 if kind == "equality" else data.draw(st.integers(1, 2 * n))
    active = 0 if m == 0 else data.draw(st.integers(0, min(m, n - p)))
    prob = known_qp(seed, n, m, p, active)
    inputs = args_of(prob["inputs"], m, p)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    layer = QPLayer()
    x = layer(**{k: leaves.get(k) for k in inputs})
    assert layer.last_info is not None and layer.last_info.statuses == (QPStatus.SOLVED,)
    torch.testing.assert_close(x.detach(), prob["x"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(x.detach().numpy(), cvxpy_solution(inputs), rtol=0, atol=1e-6)
    # gradients against the active-set equality QP (differentiable by autograd, dense solve)
    ref_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    full = {k: ref_leaves.get(k) for k in inputs}
    xr = active_set_solution(full["Q"], full["q"], full["G"], full["h"], full["A"], full["b"], active)
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    names = list(leaves)
    got = grads(x, [leaves[k] for k in names], w)
    want = grads(xr, [ref_leaves[k] for k in names], w)
    for name, a, c in zip(names, got, want):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6, msg=lambda s, name=name: f"d{name}: {s}")


@pytest.mark.parametrize(("m", "p", "active"), [(5, 0, 2), (0, 2, 0), (4, 1, 0), (6, 2, 2)])
def test_gradcheck(m: int, p: int, active: int) -> None:
    """torch.autograd.gradcheck: central finite differences of float64 re-solves, every input."""
    prob = known_qp(7, 4, m, p, active)
    inputs = args_of(prob["inputs"], m, p)
    names = [k for k, v in inputs.items() if v is not None]
    leaves = [inputs[k].clone().requires_grad_() for k in names]  # type: ignore[union-attr]

    def f(*ts: torch.Tensor) -> torch.Tensor:
        return solve_qp(**dict(zip(names, ts)), tol=1e-10)[0]

    # atol: the finite differences' error, (re-solve error ~1e-11) / (eps 1e-6)
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_unconstrained_closed_form() -> None:
    """No constraints: x = -Q^-1 q, dL/dq = -Q^-1 w, dL/dQ = sym(Q^-1 w x')."""
    prob = known_qp(3, 5, 0, 0, 0)
    Q = prob["inputs"]["Q"].clone().requires_grad_()
    q = prob["inputs"]["q"].clone().requires_grad_()
    x = QPLayer()(Q, q)
    w = torch.arange(1.0, 6.0, dtype=F64)
    (x * w).sum().backward()
    Qinv_w = torch.linalg.solve(Q.detach(), w)
    torch.testing.assert_close(x.detach(), -torch.linalg.solve(Q.detach(), q.detach()))
    torch.testing.assert_close(q.grad, -Qinv_w)
    xd = x.detach()
    torch.testing.assert_close(Q.grad, -0.5 * (torch.outer(Qinv_w, xd) + torch.outer(xd, Qinv_w)))


def test_box_projection_closed_form() -> None:
    """Q = I: x = clip(-q, lo, hi), dx/dq = -1 inside the box and 0 where a bound is active."""
    q = torch.tensor([-3.0, -0.2, 0.4, 2.5], dtype=F64, requires_grad=True)
    eye = torch.eye(4, dtype=F64)
    G = torch.cat([eye, -eye])
    h = torch.ones(8, dtype=F64)
    x = QPLayer()(torch.eye(4, dtype=F64), q, G, h)
    torch.testing.assert_close(x.detach(), (-q.detach()).clamp(-1, 1))
    x.sum().backward()
    torch.testing.assert_close(q.grad, torch.tensor([0.0, -1.0, -1.0, 0.0], dtype=F64))


# ---------------------------------------------------------------------------------------------
# Degenerate cases


def test_redundant_active_constraint() -> None:
    """A duplicated active row: multipliers are not unique but x is; dL/dq and dL/dQ are the
    active-set gradient with one copy (dL/dh and dL/dG of the two copies are one-sided only:
    moving one copy changes which one binds, so they are not compared)."""
    prob = known_qp(11, 5, 4, 1, 2)
    inp = prob["inputs"]
    G = torch.cat([inp["G"], inp["G"][:1]])
    h = torch.cat([inp["h"], inp["h"][:1]])
    Q = inp["Q"].clone().requires_grad_()
    q = inp["q"].clone().requires_grad_()
    x = QPLayer()(Q, q, G, h, inp["A"], inp["b"])
    torch.testing.assert_close(x.detach(), prob["x"], rtol=0, atol=1e-6)
    Qr, qr = inp["Q"].clone().requires_grad_(), inp["q"].clone().requires_grad_()
    xr = active_set_solution(Qr, qr, inp["G"], inp["h"], inp["A"], inp["b"], 2)
    w = torch.randn(5, dtype=F64, generator=torch.Generator().manual_seed(0))
    for a, c in zip(grads(x, [Q, q], w), grads(xr, [Qr, qr], w)):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_weakly_active_constraint_gradient_lies_between_one_sided_derivatives() -> None:
    """x(t) = argmin 1/2 (x - t)^2 s.t. x <= 0 at t = 0: the constraint is weakly active (s = z = 0).
    x(t) = min(t, 0) has one-sided derivatives 1 (t < 0) and 0 (t > 0); the layer returns the
    derivative of the interior-point path's end, D/(1 + D) with D = z/s, which lies in [0, 1]."""
    t = torch.zeros(1, dtype=F64, requires_grad=True)
    x = QPLayer()(torch.eye(1, dtype=F64), -t, torch.ones(1, 1, dtype=F64), torch.zeros(1, dtype=F64))
    # at a weakly active constraint the interior-point iterate converges like sqrt(mu), not mu
    assert abs(float(x.detach())) < 1e-5
    (dx,) = torch.autograd.grad(x.sum(), t)
    assert 0.0 <= float(dx) <= 1.0
    # away from the kink the two one-sided derivatives are returned exactly
    for t0, slope in ((-0.5, 1.0), (0.5, 0.0)):
        tt = torch.tensor([t0], dtype=F64, requires_grad=True)
        xx = QPLayer()(torch.eye(1, dtype=F64), -tt, torch.ones(1, 1, dtype=F64), torch.zeros(1, dtype=F64))
        (d,) = torch.autograd.grad(xx.sum(), tt)
        assert abs(float(d) - slope) < 1e-8


def test_semidefinite_q_linear_program() -> None:
    """Q = 0 (a linear program) with a unique vertex solution: min -x0 - x1 over the unit box
    corner-cut by x0 + x1 <= 1.5: x = (1, 0.5) or (0.5, 1)... made unique by weights (2, 1)."""
    eye = torch.eye(2, dtype=F64)
    G = torch.cat([eye, -eye, torch.ones(1, 2, dtype=F64)])
    h = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.5], dtype=F64, requires_grad=True)
    x = QPLayer()(torch.zeros(2, 2, dtype=F64), torch.tensor([-2.0, -1.0], dtype=F64), G, h)
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 0.5], dtype=F64), rtol=0, atol=1e-7)
    # x1 = h4 - x0 with x0 = h0: dx1/dh4 = 1, dx1/dh0 = -1
    (dh,) = torch.autograd.grad(x[1], h)
    torch.testing.assert_close(dh, torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0], dtype=F64), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("shared", ["none", "Q", "QG"])
def test_batch_equals_loop(shared: str) -> None:
    """A batch (some inputs shared by every problem) gives each problem's loop answer and gradients;
    a shared input's gradient is the sum of the problems' gradients."""
    B, n, m, p = 4, 5, 6, 2
    share = {"none": (), "Q": ("Q",), "QG": ("Q", "G")}[shared]
    batch = known_qp(100, n, m, p, 2, B=B, shared=share)["inputs"]
    base = known_qp(100, n, m, p, 2)["inputs"]  # for the unbatched shapes
    leaves = {k: v.clone().requires_grad_() for k, v in batch.items()}
    xb = QPLayer()(**leaves)
    assert xb.shape == (B, n)
    w = torch.randn(B, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    gb = torch.autograd.grad((xb * w).sum(), list(leaves.values()))
    loop_grads = {k: torch.zeros_like(v) for k, v in batch.items()}
    for i in range(B):
        single = {
            k: (v if v.ndim == base[k].ndim else v[i]).clone().requires_grad_() for k, v in batch.items()
        }
        xi = QPLayer()(**single)
        torch.testing.assert_close(xb[i].detach(), xi.detach(), rtol=1e-9, atol=1e-9)
        gi = torch.autograd.grad((xi * w[i]).sum(), list(single.values()))
        for k, g in zip(single, gi):
            if batch[k].ndim == base[k].ndim:
                loop_grads[k] += g
            else:
                loop_grads[k][i] = g
    for k, g in zip(batch, gb):
        torch.testing.assert_close(g, loop_grads[k], rtol=1e-7, atol=1e-8, msg=lambda s, k=k: f"d{k}: {s}")


def test_float32_close_to_float64() -> None:
    prob = known_qp(5, 6, 8, 2, 3, B=3)
    inp64 = prob["inputs"]
    inp32 = {k: v.float().requires_grad_() for k, v in inp64.items()}
    x32 = QPLayer()(**inp32)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.detach().double(), prob["x"], rtol=0, atol=TOL[torch.float32]["value"])
    x32.sum().backward()
    leaves = {k: v.clone().requires_grad_() for k, v in inp64.items()}
    QPLayer()(**leaves).sum().backward()
    for k in inp32:
        g32, g64 = inp32[k].grad, leaves[k].grad
        assert g32 is not None and g64 is not None
        err = (g32.double() - g64).abs().max() / (1 + g64.abs().max())
        assert err < TOL[torch.float32]["grad"], (k, float(err))


def test_info_reports_each_problem() -> None:
    prob = known_qp(9, 4, 5, 1, 2, B=3)
    layer = QPLayer()
    layer(**prob["inputs"])
    info = layer.last_info
    assert info is not None and info.converged and info.statuses == (QPStatus.SOLVED,) * 3
    assert info.n_iter.shape == (3,) and bool((info.n_iter >= 1).all())
    assert info.iterations == int(info.n_iter.max())
    assert bool((info.primal_residual < 1e-8).all()) and bool((info.gap < 1e-7).all())


def test_no_graph_without_grad() -> None:
    prob = known_qp(9, 4, 5, 1, 2)
    x = QPLayer()(**prob["inputs"])
    assert not x.requires_grad
    with torch.no_grad():
        leaves = {k: v.clone().requires_grad_() for k, v in prob["inputs"].items()}
        assert not QPLayer()(**leaves).requires_grad


# ---------------------------------------------------------------------------------------------
# Bad input: typed errors naming the problem


def batch_with(B: int = 4, **edit: Any) -> dict[str, torch.Tensor]:
    """A feasible batch; ``edit[name] = (index, fn)`` replaces problem index's input by fn(input)."""
    inp = {k: v.clone() for k, v in known_qp(21, 4, 5, 1, 2, B=B)["inputs"].items()}
    for name, (i, fn) in edit.items():
        inp[name][i] = fn(inp[name][i])
    return inp


def test_nan_input_names_problem() -> None:
    inp = batch_with(q=(2, lambda v: v.index_fill(0, torch.tensor([1]), float("nan"))))
    with pytest.raises(NonFiniteError, match=r"problem 2 of the batch has NaN or infinite entries in q"):
        QPLayer()(**inp)
    inp = batch_with(G=(1, lambda v: v.index_fill(0, torch.tensor([0]), float("inf"))))
    with pytest.raises(NonFiniteError, match=r"problem 1 .* in G"):
        QPLayer()(**inp)


def test_nonconvex_names_problem() -> None:
    inp = batch_with(Q=(3, lambda v: v - 5.0 * torch.eye(4, dtype=F64)))
    with pytest.raises(
        QPNonConvexError, match=r"Q of problem 3 of the batch is not positive semidefinite"
    ) as e:
        QPLayer()(**inp)
    assert e.value.problems == (3,)


def test_rank_deficient_equalities_names_problem() -> None:
    inp = batch_with()
    inp["A"] = torch.cat([inp["A"], inp["A"]], dim=1)  # every problem: two equal rows
    inp["b"] = torch.cat([inp["b"], inp["b"]], dim=1)
    inp["A"][0, 1] += 1.0  # problem 0 stays of full rank
    with pytest.raises(QPError, match=r"equality matrix A of problem 1 .* no full row rank") as e:
        QPLayer()(**inp)
    assert e.value.problems == (1, 2, 3)
    inp = batch_with()
    with pytest.raises(QPError, match=r"A has 5 rows but x has 4 entries"):
        QPLayer()(inp["Q"], inp["q"], A=torch.randn(5, 4, dtype=F64), b=torch.zeros(5, dtype=F64))


def test_infeasible_names_problem() -> None:
    # problem 1: x0 <= -1 and -x0 <= -1; problems 0 and 2: x0 <= 1 and -x0 <= 1
    eye = torch.eye(3, dtype=F64)
    G = torch.stack([eye[0], -eye[0]])
    h = torch.ones(3, 2, dtype=F64)
    h[1] = -1.0
    with pytest.raises(QPInfeasibleError, match=r"problem 1 of the batch is primal infeasible") as e:
        QPLayer()(eye, torch.ones(3, 3, dtype=F64), G, h)
    assert e.value.problems == (1,)
    # inconsistent equality and inequality: x0 = 5 and x0 <= 1
    eye = torch.eye(3, dtype=F64)
    with pytest.raises(QPInfeasibleError, match=r"the problem is primal infeasible"):
        QPLayer()(
            eye,
            torch.ones(3, dtype=F64),
            eye[:1],
            torch.ones(1, dtype=F64),
            eye[:1],
            torch.full((1,), 5.0, dtype=F64),
        )


def test_unbounded_names_problem() -> None:
    # min -x0 + 1/2 (x1^2 + x2^2) s.t. -x0 <= 0: x0 -> infinity
    Q = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=F64)).expand(3, 3, 3)
    q = torch.tensor([1.0, 0.0, 0.0], dtype=F64).repeat(3, 1)
    q[2, 0] = -1.0
    G = -torch.eye(3, dtype=F64)[:1]
    with pytest.raises(QPUnboundedError, match=r"problem 2 of the batch is unbounded below") as e:
        QPLayer()(Q, q, G, torch.zeros(1, dtype=F64))
    assert e.value.problems == (2,)
    # no unique minimizer: Q = 0 and nothing constrains x1
    with pytest.raises(QPUnboundedError, match=r"problem 1 of the batch has no unique solution"):
        QPLayer()(
            torch.stack([torch.eye(2, dtype=F64), torch.zeros(2, 2, dtype=F64)]), torch.ones(2, 2, dtype=F64)
        )


@pytest.mark.parametrize(
    ("edit", "err", "match"),
    [
        (dict(q=torch.zeros(3, dtype=F64)), StructureError, r"q has 3 entries but Q is 4 x 4"),
        (dict(h=torch.zeros(4, dtype=F64)), StructureError, r"h has 4 entries but G has 5 rows"),
        (dict(G=torch.zeros(5, 3, dtype=F64)), StructureError, r"G has 3 columns"),
        (dict(Q=torch.zeros(4, 3, dtype=F64)), StructureError, r"square"),
        (dict(q=torch.zeros(2, 4, dtype=F64)), StructureError, r"batch sizes differ \(Q: 4, q: 2"),
        (dict(h=torch.zeros(4, 5, dtype=torch.float32)), StructureError, r"h has dtype torch.float32"),
        (dict(b=torch.zeros(4, 1, dtype=F64, device="meta")), StructureError, r"b is on meta"),
        (dict(h=None), TypeError, r"give G and h together"),
        (dict(A=None), TypeError, r"give A and b together"),
        (dict(q=[0.0, 1.0]), TypeError, r"q must be a Tensor"),
        (dict(Q=torch.zeros(2, 4, 4, 4, dtype=F64)), StructureError, r"Q has shape \(2, 4, 4, 4\)"),
    ],
)
def test_mismatched_inputs(edit: dict[str, Any], err: type[Exception], match: str) -> None:
    inp: dict[str, Any] = batch_with()
    inp.update(edit)
    with pytest.raises(err, match=match):
        QPLayer()(**inp)


def test_iteration_cap_raises_or_warns() -> None:
    inp = batch_with()
    with pytest.raises(
        ConvergenceError, match=r"problem 0 of the batch hit the iteration cap .* after 1 iterations"
    ):
        QPLayer(max_iter=1)(**inp)
    # (at max_iter=2 the active-set polish already solves three of the four)
    layer = QPLayer(max_iter=1, throw=False)
    with pytest.warns(BilevelWarning, match=r"iteration cap"):
        x = layer(**inp)
    assert x.shape == (4, 4) and layer.last_info is not None
    assert layer.last_info.statuses == (QPStatus.MAX_ITER,) * 4 and not layer.last_info.converged


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(tol=-1.0), ValueError, r"tol=-1.0"),
        (dict(tol=0.0), ValueError, r"tol=0.0"),
        (dict(max_iter=0), ValueError, r"max_iter=0"),
        (dict(max_iter=2.5), TypeError, r"max_iter=2.5\): max_iter must be an int"),
        (dict(throw="yes"), TypeError, r"throw='yes'\): throw must be True or False"),
    ],
)
def test_layer_arguments(kwargs: dict[str, Any], err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        QPLayer(**kwargs)


def test_singular_backward_system_names_problem() -> None:
    """The backward guard: at an answer where the KKT matrix is singular (Q = 0 and two copies of
    an exactly active row, s = 0, so no row of the system fixes u along that direction's partner)."""
    Q = torch.zeros(2, 2, 2, dtype=F64)
    Q[0] = torch.eye(2, dtype=F64)
    G = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]], dtype=F64)
    prob, _ = _prepare("t", Q, torch.zeros(2, 2, dtype=F64), G, torch.zeros(2, 2, dtype=F64), None, None)
    zeros = torch.zeros(2, 2, dtype=F64)
    sol = _Solution(
        torch.zeros(2, 2, dtype=F64), zeros, torch.ones(2, 2, dtype=F64), torch.zeros(2, 0, dtype=F64), None
    )  # type: ignore[arg-type]
    with pytest.raises(
        LinearSolveError, match=r"KKT system at the answer of problem 1 of the batch is singular"
    ):
        _adjoint(prob, sol, torch.ones(2, 2, dtype=F64))


def test_no_warning_on_success() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QPLayer()(**batch_with())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    """The same batch on CUDA: answers and gradients equal the CPU's."""
    inputs = known_qp(31, 6, 8, 2, 3, B=5)["inputs"]
    out = {}
    for dev in ("cpu", "cuda"):
        leaves = {k: v.to(dev).requires_grad_() for k, v in inputs.items()}
        x = QPLayer()(**leaves)
        x.sum().backward()
        out[dev] = (x.detach().cpu(), {k: v.grad.cpu() for k, v in leaves.items()})  # type: ignore[union-attr]
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=0, atol=1e-8)
    for k in inputs:
        torch.testing.assert_close(out["cuda"][1][k], out["cpu"][1][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("n", "m", "p", "active"),
    [
        (3, 20, 1, 2),  # m^3 > 6 m n^2 + n^3: the reduced (n x n) Newton system
        (6, 6, 1, 3),  # Q positive definite, few rows: the constraint-space (m + p) system
    ],
)
def test_both_newton_systems(n: int, m: int, p: int, active: int) -> None:
    """Each of the two Newton systems the solver chooses between reaches the known optimum,
    and the gradients match the active-set reference."""
    prob = known_qp(41, n, m, p, active)
    inputs = prob["inputs"]
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    x = QPLayer()(**leaves)
    torch.testing.assert_close(x.detach(), prob["x"], rtol=0, atol=1e-7)
    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    xr = active_set_solution(ref["Q"], ref["q"], ref["G"], ref["h"], ref["A"], ref["b"], active)
    w = torch.ones(n, dtype=F64)
    for k, a, c in zip(leaves, grads(x, list(leaves.values()), w), grads(xr, list(ref.values()), w)):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6, msg=lambda s, k=k: f"d{k}: {s}")


@pytest.mark.parametrize("p", [0, 2])
def test_polish_candidate_accepted_on_the_right_active_set_only(p: int) -> None:
    """`_polish` on the true active set gives the active-set reference's x to rounding, exact
    complementarity (s = 0 on the active rows, z = 0 on the others) and is usable; with one
    active row guessed inactive its slack is negative and with one inactive row guessed active
    its multiplier is: neither is usable."""
    n, m, active = 6, 8, 3
    inputs = known_qp(81, n, m, p, active)["inputs"]
    prob, _ = _prepare("t", *(inputs[k] for k in ("Q", "q", "G", "h", "A", "b")))
    LQ = torch.linalg.cholesky(prob.Q)
    space = _DualSpace.build(prob, LQ)
    e = torch.cat([prob.h, prob.b], -1).unsqueeze(-1)
    u = torch.cholesky_solve(-prob.q.unsqueeze(-1), LQ)
    k = m + p
    pol = _Polish(
        u,
        space.E @ u - e,
        (space.EQinvEt.diagonal(dim1=-2, dim2=-1) * 1e-8).sqrt(),
        torch.eye(k, dtype=F64),
        torch.zeros(1, k, 1, dtype=F64),
        torch.ones(1, p, 1, dtype=torch.bool) if p else None,
    )
    tol = torch.full((1,), 1e-9, dtype=F64)
    truth = torch.zeros(1, m, 1, dtype=torch.bool)
    truth[:, :active] = True
    x, s_, z, _, Ex, usable, _, _ = _polish(space, pol, truth, e, tol)
    assert bool(usable.all())
    ref = active_set_solution(*(inputs[k] for k in ("Q", "q", "G", "h", "A", "b")), active)
    torch.testing.assert_close(x[0, :, 0], ref, rtol=0, atol=1e-12)
    assert bool((s_[0, :active] == 0).all()) and bool((z[0, active:] == 0).all())
    assert bool((z[0, :active] > 0).all()) and bool((s_[0, active:] > 0).all())
    torch.testing.assert_close(Ex, space.E @ x)
    for flip in (0, m - 1):  # an active row guessed inactive; an inactive one guessed active
        wrong = truth.clone()
        wrong[:, flip] = ~wrong[:, flip]
        assert not bool(_polish(space, pol, wrong, e, tol)[5].any())


def test_polish_rejects_dependent_active_rows() -> None:
    """Two copies of an active row guessed active: E_A Q^-1 E_A' is singular, a pivot falls below
    ``piv_min`` and the candidate is not usable (the interior point, whose s/z keeps the backward's
    matrix definite, goes on)."""
    inputs = known_qp(11, 5, 4, 0, 2, B=1)["inputs"]
    G = torch.cat([inputs["G"], inputs["G"][:, :1]], 1)
    h = torch.cat([inputs["h"], inputs["h"][:, :1]], 1)
    prob, _ = _prepare("t", inputs["Q"], inputs["q"], G, h, None, None)
    LQ = torch.linalg.cholesky(prob.Q)
    space = _DualSpace.build(prob, LQ)
    u = torch.cholesky_solve(-prob.q.unsqueeze(-1), LQ)
    pol = _Polish(
        u,
        space.E @ u - prob.h.unsqueeze(-1),
        (space.EQinvEt.diagonal(dim1=-2, dim2=-1) * 1e-8).sqrt(),
        torch.eye(5, dtype=F64),
        torch.zeros(1, 5, 1, dtype=F64),
        None,
    )
    guess = torch.tensor([True, True, False, False, True]).view(1, 5, 1)
    tol = torch.full((1,), 1e-9, dtype=F64)
    assert not bool(_polish(space, pol, guess, prob.h.unsqueeze(-1), tol)[5].any())
    # a copy off by 1e-10: the factorization succeeds, the relative pivot test rejects it
    G2 = G.clone()
    G2[0, 4] += 1e-10 * torch.arange(1.0, 6.0, dtype=F64)
    prob2, _ = _prepare("t", inputs["Q"], inputs["q"], G2, h, None, None)
    space2 = _DualSpace.build(prob2, LQ)
    act = guess & guess.mT
    assert int(torch.linalg.cholesky_ex(torch.where(act, space2.EQinvEt, pol.eye))[1]) == 0
    pol2 = dataclasses.replace(
        pol,
        r=space2.E @ u - prob2.h.unsqueeze(-1),
        piv_min=(space2.EQinvEt.diagonal(dim1=-2, dim2=-1) * 1e-8).sqrt(),
    )
    assert not bool(_polish(space2, pol2, guess, prob2.h.unsqueeze(-1), tol)[5].any())
    # and the layer's answer (the interior point's) keeps every slack and multiplier positive
    _, sol = _solved(dict(Q=inputs["Q"], q=inputs["q"], G=G, h=h, A=inputs["A"], b=inputs["b"]))
    assert bool((sol.s > 0).all()) and bool((sol.z > 0).all())


@pytest.mark.parametrize("p", [0, 2])
def test_polish_ends_the_solve_with_exact_complementarity(p: int) -> None:
    """On problems with strict complementarity the loop ends with the polish (s = 0 exactly on the
    active rows, z = 0 on the others), x and the gradients are the active-set reference's, and the
    backward's matrix E Q^-1 E' + diag(s/z) (0 on the active rows) agrees with the unreduced LU."""
    n, m, active, B = 6, 8, 3, 3
    inputs = known_qp(91, n, m, p, active, B=B)["inputs"]
    prob, sol = _solved(inputs)
    assert sol.info.converged and sol.space is not None
    assert bool((sol.s[:, :active] == 0).all()) and bool((sol.z[:, active:] == 0).all())
    g = torch.randn(B, n, dtype=F64, generator=torch.Generator().manual_seed(3))
    for a, c in zip(_adjoint(prob, sol, g), _adjoint(prob, dataclasses.replace(sol, space=None), g)):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)
    args = args_of(inputs, m, p)
    leaves = {k: v.clone().requires_grad_() for k, v in args.items() if v is not None}
    x = QPLayer()(**leaves)
    w = torch.randn(B, n, dtype=F64, generator=torch.Generator().manual_seed(4))
    gx = grads(x, list(leaves.values()), w)
    for i in range(B):
        ref = {k: v[i].clone().requires_grad_() for k, v in leaves.items()}
        xr = active_set_solution(ref["Q"], ref["q"], ref["G"], ref["h"], ref.get("A"), ref.get("b"), active)
        torch.testing.assert_close(x[i].detach(), xr.detach(), rtol=0, atol=1e-12)
        for k, a, c in zip(ref, gx, grads(xr, list(ref.values()), w[i])):
            torch.testing.assert_close(a[i], c, rtol=1e-9, atol=1e-9, msg=lambda s, k=k: f"d{k}: {s}")


def test_batched_row_products_equal_single_solves() -> None:
    """Batches of more than one with 32 or more columns multiply rows by stored transposes
    (`_bmv`), a batch of one columns: the same answers and gradients."""
    B, n, m, p = 3, 40, 40, 2
    inputs = known_qp(101, n, m, p, 10, B=B)["inputs"]
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    x = QPLayer()(**leaves)
    w = torch.randn(B, n, dtype=F64, generator=torch.Generator().manual_seed(5))
    gx = grads(x, list(leaves.values()), w)
    for i in range(B):
        single = {k: v[i].clone().requires_grad_() for k, v in inputs.items()}
        xi = QPLayer()(**single)
        torch.testing.assert_close(x[i].detach(), xi.detach(), rtol=0, atol=1e-10)
        for a, c in zip(gx, grads(xi, list(single.values()), w[i])):
            torch.testing.assert_close(a[i], c, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# The backward's two linear solves, and the work they cost


def _solved(inputs: dict[str, torch.Tensor]) -> tuple[Any, _Solution]:
    """The problem and the solver's answer (with the constraint-space matrices where it used them)."""
    prob, _ = _prepare("t", inputs["Q"], inputs["q"], inputs["G"], inputs["h"], inputs["A"], inputs["b"])
    with torch.no_grad():
        sol = _ipm(prob, default_tol(F64), 50, torch.linalg.cholesky_ex(prob.Q))
    return prob, sol


@pytest.mark.parametrize("p", [0, 2])
def test_constraint_space_backward_equals_unreduced_lu(p: int) -> None:
    """Q positive definite: the backward's Cholesky of E Q^-1 E' + diag(s/z, 0) (size m + p) gives
    the adjoint of the unreduced LU of the whole KKT matrix (size n + m + p)."""
    inputs = known_qp(51, 6, 8, p, 3, B=4)["inputs"]
    prob, sol = _solved(inputs)
    assert sol.space is not None  # the constraint-space path is the one under test
    g = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    reduced = _adjoint(prob, sol, g)
    full = _adjoint(prob, dataclasses.replace(sol, space=None), g)
    for a, c in zip(reduced, full):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


def test_constraint_space_backward_falls_back_to_lu() -> None:
    """Two copies of an exactly active row (s = 0): E Q^-1 E' + diag(s/z) is singular, its
    Cholesky fails, and the unreduced LU decides (here: singular too, named), never a silent
    gradient from a failed factorization."""
    Q = torch.eye(2, dtype=F64).expand(2, 2, 2)
    G = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]], dtype=F64)
    prob, _ = _prepare("t", Q, torch.zeros(2, 2, dtype=F64), G, torch.zeros(2, 2, dtype=F64), None, None)
    space = _DualSpace.build(
        dataclasses.replace(prob, Q=prob.Q, G=prob.G, A=prob.A.expand(2, 0, 2)),
        torch.linalg.cholesky(prob.Q),
    )
    zeros = torch.zeros(2, 2, dtype=F64)
    sol = _Solution(zeros, zeros, torch.ones(2, 2, dtype=F64), torch.zeros(2, 0, dtype=F64), None, space)  # type: ignore[arg-type]
    with pytest.raises(
        LinearSolveError, match=r"KKT system at the answer of problem 1 of the batch is singular"
    ):
        _adjoint(prob, sol, torch.ones(2, 2, dtype=F64))


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_backward_work_is_one_small_cholesky() -> None:
    """Count the work: with Q positive definite the backward solves with E Q^-1 E' + diag(s/z)
    (no LU of the (n + m) KKT matrix): at a polished answer with the polish's factor (no
    factorization), otherwise with one Cholesky factorization; in a few dozen dispatches.  The
    forward of a small problem (n = m = 10) stays within its dispatch budget (the loop at batch 1
    is bound by them)."""
    inputs = known_qp(61, 10, 10, 0, 4)["inputs"]
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("Q", "q", "G", "h")}
    layer = QPLayer()
    with _CountOps() as fwd:
        x = layer(**leaves)
    with _CountOps() as bwd:
        x.sum().backward()
    assert bwd.ops["aten.linalg_lu_factor_ex"] == 0
    assert bwd.ops["aten.linalg_cholesky_ex"] == 0  # the polish's factor
    assert sum(bwd.ops.values()) <= 55, bwd.ops
    assert layer.last_info is not None
    iters = layer.last_info.iterations
    # the active-set polish ends the loop after two iterations here (seven without it)
    assert iters <= 3
    # setup and the first check: ~150 dispatches; each iteration ~80 (p = 0, batch 1); the
    # polish that ends the loop ~50
    assert sum(fwd.ops.values()) <= 150 + 80 * iters + 50, (iters, sum(fwd.ops.values()))
    # with a weakly active constraint (s = z = 0 in row 4) the polish is not accepted (strict
    # complementarity): the backward factorizes once
    known = known_qp(61, 10, 10, 0, 4)
    weak = {k: v.clone() for k, v in known["inputs"].items() if k in ("Q", "q", "G", "h")}
    weak["h"][4] = weak["G"][4] @ known["x"]
    leaves = {k: v.requires_grad_() for k, v in weak.items()}
    x = layer(**leaves)
    assert layer.last_info is not None and layer.last_info.converged
    with _CountOps() as bwd_weak:
        x.sum().backward()
    assert bwd_weak.ops["aten.linalg_cholesky_ex"] == 1
    assert bwd_weak.ops["aten.linalg_lu_factor_ex"] == 0
    assert sum(bwd_weak.ops.values()) <= 55, bwd_weak.ops


@pytest.mark.parametrize(
    ("n", "m", "p"),
    [
        (6, 8, 0),  # the constraint-space Newton system
        (3, 20, 1),  # the reduced (n x n) one, with an equality
    ],
)
def test_batch_continues_with_the_running_problems(n: int, m: int, p: int) -> None:
    """Once at most half the batch runs, the solver continues with those problems alone: every
    problem's answer, iteration count and status are those of its own solve, an infeasible
    problem among them is named by its index in the whole batch, and the gradients match."""
    B = 8
    inputs = known_qp(71, n, m, p, 2, B=B)["inputs"]
    # different scales of q: the problems converge after different numbers of iterations
    inputs["q"] = inputs["q"] * torch.logspace(-3, 3, B, dtype=F64).unsqueeze(-1)
    inputs["h"] = inputs["h"] * torch.logspace(-3, 3, B, dtype=F64).unsqueeze(-1)
    inputs["b"] = inputs["b"] * torch.logspace(-3, 3, B, dtype=F64).unsqueeze(-1)
    args = args_of(inputs, m, p)
    leaves = {k: v.clone().requires_grad_() for k, v in args.items() if v is not None}
    with _CountOps() as count:
        x, info = solve_qp(**leaves)
    assert count.ops["aten.nonzero"] >= 1  # the batch shrank at least once
    assert len(set(info.n_iter.tolist())) > 1
    w = torch.randn(B, n, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads_b = torch.autograd.grad((x * w).sum(), list(leaves.values()))
    for i in range(B):
        single = {k: v[i].clone().requires_grad_() for k, v in args.items() if v is not None}
        xi, info_i = solve_qp(**single)
        torch.testing.assert_close(x[i].detach(), xi.detach(), rtol=1e-9, atol=1e-9)
        assert int(info.n_iter[i]) == int(info_i.n_iter[0])
        gi = torch.autograd.grad((xi * w[i]).sum(), list(single.values()))
        for a, c in zip(grads_b, gi):
            torch.testing.assert_close(a[i], c, rtol=1e-7, atol=1e-8)
    # an infeasible problem (x0 <= -1 and -x0 <= -1) among them: named by its index in the batch
    G = inputs["G"].clone()
    h = inputs["h"].clone()
    G[5, :2] = 0.0
    G[5, 0, 0], G[5, 1, 0], h[5, 0], h[5, 1] = 1.0, -1.0, -1.0, -1.0
    with pytest.raises(QPInfeasibleError, match=r"problem 5 of the batch is primal infeasible") as e:
        solve_qp(**{**args, "G": G, "h": h})
    assert e.value.problems == (5,)
