"""Hand-written autograd Functions of the batched ConvNet (`..batched.batched_model`).

`GroupedConv2d` and `BatchNorm` have the values and gradients of ``F.conv2d`` (grouped) and
``F.batch_norm`` (batch statistics), with backward passes made of a few differentiable ops
(`ConvWeightGrad`, `BatchNormGrad`), so a Hessian-vector product costs few ops per layer.
`FlatConvNetCE` computes per-task cross-entropies of a ConvNet at flat parameters with their
gradient taken in the forward pass (first order only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "BatchNorm",
    "BatchNormGrad",
    "ConvWeightGrad",
    "FlatConvNetCE",
    "FlatPlan",
    "GroupedConv2d",
]


class GroupedConv2d(torch.autograd.Function):
    """A grouped 3x3 convolution (no bias) whose backward is two grouped convolutions.

    Same values and gradients as ``F.conv2d(x, w, None, stride, padding, 1, groups)``, but its
    backward is itself made of differentiable convolutions, so a Hessian-vector product (double
    backward) costs a few grouped convolutions per layer.  PyTorch's own double backward of a
    grouped convolution loops over the groups: with B = 32 tasks, 107 convolutions and 860 ops per
    HVP of the Omniglot CNN (measured, torch 2.13).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, groups: int
    ) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, groups)
        return F.conv2d(x, w, None, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        stride, padding, G = ctx.conf
        _, _, H, W = x.shape
        k = w.shape[-1]
        h, wd = gy.shape[-2:]
        gx = gw = None
        if ctx.needs_input_grad[0]:
            out_pad = (H + 2 * padding - k - (h - 1) * stride, W + 2 * padding - k - (wd - 1) * stride)
            gx = F.conv_transpose2d(gy, w, None, stride, padding, out_pad, G)
        if ctx.needs_input_grad[1]:
            gw = ConvWeightGrad.apply(x, gy, w.detach(), stride, padding, G)
        return gx, gw, None, None, None


class ConvWeightGrad(torch.autograd.Function):
    """The weight gradient of a grouped convolution, ``dW = Wgrad(x, gy)``, by PyTorch's own kernel
    (one ``convolution_backward``), differentiable once in ``x`` and ``gy``.

    ``dW`` is bilinear in (x, gy); for an upstream U shaped like W its vector-Jacobian products
    are the input gradient of the convolution with weight U (d/dx) and the convolution of x by
    U (d/dgy): two native grouped kernels.  So an HVP through `GroupedConv2d` costs a few grouped
    convolutions per layer, where writing dW as a convolution of the images by the output
    gradients (dilated, large kernel) measured 1.8x slower per HVP on CPU.  Third derivatives
    are refused (``once_differentiable``): nothing here takes them.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, gy: torch.Tensor, w: torch.Tensor, stride: int, padding: int, groups: int
    ) -> torch.Tensor:
        ctx.save_for_backward(x, gy)
        ctx.conf = (stride, padding, groups)
        gw = _conv_backward(gy, x, w, stride, padding, groups, (False, True))[1]
        assert gw is not None
        return gw

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gy = ctx.saved_tensors
        stride, padding, G = ctx.conf
        gx = ggy = None
        if ctx.needs_input_grad[0]:
            gx = _conv_backward(gy, x, u, stride, padding, G, (True, False))[0]
        if ctx.needs_input_grad[1]:
            ggy = F.conv2d(x, u, None, stride, padding, 1, G)
        return gx, ggy, None, None, None, None


def _conv_backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    stride: int,
    padding: int,
    groups: int,
    mask: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dW) of ``F.conv2d(x, w, None, stride, padding, 1, groups)`` for the output gradient gy, as
    ``mask`` asks (one ATen ``convolution_backward``)."""
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gy, x, w, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], groups, [*mask, False]
    )
    return gx, gw


class BatchNorm(torch.autograd.Function):
    """Batch norm with batch statistics over (N, H, W) per channel, whose backward is one node
    (`BatchNormGrad`) with a written-out second derivative.

    Same values and gradients as ``F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)``
    (PyTorch's own kernels, forward and backward); PyTorch's double backward of it takes about
    160 ops per layer (measured, torch 2.13), `BatchNormGrad`'s about 50.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float
    ) -> torch.Tensor:
        out, mean, invstd = torch.ops.aten.native_batch_norm(x, gamma, beta, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, gamma, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gamma, mean, invstd = ctx.saved_tensors
        gx, ggamma, gbeta = BatchNormGrad.apply(gy, x, gamma, mean, invstd, ctx.eps)
        return gx, ggamma, gbeta, None


class BatchNormGrad(torch.autograd.Function):
    """The gradient of batch norm, (gx, ggamma, gbeta) of (gy, x, gamma), by PyTorch's kernel, with
    its vector-Jacobian product written out (differentiable once).

    Per channel, over its m = N H W positions, with r = (var + eps)^-1/2, xh = (x - mean) r:
    gx = gamma r (gy - mean(gy) - xh mean(gy xh)), ggamma = sum(gy xh), gbeta = sum(gy).  For
    cotangents (u, a, b) of (gx, ggamma, gbeta), with S = sum(u xh), k = mean(gy xh) and
    dgamma = r sum(u (gy - mean(gy) - xh k)):

        d gy    = gamma r (u - mean(u) - xh mean(u xh)) + a xh + b
        d gamma = dgamma
        d x     = r (w - mean(w) - xh mean(w xh)) - gamma r dgamma xh / m,
                  w = a gy - gamma r (gy S / m + k u)

    (x enters through xh and through r, dr/dx = -r^2 xh / m).  Checked by gradcheck in float64
    and by HVPs of the batched model against per-task forward-over-reverse HVPs.
    """

    @staticmethod
    def forward(
        ctx: Any,
        gy: torch.Tensor,
        x: torch.Tensor,
        gamma: torch.Tensor,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(gy, x, gamma, mean, invstd)
        gx, ggamma, gbeta = torch.ops.aten.native_batch_norm_backward(
            gy, x, gamma, None, None, mean, invstd, True, eps, [True, True, True]
        )
        return gx, ggamma, gbeta

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        dims = (0, 2, 3)
        if not hasattr(ctx, "fixed"):
            # the terms that do not depend on the cotangents, kept for the next HVP through this
            # node (CG's matvecs reuse one gradient graph): 9 ops fewer per layer and HVP
            gy, x, gamma, mean, invstd = ctx.saved_tensors
            r = invstd.view(1, -1, 1, 1)
            xh = (x - mean.view(1, -1, 1, 1)) * r
            k = (gy * xh).mean(dims, keepdim=True)
            gyk = gy - gy.mean(dims, keepdim=True) - xh * k
            ctx.fixed = (gy, xh, k, gyk, r, gamma.view(1, -1, 1, 1) * r, x.numel() // x.shape[1])
        gy, xh, k, gyk, r, gr, m = ctx.fixed
        a4, b4 = a.view(1, -1, 1, 1), b.view(1, -1, 1, 1)
        u_xh = (u * xh).mean(dims, keepdim=True)  # S / m
        dgamma = (u * gyk).sum(dims, keepdim=True) * r
        d_gy = gr * (u - u.mean(dims, keepdim=True) - xh * u_xh) + a4 * xh + b4
        w = a4 * gy - gr * (gy * u_xh + k * u)
        d_x = (
            r * (w - w.mean(dims, keepdim=True) - xh * (w * xh).mean(dims, keepdim=True))
            - (gr * dgamma / m) * xh
        )
        return d_gy, d_x, dgamma.view(-1), None, None, None


@dataclasses.dataclass(frozen=True)
class FlatPlan:
    """Where each tensor of a ConvNet lies in the flat (B, n) parameters, and the fixed inputs in
    chunks of tasks."""

    sizes: list[int]
    shapes: list[tuple[int, ...]]
    # per block: (weight, bias or -1, gamma, beta) indices into sizes, stride, padding, eps, pool
    blocks: list[tuple[tuple[int, int, int, int], int, int, float, bool]]
    head: tuple[int, int]
    chunk: int  # tasks per chunk
    xs: list[torch.Tensor]  # per chunk of c tasks: (N, c C, H, W), task b owns channels [b C, (b + 1) C)
    targets: list[torch.Tensor]  # per chunk: (c, N, ways) = -onehot(y) / N: the loss is sum(logp * target)


class FlatConvNetCE(torch.autograd.Function):
    """Per-task mean cross-entropies (B,) of a batched ConvNet at flat parameters X (B, n), with
    their gradient computed in the forward pass: first order only.

    The same values as `BatchedModel.fast` followed by `task_losses` (cross-entropy), and the
    same gradient as autograd through them, computed with the same kernels (``convolution_backward``,
    ``native_batch_norm_backward``, ``threshold_backward``, ``max_pool2d_with_indices_backward``)
    but without autograd's bookkeeping of the per-tensor views of X, their reshapes and
    gradient accumulation.  The tasks are taken ``plan.chunk`` at a time, each chunk's backward
    right after its forward while its activations are in the cache (on CPU, B = 32 query sets of
    75 images in one grouped call, or all forwards before all backwards, measured 1.2-1.6x
    slower); the parameters are rearranged once for all chunks.  Where X needs no gradient the
    backward is skipped; ``backward`` scales the stored per-task gradients by the upstream (B,).
    """

    @staticmethod
    def forward(ctx: Any, X: torch.Tensor, plan: FlatPlan) -> tuple[torch.Tensor, torch.Tensor]:
        B, c = X.shape[0], plan.chunk
        need = ctx.needs_input_grad[0]
        parts = X.split(plan.sizes, 1)

        def per_chunk(i: int, n_rows: int) -> tuple[torch.Tensor, ...]:
            # tensor i for all tasks in the grouped layout (one copy), split into chunks (views)
            shape = plan.shapes[i]
            t = parts[i].reshape(B * shape[0], *shape[1:]) if len(shape) > 1 else parts[i].reshape(-1)
            return (t,) if c >= B else t.split(c * n_rows)

        # per block: (weight, bias or None, gamma, beta), each a tuple of per-chunk tensors
        layers = [
            (
                per_chunk(iw, plan.shapes[iw][0]),
                per_chunk(ib, plan.shapes[iw][0]) if ib >= 0 else None,
                per_chunk(ig, plan.shapes[iw][0]),
                per_chunk(ibeta, plan.shapes[iw][0]),
            )
            for (iw, ib, ig, ibeta), *_ in plan.blocks
        ]
        wh_all = parts[plan.head[0]].view(B, *plan.shapes[plan.head[0]])  # (B, ways, F)
        hb_all = parts[plan.head[1]]
        whs, hbs = ((wh_all,), (hb_all,)) if c >= B else (wh_all.split(c), hb_all.split(c))
        losses, logits_all = [], []
        grads: list[list[torch.Tensor]] = [[] for _ in plan.sizes]
        for j, (xj, target) in enumerate(zip(plan.xs, plan.targets)):
            h = xj
            saved = []
            cj = target.shape[0]
            for (ws, bs, gs, betas), (_, stride, padding, eps, pool) in zip(layers, plan.blocks):
                w = ws[j]
                z = F.conv2d(h, w, None, stride, padding, 1, cj)
                if bs is not None:
                    z = z + bs[j].view(1, -1, 1, 1)
                out, mean, invstd = torch.ops.aten.native_batch_norm(
                    z, gs[j], betas[j], None, None, True, 0.0, eps
                )
                a = torch.relu(out)
                pre, idx = None, None
                if pool:
                    pre = a
                    a, idx = torch.ops.aten.max_pool2d_with_indices(a, [2, 2], [2, 2])
                saved.append((h, w, z, gs[j], mean, invstd, out, pre, idx, eps, stride, padding))
                h = a
            N = h.shape[0]
            feat = h.reshape(N, cj, -1).transpose(0, 1)  # (c, N, C h w), per-task C-major like flatten
            wh = whs[j]
            logits = torch.baddbmm(hbs[j].unsqueeze(1), feat, wh.transpose(1, 2))
            logp = torch.log_softmax(logits, -1)
            losses.append((logp * target).sum((1, 2)))
            logits_all.append(logits)
            if need:
                _flat_backward(plan, grads, saved, feat, wh, logp, target, h.shape)
            del saved
        loss, logits = _cat_chunks(losses), _cat_chunks(logits_all)
        ctx.mark_non_differentiable(logits)
        if need:
            ctx.grad = torch.cat([_cat_chunks(g).reshape(B, -1) for g in grads], 1)
        return loss, logits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, go: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        grad = ctx.grad
        del ctx.grad
        return grad * go.unsqueeze(1), None


def _cat_chunks(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _flat_backward(
    plan: FlatPlan,
    grads: list[list[torch.Tensor]],
    saved: list[Any],
    feat: torch.Tensor,
    wh: torch.Tensor,
    logp: torch.Tensor,
    target: torch.Tensor,
    hshape: torch.Size,
) -> None:
    """Append one chunk's gradients of sum(per-task losses) to ``grads`` (per tensor of the plan)."""
    c, N = feat.shape[:2]
    # d/dlogits of sum(logp * target) per task: softmax * sum(target) - target, sum(target) = -1
    gl = logp.exp().mul_(1.0 / N).add_(target)
    grads[plan.head[0]].append(torch.bmm(gl.transpose(1, 2), feat))
    grads[plan.head[1]].append(gl.sum(1))
    gh = torch.bmm(gl, wh).transpose(0, 1).reshape(hshape)
    for k in range(len(saved) - 1, -1, -1):
        # popped, so that each block's activations are freed once its gradient is taken
        h, w, z, gamma, mean, invstd, out, pre, idx, eps, stride, padding = saved.pop()
        (iw, ib, ig, ibeta) = plan.blocks[k][0]
        # each tensor is dropped once read (as autograd frees a node's saved tensors), which
        # measured 10% faster on CPU than holding them to the end (allocator reuse, cache)
        if pre is not None:
            gh = torch.ops.aten.max_pool2d_with_indices_backward(
                gh, pre, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
            )
        del pre, idx
        gh = torch.ops.aten.threshold_backward(gh, out, 0)
        del out
        gz, ggamma, gbeta = torch.ops.aten.native_batch_norm_backward(
            gh, z, gamma, None, None, mean, invstd, True, eps, [True, True, True]
        )
        del z
        grads[ig].append(ggamma)
        grads[ibeta].append(gbeta)
        if ib >= 0:
            grads[ib].append(gz.sum((0, 2, 3)))
        gin, gw = _conv_backward(gz, h, w, stride, padding, c, (k > 0, True))
        del gz, h, w
        assert gw is not None
        grads[iw].append(gw)
        if gin is not None:
            gh = gin
