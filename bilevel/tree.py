"""The one tree type of the library and its operations.

A *tree* is a Tensor, a tuple (or list) of Tensors, or a dict ``str -> Tensor`` (what
``nn.Module.named_parameters`` and ``torch.func.functional_call`` use).  Every public
entry point (`bilevel.implicit_argmin`, the solvers, the layers, meta-learning) accepts
each of the three, and returns answers in the structure it was given.  A dict's leaves
are taken in its insertion order.

Batched trees (a leading problem dimension B on every leaf) have per-problem
operations: `batch_dot`, `batch_norm_sq`, `batch_norm`, `batch_axpy`.

The library's one flattener: `ravel` / `unravel_like` between one problem's tree and a
vector, `ravel_batch` / `unravel_batch` between a batched tree and a (B, n) matrix (row b =
problem b), `unravel_rows` for rows laid out like one unbatched tree.  On such (B, n)
matrices, `rowdot`, `rownorm` and `rows_finite` are the per-problem reductions that every loop
(CG, the inner solvers, the line searches) uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ._errors import NonFiniteError, StructureError
from ._sync import defer_check
from ._types import TensorTree

__all__ = [
    "all_finite",
    "batch_axpy",
    "batch_dot",
    "batch_norm",
    "batch_norm_sq",
    "batch_scale",
    "check_finite",
    "check_like",
    "is_tuple",
    "leaves",
    "ravel",
    "ravel_batch",
    "rowdot",
    "rownorm",
    "rows_finite",
    "tree_dot",
    "tree_map",
    "tree_norm",
    "unflatten",
    "unravel_batch",
    "unravel_like",
    "unravel_rows",
]


def is_tuple(tree: TensorTree) -> bool:
    return isinstance(tree, tuple)


def leaves(tree: TensorTree, *, name: str = "tree") -> tuple[torch.Tensor, ...]:
    """The tensors of ``tree`` as a tuple (a dict's in insertion order).

    Raises:
        TypeError: ``tree`` is not a Tensor, a tuple/list of Tensors or a dict str -> Tensor.
    """
    if isinstance(tree, torch.Tensor):
        return (tree,)
    if isinstance(tree, (tuple, list)):
        for i, t in enumerate(tree):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] is a {type(t).__name__}; expected a torch.Tensor")
        return tuple(tree)
    if isinstance(tree, Mapping):
        for k, t in tree.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{k!r}] is a {type(t).__name__}; expected a torch.Tensor")
        return tuple(tree.values())
    raise TypeError(
        f"{name} is a {type(tree).__name__}; expected a Tensor, a tuple of Tensors or a dict of Tensors"
    )


def unflatten(like: TensorTree, flat: Sequence[torch.Tensor]) -> TensorTree:
    """Put ``flat`` (a sequence of tensors) back into the structure of ``like``."""
    if isinstance(like, torch.Tensor):
        (only,) = flat
        return only
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), flat))
    return tuple(flat)


def _label(tree: TensorTree, what: str, i: int) -> str:
    if isinstance(tree, torch.Tensor):
        return what
    if isinstance(tree, Mapping):
        return f"{what}[{list(tree.keys())[i]!r}]"
    return f"{what}[{i}]"


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def ravel(tree: TensorTree, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate the tensors of ``tree`` into one 1-D tensor (cast to ``dtype`` if given).

    A single leaf comes back as a view of it (no copy).
    """
    ts = leaves(tree)
    if len(ts) == 1:
        return _cast(ts[0].reshape(-1), dtype)
    return torch.cat([_cast(t.reshape(-1), dtype) for t in ts])


def unravel_like(flat: torch.Tensor, like: TensorTree) -> TensorTree:
    """Inverse of `ravel`: split a 1-D tensor into tensors shaped like ``like``'s leaves (views
    where the layout allows, in each leaf's dtype)."""
    ts = leaves(like)
    if len(ts) == 1:
        return unflatten(like, [_cast(flat.reshape(ts[0].shape), ts[0].dtype)])
    parts = torch.split(flat, [t.numel() for t in ts])
    return unflatten(like, [_cast(p.reshape(t.shape), t.dtype) for p, t in zip(parts, ts)])


def ravel_batch(tree: TensorTree, *, batched: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A batched tree (leading dim B on every leaf) as a (B, n) matrix, row b = problem b.

    Args:
        tree: the tree.
        batched: ``False``: ``tree`` is one problem (no batch dimension), returned as one row
            (1, n), the layout of the inner solvers' single-problem mode.
        dtype: cast to this dtype (leaf by leaf, only where it differs).
    """
    ts = leaves(tree)
    B = ts[0].shape[0] if batched else 1
    if len(ts) == 1:
        return _cast(ts[0].reshape(B, -1), dtype)
    return torch.cat([_cast(t.reshape(B, -1), dtype) for t in ts], dim=1)


def unravel_batch(X: torch.Tensor, like: TensorTree, *, batched: bool = True) -> TensorTree:
    """Inverse of `ravel_batch`: (B, n) -> views shaped like the batched tree ``like``, in each
    leaf's dtype (``batched=False``: (1, n) -> a tree like the unbatched ``like``).

    A single leaf that is already the (B, n) matrix comes back as ``X`` itself.
    """
    ts = leaves(like)
    if len(ts) == 1:
        t = ts[0]
        out = X if X.shape == t.shape else X.reshape(t.shape)
        return unflatten(like, [_cast(out, t.dtype)])
    sizes = [t[0].numel() for t in ts] if batched else [t.numel() for t in ts]
    parts = torch.split(X, sizes, dim=1)
    return unflatten(like, [_cast(p.reshape(t.shape), t.dtype) for p, t in zip(parts, ts)])


def unravel_rows(X: torch.Tensor, like: TensorTree) -> TensorTree:
    """(B, n) -> a tree like the single-problem ``like`` with a leading B on every leaf (views
    where the layout allows): B problems' rows given the layout of one (e.g. of a shared theta)."""
    ts = leaves(like)
    B = X.shape[0]
    if len(ts) == 1:
        return unflatten(like, [_cast(X.reshape(B, *ts[0].shape), ts[0].dtype)])
    parts = torch.split(X, [t.numel() for t in ts], dim=1)
    return unflatten(like, [_cast(p.reshape(B, *t.shape), t.dtype) for p, t in zip(parts, ts)])


def batch_norm(tree: TensorTree, *, batched: bool = True) -> torch.Tensor:
    """Per-problem Euclidean norms of a batched tree as float64, shape (B,) (``batched=False``:
    the norm of the whole tree, shape (1,)); leaf by leaf, squares summed in float64, without a
    concatenated float64 copy.  Detached: a diagnostic."""
    ts = leaves(tree)
    B = ts[0].shape[0] if batched else 1
    sq = [torch.linalg.vector_norm(t.detach().reshape(B, -1), dim=1).double().square() for t in ts]
    return torch.stack(sq).sum(0).sqrt()


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner products of (B, n) matrices, shape (B,)."""
    return (a * b).sum(dim=1)


def rownorm(a: torch.Tensor) -> torch.Tensor:
    """Per-problem Euclidean norms of a (B, n) matrix, shape (B,), in its precision (float32 for
    half precisions).

    Not accumulated in float64: that reads the input several times slower (measured 7 ms
    against about 1 ms for 16 x 113k float32 entries), and float32 norms overflow only for
    entries beyond 1e19, where a solve has diverged anyway.  Take ``.double()`` of the (B,)
    result where a float64 diagnostic is wanted.
    """
    low = a.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(a, dim=1, dtype=torch.float32 if low else None)


def rows_finite(*ts: torch.Tensor) -> torch.Tensor:
    """Per-problem mask: every entry of every (B,) or (B, n) tensor is finite, shape (B,)."""
    ok = torch.ones(ts[0].shape[0], dtype=torch.bool, device=ts[0].device)
    for t in ts:
        fin = torch.isfinite(t)
        ok &= fin.reshape(fin.shape[0], -1).all(dim=1)
    return ok


def tree_dot(a: TensorTree, b: TensorTree) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(leaves(a), leaves(b)))  # type: ignore[return-value]


def tree_norm(tree: TensorTree) -> float:
    ts = leaves(tree)
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in ts)))  # type: ignore[arg-type]


def tree_map(fn: Callable[..., torch.Tensor], tree: TensorTree, *rest: TensorTree) -> TensorTree:
    """``fn`` applied leaf by leaf to ``tree`` and the trees ``rest`` (same structure)."""
    ls = [leaves(t) for t in rest]
    return unflatten(tree, [fn(x, *ys) for x, *ys in zip(leaves(tree), *ls)])


def _per_row(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (t.ndim - 1)))


def batch_dot(a: TensorTree, b: TensorTree) -> torch.Tensor:
    """Per-problem inner products of two batched trees, shape (B,)."""
    out = None
    for x, y in zip(leaves(a), leaves(b)):
        d = (x * y).reshape(x.shape[0], -1).sum(1)
        out = d if out is None else out + d
    assert out is not None
    return out


def batch_norm_sq(a: TensorTree) -> torch.Tensor:
    """Per-problem squared Euclidean norms of a batched tree, shape (B,)."""
    return batch_dot(a, a)


def batch_scale(s: torch.Tensor, a: TensorTree) -> TensorTree:
    """Each problem's slice of a batched tree times s[b] (s of shape (B,))."""
    return tree_map(lambda t: t * _per_row(s, t), a)


def batch_axpy(a: TensorTree, s: torch.Tensor, b: TensorTree) -> TensorTree:
    """a + s[b] * b per problem (s of shape (B,))."""
    return tree_map(lambda x, y: x + _per_row(s, x) * y, a, b)


def all_finite(tree: TensorTree | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per leaf, whether every entry is finite: a bool tensor of shape (number of leaves,), on the
    leaves' device.  ``bool(all_finite(tree).all())`` is the one host read of "all finite".

    One fused reduction over the tensors (the largest magnitude of each, which is finite exactly
    when every entry is), instead of one ``isfinite`` and one host sync per tensor.

    Args:
        tree: a tree (Tensor, tuple or dict of Tensors) or a list of Tensors.
    """
    ts = leaves(tree, name="all_finite's argument")  # type: ignore[arg-type]
    floats = [t for t in ts if t.is_floating_point()]
    if len(floats) != len(ts) or len({t.device for t in ts}) > 1 or not ts:
        return torch.stack([torch.isfinite(t).all() for t in ts]) if ts else torch.ones(0, dtype=torch.bool)
    peaks = torch._foreach_norm([_unexpanded(t.detach()) for t in ts], float("inf"))
    return torch.isfinite(torch.stack(peaks))


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the repeats of an ``expand`` (stride-0 dimensions narrowed to one entry)."""
    for dim, stride in enumerate(t.stride()):
        if stride == 0 and t.shape[dim] > 1:
            t = t.narrow(dim, 0, 1)
    return t


def check_finite(tree: TensorTree, what: str) -> None:
    """Raise `NonFiniteError` if any entry of ``tree`` is NaN or infinite.

    One host read, now or, inside `bilevel.deferred_checks`, when that block ends (the entries
    are tested now, so later changes to them do not count).
    """
    ok = all_finite(leaves(tree, name=what))
    defer_check(lambda: _raise_if_not_finite(ok, tree, what))


def _raise_if_not_finite(ok: torch.Tensor, tree: TensorTree, what: str) -> None:
    if bool(ok.all()):
        return
    i = int(torch.nonzero(~ok).flatten()[0])
    raise NonFiniteError(
        f"{_label(tree, what, i)} contains NaN or infinity: check the inputs, lower the inner "
        "step size, or solve the inner problem more carefully"
    )


def _kind(tree: object) -> str:
    if isinstance(tree, torch.Tensor):
        return "Tensor"
    if isinstance(tree, Mapping):
        return "dict"
    return "tuple"


def check_like(tree: TensorTree, like: TensorTree, what: str, like_name: str = "init") -> None:
    """Raise `StructureError` unless ``tree`` matches ``like`` leaf by leaf.

    Compares structure (Tensor, tuple or dict; length; a dict's keys), shape, dtype and device.
    """
    if _kind(tree) != _kind(like):
        raise StructureError(
            f"{what} is a {type(tree).__name__} but {like_name} is a {type(like).__name__}: "
            f"return the solution with the structure of {like_name}"
        )
    if isinstance(like, Mapping) and isinstance(tree, Mapping) and list(tree.keys()) != list(like.keys()):
        raise StructureError(
            f"{what} has keys {list(tree.keys())} but {like_name} has {list(like.keys())} "
            "(same names, same order)"
        )
    a, b = leaves(tree, name=what), leaves(like, name=like_name)
    if len(a) != len(b):
        raise StructureError(f"{what} has {len(a)} tensors but {like_name} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        tag = _label(like, what, i)
        if x.shape != y.shape:
            raise StructureError(f"{tag} has shape {tuple(x.shape)}, {like_name} has {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise StructureError(f"{tag} has dtype {x.dtype}, {like_name} has {y.dtype}")
        if x.device != y.device:
            raise StructureError(f"{tag} is on {x.device}, {like_name} is on {y.device}")
