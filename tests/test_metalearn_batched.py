"""Tests of `bilevel.metalearn.batched`: the batched models against the per-task model (values, HVPs
by either double backward, forward-over-reverse), the fused flat cross-entropy, chunks, layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from bilevel.metalearn.batched import batched_model
from bilevel.metalearn.models import MLP, ConvNet, make_functional, omniglot_cnn


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cached_batched_hvp_through_the_cnn_equals_per_task_hvp() -> None:
    """vjp of vmap(grad) (the iMAML engine's HVP) against per-task jvp(grad), float64.

    With F.batch_norm this fails in torch 2.13 (wrong batching rule of its double backward, errors of
    order 1); the model's BatchStatNorm2d makes it exact.
    """
    model = omniglot_cnn(3, hidden=4, image_size=12)
    fn, params = make_functional(model, _gen(0), dtype=torch.float64)
    B = 2
    x = torch.rand(B, 6, 1, 12, 12, dtype=torch.float64, generator=_gen(1))
    y = torch.arange(3).repeat(2).expand(B, -1)
    phi = {k: v.unsqueeze(0).expand(B, *v.shape).clone() for k, v in params.items()}
    phi = {k: v + 0.1 * torch.randn(v.shape, dtype=v.dtype, generator=_gen(2)) for k, v in phi.items()}
    u = {k: torch.randn(v.shape, dtype=v.dtype, generator=_gen(3)) for k, v in phi.items()}

    def loss(p, xx, yy):  # type: ignore[no-untyped-def]
        return F.cross_entropy(fn(p, xx), yy)

    _, vjp_fn = torch.func.vjp(lambda p: vmap(grad(loss))(p, x, y), phi)
    (batched,) = vjp_fn(u)
    _assert_per_task_hvps(batched, fn, phi, u, x, y, tol=1e-10)


def _assert_per_task_hvps(hv, fn, phi, u, x, y, *, tol: float) -> None:  # type: ignore[no-untyped-def]
    """Each task's HVP against forward-over-reverse through the per-task model alone."""

    def loss(p, xx, yy):  # type: ignore[no-untyped-def]
        return F.cross_entropy(fn(p, xx), yy)

    for i in range(x.shape[0]):
        pi = {k: v[i] for k, v in phi.items()}
        ui = {k: v[i] for k, v in u.items()}
        _, ref = jvp(lambda p, i=i: grad(loss)(p, x[i], y[i]), (pi,), (ui,))
        for k in ref:
            torch.testing.assert_close(hv[k][i], ref[k], rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "model",
    [
        omniglot_cnn(4, hidden=3, image_size=12),
        ConvNet(3, in_channels=2, hidden=4, image_size=(20, 17), conv_bias=True),
        ConvNet(3, in_channels=3, hidden=4, image_size=16, pool=True),
        MLP(2, (6, 5), 3),
    ],
    ids=["omniglot", "bias-nonsquare", "pool", "mlp"],
)
def test_batched_model_equals_the_per_task_model(model: torch.nn.Module) -> None:
    """exact, fast and single against vmap of the functional per-task model, float64."""
    fn, p = make_functional(model, torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    B = 3
    pb = {k: v + 0.1 * torch.randn(B, *v.shape, generator=g, dtype=v.dtype) for k, v in p.items()}
    if isinstance(model, MLP):
        x = torch.randn(B, 7, 2, generator=g, dtype=torch.float64)
    else:
        assert isinstance(model, ConvNet)
        x = torch.randn(B, 6, model.in_channels, *model.image_size, generator=g, dtype=torch.float64)
    ref = torch.func.vmap(fn)(pb, x)
    bm = batched_model(model)
    assert bm is not None
    torch.testing.assert_close(bm.exact(pb, x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bm.fast(pb, x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        bm.single({k: v[1] for k, v in pb.items()}, x[1]), ref[1], rtol=1e-12, atol=1e-12
    )


def test_batched_model_is_none_for_other_modules() -> None:
    assert batched_model(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize(
    "model",
    [
        omniglot_cnn(3, hidden=4, image_size=12),
        ConvNet(3, in_channels=2, hidden=4, image_size=(11, 9), conv_bias=True),
        ConvNet(2, in_channels=3, hidden=3, image_size=16, pool=True),
    ],
    ids=["omniglot", "bias-nonsquare", "pool"],
)
@pytest.mark.parametrize("which", ["exact:native", "exact:few-ops", "exact:auto", "fast:auto"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "nchw"])
@pytest.mark.parametrize("B", [1, 3], ids=["one-task", "three-tasks"])
def test_batched_model_hvp_by_double_backward_equals_per_task_hvp(
    model: ConvNet, which: str, channels_last: bool, B: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Autograd's double backward through the batched model (the implicit layer's HVPs; MAML)
    against per-task forward-over-reverse through the module (BatchStatNorm2d), float64, in
    both memory layouts of the grouped activations, and twice through one gradient graph (as
    CG's matvecs do: the few-op batch norm keeps terms of the first for the next)."""
    import bilevel.metalearn.batched as batched

    monkeypatch.setattr(batched, "CPU_CHANNELS_LAST", channels_last)
    fn, params = make_functional(model, _gen(0), dtype=torch.float64)
    form, double_backward = which.split(":")
    bm = batched_model(model, double_backward=double_backward)
    assert bm is not None
    forward = getattr(bm, form)
    x = torch.rand(B, 6, model.in_channels, *model.image_size, dtype=torch.float64, generator=_gen(1))
    y = torch.arange(3).repeat(2)[:6].remainder(model.ways).expand(B, -1)
    phi = {k: v + 0.1 * torch.randn(B, *v.shape, dtype=v.dtype, generator=_gen(2)) for k, v in params.items()}
    u = {k: torch.randn(v.shape, dtype=v.dtype, generator=_gen(3)) for k, v in phi.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    out = forward(leaves, x)
    total = sum(F.cross_entropy(out[i], y[i]) for i in range(B))
    g = torch.autograd.grad(total, list(leaves.values()), create_graph=True)
    u0 = {k: torch.randn(v.shape, dtype=v.dtype, generator=_gen(4)) for k, v in phi.items()}
    hv0 = torch.autograd.grad(g, list(leaves.values()), grad_outputs=list(u0.values()), retain_graph=True)
    _assert_per_task_hvps(dict(zip(leaves, hv0)), fn, phi, u0, x, y, tol=1e-9)
    hv = dict(zip(leaves, torch.autograd.grad(g, list(leaves.values()), grad_outputs=list(u.values()))))
    _assert_per_task_hvps(hv, fn, phi, u, x, y, tol=1e-9)


FUSED_MODELS = [
    omniglot_cnn(3, hidden=4, image_size=12),
    ConvNet(3, in_channels=2, hidden=4, image_size=(11, 9), conv_bias=True),
    ConvNet(2, in_channels=3, hidden=3, image_size=16, pool=True),
]


@pytest.mark.parametrize("model", FUSED_MODELS, ids=["omniglot", "bias-nonsquare", "pool"])
@pytest.mark.parametrize("chunk", [None, 1, 2], ids=["one-call", "chunk-1", "chunk-2"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "nchw"])
def test_flat_cross_entropy_equals_the_fast_model_and_autograd(
    model: ConvNet, chunk: int | None, channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused per-task losses of flat parameters: values, logits and gradients (for a random
    upstream per task) of `fast` + `task_losses` through autograd, float64; all B = 3 tasks at
    once or in chunks (2 does not divide 3), in both layouts of the grouped activations."""
    import bilevel.metalearn.batched as batched
    from bilevel.metalearn.batched import task_losses

    monkeypatch.setattr(batched, "CPU_CHANNELS_LAST", channels_last)

    _, params = make_functional(model, _gen(0), dtype=torch.float64)
    bm = batched_model(model)
    assert bm is not None and bm.flat_cross_entropy is not None
    names, shapes = list(params), [tuple(v.shape) for v in params.values()]
    B, N = 3, 6
    x = torch.rand(B, N, model.in_channels, *model.image_size, dtype=torch.float64, generator=_gen(1))
    y = torch.randint(0, model.ways, (B, N), generator=_gen(2))
    X = torch.cat([v.reshape(-1) for v in params.values()]).repeat(B, 1)
    X = X + 0.1 * torch.randn(X.shape, dtype=X.dtype, generator=_gen(3))
    go = torch.rand(B, dtype=torch.float64, generator=_gen(4))
    X1 = X.clone().requires_grad_(True)
    f = bm.flat_cross_entropy(names, shapes, x, y, chunk)
    losses, logits = f(X1)
    (g1,) = torch.autograd.grad(losses, X1, go)
    with torch.no_grad():  # no gradient taken: the same values
        torch.testing.assert_close(f(X)[0], losses.detach(), rtol=0, atol=0)
    X2 = X.clone().requires_grad_(True)
    parts = X2.split([v.numel() for v in params.values()], 1)
    p = {k: part.view(B, *s) for k, part, s in zip(names, parts, shapes)}
    out = bm.fast(p, x)
    ref = task_losses(F.cross_entropy, out, y)
    (g2,) = torch.autograd.grad(ref, X2, go)
    torch.testing.assert_close(losses, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert not logits.requires_grad


def test_grouped_activations_are_channels_last_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched ConvNet's grouped input (N, B C, H, W) is channels-last on CPU (the measured
    faster layout), plain NCHW when switched off; task b owns channels [b C, (b + 1) C)."""
    import bilevel.metalearn.batched as batched

    x = torch.rand(3, 4, 2, 5, 5, generator=_gen(0))
    h = batched.grouped_input(x)
    assert h.shape == (4, 6, 5, 5) and h.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(h[:, 2:4], x[1].contiguous(), rtol=0, atol=0)
    monkeypatch.setattr(batched, "CPU_CHANNELS_LAST", False)
    h = batched.grouped_input(x)
    assert h.is_contiguous() and not h.is_contiguous(memory_format=torch.channels_last)


def test_flat_cross_entropy_refuses_second_derivatives_and_compiling_drops_it() -> None:
    """First order only: a second derivative raises rather than returning zeros; a chunk of no
    tasks is refused; `compiled` (whose `fast` is what is captured) has no fused losses."""
    model = FUSED_MODELS[0]
    _, params = make_functional(model, _gen(0), dtype=torch.float64)
    bm = batched_model(model)
    assert bm is not None and bm.flat_cross_entropy is not None
    x = torch.rand(2, 3, 1, 12, 12, dtype=torch.float64, generator=_gen(1))
    y = torch.tensor([[0, 1, 2], [2, 1, 0]])
    X = torch.cat([v.reshape(-1) for v in params.values()]).repeat(2, 1).requires_grad_(True)
    f = bm.flat_cross_entropy(list(params), [tuple(v.shape) for v in params.values()], x, y)
    (g,) = torch.autograd.grad(f(X)[0].sum(), X, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), X)
    with pytest.raises(ValueError, match="chunk must be a positive number of tasks, got 0"):
        bm.flat_cross_entropy(list(params), [tuple(v.shape) for v in params.values()], x, y, 0)
    assert bm.compiled().flat_cross_entropy is None


def test_outputs_in_chunks_equal_one_call() -> None:
    """Large per-task batches on CPU run in chunks of `cpu_chunk` tasks: same outputs (float64)."""
    import dataclasses

    model = omniglot_cnn(3, hidden=4, image_size=12)
    fn, p = make_functional(model, _gen(0), dtype=torch.float64)
    default = batched_model(model)
    assert default is not None and default.cpu_chunk == 4
    bm = dataclasses.replace(default, cpu_chunk=4)
    B = 6
    pb = {k: v + 0.1 * torch.randn(B, *v.shape, generator=_gen(1), dtype=v.dtype) for k, v in p.items()}
    x = torch.randn(B, 24, 1, 12, 12, generator=_gen(2), dtype=torch.float64)
    assert bm.chunk(x) == 4 and bm.chunk(x[:, :5]) == B  # small support sets: all at once
    whole = dataclasses.replace(bm, cpu_chunk=None)
    torch.testing.assert_close(bm.outputs(pb, x), whole.outputs(pb, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bm.outputs(pb, x), torch.func.vmap(fn)(pb, x), rtol=1e-12, atol=1e-12)


def test_task_losses_falls_back_to_a_loop_for_losses_vmap_cannot_batch() -> None:
    from bilevel.metalearn.batched import task_losses

    out = torch.randn(3, 4, 2, generator=_gen(0), dtype=torch.float64)
    y = torch.randint(0, 2, (3, 4), generator=_gen(1))

    def data_dependent(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Python control flow on a value: vmap cannot batch it
        return F.cross_entropy(o, t) * (2.0 if float(o.sum()) > 0 else 1.0)

    ref = torch.stack([data_dependent(out[i], y[i]) for i in range(3)])
    torch.testing.assert_close(task_losses(data_dependent, out, y), ref, rtol=0, atol=0)
    torch.testing.assert_close(
        task_losses(F.cross_entropy, out, y), torch.stack([F.cross_entropy(out[i], y[i]) for i in range(3)])
    )


def test_batched_model_refuses_an_unknown_double_backward() -> None:
    with pytest.raises(ValueError, match=r"double_backward='fast'.*choose one of"):
        batched_model(omniglot_cnn(3), double_backward="fast")


def test_fast_batched_model_forward_over_reverse_hvp_equals_per_task_hvp() -> None:
    """NewtonCG's inner HVPs (torch.func.jvp of grad) go through the fast model, F.batch_norm
    included: exact there (only vmap of F.batch_norm's double backward is wrong), float64."""
    model = omniglot_cnn(3, hidden=4, image_size=12)
    fn, params = make_functional(model, _gen(0), dtype=torch.float64)
    bm = batched_model(model)
    assert bm is not None
    B = 3
    x = torch.rand(B, 6, 1, 12, 12, dtype=torch.float64, generator=_gen(1))
    y = torch.arange(3).repeat(2).expand(B, -1)
    phi = {k: v + 0.1 * torch.randn(B, *v.shape, dtype=v.dtype, generator=_gen(2)) for k, v in params.items()}
    u = {k: torch.randn(v.shape, dtype=v.dtype, generator=_gen(3)) for k, v in phi.items()}

    def total(p):  # type: ignore[no-untyped-def]
        out = bm.fast(p, x)
        return sum(F.cross_entropy(out[i], y[i]) for i in range(B))

    _, hv = jvp(grad(total), (phi,), (u,))
    _assert_per_task_hvps(hv, fn, phi, u, x, y, tol=1e-10)


def _graph_ops(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("double_backward, native", [("auto", False), ("few-ops", False), ("native", True)])
def test_auto_double_backward_takes_the_few_op_layers_for_any_number_of_tasks(
    B: int, double_backward: str, native: bool
) -> None:
    """``auto``: the few-op convolution and norm for one task per call as for many (they hold
    less than PyTorch's double backward there too); ``native``: PyTorch's own nodes."""
    model = omniglot_cnn(3, hidden=4, image_size=12)
    _, params = make_functional(model, _gen(0), dtype=torch.float64)
    bm = batched_model(model, double_backward=double_backward)
    assert bm is not None
    phi = {k: v.expand(B, *v.shape).clone().requires_grad_(True) for k, v in params.items()}
    x = torch.rand(B, 6, 1, 12, 12, dtype=torch.float64, generator=_gen(1))
    ops = _graph_ops(bm.exact(phi, x))
    assert ("NativeBatchNormBackward0" in ops) is native
    assert ("ConvolutionBackward0" in ops) is native
