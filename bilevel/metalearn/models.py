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

The batched forms of these models (B tasks' models in one call) are in `bilevel.metalearn.batched`.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "MLP",
    "BatchStatNorm2d",
    "ConvNet",
    "LossFn",
    "ModelFn",
    "Params",
    "default_model",
    "init_params",
    "make_functional",
    "miniimagenet_conv4",
    "mse",
    "n_params",
    "omniglot_cnn",
    "sinusoid_mlp",
]


#: Parameters by name, as ``torch.func.functional_call`` takes them.
Params = dict[str, torch.Tensor]
#: ``model(params, x) -> outputs`` of one task (`make_functional`).
ModelFn = Callable[[Params, torch.Tensor], torch.Tensor]
#: ``loss(outputs, y) -> scalar`` of one task (cross-entropy, MSE, ...).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error ``mean((pred - target)^2)``, a scalar.

    Same value as ``F.mse_loss(pred, target)``, but safe under ``torch.func.jvp(torch.func.grad(...))``,
    where ``F.mse_loss(reduction="mean")`` fails in torch 2.13 (pytorch/pytorch#123996).
    """
    return (pred - target).square().mean()


def n_params(params: Params) -> int:
    """Total number of scalars in ``params``."""
    return sum(math.prod(t.shape) for t in params.values())
