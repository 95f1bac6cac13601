"""The one tree type of the library and its operations.

A *tree* is a Tensor, a tuple (or list) of Tensors, or a dict ``str -> Tensor`` (what
``nn.Module.named_parameters`` and ``torch.func.functional_call`` use).  Every public
entry point (`bilevel.implicit_argmin`, the solvers, the layers, meta-learning) accepts
each of the three, and returns answers in the structure it was given.  A dict's leaves
are taken in its insertion order.

Where trees are combined (`tree_map` of several trees, `tree_dot`, `batch_dot`, `batch_axpy`,
`check_like`, `aligned`, `ravel` against a ``like``), dict leaves are paired by key, never by
position: the result has the first tree's (or ``like``'s) key order, and missing or extra keys,
another structure, other shapes or, for batched trees, other leading sizes raise `StructureError`
naming the key (and both sizes).

Batched trees (a leading problem dimension B on every leaf) have per-problem
operations: `batch_dot`, `batch_norm_sq`, `batch_norm`, `batch_axpy`.

The library's one flattener: `ravel` / `unravel_like` between one problem's tree and a
vector, `ravel_batch` / `unravel_batch` between a batched tree and a (B, n) matrix (row b =
problem b), `unravel_rows` for rows laid out like one unbatched tree.  On such (B, n)
matrices, `rowdot`, `rownorm` and `rows_finite` are the per-problem reductions that every loop
(CG, the inner solvers, the line searches) uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._errors import NonFiniteError, StructureError
from ._sync import defer_check
from ._types import TensorTree

__all__ = [
    "LeafNames",
    "aligned",
    "all_finite",
    "batch_axpy",
    "batch_dot",
    "batch_norm",
    "batch_norm_sq",
    "batch_scale",
    "batch_size",
    "check_finite",
    "check_like",
    "finite_problems",
    "is_tuple",
    "leaf_names",
    "leaves",
    "pack",
    "packed_ravel",
    "problems_named",
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


def _key(tree: TensorTree, i: int) -> str:
    """How leaf ``i`` of ``tree`` is named in messages: ``"['w']"``, ``"[1]"``, or ``""`` for a Tensor."""
    if isinstance(tree, torch.Tensor):
        return ""
    if isinstance(tree, Mapping):
        return f"[{list(tree.keys())[i]!r}]"
    return f"[{i}]"


def _paired(trees: Sequence[TensorTree], names: Sequence[str]) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """The leaves of ``trees`` paired: for each leaf of ``trees[0]`` (in its order) its key as
    ``"['w']"`` / ``"[i]"`` / ``""`` and the tensors of every tree at that key (a dict's by name).

    Raises:
        TypeError: a tree is not a tree of Tensors.
        StructureError: the trees differ in kind (Tensor, tuple, dict), length or keys; the
            message names the first key that one tree has and the other lacks.
    """
    first, name0 = trees[0], names[0]
    ls0 = leaves(first, name=name0)
    cols: list[tuple[torch.Tensor, ...]] = [ls0]
    for tree, name in zip(trees[1:], names[1:]):
        if _kind(tree) != _kind(first):
            raise StructureError(
                f"{name} is a {type(tree).__name__} but {name0} is a {type(first).__name__}: "
                f"give {name} the structure of {name0}"
            )
        ls = leaves(tree, name=name)
        if isinstance(first, Mapping) and isinstance(tree, Mapping):
            missing = [k for k in first if k not in tree]
            extra = [k for k in tree if k not in first]
            if missing or extra:
                which = (
                    f"key {missing[0]!r} of {name0} is missing from {name}"
                    if missing
                    else f"{name} has key {extra[0]!r}, which {name0} lacks"
                )
                raise StructureError(
                    f"{name} has keys {list(tree.keys())} but {name0} has {list(first.keys())}: {which} "
                    "(dict trees are matched by key)"
                )
            cols.append(tuple(tree[k] for k in first))
        else:
            if len(ls) != len(ls0):
                raise StructureError(f"{name} has {len(ls)} tensors but {name0} has {len(ls0)}")
            cols.append(ls)
    return [(_key(first, i), tuple(c[i] for c in cols)) for i in range(len(ls0))]


def _same_shapes(paired: list[tuple[str, tuple[torch.Tensor, ...]]], names: Sequence[str]) -> None:
    """Raise `StructureError` unless the paired leaves have equal shapes (no silent broadcast)."""
    for key, ts in paired:
        for t, name in zip(ts[1:], names[1:]):
            if t.shape != ts[0].shape:
                raise StructureError(
                    f"{name}{key} has shape {tuple(t.shape)} but {names[0]}{key} has {tuple(ts[0].shape)}"
                )


def batch_size(tree: TensorTree, name: str) -> int:
    """The leading size B shared by every leaf of a batched tree.

    Raises:
        StructureError: a leaf has no leading dimension, or its leading size differs from the
            first leaf's (the message names both keys and both sizes).
    """
    ts = leaves(tree, name=name)
    if not ts:
        raise StructureError(f"{name} holds no tensors")
    B = ts[0].shape[0] if ts[0].ndim else None
    for i, t in enumerate(ts):
        size = t.shape[0] if t.ndim else None
        if size is None:
            raise StructureError(
                f"{name}{_key(tree, i)} is a 0-d tensor: every leaf of a batched tree needs a leading "
                "batch dimension B (one entry per problem)"
            )
        if size != B:
            raise StructureError(
                f"{name}{_key(tree, i)} has leading size {size} but {name}{_key(tree, 0)} has {B}: every "
                "leaf of a batched tree needs the same leading batch dimension B"
            )
    assert B is not None
    return int(B)


@dataclasses.dataclass(frozen=True)
class LeafNames:
    """How messages name a tree's leaves, kept without its tensors (a queued check holds this,
    not the tree and its graph): ``what`` for a single tensor, ``what['key']`` for a dict's
    leaf, ``what[i]`` for a sequence's.  Made by `leaf_names`.

    Attributes:
        single: the tree is one tensor.
        keys: a dict's keys in leaf order; ``()`` for a sequence.
    """

    single: bool
    keys: tuple[Any, ...] = ()

    def label(self, what: str, i: int) -> str:
        """The name of leaf ``i`` of the tree called ``what``."""
        if self.single:
            return what
        return f"{what}[{self.keys[i]!r}]" if self.keys else f"{what}[{i}]"


def leaf_names(tree: TensorTree) -> LeafNames:
    """The `LeafNames` of ``tree`` (a Tensor, a dict or a sequence of Tensors)."""
    if isinstance(tree, torch.Tensor):
        return LeafNames(single=True)
    return LeafNames(single=False, keys=tuple(tree.keys()) if isinstance(tree, Mapping) else ())


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def ravel(
    tree: TensorTree, *, like: TensorTree | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Concatenate the tensors of ``tree`` into one 1-D tensor (cast to ``dtype`` if given).

    A single leaf comes back as a view of it (no copy).

    Args:
        tree: the tree.
        like: lay the vector out as ``like``'s (`unravel_like` inverts it with this ``like``):
            a dict's leaves taken by ``like``'s keys, in ``like``'s order.
        dtype: cast to this dtype (leaf by leaf, only where it differs).

    Raises:
        StructureError: with ``like``: another structure, other keys or other shapes (named); a
            tree without tensors (a vector of no dtype or device).
    """
    if like is not None:
        paired = _paired((like, tree), ("like", "tree"))
        _same_shapes(paired, ("like", "tree"))
        ts = tuple(t for _, (_, t) in paired)
    else:
        ts = leaves(tree)
    if not ts:
        raise StructureError(f"ravel: the tree {tree!r} holds no tensors (its vector would have no dtype)")
    if len(ts) == 1:
        return _cast(ts[0].reshape(-1), dtype)
    return torch.cat([_cast(t.reshape(-1), dtype) for t in ts])


def pack(tree: TensorTree) -> TensorTree:
    """A copy of ``tree`` whose leaves lie back to back, in leaf order, in one new contiguous
    buffer, so that `packed_ravel` reads it raveled with no copy.

    The leaves are views of the buffer that autograd treats as leaves (``requires_grad_`` and an
    optimizer's in-place updates work on them as on separate tensors).  A model's parameters
    kept this way save the (n,) copy that raveling them for a batched solver would make.

    A tree without tensors comes back as it is (there is nothing to lay out).

    Raises:
        TypeError: leaves of different dtypes or devices.
    """
    ts = leaves(tree)
    if not ts:
        return tree
    kinds = {(t.dtype, t.device) for t in ts}
    if len(kinds) > 1:
        raise TypeError(f"pack: the leaves must share one dtype and device, not {sorted(map(str, kinds))}")
    with torch.no_grad():
        buffer = torch.cat([t.detach().reshape(-1) for t in ts])
    views = buffer.split([t.numel() for t in ts])
    return unflatten(tree, [v.view(t.shape) for v, t in zip(views, ts)])


def packed_ravel(tree: TensorTree) -> torch.Tensor | None:
    """`ravel` of ``tree`` as a detached view of its leaves' memory, where they lie back to back,
    contiguous and in leaf order, in one storage (as `pack` lays them out); ``None`` otherwise
    (an empty tree too).

    Returns:
        (n,) tensor sharing memory with the leaves (writing into it writes into them), or ``None``.
    """
    ts = leaves(tree)
    if not ts:
        return None
    first = ts[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    end = offset
    for t in ts:
        if (
            t.untyped_storage().data_ptr() != storage
            or t.dtype != first.dtype
            or t.storage_offset() != end
            or not t.is_contiguous()
        ):
            return None
        end += t.numel()
    return first.detach().as_strided((end - offset,), (1,), offset)


def _flat_size(flat: torch.Tensor, n: int, ndim: int, what: str) -> None:
    if flat.ndim != ndim or flat.shape[-1] != n:
        want = f"(n,) = ({n},)" if ndim == 1 else f"(B, n) with n = {n}"
        raise StructureError(
            f"{what}: got a tensor of shape {tuple(flat.shape)}; expected {want}, like's layout"
        )


def unravel_like(flat: torch.Tensor, like: TensorTree) -> TensorTree:
    """Inverse of `ravel`: split a 1-D tensor into tensors shaped like ``like``'s leaves (views
    where the layout allows, in each leaf's dtype).

    Raises:
        StructureError: ``flat`` is not 1-D with as many entries as ``like``.
    """
    ts = leaves(like)
    sizes = [t.numel() for t in ts]
    _flat_size(flat, sum(sizes), 1, "unravel_like")
    if len(ts) == 1:
        return unflatten(like, [_cast(flat.reshape(ts[0].shape), ts[0].dtype)])
    parts = torch.split(flat, sizes)
    return unflatten(like, [_cast(p.reshape(t.shape), t.dtype) for p, t in zip(parts, ts)])


def ravel_batch(tree: TensorTree, *, batched: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A batched tree (leading dim B on every leaf) as a (B, n) matrix, row b = problem b.

    Args:
        tree: the tree.
        batched: ``False``: ``tree`` is one problem (no batch dimension), returned as one row
            (1, n), the layout of the inner solvers' single-problem mode.
        dtype: cast to this dtype (leaf by leaf, only where it differs).

    Raises:
        StructureError: leaves with different leading sizes (named, with both sizes).
    """
    ts = leaves(tree)
    if len(ts) == 1:
        return _cast(ts[0].reshape(ts[0].shape[0] if batched else 1, -1), dtype)
    B = batch_size(tree, "tree") if batched else 1
    return torch.cat([_cast(t.reshape(B, -1), dtype) for t in ts], dim=1)


def unravel_batch(X: torch.Tensor, like: TensorTree, *, batched: bool = True) -> TensorTree:
    """Inverse of `ravel_batch`: (B, n) -> views shaped like the batched tree ``like``, in each
    leaf's dtype (``batched=False``: (1, n) -> a tree like the unbatched ``like``).

    A single leaf that is already the (B, n) matrix comes back as ``X`` itself.

    Raises:
        StructureError: ``X`` is not (B, n) with ``like``'s B and n (or ``like``'s leaves differ
            in leading size).
    """
    ts = leaves(like)
    if len(ts) == 1:
        t = ts[0]
        if X.shape == t.shape:
            return unflatten(like, [_cast(X, t.dtype)])
        _flat_size(X, t[0].numel() if batched else t.numel(), 2, "unravel_batch")
        return unflatten(like, [_cast(X.reshape(t.shape), t.dtype)])
    sizes = [t[0].numel() for t in ts] if batched else [t.numel() for t in ts]
    _flat_size(X, sum(sizes), 2, "unravel_batch")
    B = batch_size(like, "like") if batched else 1
    if X.shape[0] != B:
        raise StructureError(f"unravel_batch: X has {X.shape[0]} rows but like has leading size {B}")
    parts = torch.split(X, sizes, dim=1)
    return unflatten(like, [_cast(p.reshape(t.shape), t.dtype) for p, t in zip(parts, ts)])


def unravel_rows(X: torch.Tensor, like: TensorTree) -> TensorTree:
    """(B, n) -> a tree like the single-problem ``like`` with a leading B on every leaf (views
    where the layout allows): B problems' rows given the layout of one (e.g. of a shared theta).

    Raises:
        StructureError: ``X`` is not 2-D with ``like``'s number of entries per row.
    """
    ts = leaves(like)
    B = X.shape[0]
    sizes = [t.numel() for t in ts]
    _flat_size(X, sum(sizes), 2, "unravel_rows")
    if len(ts) == 1:
        return unflatten(like, [_cast(X.reshape(B, *ts[0].shape), ts[0].dtype)])
    parts = torch.split(X, sizes, dim=1)
    return unflatten(like, [_cast(p.reshape(B, *t.shape), t.dtype) for p, t in zip(parts, ts)])


def batch_norm(tree: TensorTree, *, batched: bool = True) -> torch.Tensor:
    """Per-problem Euclidean norms of a batched tree as float64, shape (B,) (``batched=False``:
    the norm of the whole tree, shape (1,)); leaf by leaf, squares summed in float64, without a
    concatenated float64 copy.  Detached: a diagnostic.

    Raises:
        StructureError: leaves with different leading sizes (named, with both sizes).
    """
    ts = leaves(tree)
    B = (batch_size(tree, "tree") if len(ts) > 1 else ts[0].shape[0]) if batched else 1
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
    """Per-problem mask: every entry of every (B,) or (B, n) tensor is finite, shape (B,)
    (`finite_problems` of the tensors: no temporary the size of a tensor)."""
    return finite_problems(ts)[0]


def tree_dot(a: TensorTree, b: TensorTree) -> torch.Tensor:
    """The inner product of two trees of one structure (a dict's leaves paired by key).

    Raises:
        StructureError: other structures, keys or shapes (named).
    """
    paired = _paired((a, b), ("a", "b"))
    _same_shapes(paired, ("a", "b"))
    return sum((x * y).sum() for _, (x, y) in paired)  # type: ignore[return-value]


def tree_norm(tree: TensorTree) -> float:
    ts = leaves(tree)
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in ts)))  # type: ignore[arg-type]


def tree_map(fn: Callable[..., torch.Tensor], tree: TensorTree, *rest: TensorTree) -> TensorTree:
    """``fn`` applied leaf by leaf to ``tree`` and the trees ``rest``, in ``tree``'s structure.

    A dict's leaves are paired by key (the result has ``tree``'s key order), a tuple's by
    position.  Shapes are ``fn``'s business (it may broadcast).

    Raises:
        StructureError: a tree of ``rest`` has another structure, length or keys (named).
    """
    if not rest:
        return unflatten(tree, [fn(x) for x in leaves(tree)])
    names = ["tree", *(f"rest[{i}]" for i in range(len(rest)))]
    return unflatten(tree, [fn(*ts) for _, ts in _paired((tree, *rest), names)])


def _per_row(s: torch.Tensor, t: torch.Tensor, key: str = "") -> torch.Tensor:
    if s.ndim != 1 or t.ndim == 0 or s.shape[0] != t.shape[0]:
        raise StructureError(
            f"per-problem scalars s of shape {tuple(s.shape)} for the leaf{key} of leading size "
            f"{t.shape[0] if t.ndim else None}: expected shape (B,) with the leaves' B"
        )
    return s.view(-1, *([1] * (t.ndim - 1)))


def batch_dot(a: TensorTree, b: TensorTree) -> torch.Tensor:
    """Per-problem inner products of two batched trees, shape (B,) (a dict's leaves paired by key).

    Raises:
        StructureError: other structures, keys or shapes, or leaves of other leading sizes
            (named, with both sizes).
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        return (a * b).reshape(a.shape[0], -1).sum(1)
    paired = _paired((a, b), ("a", "b"))
    _same_shapes(paired, ("a", "b"))
    batch_size(a, "a")
    out = None
    for _, (x, y) in paired:
        d = (x * y).reshape(x.shape[0], -1).sum(1)
        out = d if out is None else out + d
    assert out is not None
    return out


def batch_norm_sq(a: TensorTree) -> torch.Tensor:
    """Per-problem squared Euclidean norms of a batched tree, shape (B,)."""
    return batch_dot(a, a)


def batch_scale(s: torch.Tensor, a: TensorTree) -> TensorTree:
    """Each problem's slice of a batched tree times s[b] (s of shape (B,)).

    Raises:
        StructureError: ``s`` is not of shape (B,) for the leaves' B.
    """
    return unflatten(a, [t * _per_row(s, t, key) for key, (t,) in _paired((a,), ("a",))])


def batch_axpy(a: TensorTree, s: torch.Tensor, b: TensorTree) -> TensorTree:
    """a + s[b] * b per problem (s of shape (B,)), a dict's leaves paired by key.

    Raises:
        StructureError: other structures, keys or shapes, or ``s`` not of shape (B,).
    """
    paired = _paired((a, b), ("a", "b"))
    _same_shapes(paired, ("a", "b"))
    return unflatten(a, [x + _per_row(s, x, key) * y for key, (x, y) in paired])


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
    # the fused reduction has no identity for an empty tensor (which is finite)
    if len(floats) != len(ts) or len({t.device for t in ts}) > 1 or not ts or any(t.numel() == 0 for t in ts):
        return torch.stack([torch.isfinite(t).all() for t in ts]) if ts else torch.ones(0, dtype=torch.bool)
    peaks = torch._foreach_norm([_unexpanded(t.detach()) for t in ts], float("inf"))
    return torch.isfinite(torch.stack(peaks))


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the repeats of an ``expand`` (stride-0 dimensions narrowed to one entry)."""
    for dim, stride in enumerate(t.stride()):
        if stride == 0 and t.shape[dim] > 1:
            t = t.narrow(dim, 0, 1)
    return t


def finite_problems(tree: TensorTree) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a batched tree is finite: per problem, bool (B,), and per problem and leaf, bool
    (number of leaves, B), on the leaves' device (one max-magnitude reduction per leaf, no
    concatenated copy; nothing is read on the host).

    Raises:
        StructureError: leaves with different leading sizes (named, with both sizes).
    """
    ts = leaves(tree, name="finite_problems' argument")
    B = batch_size(tree, "tree")
    per_leaf = torch.stack([_rows_finite(_rows(t.detach(), B)).to(ts[0].device) for t in ts])
    return per_leaf.all(0), per_leaf


def _rows(t: torch.Tensor, B: int) -> torch.Tensor:
    """``t`` as a (B, n) matrix (n = 0 for an empty ``t``, which ``reshape(B, -1)`` refuses at B = 0)."""
    return t.reshape(B, -1) if t.numel() else t.new_empty((B, 0))


def _rows_finite(rows: torch.Tensor) -> torch.Tensor:
    """Whether each row of a (B, n) tensor is finite, bool (B,): a floating-point row by its
    largest magnitude (finite exactly when every entry is), one reduction and no temporary of
    the tensor's size as ``isfinite`` makes."""
    if not rows.is_floating_point():
        return torch.isfinite(rows).all(dim=1)
    if not rows.shape[1]:
        return torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    return torch.isfinite(torch.linalg.vector_norm(rows, float("inf"), dim=1))


def problems_named(idx: Sequence[int], *, noun: str = "problem", of: str = "the batch") -> str:
    """``"problem(s) [i, j] of the batch"`` (the first ten, then how many more): how messages
    name the problems of a batch that failed."""
    shown = list(idx[:10])
    more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
    return f"{noun}(s) {shown}{more} of {of}"


def check_finite(tree: TensorTree, what: str, *, batched: bool = False) -> None:
    """Raise `NonFiniteError` if any entry of ``tree`` is NaN or infinite.

    One host read, now or, inside `bilevel.deferred_checks`, when that block ends (the entries
    are tested now, so later changes to them do not count).

    Args:
        tree: the tree.
        what: its name in the message, which names the leaf (a dict's key).
        batched: ``tree`` holds B problems along the leading dimension of every leaf: the
            message names the problems too.
    """
    # The queued check keeps the tree's names for its message, not its tensors: inside
    # `deferred_checks` it lives to the end of the block, and a leaf would keep its graph alive.
    names = leaf_names(tree)
    if batched:
        rows, per_leaf = finite_problems(tree)
        defer_check(lambda: _raise_if_rows_not_finite(rows, per_leaf, names, what))
        return
    ok = all_finite(leaves(tree, name=what))
    defer_check(lambda: _raise_if_not_finite(ok, names, what))


def _raise_if_not_finite(ok: torch.Tensor, names: LeafNames, what: str) -> None:
    if bool(ok.all()):
        return
    i = int(torch.nonzero(~ok).flatten()[0])
    raise NonFiniteError(
        f"{names.label(what, i)} contains NaN or infinity: check the inputs, lower the inner "
        "step size, or solve the inner problem more carefully"
    )


def _raise_if_rows_not_finite(
    rows: torch.Tensor, per_leaf: torch.Tensor, names: LeafNames, what: str
) -> None:
    if bool(rows.all()):
        return
    bad = torch.nonzero(~rows).flatten().tolist()
    leaf = int(torch.nonzero(~per_leaf[:, bad[0]]).flatten()[0])
    raise NonFiniteError(
        f"{names.label(what, leaf)} contains NaN or infinity in {problems_named(bad)}: check the inputs "
        "of those problems, lower the inner step size, or solve the inner problem more carefully"
    )


def _kind(tree: object) -> str:
    if isinstance(tree, torch.Tensor):
        return "Tensor"
    if isinstance(tree, Mapping):
        return "dict"
    return "tuple"


def aligned(tree: TensorTree, like: TensorTree, what: str, like_name: str = "init") -> TensorTree:
    """``tree`` checked against ``like`` leaf by leaf, a dict's leaves by key, and returned in
    ``like``'s structure and key order (a dict with the same keys in another order is the same
    tree; it is re-keyed, not refused).

    Compares structure (Tensor, tuple or dict; length; a dict's keys), shape, dtype and device.

    Raises:
        StructureError: the first difference, naming the key (or position) and both values.
    """
    paired = _paired((like, tree), (like_name, what))
    for key, (y, x) in paired:
        tag = f"{what}{key}"
        if x.shape != y.shape:
            raise StructureError(f"{tag} has shape {tuple(x.shape)}, {like_name} has {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise StructureError(f"{tag} has dtype {x.dtype}, {like_name} has {y.dtype}")
        if x.device != y.device:
            raise StructureError(f"{tag} is on {x.device}, {like_name} is on {y.device}")
    if isinstance(tree, Mapping) and list(tree.keys()) != list(like.keys()):  # type: ignore[union-attr]
        return unflatten(like, [x for _, (_, x) in paired])
    return tree


def check_like(tree: TensorTree, like: TensorTree, what: str, like_name: str = "init") -> None:
    """Raise `StructureError` unless ``tree`` matches ``like`` leaf by leaf, in ``like``'s order.

    As `aligned` (a dict's leaves compared by key, the message naming the key), and a dict's keys
    must also come in ``like``'s order: callers that pair the two trees' leaves by position rely
    on it.  Where another order is fine, use `aligned`, which re-keys the tree.
    """
    aligned(tree, like, what, like_name)
    if isinstance(tree, Mapping) and isinstance(like, Mapping) and list(tree.keys()) != list(like.keys()):
        i, k, j = next((i, k, j) for i, (k, j) in enumerate(zip(tree, like)) if k != j)
        raise StructureError(
            f"{what} has keys {list(tree.keys())} but {like_name} has {list(like.keys())}: the same keys in "
            f"another order (position {i} holds {k!r}, {like_name} has {j!r} there); return them in "
            f"the order of {like_name}"
        )
