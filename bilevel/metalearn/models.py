"""Few-shot models, used functionally: ``fn(params, x)`` with ``params`` a dict name -> Tensor.

Usage::

    model = default_model(data.image_shape, ways=5)          # Omniglot CNN or Mini-ImageNet Conv4
    fn, params = make_functional(model, torch.Generator().manual_seed(0))
    logits = fn(params, task.support_x)                      # (N, ways)
    # a meta-batch: params with a leading task dimension B, inputs (B, N, C, H, W)
    batched = {k: v.expand(B, *v.shape) for k, v in params.items()}
    logits = torch.func.vmap(fn)(batched, batch.support_x)   # (B, N, ways)

``fn`` is ``torch.func.functional_call`` of the module, so ``torch.func.grad``, ``jvp`` (forward-over-
reverse Hessian-vector products), ``vmap`` and double backward all work; the module's own
parameters are never read by ``fn``.

Batch normalisation always uses the statistics of the batch it is given (transductive, as in Finn
et al. 2017 and the iMAML paper): no running statistics exist, in ``train()`` and ``eval()`` alike,
so the model is a pure function of ``(params, x)``.  Consequences: the support set and the query set
are normalised separately, and a loss is not a sum of per-example terms.

Losses under forward-over-reverse HVPs (``torch.func.jvp`` of ``torch.func.grad``): ``F.cross_entropy``
works; ``F.mse_loss`` with the default ``reduction="mean"`` raises "ZeroTensors are immutable" in
torch 2.13 (pytorch/pytorch#123996, open), so regression losses should use `mse` here, which is the
same quantity written out.

Conv layers have no bias by default: a per-channel constant added before a batch norm that
subtracts the per-channel batch mean cancels exactly, so its gradient is identically zero (it would
only add dead coordinates to the inner problem and meaningless entries to gradient checks).  Pass
``conv_bias=True`` to get them anyway.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from .. import BilevelWarning

__all__ = [
    "MLP",
    "BatchStatNorm2d",
    "BatchedModel",
    "ConvNet",
    "Params",
    "as_batched",
    "batched_model",
    "default_model",
    "init_params",
    "make_functional",
    "miniimagenet_conv4",
    "mse",
    "n_params",
    "omniglot_cnn",
    "sinusoid_mlp",
    "task_losses",
]


#: Parameters by name, as ``torch.func.functional_call`` takes them.
Params = dict[str, torch.Tensor]
#: ``(names, shapes, x, y, chunk) -> (X (B, n) -> (per-task losses (B,), logits (B, N, ways)))``:
#: see `BatchedModel.flat_cross_entropy`.
FlatLossBuilder = Callable[
    [Sequence[str], Sequence[tuple[int, ...]], torch.Tensor, torch.Tensor, int | None],
    Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
]


class BatchStatNorm2d(nn.Module):
    """Batch normalization with the statistics of the batch it is given, written out in tensor ops.

    Computes ``(x - mean) / sqrt(var + eps) * weight + bias`` with the per-channel mean and
    (biased) variance over (N, H, W), exactly what ``nn.BatchNorm2d(track_running_stats=False)``
    computes.  Why not ``F.batch_norm``: in torch 2.13 the batching rule of its double backward is
    wrong, so reverse-over-reverse Hessian-vector products of a vmapped batch of models come out
    wrong (measured: errors of 0.3 on entries of order 1 in float64, see
    ``tests/test_metalearn_models.py``).  Written in plain ops, every transform is exact, and the
    cached reverse-over-reverse HVP is the fastest HVP for this model on CPU (measured 11.0 ms
    against 18.7 ms per task for forward-over-reverse through ``F.batch_norm``).

    Parameters ``weight`` and ``bias`` (shape ``(C,)``) keep the names of ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight[:, None, None]
        return (x - mean) * scale + self.bias[:, None, None]


_NORMS = (BatchStatNorm2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def _out_side(side: int, pool: bool, n_blocks: int) -> int:
    for _ in range(n_blocks):
        # stride-2 3x3 conv with padding 1: ceil(s / 2); 2x2 max-pool (floor): s // 2
        side = side // 2 if pool else (side + 1) // 2
    return side


class ConvNet(nn.Module):
    """``n_blocks`` x [3x3 conv -> batch norm (batch statistics) -> ReLU -> downsample] -> flatten -> linear.

    Downsampling is a stride-2 convolution (``pool=False``, the Omniglot model of Finn et al.) or a
    2x2 max-pool after a stride-1 convolution (``pool=True``, the Mini-ImageNet Conv4).

    Args:
        ways: outputs (classes per task).
        in_channels: input channels.
        hidden: filters per conv layer.
        image_size: input side, or ``(H, W)``; fixes the head's input size.
        n_blocks: conv blocks.
        pool: max-pool instead of stride 2.
        conv_bias: add conv biases (useless before batch norm, see the module docstring).

    Input ``(N, in_channels, H, W)`` float, output ``(N, ways)`` logits.

    Raises:
        ValueError: a size below 1, or an image too small for ``n_blocks`` downsamplings.
    """

    def __init__(
        self,
        ways: int,
        *,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int | tuple[int, int] = 28,
        n_blocks: int = 4,
        pool: bool = False,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        for name, v in (
            ("ways", ways),
            ("in_channels", in_channels),
            ("hidden", hidden),
            ("n_blocks", n_blocks),
            ("image_size", min(h, w)),
        ):
            if v < 1:
                raise ValueError(f"ConvNet({name}={v}): must be >= 1")
        oh, ow = _out_side(h, pool, n_blocks), _out_side(w, pool, n_blocks)
        if oh < 1 or ow < 1:
            raise ValueError(
                f"ConvNet(image_size={image_size!r}, n_blocks={n_blocks}, pool={pool}): the image "
                "shrinks to nothing; use fewer blocks or pool=False"
            )
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        c = in_channels
        for i in range(n_blocks):
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                conv=nn.Conv2d(c, hidden, 3, stride=1 if pool else 2, padding=1, bias=conv_bias),
                # batch statistics in train() and eval() alike, no buffers
                norm=BatchStatNorm2d(hidden),
                relu=nn.ReLU(),
            )
            if pool:
                layers["pool"] = nn.MaxPool2d(2)
            blocks[f"block{i}"] = nn.Sequential(layers)
            c = hidden
        self.features = nn.Sequential(blocks)
        self.head = nn.Linear(hidden * oh * ow, ways)
        self.ways = ways
        self.in_channels = in_channels
        self.image_size = (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, ways)`` of images ``(N, C, H, W)``."""
        return self.head(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """Fully connected ReLU network ``in -> hidden... -> out`` (the sinusoid model: 1 -> 40 -> 40 -> 1).

    Input ``(N, in_features)``, output ``(N, out_features)``.
    """

    def __init__(
        self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        if min(sizes) < 1:
            raise ValueError(
                f"MLP(in_features={in_features}, hidden={hidden}, out_features={out_features}): "
                "sizes must be >= 1"
            )
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers[f"fc{i}"] = nn.Linear(a, b)
            if i < len(sizes) - 2:
                layers[f"relu{i}"] = nn.ReLU()
        self.net = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def omniglot_cnn(ways: int, *, hidden: int = 64, image_size: int = 28, pool: bool = False) -> ConvNet:
    """The Omniglot model of Finn et al. and iMAML: 4 x (64 filters, stride 2), input (N, 1, 28, 28)."""
    return ConvNet(ways, in_channels=1, hidden=hidden, image_size=image_size, pool=pool)


def miniimagenet_conv4(ways: int, *, hidden: int = 32, image_size: int = 84) -> ConvNet:
    """The Mini-ImageNet Conv4: 4 x (32 filters, max-pool), ``(N, 3, 84, 84)`` input, 800 features."""
    return ConvNet(ways, in_channels=3, hidden=hidden, image_size=image_size, pool=True)


def sinusoid_mlp(hidden: tuple[int, ...] = (40, 40)) -> MLP:
    """The sinusoid regression model: 1 -> 40 -> 40 -> 1 with ReLU."""
    return MLP(1, hidden, 1)


def default_model(image_shape: tuple[int, int, int], ways: int) -> ConvNet:
    """The literature's model for images of shape ``(C, H, W)``.

    Single-channel images get the Omniglot CNN (64 filters, stride 2); colour images the
    Mini-ImageNet Conv4 (32 filters, max-pool), falling back to stride 2 where the image is too small
    for four max-pools (below 16 pixels).
    """
    c, h, w = image_shape
    if c == 1:
        return ConvNet(ways, in_channels=1, hidden=64, image_size=(h, w), pool=False)
    pool = min(h, w) >= 16
    return ConvNet(ways, in_channels=c, hidden=32, image_size=(h, w), pool=pool)


@torch.no_grad()
def init_params(
    model: nn.Module,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    requires_grad: bool = False,
    gain: float = 1.0,
    bias: tuple[float, float] | None = None,
) -> Params:
    """Fresh, deterministic parameters for ``model`` (the module itself is left untouched).

    Conv and linear weights: Glorot (Xavier) uniform with ``gain``, as in Finn et al.'s code for
    convolutions; their biases zero, or uniform in ``bias = (low, high)``; other biases zero;
    batch-norm scale one.  Parameters of other module types keep a copy of their current value.
    The released iMAML code's initialization is ``gain=1.73, bias=(0.0, 0.05)``.

    Args:
        model: the module (its parameter names are the dict's keys).
        generator: source of randomness (``None``: the global generator).
        dtype: dtype of the parameters (default: the module's).
        device: device of the parameters (default: the module's).
        requires_grad: make every tensor a leaf that requires grad.

    Returns:
        dict name -> Tensor in ``model.named_parameters()`` order.
    """
    params: Params = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            t = torch.empty(p.shape, dtype=dtype or p.dtype, device=device or p.device)
            if isinstance(module, (nn.Conv2d, nn.Linear)) and p_name == "weight":
                # initialise in float64 on the CPU so that the values do not depend on dtype/device
                w = torch.empty(p.shape, dtype=torch.float64)
                nn.init.xavier_uniform_(w, gain=gain, generator=generator)
                t.copy_(w)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and p_name == "bias" and bias is not None:
                b = torch.empty(p.shape, dtype=torch.float64)
                nn.init.uniform_(b, bias[0], bias[1], generator=generator)
                t.copy_(b)
            elif isinstance(module, _NORMS) and p_name == "weight":
                t.fill_(1.0)
            elif p_name == "bias":
                t.zero_()
            else:
                t.copy_(p)
            params[full] = t
    order = [n for n, _ in model.named_parameters()]
    out = {n: params[n] for n in order}
    if requires_grad:
        for t in out.values():
            t.requires_grad_(True)
    return out


def make_functional(
    model: nn.Module,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    requires_grad: bool = False,
) -> tuple[Callable[[Params, torch.Tensor], torch.Tensor], Params]:
    """``(fn, params)`` with ``fn(params, x) = functional_call(model, params, (x,))``.

    Args:
        model: the module; it must have no buffers that matter (the models here have none).
        generator: if given, ``params`` come from `init_params`; otherwise they are detached copies
            of the module's current parameters.
        dtype, device, requires_grad: as in `init_params`.

    Returns:
        ``fn`` (works under ``torch.func.vmap``, ``grad``, ``jvp``) and the parameter dict.
    """
    if generator is not None:
        params = init_params(model, generator, dtype=dtype, device=device, requires_grad=requires_grad)
    else:
        params = {
            n: p.detach()
            .clone()
            .to(dtype=dtype or p.dtype, device=device or p.device)
            .requires_grad_(requires_grad)
            for n, p in model.named_parameters()
        }

    def fn(params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x,))

    fn.__doc__ = f"Functional form of {type(model).__name__}: fn(params, x) -> output."
    return fn, params


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
        models or ops without batching rules)."""
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
            norms whose backward passes are a few differentiable ops (`_GroupedConv2d`,
            `_ConvWeightGrad`, `_BatchNorm`, `_BatchNormGrad`: 370 ops per HVP), as fast as ``native`` on CPU
            (measured, 1 thread: HVP 0.43-0.52 s vs 0.46-0.54 s, imaml-gd meta-step 0.96x) and a
            fraction of the kernel launches that bound an accelerator.  ``auto``: ``few-ops``
            on every device.  All three are exact (tested against per-task HVPs in float64).

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
        few = _convnet_batched(model, conv=_GroupedConv2d.apply, norm=_BatchNorm.apply)
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
        out.append((f"features.block{i}", stride, padding, norm.eps, "pool" in blk._modules))
    return out


def _grouped_conv(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, groups: int) -> torch.Tensor:
    return F.conv2d(x, w, None, stride, padding, 1, groups)


class _GroupedConv2d(torch.autograd.Function):
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
            gw = _ConvWeightGrad.apply(x, gy, w.detach(), stride, padding, G)
        return gx, gw, None, None, None


class _ConvWeightGrad(torch.autograd.Function):
    """The weight gradient of a grouped convolution, ``dW = Wgrad(x, gy)``, by PyTorch's own kernel
    (one ``convolution_backward``), differentiable once in ``x`` and ``gy``.

    ``dW`` is bilinear in (x, gy); for an upstream U shaped like W its vector-Jacobian products
    are the input gradient of the convolution with weight U (d/dx) and the convolution of x by
    U (d/dgy): two native grouped kernels.  So an HVP through `_GroupedConv2d` costs a few grouped
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


def _batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)


class _BatchNorm(torch.autograd.Function):
    """Batch norm with batch statistics over (N, H, W) per channel, whose backward is one node
    (`_BatchNormGrad`) with a written-out second derivative.

    Same values and gradients as ``F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps)``
    (PyTorch's own kernels, forward and backward); PyTorch's double backward of it takes about
    160 ops per layer (measured, torch 2.13), `_BatchNormGrad`'s about 50.
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
        gx, ggamma, gbeta = _BatchNormGrad.apply(gy, x, gamma, mean, invstd, ctx.eps)
        return gx, ggamma, gbeta, None


class _BatchNormGrad(torch.autograd.Function):
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


# Memory format of the grouped activations on CPU: channels-last convolutions (oneDNN's native
# layout) skip the reorders of NCHW: 1.5-1.7x faster per grouped 3x3 convolution with its
# backward (N = 75, 64 channels per task, 1 thread, torch 2.13), and the meta-steps of imaml-gd,
# first-order MAML and MAML measured faster in `benchmarks/engine_speed.py`.  Accelerators keep
# NCHW (not measured there).  Patched by the tests, which check both layouts give equal values.
_CPU_CHANNELS_LAST = True


def _grouped_input(x: torch.Tensor) -> torch.Tensor:
    """Images (B, N, C, H, W) of B tasks as one grouped-convolution input (N, B C, H, W) in which
    task b owns channels [b C, (b + 1) C); channels-last on CPU (see `_CPU_CHANNELS_LAST`)."""
    B, N = x.shape[:2]
    h = x.transpose(0, 1).reshape(N, B * x.shape[2], *x.shape[3:])
    if _CPU_CHANNELS_LAST and h.device.type == "cpu":
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
        h = _grouped_input(x)
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


@dataclasses.dataclass(frozen=True)
class _FlatPlan:
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


def _flat_convnet_ce(model: ConvNet) -> FlatLossBuilder:
    """`BatchedModel.flat_cross_entropy` of a `ConvNet` (see `_FlatConvNetCE`)."""
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
        plan = _FlatPlan(
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
            xs=[_grouped_input(xc) for xc in (x.split(c) if c < B else [x])],
            targets=list(target.split(c)) if c < B else [target],
        )
        return lambda X: _FlatConvNetCE.apply(X, plan)

    return build


class _FlatConvNetCE(torch.autograd.Function):
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
    def forward(ctx: Any, X: torch.Tensor, plan: _FlatPlan) -> tuple[torch.Tensor, torch.Tensor]:
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
    plan: _FlatPlan,
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


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error ``mean((pred - target)^2)``, a scalar.

    Same value as ``F.mse_loss(pred, target)``, but safe under ``torch.func.jvp(torch.func.grad(...))``,
    where ``F.mse_loss(reduction="mean")`` fails in torch 2.13 (pytorch/pytorch#123996).
    """
    return (pred - target).square().mean()


def n_params(params: Params) -> int:
    """Total number of scalars in ``params``."""
    return sum(math.prod(t.shape) for t in params.values())


# Losses with a one-call form over the task dimension (`task_losses`); others go through vmap.
_BATCHED: dict[Callable[..., torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]] = {
    F.cross_entropy: _cross_entropy_per_task,
    mse: _mse_per_task,
}
