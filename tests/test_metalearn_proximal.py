"""The proximal weight lambda as a value (`bilevel.metalearn.proximal`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bilevel.metalearn import make_algorithm, make_functional, meta_gradient
from bilevel.metalearn.models import sinusoid_mlp
from bilevel.metalearn.proximal import (
    FixedLam,
    LearnedPerTensor,
    LearnedScalar,
    ProximalWeight,
    coerce,
    lam_from_config,
)
from bilevel.metalearn.tasks import Task

D = torch.float64


def _problem() -> tuple[object, dict[str, torch.Tensor], Task]:
    fn, theta = make_functional(sinusoid_mlp((6,)).double(), torch.Generator().manual_seed(0), dtype=D)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 10, 1, generator=g, dtype=D) * 4 - 2
    y = torch.sin(x) + 0.1 * torch.randn(3, 10, 1, generator=g, dtype=D)
    return fn, theta, Task(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


def test_lam_from_config_builds_the_three_kinds() -> None:
    names = ["a", "b"]
    fixed = lam_from_config("none", 2.0, names, device="cpu", dtype=D)
    assert fixed.leaves() == {} and fixed.values() is None and fixed.chain_rule({"lam": torch.ones(())}) == {}
    scalar = lam_from_config("scalar", 2.0, names, device="cpu", dtype=D)
    (leaf,) = scalar.leaves().values()
    assert list(scalar.leaves()) == ["lam"] and leaf.requires_grad and leaf.ndim == 0 and leaf.dtype == D
    assert leaf.item() == math.log(2.0) and scalar.values() == {"lam": pytest.approx(2.0, rel=1e-15)}
    per = lam_from_config("per-tensor", 0.5, names, device="cpu", dtype=torch.float32)
    assert list(per.leaves()) == names and all(v.requires_grad for v in per.leaves().values())
    assert per.values() == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}


def test_leaves_are_the_same_tensors_every_call() -> None:
    """A checkpoint restores into ``leaves()`` in place, and Adam steps them: one set of leaves."""
    lam = lam_from_config("per-tensor", 2.0, ["a", "b"], device="cpu", dtype=D)
    with torch.no_grad():
        lam.leaves()["a"].copy_(torch.tensor(0.0))
    assert lam.values() == {"a": 1.0, "b": pytest.approx(2.0, rel=1e-15)}


def test_chain_rule_is_lambda_times_the_gradient_in_lambda() -> None:
    """d/dlog(lam) = lam d/dlam, checked against autograd through exp; zeros where none is given."""
    lam = lam_from_config("per-tensor", 1.5, ["a", "b"], device="cpu", dtype=D)
    dlam = {"a": torch.tensor(0.25, dtype=D)}
    got = lam.chain_rule(dlam)
    leaf = lam.leaves()["a"]
    (want,) = torch.autograd.grad(leaf.exp() * dlam["a"], leaf)
    assert torch.equal(got["a"], want) and not got["a"].requires_grad
    assert got["b"].item() == 0.0 and got["b"].shape == ()
    assert set(lam.chain_rule(None)) == {"a", "b"}


def test_a_learned_log_lambda_gives_the_meta_gradient_of_its_lambda() -> None:
    """meta_gradient with a LearnedScalar of log lambda = meta_gradient with lambda itself, exactly."""
    fn, theta, batch = _problem()
    algo = make_algorithm("imaml-gd", inner_steps=3, inner_lr=0.05, lam=2.0, cg_iters=3)
    lam = lam_from_config("scalar", 1.5, list(theta), device="cpu", dtype=D)
    g1, l1, _ = meta_gradient(algo, fn, F.mse_loss, theta, batch, lam=lam, classification=False)  # type: ignore[arg-type]
    direct = lam.leaves()["lam"].detach().exp().requires_grad_(True)
    g2, l2, _ = meta_gradient(algo, fn, F.mse_loss, theta, batch, lam=direct, classification=False)  # type: ignore[arg-type]
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert l1 is not None and l2 is not None and torch.equal(l1["lam"], l2["lam"])


def test_the_configured_fixed_lambda_defers_to_an_algorithm_without_a_proximal_term() -> None:
    """lam_from_config("none", 2.0) leaves maml's lambda at 0; a float given by a caller overrides."""
    fn, theta, batch = _problem()
    maml = make_algorithm("fomaml", inner_steps=2, inner_lr=0.1)
    configured = lam_from_config("none", 2.0, list(theta), device="cpu", dtype=D)
    own, _, _ = meta_gradient(maml, fn, F.mse_loss, theta, batch, classification=False)  # type: ignore[arg-type]
    cfg, _, _ = meta_gradient(maml, fn, F.mse_loss, theta, batch, lam=configured, classification=False)  # type: ignore[arg-type]
    two, _, _ = meta_gradient(maml, fn, F.mse_loss, theta, batch, lam=2.0, classification=False)  # type: ignore[arg-type]
    assert all(torch.equal(own[k], cfg[k]) for k in own)
    assert not all(torch.equal(own[k], two[k]) for k in own)


def test_coerce_reads_a_callers_lambda_once() -> None:
    t = torch.tensor(2.0)
    assert coerce(2) == FixedLam(2.0) and coerce(0.5) == FixedLam(0.5)
    scalar = coerce(t)
    assert isinstance(scalar, LearnedScalar) and scalar.lam is t and ProximalWeight.coerce(t) == scalar
    per = coerce({"a": t})
    assert isinstance(per, LearnedPerTensor) and per.lam["a"] is t
    assert coerce(per) is per
    assert float(FixedLam(3.0)) == 3.0 and float(LearnedScalar(torch.tensor(0.0))) == 1.0


def test_bad_lambdas_are_refused() -> None:
    with pytest.raises(TypeError, match="lam='big'"):
        coerce("big")
    with pytest.raises(TypeError, match="lam=True"):
        coerce(True)
    with pytest.raises(ValueError, match=r"FixedLam\(value=-1.0\)"):
        FixedLam(-1.0)
    with pytest.raises(ValueError, match="0-d tensor"):
        LearnedScalar(torch.ones(2))
    with pytest.raises(ValueError, match="must be 0-d"):
        LearnedPerTensor({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="kind='log'"):
        lam_from_config("log", 1.0, ["a"], device="cpu", dtype=D)
    with pytest.raises(ValueError, match="starts > 0"):
        lam_from_config("scalar", 0.0, ["a"], device="cpu", dtype=D)
