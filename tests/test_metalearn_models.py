"""Tests of `bilevel.metalearn.models`: shapes, functional use, vmap, forward-over-reverse HVPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from bilevel.metalearn.batched import batched_model
from bilevel.metalearn.models import (
    MLP,
    ConvNet,
    Params,
    default_model,
    init_params,
    make_functional,
    miniimagenet_conv4,
    mse,
    n_params,
    omniglot_cnn,
    sinusoid_mlp,
)

# One tolerance table by dtype.  float64 comparisons of two exact formulas of the same quantity
# (vmap vs loop, jvp(grad) vs double backward) differ only by summation order.
# float32 is loosened to 1e-4: vmap runs the convolutions of B tasks as one grouped convolution, whose
# different summation order is amplified by the batch-norm backward (observed differences ~3e-5).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_omniglot_cnn_shapes_and_parameters() -> None:
    model = omniglot_cnn(ways=5)
    x = torch.rand(7, 1, 28, 28, generator=_gen())
    assert model(x).shape == (7, 5)
    assert model.head.in_features == 64 * 2 * 2  # 28 -> 14 -> 7 -> 4 -> 2 with stride 2
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("conv.bias") for n in names)  # no conv biases before batch norm
    assert "features.block0.norm.weight" in names and "head.bias" in names
    assert not list(model.buffers())  # batch norm without running statistics
    pooled = omniglot_cnn(ways=20, pool=True)
    assert pooled.head.in_features == 64 and pooled(x).shape == (7, 20)  # 28 -> 14 -> 7 -> 3 -> 1


def test_miniimagenet_conv4_shapes() -> None:
    model = miniimagenet_conv4(ways=5)
    assert model.head.in_features == 32 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5 with max-pooling
    assert model(torch.rand(2, 3, 84, 84, generator=_gen())).shape == (2, 5)


def test_default_model_and_mlp() -> None:
    assert default_model((1, 28, 28), 5).head.in_features == 256
    assert default_model((3, 84, 84), 5).head.in_features == 800
    assert default_model((3, 8, 8), 4)(torch.rand(3, 3, 8, 8)).shape == (3, 4)  # too small to pool: stride 2
    mlp = sinusoid_mlp()
    assert [tuple(p.shape) for p in mlp.parameters()] == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert mlp(torch.rand(10, 1)).shape == (10, 1)
    with pytest.raises(ValueError, match="shrinks to nothing"):
        ConvNet(5, image_size=8, pool=True)
    with pytest.raises(ValueError, match="ways"):
        ConvNet(0)
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        MLP(1, (0,), 1)


def test_batch_norm_uses_batch_statistics_in_eval_mode() -> None:
    model = omniglot_cnn(ways=5)
    x = torch.rand(6, 1, 28, 28, generator=_gen())
    out_train = model.train()(x)
    out_eval = model.eval()(x)
    torch.testing.assert_close(out_train, out_eval)
    # statistics come from the batch: an example's output depends on the other examples
    assert not torch.allclose(model(x[:3]), out_eval[:3], atol=1e-3)


def test_conv_bias_before_batch_norm_has_zero_gradient() -> None:
    """Why the conv layers have no bias: the gradient of such a bias is identically zero."""
    model = ConvNet(3, hidden=8, conv_bias=True).double()
    x = torch.rand(6, 1, 28, 28, generator=_gen(), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        if name.endswith("conv.bias"):
            assert p.grad is not None and float(p.grad.abs().max()) < 1e-12
        elif name.endswith("conv.weight"):
            assert p.grad is not None and float(p.grad.abs().max()) > 1e-6


def test_init_params_is_deterministic_and_leaves_module_alone() -> None:
    model = omniglot_cnn(ways=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = init_params(model, _gen(3))
    b = init_params(model, _gen(3))
    c = init_params(model, _gen(4))
    assert list(a) == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(a["features.block1.norm.weight"], torch.ones(64))
    assert torch.equal(a["head.bias"], torch.zeros(5))
    d = init_params(model, _gen(3), dtype=torch.float64, requires_grad=True)
    assert (
        d["head.weight"].dtype == torch.float64
        and d["head.weight"].requires_grad
        and d["head.weight"].is_leaf
    )
    torch.testing.assert_close(d["head.weight"].float(), a["head.weight"])  # same values across dtypes
    bound = (6 / (256 + 5)) ** 0.5  # Glorot uniform
    assert float(a["head.weight"].abs().max()) <= bound
    assert n_params(a) == sum(p.numel() for p in model.parameters())


def test_make_functional_matches_module() -> None:
    model = omniglot_cnn(ways=5)
    fn, params = make_functional(model)
    x = torch.rand(5, 1, 28, 28, generator=_gen())
    torch.testing.assert_close(fn(params, x), model(x))
    params["head.bias"] = params["head.bias"] + 1.0
    torch.testing.assert_close(fn(params, x), model(x) + 1.0)  # fn reads params, not the module
    _, p2 = make_functional(model, _gen(0))
    assert all(torch.equal(p2[k], v) for k, v in init_params(model, _gen(0)).items())


def _batched(params: Params, b: int, gen: torch.Generator) -> Params:
    return {k: v + 0.1 * torch.randn((b, *v.shape), generator=gen, dtype=v.dtype) for k, v in params.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["cnn", "conv4", "mlp"])
def test_vmap_over_tasks_equals_loop(kind: str, dtype: torch.dtype) -> None:
    b = 3
    if kind == "cnn":
        model: nn.Module = ConvNet(5, hidden=16)
        x = torch.rand(b, 10, 1, 28, 28, generator=_gen(1), dtype=dtype)
    elif kind == "conv4":
        model = ConvNet(5, in_channels=3, hidden=8, image_size=84, pool=True)
        x = torch.rand(b, 4, 3, 84, 84, generator=_gen(1), dtype=dtype)
    else:
        model = sinusoid_mlp()
        x = torch.rand(b, 10, 1, generator=_gen(1), dtype=dtype) * 10 - 5
    fn, params = make_functional(model, _gen(0), dtype=dtype)
    bp = _batched(params, b, _gen(2))
    out = vmap(fn)(bp, x)
    ref = torch.stack([fn({k: v[i] for k, v in bp.items()}, x[i]) for i in range(b)])
    torch.testing.assert_close(out, ref, **TOL[dtype])

    # per-task gradients of a loss under vmap, as a meta-learning inner loop takes them
    def loss(p: Params, xi: torch.Tensor) -> torch.Tensor:
        return fn(p, xi).square().mean()

    g = vmap(grad(loss))(bp, x)
    for i in range(b):
        gi = grad(loss)({k: v[i] for k, v in bp.items()}, x[i])
        for k in gi:
            torch.testing.assert_close(g[k][i], gi[k], **TOL[dtype])


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_forward_over_reverse_hvp_equals_double_backward(kind: str) -> None:
    """jvp(grad(loss)) through batch norm equals the double-backward HVP, in float64."""
    dtype = torch.float64
    if kind == "cnn":
        model: nn.Module = omniglot_cnn(ways=5, hidden=16)
        x = torch.rand(10, 1, 28, 28, generator=_gen(1), dtype=dtype)
        y = torch.arange(5).repeat(2)

        def task_loss(out: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out, y)
    else:
        model = sinusoid_mlp()
        x = torch.rand(10, 1, generator=_gen(1), dtype=dtype) * 10 - 5
        y = torch.sin(x)

        def task_loss(out: torch.Tensor) -> torch.Tensor:
            return mse(out, y)

    fn, params = make_functional(model, _gen(0), dtype=dtype)

    def loss(p: Params) -> torch.Tensor:
        return task_loss(fn(p, x))

    gen = _gen(5)
    v = {k: torch.randn(t.shape, generator=gen, dtype=dtype) for k, t in params.items()}
    _, hvp_fwd = jvp(grad(loss), (params,), (v,))

    leaves = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    g = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    hvp_rev = torch.autograd.grad(g, list(leaves.values()), grad_outputs=list(v.values()))
    for (k, a), b in zip(hvp_fwd.items(), hvp_rev):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=f"HVP mismatch in {k}")
    assert max(float(t.abs().max()) for t in hvp_fwd.values()) > 1e-6  # not trivially zero

    # and under vmap over tasks, as the meta-gradient's linear solves use it
    bp = _batched(params, 2, _gen(6))
    bv = {k: t.expand(2, *t.shape) for k, t in v.items()}
    hv = vmap(lambda p, vv: jvp(grad(loss), (p,), (vv,))[1])(bp, bv)
    for i in range(2):
        _, ref = jvp(grad(loss), ({k: t[i] for k, t in bp.items()},), (v,))
        for k in ref:
            torch.testing.assert_close(hv[k][i], ref[k], **TOL[dtype])


def test_functional_call_with_float64_params_on_float32_module() -> None:
    model = omniglot_cnn(ways=3, hidden=8)
    fn, params = make_functional(model, _gen(0), dtype=torch.float64)
    out = fn(params, torch.rand(4, 1, 28, 28, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert functional_call(model, params, (torch.rand(4, 1, 28, 28, dtype=torch.float64),)).shape == (4, 3)


def test_mse_equals_torch_mse_loss() -> None:
    a, b = torch.rand(7, 1, generator=_gen(0)), torch.rand(7, 1, generator=_gen(1))
    torch.testing.assert_close(mse(a, b), F.mse_loss(a, b))


def test_batch_stat_norm_equals_torch_batch_norm() -> None:
    from bilevel.metalearn.models import BatchStatNorm2d

    norm = BatchStatNorm2d(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64, generator=_gen(0))
    ref = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True)
    torch.testing.assert_close(norm(x), ref, rtol=1e-12, atol=1e-12)


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
def test_batched_model_hvp_by_double_backward_equals_per_task_hvp(
    model: ConvNet, which: str, channels_last: bool, monkeypatch: pytest.MonkeyPatch
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
    B = 3
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


@pytest.mark.parametrize("stride,padding,size", [(2, 1, 9), (1, 1, 7), (2, 0, 8), (2, 1, 6)])
def test_grouped_conv_function_gradgradcheck(stride: int, padding: int, size: int) -> None:
    """The exact model's convolution: values of F.conv2d, first and second derivatives by gradcheck."""
    from bilevel.metalearn._kernels import GroupedConv2d

    G = 3
    x = torch.randn(2, G * 2, size, size, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    w = torch.randn(G * 3, 2, 3, 3, dtype=torch.float64, generator=_gen(1), requires_grad=True)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return GroupedConv2d.apply(x, w, stride, padding, G)

    torch.testing.assert_close(f(x, w), F.conv2d(x, w, None, stride, padding, 1, G), rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("stride,padding,size", [(2, 1, 9), (1, 1, 7), (2, 0, 8)])
def test_conv_weight_grad_function_values_and_gradcheck(stride: int, padding: int, size: int) -> None:
    """The weight gradient by PyTorch's kernel: equal to autograd's, and its own derivatives (the
    HVP terms) by gradcheck in float64."""
    from bilevel.metalearn._kernels import ConvWeightGrad

    G = 3
    x = torch.randn(2, G * 2, size, size, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    w = torch.randn(G * 3, 2, 3, 3, dtype=torch.float64, generator=_gen(1), requires_grad=True)
    y = F.conv2d(x, w, None, stride, padding, 1, G)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=_gen(2), requires_grad=True)
    (ref,) = torch.autograd.grad(y, w, gy)
    got = ConvWeightGrad.apply(x, gy, w.detach(), stride, padding, G)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    wd = w.detach()
    assert torch.autograd.gradcheck(lambda a, b: ConvWeightGrad.apply(a, b, wd, stride, padding, G), (x, gy))


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


def test_batch_norm_gradient_function_gradcheck() -> None:
    """The batch-norm gradient node: PyTorch's first derivatives, and its written-out vector-Jacobian
    product (the second derivatives of batch norm) by gradcheck in float64, at random cotangents."""
    from bilevel.metalearn._kernels import BatchNormGrad

    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    gamma = torch.rand(4, dtype=torch.float64, generator=_gen(1)).add(0.5).requires_grad_(True)
    gy = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=_gen(2), requires_grad=True)
    var, mean = torch.var_mean(x.detach(), (0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)

    def f(gy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # the statistics from x inside f, as the forward saves them: d/dx must see them move
        v, mu = torch.var_mean(x.detach(), (0, 2, 3), correction=0)
        out = BatchNormGrad.apply(gy, x, gamma, mu, torch.rsqrt(v + 1e-5), 1e-5)
        return tuple(out)

    ref = torch.autograd.grad(
        F.batch_norm(x, None, None, gamma, torch.zeros_like(gamma), True, 0.0, 1e-5), (x, gamma), gy
    )
    got = BatchNormGrad.apply(gy, x, gamma, mean, invstd, 1e-5)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2], gy.sum((0, 2, 3)), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(f, (gy, x, gamma))


def test_batch_norm_function_gradgradcheck() -> None:
    """The exact model's batch norm: values of F.batch_norm, derivatives by gradcheck."""
    from bilevel.metalearn._kernels import BatchNorm

    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    gamma = torch.rand(4, dtype=torch.float64, generator=_gen(1)).add(0.5).requires_grad_(True)
    beta = torch.randn(4, dtype=torch.float64, generator=_gen(2), requires_grad=True)

    def f(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return BatchNorm.apply(x, gamma, beta, 1e-5)

    ref = F.batch_norm(x, None, None, gamma, beta, True, 0.0, 1e-5)
    torch.testing.assert_close(f(x, gamma, beta), ref, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(f, (x, gamma, beta))
    assert torch.autograd.gradgradcheck(f, (x, gamma, beta))


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


def test_the_released_initialization() -> None:
    """gain 1.73 Glorot-uniform conv/linear weights, their biases uniform in [0, 0.05], norms (1, 0)."""
    import math

    import torch.nn as nn

    from bilevel.metalearn.models import init_params, omniglot_cnn

    model = omniglot_cnn(5)
    p = init_params(model, torch.Generator().manual_seed(0), gain=1.73, bias=(0.0, 0.05))
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = p[f"{name}.weight"]
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
            bound = 1.73 * math.sqrt(6.0 / (fan_in + fan_out))
            assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
            if mod.bias is not None:
                b = p[f"{name}.bias"]
                assert float(b.min()) >= 0.0 and float(b.max()) <= 0.05 and float(b.std()) > 0
    norms = [k for k in p if ".norm." in k]
    assert norms and all(
        float(p[k].abs().sum()) == (p[k].numel() if k.endswith("weight") else 0) for k in norms
    )
