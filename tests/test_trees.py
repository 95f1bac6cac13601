"""Dict trees (``str -> Tensor``, as ``named_parameters`` and ``functional_call`` use) everywhere.

Every public entry point that takes or returns a tree is run on one problem written
twice, with dict trees and with tuple trees, and checked

* against the tuple run (same leaves in the same order: equal to 1e-10 in float64),
* against an independent closed form (ridge regression with an unpenalized intercept),
* for the structure of its answer (a dict with the keys of ``init``, in their order).

The problem, with phi = {"w": (d,), "b": ()} and theta = {"y": (n,), "lam": ()} (keys
deliberately not in alphabetical order, so that a sort anywhere would show):

    G(phi, theta) = 1/2 ||y - X w - b||^2 + lam/2 ||w||^2,
    z* = [w*; b*] = K^-1 Z'y,   Z = [X, 1],  K = Z'Z + lam E,  E = diag(1, ..., 1, 0),

and the outer loss L(phi) = 1/2 ||Xv w + b - yv||^2 with g = dL/dz at z*, u = K^-1 g:

    dL/dlam = -u' E z*,        dL/dy = Z u.

Also: the batched tree operations of `bilevel.tree` against per-row loops, and the
errors for dicts with wrong keys, missing keys or non-tensor values.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from typing import Any

import helpers as H
import numpy as np
import pytest
import torch

import bilevel as bl
from bilevel import tree as T
from bilevel.solvers import (
    BatchedObjective,
    Cvxpy,
    GradientDescent,
    SklearnLogisticRegression,
    SklearnRidge,
    Subprocess,
)

D = torch.float64
N, DIM, B = 20, 3, 3
SAME = 1e-10  # dict run vs tuple run: the same arithmetic on the same leaves

PHI_KEYS = ("w", "b")
THETA_KEYS = ("y", "lam")


# ----------------------------------------------------------------------------- the problem


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, DIM, generator=g, dtype=D)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D) + 0.7 + 0.3 * torch.randn(N, generator=g, dtype=D)
    Xv = torch.randn(N, DIM, generator=g, dtype=D)
    yv = Xv @ torch.tensor([1.0, -2.0, 0.5], dtype=D) + 0.7 + 0.3 * torch.randn(N, generator=g, dtype=D)
    return X, y, Xv, yv


X, Y, XV, YV = _data()
LAM = 2.0
Z = torch.cat([X, torch.ones(N, 1, dtype=D)], dim=1)
ZV = torch.cat([XV, torch.ones(N, 1, dtype=D)], dim=1)
E = torch.diag(torch.tensor([1.0] * DIM + [0.0], dtype=D))


def _part(tree: Any, key: str, keys: tuple[str, ...]) -> torch.Tensor:
    """Leaf ``key`` of a dict tree, or the leaf at the same position of a tuple tree."""
    if isinstance(tree, dict):
        assert tuple(tree.keys()) == keys, f"got keys {list(tree.keys())}, expected {list(keys)}"
        return tree[key]
    assert isinstance(tree, tuple), type(tree)
    return tree[keys.index(key)]


def G(phi: Any, theta: Any) -> torch.Tensor:
    w, b = _part(phi, "w", PHI_KEYS), _part(phi, "b", PHI_KEYS)
    y, lam = _part(theta, "y", THETA_KEYS), _part(theta, "lam", THETA_KEYS)
    r = y - X @ w - b
    return 0.5 * (r * r).sum() + 0.5 * lam * (w * w).sum()


def grad_G(phi: Any, theta: Any) -> Any:
    """grad_phi G written out (not autograd), in the structure of phi."""
    w, b = _part(phi, "w", PHI_KEYS), _part(phi, "b", PHI_KEYS)
    y, lam = _part(theta, "y", THETA_KEYS), _part(theta, "lam", THETA_KEYS)
    r = X @ w + b - y
    gw, gb = X.T @ r + lam * w, r.sum()
    return {"w": gw, "b": gb} if isinstance(phi, dict) else (gw, gb)


def outer(phi: Any) -> torch.Tensor:
    w, b = _part(phi, "w", PHI_KEYS), _part(phi, "b", PHI_KEYS)
    r = XV @ w + b - YV
    return 0.5 * (r * r).sum()


def closed_form(y: torch.Tensor = Y, lam: float = LAM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z* = [w*; b*], dL/dlam and dL/dy (see the module docstring)."""
    K = Z.T @ Z + lam * E
    z = torch.linalg.solve(K, Z.T @ y)
    u = torch.linalg.solve(K, ZV.T @ (ZV @ z - YV))
    return z, -(u @ (E @ z)), Z @ u


Z_STAR, DLAM, DY = closed_form()
L_MAX = float(torch.linalg.eigvalsh(Z.T @ Z + LAM * E).max())
MU = float(torch.linalg.eigvalsh(Z.T @ Z + LAM * E).min())


def init_tree(kind: str) -> Any:
    w, b = torch.zeros(DIM, dtype=D), torch.zeros((), dtype=D)
    return {"w": w, "b": b} if kind == "dict" else (w, b)


def theta_tree(kind: str, y: torch.Tensor = Y, lam: float = LAM) -> Any:
    yt = y.clone().requires_grad_(True)
    lt = torch.tensor(lam, dtype=D, requires_grad=True)
    return {"y": yt, "lam": lt} if kind == "dict" else (yt, lt)


def leaves_of(tree: Any) -> tuple[torch.Tensor, ...]:
    return T.leaves(tree)


def assert_structure(tree: Any, kind: str, keys: tuple[str, ...] = PHI_KEYS) -> None:
    if kind == "dict":
        assert isinstance(tree, dict), type(tree)
        assert tuple(tree.keys()) == keys
    else:
        assert isinstance(tree, tuple) and len(tree) == len(keys), type(tree)


def assert_trees_close(a: Any, b: Any, atol: float) -> None:
    la, lb = leaves_of(a), leaves_of(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=atol)


def flat(phi: Any) -> torch.Tensor:
    return torch.cat([_part(phi, "w", PHI_KEYS).reshape(-1), _part(phi, "b", PHI_KEYS).reshape(-1)])


def hypergrads(theta: Any) -> tuple[torch.Tensor, torch.Tensor]:
    gy, glam = _part(theta, "y", THETA_KEYS).grad, _part(theta, "lam", THETA_KEYS).grad
    assert gy is not None and glam is not None, "a theta entry got no gradient"
    return gy, glam


def run_argmin(kind: str, solver: Any, **kw: Any) -> tuple[Any, Any, bl.ImplicitInfo]:
    """implicit_argmin on the problem in ``kind`` trees; backward of the outer loss."""
    theta = theta_tree(kind)
    phi, info = bl.implicit_argmin(G, init_tree(kind), theta, solver=solver, return_info=True, **kw)
    outer(phi).backward()
    return phi, theta, info


def check_against_tuple_and_closed_form(
    run: Callable[[str], tuple[Any, Any]], atol_x: float, atol_g: float
) -> None:
    """``run(kind) -> (phi, theta)`` after backward: dict == tuple, both == closed form."""
    phi_d, th_d = run("dict")
    phi_t, th_t = run("tuple")
    assert_structure(phi_d, "dict")
    assert_structure(phi_t, "tuple")
    assert_trees_close(phi_d, phi_t, SAME)
    for gd, gt in zip(hypergrads(th_d), hypergrads(th_t)):
        torch.testing.assert_close(gd, gt, rtol=0, atol=SAME)
    torch.testing.assert_close(flat(phi_d).detach(), Z_STAR, rtol=0, atol=atol_x)
    gy, glam = hypergrads(th_d)
    torch.testing.assert_close(glam, DLAM, rtol=0, atol=atol_g)
    torch.testing.assert_close(gy, DY, rtol=0, atol=atol_g)


def exact_solver(objective: Any, init: Any, theta: Any) -> Any:
    """A user solver returning the closed-form answer in the structure of ``init``."""
    y, lam = _part(theta, "y", THETA_KEYS), _part(theta, "lam", THETA_KEYS)
    z, _, _ = closed_form(y.detach(), float(lam))
    w, b = z[:DIM].clone(), z[DIM].clone()
    return {"w": w, "b": b} if isinstance(init, dict) else (w, b)


# ----------------------------------------------------------------------------- bilevel.tree


def _batched_tree(kind: str, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(B, 3, generator=g, dtype=D), torch.randn(B, generator=g, dtype=D),
               torch.randn(B, 2, 2, generator=g, dtype=D))  # fmt: skip
    if kind == "tensor":
        return a
    return {"z": a, "a": b, "m": c} if kind == "dict" else (a, b, c)


TREE_KINDS = ["tensor", "tuple", "dict"]


def _same_kind(tree: Any, like: Any) -> None:
    assert type(tree) is type(like) or (isinstance(like, tuple) and isinstance(tree, tuple))
    if isinstance(like, dict):
        assert list(tree.keys()) == list(like.keys())


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_batch_dot_and_norm_match_a_loop_over_rows(kind: str) -> None:
    a, b = _batched_tree(kind, 0), _batched_tree(kind, 1)
    ref = torch.stack(
        [
            torch.stack([(x[i] * y[i]).sum() for x, y in zip(leaves_of(a), leaves_of(b))]).sum()
            for i in range(B)
        ]
    )
    torch.testing.assert_close(T.batch_dot(a, b), ref, rtol=1e-14, atol=1e-14)
    ref_sq = torch.stack([torch.stack([(x[i] ** 2).sum() for x in leaves_of(a)]).sum() for i in range(B)])
    torch.testing.assert_close(T.batch_norm_sq(a), ref_sq, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_batch_axpy_and_scale_match_a_loop_over_rows(kind: str) -> None:
    a, b = _batched_tree(kind, 0), _batched_tree(kind, 1)
    s = torch.tensor([0.5, -2.0, 3.0], dtype=D)
    out = T.batch_axpy(a, s, b)
    _same_kind(out, a)
    scaled = T.batch_scale(s, a)
    _same_kind(scaled, a)
    for x, y, o, sc in zip(leaves_of(a), leaves_of(b), leaves_of(out), leaves_of(scaled)):
        assert o.shape == x.shape and sc.shape == x.shape
        for i in range(B):
            torch.testing.assert_close(o[i], x[i] + s[i] * y[i], rtol=0, atol=0)
            torch.testing.assert_close(sc[i], s[i] * x[i], rtol=0, atol=0)


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_ravel_batch_rows_and_round_trip(kind: str) -> None:
    a = _batched_tree(kind, 0)
    M = T.ravel_batch(a)
    assert M.shape == (B, sum(x[0].numel() for x in leaves_of(a)))
    for i in range(B):
        torch.testing.assert_close(M[i], torch.cat([x[i].reshape(-1) for x in leaves_of(a)]), rtol=0, atol=0)
    back = T.unravel_batch(M, a)
    _same_kind(back, a)
    assert_trees_close(back, a, 0.0)
    # and the other way: a matrix through a tree and back
    M2 = torch.randn(M.shape, dtype=D)
    torch.testing.assert_close(T.ravel_batch(T.unravel_batch(M2, a)), M2, rtol=0, atol=0)


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_one_flattener_for_one_problem_rows_and_dtypes(kind: str) -> None:
    """The forms the core uses: one problem as a (1, n) row, rows laid out like one unbatched
    tree, a cast on the way in and each leaf's dtype on the way out."""
    a = _batched_tree(kind, 0)
    one = T.unflatten(a, [x[0] for x in leaves_of(a)])  # problem 0 alone, no batch dim
    row = T.ravel_batch(one, batched=False)
    torch.testing.assert_close(
        row, T.ravel(a if kind == "tensor" else one)[None, : row.shape[1]], rtol=0, atol=0
    )
    torch.testing.assert_close(row[0], T.ravel(one), rtol=0, atol=0)
    back = T.unravel_batch(row, one, batched=False)
    _same_kind(back, one)
    assert_trees_close(back, one, 0.0)
    rows = T.unravel_rows(T.ravel_batch(a), one)
    _same_kind(rows, a)
    assert_trees_close(rows, a, 0.0)
    v32 = T.ravel(one, dtype=torch.float32)
    assert v32.dtype == torch.float32
    back64 = T.unravel_like(v32, one)
    assert all(x.dtype == D for x in leaves_of(back64))
    assert_trees_close(back64, one, 1e-6)
    assert T.ravel_batch(a, dtype=torch.float32).dtype == torch.float32
    # a single leaf is not copied by the flattener
    if kind == "tensor":
        assert T.ravel(one).data_ptr() == one.data_ptr()
        X = T.ravel_batch(a)
        assert T.unravel_batch(X, a) is X


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.int64]
)
def test_rows_finite_equals_isfinite_row_by_row_without_a_tensor_sized_temporary(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    X = (100 * torch.randn(6, 50, 3, generator=g, dtype=torch.float64)).to(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        X[1, 7, 0] = torch.nan
        X[3, 0, 2] = torch.inf
        X[4, 49, 1] = -torch.inf
        X[5, 2, 1] = torch.finfo(dtype).max  # large but finite
    Y = torch.zeros(6, 0, dtype=dtype)  # rows without entries are finite
    want = torch.isfinite(X).reshape(6, -1).all(dim=1)
    with H.LiveTensorBytes() as count:
        got = T.rows_finite(X, Y, X[:, 0, 0])
    assert got.tolist() == want.tolist()
    if dtype.is_floating_point:
        assert got.tolist() == [True, False, True, False, False, True]
        assert count.peak < X.numel(), count.peak  # not even a bool per entry
    # an empty batch: no problem, no failure
    assert T.rows_finite(X[:0]).shape == (0,)
    assert T.finite_problems({"a": X[:0], "b": Y[:0]})[1].shape == (2, 0)


def test_leaf_names_label_a_tensor_a_dict_leaf_and_a_sequence_leaf() -> None:
    t = torch.zeros(2)
    assert T.leaf_names(t).label("x", 0) == "x"
    assert T.leaf_names({"w": t, "b": t}).label("x", 1) == "x['b']"
    assert T.leaf_names((t, t)).label("x", 1) == "x[1]"
    assert T.leaf_names({"w": t}) == T.LeafNames(single=False, keys=("w",))  # no tensor kept


def test_row_operations_and_norms() -> None:
    g = torch.Generator().manual_seed(5)
    A, Bm = torch.randn(4, 7, generator=g, dtype=D), torch.randn(4, 7, generator=g, dtype=D)
    torch.testing.assert_close(T.rowdot(A, Bm), torch.einsum("bi,bi->b", A, Bm), rtol=1e-15, atol=0)
    torch.testing.assert_close(T.rownorm(A), A.norm(dim=1), rtol=1e-15, atol=0)
    assert T.rownorm(A.float()).dtype == torch.float32
    assert T.rownorm(A.half()).dtype == torch.float32  # half precision accumulates in float32
    bad = A.clone()
    bad[2, 3] = torch.nan
    assert T.rows_finite(bad, A[:, 0]).tolist() == [True, True, False, True]
    tree = _batched_tree("dict", 0)
    ref = torch.cat([x.reshape(B, -1) for x in leaves_of(tree)], dim=1).norm(dim=1)
    assert T.batch_norm(tree).dtype == torch.float64
    torch.testing.assert_close(T.batch_norm(tree), ref, rtol=1e-15, atol=0)
    torch.testing.assert_close(T.batch_norm(tree, batched=False), ref.norm()[None], rtol=1e-15, atol=0)


def test_all_finite_is_a_per_leaf_mask_of_any_tree() -> None:
    ok, nan = torch.ones(3), torch.tensor([1.0, torch.inf])
    assert T.all_finite([ok, nan]).tolist() == [True, False]  # a list (meta-learning's call)
    assert T.all_finite((ok, nan)).tolist() == [True, False]
    assert T.all_finite({"a": nan, "b": ok}).tolist() == [False, True]
    assert T.all_finite(ok).tolist() == [True]
    assert bool(T.all_finite([ok, ok]).all()) and not bool(T.all_finite([ok, nan]).all())
    assert T.all_finite([]).shape == (0,)
    # an empty leaf is finite (the fused max-magnitude reduction has no identity for it)
    assert T.all_finite({"a": ok, "b": torch.zeros(0), "c": nan}).tolist() == [True, True, False]


def test_one_severity_order() -> None:
    from bilevel._status import LINEAR_SEVERITY, SOLVER_SEVERITY, worst

    assert set(SOLVER_SEVERITY) == set(bl.SolverStatus)
    assert set(LINEAR_SEVERITY) == set(bl.LinearStatus)
    assert bl.LinearSolveResult.CODES == LINEAR_SEVERITY
    S, L = bl.SolverStatus, bl.LinearStatus
    assert worst([S.CONVERGED, S.MAX_ITER, S.BUDGET]) is S.MAX_ITER
    assert worst([S.CONVERGED, S.NONFINITE, S.FAILED]) is S.NONFINITE
    assert worst([L.CONVERGED, L.BOUNDARY, L.BUDGET]) is L.BOUNDARY
    assert worst([L.CONVERGED] * 3) is L.CONVERGED


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_ravel_unravel_tree_map_and_dot_keep_the_structure(kind: str) -> None:
    a, b = _batched_tree(kind, 0), _batched_tree(kind, 1)
    v = T.ravel(a)
    assert v.shape == (sum(x.numel() for x in leaves_of(a)),)
    back = T.unravel_like(v, a)
    _same_kind(back, a)
    assert_trees_close(back, a, 0.0)
    summed = T.tree_map(torch.add, a, b)
    _same_kind(summed, a)
    torch.testing.assert_close(T.tree_dot(a, b), T.batch_dot(a, b).sum(), rtol=1e-14, atol=1e-14)
    T.check_like(summed, a, "summed", "a")


def test_tree_functions_name_the_key_of_a_bad_dict() -> None:
    good = {"w": torch.zeros(3, dtype=D), "b": torch.zeros((), dtype=D)}
    with pytest.raises(TypeError, match=r"phi\['b'\] is a float"):
        T.leaves({"w": torch.zeros(3), "b": 0.5}, name="phi")  # type: ignore[dict-item]
    with pytest.raises(bl.StructureError, match=r"keys \['w', 'c'\] but init has \['w', 'b'\]"):
        T.check_like({"w": torch.zeros(3, dtype=D), "c": torch.zeros((), dtype=D)}, good, "x")
    with pytest.raises(bl.StructureError, match=r"x\['b'\] has shape \(2,\)"):
        T.check_like({"w": torch.zeros(3, dtype=D), "b": torch.zeros(2, dtype=D)}, good, "x")
    with pytest.raises(bl.NonFiniteError, match=r"x\['b'\] contains NaN"):
        T.check_finite({"w": torch.zeros(3, dtype=D), "b": torch.tensor(float("nan"), dtype=D)}, "x")


# ----------------------------------------------------------------------------- inner solvers, one problem


def _solvers() -> dict[str, tuple[Any, float, float]]:
    """name -> (solver, atol of the answer vs the closed form, atol of the hypergradient): every
    solver of the matrix at ||grad|| <= 1e-10 (or the least it reaches), the answer within
    10 tol and the hypergradient within 100 tol (mu ~ 0.3, see the closed form)."""
    out = {}
    for case in H.SOLVERS:
        tol = case.tol(tol=1e-10)
        out[case.name] = (case(H.Scale(1 / L_MAX, MU), tol), 10 * tol, 100 * tol)
    return out


SOLVERS = list(_solvers())


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_called_directly_returns_a_dict(name: str) -> None:
    solver, atol_x, _ = _solvers()[name]
    res_d = solver(G, init_tree("dict"), theta_tree("dict"))
    res_t = solver(G, init_tree("tuple"), theta_tree("tuple"))
    assert res_d.converged, (res_d.status, res_d.grad_norm)
    assert_structure(res_d.x, "dict")
    assert_trees_close(res_d.x, res_t.x, SAME)
    assert (res_d.n_iter, res_d.n_gev, res_d.n_hvp) == (res_t.n_iter, res_t.n_gev, res_t.n_hvp)
    torch.testing.assert_close(flat(res_d.x), Z_STAR, rtol=0, atol=atol_x)


@pytest.mark.parametrize("name", SOLVERS)
def test_implicit_argmin_with_each_solver(name: str) -> None:
    solver, atol_x, atol_g = _solvers()[name]

    def run(kind: str) -> tuple[Any, Any]:
        phi, theta, info = run_argmin(kind, solver, optimality_tol=1e-6)
        assert info.last_backward is not None and info.last_backward.converged
        return phi, theta

    check_against_tuple_and_closed_form(run, atol_x, atol_g)


# ----------------------------------------------------------------------------- HVP oracles


def user_hvp(phi: Any, theta: Any, v: Any) -> Any:
    """H v written out; receives trees in the user's structure and returns one."""
    vw, vb = _part(v, "w", PHI_KEYS), _part(v, "b", PHI_KEYS)
    lam = _part(theta, "lam", THETA_KEYS)
    _part(phi, "w", PHI_KEYS)  # checks phi's structure too
    r = X @ vw + vb
    hw, hb = X.T @ r + lam * vw, r.sum()
    return {"w": hw, "b": hb} if isinstance(v, dict) else (hw, hb)


HVPS: dict[str, tuple[Any, float]] = {
    "default": (None, 1e-9),
    "reverse_over_reverse": (bl.ReverseOverReverse(), 1e-9),
    "forward_over_reverse": (bl.ForwardOverReverse(fallback=False), 1e-9),
    # central differences of gradients: O(eps^(2/3)) ~ 1e-11 relative, amplified by the solve
    "finite_difference": (bl.FiniteDifferenceHVP(), 1e-6),
    "dense_hessian": (bl.DenseHessian(), 1e-9),
    "user_callable": (user_hvp, 1e-9),
}


@pytest.mark.parametrize("name", list(HVPS))
def test_implicit_argmin_with_each_hvp_oracle(name: str) -> None:
    hvp, atol_g = HVPS[name]

    def run(kind: str) -> tuple[Any, Any]:
        phi, theta, _ = run_argmin(kind, exact_solver, hvp=hvp)
        return phi, theta

    check_against_tuple_and_closed_form(run, 1e-12, atol_g)


# ----------------------------------------------------------------------------- roots and fixed points


def test_implicit_root_with_dicts() -> None:
    def run(kind: str) -> tuple[Any, Any]:
        theta = theta_tree(kind)
        phi = bl.implicit_root(grad_G, init_tree(kind), theta, solver=exact_solver, optimality_tol=1e-9)
        outer(phi).backward()
        return phi, theta

    check_against_tuple_and_closed_form(run, 1e-12, 1e-8)


ETA = 1.0 / L_MAX


def T_map(x: Any, theta: Any) -> Any:
    """A gradient step, whose fixed point is the argmin."""
    g = grad_G(x, theta)
    return T.tree_map(lambda a, b: a - ETA * b, x, g)


def iterate_T(Tf: Any, init: Any, theta: Any) -> Any:
    x = init
    for _ in range(5000):
        x = Tf(x, theta)
    return x


def test_fixed_point_with_dicts() -> None:
    def run(kind: str) -> tuple[Any, Any]:
        theta = theta_tree(kind)
        phi = bl.fixed_point(T_map, init_tree(kind), theta, solver=iterate_T, optimality_tol=1e-9)
        outer(phi).backward()
        return phi, theta

    check_against_tuple_and_closed_form(run, 1e-9, 1e-7)


# ----------------------------------------------------------------------------- batched solvers


def per_problem(phi: Any, theta: Any) -> torch.Tensor:
    w, b = _part(phi, "w", PHI_KEYS), _part(phi, "b", PHI_KEYS)
    y, lam = _part(theta, "y", THETA_KEYS), _part(theta, "lam", THETA_KEYS)
    r = y - w @ X.T - b[:, None]
    return 0.5 * (r * r).sum(1) + 0.5 * lam * (w * w).sum(1)


BATCH_LAMS = (0.5, 2.0, 8.0)
BATCH_Y = torch.stack([Y, Y.flip(0), 2.0 * Y])
L_MAX_BATCH = max(float(torch.linalg.eigvalsh(Z.T @ Z + lam * E).max()) for lam in BATCH_LAMS)
MU_BATCH = min(float(torch.linalg.eigvalsh(Z.T @ Z + lam * E).min()) for lam in BATCH_LAMS)


def batched_init(kind: str) -> Any:
    w, b = torch.zeros(B, DIM, dtype=D), torch.zeros(B, dtype=D)
    return {"w": w, "b": b} if kind == "dict" else (w, b)


def batched_theta(kind: str) -> Any:
    y = BATCH_Y.clone().requires_grad_(True)
    lam = torch.tensor(BATCH_LAMS, dtype=D, requires_grad=True)
    return {"y": y, "lam": lam} if kind == "dict" else (y, lam)


BATCHED_SOLVERS: dict[str, Any] = {
    c.name: c(H.Scale(1 / L_MAX_BATCH, MU_BATCH), 1e-10, batched=True) for c in H.BATCHED
}


@pytest.mark.parametrize("name", list(BATCHED_SOLVERS))
def test_batched_solvers_with_dicts(name: str) -> None:
    solver = BATCHED_SOLVERS[name]
    objective = BatchedObjective(per_problem)
    out = {}
    for kind in ("dict", "tuple"):
        res = solver(objective, batched_init(kind), batched_theta(kind))
        assert res.converged, (res.status, res.info.get("status"))
        assert_structure(res.x, kind)
        theta = batched_theta(kind)
        phi = bl.implicit_argmin(objective, batched_init(kind), theta, solver=solver, optimality_tol=1e-6)
        assert_structure(phi, kind)
        torch.stack([outer(tuple(t[i] for t in leaves_of(phi))) for i in range(B)]).sum().backward()
        out[kind] = (res.x, phi, hypergrads(theta))
    (xd, phid, (gyd, gld)), (xt, phit, (gyt, glt)) = out["dict"], out["tuple"]
    assert_trees_close(xd, xt, SAME)
    assert_trees_close(phid, phit, SAME)
    torch.testing.assert_close(gyd, gyt, rtol=0, atol=SAME)
    torch.testing.assert_close(gld, glt, rtol=0, atol=SAME)
    for i, lam in enumerate(BATCH_LAMS):
        z, dlam, dy = closed_form(BATCH_Y[i], lam)
        torch.testing.assert_close(torch.cat([xd["w"][i], xd["b"][i : i + 1]]), z, rtol=0, atol=1e-9)
        torch.testing.assert_close(gld[i], dlam, rtol=0, atol=1e-8)
        torch.testing.assert_close(gyd[i], dy, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------- solvers outside torch

EXTERNAL = textwrap.dedent(
    '''
    """Solves the module's ridge problem with numpy, reading a dict's leaves by name."""
    import sys
    import numpy as np

    data, request, answer = sys.argv[1:4]
    req, X = np.load(request), np.load(data)["X"]
    theta = [req[f"theta_{j}"] for j in range(int(req["n_theta"]))]
    has_keys = "theta_keys" in req.files and "init_keys" in req.files
    tkeys = [str(k) for k in req["theta_keys"]] if has_keys else ["y", "lam"]
    ikeys = [str(k) for k in req["init_keys"]] if has_keys else ["w", "b"]
    named = dict(zip(tkeys, theta))
    Z = np.hstack([X, np.ones((X.shape[0], 1))])
    E = np.diag([1.0] * X.shape[1] + [0.0])
    z = np.linalg.solve(Z.T @ Z + float(named["lam"]) * E, Z.T @ named["y"])
    x = {"w": z[:-1], "b": z[-1]}
    np.savez(answer, status="converged", n_iter=1, message=",".join(ikeys) if has_keys else "positional",
             **{f"x_{i}": x[k] for i, k in enumerate(ikeys)})
    '''
)


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> Subprocess:
    root = tmp_path_factory.mktemp("external_trees")
    (root / "solve.py").write_text(EXTERNAL)
    np.savez(root / "data.npz", X=X.numpy())
    return Subprocess([sys.executable, str(root / "solve.py"), str(root / "data.npz")], timeout=60)


def test_subprocess_with_dicts(external: Subprocess) -> None:
    messages = {}

    def run(kind: str) -> tuple[Any, Any]:
        phi, theta, info = run_argmin(kind, external, optimality_tol=1e-8)
        assert info.solver_result is not None
        messages[kind] = info.solver_result.info["message"]
        return phi, theta

    check_against_tuple_and_closed_form(run, 1e-10, 1e-8)
    assert messages == {"dict": "w,b", "tuple": "positional"}  # keys sent for a dict only


def _cvxpy_problem() -> tuple[Any, dict[str, Any], dict[str, Any]]:
    import cvxpy as cp

    w, b = cp.Variable(DIM), cp.Variable()
    y, lam = cp.Parameter(N), cp.Parameter(nonneg=True)
    Xn = X.numpy()
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - Xn @ w - b) + 0.5 * lam * cp.sum_squares(w)))
    return prob, {"w": w, "b": b}, {"y": y, "lam": lam}


# Clarabel's default tolerances (1e-8 on the duality gap) bound the accuracy of its answer.
CVX_ATOL_X, CVX_ATOL_G = 1e-6, 1e-5


@pytest.mark.parametrize("spec", ["dicts", "reordered_dicts", "sequences"])
def test_cvxpy_with_dicts(spec: str) -> None:
    prob, vs, ps = _cvxpy_problem()
    positional = Cvxpy(prob, variables=[vs["w"], vs["b"]], parameters=[ps["y"], ps["lam"]], solver="CLARABEL")
    if spec == "dicts":
        solver = Cvxpy(prob, variables=vs, parameters=ps, solver="CLARABEL")
    elif spec == "reordered_dicts":  # matched by name, not by position
        solver = Cvxpy(prob, variables={"b": vs["b"], "w": vs["w"]},
                       parameters={"lam": ps["lam"], "y": ps["y"]}, solver="CLARABEL")  # fmt: skip
    else:  # a dict init with sequences: by position, in the dict's order
        solver = positional

    def run(kind: str) -> tuple[Any, Any]:
        phi, theta, _ = run_argmin(kind, solver if kind == "dict" else positional, optimality_tol=1e-4)
        return phi, theta

    check_against_tuple_and_closed_form(run, CVX_ATOL_X, CVX_ATOL_G)

    def run_fp(kind: str) -> tuple[Any, Any]:
        theta = theta_tree(kind)
        s = solver if kind == "dict" else positional
        phi = bl.fixed_point(T_map, init_tree(kind), theta, solver=s, optimality_tol=1e-4)
        outer(phi).backward()
        return phi, theta

    check_against_tuple_and_closed_form(run_fp, CVX_ATOL_X, CVX_ATOL_G)


def test_cvxpy_dict_keys_must_match() -> None:
    prob, vs, ps = _cvxpy_problem()
    solver = Cvxpy(prob, variables=vs, parameters=ps, solver="CLARABEL")
    bad_init = {"w": torch.zeros(DIM, dtype=D), "c": torch.zeros((), dtype=D)}
    with pytest.raises(bl.StructureError, match=r"init lacks \['b'\]; no entry of variables for \['c'\]"):
        solver(G, bad_init, theta_tree("dict"))
    with pytest.raises(bl.StructureError, match=r"theta has keys \['y'\].*theta lacks \['lam'\]"):
        solver(G, init_tree("dict"), {"y": Y})
    with pytest.raises(bl.StructureError, match=r"variables is a dict .* but init is a tuple"):
        solver(G, init_tree("tuple"), theta_tree("dict"))
    with pytest.raises(TypeError, match="keys of a dict of variables must be str"):
        Cvxpy(prob, variables={0: vs["w"]})  # type: ignore[dict-item]


def _sklearn_closed_form(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    # scikit-learn's ||y - Xw - b||^2 + alpha ||w||^2 is 2 G(lam = alpha): same argmin, same dL/dalpha
    z, dlam, _ = closed_form(Y, alpha)
    return z, dlam


@pytest.mark.parametrize("order", [("w", "b"), ("b", "w")])
def test_sklearn_ridge_reads_a_dict_by_name(order: tuple[str, str]) -> None:
    inner = SklearnRidge(X, Y)
    out = {}
    for kind in ("dict", "tuple"):
        zeros = {"w": torch.zeros(DIM, dtype=D), "b": torch.zeros((), dtype=D)}
        init = {k: zeros[k] for k in order} if kind == "dict" else (zeros["w"], zeros["b"])
        alpha = torch.tensor(LAM, dtype=D, requires_grad=True)
        theta = {"alpha": alpha} if kind == "dict" else alpha
        phi = bl.implicit_argmin(inner.objective, init, theta, solver=inner, optimality_tol=1e-6)
        w, b = (phi["w"], phi["b"]) if kind == "dict" else phi
        if kind == "dict":
            assert tuple(phi.keys()) == order
        r = XV @ w + b - YV
        (0.5 * (r * r).sum()).backward()
        assert alpha.grad is not None
        out[kind] = (torch.cat([w.reshape(-1), b.reshape(-1)]).detach(), alpha.grad)
    torch.testing.assert_close(out["dict"][0], out["tuple"][0], rtol=0, atol=SAME)
    torch.testing.assert_close(out["dict"][1], out["tuple"][1], rtol=0, atol=SAME)
    z, dlam = _sklearn_closed_form(LAM)
    torch.testing.assert_close(out["dict"][0], z, rtol=0, atol=1e-8)
    torch.testing.assert_close(out["dict"][1], dlam, rtol=0, atol=1e-7)


def test_sklearn_logistic_with_dicts_matches_tuples() -> None:
    labels = (Y > Y.median()).double()
    inner = SklearnLogisticRegression(X, labels)
    res = {}
    for kind in ("dict", "tuple"):
        C = torch.tensor(0.7, dtype=D, requires_grad=True)
        init = init_tree(kind)
        phi = bl.implicit_argmin(
            inner.objective, init, {"C": C} if kind == "dict" else C, solver=inner, optimality_tol=1e-5
        )
        assert_structure(phi, kind)
        w, b = (phi["w"], phi["b"]) if kind == "dict" else phi
        torch.nn.functional.softplus(-(XV @ w + b)).sum().backward()
        res[kind] = (torch.cat([w.reshape(-1), b.reshape(-1)]).detach(), C.grad)
    torch.testing.assert_close(res["dict"][0], res["tuple"][0], rtol=0, atol=SAME)
    torch.testing.assert_close(res["dict"][1], res["tuple"][1], rtol=0, atol=SAME)


def test_sklearn_dict_keys_must_be_w_and_b() -> None:
    inner = SklearnRidge(X, Y)
    alpha = torch.tensor(LAM, dtype=D)
    with pytest.raises(bl.StructureError, match=r"expected the keys \['w', 'b'\] \(missing \['b'\]\)"):
        inner(inner.objective, {"w": torch.zeros(DIM, dtype=D), "c": torch.zeros((), dtype=D)}, alpha)
    with pytest.raises(bl.StructureError, match=r"missing \['b'\].*unexpected \['c'\]"):
        inner.objective({"w": torch.zeros(DIM, dtype=D), "c": torch.zeros((), dtype=D)}, alpha)
    no_b = SklearnRidge(X, Y, fit_intercept=False)
    w = bl.implicit_argmin(no_b.objective, {"w": torch.zeros(DIM, dtype=D)}, {"alpha": alpha}, solver=no_b)
    assert list(w.keys()) == ["w"]


# ----------------------------------------------------------------------------- layers


def test_argmin_layer_with_a_dict_init_and_a_dict_input() -> None:
    def run(kind: str) -> tuple[Any, Any]:
        layer = bl.layers.ArgminLayer(G, exact_solver, init=init_tree(kind), optimality_tol=1e-9)
        theta = theta_tree(kind)
        phi = layer(theta) if kind == "dict" else layer(*theta)
        outer(phi).backward()
        assert layer.last_info is not None and layer.last_info.last_backward is not None
        return phi, theta

    check_against_tuple_and_closed_form(run, 1e-12, 1e-9)


@pytest.mark.parametrize("layer_cls,fn", [(bl.layers.RootLayer, grad_G), (bl.layers.FixedPointLayer, T_map)])
def test_condition_layers_with_dicts(layer_cls: Any, fn: Any) -> None:
    solver = exact_solver if layer_cls is bl.layers.RootLayer else iterate_T

    def run(kind: str) -> tuple[Any, Any]:
        layer = layer_cls(fn, solver, init=init_tree(kind), optimality_tol=1e-9)
        theta = theta_tree(kind)
        phi = layer(theta) if kind == "dict" else layer(*theta)
        outer(phi).backward()
        return phi, theta

    check_against_tuple_and_closed_form(run, 1e-9, 1e-7)


def test_layer_dict_init_is_buffers_and_warm_start_keeps_the_dict() -> None:
    seen: list[Any] = []

    def spy(objective: Any, init: Any, theta: Any) -> Any:
        seen.append({k: v.clone() for k, v in init.items()})
        return exact_solver(objective, init, theta)

    layer = bl.layers.ArgminLayer(G, spy, init=init_tree("dict"), warm_start=True, optimality_tol=1e-9)
    assert {n for n, _ in layer.named_buffers()} == {"init_0", "init_1"}
    first = layer(theta_tree("dict"))
    second = layer(theta_tree("dict"))
    assert list(second.keys()) == ["w", "b"]
    assert list(seen[0].keys()) == ["w", "b"] and list(seen[1].keys()) == ["w", "b"]
    assert float(seen[0]["w"].abs().max()) == 0.0
    assert_trees_close(seen[1], first, 0.0)  # warm start from the previous dict answer
    # a callable init returning a dict
    layer2 = bl.layers.ArgminLayer(G, exact_solver, init=lambda th: init_tree("dict"), optimality_tol=1e-9)
    assert_structure(layer2(theta_tree("dict")), "dict")


def test_layer_rejects_bad_dicts() -> None:
    with pytest.raises(TypeError, match=r"init must be .*init\['b'\] is a float"):
        bl.layers.ArgminLayer(G, exact_solver, init={"w": torch.zeros(DIM, dtype=D), "b": 0.0})  # type: ignore[dict-item]
    layer = bl.layers.ArgminLayer(G, exact_solver, init=init_tree("dict"))
    with pytest.raises(TypeError, match=r"input\['lam'\] is a float"):
        layer({"y": Y, "lam": 2.0})


# ----------------------------------------------------------------------------- hyperopt


def _hyper_problem() -> bl.hyperopt.HyperProblem:
    def outer_loss(phi: Any, hyper: Any) -> torch.Tensor:
        return outer(phi) + 0.0 * _part(hyper, "lam", THETA_KEYS)

    return bl.hyperopt.HyperProblem(G, outer_loss, exact_solver, optimality_tol=1e-9)


def test_hyper_problem_evaluate_with_dicts() -> None:
    problem = _hyper_problem()

    def run(kind: str) -> tuple[Any, Any]:
        theta = theta_tree(kind)
        ev = problem.evaluate(theta, init_tree(kind))
        ev.loss.backward()
        return ev.params, theta

    check_against_tuple_and_closed_form(run, 1e-12, 1e-9)


def test_minimize_and_search_hyper_with_dicts() -> None:
    problem = _hyper_problem()
    results = {}
    for kind in ("dict", "tuple"):
        res = bl.hyperopt.minimize_hyper(
            problem,
            theta_tree(kind),
            init_tree(kind),
            outer=lambda ps: torch.optim.SGD(ps, lr=1e-3),
            steps=4,
        )
        cands = [theta_tree(kind, lam=lam) for lam in (0.5, 2.0, 8.0)]
        found = bl.hyperopt.search_hyper(problem, cands, init_tree(kind))
        results[kind] = (res, found)
    for i in range(2):
        rd, rt = results["dict"][i], results["tuple"][i]
        assert_structure(rd.hyper, "dict", THETA_KEYS)
        assert_structure(rd.last_hyper, "dict", THETA_KEYS)
        assert_structure(rd.params, "dict")
        assert_trees_close(rd.hyper, rt.hyper, SAME)
        assert_trees_close(rd.last_hyper, rt.last_hyper, SAME)
        assert_trees_close(rd.params, rt.params, SAME)
        assert rd.best_solve == rt.best_solve and rd.n_solves == rt.n_solves
        np.testing.assert_allclose(rd.outer_losses, rt.outer_losses, rtol=0, atol=SAME)
    # minimize_hyper's first step is plain SGD on the closed-form hypergradient
    first = results["dict"][0].history[0]
    assert first.hypergrad_norm == pytest.approx(float(torch.sqrt(DLAM**2 + (DY**2).sum())), rel=1e-9)
    # search_hyper's best candidate is the one with the lowest closed-form outer loss
    losses = [float(0.5 * ((ZV @ closed_form(Y, lam)[0] - YV) ** 2).sum()) for lam in (0.5, 2.0, 8.0)]
    assert results["dict"][1].best_solve == 1 + int(np.argmin(losses))


# ----------------------------------------------------------------------------- theory


def test_certify_reads_a_dict_run_like_a_tuple_run() -> None:
    certs = {}
    for kind in ("dict", "tuple"):
        # Two CG steps leave a backward residual for the certificate to bound (throw=False: warn).
        with pytest.warns(bl.BilevelWarning, match="backward solve stopped"):
            _, _, info = run_argmin(kind, exact_solver, linear_solver=bl.CG(max_iter=2), throw=False)
        certs[kind] = bl.theory.certify(info, lam=LAM, rho=0.0, L=float(torch.linalg.matrix_norm(ZV, 2) ** 2))
    assert certs["dict"].valid
    assert certs["dict"].bound == pytest.approx(certs["tuple"].bound, rel=1e-12)
    assert certs["dict"].delta_prime == pytest.approx(certs["tuple"].delta_prime, rel=1e-12)


# ----------------------------------------------------------------------------- structure errors


def _answer(**leaves: Any) -> Callable[..., Any]:
    return lambda objective, init, theta: dict(leaves)


W0, B0 = Z_STAR[:DIM].clone(), Z_STAR[DIM].clone()

BAD_ANSWERS = {
    "wrong_key": (
        _answer(w=W0, c=B0),
        bl.StructureError,
        r"keys \['w', 'c'\] but init has \['w', 'b'\]: key 'b' of init is missing",
    ),
    "missing_key": (_answer(w=W0), bl.StructureError, r"keys \['w'\] but init has \['w', 'b'\]: key 'b'"),
    "extra_key": (
        _answer(w=W0, b=B0, c=B0),
        bl.StructureError,
        r"keys \['w', 'b', 'c'\] but init .*has key 'c', which init lacks",
    ),
    "tuple": (lambda o, i, t: (W0, B0), bl.StructureError, "is a tuple but init is a dict"),
    "non_tensor": (_answer(w=W0, b=0.5), TypeError, r"answer\['b'\] is a float"),
    "wrong_shape": (_answer(w=W0, b=B0.reshape(1)), bl.StructureError, r"answer\['b'\] has shape \(1,\)"),
}


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
def test_a_user_solver_dict_with_the_wrong_structure_is_refused(name: str) -> None:
    solver, err, match = BAD_ANSWERS[name]
    with pytest.raises(err, match=match):
        bl.implicit_argmin(G, init_tree("dict"), theta_tree("dict"), solver=solver)


def test_non_tensor_dict_entries_of_init_and_theta_name_the_key() -> None:
    with pytest.raises(TypeError, match=r"init\['b'\] is a float"):
        bl.implicit_argmin(
            G,
            {"w": torch.zeros(DIM, dtype=D), "b": 0.0},  # type: ignore[dict-item]
            theta_tree("dict"),
            solver=exact_solver,
        )
    with pytest.raises(TypeError, match=r"theta\['lam'\] is a float"):
        bl.implicit_argmin(G, init_tree("dict"), {"y": Y, "lam": 2.0}, solver=exact_solver)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"init\['b'\] is a float"):
        GradientDescent(lr=0.1)(G, {"w": torch.zeros(DIM, dtype=D), "b": 0.0}, theta_tree("dict"))  # type: ignore[dict-item]


def test_a_user_hvp_dict_with_a_wrong_key_is_refused() -> None:
    def bad_hvp(phi: Any, theta: Any, v: Any) -> Any:
        return {"w": v["w"], "c": v["b"]}

    phi = bl.implicit_argmin(G, init_tree("dict"), theta_tree("dict"), solver=exact_solver, hvp=bad_hvp)
    with pytest.raises(bl.StructureError, match=r"hvp\(phi, theta, v\) has keys \['w', 'c'\]"):
        outer(phi).backward()


def _bad_F(x: Any, theta: Any) -> Any:
    g = grad_G(x, theta)
    return {"w": g["w"], "c": g["b"]}


def _bad_T(x: Any, theta: Any) -> Any:
    t = T_map(x, theta)
    return {"w": t["w"], "c": t["b"]}


def test_a_root_condition_dict_with_a_wrong_key_is_refused() -> None:
    # refused in the forward pass, where the residual is measured
    with pytest.raises(bl.StructureError, match=r"keys \['w', 'c'\]"):
        bl.implicit_root(_bad_F, init_tree("dict"), theta_tree("dict"), solver=exact_solver)


def test_a_fixed_point_map_dict_with_a_wrong_key_is_refused() -> None:
    # F(x) = T(x) - x would pair the leaves by position: T's answer is checked against x
    with pytest.raises(bl.StructureError, match=r"fixed-point map T\(x, theta\) has keys \['w', 'c'\]"):
        bl.fixed_point(_bad_T, init_tree("dict"), theta_tree("dict"), solver=exact_solver)


@pytest.mark.parametrize("which", ["implicit_root", "fixed_point"])
def test_a_condition_dict_with_a_wrong_key_is_refused_without_a_backward_pass(which: str) -> None:
    # the forward pass checks the structure of the residual it measures (and of T's answer)
    call, fn = (bl.implicit_root, _bad_F) if which == "implicit_root" else (bl.fixed_point, _bad_T)
    with torch.no_grad(), pytest.raises(bl.StructureError, match=r"keys \['w', 'c'\]"):
        call(fn, init_tree("dict"), theta_tree("dict"), solver=exact_solver)


# ----------------------------------------------------------------------------- dict leaves matched by key


def _reordered(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(reversed(list(tree.items())))


def test_a_reordered_answer_is_matched_to_init_by_key() -> None:
    """A solver may return init's keys in another order: the answer is the same tree, in init's
    order, with the same gradient (against the closed form)."""

    def reordered_solver(objective: Any, init: Any, theta: Any) -> Any:
        return _reordered(exact_solver(objective, init, theta))

    phi, theta, _ = run_argmin("dict", reordered_solver)
    assert_structure(phi, "dict")
    torch.testing.assert_close(flat(phi).detach(), Z_STAR, rtol=0, atol=1e-12)
    gy, glam = hypergrads(theta)
    torch.testing.assert_close(glam, DLAM, rtol=0, atol=1e-8)
    torch.testing.assert_close(gy, DY, rtol=0, atol=1e-8)


def test_reordered_conditions_maps_and_hvps_are_matched_by_key() -> None:
    """F, T and a user hvp may return x's keys in another order: paired by key, the closed form."""

    def F(x: Any, theta: Any) -> Any:
        return _reordered(grad_G(x, theta))

    def Tm(x: Any, theta: Any) -> Any:
        return _reordered(T_map(x, theta))

    def solve_T(Tf: Any, init: Any, theta: Any) -> Any:
        return iterate_T(T_map, init, theta)

    def hvp(phi: Any, theta: Any, v: Any) -> Any:
        with torch.enable_grad():
            p = {k: t.detach().requires_grad_(True) for k, t in phi.items()}
            g = grad_G(p, theta)
            hv = torch.autograd.grad([g["w"], g["b"]], [p["w"], p["b"]], [v["w"], v["b"]])
        return {"b": hv[1], "w": hv[0]}

    runs = {
        "root": lambda th: bl.implicit_root(
            F, init_tree("dict"), th, solver=exact_solver, optimality_tol=1e-9
        ),
        "fixed_point": lambda th: bl.fixed_point(
            Tm, init_tree("dict"), th, solver=solve_T, optimality_tol=1e-9
        ),
        "hvp": lambda th: bl.implicit_argmin(G, init_tree("dict"), th, solver=exact_solver, hvp=hvp),
    }
    for name, run in runs.items():
        theta = theta_tree("dict")
        phi = run(theta)
        outer(phi).backward()
        assert_structure(phi, "dict")
        torch.testing.assert_close(flat(phi).detach(), Z_STAR, rtol=0, atol=1e-9, msg=name)
        gy, glam = hypergrads(theta)
        torch.testing.assert_close(glam, DLAM, rtol=0, atol=1e-7, msg=name)
        torch.testing.assert_close(gy, DY, rtol=0, atol=1e-7, msg=name)


def test_tree_operations_pair_dict_leaves_by_key() -> None:
    a, b = _batched_tree("dict", 0), _batched_tree("dict", 1)
    rb = _reordered(b)
    assert list(rb) != list(b)
    s = torch.tensor([0.5, -2.0, 3.0], dtype=D)
    # references written key by key
    summed = {k: a[k] + b[k] for k in a}
    dot = sum((a[k] * b[k]).sum() for k in a)
    bdot = sum((a[k] * b[k]).reshape(B, -1).sum(1) for k in a)
    for other in (b, rb):
        out = T.tree_map(torch.add, a, other)
        assert list(out) == list(a)
        for k in a:
            torch.testing.assert_close(out[k], summed[k], rtol=0, atol=0)
        torch.testing.assert_close(T.tree_dot(a, other), dot, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(T.batch_dot(a, other), bdot, rtol=1e-14, atol=1e-14)
        axpy = T.batch_axpy(a, s, other)
        assert list(axpy) == list(a)
        for k in a:
            torch.testing.assert_close(
                axpy[k], a[k] + s.view(-1, *[1] * (a[k].ndim - 1)) * b[k], rtol=0, atol=0
            )
    # against a like: the like's key order, the flat layout of matched trees unchanged
    torch.testing.assert_close(T.ravel(rb, like=b), T.ravel(b), rtol=0, atol=0)
    assert T.ravel(a, like=a).equal(T.ravel(a))
    back = T.unravel_like(T.ravel(rb, like=b), b)
    assert list(back) == list(b)
    assert_trees_close(back, b, 0.0)
    re_keyed = T.aligned(rb, b, "rb", "b")
    assert list(re_keyed) == list(b) and all(re_keyed[k] is b[k] for k in b)  # type: ignore[index]
    assert T.aligned(b, b, "b", "b") is b


def test_mismatched_keys_structures_and_sizes_name_the_key() -> None:
    a, b = _batched_tree("dict", 0), _batched_tree("dict", 1)
    other_key = {**{k: v for k, v in b.items() if k != "m"}, "q": b["m"]}
    for fn in (T.tree_dot, T.batch_dot, lambda x, y: T.tree_map(torch.add, x, y)):
        with pytest.raises(bl.StructureError, match=r"key 'm' of .* is missing"):
            fn(a, other_key)
        with pytest.raises(bl.StructureError, match=r"is a tuple but .* is a dict"):
            fn(a, tuple(b.values()))
    with pytest.raises(bl.StructureError, match=r"has key 'q', which a lacks"):
        T.batch_axpy(a, torch.ones(B, dtype=D), {**b, "q": b["m"]})
    with pytest.raises(bl.StructureError, match=r"rest\[0\] has 2 tensors but tree has 3"):
        T.tree_map(torch.add, tuple(a.values()), tuple(b.values())[:2])
    # shapes that would broadcast silently
    short = {**b, "z": b["z"][:1]}
    with pytest.raises(bl.StructureError, match=r"b\['z'\] has shape \(1, 3\) but a\['z'\] has \(3, 3\)"):
        T.tree_dot(a, short)
    with pytest.raises(bl.StructureError, match=r"b\['z'\] has shape \(1, 3\) but a\['z'\] has \(3, 3\)"):
        T.batch_dot(a, short)
    with pytest.raises(bl.StructureError, match=r"s of shape \(2,\) for the leaf\['z'\] of leading size 3"):
        T.batch_scale(torch.ones(2, dtype=D), a)
    # batched leaves of different leading sizes: (4, 3) and (2, 6) would reshape to (4, 3) silently
    uneven = {"u": torch.zeros(4, 3, dtype=D), "v": torch.zeros(2, 6, dtype=D)}
    for fn2 in (T.ravel_batch, T.batch_norm, T.batch_norm_sq, lambda t: T.finite_problems(t)[0]):
        with pytest.raises(bl.StructureError, match=r"\['v'\] has leading size 2 but .*\['u'\] has 4"):
            fn2(uneven)
    with pytest.raises(bl.StructureError, match=r"X has 2 rows but like has leading size 3"):
        T.unravel_batch(torch.zeros(2, T.ravel_batch(a).shape[1], dtype=D), a)
    with pytest.raises(
        bl.StructureError, match=r"unravel_like: got a tensor of shape \(5,\); expected \(n,\)"
    ):
        T.unravel_like(torch.zeros(5, dtype=D), a)
    with pytest.raises(bl.StructureError, match=r"unravel_rows: got a tensor of shape \(3, 5\)"):
        T.unravel_rows(torch.zeros(3, 5, dtype=D), {k: v[0] for k, v in a.items()})
    with pytest.raises(
        bl.StructureError, match=r"tree\['m'\] has shape \(3, 4\) but like\['m'\] has \(3, 2, 2\)"
    ):
        T.ravel({**a, "m": a["m"].reshape(B, 4)}, like=a)
    # check_like: by key, and in like's order (its callers pair leaves by position)
    with pytest.raises(
        bl.StructureError, match=r"same keys in another order \(position 0 holds 'm', b has 'z'"
    ):
        T.check_like(_reordered(a), b, "x", "b")
    with pytest.raises(bl.StructureError, match=r"x\['a'\] has dtype torch.float32"):
        T.aligned({**a, "a": a["a"].float()}, b, "x", "b")


def test_batched_check_finite_names_the_problems() -> None:
    a = _batched_tree("dict", 0)
    T.check_finite(a, "x", batched=True)  # finite: no error
    bad = {k: v.clone() for k, v in a.items()}
    bad["m"][2, 1, 0] = float("nan")
    with pytest.raises(
        bl.NonFiniteError, match=r"x\['m'\] contains NaN or infinity in problem\(s\) \[2\] of the batch"
    ):
        T.check_finite(bad, "x", batched=True)
    rows, per_leaf = T.finite_problems(bad)
    assert rows.tolist() == [True, True, False]
    assert per_leaf.tolist() == [[True] * 3, [True] * 3, [True, True, False]]


# ------------------------------------------------------------------------ packed trees


def test_pack_lays_the_leaves_back_to_back_and_packed_ravel_reads_them_in_place() -> None:
    tree = {"w": torch.randn(3, 4, dtype=D), "b": torch.randn(4, dtype=D), "s": torch.tensor(2.0, dtype=D)}
    packed = T.pack(tree)
    assert list(packed) == list(tree)
    for k in tree:
        assert torch.equal(packed[k], tree[k]) and packed[k].shape == tree[k].shape
    flat = T.packed_ravel(packed)
    assert flat is not None and torch.equal(flat, T.ravel(tree))
    flat[0] = 7.0  # a view: the leaves see it, the tree packed from is untouched
    assert packed["w"][0, 0] == 7.0 and tree["w"][0, 0] != 7.0
    # leaves that require grad and an optimizer's in-place step keep the layout
    leaves = {k: v.requires_grad_(True) for k, v in packed.items()}
    sum((v**2).sum() for v in leaves.values()).backward()  # type: ignore[union-attr]
    torch.optim.Adam(list(leaves.values()), lr=0.1).step()
    after = T.packed_ravel(leaves)
    assert after is not None and not after.requires_grad
    assert torch.equal(after, torch.cat([v.detach().reshape(-1) for v in leaves.values()]))


def test_packed_ravel_is_none_unless_the_leaves_lie_back_to_back_in_order() -> None:
    buf = torch.arange(20.0)
    assert T.packed_ravel({"a": torch.randn(3), "b": torch.randn(2)}) is None  # two storages
    assert T.packed_ravel((buf[5:10], buf[0:5])) is None  # out of order
    assert T.packed_ravel((buf[0:5], buf[6:10])) is None  # a gap
    assert T.packed_ravel((buf[:12].view(3, 4).t(),)) is None  # not contiguous
    assert T.packed_ravel((buf[0:4], buf[4:8].view(torch.int32))) is None  # another dtype
    assert T.packed_ravel({}) is None and T.packed_ravel(()) is None  # no leaves
    got = T.packed_ravel((buf[2:6].view(2, 2), buf[6:9]))
    assert got is not None and torch.equal(got, buf[2:9])


def test_pack_refuses_leaves_of_different_dtypes() -> None:
    with pytest.raises(TypeError, match="one dtype and device"):
        T.pack({"a": torch.zeros(2), "b": torch.zeros(2, dtype=D)})


@pytest.mark.parametrize("empty", [{}, (), []], ids=["dict", "tuple", "list"])
def test_a_tree_without_tensors_packs_as_itself_and_refuses_to_ravel(empty: Any) -> None:
    assert T.pack(empty) == empty
    with pytest.raises(bl.StructureError, match="holds no tensors"):
        T.ravel(empty)
    with pytest.raises(bl.StructureError, match="holds no tensors"):
        T.ravel(empty, dtype=D)


def test_batch_size_names_a_leaf_without_a_batch_dimension() -> None:
    assert T.batch_size({"a": torch.zeros(4, 2), "b": torch.zeros(4)}, "x") == 4
    with pytest.raises(bl.StructureError, match=r"x\[0\] is a 0-d tensor: every leaf of a batched tree"):
        T.batch_size((torch.zeros(()),), "x")
    with pytest.raises(bl.StructureError, match=r"x\['b'\] is a 0-d tensor"):
        T.batch_size({"a": torch.zeros(3), "b": torch.zeros(())}, "x")
    with pytest.raises(bl.StructureError, match=r"x\['b'\] has leading size 2 but x\['a'\] has 3"):
        T.batch_size({"a": torch.zeros(3), "b": torch.zeros(2)}, "x")
