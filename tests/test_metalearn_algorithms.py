"""Meta-gradients of the five algorithms against independent references (float64, a tiny CNN)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
from bilevel.metalearn.algorithms import (
    FirstOrder,
    Implicit,
    MetaAlgorithm,
    ReleasedCG,
    ReptileStep,
    Unrolled,
    adapt,
    evaluate_batch,
    make_algorithm,
    meta_gradient,
)
from bilevel.metalearn.batched import batched_model
from bilevel.metalearn.models import ConvNet, make_functional, mse, omniglot_cnn, sinusoid_mlp
from bilevel.metalearn.tasks import Task
from bilevel.solvers import GradientDescent, NewtonCG, StepHalving, TrustRegionNewtonCG

D = torch.float64
WAYS, SHOTS, QUERIES, B = 3, 2, 2, 3


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    model = omniglot_cnn(WAYS, hidden=2, image_size=8)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    return fn, theta, _images(1)


def _images(seed: int) -> Task:
    """B tasks of WAYS-way SHOTS-shot 8x8 random images, QUERIES queries per class."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(B, WAYS * SHOTS, 1, 8, 8, generator=g, dtype=D)
    qx = torch.rand(B, WAYS * QUERIES, 1, 8, 8, generator=g, dtype=D)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(B, -1).contiguous()
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(B, -1).contiguous()
    return Task(sx, sy, qx, qy)


def _one(batch: Task, i: int) -> Task:
    return Task(*(t[i : i + 1] for t in batch))


# The two ways the B task models run (the BatchedModel seam): vmap of the per-task function, and
# the model's structure (grouped convolutions).
ENGINES = pytest.mark.parametrize(
    "engine", [None, batched_model(omniglot_cnn(WAYS, hidden=2, image_size=8))], ids=["vmap", "structure"]
)


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


@ENGINES
def test_imaml_equals_dense_implicit_gradient(setup, engine) -> None:  # type: ignore[no-untyped-def]
    """One task: g = (I + H/lam)^-1 grad L(phi) with H the dense support-loss Hessian at phi."""
    fn, theta, batch = setup
    lam = 20.0  # large enough that I + H/lam is positive definite for this tiny net
    n = flat(theta).numel()
    algo = MetaAlgorithm(GradientDescent(lr=0.02, max_iter=60, tol=0.0), Implicit(cg_iters=4 * n), lam)
    task = _one(batch, 0)
    g, _, stats = meta_gradient(algo, fn, F.cross_entropy, theta, task, batched=engine)
    # The reference is computed at the same inner answer phi, independently of the engine.
    phi = dict(theta)
    for _ in range(60):
        gr = torch.func.grad(
            lambda p: (
                F.cross_entropy(fn(p, task.support_x[0]), task.support_y[0])
                + lam / 2 * sum(((p[k] - theta[k]) ** 2).sum() for k in p)
            )
        )(phi)
        phi = {k: phi[k] - 0.02 * gr[k] for k in phi}
    names = list(theta)
    shapes = [theta[k].shape for k in names]

    def unflat(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(
            zip(names, (c.view(s) for c, s in zip(torch.split(z, [s.numel() for s in shapes]), shapes)))
        )

    H = torch.func.hessian(lambda z: F.cross_entropy(fn(unflat(z), task.support_x[0]), task.support_y[0]))(
        flat(phi)
    )
    v = flat(torch.func.grad(lambda p: F.cross_entropy(fn(p, task.query_x[0]), task.query_y[0]))(phi))
    expected = torch.linalg.solve(torch.eye(n, dtype=D) + H / lam, v)
    assert not bool(stats.negative_curvature.any())
    torch.testing.assert_close(flat(g), expected, rtol=1e-8, atol=1e-10)


def test_imaml_engine_agrees_with_implicit_argmin(setup) -> None:  # type: ignore[no-untyped-def]
    """The batched engine and the generic layer bl.implicit_argmin give one gradient."""
    fn, theta, batch = setup
    lam, n = 20.0, flat(theta).numel()
    algo = MetaAlgorithm(GradientDescent(lr=0.02, max_iter=60, tol=0.0), Implicit(cg_iters=4 * n), lam)
    task = _one(batch, 1)
    g, _, _ = meta_gradient(algo, fn, F.cross_entropy, theta, task)
    names = list(theta)

    def G(phi, th):  # type: ignore[no-untyped-def]
        p, t = dict(zip(names, phi)), dict(zip(names, th))
        return F.cross_entropy(fn(p, task.support_x[0]), task.support_y[0]) + lam / 2 * sum(
            ((p[k] - t[k]) ** 2).sum() for k in names
        )

    def gd(obj, init, th):  # type: ignore[no-untyped-def]
        x = init
        for _ in range(60):
            with torch.enable_grad():
                gr = torch.func.grad(obj)(x, th)
            x = tuple(a - 0.02 * b for a, b in zip(x, gr))
        return x

    th = tuple(theta[k].clone().requires_grad_(True) for k in names)
    # GD has not converged on this sharp tiny net; both sides solve H_G w = v at the same phi,
    # which is what is compared, so the optimality check is off.
    phi = bl.implicit_argmin(
        G, tuple(t.detach() for t in th), th, gd, hvp=bl.ReverseOverReverse(), optimality_tol=None
    )
    loss = F.cross_entropy(fn(dict(zip(names, phi)), task.query_x[0]), task.query_y[0])
    ref = torch.autograd.grad(loss, th)
    torch.testing.assert_close(flat(g), torch.cat([r.reshape(-1) for r in ref]), rtol=1e-7, atol=1e-10)


@ENGINES
def test_maml_equals_autograd_through_the_unrolled_path(setup, engine) -> None:  # type: ignore[no-untyped-def]
    fn, theta, batch = setup
    algo = make_algorithm("maml", inner_steps=3, inner_lr=0.1)
    g, _, _ = meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=engine)
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    total = 0.0
    for i in range(B):
        phi = th
        for _ in range(3):
            loss = F.cross_entropy(fn(phi, batch.support_x[i]), batch.support_y[i])
            gr = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - 0.1 * q for (k, p), q in zip(phi.items(), gr)}
        total = total + F.cross_entropy(fn(phi, batch.query_x[i]), batch.query_y[i]) / B
    ref = torch.autograd.grad(total, list(th.values()))
    torch.testing.assert_close(flat(g), torch.cat([r.reshape(-1) for r in ref]), rtol=1e-9, atol=1e-12)


@ENGINES
def test_fomaml_is_imaml_with_zero_cg_steps(setup, engine) -> None:  # type: ignore[no-untyped-def]
    fn, theta, batch = setup
    inner = GradientDescent(lr=0.1, max_iter=5, tol=0.0)
    fo, _, _ = meta_gradient(
        MetaAlgorithm(inner, FirstOrder(), 2.0), fn, F.cross_entropy, theta, batch, batched=engine
    )
    im, _, _ = meta_gradient(
        MetaAlgorithm(inner, Implicit(cg_iters=0, warm_start=True), 2.0),
        fn,
        F.cross_entropy,
        theta,
        batch,
        batched=engine,
    )
    torch.testing.assert_close(flat(fo), flat(im), rtol=1e-12, atol=0)


@ENGINES
def test_reptile_direction_is_theta_minus_phi(setup, engine) -> None:  # type: ignore[no-untyped-def]
    fn, theta, batch = setup
    algo = MetaAlgorithm(GradientDescent(lr=0.1, max_iter=4, tol=0.0), ReptileStep(), 0.0)
    g, _, _ = meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=engine)
    phis = []
    for i in range(B):
        phi = dict(theta)
        for _ in range(4):
            gr = torch.func.grad(
                lambda p, i=i: F.cross_entropy(fn(p, batch.support_x[i]), batch.support_y[i])
            )(phi)
            phi = {k: phi[k] - 0.1 * gr[k] for k in phi}
        phis.append(flat(theta) - flat(phi))
    torch.testing.assert_close(flat(g), torch.stack(phis).mean(0), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["imaml-gd", "maml", "fomaml", "reptile", "imaml-hf"])
def test_vmap_and_loop_agree(setup, name: str) -> None:  # type: ignore[no-untyped-def]
    fn, theta, batch = setup
    algo = make_algorithm(name, inner_steps=3, inner_lr=0.1, lam=2.0, cg_iters=3)
    if name == "imaml-hf":
        algo = MetaAlgorithm(NewtonCG(newton_iters=2, cg_iters=3), Implicit(3), 2.0)
    a, _, sa = meta_gradient(algo, fn, F.cross_entropy, theta, batch, vectorize=True)
    if name == "imaml-hf":
        assert bool(torch.isfinite(flat(a)).all())
        return  # batched Newton-CG has no loop variant
    b, _, sb = meta_gradient(algo, fn, F.cross_entropy, theta, batch, vectorize=False)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sa.query_loss, sb.query_loss)


def _stats_close(sa, sb) -> None:  # type: ignore[no-untyped-def]
    for f in (
        "query_loss",
        "query_acc",
        "support_loss",
        "inner_grad_norm",
        "cg_residual",
        "cg_iters",
        "distance",
    ):
        torch.testing.assert_close(getattr(sa, f), getattr(sb, f), rtol=1e-9, atol=1e-12, equal_nan=True)
    assert torch.equal(sa.negative_curvature, sb.negative_curvature)


BATCHED_CASES = [
    ("imaml-gd", {}),
    ("imaml-gd", {"inner_tol": 0.05}),  # per-task stopping
    ("imaml-gd", {"damping": 0.5}),
    ("imaml-gd", {"backtrack": True, "inner_lr": 5.0}),  # steps rejected and halved
    ("imaml-hf", {}),
    ("fomaml", {}),
    ("reptile", {}),
    ("maml", {}),
    ("imaml-released", {"damping": 1.0}),
    ("imaml-gd", {"inner_solver": "nesterov"}),
    ("fomaml", {"inner_solver": "nesterov"}),
    ("imaml-hf", {"inner_solver": "trust-region"}),
]


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize(("name", "extra"), BATCHED_CASES)
def test_batched_models_give_the_vmap_engines_results(pool: bool, name: str, extra: dict) -> None:
    """The batched path (B models in one call, plain autograd) against the vmapped per-task engine."""
    model = ConvNet(WAYS, hidden=3, image_size=8, n_blocks=2, pool=pool, conv_bias=True)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    batch = _images(2)
    algo = make_algorithm(name, **{"inner_steps": 4, "inner_lr": 0.1, "lam": 2.0, "cg_iters": 3, **extra})
    bm = batched_model(model)
    assert bm is not None
    a, _, sa = meta_gradient(algo, fn, F.cross_entropy, theta, batch)
    b, _, sb = meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=bm)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-9, atol=1e-12)
    _stats_close(sa, sb)
    ea = evaluate_batch(algo, fn, F.cross_entropy, theta, batch)
    eb = evaluate_batch(algo, fn, F.cross_entropy, theta, batch, batched=bm)
    torch.testing.assert_close(ea, eb, rtol=1e-9, atol=1e-12)


def test_batched_mlp_and_learned_lambda_agree_with_vmap() -> None:
    """Regression (MSE, the sinusoid MLP) with one learned lam per tensor: gradients and lam gradients."""
    model = sinusoid_mlp((5, 4))
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    g = torch.Generator().manual_seed(3)
    batch = Task(*(torch.randn(4, n, 1, generator=g, dtype=D) for n in (5, 5, 7, 7)))
    lam = {k: torch.tensor(1.0 + 0.25 * i, dtype=D) for i, k in enumerate(theta)}
    algo = make_algorithm("imaml-gd", inner_steps=5, inner_lr=0.05, cg_iters=4)
    bm = batched_model(model)
    assert bm is not None
    a, la, sa = meta_gradient(algo, fn, mse, theta, batch, lam=lam, classification=False)
    b, lb, sb = meta_gradient(algo, fn, mse, theta, batch, lam=lam, classification=False, batched=bm)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-9, atol=1e-12)
    assert la is not None and lb is not None
    torch.testing.assert_close(flat(la), flat(lb), rtol=1e-9, atol=1e-13)
    _stats_close(sa, sb)


def test_learned_lambda_gradient_matches_implicit_argmin(setup) -> None:  # type: ignore[no-untyped-def]
    """dL/dlam from the engine vs bl.implicit_argmin with lam as an outer variable."""
    fn, theta, batch = setup
    n = flat(theta).numel()
    task = _one(batch, 2)
    names = list(theta)
    lam = {k: torch.tensor(20.0 + i, dtype=D) for i, k in enumerate(names)}
    algo = MetaAlgorithm(GradientDescent(lr=0.02, max_iter=60, tol=0.0), Implicit(cg_iters=4 * n), 20.0)
    _, lam_grad, _ = meta_gradient(algo, fn, F.cross_entropy, theta, task, lam=lam)

    def G(phi, lams):  # type: ignore[no-untyped-def]
        p = dict(zip(names, phi))
        return F.cross_entropy(fn(p, task.support_x[0]), task.support_y[0]) + sum(
            0.5 * lk * ((p[k] - theta[k]) ** 2).sum() for k, lk in zip(names, lams)
        )

    def gd(obj, init, th):  # type: ignore[no-untyped-def]
        x = init
        for _ in range(60):
            with torch.enable_grad():
                gr = torch.func.grad(obj)(x, th)
            x = tuple(a - 0.02 * b for a, b in zip(x, gr))
        return x

    lams = tuple(lam[k].clone().requires_grad_(True) for k in names)
    # Same phi on both sides (see above): the optimality check is off.
    phi = bl.implicit_argmin(
        G, tuple(theta[k] for k in names), lams, gd, hvp=bl.ReverseOverReverse(), optimality_tol=None
    )
    loss = F.cross_entropy(fn(dict(zip(names, phi)), task.query_x[0]), task.query_y[0])
    ref = torch.autograd.grad(loss, lams)
    got = torch.stack([lam_grad[k] for k in names])
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-6, atol=1e-12)


@ENGINES
def test_damped_system_with_learned_lambda_per_tensor_equals_a_dense_solve(setup, engine) -> None:  # type: ignore[no-untyped-def]
    """Damping and a learned lam per tensor together (``--learn-lam per-tensor --damping d``):
    w = (H + (1 + d) diag(lam_row))^-1 grad L(phi), with H the dense support-loss Hessian at phi,
    gives dL/dtheta = lam_row * w and dL/dlam_k = -<w, phi - theta> over tensor k's coordinates."""
    fn, theta, batch = setup
    names = list(theta)
    n, d, lr, steps = flat(theta).numel(), 0.5, 0.02, 60
    lam = {k: torch.tensor(20.0 + 3 * i, dtype=D) for i, k in enumerate(names)}
    algo = MetaAlgorithm(
        GradientDescent(lr=lr, max_iter=steps, tol=0.0), Implicit(cg_iters=4 * n, damping=d), 1.0
    )
    task = _one(batch, 1)
    g, lam_grad, _ = meta_gradient(algo, fn, F.cross_entropy, theta, task, lam=lam, batched=engine)
    assert lam_grad is not None

    def support(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(fn(p, task.support_x[0]), task.support_y[0])

    phi = dict(theta)
    for _ in range(steps):
        gr = torch.func.grad(
            lambda p: support(p) + sum(0.5 * lam[k] * ((p[k] - theta[k]) ** 2).sum() for k in names)
        )(phi)
        phi = {k: phi[k] - lr * gr[k] for k in names}
    sizes = [theta[k].numel() for k in names]

    def unflat(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: c.view(theta[k].shape) for k, c in zip(names, torch.split(z, sizes))}

    H = torch.func.hessian(lambda z: support(unflat(z)))(flat(phi))
    lam_row = torch.cat([lam[k].expand(s) for k, s in zip(names, sizes)])
    v = flat(torch.func.grad(lambda p: F.cross_entropy(fn(p, task.query_x[0]), task.query_y[0]))(phi))
    w = torch.linalg.solve(H + torch.diag((1 + d) * lam_row), v)
    torch.testing.assert_close(flat(g), lam_row * w, rtol=1e-8, atol=1e-11)
    step = flat(phi) - flat(theta)
    want = torch.stack([-(c * s).sum() for c, s in zip(torch.split(w, sizes), torch.split(step, sizes))])
    torch.testing.assert_close(torch.stack([lam_grad[k] for k in names]), want, rtol=1e-7, atol=1e-12)
    # and the damping is not idle: the undamped system gives another gradient
    undamped = torch.linalg.solve(H + torch.diag(lam_row), v)
    assert not torch.allclose(lam_row * w, lam_row * undamped, rtol=1e-3)


@ENGINES
def test_distance_is_the_inner_step_length(setup, engine) -> None:  # type: ignore[no-untyped-def]
    """One GD step of lr on G from theta (the proximal gradient is 0 there): ||phi - theta|| is
    lr ||grad Lhat(theta)||, per task, computed here with torch.func."""
    fn, theta, batch = setup
    lr = 0.3
    algo = MetaAlgorithm(GradientDescent(lr=lr, max_iter=1, tol=0.0), Implicit(cg_iters=2), 2.0)
    _, _, stats = meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=engine)
    want = []
    for i in range(B):
        gr = torch.func.grad(lambda p, i=i: F.cross_entropy(fn(p, batch.support_x[i]), batch.support_y[i]))(
            theta
        )
        want.append(lr * torch.linalg.vector_norm(flat(gr)))
    assert stats.distance is not None
    torch.testing.assert_close(stats.distance, torch.stack(want), rtol=1e-10, atol=1e-14)
    _, _, quiet = meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=engine, diagnostics=False)
    assert quiet.distance is not None and bool(torch.isnan(quiet.distance).all())


def test_evaluate_batch_reports_per_task_accuracy(setup) -> None:  # type: ignore[no-untyped-def]
    fn, theta, batch = setup
    ql, qa = evaluate_batch(make_algorithm("fomaml", inner_steps=2), fn, F.cross_entropy, theta, batch)
    assert ql.shape == (B,) and qa.shape == (B,)
    assert bool(((qa >= 0) & (qa <= 1)).all())


def test_bad_configurations() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'mamal'"):
        make_algorithm("mamal")
    with pytest.raises(ValueError, match="Unrolled \\(MAML\\) needs GradientDescent"):
        MetaAlgorithm(NewtonCG(), Unrolled(), 0.0)
    with pytest.raises(ValueError, match=r"Unrolled \(MAML\) needs GradientDescent.*TrustRegionNewtonCG"):
        MetaAlgorithm(TrustRegionNewtonCG(), Unrolled(), 0.0)
    with pytest.raises(ValueError, match="needs GradientDescent\\(tol=0\\)"):
        MetaAlgorithm(GradientDescent(lr=0.1), Unrolled(), 0.0)
    with pytest.raises(TypeError, match=r"takes a bilevel\.solvers instance"):
        MetaAlgorithm("gd", FirstOrder(), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Implicit needs lam > 0"):
        MetaAlgorithm(GradientDescent(lr=0.1, max_iter=16, tol=0.0), Implicit(), 0.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        GradientDescent(lr=0.0, max_iter=16, tol=0.0)
    with pytest.raises(ValueError, match="replaces imaml-hf's line search"):
        make_algorithm("imaml-gd", inner_solver="trust-region")
    hf = make_algorithm("imaml-hf", newton_iters=4, cg_iters=6, inner_solver="trust-region")
    assert hf.inner == TrustRegionNewtonCG(newton_iters=4, cg_iters=6, radius=0.3, tol=0.0)
    assert make_algorithm("imaml-hf").inner == NewtonCG(newton_iters=3, cg_iters=5)


@pytest.mark.parametrize("batched", [False, True])
def test_backtracking_gd_cannot_diverge(batched: bool) -> None:
    """At a step size 100x too large, fixed-step GD on G blows up; backtracking decreases G at every
    accepted step and ends below G(theta) for every task."""
    model = sinusoid_mlp((8, 8))
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    g = torch.Generator().manual_seed(4)
    xs = 5 * (2 * torch.rand(4, 5, 1, generator=g, dtype=D) - 1)
    ys = 5 * torch.sin(xs)
    bm = batched_model(model) if batched else None
    lam = 1.0

    def G(phi: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.vmap(fn)(phi, xs)
        fit = ((out - ys) ** 2).flatten(1).mean(1)
        return fit + sum(0.5 * lam * ((phi[k] - theta[k]) ** 2).flatten(1).sum(1) for k in phi)

    start = G({k: v.unsqueeze(0).expand(4, *v.shape) for k, v in theta.items()})
    fixed = make_algorithm("imaml-gd", inner_steps=30, inner_lr=10.0, lam=lam)
    # the diverging inner loop is refused, not returned as its last finite iterate
    with pytest.raises(
        bl.NonFiniteError,
        match=r"task\(s\) \[0, 1, 2, 3\] of the meta-batch.*lower the inner step size "
        r"\(GradientDescent\(lr=10\)\), give the inner GradientDescent a line search .*, raise lam",
    ) as err:
        adapt(fixed, fn, mse, theta, xs, ys, batched=bm)
    assert "--" not in str(err.value)  # no command-line flags down here
    assert err.value.info.problem_status == (bl.SolverStatus.NONFINITE,) * 4
    bt = make_algorithm("imaml-gd", inner_steps=30, inner_lr=10.0, lam=lam, backtrack=True)
    values = []
    for steps in (1, 5, 10, 30):
        algo = MetaAlgorithm(
            GradientDescent(lr=10.0, max_iter=steps, tol=0.0, line_search=StepHalving()),
            bt.meta_gradient,
            lam,
        )
        values.append(G(adapt(algo, fn, mse, theta, xs, ys, batched=bm)))
    assert bool((values[-1] < start).all())
    for a, b in itertools.pairwise(values):
        assert bool((b <= a + 1e-12).all())


def test_maml_cannot_backtrack() -> None:
    with pytest.raises(ValueError, match="fixed inner path"):
        make_algorithm("maml", backtrack=True)
    with pytest.raises(ValueError, match="line_search=None"):
        MetaAlgorithm(
            GradientDescent(lr=0.1, max_iter=3, tol=0.0, line_search=StepHalving()), Unrolled(), 0.0
        )


@pytest.mark.filterwarnings(
    "ignore::bilevel.BilevelWarning"
)  # 16 steps do not converge; CG may meet p'Ap <= 0
def test_readme_imaml_as_the_core_layer_equals_meta_gradient() -> None:
    """The README's meta-learning snippet: iMAML written directly with bl.implicit_argmin on a
    meta-batch equals meta_gradient's (paper CG from 0), float64."""
    model = omniglot_cnn(WAYS, hidden=2, image_size=8)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D, requires_grad=True)
    batch = _images(3)
    # --- the README's code
    bm = batched_model(model)  # the B task models in one call
    B, lam = batch.support_x.shape[0], 2.0
    assert bm is not None

    def G(phi: dict, th: dict) -> torch.Tensor:  # the B inner objectives, shape (B,)
        out = bm.exact(phi, batch.support_x)
        support = torch.stack([F.cross_entropy(out[i], batch.support_y[i]) for i in range(B)])
        return support + sum(0.5 * lam * (phi[k] - th[k]).square().flatten(1).sum(1) for k in phi)

    init = {k: v.detach().expand(B, *v.shape) for k, v in theta.items()}  # phi = theta per task
    phi = bl.implicit_argmin(
        G,
        init,
        theta,
        bl.solvers.GradientDescent(lr=0.1, max_iter=16, tol=0.0, batched=True),
        linear_solver=bl.CG(max_iter=5, rtol=0.0, atol=0.0),
        batched=True,
        optimality_tol=None,
        throw=False,
    )
    query = bm.exact(phi, batch.query_x)
    loss = sum(F.cross_entropy(query[i], batch.query_y[i]) for i in range(B)) / B
    loss.backward()  # theta[k].grad is the iMAML meta-gradient
    # --- the engine
    algo = MetaAlgorithm(
        GradientDescent(lr=0.1, max_iter=16, tol=0.0), Implicit(cg_iters=5, warm_start=False), lam
    )
    g, _, _ = meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=bm)
    torch.testing.assert_close(flat({k: v.grad for k, v in theta.items()}), flat(g), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lam", [2.0, "per-tensor"])
def test_min_eig_equals_the_dense_hessian_at_the_inner_answer(lam: object) -> None:
    """MetaStats.min_eig (Lanczos on HVPs) against the smallest eigenvalue of the dense
    I + D^-1/2 Lhat'' D^-1/2 at each task's inner answer, float64, small MLP (n = 10)."""
    from bilevel.metalearn import adapt
    from bilevel.metalearn.batched import batched_model
    from bilevel.metalearn.models import MLP, make_functional, mse

    model = MLP(1, (3,), 1)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    B = 3
    batch = Task(
        torch.randn(B, 5, 1, generator=g, dtype=torch.float64),
        torch.randn(B, 5, 1, generator=g, dtype=torch.float64),
        torch.randn(B, 4, 1, generator=g, dtype=torch.float64),
        torch.randn(B, 4, 1, generator=g, dtype=torch.float64),
    )
    lam_v = (
        2.0 if lam == 2.0 else {k: torch.tensor(0.5 + i, dtype=torch.float64) for i, k in enumerate(theta)}
    )
    algo = make_algorithm("imaml-gd", inner_steps=3, inner_lr=0.05, cg_iters=2)
    bm = batched_model(model)
    n = sum(v.numel() for v in theta.values())
    _, _, st = meta_gradient(
        algo, fn, mse, theta, batch, lam=lam_v, classification=False, batched=bm, lanczos_steps=n
    )
    phi = adapt(algo, fn, mse, theta, batch.support_x, batch.support_y, lam=lam_v, batched=bm)
    names = list(theta)
    lam_flat = torch.cat(
        [
            torch.as_tensor(lam_v if isinstance(lam_v, float) else lam_v[k], dtype=torch.float64).expand(
                theta[k].numel()
            )
            for k in names
        ]
    )
    for i in range(B):
        flat_i = torch.cat([phi[k][i].reshape(-1) for k in names])

        def support(v: torch.Tensor, i: int = i) -> torch.Tensor:
            parts = v.split([theta[k].numel() for k in names])
            p = {k: t.view(theta[k].shape) for k, t in zip(names, parts)}
            return mse(fn(p, batch.support_x[i]), batch.support_y[i])

        H = torch.func.hessian(support)(flat_i)
        s = lam_flat.rsqrt()
        M = torch.eye(n, dtype=torch.float64) + s[:, None] * H * s[None, :]
        torch.testing.assert_close(
            st.min_eig[i],
            torch.linalg.eigvalsh(M)[0],
            rtol=1e-7,
            atol=1e-7,  # type: ignore[index]
        )
    # off by default and for lam = 0
    _, _, off = meta_gradient(algo, fn, mse, theta, batch, lam=lam_v, classification=False, batched=bm)
    assert off.min_eig is not None and bool(torch.isnan(off.min_eig).all())
    with pytest.raises(ValueError, match="lanczos_steps=-1"):
        meta_gradient(algo, fn, mse, theta, batch, classification=False, batched=bm, lanczos_steps=-1)


# ------------------------------------------------------------------ the released code's recipe
@ENGINES
@pytest.mark.parametrize("lam", [2.0, 0.5])
def test_released_meta_gradient_equals_a_dense_solve_at_the_pulled_back_point(
    setup, engine, lam: float
) -> None:  # type: ignore[no-untyped-def]
    """imaml-released, written out by hand per task: 7 SGD steps on the support loss alone, the
    pull-back phi <- theta + (1 - lr lam)(phi - theta), then g = ((1 + d) I + H/(lam + 10))^-1 v with
    H the dense support-loss Hessian and v the query gradient at that phi (CG run to n steps)."""
    fn, theta, batch = setup
    n = flat(theta).numel()
    steps, lr, d = 7, 0.1, 1.0
    algo = make_algorithm("imaml-released", inner_steps=steps, inner_lr=lr, lam=lam, cg_iters=n, damping=d)
    g, _, _ = meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=engine)
    names = list(theta)
    shapes = [theta[k].shape for k in names]

    def unflat(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(
            zip(names, (c.view(s) for c, s in zip(torch.split(z, [s.numel() for s in shapes]), shapes)))
        )

    total = torch.zeros(n, dtype=D)
    for i in range(B):
        t = _one(batch, i)

        def support(z: torch.Tensor, t: Task = t) -> torch.Tensor:
            return F.cross_entropy(fn(unflat(z), t.support_x[0]), t.support_y[0])

        z0 = flat(theta)
        z = z0.clone()
        for _ in range(steps):
            z = z - lr * torch.func.grad(support)(z)
        z = z - lr * lam * (z - z0)  # one SGD step on lam/2 ||z - theta||^2
        H = torch.func.hessian(support)(z)
        v = torch.func.grad(lambda w, t=t: F.cross_entropy(fn(unflat(w), t.query_x[0]), t.query_y[0]))(z)
        total += torch.linalg.solve((1 + d) * torch.eye(n, dtype=D) + H / (lam + 10.0), v)
    torch.testing.assert_close(flat(g), total / B, rtol=1e-8, atol=1e-10)


def test_released_inner_loop_without_lam_is_plain_gd_on_the_support_loss(setup) -> None:  # type: ignore[no-untyped-def]
    """How the released code evaluates (lam = 0): adapt = fomaml's plain GD, to rounding."""
    fn, theta, batch = setup
    rel = make_algorithm("imaml-released", inner_steps=5, inner_lr=0.1, lam=2.0)
    fo = make_algorithm("fomaml", inner_steps=5, inner_lr=0.1)
    a = adapt(rel, fn, F.cross_entropy, theta, batch.support_x, batch.support_y, lam=0.0)
    b = adapt(fo, fn, F.cross_entropy, theta, batch.support_x, batch.support_y)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-13, atol=1e-16)  # theta + 1 (phi - theta)
    pulled = adapt(rel, fn, F.cross_entropy, theta, batch.support_x, batch.support_y)
    t = flat({k: v.unsqueeze(0).expand(B, *v.shape) for k, v in theta.items()})
    torch.testing.assert_close(flat(pulled) - t, 0.8 * (flat(b) - t), rtol=1e-12, atol=1e-14)


def test_released_recipe_guards() -> None:
    with pytest.raises(ValueError, match="backtrack"):
        make_algorithm("imaml-released", backtrack=True)
    with pytest.raises(ValueError, match="does not minimize G"):
        MetaAlgorithm(NewtonCG(), ReleasedCG(), 2.0)
    with pytest.raises(ValueError, match="released code's inner loop"):
        MetaAlgorithm(GradientDescent(lr=0.1, line_search=StepHalving()), ReleasedCG(), 2.0)
    with pytest.raises(ValueError, match="max_iter"):
        GradientDescent(lr=0.1, max_iter=-1)
    with pytest.raises(ValueError, match="lr"):
        GradientDescent(lr=0.0)
    with pytest.raises(ValueError, match="cg_iters"):
        ReleasedCG(cg_iters=-1)
    with pytest.raises(ValueError, match="damping"):
        ReleasedCG(damping=-1.0)


@pytest.mark.parametrize("lam", [2.0, 20.0])  # lr lam <= 1 (Theorem 2's momentum), and > 1 (k/(k+3))
def test_accelerated_inner_solver_equals_nesterov_task_by_task(setup, lam: float) -> None:  # type: ignore[no-untyped-def]
    """Nesterov (mu from lam) on the meta-batch = bl.solvers.Nesterov(mu=lam) run on each task alone."""
    fn, theta, batch = setup
    algo = make_algorithm("imaml-gd", inner_steps=9, inner_lr=0.1, lam=lam, inner_solver="nesterov")
    got = adapt(algo, fn, F.cross_entropy, theta, batch.support_x, batch.support_y)
    mu = lam if lam * 0.1 <= 1 else None
    solver = bl.solvers.Nesterov(lr=0.1, mu=mu, max_iter=9, tol=0.0, restart=True)
    for i in range(B):

        def G(p: dict[str, torch.Tensor], t: dict[str, torch.Tensor], i: int = i) -> torch.Tensor:
            loss = F.cross_entropy(fn(p, batch.support_x[i]), batch.support_y[i])
            return loss + lam / 2 * sum(((p[k] - t[k]) ** 2).sum() for k in p)

        want = solver(G, dict(theta), dict(theta)).x
        torch.testing.assert_close(
            flat({k: v[i] for k, v in got.items()}), flat(want), rtol=1e-10, atol=1e-12
        )
    with pytest.raises(ValueError, match="not maml"):
        make_algorithm("maml", inner_solver="nesterov")
    with pytest.raises(ValueError, match="'gd', 'nesterov' or 'trust-region'"):
        make_algorithm("imaml-gd", inner_solver="adam")


# ------------------------------------------------------------------------ per-task failures
def _sine_tasks(nan_query: int | None = None) -> tuple[Task, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    xs = 5 * (2 * torch.rand(4, 5, 1, generator=g, dtype=D) - 1)
    qx = 5 * (2 * torch.rand(4, 5, 1, generator=g, dtype=D) - 1)
    qy = 5 * torch.sin(qx)
    if nan_query is not None:
        qy[nan_query, 2] = float("nan")
    return Task(xs, 5 * torch.sin(xs), qx, qy), xs


@pytest.mark.parametrize(
    ("name", "settings", "named", "not_named"),
    [
        ("maml", {}, ["lower the inner step size (GradientDescent(lr=10))"], ["line search", "lam"]),
        ("fomaml", {}, ["lower the inner step size", "line search"], ["raise lam"]),
        ("imaml-gd", {"lam": 1.0}, ["lower the inner step size", "line search", "raise lam"], []),
        ("imaml-released", {"lam": 1.0}, ["lower the inner step size"], ["line search", "raise lam"]),
    ],
)
def test_a_diverged_inner_loop_names_only_remedies_of_its_method(
    name: str, settings: dict, named: list[str], not_named: list[str]
) -> None:
    """MAML and the released code need a fixed path (no line search); lam is no remedy where G has
    no proximal term (the first-order methods minimize the support loss) or the released loop
    ignores it; no command-line flags in this low-level message."""
    model = sinusoid_mlp((8, 8))
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    tasks, _ = _sine_tasks()
    algo = make_algorithm(name, inner_steps=30, inner_lr=10.0, **settings)
    with pytest.raises(bl.NonFiniteError, match=r"in task\(s\) \[.*\] of the meta-batch") as err:
        meta_gradient(algo, fn, mse, theta, tasks, classification=False)
    text = str(err.value)
    assert "--" not in text
    for part in named:
        assert part in text, (part, text)
    for part in not_named:
        assert part not in text, (part, text)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        # iMAML's fixed-budget CG: only the task whose backward is NaN is named (its dL/dx)
        ("imaml-gd", r"incoming gradient dL/dx has NaN or infinity in problem\(s\) \[1\] of the batch"),
        ("fomaml", r"query gradients have NaN or infinity in task\(s\) \[1\] of the meta-batch"),
        ("imaml-released", r"query gradients have NaN or infinity in task\(s\) \[1\] of the meta-batch"),
        ("maml", r"query losses have NaN or infinity in task\(s\) \[1\] of the meta-batch"),
    ],
)
def test_a_nan_query_in_one_task_names_that_task_only(name: str, match: str) -> None:
    model = sinusoid_mlp((8, 8))
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=D)
    tasks, _ = _sine_tasks(nan_query=1)
    algo = make_algorithm(name, inner_steps=3, inner_lr=0.01, cg_iters=3)
    with pytest.raises(bl.NonFiniteError, match=match) as err:
        meta_gradient(algo, fn, mse, theta, tasks, classification=False)
    if name == "imaml-gd":
        assert err.value.info.failed_problems == (1,)


def test_task_rows_check_names_its_tasks() -> None:
    """The check on per-task rows (the released code's CG solutions, the query gradients)."""
    from bilevel.metalearn.metabatch import check_task_rows

    x = torch.zeros(4, 3, dtype=D)
    check_task_rows("the CG solutions", x, "unused")
    x[2, 1] = float("inf")
    with pytest.raises(
        bl.NonFiniteError, match=r"the CG solutions have NaN or infinity in task\(s\) \[2\] of"
    ):
        check_task_rows("the CG solutions", x, "the Hessian is not finite there")
