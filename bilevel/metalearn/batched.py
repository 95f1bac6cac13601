"""The batched-model seam: B per-task copies of a model evaluated in one call (`BatchedModel`).

`batched_model` builds one from a `ConvNet` (grouped convolutions over the B tasks, its few-op
double backward in `._kernels`) or an `MLP` (batched matrix products); `BatchedModel.from_function`
from any per-task ``fn(params, x)``.  `task_losses` evaluates a loss per task in one call.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import BilevelWarning
from ._kernels import BatchNorm, FlatConvNetCE, FlatPlan, GroupedConv2d
from .models import MLP, BatchStatNorm2d, ConvNet, Params, mse

__all__ = [
    "CPU_CHANNELS_LAST",
    "DOUBLE_BACKWARD",
    "BatchedModel",
    "FlatLossBuilder",
    "as_batched",
    "batched_model",
    "grouped_input",
    "task_losses",
]


#: ``(names, shapes, x, y, chunk) -> (X (B, n) -> (per-task losses (B,), logits (B, N, ways)))``:
#: see `BatchedModel.flat_cross_entropy`.
FlatLossBuilder = Callable[
    [Sequence[str], Sequence[tuple[int, ...]], torch.Tensor, torch.Tensor, int | None],
    Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
]


@dataclasses.dataclass(frozen=True)
class BatchedModel:
    """B per-task copies of a model evaluated in one call: ``exact(params_B, x_B) -> out_B``.

    The one seam between the meta-learning algorithms and the model: every algorithm runs its
    per-task models through a `BatchedModel`, built either from the model's structure
    (`batched_model`: grouped convolutions, no ``torch.func``) or from any per-task function
    (`BatchedModel.from_function`: ``torch.func.vmap`` of it, or a Python loop).

    ``params_B`` has a leading task dimension B on every tensor, ``x_B`` is ``(B, N, ...)`` and the
    output ``(B, N, ...)``; task b's output is ``fn(params_B[b], x_B[b])`` (batch statistics per task).
    Task losses are then independent, so one ``torch.autograd.grad`` of their sum returns every
    task's gradient.

    Attributes:
        exact: the batched forward for autograd's double backward (Hessian-vector products by
            reverse over reverse, unrolled differentiation): exact there, and built for few ops
            per HVP; it need not support ``torch.func`` transforms.
        fast: the same function for gradients, inference and ``torch.func`` transforms
            (forward-over-reverse HVPs); exact there (never through ``F.batch_norm``
            under ``vmap``, whose double backward is wrong in torch 2.13).
        single: ``fast`` for one task, ``single(params, x) -> out`` (no leading B).
        flat_cross_entropy: ``None``, or a builder ``(names, shapes, x, y, chunk) -> f`` where
            ``f(X)`` returns the B tasks' mean cross-entropies (B,) and their logits
            (B, N, ways; not differentiable) of the models whose
            parameters are the rows of the flat ``X`` (B, n) (tensors ``names`` of ``shapes``,
            raveled in that order), on inputs ``x`` (B, N, ...) and class indices ``y`` (B, N),
            ``chunk`` tasks at a time (``None``: all B; `chunk` gives the value to pass):
            the `fast` model and `task_losses` in one autograd node whose gradient is written
            out and taken in its forward pass (PyTorch's own backward kernels, about half the
            ops of autograd through the per-tensor views).  Differentiable once, in ``X`` only,
            and not by ``torch.func``: for gradient-only solvers and query gradients.
            `compiled` drops it.
        cpu_chunk: on CPU, evaluate large per-task batches (query sets, `outputs`) this many
            tasks per call; ``None``: all B tasks in one call.  A grouped convolution over B = 32
            tasks of 75 images is 1.6x slower on CPU than 32 separate ones (its tensors leave the
            cache), while one over 4 tasks is faster than 4 separate ones (measured, 1 thread):
            chunks keep the speed at a fraction of the ops.  First-order MAML's meta-step
            (meta-batch 32, channels-last, 1 thread) measured 1291 / 1326 / 1484 / 1742 ms with
            chunks of 2 / 4 / 8 / 16 tasks: 4 is the default.  Accelerators take all B at once.
    """

    exact: Callable[[Params, torch.Tensor], torch.Tensor]
    fast: Callable[[Params, torch.Tensor], torch.Tensor]
    single: Callable[[Params, torch.Tensor], torch.Tensor]
    cpu_chunk: int | None = None
    flat_cross_entropy: FlatLossBuilder | None = None

    def chunk(self, x: torch.Tensor) -> int:
        """Tasks per call for the large per-task batches ``x`` (B, N, ...): all B unless on CPU with
        ``cpu_chunk`` set and tasks of 20 or more examples."""
        B = x.shape[0]
        if self.cpu_chunk is None or x.device.type != "cpu" or x[0].shape[0] < 20:
            return B
        return min(B, self.cpu_chunk)

    @classmethod
    def from_function(
        cls, fn: Callable[[Params, torch.Tensor], torch.Tensor], *, vectorize: bool = True
    ) -> BatchedModel:
        """The `BatchedModel` of any per-task ``fn(params, x)``: ``torch.func.vmap`` over the task
        dimension (``vectorize=True``), or a Python loop over tasks with stacked outputs (for
        models or ops without batching rules).

        Raises:
            TypeError: ``vectorize`` is not a bool (a truthy name such as ``"loop"`` would choose vmap).
        """
        if not isinstance(vectorize, bool):
            raise TypeError(
                f"BatchedModel.from_function(vectorize={vectorize!r}): choose the engine with a bool: True "
                "(torch.func.vmap over the tasks) or False (a loop over the tasks)"
            )
        if vectorize:
            mapped = torch.func.vmap(fn)
            return cls(mapped, mapped, fn)

        def looped(p: Params, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([fn({k: v[i] for k, v in p.items()}, x[i]) for i in range(x.shape[0])])

        return cls(looped, looped, fn)

    def compiled(self, mode: str | None = None) -> BatchedModel:
        """This model with `fast` under ``torch.compile`` (``dynamic=False``, ``mode``).

        `fast` runs the inner steps, the query gradients and evaluation, so these run as captured
        graphs (on CUDA, ``mode="reduce-overhead"`` replays them as CUDA graphs); `exact` stays
        eager, since ``torch.compile`` does not support double backward (HVPs, MAML's path).
        Values equal the eager model's to rounding (tested: meta-gradients of imaml-gd, fomaml
        and maml, float32 1e-5 and float64 1e-10 relative).  The first call of each input shape
        compiles (tens of seconds on CPU).  Where ``torch.compile`` cannot capture the model, the
        model warns once, saying why, and runs eagerly.
        """
        return dataclasses.replace(self, fast=_Compiled(self.fast, mode), flat_cross_entropy=None)

    def outputs(self, params: Params, x: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
        """Outputs (B, N, ...) of the B task models, in chunks of tasks where `chunk` says so
        (never for ``exact``)."""
        if exact:
            return self.exact(params, x)
        c = self.chunk(x)
        if c >= x.shape[0]:
            return self.fast(params, x)
        parts = {k: v.split(c) for k, v in params.items()}
        return torch.cat(
            [self.fast({k: v[j] for k, v in parts.items()}, xj) for j, xj in enumerate(x.split(c))]
        )


class _Compiled:
    """``torch.compile(fn)``, falling back to ``fn`` (with one warning) where compiling fails."""

    def __init__(self, fn: Callable[[Params, torch.Tensor], torch.Tensor], mode: str | None) -> None:
        self.fn = fn
        self.mode = mode
        self.compiled: Callable[[Params, torch.Tensor], torch.Tensor] | None = torch.compile(
            fn, mode=mode, dynamic=False
        )

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(params, x)
            except Exception as err:
                if not type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise
                # an error of the model itself (a shape mismatch) reaches here wrapped by the
                # compiler: eager raises it as it is
                out = self.fn(params, x)
                self.compiled = None
                warnings.warn(
                    f"--compile: torch.compile(mode={self.mode!r}) could not capture the model "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); running it eagerly",
                    BilevelWarning,
                    stacklevel=2,
                )
                return out
        return self.fn(params, x)


def task_losses(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], out: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Per-task losses (B,) of outputs (B, N, ...) against targets (B, N, ...), ``loss`` per task.

    One ``torch.func.vmap`` of ``loss`` over the task dimension (about 30 ops for cross-entropy
    and its backward where a loop takes 9 per task); a loss that vmap cannot batch (data-dependent
    control flow, ops without batching rules) runs task by task with the same result.
    """
    batched = _BATCHED.get(loss)
    if batched is not None:
        got = batched(out, y)
        if got is not None:
            return got
    try:
        return _vmapped(loss)(out, y)
    except (RuntimeError, NotImplementedError, ValueError):
        return torch.stack([loss(out[i], y[i]) for i in range(out.shape[0])])


def _cross_entropy_per_task(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """``F.cross_entropy(out[i], y[i])`` for every task i in one call (logits (B, N, C), class
    indices (B, N)); ``None`` for other shapes or targets."""
    if out.ndim != 3 or y.shape != out.shape[:2] or y.is_floating_point():
        return None
    per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
    return per.view(out.shape[:2]).mean(1)


def _mse_per_task(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """`mse` of every task in one call."""
    if out.shape != y.shape:
        return None
    return (out - y).square().reshape(out.shape[0], -1).mean(1)


_VMAPPED: dict[int, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {}


def _vmapped(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.func.vmap(loss)``, built once per loss function."""
    hit = _VMAPPED.get(id(loss))
    if hit is None or hit[0] is not loss:
        hit = (loss, torch.func.vmap(loss))
        _VMAPPED[id(loss)] = hit
    return hit[1]


def as_batched(
    model: Callable[[Params, torch.Tensor], torch.Tensor], batched: BatchedModel | None, vectorize: bool
) -> BatchedModel:
    """``batched`` if given, else the `BatchedModel` of the per-task function ``model``."""
    return batched if batched is not None else BatchedModel.from_function(model, vectorize=vectorize)


#: How the exact ConvNet's layers are differentiated twice (`batched_model`'s ``double_backward``).
DOUBLE_BACKWARD = ("auto", "native", "few-ops")


def batched_model(model: nn.Module, *, double_backward: str = "auto") -> BatchedModel | None:
    """The `BatchedModel` of a `ConvNet` or an `MLP`; ``None`` for other modules.

    A ConvNet's B models run as grouped convolutions over ``B * C`` channels (``groups=B``), its
    batch statistics per task and channel, its head as one ``baddbmm``.  Measured on CPU (1 thread,
    Omniglot CNN, 16 tasks of 5-way 1-shot): inner steps and HVPs about 1.3x faster than
    ``torch.func.vmap`` of the per-task model, and the fused norm halves the cost of a norm layer.
    Agreement with the per-task model is tested in float64.

    Args:
        double_backward: how `BatchedModel.exact` (HVPs, MAML's path) differentiates its layers
            twice.  ``native``: PyTorch's double backward of ``F.conv2d`` and ``F.batch_norm``,
            which loops over the B groups of a convolution (935 ops per HVP of the Omniglot CNN
            at B = 32, 5-way 1-shot).  ``few-ops``: the same values through convolutions and
            norms whose backward passes are a few differentiable ops (`GroupedConv2d`,
            `ConvWeightGrad`, `BatchNorm`, `BatchNormGrad`: 370 ops per HVP), as fast as ``native`` on CPU
            (measured, 1 thread: HVP 0.43-0.52 s vs 0.46-0.54 s, imaml-gd meta-step 0.96x) and a
            fraction of the kernel launches that bound an accelerator, and it holds less (one
            task per chunk, 32 tasks of 20-way 1-shot MAML: 40.9 MiB of live tensors at the
            step's peak against 42.8 MiB with 5 inner steps, 18.4 against 20.3 MiB with one).
            ``auto``: ``few-ops``.  All are exact (tested against per-task HVPs in float64).

    Raises:
        ValueError: an unknown ``double_backward``.
    """
    if double_backward not in DOUBLE_BACKWARD:
        raise ValueError(
            f"batched_model(double_backward={double_backward!r}): choose one of {DOUBLE_BACKWARD}"
        )
    if isinstance(model, ConvNet):
        # F.batch_norm is exact under double backward in plain autograd (tested against the
        # written-out norm in float64); only its vmap batching rule is wrong (BatchStatNorm2d).
        native = _convnet_batched(model, conv=_grouped_conv, norm=_batch_norm)
        few = _convnet_batched(model, conv=GroupedConv2d.apply, norm=BatchNorm.apply)
        exact = {"native": native, "few-ops": few, "auto": few}[double_backward]
        return BatchedModel(
            exact, native, _convnet_single(model), cpu_chunk=4, flat_cross_entropy=_flat_convnet_ce(model)
        )
    if isinstance(model, MLP):
        f = _mlp_batched(model)
        return BatchedModel(
            f, f, lambda p, x: f({k: v.unsqueeze(0) for k, v in p.items()}, x.unsqueeze(0))[0]
        )
    return None


def _blocks(model: ConvNet) -> list[tuple[str, int, int, float, bool]]:
    """(parameter prefix, conv stride, conv padding, norm eps, max-pool) per block."""
    out = []
    for i, blk in enumerate(model.features):
        conv, norm = blk.conv, blk.norm
        assert isinstance(conv, nn.Conv2d) and isinstance(norm, BatchStatNorm2d)
        stride, padding = conv.stride[0], conv.padding[0]
        assert isinstance(padding, int)
        out.append((f"features.block{i}", stride, padding, norm.eps, "pool" in dict(blk.named_children())))
    return out


def _grouped_conv(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, groups: int) -> torch.Tensor:
    return F.conv2d(x, w, None, stride, padding, 1, groups)


def _batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)


#: Whether the grouped activations of the batched ConvNet are channels-last on CPU (read at each
#: call; a deliberate switch).  Channels-last convolutions (oneDNN's native layout) skip the
#: reorders of NCHW: 1.5-1.7x faster per grouped 3x3 convolution with its backward (N = 75, 64
#: channels per task, 1 thread, torch 2.13), and faster meta-steps of imaml-gd, first-order MAML
#: and MAML in `benchmarks/engine_speed.py`.  Accelerators always take NCHW.  Set it to ``False``
#: to run the CPU as an accelerator would (``benchmarks/gpu_step.py --as-accelerator``); both
#: layouts give equal values (tested).
CPU_CHANNELS_LAST = True


def grouped_input(x: torch.Tensor) -> torch.Tensor:
    """Images (B, N, C, H, W) of B tasks as one grouped-convolution input (N, B C, H, W) in which
    task b owns channels [b C, (b + 1) C); channels-last on CPU (see `CPU_CHANNELS_LAST`)."""
    B, N = x.shape[:2]
    h = x.transpose(0, 1).reshape(N, B * x.shape[2], *x.shape[3:])
    if CPU_CHANNELS_LAST and h.device.type == "cpu":
        return h.contiguous(memory_format=torch.channels_last)
    return h


def _convnet_batched(
    model: ConvNet,
    *,
    conv: Callable[[torch.Tensor, torch.Tensor, int, int, int], torch.Tensor],
    norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    blocks = _blocks(model)

    def bfn(p: Params, x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape[:2]
        h = grouped_input(x)
        for name, stride, padding, eps, pool in blocks:
            w = p[f"{name}.conv.weight"]
            bias = p.get(f"{name}.conv.bias")
            w_flat = w.reshape(-1, *w.shape[2:])
            h = conv(h, w_flat, stride, padding, B)
            if bias is not None:
                h = h + bias.reshape(1, -1, 1, 1)
            gamma, beta = p[f"{name}.norm.weight"].reshape(-1), p[f"{name}.norm.bias"].reshape(-1)
            h = torch.relu(norm(h, gamma, beta, eps))
            if pool:
                h = F.max_pool2d(h, 2)
        feat = h.reshape(N, B, -1).transpose(0, 1)  # (B, N, C * h * w), per-task C-major like flatten
        return torch.baddbmm(p["head.bias"].unsqueeze(1), feat, p["head.weight"].transpose(1, 2))

    return bfn


def _flat_convnet_ce(model: ConvNet) -> FlatLossBuilder:
    """`BatchedModel.flat_cross_entropy` of a `ConvNet` (see `FlatConvNetCE`)."""
    blocks = _blocks(model)

    def build(
        names: Sequence[str],
        shapes: Sequence[tuple[int, ...]],
        x: torch.Tensor,
        y: torch.Tensor,
        chunk: int | None = None,
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        at = {k: i for i, k in enumerate(names)}
        B, N = x.shape[:2]
        if chunk is not None and chunk < 1:
            raise ValueError(f"flat_cross_entropy: chunk must be a positive number of tasks, got {chunk}")
        c = B if chunk is None else min(B, chunk)
        # scatter, not F.one_hot, which reads y's range on the host (a device sync)
        target = x.new_zeros(B, N, model.ways).scatter_(2, y.unsqueeze(2), -1.0 / N)
        plan = FlatPlan(
            sizes=[math.prod(s) for s in shapes],
            shapes=[tuple(s) for s in shapes],
            blocks=[
                (
                    (
                        at[f"{n}.conv.weight"],
                        at.get(f"{n}.conv.bias", -1),
                        at[f"{n}.norm.weight"],
                        at[f"{n}.norm.bias"],
                    ),
                    stride,
                    padding,
                    eps,
                    pool,
                )
                for n, stride, padding, eps, pool in blocks
            ],
            head=(at["head.weight"], at["head.bias"]),
            chunk=c,
            xs=[grouped_input(xc) for xc in (x.split(c) if c < B else [x])],
            targets=list(target.split(c)) if c < B else [target],
        )
        return lambda X: FlatConvNetCE.apply(X, plan)

    return build


def _convnet_single(model: ConvNet) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    """The per-task ConvNet with the fused batch norm (first-order use only, see `BatchStatNorm2d`)."""
    blocks = _blocks(model)

    def fn(p: Params, x: torch.Tensor) -> torch.Tensor:
        h = x
        for name, stride, padding, eps, pool in blocks:
            h = F.conv2d(h, p[f"{name}.conv.weight"], p.get(f"{name}.conv.bias"), stride, padding)
            gamma, beta = p[f"{name}.norm.weight"], p[f"{name}.norm.bias"]
            h = torch.relu(F.batch_norm(h, None, None, gamma, beta, True, 0.0, eps))
            if pool:
                h = F.max_pool2d(h, 2)
        return F.linear(torch.flatten(h, 1), p["head.weight"], p["head.bias"])

    return fn


def _mlp_batched(model: MLP) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    names = [n for n, m in model.net.named_children() if isinstance(m, nn.Linear)]

    def bfn(p: Params, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, n in enumerate(names):
            h = torch.baddbmm(p[f"net.{n}.bias"].unsqueeze(1), h, p[f"net.{n}.weight"].transpose(1, 2))
            if i < len(names) - 1:
                h = torch.relu(h)
        return h

    return bfn


# Losses with a one-call form over the task dimension (`task_losses`); others go through vmap.
_BATCHED: dict[Callable[..., torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]] = {
    F.cross_entropy: _cross_entropy_per_task,
    mse: _mse_per_task,
}
