"""A model split into a body and a linear head, for ANIL: features once, then the head alone.

ANIL (Raghu et al. 2020) adapts only the last linear layer (the head) in the inner loop.  The
body's features of a task's support and query sets are then fixed during adaptation, so they are
computed once per task and the inner loop runs on ``out = features @ W.T + b`` alone.

The features are read from the model itself, with no second definition of its body: the model run
with its head replaced by the identity (``W = I_d``, ``b = 0``, ``d = W.shape[1]``) returns its
input to the head.  That holds where the head is the model's last operation (the last ``Linear`` of
the package's `ConvNet` and `MLP`, and of most classifiers); `HeadSplit.check_against` verifies it
on each meta-batch and raises where the model's output is not ``head(features)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

import bilevel as bl

from .batched import BatchedModel
from .models import Params

__all__ = ["HeadSplit", "default_head", "split_head"]


def default_head(names: Sequence[str]) -> str:
    """The module that owns the last parameter (``"head"`` of a `ConvNet`, the last ``Linear`` of an `MLP`).

    Raises:
        ValueError: no parameters.
    """
    if not names:
        raise ValueError("ANIL: the model has no parameters, so no head")
    return names[-1].rpartition(".")[0]


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """Where the head's parameters sit in a task's flat parameter vector (`MetaBatch`'s layout).

    Attributes:
        head: the head module's name (its parameters are ``head.weight`` and ``head.bias``).
        weight, bias: the head's parameter names (``bias`` ``None`` without one).
        outputs, features: the weight's shape (outputs, d).
        start, stop: the head's columns ``[start, stop)`` of the flat (B, n) matrix (weight then bias).
    """

    head: str
    weight: str
    bias: str | None
    outputs: int
    features: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """The head's parameter count (weight and bias)."""
        return self.stop - self.start

    def body(self, theta: Params) -> Params:
        """``theta`` without the head's parameters."""
        return {k: v for k, v in theta.items() if k not in (self.weight, self.bias)}

    def features_of(self, bm: BatchedModel, body: Params, x: torch.Tensor) -> torch.Tensor:
        """The B tasks' features (B, N, d) of inputs ``x`` (B, N, ...): the model with an identity head.

        Args:
            bm: the batched model.
            body: the body's parameters, no task dimension (differentiable in them).
            x: the B tasks' inputs.
        """
        B = x.shape[0]
        ref = next(iter(body.values())) if body else x
        eye = torch.eye(self.features, dtype=ref.dtype, device=ref.device)
        params = {k: v.expand(B, *v.shape) for k, v in body.items()}
        params[self.weight] = eye.expand(B, self.features, self.features)
        if self.bias is not None:
            params[self.bias] = eye.new_zeros(B, self.features)
        try:
            return bm.outputs(params, x)
        except RuntimeError as err:  # the identity head's d outputs met a layer after the head
            raise bl.StructureError(
                f"ANIL(head={self.head!r}): the model fails with its head replaced by the identity "
                f"({str(err).splitlines()[0][:160]}): the head must be the model's last layer "
                "(out = head(features)); name the last Linear layer as head"
            ) from err

    def flat_head(self, theta: Params) -> torch.Tensor:
        """The head's parameters of ``theta`` as one (size,) vector: weight raveled, then bias."""
        parts = [theta[self.weight].reshape(-1)]
        if self.bias is not None:
            parts.append(theta[self.bias].reshape(-1))
        return torch.cat(parts)

    def outputs_of(self, feats: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """The B heads' outputs (B, N, outputs) on features (B, N, d); row b of ``H`` (B, size) is head b."""
        B, o, d = H.shape[0], self.outputs, self.features
        W = H[:, : o * d].reshape(B, o, d)
        if self.bias is None:
            return torch.bmm(feats, W.transpose(1, 2))
        return torch.baddbmm(H[:, o * d :].unsqueeze(1), feats, W.transpose(1, 2))

    def check_against(self, out: torch.Tensor, feats: torch.Tensor, H: torch.Tensor) -> None:
        """Refuse a head that is not the model's last operation: ``out`` (the model's outputs) must
        equal ``outputs_of(feats, H)``.

        The shapes are compared now; the values at the end of a `bilevel.deferred_checks` block
        (one device read).

        Raises:
            bilevel.StructureError: the model's outputs are not ``head(features)``.
        """
        mine = self.outputs_of(feats, H)
        if out.shape != mine.shape:
            raise bl.StructureError(
                f"ANIL(head={self.head!r}): the model returns {tuple(out.shape[1:])} per task but its head "
                f"{self.head!r} alone returns {tuple(mine.shape[1:])}: the head must be the model's last "
                "layer (out = head(features)); name the last Linear layer as head"
            )
        scale = out.detach().abs().amax().clamp_min(1.0)
        gap = (out.detach() - mine.detach()).abs().amax() / scale
        tol = 1e-4 if out.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        bl.defer_check(functools.partial(_raise_if_not_last, self.head, gap, tol))


def _raise_if_not_last(head: str, gap: torch.Tensor, tol: float) -> None:
    if not bool(gap <= tol):
        raise bl.StructureError(
            f"ANIL(head={head!r}): the model's outputs differ from its head applied to its features (by "
            f"{float(gap):.3g} relative): the head must be the model's last layer, out = head(features), "
            "with nothing after it; name the last Linear layer as head"
        )


def split_head(head: str | None, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> HeadSplit:
    """The `HeadSplit` of head module ``head`` (``None``: `default_head`) in a flat layout of ``names``.

    Args:
        head: the head module's name, e.g. ``"head"`` (`ConvNet`) or ``"net.4"`` (an ``nn.Sequential``).
        names, shapes: the meta-parameters in their flat order, and their shapes.

    Raises:
        ValueError: no ``head.weight`` among the names (the message lists the layers that could
            be heads), a weight that is not 2-D, or a bias that does not fit it.
    """
    name = default_head(names) if head is None else head
    shape = dict(zip(names, shapes))
    weight, bias = f"{name}.weight", f"{name}.bias"
    if weight not in shape or len(shape[weight]) != 2:
        linear = [n.rpartition(".")[0] for n in names if n.endswith(".weight") and len(shape[n]) == 2]
        what = "has no learned parameter" if weight not in shape else f"has a {len(shape[weight])}-D weight"
        raise ValueError(
            f"ANIL(head={name!r}): the model {what} {weight!r}; the head must be a Linear layer with a "
            f"(outputs, features) weight, one of {linear}"
        )
    o, d = shape[weight]
    has_bias = bias in shape
    if has_bias and shape[bias] != (o,):
        raise ValueError(f"ANIL(head={name!r}): bias of shape {shape[bias]} does not fit the weight {(o, d)}")
    # The flat layout ravels the tensors in ``names`` order; the head's must be adjacent (weight, bias).
    offsets, at = {}, 0
    for n, s in zip(names, shapes):
        offsets[n] = at
        at += int(torch.Size(s).numel())
    start = offsets[weight]
    if has_bias and offsets[bias] != start + o * d:
        raise ValueError(
            f"ANIL(head={name!r}): the head's weight and bias are not adjacent among the parameters; "
            "register the bias right after the weight (as nn.Linear does)"
        )
    return HeadSplit(
        name, weight, bias if has_bias else None, o, d, start, start + o * d + (o if has_bias else 0)
    )
