"""ANIL and Meta-SGD against autograd through their unrolled paths, written out here independently.

ANIL's meta-gradient is MAML's with the body frozen in the inner loop (a per-task loop over the
module's functional form, GD on the head only); Meta-SGD's is autograd through GD with a step
size per parameter entry, in theta and in the step sizes.  Every engine (vmap, loop, the batched
model) gives the same numbers; both run through the command line, the module API and a checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from torch import nn

import bilevel as bl
from bilevel.metalearn import (
    ALGORITHMS,
    ANIL,
    HeadOnly,
    LearnedSteps,
    MetaSGD,
    TrainConfig,
    build_experiment,
    evaluate_fixed,
    load_checkpoint,
    load_run,
    make_algorithm,
    meta_gradient,
    predict_batch,
)
from bilevel.metalearn.algorithms import evaluate_batch
from bilevel.metalearn.batched import batched_model
from bilevel.metalearn.models import make_functional, mse, omniglot_cnn, sinusoid_mlp
from bilevel.metalearn.tasks import Task
from bilevel.metalearn.training.config import ConfigError

D = torch.float64
WAYS, SHOTS, QUERIES, B = 3, 2, 2, 3
CNN = omniglot_cnn(WAYS, hidden=2, image_size=8)
MLP_ = sinusoid_mlp((5, 4))

# vmap of the per-task function, a loop over the tasks, and the model's structure (grouped convolutions)
ENGINES = [(None, True), (None, False), ("structure", True)]
ENGINE_IDS = ["vmap", "loop", "structure"]


def _images(seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(B, WAYS * SHOTS, 1, 8, 8, generator=g, dtype=D)
    qx = torch.rand(B, WAYS * QUERIES, 1, 8, 8, generator=g, dtype=D)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(B, -1).contiguous()
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(B, -1).contiguous()
    return Task(sx, sy, qx, qy)


def _sines(seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)
    sx, qx = (
        torch.rand(B, 5, 1, generator=g, dtype=D) * 4 - 2,
        torch.rand(B, 6, 1, generator=g, dtype=D) * 4 - 2,
    )
    amp = torch.rand(B, 1, 1, generator=g, dtype=D) + 0.5
    return Task(sx, amp * torch.sin(sx), qx, amp * torch.sin(qx))


# model, task batch, loss: a classifier (ConvNet, head "head") and a regressor (MLP, head "net.fc2")
PROBLEMS = {
    "cnn": (CNN, _images(1), F.cross_entropy, "head"),
    "mlp": (MLP_, _sines(2), mse, "net.fc2"),
}


def _engine(model: nn.Module, which: str | None):  # type: ignore[no-untyped-def]
    return batched_model(model) if which == "structure" else None


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def _anil_reference(fn, theta, batch, loss, head, steps, lr):  # type: ignore[no-untyped-def]
    """Mean query loss of MAML with the inner GD on the head's parameters only, and its gradient
    in every parameter: autograd through the per-task path of the full model."""
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    heads = [k for k in th if k.startswith(head + ".")]
    total = torch.zeros((), dtype=D)
    for i in range(B):
        phi = dict(th)
        for _ in range(steps):
            s = loss(fn(phi, batch.support_x[i]), batch.support_y[i])
            gr = torch.autograd.grad(s, [phi[k] for k in heads], create_graph=True)
            phi = {**phi, **{k: phi[k] - lr * g for k, g in zip(heads, gr)}}
        total = total + loss(fn(phi, batch.query_x[i]), batch.query_y[i]) / B
    return dict(zip(th, torch.autograd.grad(total, list(th.values()))))


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize(("engine", "vectorize"), ENGINES, ids=ENGINE_IDS)
def test_anil_is_maml_with_the_body_frozen(problem: str, engine: str | None, vectorize: bool) -> None:
    model, batch, loss, head = PROBLEMS[problem]
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    algo = make_algorithm("anil", inner_steps=3, inner_lr=0.3)
    g, lam_grad, stats = meta_gradient(
        algo,
        fn,
        loss,
        theta,
        batch,
        classification=problem == "cnn",
        vectorize=vectorize,
        batched=_engine(model, engine),
    )
    ref = _anil_reference(fn, theta, batch, loss, head, 3, 0.3)
    assert lam_grad is None and list(g) == list(theta)
    torch.testing.assert_close(_flat(g), _flat(ref), rtol=1e-9, atol=1e-12)
    # the body gets a gradient through the features (not only the head)
    assert float(g[next(iter(theta))].abs().sum()) > 0
    # MAML's full inner loop is not what ANIL computes
    maml, _, _ = meta_gradient(
        make_algorithm("maml", inner_steps=3, inner_lr=0.3),
        fn,
        loss,
        theta,
        batch,
        classification=problem == "cnn",
    )
    assert not torch.allclose(_flat(maml), _flat(ref))
    # the diagnostics are the head's: ||grad G|| over the adapted coordinates, the step from theta
    assert stats.inner_grad_norm.shape == (B,) and bool(torch.isfinite(stats.inner_grad_norm).all())
    phi = _anil_phi(fn, theta, batch, loss, head, 3, 0.3)
    dist = torch.stack([torch.linalg.vector_norm(_flat(p) - _flat(theta)) for p in phi])
    torch.testing.assert_close(stats.distance, dist, rtol=1e-9, atol=1e-12)


def _anil_phi(fn, theta, batch, loss, head, steps, lr):  # type: ignore[no-untyped-def]
    """Each task's adapted parameters (body = theta, head after GD), by the full model."""
    out = []
    for i in range(B):
        phi = {k: v.clone() for k, v in theta.items()}
        for _ in range(steps):
            p = {k: v.requires_grad_(True) if k.startswith(head + ".") else v for k, v in phi.items()}
            keys = [k for k in p if k.startswith(head + ".")]
            gr = torch.autograd.grad(
                loss(fn(p, batch.support_x[i]), batch.support_y[i]), [p[k] for k in keys]
            )
            phi = {
                **{k: v.detach() for k, v in p.items()},
                **{k: p[k].detach() - lr * g for k, g in zip(keys, gr)},
            }
        out.append(phi)
    return out


@pytest.mark.parametrize(("engine", "vectorize"), ENGINES, ids=ENGINE_IDS)
def test_anil_adapts_the_head_alone_and_predicts_with_it(engine: str | None, vectorize: bool) -> None:
    model, batch, loss, head = PROBLEMS["cnn"]
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    algo = make_algorithm("anil", inner_steps=2, inner_lr=0.5)
    ql, _, out = predict_batch(
        algo, fn, loss, theta, batch, vectorize=vectorize, batched=_engine(model, engine)
    )
    for i, phi in enumerate(_anil_phi(fn, theta, batch, loss, head, 2, 0.5)):
        torch.testing.assert_close(out[i], fn(phi, batch.query_x[i]), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ql[i], loss(out[i], batch.query_y[i]))


def _steps_like(theta: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Distinct step sizes per entry in [0.05, 0.35] (a constant would not test the per-entry product)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 + 0.3 * torch.rand(v.shape, generator=g, dtype=D) for k, v in theta.items()}


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize(("engine", "vectorize"), ENGINES, ids=ENGINE_IDS)
def test_meta_sgd_step_sizes_get_autograds_gradient(
    problem: str, engine: str | None, vectorize: bool
) -> None:
    model, batch, loss, _ = PROBLEMS[problem]
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    alpha = _steps_like(theta, 3)
    algo = make_algorithm("meta-sgd", inner_steps=2, inner_lr=0.1)
    tree = {**theta, **{f"lr:{k}": v for k, v in alpha.items()}}
    g, _, _ = meta_gradient(
        algo,
        fn,
        loss,
        tree,
        batch,
        classification=problem == "cnn",
        vectorize=vectorize,
        batched=_engine(model, engine),
    )
    # the reference: per task, phi <- phi - alpha * grad, autograd in theta and alpha
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    al = {k: v.clone().requires_grad_(True) for k, v in alpha.items()}
    total = torch.zeros((), dtype=D)
    for i in range(B):
        phi = dict(th)
        for _ in range(2):
            gr = torch.autograd.grad(
                loss(fn(phi, batch.support_x[i]), batch.support_y[i]), list(phi.values()), create_graph=True
            )
            phi = {k: p - al[k] * q for (k, p), q in zip(phi.items(), gr)}
        total = total + loss(fn(phi, batch.query_x[i]), batch.query_y[i]) / B
    ref = torch.autograd.grad(total, [*th.values(), *al.values()])
    assert list(g) == list(tree)
    torch.testing.assert_close(_flat(g), torch.cat([r.reshape(-1) for r in ref]), rtol=1e-9, atol=1e-12)
    assert float(_flat({k: g[f"lr:{k}"] for k in theta}).abs().sum()) > 0


def test_meta_sgd_with_one_shared_step_size_is_maml() -> None:
    model, batch, loss, _ = PROBLEMS["cnn"]
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    algo = make_algorithm("meta-sgd", inner_steps=2, inner_lr=0.2)
    g, _, _ = meta_gradient(algo, fn, loss, {**theta, **algo.meta_parameters(theta)}, batch)
    maml, _, _ = meta_gradient(make_algorithm("maml", inner_steps=2, inner_lr=0.2), fn, loss, theta, batch)
    torch.testing.assert_close(_flat({k: g[k] for k in theta}), _flat(maml), rtol=1e-9, atol=1e-12)
    # d/dalpha of a shared step is the sum over entries: a scalar check of the step sizes' gradient
    lr_grad = sum(float(g[f"lr:{k}"].sum()) for k in theta)
    eps = 1e-6
    up = make_algorithm("maml", inner_steps=2, inner_lr=0.2 + eps)
    down = make_algorithm("maml", inner_steps=2, inner_lr=0.2 - eps)
    fd = (
        float(meta_gradient(up, fn, loss, theta, batch)[2].query_loss.mean())
        - float(meta_gradient(down, fn, loss, theta, batch)[2].query_loss.mean())
    ) / (2 * eps)
    assert math.isclose(lr_grad, fd, rel_tol=1e-6, abs_tol=1e-9)


def test_the_learners_fill_the_gradients_of_every_meta_parameter() -> None:
    torch.manual_seed(0)
    model = sinusoid_mlp((8, 8)).double()
    batch = _sines(4)
    anil = ANIL(model, inner=bl.solvers.GradientDescent(lr=0.2, max_iter=2, tol=0.0))
    assert anil.head == "net.fc2"
    anil.step(batch)
    fn, theta = make_functional(model)
    ref = _anil_reference(fn, theta, batch, mse, "net.fc2", 2, 0.2)
    torch.testing.assert_close(_flat({n: p.grad for n, p in model.named_parameters()}), _flat(ref))  # type: ignore[misc]

    model.zero_grad()
    learner = MetaSGD(model, lr=0.05, steps=1)
    assert set(learner.step_sizes) == {n for n, _ in model.named_parameters()}
    params = list(learner.parameters())
    assert len(params) == 2 * len(list(model.parameters()))
    opt = torch.optim.Adam(params, lr=1e-2)
    before = {k: v.detach().clone() for k, v in learner.step_sizes.items()}
    for step in range(3):
        opt.zero_grad()
        learner.step(_sines(10 + step))
        assert all(p.grad is not None for p in params)
        opt.step()
    assert all(not torch.equal(before[k], v) for k, v in learner.step_sizes.items())
    # adaptation uses the learned step sizes: one step phi = theta - alpha * grad
    adapted = learner.adapt(batch)
    i = 1
    th = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    gr = torch.autograd.grad(mse(fn(th, batch.support_x[i]), batch.support_y[i]), list(th.values()))
    for (k, t), q in zip(th.items(), gr):
        torch.testing.assert_close(adapted.params[k][i], t.detach() - learner.step_sizes[k].detach() * q)


SINE = ["--dataset", "sinusoid", "--meta-batch", "3", "--inner-steps", "1", "--meta-steps", "8"]
SINE += ["--log-every", "2", "--test-tasks", "6", "--eval-batch", "3", "--checkpoint-every", "0"]


def test_meta_sgd_through_the_command_line_and_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["train", "--algo", "meta-sgd", *SINE, "--inner-lr", "0.02", "--meta-lr", "0.01", "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    assert "GD steps of learned per-parameter step sizes from 0.02" in err
    assert "learned inner step sizes (mean per parameter): net.fc0.weight" in err
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert set(metrics["inner_lr"]) == {
        "net.fc0.weight",
        "net.fc0.bias",
        "net.fc1.weight",
        "net.fc1.bias",
        "net.fc2.weight",
        "net.fc2.bias",
    }
    assert all("inner_lr" in e for e in log)
    # the checkpoint holds the trained step sizes (Adam moved them off their start)
    ck = load_checkpoint(out / "checkpoint.pt")
    lrs = {k: v for k, v in ck["theta"].items() if k.startswith("lr:")}
    assert len(lrs) == 6 and all(not torch.allclose(v, torch.full_like(v, 0.02)) for v in lrs.values())
    assert math.isclose(
        metrics["inner_lr"]["net.fc2.bias"], float(lrs["lr:net.fc2.bias"].double().mean()), rel_tol=1e-6
    )
    # loaded, it predicts as the trained state did: the final evaluation's loss again
    run = load_run(out / "checkpoint.pt")
    assert set(run.params) == set(ck["theta"])
    code, so, err = run_cli(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--test-tasks", "6"], capsys)
    assert code == 0, err
    assert math.isclose(json.loads(so)["loss"], metrics["test_loss"], rel_tol=1e-6)
    # with the step sizes at their start, the same tasks give another loss: the round trip carries them
    fresh = {**run.params, **{k: torch.full_like(v, 0.02) for k, v in lrs.items()}}
    exp = build_experiment(run.config)
    trained = evaluate_fixed(run, exp.test_sampler, 6).summary()["loss"]
    start = evaluate_fixed(exp.run(fresh), exp.test_sampler, 6).summary()["loss"]
    assert math.isclose(trained, metrics["test_loss"], rel_tol=1e-6) and not math.isclose(
        start, trained, rel_tol=1e-6
    )


def test_anil_through_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--algo", "anil", *SINE, "--inner-lr", "0.1", "--out", str(out)], capsys)
    assert code == 0, err
    assert "on the head alone" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["test_loss"]) and metrics["meta_steps_done"] == 8
    assert "inner_lr" not in metrics
    run = load_run(out / "checkpoint.pt")
    assert isinstance(run.algorithm.meta_gradient, HeadOnly) and set(run.params) == set(
        load_checkpoint(out / "checkpoint.pt")["theta"]
    )


@pytest.mark.parametrize("algo", ["anil", "meta-sgd"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lam", "1"], "argument --lam: iMAML's proximal weight; --algo {algo} does not use it"),
        (
            ["--cg-iters", "3"],
            "argument --cg-iters: the CG steps of iMAML's meta-gradient; --algo {algo} does not use it",
        ),
        (
            ["--backtrack"],
            "argument --backtrack: inner GD.s backtracking line search; --algo {algo} does not use it",
        ),
        (["--learn-lam", "scalar"], "--algo {algo} does not use it"),
        (["--inner-solver", "nesterov"], "--algo {algo} does not use it"),
    ],
)
def test_flags_they_refuse(
    algo: str, flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run_cli(["train", "--algo", algo, *SINE, *flags, "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert re.search(message.format(algo=algo), err), err


def test_registry_entries_and_their_refusals() -> None:
    assert {"anil", "meta-sgd"} <= set(ALGORITHMS)
    assert make_algorithm("anil").meta_gradient == HeadOnly()
    assert make_algorithm("meta-sgd", inner_lr=0.4).meta_gradient == LearnedSteps(0.4)
    assert TrainConfig(algo="meta-sgd", inner_lr=0.4).algorithm() == make_algorithm("meta-sgd", inner_lr=0.4)
    with pytest.raises(
        ValueError, match="anil differentiates through a fixed inner path of the head: drop backtrack"
    ):
        make_algorithm("anil", backtrack=True)
    with pytest.raises(ConfigError, match=r"implicit iMAML algorithm .*, not meta-sgd"):
        TrainConfig(algo="meta-sgd", learn_lam="scalar")
    with pytest.raises(ConfigError, match="inner_lr"):
        TrainConfig(algo="meta-sgd", inner_lr=0.0)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_initial_step_sizes(bad: float) -> None:
    with pytest.raises(ValueError, match=r"LearnedSteps\(init_lr=.*\): init_lr must be > 0 and finite"):
        LearnedSteps(bad)
    with pytest.raises(ValueError, match=r"MetaSGD\(lr=.*\): lr must be > 0 and finite"):
        MetaSGD(sinusoid_mlp(), lr=bad)


def test_meta_sgd_guards() -> None:
    with pytest.raises(TypeError, match=r"MetaSGD\(lr='0.1'\): lr must be a number"):
        MetaSGD(sinusoid_mlp(), lr="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"MetaSGD\(steps=-1\): steps must be >= 0"):
        MetaSGD(sinusoid_mlp(), steps=-1)
    # no inner step: the step sizes would never be used, never get a gradient
    with pytest.raises(ValueError, match=r"MetaSGD\(steps=0\): Meta-SGD with 0 inner steps never uses"):
        MetaSGD(sinusoid_mlp(), steps=0)
    with pytest.raises(ConfigError, match=r"inner_steps.*Meta-SGD with 0 inner steps never uses"):
        TrainConfig(algo="meta-sgd", inner_steps=0)
    # the algorithm itself adapts with 0 steps (evaluating theta), and refuses to meta-train so
    fn, theta = make_functional(MLP_, torch.Generator().manual_seed(0), dtype=D)
    none = make_algorithm("meta-sgd", inner_steps=0)
    tree = {**theta, **none.meta_parameters(theta)}
    ql, _ = evaluate_batch(none, fn, mse, tree, _sines(0), classification=False)
    assert bool(torch.isfinite(ql).all())
    with pytest.raises(ValueError, match="Meta-SGD with 0 inner steps never uses"):
        meta_gradient(none, fn, mse, tree, _sines(0), classification=False)
    with pytest.raises(ValueError, match=r"LearnedSteps .*fixed inner path"):
        bl.metalearn.MetaAlgorithm(bl.solvers.GradientDescent(lr=0.1, tol=1e-3), LearnedSteps(0.1), 0.0)
    with pytest.raises(ValueError, match="lam must be 0"):
        bl.metalearn.MetaAlgorithm(bl.solvers.GradientDescent(lr=0.1, tol=0.0), LearnedSteps(0.1), 1.0)
    # theta without its step sizes: named, with the way to add them
    fn, theta = make_functional(MLP_, torch.Generator().manual_seed(0), dtype=D)
    with pytest.raises(
        bl.StructureError, match=r"no learned step sizes lr:'net.fc0.weight'.*meta_parameters"
    ):
        meta_gradient(make_algorithm("meta-sgd"), fn, mse, theta, _sines(0), classification=False)


def test_meta_sgd_without_inner_steps_is_refused_on_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["train", "--algo", "meta-sgd", *SINE, "--inner-steps", "0", "--out", str(tmp_path / "r")]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "Meta-SGD with 0 inner steps never uses" in err, err


def test_bad_heads() -> None:
    model = omniglot_cnn(3, hidden=2, image_size=8)
    assert ANIL(model).head == "head"
    with pytest.raises(ValueError, match=r"ANIL\(head='nope'\): is not a module of the model; .*\['head'\]"):
        ANIL(model, head="nope")
    with pytest.raises(ValueError, match=r"ANIL\(head='features.block0.conv'\): is a Conv2d"):
        ANIL(model, head="features.block0.conv")
    with pytest.raises(TypeError, match="name the head module"):
        ANIL(model, head=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"last parameter belongs to '1', not an nn.Linear"):
        ANIL(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="name the head module"):
        HeadOnly("")
    # by name at the engine: no such parameter, or not a 2-D weight
    fn, theta = make_functional(MLP_, torch.Generator().manual_seed(0), dtype=D)
    with pytest.raises(
        ValueError, match=r"ANIL\(head='net.fc9'\): the model has no learned parameter .*'net.fc0'"
    ):
        meta_gradient(
            bl.metalearn.MetaAlgorithm(
                bl.solvers.GradientDescent(lr=0.1, max_iter=1, tol=0.0), HeadOnly("net.fc9"), 0.0
            ),
            fn,
            mse,
            theta,
            _sines(0),
            classification=False,
        )


@pytest.mark.parametrize(
    ("model", "head"),
    [
        # a Linear that is not the last layer: the shapes differ
        (nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)), "0"),
        # the last Linear, followed by an activation: the values differ
        (nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1), nn.Tanh()), "2"),
    ],
)
def test_a_head_that_is_not_the_last_layer_is_refused(model: nn.Module, head: str) -> None:
    learner = ANIL(model.double(), head=head, inner=bl.solvers.GradientDescent(lr=0.1, max_iter=1, tol=0.0))
    with pytest.raises(
        bl.StructureError, match=f"ANIL\\(head='{head}'\\): .*the head must be the model's last"
    ):
        learner.step(_sines(0))


def test_presets_give_their_published_settings() -> None:
    from bilevel.metalearn.training.cli import _parser, config_from_args

    def cfg(*argv: str) -> TrainConfig:
        return config_from_args(_parser().parse_args(["train", *argv]))

    for preset in ("omniglot-5w1s", "paper-omniglot-5w1s", "omniglot-20w5s", "miniimagenet-5w1s"):
        anil, msgd = cfg("--preset", preset, "--algo", "anil"), cfg("--preset", preset, "--algo", "meta-sgd")
        assert (anil.inner_steps, anil.inner_lr, anil.meta_batch, anil.meta_lr) == (5, 0.1, 32, 1e-3)
        assert (msgd.inner_steps, msgd.inner_lr, msgd.meta_batch, msgd.meta_lr) == (1, 0.4, 32, 1e-3)
    sine = cfg("--preset", "sinusoid-5s", "--algo", "meta-sgd")
    assert (sine.dataset, sine.inner_steps, sine.inner_lr) == ("sinusoid", 1, 0.01)
    # the other algorithms keep theirs; a flag still wins
    assert cfg("--preset", "omniglot-5w1s", "--algo", "maml").inner_steps == 1
    assert cfg("--preset", "omniglot-5w1s", "--algo", "imaml-gd").inner_steps == 16
    assert cfg("--preset", "omniglot-5w1s", "--algo", "meta-sgd", "--inner-lr", "0.2").inner_lr == 0.2


def test_a_resumed_meta_sgd_run_ends_where_a_straight_one_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The step sizes and their Adam state are in the checkpoint: 4 + 4 resumed steps = 8 steps (float64)."""
    flags = [
        "train",
        "--algo",
        "meta-sgd",
        *SINE,
        "--inner-lr",
        "0.02",
        "--meta-lr",
        "0.01",
        "--dtype",
        "float64",
    ]
    flags += ["--threads", "1"]
    parts, straight = tmp_path / "parts", tmp_path / "straight"
    assert run_cli([*flags, "--meta-steps", "4", "--out", str(parts)], capsys)[0] == 0
    code, _, err = run_cli([*flags, "--meta-steps", "8", "--resume", "--out", str(parts)], capsys)
    assert code == 0 and "resuming from step 4 " in err, err
    assert run_cli([*flags, "--meta-steps", "8", "--out", str(straight)], capsys)[0] == 0
    a, b = load_checkpoint(parts / "checkpoint.pt"), load_checkpoint(straight / "checkpoint.pt")
    assert a["step"] == b["step"] == 8 and any(k.startswith("lr:") for k in a["theta"])
    for k in b["theta"]:
        torch.testing.assert_close(a["theta"][k], b["theta"][k], rtol=0, atol=0)


def test_meta_sgd_refuses_step_sizes_that_did_not_follow_the_model() -> None:
    model = sinusoid_mlp((4,))
    learner = MetaSGD(model, lr=0.1)
    model.double()  # the step sizes stay float32
    with pytest.raises(
        ValueError, match=r"MetaSGD: parameter 'net.fc0.weight' is \(4, 1\) torch.float64 .*model.to"
    ):
        learner.step(_sines(0))
