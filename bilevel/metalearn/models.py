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
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

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
) -> Params:
    """Fresh, deterministic parameters for ``model`` (the module itself is left untouched).

    Conv and linear weights: Glorot (Xavier) uniform, as in Finn et al.'s code for convolutions;
    biases zero; batch-norm scale one and shift zero.  Parameters of other module types keep a
    copy of their current value.

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
                nn.init.xavier_uniform_(w, generator=generator)
                t.copy_(w)
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
        exact: the batched forward in plain tensor ops; exact under double backward (HVPs).
        fast: the same function, possibly through fused kernels (``F.batch_norm``) whose double
            backward is not trusted; for first-order gradients and inference only.
        single: ``fast`` for one task, ``single(params, x) -> out`` (no leading B).
        loop_large: evaluate large per-task batches (query sets) task by task with ``single``:
            on CPU a grouped convolution is about 2x slower than B separate ones once a task
            has tens of images (measured with 75 query images).
    """

    exact: Callable[[Params, torch.Tensor], torch.Tensor]
    fast: Callable[[Params, torch.Tensor], torch.Tensor]
    single: Callable[[Params, torch.Tensor], torch.Tensor]
    loop_large: bool = False

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

    def outputs(self, params: Params, x: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
        """Outputs (B, N, ...) of the B task models, task by task with ``single`` where
        ``loop_large`` says that is faster (never for ``exact``)."""
        if exact:
            return self.exact(params, x)
        if self.loop_large:
            return torch.stack(
                [self.single({k: v[i] for k, v in params.items()}, x[i]) for i in range(x.shape[0])]
            )
        return self.fast(params, x)


def task_losses(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], out: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Per-task losses (B,) of outputs (B, N, ...) against targets (B, N, ...), ``loss`` per task."""
    return torch.stack([loss(out[i], y[i]) for i in range(out.shape[0])])


def as_batched(
    model: Callable[[Params, torch.Tensor], torch.Tensor], batched: BatchedModel | None, vectorize: bool
) -> BatchedModel:
    """``batched`` if given, else the `BatchedModel` of the per-task function ``model``."""
    return batched if batched is not None else BatchedModel.from_function(model, vectorize=vectorize)


def batched_model(model: nn.Module) -> BatchedModel | None:
    """The `BatchedModel` of a `ConvNet` or an `MLP`; ``None`` for other modules.

    A ConvNet's B models run as grouped convolutions over ``B * C`` channels (``groups=B``), its
    batch statistics per task and channel, its head as one ``baddbmm``.  Measured on CPU (1 thread,
    Omniglot CNN, 16 tasks of 5-way 1-shot): inner steps and HVPs about 1.3x faster than
    ``torch.func.vmap`` of the per-task model, and the fused norm halves the cost of a norm layer.
    Agreement with the per-task model is tested in float64.
    """
    if isinstance(model, ConvNet):
        return BatchedModel(
            _convnet_batched(model, fused=False),
            _convnet_batched(model, fused=True),
            _convnet_single(model),
            loop_large=True,
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


def _convnet_batched(model: ConvNet, *, fused: bool) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    blocks = _blocks(model)

    def bfn(p: Params, x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape[:2]
        # (B, N, C, H, W) -> (N, B * C, H, W): task b owns channels [b C, (b + 1) C)
        h = x.transpose(0, 1).reshape(N, B * x.shape[2], *x.shape[3:])
        for name, stride, padding, eps, pool in blocks:
            w = p[f"{name}.conv.weight"]
            bias = p.get(f"{name}.conv.bias")
            w_flat = w.reshape(-1, *w.shape[2:])
            h = F.conv2d(h, w_flat, None if bias is None else bias.reshape(-1), stride, padding, 1, B)
            gamma, beta = p[f"{name}.norm.weight"].reshape(-1), p[f"{name}.norm.bias"].reshape(-1)
            if fused:
                h = F.batch_norm(h, None, None, gamma, beta, True, 0.0, eps)
            else:
                hc = h - h.mean((0, 2, 3), keepdim=True)
                var = (hc * hc).mean((0, 2, 3), keepdim=True)
                h = hc * (torch.rsqrt(var + eps) * gamma[:, None, None]) + beta[:, None, None]
            h = torch.relu(h)
            if pool:
                h = F.max_pool2d(h, 2)
        feat = h.reshape(N, B, -1).transpose(0, 1)  # (B, N, C * h * w), per-task C-major like flatten
        return torch.baddbmm(p["head.bias"].unsqueeze(1), feat, p["head.weight"].transpose(1, 2))

    return bfn


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
