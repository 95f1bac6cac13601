"""Helpers for the two structures the library accepts: a Tensor or a tuple of Tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._errors import NonFiniteError, StructureError
from ._types import TensorTree

__all__ = [
    "check_finite",
    "check_like",
    "is_tuple",
    "leaves",
    "ravel",
    "tree_dot",
    "tree_norm",
    "unflatten",
    "unravel_like",
]


def is_tuple(tree: TensorTree) -> bool:
    return isinstance(tree, tuple)


def leaves(tree: TensorTree, *, name: str = "tree") -> tuple[torch.Tensor, ...]:
    """The tensors of ``tree`` as a tuple.

    Raises:
        TypeError: ``tree`` is neither a Tensor nor a tuple (or list) of Tensors.
    """
    if isinstance(tree, torch.Tensor):
        return (tree,)
    if isinstance(tree, (tuple, list)):
        for i, t in enumerate(tree):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] is a {type(t).__name__}; expected a torch.Tensor")
        return tuple(tree)
    raise TypeError(f"{name} is a {type(tree).__name__}; expected a Tensor or a tuple of Tensors")


def unflatten(like: TensorTree, flat: Sequence[torch.Tensor]) -> TensorTree:
    """Put ``flat`` (a sequence of tensors) back into the structure of ``like``."""
    if isinstance(like, torch.Tensor):
        (only,) = flat
        return only
    return tuple(flat)


def ravel(tree: TensorTree) -> torch.Tensor:
    """Concatenate the tensors of ``tree`` into one 1-D tensor."""
    ts = leaves(tree)
    if len(ts) == 1:
        return ts[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in ts])


def unravel_like(flat: torch.Tensor, like: TensorTree) -> TensorTree:
    """Inverse of `ravel`: split a 1-D tensor into tensors shaped like ``like``."""
    ts = leaves(like)
    sizes = [t.numel() for t in ts]
    parts = torch.split(flat, sizes)
    return unflatten(like, [p.view_as(t) for p, t in zip(parts, ts)])


def tree_dot(a: TensorTree, b: TensorTree) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(leaves(a), leaves(b)))  # type: ignore[return-value]


def tree_norm(tree: TensorTree) -> float:
    ts = leaves(tree)
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in ts)))  # type: ignore[arg-type]


def check_finite(tree: TensorTree, what: str) -> None:
    """Raise `NonFiniteError` if any entry of ``tree`` is NaN or infinite."""
    for i, t in enumerate(leaves(tree, name=what)):
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t).all()):
                where = what if isinstance(tree, torch.Tensor) else f"{what}[{i}]"
                raise NonFiniteError(
                    f"{where} contains NaN or infinity: check the inputs, lower the inner "
                    "step size, or solve the inner problem more carefully"
                )


def check_like(tree: TensorTree, like: TensorTree, what: str, like_name: str = "init") -> None:
    """Raise `StructureError` unless ``tree`` matches ``like`` leaf by leaf.

    Compares structure (Tensor vs tuple, length), shape, dtype and device.
    """
    if isinstance(like, torch.Tensor) != isinstance(tree, torch.Tensor):
        raise StructureError(
            f"{what} is a {type(tree).__name__} but {like_name} is a {type(like).__name__}: "
            f"return the solution with the structure of {like_name}"
        )
    a, b = leaves(tree, name=what), leaves(like, name=like_name)
    if len(a) != len(b):
        raise StructureError(f"{what} has {len(a)} tensors but {like_name} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        tag = what if isinstance(like, torch.Tensor) else f"{what}[{i}]"
        if x.shape != y.shape:
            raise StructureError(f"{tag} has shape {tuple(x.shape)}, {like_name} has {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise StructureError(f"{tag} has dtype {x.dtype}, {like_name} has {y.dtype}")
        if x.device != y.device:
            raise StructureError(f"{tag} is on {x.device}, {like_name} is on {y.device}")


def tree_map(fn: Callable[..., torch.Tensor], tree: TensorTree, *rest: TensorTree) -> TensorTree:
    ls = [leaves(t) for t in rest]
    return unflatten(tree, [fn(x, *ys) for x, *ys in zip(leaves(tree), *ls)])
