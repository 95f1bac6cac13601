"""The proximal weight lambda of G_i(phi, theta) = Lhat_i(phi) + lam/2 ||phi - theta||^2, as a value.

Three kinds of the abstract `ProximalWeight`, each a frozen dataclass with the same methods, so that
nothing downstream asks which kind it holds:

==================  ==============================================================================
`FixedLam`          one number, not learned (``lam = 0``: no proximal term).
`LearnedScalar`     one learned lambda shared by every parameter (key ``"lam"``).
`LearnedPerTensor`  one learned lambda per parameter tensor (keys: the parameter names).
==================  ==============================================================================

A learned lambda is held as its leaf: log lambda where it is meta-trained (`lam_from_config`; Adam
steps the leaf, so lambda stays positive), or lambda itself where a caller hands a tensor to
`bilevel.metalearn.meta_gradient` (`coerce`, the one conversion of a caller's value).  Inside a
meta-batch a learned lambda enters the implicit layer's theta tree as extra entries (``"lam:"``
shared, ``"lam:<name>"`` per tensor), so that one backward pass gives d/dlam next to d/dtheta.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Union

import torch

__all__ = [
    "LAM_KINDS",
    "TREE_KEY",
    "FixedLam",
    "LamVector",
    "LearnedPerTensor",
    "LearnedScalar",
    "ProximalWeight",
    "coerce",
    "lam_from_config",
]

#: ``TrainConfig.learn_lam`` (``--learn-lam``): the kinds `lam_from_config` builds.
LAM_KINDS = ("none", "scalar", "per-tensor")
#: Prefix of learned lambda entries in the implicit layer's theta tree.
TREE_KEY = "lam:"
#: lambda per coordinate of a task's flat parameters: a number (or 0-d tensor) when one is shared,
#: else a (n,) tensor.
LamVector = Union[float, torch.Tensor]


class ProximalWeight(abc.ABC):
    """The proximal weight lambda of G: what every kind answers.

    The train loop's surface is `leaves`, `chain_rule` and `values`; the meta-batch reads the rest.
    """

    #: whether lambda is learned (its gradient is returned; it enters the theta tree)
    learned: ClassVar[bool]
    #: whether lambda differs between coordinates (`vector` is (n,))
    per_coordinate: ClassVar[bool]

    @staticmethod
    def coerce(lam: Any) -> ProximalWeight:
        """A caller's lambda as a `ProximalWeight` (`coerce`)."""
        return coerce(lam)

    def lam_grad(self, tree_grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """d/dlam by key (``"lam"`` or parameter names) from the gradients of the theta tree's
        learned entries (`tree`); ``None`` for a fixed lambda."""
        if not self.learned:
            return None
        return {(k[len(TREE_KEY) :] or "lam"): g for k, g in tree_grads.items() if k.startswith(TREE_KEY)}

    @abc.abstractmethod
    def leaves(self) -> dict[str, torch.Tensor]:
        """The learned leaves (0-d, requiring grad) keyed as a checkpoint's ``log_lam``; ``{}`` if fixed."""

    @abc.abstractmethod
    def chain_rule(self, lam_grad: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The leaves' gradients from ``meta_gradient``'s d/dlam (detached 0-d; zeros where missing)."""

    @abc.abstractmethod
    def values(self) -> dict[str, float] | None:
        """lambda per key for the run log and metrics; ``None`` when fixed."""

    @abc.abstractmethod
    def resolve(self, default: float) -> ProximalWeight:
        """The weight a meta-batch uses where the algorithm's own lambda is ``default``."""

    @abc.abstractmethod
    def tree(self) -> dict[str, torch.Tensor]:
        """Learned lambda values as entries of the implicit layer's theta tree (fresh leaves)."""

    @abc.abstractmethod
    def vector(self, th: Mapping[str, torch.Tensor], names: Sequence[str], sizes: Sequence[int]) -> LamVector:
        """lambda per coordinate of a task's flat parameters, differentiable in ``th``'s learned entries."""

    @abc.abstractmethod
    def detach(self, vec: LamVector) -> LamVector:
        """`vector`'s value without its graph."""

    @abc.abstractmethod
    def inverse_sqrt(self, vec: LamVector) -> LamVector:
        """``vec ** -1/2`` of `vector`."""

    @abc.abstractmethod
    def is_zero(self) -> bool:
        """Whether G has no proximal term."""

    @abc.abstractmethod
    def strong_convexity(self) -> float | None:
        """A fixed modulus of strong convexity of G where Lhat is convex (``None``: none known)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short description for ``repr``."""


@dataclasses.dataclass(frozen=True)
class FixedLam(ProximalWeight):
    """A proximal weight that is not learned.

    Args:
        value: lambda (>= 0; 0: no proximal term, as MAML, first-order MAML and Reptile).
        overrides: whether it replaces the algorithm's own lambda (`resolve`).  ``False`` for the
            configuration's lambda (`lam_from_config`), which an algorithm that reads no lambda
            (maml, fomaml, reptile: no proximal term) ignores.
    """

    learned: ClassVar[bool] = False
    per_coordinate: ClassVar[bool] = False

    value: float
    overrides: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"FixedLam(value={self.value}): lambda must be finite and >= 0")

    def __float__(self) -> float:
        return float(self.value)

    def resolve(self, default: float) -> ProximalWeight:
        """The weight a meta-batch uses where the algorithm's own lambda is ``default``."""
        return self if self.overrides else FixedLam(float(default))

    def leaves(self) -> dict[str, torch.Tensor]:
        """The learned leaves: none."""
        return {}

    def chain_rule(self, lam_grad: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Gradients of the learned leaves: none."""
        return {}

    def values(self) -> dict[str, float] | None:
        """lambda per key for a log: ``None`` (a fixed lambda is in the configuration)."""
        return None

    def tree(self) -> dict[str, torch.Tensor]:
        """Learned entries of the implicit layer's theta tree: none."""
        return {}

    def vector(self, th: Mapping[str, torch.Tensor], names: Sequence[str], sizes: Sequence[int]) -> LamVector:
        """lambda per coordinate: the number itself."""
        return float(self.value)

    def is_zero(self) -> bool:
        """Whether G has no proximal term."""
        return self.value == 0.0

    def strong_convexity(self) -> float | None:
        """A known modulus of strong convexity of G where Lhat is convex: lambda (``None`` at 0)."""
        return float(self.value) if self.value > 0 else None

    def detach(self, vec: LamVector) -> LamVector:
        """This weight's `vector` without its graph."""
        return vec

    def inverse_sqrt(self, vec: LamVector) -> LamVector:
        """``vec ** -1/2`` of this weight's `vector`."""
        return vec**-0.5

    def describe(self) -> str:
        return repr(float(self.value))


class _Learned(ProximalWeight):
    """What the learned kinds share: lambda > 0, a tensor that changes every meta-step."""

    learned: ClassVar[bool] = True

    def is_zero(self) -> bool:
        """Whether G has no proximal term: never (a learned lambda is exp(log lambda) > 0)."""
        return False

    def strong_convexity(self) -> float | None:
        """``None``: a learned lambda changes every step (no momentum is tuned to it)."""
        return None

    def detach(self, vec: LamVector) -> LamVector:
        """This weight's `vector` without its graph."""
        return torch.as_tensor(vec).detach()

    def inverse_sqrt(self, vec: LamVector) -> LamVector:
        """``vec ** -1/2`` of this weight's `vector`."""
        return torch.as_tensor(vec).rsqrt()


@dataclasses.dataclass(frozen=True)
class LearnedScalar(_Learned):
    """One learned lambda shared by every parameter.

    Args:
        leaf: a 0-d tensor: log lambda (``log=True``) or lambda itself.
        log: whether ``leaf`` is log lambda.
    """

    per_coordinate: ClassVar[bool] = False

    leaf: torch.Tensor
    log: bool = True

    def __post_init__(self) -> None:
        if self.leaf.ndim != 0:
            raise ValueError(
                f"LearnedScalar: lambda must be a 0-d tensor, got shape {tuple(self.leaf.shape)}"
            )

    @property
    def lam(self) -> torch.Tensor:
        """lambda, differentiable in the leaf."""
        return self.leaf.exp() if self.log else self.leaf

    def __float__(self) -> float:
        return float(self.lam.detach())

    def resolve(self, default: float) -> ProximalWeight:
        return self

    def leaves(self) -> dict[str, torch.Tensor]:
        """The learned leaf, keyed ``"lam"`` (as a checkpoint's ``log_lam``)."""
        return {"lam": self.leaf}

    def chain_rule(self, lam_grad: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The gradient w.r.t. the leaf from the gradient w.r.t. lambda: d/dlog(lam) = lam d/dlam."""
        return _chain_rule({"lam": self.leaf}, lam_grad, self.log)

    def values(self) -> dict[str, float] | None:
        return {"lam": float(self.lam.detach())}

    def tree(self) -> dict[str, torch.Tensor]:
        """lambda as a fresh leaf of the implicit layer's theta tree (requires grad)."""
        return {TREE_KEY: self.lam.detach().requires_grad_(True)}

    def vector(self, th: Mapping[str, torch.Tensor], names: Sequence[str], sizes: Sequence[int]) -> LamVector:
        """lambda, differentiable in ``th``'s learned entry where it has one."""
        return th[TREE_KEY] if TREE_KEY in th else self.lam.detach()

    def describe(self) -> str:
        return f"{float(self.lam.detach()):.4g} (learned)"


@dataclasses.dataclass(frozen=True)
class LearnedPerTensor(_Learned):
    """One learned lambda per parameter tensor.

    Args:
        leaf_by_name: 0-d tensors by parameter name: log lambda (``log=True``) or lambda itself.
        log: whether the leaves are log lambda.
    """

    per_coordinate: ClassVar[bool] = True

    leaf_by_name: Mapping[str, torch.Tensor]
    log: bool = True

    def __post_init__(self) -> None:
        bad = [k for k, v in self.leaf_by_name.items() if v.ndim != 0]
        if bad:
            raise ValueError(f"LearnedPerTensor: lambda of {bad[:5]} must be 0-d tensors")

    @property
    def lam(self) -> dict[str, torch.Tensor]:
        """lambda by parameter name, differentiable in the leaves."""
        return {k: v.exp() if self.log else v for k, v in self.leaf_by_name.items()}

    def resolve(self, default: float) -> ProximalWeight:
        return self

    def leaves(self) -> dict[str, torch.Tensor]:
        """The learned leaves by parameter name (as a checkpoint's ``log_lam``)."""
        return dict(self.leaf_by_name)

    def chain_rule(self, lam_grad: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Gradients w.r.t. the leaves from those w.r.t. lambda: d/dlog(lam) = lam d/dlam."""
        return _chain_rule(self.leaf_by_name, lam_grad, self.log)

    def values(self) -> dict[str, float] | None:
        return {k: float(v.detach()) for k, v in self.lam.items()}

    def tree(self) -> dict[str, torch.Tensor]:
        """lambda per tensor as fresh leaves of the implicit layer's theta tree (require grad)."""
        return {TREE_KEY + k: v.detach().requires_grad_(True) for k, v in self.lam.items()}

    def vector(self, th: Mapping[str, torch.Tensor], names: Sequence[str], sizes: Sequence[int]) -> LamVector:
        """lambda per coordinate (n,), differentiable in ``th``'s learned entries where it has them."""
        lam = self.lam
        like = next(iter(th.values()))
        return torch.cat(
            [
                torch.as_tensor(th.get(TREE_KEY + k, lam[k]), dtype=like.dtype, device=like.device).expand(
                    size
                )
                for k, size in zip(names, sizes)
            ]
        )

    def describe(self) -> str:
        return f"{len(self.leaf_by_name)} learned values"


@functools.singledispatch
def coerce(lam: Any) -> ProximalWeight:
    """A caller's lambda as a `ProximalWeight`: the one conversion, at the public entry points.

    Dispatched on the type of ``lam`` (`functools.singledispatch`):

    - a `ProximalWeight`: itself;
    - a number: `FixedLam`;
    - a 0-d tensor: `LearnedScalar` of lambda itself, whose gradient `meta_gradient` returns;
    - a mapping of 0-d tensors by parameter name: `LearnedPerTensor`.

    Raises:
        TypeError: anything else (a bool included).
    """
    raise TypeError(
        f"lam={lam!r}: expected a number, a 0-d tensor, a dict of 0-d tensors by parameter name, "
        "or a ProximalWeight"
    )


@coerce.register
def _(lam: ProximalWeight) -> ProximalWeight:
    return lam


@coerce.register
def _(lam: torch.Tensor) -> ProximalWeight:
    return LearnedScalar(lam, log=False)


@coerce.register(Mapping)
def _(lam: Mapping[str, torch.Tensor]) -> ProximalWeight:
    return LearnedPerTensor(dict(lam), log=False)


@coerce.register(int)
@coerce.register(float)
def _(lam: float) -> ProximalWeight:
    return FixedLam(float(lam))


@coerce.register
def _(lam: bool) -> ProximalWeight:
    return coerce.dispatch(object)(lam)


def lam_from_config(
    kind: str,
    init: float,
    names: Sequence[str],
    *,
    device: Any = None,
    dtype: torch.dtype | None = None,
    leaves: Mapping[str, torch.Tensor] | None = None,
) -> ProximalWeight:
    """The proximal weight a run meta-trains (``TrainConfig.learn_lam`` and ``lam``), new or saved.

    Args:
        kind: ``"none"``: ``init``, fixed (an algorithm without a proximal term keeps its lambda 0,
            `FixedLam.resolve`); ``"scalar"``: one learned log-lambda leaf keyed ``"lam"``;
            ``"per-tensor"``: one learned log-lambda leaf per name of ``names``, in order.
        init: the initial lambda (> 0 where learned).
        names: theta's parameter names.
        device, dtype: of new learned leaves.
        leaves: a saved run's log-lambda leaves (a checkpoint's ``log_lam``), used as they are
            instead of new leaves at ``log(init)``.

    Returns:
        The `ProximalWeight`; its learned leaves are 0-d tensors (new ones require grad).

    Raises:
        ValueError: an unknown ``kind``, or a learned lambda with ``init <= 0``.
    """
    if kind == "none":
        return FixedLam(float(init), overrides=False)
    if kind not in LAM_KINDS:
        raise ValueError(f"lam_from_config(kind={kind!r}): choose 'none', 'scalar' or 'per-tensor'")
    if not init > 0:
        raise ValueError(f"lam_from_config(init={init}): a learned lambda starts > 0 (log lambda)")
    keys = ["lam"] if kind == "scalar" else list(names)
    if leaves is None:
        log = math.log(init)
        leaves = {k: torch.tensor(log, device=device, dtype=dtype, requires_grad=True) for k in keys}
    if kind == "scalar":
        return LearnedScalar(leaves["lam"])
    return LearnedPerTensor({k: leaves[k] for k in keys})


def _chain_rule(
    leaves: Mapping[str, torch.Tensor], lam_grad: Mapping[str, torch.Tensor] | None, log: bool
) -> dict[str, torch.Tensor]:
    out = {}
    for k, leaf in leaves.items():
        g = lam_grad[k] if (lam_grad is not None and k in lam_grad) else torch.zeros((), device=leaf.device)
        out[k] = ((g * leaf.exp()) if log else g).detach().reshape(())
    return out
