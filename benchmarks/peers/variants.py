"""Prototype iMAML meta-step variants: what each proposed engine change buys.

Every variant computes the same quantity as ``meta_gradient(MetaAlgorithm(GradientDescent(lr=lr,
max_iter=16, tol=0.0), Implicit(5, warm_start=False), lam), fn, F.cross_entropy, theta, batch,
diagnostics=False)`` (the mean task meta-gradient), and `check` verifies it in float64.
They are measurements for the maintainers of ``bilevel/metalearn/algorithms.py``, not library code:

``engine``        the engine as it is (every per-task computation vmapped).
``engine+diag``   the same with ``diagnostics=True`` (the default in training): one more gradient of G
                  and one more support forward per task.
``loop``          the engine with ``vectorize=False``: every per-task computation in a Python loop.  On
                  CPU a vmapped convolution with per-task weights becomes a grouped convolution, about
                  2x slower than separate convolutions once a task has tens of images (75 queries).
``batched``       no torch.func at all: a batched forward of the ConvNet that evaluates B per-task
                  models in one call (grouped convolutions, per-task batch statistics, ``baddbmm``
                  head), per-task gradients by one ``torch.autograd.grad`` of the summed task losses,
                  the proximal gradient lam (phi - theta) added in closed form, in-place ``_foreach``
                  GD updates, the linearization by one ``create_graph`` gradient and each CG step by
                  one backward through it; query gradient task by task.
``batched+fused-bn``  as ``batched``, but the first-order gradients (inner steps, query) use
                  ``F.batch_norm`` (fused, about 2x faster than the norm in tensor ops); the
                  linearization keeps the tensor-op norm, whose double backward is exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bilevel.metalearn import algorithms as A
from bilevel.metalearn.models import ConvNet
from bilevel.metalearn.tasks import Task
from bilevel.solvers import GradientDescent

Params = dict[str, torch.Tensor]


def engine(
    fn: Any, theta: Params, batch: Task, algo: A.MetaAlgorithm, diagnostics: bool = False
) -> list[torch.Tensor]:
    g, _, _ = A.meta_gradient(algo, fn, F.cross_entropy, theta, batch, diagnostics=diagnostics)
    return list(g.values())


def _query_loop(fn: Any, phi: Params, batch: Task) -> Params:
    """Per-task query gradients with plain autograd, stacked (B, ...)."""
    names = list(phi)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for i in range(batch.query_x.shape[0]):
        p = {k: phi[k][i].detach().requires_grad_(True) for k in names}
        with torch.enable_grad():
            gs = torch.autograd.grad(
                F.cross_entropy(fn(p, batch.query_x[i]), batch.query_y[i]), list(p.values())
            )
        for k, g in zip(names, gs):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


def loop(fn: Any, theta: Params, batch: Task, algo: A.MetaAlgorithm) -> list[torch.Tensor]:
    g, _, _ = A.meta_gradient(algo, fn, F.cross_entropy, theta, batch, vectorize=False, diagnostics=False)
    return list(g.values())


def batched_convnet(model: ConvNet, norm: str = "ops") -> Any:
    """``bfn(params_B, x_B) -> logits (B, N, ways)``: B per-task models of ``model`` in one call.

    Only for `ConvNet` with stride-2 convolutions and no conv bias (the Omniglot CNN).  Batch
    statistics are per task and channel.  ``norm="ops"`` writes the normalization in tensor ops
    (mean, centred second moment), exact under double backward; ``norm="fused"`` calls
    ``F.batch_norm`` on the B * C channels, about 2x faster but with a wrong double backward under
    vmap in torch 2.13, so only for first-order gradients (inner steps, query gradient).
    """
    n_blocks = len(model.features)
    if norm not in ("ops", "fused"):
        raise ValueError(f"batched_convnet(norm={norm!r}): 'ops' or 'fused'")

    def bfn(p: Params, x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape[:2]
        h = x.transpose(0, 1).reshape(N, B * x.shape[2], *x.shape[3:])
        for i in range(n_blocks):
            w = p[f"features.block{i}.conv.weight"]
            C = w.shape[1]
            h = F.conv2d(h, w.reshape(B * C, *w.shape[2:]), stride=2, padding=1, groups=B)
            gamma, beta = p[f"features.block{i}.norm.weight"], p[f"features.block{i}.norm.bias"]
            if norm == "fused":
                h = F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), training=True, eps=1e-5)
            else:
                hh = h.unflatten(1, (B, C))
                hc = hh - hh.mean((0, 3, 4), keepdim=True)
                var = (hc * hc).mean((0, 3, 4), keepdim=True)
                hh = (
                    hc * (torch.rsqrt(var + 1e-5) * gamma[None, :, :, None, None])
                    + beta[None, :, :, None, None]
                )
                h = hh.flatten(1, 2)
            h = torch.relu(h)
        feat = h.reshape(N, B, -1).transpose(0, 1)
        return torch.baddbmm(p["head.bias"].unsqueeze(1), feat, p["head.weight"].transpose(1, 2))

    return bfn


def centered_bn(model: ConvNet) -> ConvNet:
    """A copy of ``model`` whose batch-statistics norm computes the variance from the centred input.

    Same function as `BatchStatNorm2d` (the biased variance, two-pass), but reuses x - mean for the
    variance instead of calling ``Tensor.var``, a slow strided reduction on CPU.
    """
    import copy
    import types

    from bilevel.metalearn.models import BatchStatNorm2d

    def forward(self: BatchStatNorm2d, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean((0, 2, 3), keepdim=True)
        var = (xc * xc).mean((0, 2, 3), keepdim=True)
        return xc * (torch.rsqrt(var + self.eps) * self.weight[:, None, None]) + self.bias[:, None, None]

    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, BatchStatNorm2d):
            m.forward = types.MethodType(forward, m)  # type: ignore[method-assign]
    return out


def batched_loss(bfn: Any, p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of each task's mean cross-entropy (so its gradient is the per-task gradients)."""
    out = bfn(p, x)
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]


def batched(
    fn: Any, bfn: Any, theta: Params, batch: Task, algo: A.MetaAlgorithm, bfn1: Any = None
) -> list[torch.Tensor]:
    """The batched variant; ``bfn1`` (default ``bfn``) is used for the first-order gradients."""
    assert isinstance(algo.inner, GradientDescent) and isinstance(algo.meta_gradient, A.Implicit)
    bfn1 = bfn if bfn1 is None else bfn1
    lam, lr = float(algo.lam), algo.inner.lr
    names = list(theta)
    B = batch.support_x.shape[0]
    th = [theta[k].detach().unsqueeze(0) for k in names]
    phi = [t.expand(B, *t.shape[1:]).clone() for t in th]
    xs, ys = batch.support_x, batch.support_y
    for _ in range(algo.inner.max_iter):
        leaves = [t.requires_grad_(True) for t in phi]
        with torch.enable_grad():
            gs = torch.autograd.grad(batched_loss(bfn1, dict(zip(names, leaves)), xs, ys), leaves)
        phi = [t.detach() for t in leaves]
        # phi <- phi - lr (grad Lhat + lam (phi - theta)), in place
        torch._foreach_add_(list(gs), torch._foreach_sub(phi, th), alpha=lam)
        torch._foreach_add_(phi, list(gs), alpha=-lr)
    v = _query_loop(fn if bfn1 is bfn else _single(bfn1), dict(zip(names, phi)), batch)
    # linearization: the gradient graph at phi, kept; each HVP is one backward through it
    leaves = [t.requires_grad_(True) for t in phi]
    with torch.enable_grad():
        gl = torch.autograd.grad(
            batched_loss(bfn, dict(zip(names, leaves)), xs, ys), leaves, create_graph=True
        )

    def H(u: list[torch.Tensor]) -> list[torch.Tensor]:
        hu = torch.autograd.grad(gl, leaves, u, retain_graph=True)
        return torch._foreach_add(list(hu), u, alpha=lam)

    w = _batched_cg(H, [v[k] for k in names], algo.meta_gradient.cg_iters)
    return [lam * t.mean(0) for t in w]


def _single(bfn: Any) -> Any:
    """The per-task model ``fn(params, x)`` of a batched one."""

    def fn(p: Params, x: torch.Tensor) -> torch.Tensor:
        return bfn({k: v.unsqueeze(0) for k, v in p.items()}, x.unsqueeze(0))[0]

    return fn


def _bdot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum(torch.einsum("b...,b...->b", x, y) for x, y in zip(a, b))  # type: ignore[return-value]


def _bscale(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (t.ndim - 1)))


def _batched_cg(H: Any, b: list[torch.Tensor], iters: int) -> list[torch.Tensor]:
    """Per-task CG from 0 (the engine's recursion, without its negative-curvature bookkeeping)."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = _bdot(r, r)
    for _ in range(iters):
        Hp = H(p)
        alpha = rr / _bdot(p, Hp)
        x = [xi + _bscale(alpha, pi) * pi for xi, pi in zip(x, p)]
        r = [ri - _bscale(alpha, hi) * hi for ri, hi in zip(r, Hp)]
        rr_new = _bdot(r, r)
        beta = rr_new / rr
        p = [ri + _bscale(beta, pi) * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return x


def maml_batched(fn: Any, bfn: Any, theta: Params, batch: Task, steps: int, lr: float) -> list[torch.Tensor]:
    """Unrolled MAML with the batched model and plain autograd (``create_graph`` inner steps).

    The same quantity as ``meta_gradient(make_algorithm("maml", ...), ...)``: the mean over tasks of
    d L_i(phi_i(theta)) / d theta with phi_i after ``steps`` SGD steps on the support loss.  Query
    losses are evaluated task by task (see ``loop``), summed, and differentiated once.
    """
    names = list(theta)
    th = [theta[k].detach().requires_grad_(True) for k in names]
    B = batch.support_x.shape[0]
    with torch.enable_grad():
        phi = [t.unsqueeze(0).expand(B, *t.shape) for t in th]
        for _ in range(steps):
            gs = torch.autograd.grad(
                batched_loss(bfn, dict(zip(names, phi)), batch.support_x, batch.support_y),
                phi,
                create_graph=True,
            )
            phi = torch._foreach_add(phi, list(gs), alpha=-lr)
        total = sum(
            F.cross_entropy(fn({k: t[i] for k, t in zip(names, phi)}, batch.query_x[i]), batch.query_y[i])
            for i in range(B)
        )
        return list(torch.autograd.grad(total / B, th))  # type: ignore[operator]


def variants(model: ConvNet, fn: Any, algo: A.MetaAlgorithm) -> dict[str, Any]:
    """name -> f(theta, batch) returning the mean meta-gradient as a list in ``theta``'s order."""
    bfn = batched_convnet(model)
    fused = batched_convnet(model, "fused")
    return {
        "engine": lambda th, b: engine(fn, th, b, algo),
        "engine+diag": lambda th, b: engine(fn, th, b, algo, diagnostics=True),
        "loop": lambda th, b: loop(fn, th, b, algo),
        "batched": lambda th, b: batched(fn, bfn, th, b, algo),
        "batched+fused-bn": lambda th, b: batched(fn, bfn, th, b, algo, fused),
    }


def check(model: ConvNet, fn: Any, theta: Params, batch: Task, algo: A.MetaAlgorithm) -> dict[str, float]:
    """Relative error of each variant against the engine (call in float64)."""
    vs = variants(model, fn, algo)
    ref = vs["engine"](theta, batch)
    out = {}
    for name, f in vs.items():
        g = f(theta, batch)
        num = sum(float(((a - c) ** 2).sum()) for a, c in zip(g, ref))
        den = sum(float((c**2).sum()) for c in ref)
        out[name] = (num / den) ** 0.5
    return out


__all__ = ["batched_convnet", "check", "maml_batched", "variants"]
