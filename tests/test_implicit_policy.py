"""`bilevel.ImplicitPolicy`: the keywords and the value are one policy, and its guards.

References: each entry point called with the keywords and with the same policy value must give
bit-identical answers and gradients (float64, same operations); the closed form of
`problems.quadratic` / `problems.batched_quadratic` checks that both are right.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import problems as P
import pytest
import torch

import bilevel as bl
from bilevel.hyperopt import HyperProblem
from bilevel.layers import ArgminLayer, FixedPointLayer, RootLayer
from bilevel.solvers import GradientDescent, NewtonCG

D = torch.float64
FIELDS = [f.name for f in dataclasses.fields(bl.ImplicitPolicy)]


def _newton(p: P.Problem) -> Any:
    """An inner solver that reaches ||grad|| <= 1e-12 on the quadratic (float64)."""
    return NewtonCG(newton_iters=20, cg_iters=20, tol=1e-12)


def _argmin(p: P.Problem, **kw: Any) -> tuple[torch.Tensor, torch.Tensor, bl.ImplicitInfo]:
    theta = p.theta.clone().requires_grad_(True)
    phi, info = bl.implicit_argmin(p.objective, p.init, theta, _newton(p), return_info=True, **kw)
    (g,) = torch.autograd.grad(p.outer(phi), theta)
    return phi.detach(), g, info


SETTINGS: list[dict[str, Any]] = [
    {},
    dict(hvp=bl.ReverseOverReverse(), linear_solver=bl.MINRES(), optimality_tol=1e-6),
    dict(linear_solver=bl.CG(rtol=1e-12), throw=False, warn=False, backward_x0=lambda b: 0.5 * b),
    dict(hvp=bl.DenseHessian(), optimality_tol=None, measure_residual=False),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=["defaults", "oracle-minres", "cg-warm", "unmeasured"])
def test_argmin_keywords_and_value_are_identical(kw: dict[str, Any]) -> None:
    p = P.quadratic()
    x_kw, g_kw, info_kw = _argmin(p, **kw)
    x_val, g_val, info_val = _argmin(p, policy=bl.ImplicitPolicy(**kw))
    torch.testing.assert_close(x_val, x_kw, rtol=0, atol=0)
    torch.testing.assert_close(g_val, g_kw, rtol=0, atol=0)
    assert info_val.residual_norm == info_kw.residual_norm or math.isnan(info_kw.residual_norm)
    assert info_val.last_backward is not None and info_kw.last_backward is not None
    assert info_val.last_backward.n_matvec == info_kw.last_backward.n_matvec
    # and both are right: the closed-form hypergradient
    torch.testing.assert_close(g_val, p.hypergrad, rtol=0, atol=1e-8)


def test_batched_keywords_and_value_are_identical() -> None:
    q = P.batched_quadratic()
    solver = GradientDescent(lr=1 / q.L, max_iter=20_000, tol=1e-11, batched=True)
    kw = dict(batched=True, linear_solver=bl.CG(rtol=1e-12), optimality_tol=1e-8)
    grads = []
    for call in (kw, dict(policy=bl.ImplicitPolicy(**kw))):  # type: ignore[arg-type]
        theta = q.theta.clone().requires_grad_(True)
        phi = bl.implicit_argmin(q.per_problem, torch.zeros_like(q.theta), theta, solver, **call)
        grads.append(torch.autograd.grad(q.outer(phi), theta)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], q.hypergrad, rtol=0, atol=1e-8)


def _root(fn: Any, **kw: Any) -> torch.Tensor:
    """x = theta / 2 as the root of F(x, theta) = 2x - theta (and the fixed point of T = x - F / 4)."""
    theta = torch.tensor([1.0, -2.0, 3.0], dtype=D, requires_grad=True)
    solver = lambda f, init, th: th / 2  # noqa: E731
    if fn is bl.fixed_point:
        x = fn(lambda x, th: x - (2 * x - th) / 4, torch.zeros(3, dtype=D), theta, solver, **kw)
    else:
        x = fn(lambda x, th: 2 * x - th, torch.zeros(3, dtype=D), theta, solver, **kw)
    (g,) = torch.autograd.grad((x * torch.arange(3, dtype=D)).sum(), theta)
    return g


@pytest.mark.parametrize("fn", [bl.implicit_root, bl.fixed_point])
def test_root_keywords_and_value_are_identical(fn: Any) -> None:
    kw = dict(linear_solver=bl.GMRES(rtol=1e-12), optimality_tol=1e-9, throw=True)
    g_kw = _root(fn, **kw)
    g_val = _root(fn, policy=bl.ImplicitPolicy(**kw))  # type: ignore[arg-type]
    torch.testing.assert_close(g_val, g_kw, rtol=0, atol=0)
    torch.testing.assert_close(g_val, torch.arange(3, dtype=D) / 2, rtol=0, atol=1e-12)


def test_layers_and_hyperproblem_take_the_value() -> None:
    p = P.quadratic()
    kw = dict(linear_solver=bl.CG(rtol=1e-12), optimality_tol=1e-6, throw=True)
    pol = bl.ImplicitPolicy(**kw)  # type: ignore[arg-type]
    grads = []
    layers = [
        ArgminLayer(p.objective, _newton(p), p.init, **kw),
        ArgminLayer(p.objective, _newton(p), p.init, policy=pol),
    ]  # type: ignore[arg-type]
    for layer in layers:
        theta = p.theta.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(p.outer(layer(theta)), theta)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert ArgminLayer(p.objective, _newton(p), p.init, **kw).policy == pol  # type: ignore[arg-type]
    assert (
        RootLayer(lambda x, t: x - t, lambda f, i, t: t, linear_solver=bl.GMRES()).policy.linear_solver
        == bl.GMRES()
    )
    hp_kw = HyperProblem(p.objective, lambda phi, th: p.outer(phi), _newton(p), **kw)  # type: ignore[arg-type]
    hp_val = HyperProblem(p.objective, lambda phi, th: p.outer(phi), _newton(p), policy=pol)
    assert hp_kw.policy == hp_val.policy == pol
    losses = []
    for hp in (hp_kw, hp_val):
        theta = p.theta.clone().requires_grad_(True)
        ev = hp.evaluate(theta, p.init)
        losses.append(torch.autograd.grad(ev.loss, theta)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    # a variant of a problem: replace its policy
    loose = dataclasses.replace(hp_val, policy=pol.replace(throw=False))
    assert loose.policy.throw is False and loose.solver is hp_val.solver


def test_defaults_and_docstring() -> None:
    pol = bl.ImplicitPolicy()
    assert (pol.hvp, pol.linear_solver, pol.optimality_tol, pol.throw) == (None, None, 1e-3, True)
    assert (pol.warn, pol.measure_residual, pol.backward_x0, pol.batched) == (True, True, None, False)
    doc = bl.ImplicitPolicy.__doc__ or ""
    for name in FIELDS:
        assert f"\n        {name}: " in doc, f"ImplicitPolicy's docstring does not say what {name} does"
    with pytest.raises(dataclasses.FrozenInstanceError):
        pol.throw = False  # type: ignore[misc]
    # the backward system's solver and start
    assert pol.backward_solver(symmetric=True) == bl.CG()
    assert pol.backward_solver(symmetric=False) == bl.GMRES()
    assert pol.replace(linear_solver=bl.MINRES()).backward_solver(symmetric=True) == bl.MINRES()
    b = torch.ones(3, dtype=D)
    assert pol.backward_start(b) is None
    torch.testing.assert_close(pol.replace(backward_x0=lambda r: 2 * r).backward_start(b), 2 * b)
    assert pol.replace(backward_x0=b).backward_start(torch.zeros(3, dtype=D)) is b


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        (dict(optimality_tol=-1.0), ValueError, r"ImplicitPolicy\(optimality_tol=-1.0\): must be >= 0"),
        (dict(optimality_tol=math.nan), ValueError, r"optimality_tol=nan"),
        (dict(optimality_tol="1e-3"), TypeError, r"optimality_tol='1e-3'.*number or None"),
        (dict(throw=1), TypeError, r"throw=1\): throw must be True or False"),
        (dict(batched=None), TypeError, r"batched=None"),
        (dict(warn="no"), TypeError, r"warn='no'"),
        (dict(measure_residual=False), ValueError, r"measure_residual=False.*optimality_tol=None"),
        (dict(linear_solver=bl.CG), TypeError, r"linear_solver=CG\): a class; pass an instance"),
        (dict(linear_solver=3), TypeError, r"linear_solver=3\): expected a callable"),
        (dict(hvp=bl.ReverseOverReverse), TypeError, r"hvp=ReverseOverReverse\): a class"),
        (dict(hvp=3), TypeError, r"expected None, an HVP oracle"),
        (dict(backward_x0="zeros"), TypeError, r"backward_x0='zeros'"),
    ],
)
def test_bad_fields_are_refused(fields: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        bl.ImplicitPolicy(**fields)
    with pytest.raises(error, match=match):
        bl.ImplicitPolicy().replace(**fields)
    p = P.quadratic()
    with pytest.raises(error, match="implicit_argmin: .*" + match):
        bl.implicit_argmin(p.objective, p.init, p.theta, _newton(p), **fields)


def test_a_keyword_next_to_the_value_is_refused() -> None:
    p = P.quadratic()
    pol = bl.ImplicitPolicy(throw=False)
    match = r"got policy= and the keyword\(s\) optimality_tol, throw.*policy\.replace"
    with pytest.raises(TypeError, match="implicit_argmin: " + match):
        bl.implicit_argmin(
            p.objective, p.init, p.theta, _newton(p), policy=pol, throw=True, optimality_tol=1.0
        )
    # the keyword's default value counts as given, too: two sources for one setting
    with pytest.raises(TypeError, match=r"keyword\(s\) hvp"):
        bl.implicit_argmin(p.objective, p.init, p.theta, _newton(p), None, policy=pol)
    with pytest.raises(TypeError, match=r"implicit_root: got policy= and the keyword\(s\) batched"):
        bl.implicit_root(lambda x, t: x - t, p.init, p.theta, lambda f, i, t: t, policy=pol, batched=False)
    with pytest.raises(TypeError, match=r"fixed_point: got policy="):
        bl.fixed_point(lambda x, t: t, p.init, p.theta, lambda f, i, t: t, policy=pol, warn=False)
    with pytest.raises(TypeError, match=r"ArgminLayer: got policy="):
        ArgminLayer(p.objective, _newton(p), policy=pol, linear_solver=bl.CG())
    with pytest.raises(TypeError, match=r"FixedPointLayer: got policy="):
        FixedPointLayer(lambda x, t: t, lambda f, i, t: t, policy=pol, throw=True)
    with pytest.raises(TypeError, match=r"HyperProblem: got policy="):
        HyperProblem(p.objective, lambda phi, th: p.outer(phi), _newton(p), policy=pol, optimality_tol=None)
    with pytest.raises(TypeError, match=r"HyperProblem: got policy="):
        hp = HyperProblem(p.objective, lambda phi, th: p.outer(phi), _newton(p))
        dataclasses.replace(hp, throw=False)
    with pytest.raises(
        TypeError, match=r"implicit_argmin\(policy=\{'throw': False\}\): expected a bilevel\.ImplicitPolicy"
    ):
        bl.implicit_argmin(p.objective, p.init, p.theta, _newton(p), policy={"throw": False})  # type: ignore[arg-type]


def test_a_root_refuses_hvp_and_an_unmeasured_residual() -> None:
    p = P.quadratic()
    F = lambda x, t: x - t  # noqa: E731
    solver = lambda f, i, t: t  # noqa: E731
    with pytest.raises(ValueError, match=r"implicit_root: the policy has hvp=.*leave hvp=None"):
        bl.implicit_root(F, p.init, p.theta, solver, policy=bl.ImplicitPolicy(hvp=bl.DenseHessian()))
    unmeasured = bl.ImplicitPolicy(measure_residual=False, optimality_tol=None)
    with pytest.raises(ValueError, match=r"fixed_point: the policy has measure_residual=False"):
        bl.fixed_point(F, p.init, p.theta, solver, policy=unmeasured)
    with pytest.raises(ValueError, match=r"RootLayer: the policy has hvp="):
        RootLayer(F, solver, policy=bl.ImplicitPolicy(hvp=bl.DenseHessian()))
