"""The command line's algorithm names, each one registry entry: what it reads and how it is built.

An `AlgorithmEntry` declares which `TrainConfig` fields (``--flags``) the algorithm reads, which
inner solver kinds (``inner_solver``) it takes, why it refuses a switch it does not read, and
builds its `MetaAlgorithm` from `Settings`.  The command line's accepted flags
(``training/cli.py``), the configuration's checks (`TrainConfig`) and `make_algorithm` are all
derived from `ALGORITHMS`, so a new algorithm (ANIL, Meta-SGD, ...) is one entry.

``imaml-gd``, ``imaml-hf`` minimize G with proximal weight ``lam``; ``maml``, ``fomaml`` and
``reptile`` minimize the support loss alone (lam = 0), as published.  ``inner_solver="nesterov"``
replaces their inner GD by accelerated GD (`bilevel.solvers.Nesterov`); ``"trust-region"``
replaces imaml-hf's line-search Newton-CG (the paper's) by trust-region Newton-CG
(`bilevel.solvers.TrustRegionNewtonCG`).  ``imaml-released`` is the authors' released code
(`ReleasedCG`, with ``damping`` as its ``regu_coef``; the released value is 1), not the paper's
method.  ``anil`` is MAML with the inner loop on the head alone (the model's last linear layer;
the body's features once per task), ``meta-sgd`` MAML with a learned step size per parameter entry
(``inner_lr`` is their initial value).  Every other setting is shared, for apples-to-apples
comparisons.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from bilevel.solvers import GradientDescent, Nesterov, NewtonCG, StepHalving, TrustRegionNewtonCG

from .gradients import (
    NO_STEP,
    FirstOrder,
    HeadOnly,
    Implicit,
    LearnedSteps,
    MetaAlgorithm,
    MetaGradientKind,
    ReleasedCG,
    ReptileStep,
    Unrolled,
)
from .metabatch import InnerSolver

__all__ = [
    "ALGORITHMS",
    "INNER_KINDS",
    "SWITCHES",
    "AlgorithmEntry",
    "InnerKind",
    "Settings",
    "Switch",
    "make_algorithm",
    "readers",
]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings an algorithm may read (the algorithm fields of `TrainConfig`).

    Attributes:
        inner_steps, inner_lr: the inner GD's steps and step size (``max_iter``, ``lr``).
        lam: the proximal weight of G.
        cg_iters: CG steps of the meta-gradient (and of each Newton step of imaml-hf).
        newton_iters: Newton steps of imaml-hf.
        damping: the damping of the meta-gradient system.
        cg_warm_start: start iMAML's CG from the first-order gradient.
        inner_tol: the inner GD's per-task gradient-norm tolerance (None: a fixed budget).
        backtrack: inner GD with one Armijo trial per step (`bilevel.solvers.StepHalving`): the
            step size halves wherever G would not decrease enough.  Fixed-step GD diverges once
            meta-training sharpens the support loss beyond 2 / lr (measured on the sinusoid: NaN
            after 200-900 meta-steps at lr 0.005-0.02); backtracking cannot.
        inner_solver: the inner solver kind (`INNER_KINDS`).
    """

    inner_steps: int = 16
    inner_lr: float = 0.1
    lam: float = 2.0
    cg_iters: int = 5
    newton_iters: int = 3
    damping: float = 0.0
    cg_warm_start: bool = False
    inner_tol: float | None = None
    backtrack: bool = False
    inner_solver: str = "gd"


# ------------------------------------------------------------------------- inner solvers by kind
def _gd(s: Settings) -> InnerSolver:
    return GradientDescent(
        lr=s.inner_lr,
        max_iter=s.inner_steps,
        tol=0.0 if s.inner_tol is None else s.inner_tol,
        line_search=StepHalving() if s.backtrack else None,
    )


def _fixed_gd(s: Settings) -> InnerSolver:
    """GD with a fixed path (MAML's unrolled one, the released code's loop)."""
    return GradientDescent(lr=s.inner_lr, max_iter=s.inner_steps, tol=0.0)


def _nesterov(s: Settings) -> InnerSolver:
    if s.backtrack or s.inner_tol is not None:
        raise ValueError(
            "inner_solver='nesterov' runs a fixed number of accelerated steps: no backtrack or inner_tol"
        )
    # mu = None: the meta-batch sets mu = lam where it can (Theorem 2's momentum, `batched_solver`)
    return Nesterov(lr=s.inner_lr, max_iter=s.inner_steps, tol=0.0, restart=True)


def _newton(s: Settings) -> InnerSolver:
    return NewtonCG(newton_iters=s.newton_iters, cg_iters=s.cg_iters)


def _trust_region(s: Settings) -> InnerSolver:
    # radius 0.3 reached a lower G than 1 or 3 at 3 x 5 on 16 Omniglot 5-way 1-shot tasks at an
    # untrained theta (median G 0.130 / 0.177 / 0.524, lam 0.5) and as low at a trained one
    # (0.199 / 0.196 / 0.199; benchmarks/RESULTS.md)
    return TrustRegionNewtonCG(newton_iters=s.newton_iters, cg_iters=s.cg_iters, radius=0.3, tol=0.0)


@dataclasses.dataclass(frozen=True)
class InnerKind:
    """An ``inner_solver`` name: what it is, and the refusal where an algorithm does not take it.

    Attributes:
        name: the ``inner_solver`` value.
        refusal: the message where algorithm ``{algo}`` does not take it; ``{kinds}`` is what
            that algorithm takes, ``{readers}`` the algorithms that take this kind.
    """

    name: str
    refusal: str


#: The ``inner_solver`` names (``--inner-solver``).
INNER_KINDS: dict[str, InnerKind] = {
    "gd": InnerKind("gd", "{algo} takes {kinds}"),
    "nesterov": InnerKind("nesterov", "inner_solver='nesterov' is for {readers}, not {algo}"),
    "trust-region": InnerKind(
        "trust-region", "the trust region replaces imaml-hf's line search; {algo} takes {kinds}"
    ),
}


@dataclasses.dataclass(frozen=True)
class Switch:
    """A setting whose value other than ``off`` needs an algorithm that reads it.

    Attributes:
        off: the value that reads as "not used" (presets may set the others' fields freely).
        refusal: the message where algorithm ``{algo}`` does not read it, when the entry gives
            none of its own; ``{readers}``: the algorithms that read it.
    """

    off: Any
    refusal: str


#: The switches an algorithm refuses when set and not read (`AlgorithmEntry.refusal`).
SWITCHES: dict[str, Switch] = {
    "learn_lam": Switch("none", "a learned lambda needs an implicit iMAML algorithm ({readers}), not {algo}"),
    "backtrack": Switch(False, "{algo} has no inner GD to backtrack: drop backtrack"),
}


# --------------------------------------------------------------------------------- the entries
#: What iMAML's proximal meta-gradients read (every ``lam`` algorithm).
_PROXIMAL = frozenset({"lam", "cg_iters", "damping", "lanczos_steps", "eval_lam"})
#: What an inner GD reads (every algorithm but imaml-hf).
_GD = frozenset({"inner_steps", "inner_lr", "eval_inner_steps"})


@dataclasses.dataclass(frozen=True)
class AlgorithmEntry:
    """One algorithm name: what it reads and how its `MetaAlgorithm` is built.

    Attributes:
        name: the ``algo`` value (``--algo``).
        reads: the `TrainConfig` fields it reads among those that only some algorithms read
            (the command line refuses the others' flags).  ``lam`` in it: G has a proximal term
            (else lam = 0); ``learn_lam``: the meta-gradient is Lemma 1's (a learned lambda).
        inner: its inner solver kinds (`INNER_KINDS` names), each with its builder; the first is
            the default ``gd``.  With more than one, it reads ``inner_solver``.
        meta_gradient: builds the meta-gradient kind.
        refusals: per switch it does not read (`SWITCHES`), why it refuses it when set, where
            that says more than the switch's own message.
        min_inner_steps: the fewest inner steps it meta-trains with, and why (evaluation may take
            fewer: 0 evaluates theta itself).
    """

    name: str
    reads: frozenset[str]
    inner: Mapping[str, Callable[[Settings], InnerSolver]]
    meta_gradient: Callable[[Settings], MetaGradientKind]
    refusals: Mapping[str, str] = dataclasses.field(default_factory=dict)
    min_inner_steps: tuple[int, str] = (0, "")

    @property
    def flags(self) -> frozenset[str]:
        """Every field it reads, ``inner_solver`` included where it has a choice."""
        return self.reads | ({"inner_solver"} if len(self.inner) > 1 else frozenset())

    def refusal(self, field: str, value: Any) -> str | None:
        """Why this algorithm refuses ``field=value``, or ``None`` where it takes it."""
        if field == "inner_solver":
            if value in self.inner or value not in INNER_KINDS:
                return None
            kinds = " or ".join(self.inner)
            return INNER_KINDS[value].refusal.format(
                algo=self.name, kinds=kinds, readers=_and(readers_of_kind(value))
            )
        switch = SWITCHES.get(field)
        if field in self.flags or switch is None or value == switch.off:
            return None
        why = self.refusals.get(field, switch.refusal)
        return why.format(algo=self.name, readers=" or ".join(readers(field)))

    def build(self, s: Settings) -> MetaAlgorithm:
        """The `MetaAlgorithm` of these settings.

        Raises:
            ValueError: a setting this algorithm refuses (`refusal`), or the parts' own checks.
        """
        if s.inner_solver not in INNER_KINDS:
            raise ValueError(
                f"make_algorithm(inner_solver={s.inner_solver!r}): choose {_or_quoted(list(INNER_KINDS))}"
            )
        for field in ("backtrack", "inner_solver"):
            why = self.refusal(field, getattr(s, field))
            if why is not None:
                raise ValueError(why)
        inner = self.inner[s.inner_solver](s)
        return MetaAlgorithm(inner, self.meta_gradient(s), s.lam if "lam" in self.reads else 0.0)


def _implicit(s: Settings) -> MetaGradientKind:
    return Implicit(s.cg_iters, s.damping, s.cg_warm_start)


#: The algorithms by ``--algo`` name, in the order the command line lists them.
ALGORITHMS: dict[str, AlgorithmEntry] = {
    e.name: e
    for e in (
        AlgorithmEntry(
            "imaml-gd",
            _PROXIMAL | _GD | {"learn_lam", "cg_warm_start", "backtrack"},
            {"gd": _gd, "nesterov": _nesterov},
            _implicit,
        ),
        AlgorithmEntry(
            "imaml-hf",
            _PROXIMAL | {"learn_lam", "cg_warm_start", "newton_iters"},
            {"gd": _newton, "trust-region": _trust_region},
            _implicit,
            {"backtrack": "imaml-hf's Newton steps have their own line search: drop backtrack"},
        ),
        AlgorithmEntry(
            "maml",
            _GD,
            {"gd": _fixed_gd},
            lambda s: Unrolled(),
            {"backtrack": "maml differentiates through a fixed inner path: drop backtrack"},
        ),
        AlgorithmEntry(
            "fomaml", _GD | {"backtrack"}, {"gd": _gd, "nesterov": _nesterov}, lambda s: FirstOrder()
        ),
        AlgorithmEntry(
            "reptile", _GD | {"backtrack"}, {"gd": _gd, "nesterov": _nesterov}, lambda s: ReptileStep()
        ),
        AlgorithmEntry(
            "imaml-released",
            _PROXIMAL | _GD,
            {"gd": _fixed_gd},
            lambda s: ReleasedCG(s.cg_iters, s.damping),
            {"backtrack": "imaml-released runs the released code's fixed-step loop: drop backtrack"},
        ),
        AlgorithmEntry(
            "anil",
            _GD,
            {"gd": _fixed_gd},
            lambda s: HeadOnly(),
            {"backtrack": "anil differentiates through a fixed inner path of the head: drop backtrack"},
        ),
        AlgorithmEntry(
            "meta-sgd",
            _GD,
            {"gd": _fixed_gd},
            lambda s: LearnedSteps(s.inner_lr),
            {"backtrack": "meta-sgd learns its inner step sizes along a fixed inner path: drop backtrack"},
            min_inner_steps=(1, NO_STEP),
        ),
    )
}


def readers(field: str) -> tuple[str, ...]:
    """The algorithms that read ``field`` (`AlgorithmEntry.flags`), in registry order."""
    return tuple(name for name, e in ALGORITHMS.items() if field in e.flags)


def readers_of_kind(kind: str) -> tuple[str, ...]:
    """The algorithms that take inner solver kind ``kind``, in registry order."""
    return tuple(name for name, e in ALGORITHMS.items() if kind in e.inner)


def _and(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _or_quoted(names: list[str]) -> str:
    q = [repr(n) for n in names]
    return f"{', '.join(q[:-1])} or {q[-1]}"


def make_algorithm(name: str, **settings: Any) -> MetaAlgorithm:
    """The `MetaAlgorithm` of algorithm ``name`` (an `ALGORITHMS` entry) with these `Settings`.

    Args:
        name: ``imaml-gd``, ``imaml-hf``, ``maml``, ``fomaml``, ``reptile``, ``imaml-released``,
            ``anil`` or ``meta-sgd``.
        **settings: `Settings` fields: ``inner_steps``, ``inner_lr`` (Meta-SGD: the learned step
            sizes' initial value), ``lam``, ``cg_iters``,
            ``newton_iters``, ``damping``, ``cg_warm_start``, ``inner_tol``, ``backtrack``,
            ``inner_solver``.

    Raises:
        ValueError: an unknown name or inner solver kind, or a setting the algorithm refuses.
        TypeError: an unknown setting.
    """
    entry = ALGORITHMS.get(name)
    if entry is None:
        raise ValueError(
            f"unknown algorithm {name!r}: choose {', '.join(list(ALGORITHMS)[:-1])} or {list(ALGORITHMS)[-1]}"
        )
    return entry.build(Settings(**settings))
