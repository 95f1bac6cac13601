"""Argument checks shared by `bilevel.projections` and `bilevel.prox`.

Set parameters and prox scales are numbers or tensors that broadcast against the points ``y``
(shape (..., n)); their checks name the function, the parameter and what is wrong with it.
"""

from __future__ import annotations

import math
from typing import Union

import torch

from . import _sync
from ._errors import StructureError

__all__ = ["Param", "as_param", "check_input", "check_nonnegative", "check_sign", "check_values", "show"]

#: A set parameter or a scale: a Python number or a tensor broadcasting against the points.
Param = Union[float, torch.Tensor]


def check_input(who: str, y: torch.Tensor) -> None:
    """``y`` is a floating-point tensor with at least one dimension."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{who}: y must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(f"{who}: y has dtype {y.dtype}; it must be floating point")
    if y.ndim == 0:
        raise StructureError(f"{who}: y is a scalar; it needs a last dimension (shape (..., n))")


def as_param(who: str, name: str, value: Param, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``value`` as a tensor in ``y``'s dtype and device that broadcasts to ``shape`` without
    enlarging it (the answer keeps ``y``'s shape)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{who}({name}={value!r}): {name} must be a number or a tensor")
    t = torch.as_tensor(value, dtype=y.dtype, device=y.device)
    try:
        out = torch.broadcast_shapes(t.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise StructureError(
            f"{who}: {name} has shape {tuple(t.shape)}, which does not broadcast to {tuple(shape)} "
            f"(y has shape {tuple(y.shape)}); give one value, or one per problem"
        )
    return t


def check_values(who: str, message: str, bad: torch.Tensor, value: torch.Tensor | None = None) -> None:
    """Raise ``ValueError("who: message (got value)")`` where ``bad`` (a bool tensor) holds a True.

    Reads a device value on the host: inside `bilevel.deferred_checks` it waits for the block's
    end.  The message is composed only when the check fails.
    """

    def check() -> None:
        if bool(bad.any()):
            got = "" if value is None else f" (got {show(value)})"
            raise ValueError(f"{who}: {message}{got}")

    _sync.defer_check(check)


def check_sign(who: str, name: str, value: Param, t: torch.Tensor, *, positive: bool) -> None:
    """``value`` (converted: ``t``) is finite and > 0 (``positive``) or >= 0.

    A Python number is checked at once, on the host; a tensor by `check_values`.
    """
    what = "> 0" if positive else ">= 0"
    if not isinstance(value, torch.Tensor):
        v = float(value)
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise ValueError(f"{who}: {name} must be {what} and finite (got {v!r})")
        return
    bad = ~(t > 0 if positive else t >= 0) | ~torch.isfinite(t)
    check_values(who, f"{name} must be {what} and finite", bad, t)


def check_nonnegative(who: str, name: str, value: Param, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``value`` as by `as_param`, checked >= 0 and finite."""
    t = as_param(who, name, value, y, shape)
    check_sign(who, name, value, t, positive=False)
    return t


def show(t: torch.Tensor) -> str:
    """A short account of a parameter's value for an error message."""
    if t.numel() == 1:
        return repr(float(t))
    finite = t[torch.isfinite(t)]
    low = f"min {float(finite.min()):.3g}" if finite.numel() else "no finite entry"
    bad = "" if finite.numel() == t.numel() else ", with NaN or inf"
    return f"a tensor of shape {tuple(t.shape)}, {low}{bad}"
