"""The module API (`bilevel.metalearn.learner`) against `meta_gradient` and `adapt`, and in training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl
from bilevel.metalearn import (
    FOMAML,
    IMAML,
    MAML,
    AdaptedModel,
    MetaLearner,
    Reptile,
    SinusoidTasks,
    Task,
    adapt,
    make_algorithm,
    make_functional,
    meta_gradient,
    mse,
)
from bilevel.metalearn.models import MLP, omniglot_cnn, sinusoid_mlp
from bilevel.solvers import GradientDescent, NewtonCG, StepHalving

D = torch.float64
B = 3

# Every learner with a small inner loop (float64, so the comparisons can be tight).
LEARNERS = {
    "imaml": lambda m, **kw: IMAML(
        m, lam=5.0, inner=GradientDescent(lr=0.05, max_iter=4, tol=0.0), cg_iters=3, **kw
    ),
    "imaml-hf": lambda m, **kw: IMAML(
        m, lam=5.0, inner=NewtonCG(newton_iters=2, cg_iters=3), cg_iters=3, **kw
    ),
    "maml": lambda m, **kw: MAML(m, inner=GradientDescent(lr=0.05, max_iter=3, tol=0.0), **kw),
    "fomaml": lambda m, **kw: FOMAML(m, inner=GradientDescent(lr=0.05, max_iter=3, tol=0.0), **kw),
    "reptile": lambda m, **kw: Reptile(m, inner=GradientDescent(lr=0.05, max_iter=3, tol=0.0), **kw),
}


def images(seed: int, ways: int = 3, shots: int = 2, queries: int = 2) -> Task:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(B, ways * shots, 1, 8, 8, generator=g, dtype=D)
    qx = torch.rand(B, ways * queries, 1, 8, 8, generator=g, dtype=D)
    sy = torch.arange(ways).repeat_interleave(shots).expand(B, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(B, -1).contiguous()
    return Task(sx, sy, qx, qy)


def waves(seed: int) -> Task:
    """Regression tasks with targets of shape (B, K): one number per point, no trailing 1."""
    t = SinusoidTasks(4, 5, seed=seed, dtype=D).meta_batch(0, B)
    return Task(t.support_x, t.support_y[..., 0], t.query_x, t.query_y[..., 0])


def blobs(n_tasks: int, seed: int, ways: int = 3, shots: int = 5, queries: int = 5, d: int = 4) -> Task:
    """Gaussian-blob classification: class means N(0, 4 I) drawn per task, points around them."""
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(n_tasks, ways, 1, d, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = means + 0.7 * torch.randn(n_tasks, ways, n, d, generator=g)
        y = torch.arange(ways).repeat_interleave(n).expand(n_tasks, -1).contiguous()
        return x.reshape(n_tasks, ways * n, d), y

    (sx, sy), (qx, qy) = draw(shots), draw(queries)
    return Task(sx, sy, qx, qy)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return omniglot_cnn(3, hidden=2, image_size=8).to(D)


def mlp() -> nn.Module:
    """A plain nn.Sequential: no batched structure, so the learner runs it under vmap."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(D)


PROBLEMS = {
    "classification-cnn": (cnn, images, F.cross_entropy, lambda y: y, True),
    "regression-sequential": (mlp, waves, mse, lambda y: y.unsqueeze(-1), False),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_step_grad_equals_meta_gradient(name: str, problem: str) -> None:
    """.grad after step = meta_gradient of the same theta and tasks (float64), for every algorithm."""
    make_model, make_tasks, loss, as_target, classification = PROBLEMS[problem]
    model = make_model()
    learner = LEARNERS[name](model)
    batch = make_tasks(1)
    fn, theta = make_functional(model)
    # The reference: the engine called directly, with (B, K, 1) regression targets.
    ref_batch = Task(batch.support_x, as_target(batch.support_y), batch.query_x, as_target(batch.query_y))
    g, _, stats = meta_gradient(learner.algorithm, fn, loss, theta, ref_batch, classification=classification)
    out, st = learner.step(batch, return_stats=True)
    for n, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g[n], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out, stats.query_loss.mean(), rtol=1e-10, atol=0)
    assert out.ndim == 0 and not out.requires_grad
    assert torch.isnan(st.query_acc).all() != classification
    # .grad accumulates, like autograd: a second step (same tasks) doubles it
    learner.step(batch)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * g[n], rtol=1e-8, atol=1e-12)


def test_list_of_tasks_equals_stacked_batch() -> None:
    batch = images(2)
    a, b = cnn(), cnn()
    FOMAML(a, inner=GradientDescent(lr=0.05, max_iter=2, tol=0.0)).step(batch)
    FOMAML(b, inner=GradientDescent(lr=0.05, max_iter=2, tol=0.0)).step(
        [Task(*(t[i] for t in batch)) for i in range(B)]
    )
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-12, atol=1e-14)


def test_any_meta_algorithm_and_explicit_loss() -> None:
    """MetaLearner takes any MetaAlgorithm; loss= replaces cross-entropy / MSE."""
    model = cnn()
    algo = make_algorithm("imaml-gd", inner_steps=3, inner_lr=0.05, lam=5.0, cg_iters=2)
    learner = MetaLearner(model, algo, loss=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1))
    batch = images(3)
    fn, theta = make_functional(model)
    g, _, _ = meta_gradient(
        algo, fn, lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1), theta, batch
    )
    learner.step(batch)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g[n], rtol=1e-8, atol=1e-12)


def test_adapt_equals_engine_adapt_and_evaluate() -> None:
    model = cnn()
    learner = IMAML(model, lam=5.0, inner=GradientDescent(lr=0.05, max_iter=4, tol=0.0))
    batch = images(4)
    fn, theta = make_functional(model)
    phi = adapt(learner.algorithm, fn, F.cross_entropy, theta, batch.support_x, batch.support_y)
    adapted = learner.adapt(batch)
    assert isinstance(adapted, AdaptedModel) and len(adapted) == B
    for n in phi:
        torch.testing.assert_close(adapted.params[n], phi[n], rtol=1e-10, atol=1e-12)
    out = adapted(batch.query_x)
    ref = torch.stack([fn({k: v[i] for k, v in phi.items()}, batch.query_x[i]) for i in range(B)])
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(adapted.task(1)(batch.query_x[1]), ref[1], rtol=1e-8, atol=1e-10)
    res = learner.evaluate(batch)
    torch.testing.assert_close(res.predictions, ref, rtol=1e-8, atol=1e-10)
    acc = (ref.argmax(-1) == batch.query_y).double().mean(-1)
    torch.testing.assert_close(res.query_acc.double(), acc)
    # a different inner solver at adaptation time (more steps, as MAML does at test time)
    longer = learner.adapt(batch, inner=GradientDescent(lr=0.05, max_iter=8, tol=0.0))
    assert not torch.allclose(longer.params["head.bias"], adapted.params["head.bias"])
    assert "3 tasks" in repr(adapted)


def test_frozen_parameters_are_neither_adapted_nor_given_a_gradient() -> None:
    model = cnn()
    model.head.bias.requires_grad_(False)
    learner = FOMAML(model, inner=GradientDescent(lr=0.05, max_iter=2, tol=0.0))
    batch = images(5)
    learner.step(batch)
    assert model.head.bias.grad is None
    assert "head.bias" not in learner.adapt(batch).params
    # the reference: the engine with head.bias a constant of the model function
    fn, theta = make_functional(model)
    del theta["head.bias"]
    g, _, _ = meta_gradient(learner.algorithm, fn, F.cross_entropy, theta, batch)
    torch.testing.assert_close(model.head.weight.grad, g["head.weight"], rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------------ training
def test_regression_trains_and_improves() -> None:
    """20 Adam steps of iMAML on sinusoids lower the post-adaptation test MSE."""
    torch.manual_seed(0)
    model = sinusoid_mlp()
    learner = IMAML(model, lam=20.0, inner=GradientDescent(lr=0.02, max_iter=5, tol=0.0), cg_iters=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tasks = SinusoidTasks(5, 10, seed=0)
    test = tasks.fixed_batch(range(100))
    before = learner.evaluate(test)
    losses = []
    for step in range(20):
        opt.zero_grad()
        losses.append(float(learner.step(tasks.meta_batch(step, 10))))
        opt.step()
    after = learner.evaluate(test)
    assert math.isnan(after.mean_accuracy)
    assert after.mean_loss < 0.9 * before.mean_loss, (before.mean_loss, after.mean_loss)
    assert all(math.isfinite(v) for v in losses)


def test_classification_trains_and_improves() -> None:
    """20 Adam steps of MAML on Gaussian-blob tasks raise post-adaptation accuracy and lower the loss."""
    torch.manual_seed(0)
    model = MLP(4, (32,), 3)
    learner = MAML(model, inner=GradientDescent(lr=0.1, max_iter=5, tol=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    test = blobs(100, 12345)
    before = learner.evaluate(test)
    for step in range(20):
        opt.zero_grad()
        learner.step(blobs(8, step))
        opt.step()
    after = learner.evaluate(test)
    assert after.mean_loss < 0.8 * before.mean_loss, (before.mean_loss, after.mean_loss)
    assert after.mean_accuracy > before.mean_accuracy + 1.0, (before.mean_accuracy, after.mean_accuracy)


# ------------------------------------------------------------------------------------------ errors
def test_task_type_mismatch_is_refused() -> None:
    model = cnn()
    batch = images(6)
    with pytest.raises(ValueError, match=r"task_type='regression' but support_y is torch.int64"):
        FOMAML(model, task_type="regression").step(batch)
    with pytest.raises(ValueError, match=r"task_type='classification' but support_y is torch.float64"):
        FOMAML(mlp(), task_type="classification").step(waves(0))
    with pytest.raises(ValueError, match="task_type='multilabel'"):
        FOMAML(model, task_type="multilabel")  # type: ignore[arg-type]
    mixed = Task(batch.support_x, batch.support_y, batch.query_x, batch.query_y.double())
    with pytest.raises(ValueError, match=r"query_y is torch.float64"):
        FOMAML(model).step(mixed)
    boolean = Task(batch.support_x, batch.support_y.bool(), batch.query_x, batch.query_y.bool())
    with pytest.raises(TypeError, match=r"support_y is torch.bool"):
        FOMAML(model).step(boolean)


def test_bad_batches_are_refused() -> None:
    learner = FOMAML(cnn())
    batch = images(7)
    with pytest.raises(ValueError, match="leading task"):
        learner.step(Task(*(t[0] for t in batch)))
    with pytest.raises(ValueError, match=r"float32 but the model's parameters are torch.float64"):
        learner.step(Task(batch.support_x.float(), batch.support_y, batch.query_x.float(), batch.query_y))
    with pytest.raises(TypeError, match="list of Tasks"):
        learner.step([batch.support_x])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="different shapes"):
        learner.step([Task(*(t[0] for t in batch)), Task(*(t[0] for t in images(1, shots=1)))])
    with pytest.raises(ValueError, match="disagree"):
        learner.step(Task(batch.support_x, batch.support_y[:, :2], batch.query_x, batch.query_y))


def test_model_outputs_that_do_not_fit_the_targets_are_refused() -> None:
    torch.manual_seed(0)
    two = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    with pytest.raises(ValueError, match=r"regression: the model returned \(4, 2\) for targets \(4,\)"):
        FOMAML(two).step(waves(0))
    wrong = Task(*(t for t in images(8)[:1]), images(8).support_y.unsqueeze(-1), *images(8)[2:])
    with pytest.raises(ValueError, match="expected logits"):
        FOMAML(cnn()).step(Task(wrong.support_x, wrong.support_y, wrong.query_x, wrong.query_y.unsqueeze(-1)))


def test_bad_models_are_refused() -> None:
    with pytest.raises(ValueError, match="track_running_stats=False"):
        FOMAML(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    with pytest.raises(TypeError, match=r"torch.nn.Module"):
        FOMAML(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no parameters"):
        FOMAML(nn.ReLU())
    with pytest.raises(ValueError, match="line_search=None"):
        MAML(mlp(), inner=GradientDescent(lr=0.1, max_iter=16, tol=0.0, line_search=StepHalving()))
    with pytest.raises(TypeError, match=r"MAML\(inner=NewtonCG.*expected an instance of GradientDescent"):
        MAML(mlp(), inner=NewtonCG())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"IMAML\(lam=0.0\): lam must be > 0"):
        IMAML(mlp(), lam=0.0)
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to learn"):
        FOMAML(model).step(waves(0))


def test_diverging_inner_loop_raises() -> None:
    with pytest.raises(bl.NonFiniteError, match="inner"):
        FOMAML(mlp(), inner=GradientDescent(lr=1e6, max_iter=50, tol=0.0)).step(waves(0))


def test_repr_is_short() -> None:
    r = repr(IMAML(cnn(), lam=3.0, cg_iters=4))
    assert r.startswith("IMAML(model=ConvNet (") and "lam=3.0" in r and "cg_iters=4" in r and len(r) < 300


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_cuda_equals_cpu(name: str) -> None:
    """CPU tasks, CUDA model: tasks are moved; the gradients equal the CPU ones (float64)."""
    cpu, gpu = cnn(), cnn().cuda()
    batch = images(9)
    LEARNERS[name](cpu).step(batch)
    loss = LEARNERS[name](gpu).step(batch)
    assert loss.device.type == "cuda"
    for pc, pg in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-6, atol=1e-9)
    adapted = LEARNERS[name](gpu).adapt(batch)
    assert adapted(batch.query_x.cuda()).device.type == "cuda"
