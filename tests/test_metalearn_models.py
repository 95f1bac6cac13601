"""Tests of `bilevel.metalearn.models`: shapes, functional use, vmap, forward-over-reverse HVPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

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
