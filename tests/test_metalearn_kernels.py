"""Tests of `bilevel.metalearn._kernels`: the hand-written autograd Functions against PyTorch's
kernels, their first and second derivatives by gradcheck / gradgradcheck in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bilevel.metalearn._kernels import BatchNorm, BatchNormGrad, ConvWeightGrad, GroupedConv2d


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("stride,padding,size", [(2, 1, 9), (1, 1, 7), (2, 0, 8), (2, 1, 6)])
def test_grouped_conv_function_gradgradcheck(stride: int, padding: int, size: int) -> None:
    """The exact model's convolution: values of F.conv2d, first and second derivatives by gradcheck."""

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


def test_batch_norm_gradient_function_gradcheck() -> None:
    """The batch-norm gradient node: PyTorch's first derivatives, and its written-out vector-Jacobian
    product (the second derivatives of batch norm) by gradcheck in float64, at random cotangents."""

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

    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    gamma = torch.rand(4, dtype=torch.float64, generator=_gen(1)).add(0.5).requires_grad_(True)
    beta = torch.randn(4, dtype=torch.float64, generator=_gen(2), requires_grad=True)

    def f(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return BatchNorm.apply(x, gamma, beta, 1e-5)

    ref = F.batch_norm(x, None, None, gamma, beta, True, 0.0, 1e-5)
    torch.testing.assert_close(f(x, gamma, beta), ref, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(f, (x, gamma, beta))
    assert torch.autograd.gradgradcheck(f, (x, gamma, beta))


def test_batch_norm_gradient_node_gives_the_same_product_every_time_through_one_graph() -> None:
    """The node keeps its cotangent-free terms for the next product (CG's matvecs reuse one
    graph): the first, second and third products through one graph equal fresh graphs'."""
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    gamma = torch.rand(4, dtype=torch.float64, generator=_gen(1)).add(0.5).requires_grad_(True)
    gy = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=_gen(2), requires_grad=True)
    var, mean = torch.var_mean(x.detach(), (0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    us = [torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=_gen(10 + i)) for i in range(3)]

    def vjp(u: torch.Tensor, out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        out = out or BatchNormGrad.apply(gy, x, gamma, mean, invstd, 1e-5)
        return torch.autograd.grad(out[0], (gy, x, gamma), u, retain_graph=True)

    shared = BatchNormGrad.apply(gy, x, gamma, mean, invstd, 1e-5)
    for u in us:
        for got, ref in zip(vjp(u, shared), vjp(u)):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
