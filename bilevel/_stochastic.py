"""Stochastic single-loop bilevel solvers on mini-batch oracles: SOBA, SABA and StocBiO.

The bilevel problem has finite sums in both levels,

    min_x  h(x) = F(z*(x), x),   F(z, x) = (1/m) sum_j f_j(z, x)       (outer, m samples)
    s.t.   z*(x) = argmin_z G(z, x),   G(z, x) = (1/n) sum_i g_i(z, x)   (inner, n samples)

and its hypergradient is

    grad h(x) = grad_x F(z*, x) + (d2G/dx dz)(z*, x) v*,   (d2G/dz2)(z*, x) v* = -grad_z F(z*, x).

`bilevel.hyperopt.HyperProblem` solves the inner problem and the linear system to tolerance on
the full data at every outer step.  The solvers here take one stochastic step per iteration on
mini-batches instead, so an iteration costs a few batch gradients whatever n and m are:

* `SOBA` (Dagréou et al. 2022): z, v and x each take one step along a stochastic estimate of
  their direction, D_z = grad_z G, D_v = (d2G/dz2) v + grad_z F, D_x = (d2G/dx dz) v + grad_x F;
  the step sizes may decrease (the paper's schedule).
* `SABA` (same paper): SOBA with each of the five stochastic terms replaced by its SAGA
  estimate (a memory of the last value seen on each mini-batch and their average), which makes
  the directions' variance vanish at the solution: it converges with constant step sizes, at
  rate O(1/T) (linearly on strongly convex problems).
* `StocBiO` (Ji, Yang & Liang 2021): a few inner SGD steps, then a stochastic Neumann series for
  the linear system, then one outer step.

Mini-batches.  The n inner sample indices are split once into fixed batches, and each epoch
visits them in a fresh random order (sampling without replacement by epochs, as in Benchopt's
``benchmark_bilevel``); the outer indices likewise, from their own stream.  From ``seed``::

    inner_ss, outer_ss = numpy.random.SeedSequence(seed).spawn(2)
    rng = numpy.random.default_rng(inner_ss)          # (outer: outer_ss, m, outer batch size)
    perm = rng.permutation(n)                         # the fixed partition, drawn once
    batches = [perm[j * b:(j + 1) * b] for j in range(ceil(n / b))]
    every epoch: for j in rng.permutation(len(batches)): yield batches[j]

With ``contiguous_batches=True`` the partition is the identity's (``perm = arange(n)``, nothing
drawn): consecutive index blocks, Benchopt's sampler, for data stored in random order.

Batches of unequal size (the last one when b does not divide n) are weighted so that every
estimate stays unbiased: a batch B_j of the n_b batches has weight w_j = |B_j| / n, and its
estimates are scaled by s_j = n_b w_j (1 when b divides n; then the updates are exactly the
papers' and the benchmark's).

References:
    Dagréou, Ablin, Vaiter & Moreau, "A framework for bilevel optimization that enables
    stochastic and global variance reduction algorithms", NeurIPS 2022 (SOBA, SABA).
    Ji, Yang & Liang, "Bilevel optimization: convergence analysis and enhanced design",
    ICML 2021 (StocBiO).
    Defazio, Bach & Lacoste-Julien, "SAGA", NeurIPS 2014.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import time
import types
import warnings
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from ._errors import BilevelError, BilevelWarning, ConvergenceError, NonFiniteError, StructureError
from ._settings import check_flag, check_int, check_positive
from ._sync import host_checks

__all__ = [
    "SABA",
    "SOBA",
    "BatchLoss",
    "Constant",
    "Decay",
    "StepSchedule",
    "StocBiO",
    "StochasticBilevel",
    "StochasticRecord",
    "StochasticResult",
    "StochasticStop",
    "batch_schedule",
]

#: ``loss(z, x, idx) -> scalar Tensor``: the mean loss over the samples ``idx`` (a 1-D
#: ``torch.long`` tensor on z's device) at inner variable z and outer variable x.
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: ``callback(record) -> bool | None``: ``True`` stops the run.
Callback = Callable[["StochasticRecord"], "bool | None"]

#: ``metric(z, x) -> float``: an extra quantity recorded beside the outer loss (e.g. the
#: suboptimality of a benchmark problem, or a held-out loss).
Metric = Callable[[torch.Tensor, torch.Tensor], float]


@dataclasses.dataclass(frozen=True, eq=False)
class StochasticBilevel:
    """A bilevel problem given by mini-batch oracles of its inner and outer losses.

    Args:
        inner: ``inner(z, x, idx) -> scalar``, the mean inner loss G over the inner samples
            ``idx`` (a 1-D ``torch.long`` tensor of indices in ``0 .. n_inner - 1``); twice
            differentiable in z, and its gradient in z differentiable in x (autograd).
        outer: ``outer(z, x, idx) -> scalar``, the mean outer loss F over the outer samples
            ``idx`` (indices in ``0 .. n_outer - 1``); differentiable in z and x.
        n_inner: the number of inner samples n.
        n_outer: the number of outer samples m.

    z and x are tensors of any shape (the solvers pass them in the shape of ``z0``, ``x0``).
    The oracles must be *means* over the batch: the solvers average batches with weights
    |B| / n, so a sum would scale the steps by the batch size.

    Raises:
        TypeError: an oracle is not callable, or a count is not an int.
        ValueError: a count is < 1.
    """

    inner: BatchLoss
    outer: BatchLoss
    n_inner: int
    n_outer: int

    def __post_init__(self) -> None:
        for name in ("inner", "outer"):
            value = getattr(self, name)
            if not callable(value):
                raise TypeError(
                    f"StochasticBilevel({name}={value!r}): expected a function (z, x, idx) -> scalar Tensor"
                )
        for name in ("n_inner", "n_outer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"StochasticBilevel({name}={value!r}): expected an int (a sample count)")
            if value < 1:
                raise ValueError(f"StochasticBilevel({name}={value!r}): the sample count must be >= 1")
            object.__setattr__(self, name, int(value))


class StepSchedule(Protocol):
    """A step-size schedule: ``schedule(t)`` multiplies the base step size at iteration t (0-based)."""

    def __call__(self, t: int) -> float: ...


@dataclasses.dataclass(frozen=True)
class Constant:
    """The constant schedule: the base step size at every iteration (SABA, StocBiO, the default)."""

    def __call__(self, t: int) -> float:
        return 1.0


@dataclasses.dataclass(frozen=True)
class Decay:
    """A polynomially decreasing schedule: step_t = step / (t + 1) ** exponent.

    SOBA's analysis (Dagréou et al. 2022, Theorem 1) takes ``Decay(0.4)`` for the inner and
    linear-system steps and ``Decay(0.6)`` for the outer step; Benchopt's SOBA runs
    ``Decay(0.5)`` for both.

    Raises:
        ValueError: ``exponent`` is negative or not finite.
    """

    exponent: float

    def __post_init__(self) -> None:
        e = self.exponent
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise ValueError(f"Decay(exponent={e!r}): the exponent must be a finite number >= 0")

    def __call__(self, t: int) -> float:
        return float((t + 1) ** -self.exponent)


class StochasticStop(enum.Enum):
    """Why a stochastic solver stopped."""

    COMPLETED = "ran max_iter iterations (no convergence test: judge the run by its history)"
    CALLBACK = "the callback returned True"
    TIME_LIMIT = "the solver time reached time_limit"


@dataclasses.dataclass(frozen=True)
class StochasticRecord:
    """One evaluation point of a stochastic run (what ``callback`` receives).

    Attributes:
        iteration: iterations completed (outer updates of x).
        time: solver wall time in seconds up to here, evaluations excluded.
        inner_epochs: inner samples drawn so far divided by n_inner (every oracle call counted:
            gradients, HVPs and cross terms on one batch count once, as one evaluation).
        outer_epochs: outer samples drawn so far divided by n_outer.
        outer_loss: the outer loss F(z, x) on all outer samples at the current iterates (an
            estimate of h(x) that is exact only when z = z*(x)).
        metric: ``metric(z, x)`` when ``run`` was given one, else NaN.
        z_norm, v_norm, x_norm: Euclidean norms of the iterates.
    """

    iteration: int
    time: float
    inner_epochs: float
    outer_epochs: float
    outer_loss: float
    metric: float
    z_norm: float
    v_norm: float
    x_norm: float


@dataclasses.dataclass(frozen=True)
class StochasticResult:
    """What `SOBA.run`, `SABA.run` and `StocBiO.run` return.

    Attributes:
        x: the outer variable at the end, shaped like ``x0`` (detached).
        z: the inner variable, shaped like ``z0``.
        v: the linear-system variable, shaped like ``z0``: an estimate of
            v* = -(d2G/dz2)^-1 grad_z F (for StocBiO, minus its last Neumann estimate).
        n_iter: iterations run (outer updates).
        inner_epochs, outer_epochs: samples drawn divided by n_inner, n_outer.
        time: solver wall time in seconds, evaluations excluded.
        history: the `StochasticRecord` at iteration 0, every ``eval_every`` iterations and at
            the end, in order.
        status: why the run stopped (`StochasticStop`).
    """

    x: torch.Tensor
    z: torch.Tensor
    v: torch.Tensor
    n_iter: int
    inner_epochs: float
    outer_epochs: float
    time: float
    history: tuple[StochasticRecord, ...]
    status: StochasticStop

    @property
    def outer_losses(self) -> tuple[float, ...]:
        """The recorded outer losses, in order."""
        return tuple(r.outer_loss for r in self.history)


def batch_schedule(
    n: int, batch_size: int, rng: np.random.Generator, *, contiguous: bool = False
) -> list[np.ndarray]:
    """The fixed partition of ``range(n)`` into batches, drawn from ``rng`` (see the module doc).

    Args:
        contiguous: the batches are consecutive index blocks ``range(j * b, (j + 1) * b)``
            (``perm`` is the identity, and ``rng`` is not drawn from).

    Returns:
        ``ceil(n / batch_size)`` index arrays: ``perm[j * b:(j + 1) * b]`` for one permutation
        ``perm = rng.permutation(n)``; the last is shorter when ``batch_size`` does not divide n.
    """
    perm = np.arange(n) if contiguous else rng.permutation(n)
    return [perm[j : j + batch_size] for j in range(0, n, batch_size)]


class _Sampler:
    """Batches of one level: the fixed partition, visited in a fresh order each epoch."""

    def __init__(
        self, n: int, batch_size: int, ss: np.random.SeedSequence, device: torch.device, contiguous: bool
    ) -> None:
        self.rng = np.random.default_rng(ss)
        parts = batch_schedule(n, batch_size, self.rng, contiguous=contiguous)
        # Index tensors made once, on the device: a step only picks one (no transfer per step).
        self.batches = [torch.as_tensor(p, dtype=torch.long, device=device) for p in parts]
        self.n_batches = len(parts)
        self.sizes = [len(p) for p in parts]
        self.batch_size = batch_size
        self.weights = [len(p) / n for p in parts]
        self.scales = [self.n_batches * w for w in self.weights]
        self.uniform = n % batch_size == 0
        # The batch ids still to visit: whole epochs' permutations, drawn from rng in order, so
        # looking ahead (a chunk of iterations) does not change the sequence.
        self.queue: list[int] = []
        self.pos = 0
        self.drawn = 0
        self.n = n
        self._table: torch.Tensor | None = None

    def upcoming(self, k: int) -> list[int]:
        """The ids of the next k batches, without taking them."""
        while len(self.queue) - self.pos < k:
            if self.pos:
                del self.queue[: self.pos]
                self.pos = 0
            self.queue.extend(self.rng.permutation(self.n_batches).tolist())
        return self.queue[self.pos : self.pos + k]

    def take(self, k: int) -> list[int]:
        """The ids of the next k batches (a new random order at the start of each epoch)."""
        ids = self.upcoming(k)
        self.pos += k
        self.drawn += sum(self.sizes[j] for j in ids)
        return ids

    def next(self) -> int:
        """The id of the next batch."""
        return self.take(1)[0]

    def full_run(self, ids: list[int]) -> int:
        """How many of the batches ids, from the first, have ``batch_size`` samples (a chunk
        needs one shape)."""
        for i, j in enumerate(ids):
            if self.sizes[j] != self.batch_size:
                return i
        return len(ids)

    def table(self) -> torch.Tensor:
        """All batches as one (n_batches + 1, batch_size) long tensor.  A short last batch is
        padded with index 0 (its row is never read: chunks take full batches only); the extra
        last row, id ``n_batches``, is the batch of a chunk's idle iterations (see
        `_compiled_steps`)."""
        if self._table is None:
            rows = [
                torch.nn.functional.pad(b, (0, self.batch_size - len(b))) if len(b) < self.batch_size else b
                for b in self.batches
            ]
            self._table = torch.stack([*rows, torch.zeros_like(rows[0])])
        return self._table


class _Oracles:
    """The per-batch derivatives of a `StochasticBilevel`, by autograd, on flat iterates.

    The iterates are kept flat (1-D) so the solvers' updates and SABA's memories are plain
    vector operations; the user's oracles see them in the shapes of ``z0`` and ``x0``.
    """

    def __init__(self, problem: StochasticBilevel, zshape: torch.Size, xshape: torch.Size) -> None:
        self.problem = problem
        self.zshape = zshape
        self.xshape = xshape
        self.iteration = 0
        self.warned_no_cross = False

    def _no_cross(self) -> None:
        """Warn, once, that grad_z G does not depend on x: x then never sees the inner problem."""
        if not self.warned_no_cross:
            self.warned_no_cross = True
            warnings.warn(
                "StochasticBilevel: the inner oracle's gradient in z does not depend on x (a detached "
                "copy of x, or x used through NumPy?), so the hypergradient has no implicit term and x "
                "moves along grad_x F alone; make the inner loss a differentiable function of x",
                BilevelWarning,
                stacklevel=4,
            )

    def _grad_z(self, loss: torch.Tensor, zr: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """grad_z of the inner loss; an error that says so where the loss has no graph to z."""
        g = None
        if loss.requires_grad:
            (g,) = torch.autograd.grad(loss, zr, create_graph=create_graph, allow_unused=True)
        if g is None:
            raise StructureError(
                "StochasticBilevel: the inner oracle's value does not depend on z; it must be the "
                "inner loss as a differentiable function of z (do not detach z or compute it in NumPy)"
            )
        return g

    def _vars(self, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            z.detach().view(self.zshape).requires_grad_(True),
            x.detach().view(self.xshape).requires_grad_(True),
        )

    def _call(self, which: str, z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        fn = self.problem.inner if which == "inner" else self.problem.outer
        out = fn(z, x, idx)
        if not isinstance(out, torch.Tensor) or out.numel() != 1 or not out.is_floating_point():
            what = (
                f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}"
                if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}"
            )
            raise StructureError(
                f"StochasticBilevel: the {which} oracle returned {what}; it must return a floating-point "
                "scalar, the mean loss over the batch (reduce a per-sample loss with .mean())"
            )
        return out.reshape(())

    def inner_directions(
        self, z: torch.Tensor, x: torch.Tensor, v: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the inner batch idx: grad_z G, (d2G/dz2) v and (d2G/dx dz) v, flat.

        One forward pass, one backward with a graph and one double backward: the HVP and the
        cross term come out of the same vector-Jacobian product of grad_z G with v.
        """
        with torch.enable_grad():
            zr, xr = self._vars(z, x)
            loss = self._call("inner", zr, xr, idx)
            g = self._grad_z(loss, zr, True)
            if g.requires_grad:
                hvp, cross = torch.autograd.grad(g, (zr, xr), v.view(self.zshape), allow_unused=True)
                if cross is None:
                    self._no_cross()
            else:
                # G linear in z (no curvature): the inner problem has no unique solution, which
                # the divergence checks will report; the terms are zero.
                hvp, cross = None, None
        return (
            g.detach().reshape(-1),
            torch.zeros_like(z) if hvp is None else hvp.reshape(-1),
            torch.zeros_like(x) if cross is None else cross.reshape(-1),
        )

    def inner_grad(self, z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """grad_z G on the inner batch idx, flat."""
        with torch.enable_grad():
            zr, xr = self._vars(z, x)
            g = self._grad_z(self._call("inner", zr, xr, idx), zr, False)
        return g.reshape(-1)

    def hvp(self, z: torch.Tensor, x: torch.Tensor, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(d2G/dz2) u on the inner batch idx, flat."""
        with torch.enable_grad():
            zr, xr = self._vars(z, x)
            g = self._grad_z(self._call("inner", zr, xr, idx), zr, True)
            if not g.requires_grad:
                return torch.zeros_like(z)
            (h,) = torch.autograd.grad(g, zr, u.view(self.zshape))
        return h.reshape(-1)

    def cross(self, z: torch.Tensor, x: torch.Tensor, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(d2G/dx dz) u on the inner batch idx, flat."""
        with torch.enable_grad():
            zr, xr = self._vars(z, x)
            g = self._grad_z(self._call("inner", zr, xr, idx), zr, True)
            if not g.requires_grad:
                return torch.zeros_like(x)
            (c,) = torch.autograd.grad(g, xr, u.view(self.zshape), allow_unused=True)
        if c is None:
            self._no_cross()
            return torch.zeros_like(x)
        return c.reshape(-1)

    def outer_grads(
        self, z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """grad_z F and grad_x F on the outer batch idx, flat."""
        with torch.enable_grad():
            zr, xr = self._vars(z, x)
            loss = self._call("outer", zr, xr, idx)
            if not loss.requires_grad:
                return torch.zeros_like(z), torch.zeros_like(x)
            gz, gx = torch.autograd.grad(loss, (zr, xr), allow_unused=True)
        return (
            torch.zeros_like(z) if gz is None else gz.reshape(-1),
            torch.zeros_like(x) if gx is None else gx.reshape(-1),
        )

    def outer_loss(self, z: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self._call("outer", z.view(self.zshape), x.view(self.xshape), idx))


@dataclasses.dataclass
class _State:
    """The mutable state of one run (flat iterates, samplers, counters)."""

    who: str
    z: torch.Tensor
    x: torch.Tensor
    v: torch.Tensor
    oracles: _Oracles
    inner: _Sampler
    outer: _Sampler
    # Which step size to lower when an iterate diverges, by iterate name.
    lr_names: dict[str, str]
    # Norm scale for the divergence test (1 + the initial norms).
    scale: float
    max_norm: float
    checks: bool
    # The norms of (z, v, x) at the last check, and the oracle outputs since (see `_check_iterates`).
    prev_norms: list[float] = dataclasses.field(default_factory=list)
    outputs: list[tuple[int, str, str, tuple[torch.Tensor, ...]]] = dataclasses.field(default_factory=list)
    # The iteration of the last check.
    prev_t: int = 0
    # The norms of (z, v, x) after the last step when a compiled step computed them.
    norms: torch.Tensor | None = None
    t: int = 0


def _note(state: _State, what: str, oracle: str, *values: torch.Tensor) -> None:
    """Keep an oracle's outputs of this iteration: if the iterates go wrong, they say which oracle."""
    state.outputs.append((state.t, oracle, what, values))


def _check_iterates(state: _State, norms_t: torch.Tensor | None = None) -> None:
    """Raise if an iterate is non-finite or its norm exceeds max_norm * (1 + initial norms).

    One host read of the three norms.  Every oracle output enters an iterate linearly, so a NaN
    from an oracle shows here; then the outputs kept by `_note` name the oracle: a non-finite
    output at moderate iterates is the oracle's fault (`NonFiniteError`), while iterates that
    were already growing diverged (`ConvergenceError`, naming the step size that moves each
    iterate over the limit).  On the CPU this runs at every iteration, so the first iterate to
    blow up is caught alone; elsewhere every ``check_every`` iterations, and the outputs kept
    since then still name the oracle and the iteration.
    """
    if norms_t is None:
        norms_t = torch.stack(torch._foreach_norm([state.z, state.v, state.x]))

    def bad_oracles() -> list[tuple[int, str, str]]:
        return [
            (t, oracle, what)
            for t, oracle, what, values in state.outputs
            if not all(bool(torch.isfinite(val).all()) for val in values)
        ]

    _judge(state, state.t, norms_t.tolist(), bad_oracles)


def _check_chunk(state: _State, norms: torch.Tensor, finite: torch.Tensor) -> None:
    """`_check_iterates` for each iteration of a chunk that started at iteration state.t.

    Args:
        norms: (K, 3), the norms of (z, v, x) after each of the chunk's K iterations.
        finite: (K, 2) bool, whether the inner and the outer oracle outputs of each iteration
            were all finite.

    One host read for the chunk; the iteration named is the one where the iterates or an
    oracle first went wrong, as with a check at every iteration.
    """
    rows: list[list[float]] = norms.tolist()
    flags: list[list[bool]] = finite.tolist()
    t0 = state.t
    limit = state.max_norm * state.scale
    # The usual case, every iteration fine, in one pass (NaN <= limit is False).
    if all(n <= limit for row in rows for n in row) and all(all(f) for f in flags):
        state.prev_norms, state.prev_t = rows[-1], t0 + len(rows) - 1
        state.outputs.clear()
        return
    for i, (row, (inner_ok, outer_ok)) in enumerate(zip(rows, flags)):
        t = t0 + i
        oracles = [
            (t, oracle, what)
            for ok, oracle, what in (
                (inner_ok, "inner", "gradient, HVP or cross term"),
                (outer_ok, "outer", "gradient"),
            )
            if not ok
        ]
        _judge(state, t, row, functools.partial(list, oracles))


def _judge(
    state: _State, t: int, norms: list[float], bad_oracles: Callable[[], list[tuple[int, str, str]]]
) -> None:
    """The verdict on the norms of (z, v, x) after iteration t (see `_check_iterates`)."""
    limit = state.max_norm * state.scale
    bad = [(name, norm) for name, norm in zip("zvx", norms) if not (math.isfinite(norm) and norm <= limit)]
    prev, state.prev_norms = state.prev_norms, norms
    prev_t, state.prev_t = state.prev_t, t
    if not bad:
        state.outputs.clear()
        return
    moderate = all(math.isfinite(n) and n <= limit for n in prev)
    if moderate:
        for ot, oracle, what in bad_oracles():
            raise NonFiniteError(
                f"{state.who}: the {oracle} oracle's {what} is NaN or infinite at iteration {ot}, "
                f"where the iterates were finite and moderate at the last check (iteration {prev_t}: "
                f"||z|| = {prev[0]:.3g}, ||v|| = {prev[1]:.3g}, ||x|| = {prev[2]:.3g}): check the "
                f"{oracle} loss's domain on "
                "these samples (log of 0, division, exp overflow) and its derivatives there"
            )
    state.outputs.clear()
    which = ", ".join(f"||{name}|| = {norm:.3g}" for name, norm in bad)
    lower = " and ".join(dict.fromkeys(state.lr_names[name] for name, _ in bad))
    raise ConvergenceError(
        f"{state.who} diverged at iteration {t}: {which} (limit max_norm * (1 + "
        f"initial norms) = {limit:.3g}); lower {lower}"
    )


def _validate_common(
    who: str,
    lrs: dict[str, float],
    batch_size: int,
    outer_batch_size: int | None,
    schedules: dict[str, object],
    max_norm: float,
) -> None:
    for name, lr in lrs.items():
        check_positive(who, name, lr)
    check_int(who, "batch_size", batch_size, 1)
    if outer_batch_size is not None:
        check_int(who, "outer_batch_size", outer_batch_size, 1)
    for name, s in schedules.items():
        if isinstance(s, type):
            raise TypeError(f"{who}({name}={s.__name__}): pass an instance, e.g. Constant() or Decay(0.5)")
        if not callable(s):
            raise TypeError(
                f"{who}({name}={s!r}): expected a schedule t -> factor, e.g. Constant() or Decay(0.5)"
            )
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"{who}(max_norm={max_norm!r}): max_norm must be a number > 0")


def _checked_schedule(who: str, name: str, schedule: StepSchedule) -> Callable[[int], float]:
    """``schedule`` as a function that refuses a factor that is not a finite number >= 0: a NaN
    or negative step would otherwise be blamed on the iterates (NONFINITE, divergence).  The
    package's own schedules give such factors by construction and are passed through unwrapped
    (the compiled loop calls them at every iteration)."""
    if isinstance(schedule, (Constant, Decay)):
        return schedule

    def factor(t: int) -> float:
        f = schedule(t)
        try:
            value = float(f)
        except (TypeError, ValueError, RuntimeError):
            value = math.nan
        if isinstance(f, bool) or not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"{who}: {name}({t}) returned {f!r}; a schedule must return a finite factor >= 0 "
                "of the base step size"
            )
        return value

    return factor


def _start(
    who: str,
    problem: StochasticBilevel,
    z0: torch.Tensor,
    x0: torch.Tensor,
    batch_size: int,
    outer_batch_size: int | None,
    seed: int,
    lr_names: dict[str, str],
    max_norm: float,
    contiguous: bool,
) -> _State:
    if not isinstance(problem, StochasticBilevel):
        raise TypeError(f"{who}.run: problem must be a StochasticBilevel, got {type(problem).__name__}")
    for name, t in (("z0", z0), ("x0", x0)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{who}.run: {name} must be a torch.Tensor, got {type(t).__name__} (ravel a tree of "
                "tensors into one with bilevel.tree.ravel)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{who}.run: {name} has dtype {t.dtype}; it must be floating point")
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{who}.run: {name} has NaN or infinite entries; start from finite values")
    if z0.dtype != x0.dtype or z0.device != x0.device:
        raise StructureError(
            f"{who}.run: z0 is {z0.dtype} on {z0.device} but x0 is {x0.dtype} on {x0.device}; "
            "give both the same dtype and device"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{who}.run(seed={seed!r}): the seed must be an int >= 0")
    ob = batch_size if outer_batch_size is None else outer_batch_size
    for name, b, n, level in (
        ("batch_size", batch_size, problem.n_inner, "n_inner"),
        (
            "outer_batch_size" if outer_batch_size is not None else "batch_size",
            ob,
            problem.n_outer,
            "n_outer",
        ),
    ):
        if b > n:
            raise ValueError(
                f"{who}({name}={b}): larger than the data ({level} = {n}); the largest batch is {n} "
                "(the full data, a deterministic method)"
            )
    inner_ss, outer_ss = np.random.SeedSequence(int(seed)).spawn(2)
    z = z0.detach().reshape(-1).clone()
    x = x0.detach().reshape(-1).clone()
    return _State(
        who=who,
        z=z,
        x=x,
        v=torch.zeros_like(z),
        oracles=_Oracles(problem, z0.shape, x0.shape),
        inner=_Sampler(problem.n_inner, batch_size, inner_ss, z0.device, contiguous),
        outer=_Sampler(problem.n_outer, ob, outer_ss, z0.device, contiguous),
        lr_names=lr_names,
        scale=1.0 + float(z.norm()) + float(x.norm()),
        max_norm=float(max_norm),
        checks=host_checks(z),
        prev_norms=[float(z.norm()), 0.0, float(x.norm())],
    )


def _drive(
    state: _State,
    step: Callable[[_State], None],
    *,
    max_iter: int,
    callback: Callback | None,
    eval_every: int | None,
    time_limit: float | None,
    metric: Metric | None,
    check_every: int,
    chunk: _Chunked = None,
) -> StochasticResult:
    """The loop the solvers share: steps, divergence checks, records, callback, stop rules.

    With ``chunk = (K, chunk_step)``, ``chunk_step(state, p)`` runs the p <= K iterations from
    state.t in one compiled call and checks each (`_check_chunk`); p is the number of
    iterations before the next record, max_iter or the next shorter batch on either level
    (`_chunk_length`); the iterations a chunk does not take run one by one through ``step``.
    """
    who = state.who
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"{who}.run(max_iter={max_iter!r}): max_iter must be an int >= 0")
    if eval_every is not None and (
        isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1
    ):
        raise ValueError(f"{who}.run(eval_every={eval_every!r}): eval_every must be an int >= 1 or None")
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ValueError(f"{who}.run(time_limit={time_limit!r}): time_limit must be a number of seconds > 0")
    if callback is not None and not callable(callback):
        raise TypeError(f"{who}.run(callback={callback!r}): expected a function record -> bool | None")
    if metric is not None and not callable(metric):
        raise TypeError(f"{who}.run(metric={metric!r}): expected a function (z, x) -> float")
    problem = state.oracles.problem
    all_outer = torch.arange(problem.n_outer, device=state.z.device)
    zshape, xshape = state.oracles.zshape, state.oracles.xshape
    history: list[StochasticRecord] = []
    elapsed = 0.0

    def record() -> bool:
        """Append a record; True when the callback asks to stop."""
        _check_iterates(state)
        loss = state.oracles.outer_loss(state.z, state.x, all_outer)
        value = math.nan
        if metric is not None:
            got = metric(state.z.view(zshape).clone(), state.x.view(xshape).clone())
            number = isinstance(got, (int, float, np.number)) and not isinstance(got, bool)
            if not (number or (isinstance(got, torch.Tensor) and got.numel() == 1)):
                what = f"a tensor of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else repr(got)
                raise TypeError(f"{state.who}.run: metric(z, x) returned {what}; it must return a number")
            value = float(got)
        rec = StochasticRecord(
            iteration=state.t,
            time=elapsed,
            inner_epochs=state.inner.drawn / problem.n_inner,
            outer_epochs=state.outer.drawn / problem.n_outer,
            outer_loss=loss,
            metric=value,
            z_norm=float(state.z.norm()),
            v_norm=float(state.v.norm()),
            x_norm=float(state.x.norm()),
        )
        history.append(rec)
        if callback is None:
            return False
        verdict = callback(rec)
        if verdict is not None and not isinstance(verdict, bool):
            raise TypeError(
                f"{who}: callback returned {type(verdict).__name__}; it must return True to stop the "
                "run, False or None to go on"
            )
        return bool(verdict)

    status = StochasticStop.COMPLETED
    stop = eval_every is not None and record()
    if stop:
        status = StochasticStop.CALLBACK
    tic = time.perf_counter()
    while not stop and state.t < max_iter:
        if chunk is not None and (p := _chunk_length(state, chunk[0], max_iter, eval_every)):
            chunk[1](state, p)
            state.t += p
        else:
            step(state)
            # Between chunks (which check every iteration) a single step is checked too, so a
            # chunk's first iteration is judged against checked iterates.
            if state.checks or chunk is not None or (state.t + 1) % check_every == 0:
                _check_iterates(state, state.norms)
            state.t += 1
        if eval_every is not None and state.t % eval_every == 0:
            elapsed += time.perf_counter() - tic
            stop = record()
            if stop:
                status = StochasticStop.CALLBACK
            tic = time.perf_counter()
        if time_limit is not None and elapsed + (time.perf_counter() - tic) >= time_limit:
            status = StochasticStop.TIME_LIMIT
            break
    elapsed += time.perf_counter() - tic
    if not history or history[-1].iteration != state.t:
        record()
    return StochasticResult(
        x=state.x.view(xshape).clone(),
        z=state.z.view(zshape).clone(),
        v=state.v.view(zshape).clone(),
        n_iter=state.t,
        inner_epochs=state.inner.drawn / problem.n_inner,
        outer_epochs=state.outer.drawn / problem.n_outer,
        time=elapsed,
        history=tuple(history),
        status=status,
    )


def _chunk_length(state: _State, k: int, max_iter: int, eval_every: int | None) -> int:
    """How many of the next iterations a chunk of k runs: those before max_iter, the next
    record and the next shorter batch on either level (a chunk's graph has one batch shape),
    at most k; 0 (run one step alone) when that is under k / 4.

    A chunk costs about its k iterations whether all are taken or not (the idle ones compute
    and discard); one compiled step alone costs about as much as 4 iterations inside a chunk
    on small models (its per-call cost, about 100 us on a CPU, against tens of microseconds),
    so a chunk pays from k / 4 iterations on.
    """
    end = max_iter if eval_every is None else min(max_iter, (state.t // eval_every + 1) * eval_every)
    p = min(
        k,
        end - state.t,
        state.inner.full_run(state.inner.upcoming(k)),
        state.outer.full_run(state.outer.upcoming(k)),
    )
    return p if 4 * p >= k else 0


def _func_directions(
    oracles: _Oracles,
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The five directions on one inner and one outer batch, by torch.func (traceable by
    torch.compile, which cannot trace ``torch.autograd.grad``): (grad_z G, (d2G/dz2) v,
    (d2G/dx dz) v, grad_z F, grad_x F), flat."""
    inner, outer = oracles.problem.inner, oracles.problem.outer
    zshape, xshape = oracles.zshape, oracles.xshape

    def directions(
        z: torch.Tensor, x: torch.Tensor, v: torch.Tensor, idx_in: torch.Tensor, idx_out: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        def grad_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = torch.func.grad(lambda a2, b2: inner(a2, b2, idx_in).reshape(()))(a, b)
            return out

        g, vjp = torch.func.vjp(grad_z, z.view(zshape), x.view(xshape))  # type: ignore[misc]
        h, c = vjp(v.view(zshape))
        gz, gx = torch.func.grad(lambda a, b: outer(a, b, idx_out).reshape(()), argnums=(0, 1))(
            z.view(zshape), x.view(xshape)
        )
        return tuple(t.reshape(-1) for t in (g, h, c, gz, gx))

    return directions


def _compiled(
    who: str, fn: Callable[..., tuple[torch.Tensor, ...]], *, cpp_wrapper: bool = False
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``torch.compile(fn, fullgraph=True)``, whose tracing failures say what to do.

    ``cpp_wrapper``: Inductor's C++ wrapper instead of its Python one.  A chunk's graph has a
    buffer per intermediate of every iteration (hundreds), each allocated and passed by the
    Python wrapper at about a microsecond apiece; in C++ that cost mostly goes, for a longer
    compilation.
    """
    # dynamic=False: a shorter last batch gets its own static graph rather than a symbolic
    # one for every shape (slower, and recompiled once more anyway).
    # Dynamo keeps its graphs, and its limit of 8 recompilations, per code object.  The kernels
    # are closures made afresh by every run (a new problem, new shapes), all sharing one code
    # object, so the ninth run would hit the limit: each run compiles its own copy of the code.
    fresh = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    options: dict[str, object] = {}
    if (small_mm := _small_matmuls_as_loops()) is not None:
        options["post_grad_custom_post_pass"] = small_mm
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    compiled = torch.compile(fresh, fullgraph=True, dynamic=False, options=options)  # type: ignore[arg-type]

    def call(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        try:
            out: tuple[torch.Tensor, ...] = compiled(*args)
        except Exception as err:
            raise BilevelError(
                f"{who}(compile=True): torch.compile could not compile one iteration with the "
                f"oracles ({type(err).__name__}: {_first_lines(err)}); "
                "the oracles must be traceable by torch.func and torch.compile (no .item(), "
                "NumPy or data-dependent Python branches); run with compile=False"
            ) from err
        return out

    return call


#: The largest m k n of a CPU matrix product that `_SmallMatmulsAsLoops` rewrites.
_SMALL_MM = 1 << 16


@functools.cache
def _small_matmuls_as_loops() -> object | None:
    """Inductor post-grad pass: a CPU ``mm(a, b)`` of at most `_SMALL_MM` multiply-adds becomes
    ``(a[:, :, None] * b[None]).sum(1)``, which Inductor fuses into its own C++ loops.

    A mini-batch oracle's products are small (a batch of 64 against a few columns: tens of
    thousands of multiply-adds), and an external BLAS call costs tens of microseconds for
    them, about its cost for a product a hundred times larger; an iteration of SOBA on a
    logistic regression has six.  As loops they cost a few microseconds each.  The sums run
    in another order than BLAS's: results equal up to rounding.  ``uuid`` keys Inductor's
    cache on the rewrite.  (Built on first use: importing Inductor is slow.)  ``None`` on a
    torch whose Inductor has no custom graph passes (the products then stay BLAS calls).
    """
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:
        return None

    class SmallMatmulsAsLoops(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            aten = torch.ops.aten
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target is not aten.mm.default:
                    continue
                a, b = node.args
                va = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
                vb = b.meta.get("val") if isinstance(b, torch.fx.Node) else None
                if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
                    continue
                shape = (*va.shape, vb.shape[1])
                small = all(isinstance(d, int) for d in shape) and math.prod(shape) <= _SMALL_MM
                if va.device.type != "cpu" or not small:
                    continue
                with graph.inserting_before(node):
                    ua = graph.call_function(aten.unsqueeze.default, (a, 2))
                    ub = graph.call_function(aten.unsqueeze.default, (b, 0))
                    prod = graph.call_function(aten.mul.Tensor, (ua, ub))
                    total = graph.call_function(aten.sum.dim_IntList, (prod, [1]))
                with va.fake_mode:  # type: ignore[attr-defined]
                    ua.meta["val"] = va.unsqueeze(2)
                    ub.meta["val"] = vb.unsqueeze(0)
                    prod.meta["val"] = ua.meta["val"] * ub.meta["val"]
                    total.meta["val"] = prod.meta["val"].sum(1)
                node.replace_all_uses_with(total)
                graph.erase_node(node)

        def uuid(self) -> str:
            return f"bilevel-small-matmuls-as-loops-{_SMALL_MM}"

    return SmallMatmulsAsLoops()


def _first_lines(err: Exception) -> str:
    """The first two non-empty lines of an error message (torch.compile's run to pages)."""
    return " ".join([line.strip() for line in str(err).splitlines() if line.strip()][:2])


#: What one compiled iteration's body returns: the new (z, v, x), the inner oracle outputs
#: (grad_z G, (d2G/dz2) v, (d2G/dx dz) v) and the outer ones (grad_z F, grad_x F).
_BodyOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]


def _compiled_steps(
    who: str,
    state: _State,
    body: Callable[..., _BodyOut],
    coef_row: Callable[[_State, int, int, int], list[float]],
    bufs: tuple[torch.Tensor, ...],
    chunk: int,
) -> tuple[Callable[[_State], None], _Chunked]:
    """The compiled single step and, for ``chunk > 1``, the compiled chunk of iterations.

    ``body(z, x, v, idx_in, idx_out, j_in, j_out, coef, bufs)`` is one iteration on the inner
    batch idx_in (id j_in, a (1,) long tensor) and the outer batch idx_out (id j_out), with the
    step coefficients ``coef = coef_row(state, t, j, k)`` as a tensor (Python floats would be
    baked into the graph: a recompilation per value of a decreasing schedule) and the buffers
    ``bufs`` it updates in place (SABA's memories).

    The chunk runs K = ``chunk`` iterations in one graph (the loop unrolled at trace time), on
    batch ids and coefficients drawn for the K iterations beforehand as (K,) and (K, c)
    tensors: the per-call cost of a compiled function (its Python wrappers, guards and
    argument handling, about 100 us on a CPU) is paid once per K iterations.  It returns the
    norms of (z, v, x) after every iteration and whether each iteration's oracle outputs were
    finite, read once per chunk, so a failure is still named at its iteration.

    A call may take p < K iterations (before a record, ``max_iter`` or a shorter batch, whose
    shape the graph does not have): the last K - p are idle, with zero coefficients, the
    extra batch id of each level (``n_batches``: the table's last row; SABA's memories have
    the same extra row, a scratch the idle iterations write) and ``keep`` False, which keeps
    z, v, x as they were whatever the idle iteration computed; ``body`` must leave its other
    buffers unchanged at zero coefficients (SABA's averages: see its body).
    """
    dev, dtype = state.z.device, state.z.dtype

    def one(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z2, v2, x2, ins, outs = body(*args[:8], args[8:])
        norms = torch.stack([torch.linalg.vector_norm(t) for t in (z2, v2, x2)])
        return (z2, v2, x2, norms, *ins, *outs)

    fused = _compiled(who, one)
    _first_call_checks(state)
    ids_in = [torch.tensor([j], device=dev) for j in range(state.inner.n_batches)]
    ids_out = [torch.tensor([k], device=dev) for k in range(state.outer.n_batches)]

    def step(s: _State) -> None:
        j, k = s.inner.next(), s.outer.next()
        coef = torch.tensor(coef_row(s, s.t, j, k), dtype=dtype, device=dev)
        out = fused(s.z, s.x, s.v, s.inner.batches[j], s.outer.batches[k], ids_in[j], ids_out[k], coef, *bufs)
        s.z, s.v, s.x, s.norms = out[:4]
        _note(s, "gradient, HVP or cross term", "inner", *out[4:7])
        _note(s, "gradient", "outer", *out[7:])

    if chunk == 1:
        return step, None

    def many(
        z: torch.Tensor,
        x: torch.Tensor,
        v: torch.Tensor,
        table_in: torch.Tensor,
        table_out: torch.Tensor,
        j_in: torch.Tensor,
        j_out: torch.Tensor,
        coefs: torch.Tensor,
        keep: torch.Tensor,
        *bufs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        idx_in, idx_out = table_in.index_select(0, j_in), table_out.index_select(0, j_out)
        norms, finite = [], []
        for i in range(chunk):
            z2, v2, x2, ins, outs = body(
                z, x, v, idx_in[i], idx_out[i], j_in[i : i + 1], j_out[i : i + 1], coefs[i], bufs
            )
            z, v, x = (torch.where(keep[i], new, old) for new, old in ((z2, z), (v2, v), (x2, x)))
            norms.append(torch.stack([torch.linalg.vector_norm(t) for t in (z, v, x)]))
            finite.append(
                torch.stack([torch.isfinite(torch.cat(ins)).all(), torch.isfinite(torch.cat(outs)).all()])
            )
        return z, v, x, torch.stack(norms), torch.stack(finite)

    fused_many = _compiled(who, many, cpp_wrapper=True)
    table_in, table_out = state.inner.table(), state.outer.table()

    idle_in, idle_out = state.inner.n_batches, state.outer.n_batches
    keeps = [torch.arange(chunk, device=dev) < p for p in range(chunk + 1)]

    def as_tensor(values: list[int] | list[list[float]], np_dtype: type) -> torch.Tensor:
        # Through NumPy: a few microseconds where torch.tensor from nested lists takes 7-10
        # per call, three calls per chunk (on a CPU from_numpy shares the array, no copy).
        return torch.from_numpy(np.array(values, dtype=np_dtype)).to(device=dev)

    def chunk_step(s: _State, p: int) -> None:
        js, ks = s.inner.take(p), s.outer.take(p)
        rows = [coef_row(s, s.t + i, j, k) for i, (j, k) in enumerate(zip(js, ks))]
        rows += [[0.0] * len(rows[0])] * (chunk - p)
        s.z, s.v, s.x, norms, finite = fused_many(
            s.z,
            s.x,
            s.v,
            table_in,
            table_out,
            as_tensor(js + [idle_in] * (chunk - p), np.int64),
            as_tensor(ks + [idle_out] * (chunk - p), np.int64),
            as_tensor(rows, np.float64).to(dtype=dtype),
            keeps[p],
            *bufs,
        )
        s.norms = None
        _check_chunk(s, norms[:p], finite[:p])

    return step, (chunk, chunk_step)


def _first_call_checks(state: _State) -> None:
    """Run the oracles once in eager mode on the first batches: their results' type and shape
    checks (a compiled step would fail with a tracing error instead)."""
    ora = state.oracles
    ora.inner_directions(state.z, state.x, state.v, state.inner.batches[0])
    ora.outer_grads(state.z, state.x, state.outer.batches[0])


_RUN_DOC = """
        Args:
            problem: the `StochasticBilevel`.
            z0: the starting inner variable (any shape, floating point).
            x0: the starting outer variable (same dtype and device as ``z0``).  v starts at 0.
            max_iter: iterations (outer updates) to run.
            seed: seeds the batch order (see the module doc for the exact recipe).
            callback: ``callback(record)`` at each record; ``True`` stops the run.
            eval_every: record (full outer loss, ``metric``) at iteration 0 and every
                ``eval_every`` iterations; ``None``: only at the end.  Records are not timed.
            time_limit: stop once the solver time (records excluded) reaches this many seconds
                (tested after each iteration, or each chunk with ``chunk > 1``).
            metric: ``metric(z, x) -> float`` recorded beside the outer loss.

        Returns:
            A `StochasticResult`.

        Raises:
            TypeError, ValueError: bad arguments; a batch size larger than the data.
            StructureError: an oracle returns something other than a floating scalar.
            NonFiniteError: an oracle's derivative is NaN or infinite at moderate iterates (on
                the CPU checked at every iteration; on an accelerator through the iterates,
                every ``check_every`` iterations, to keep the device busy).
            ConvergenceError: an iterate became non-finite or its norm exceeded
                ``max_norm * (1 + ||z0|| + ||x0||)``: the message names the step size to lower.
            BilevelError: with ``compile=True``, torch.compile cannot trace the oracles.
"""


@dataclasses.dataclass(frozen=True)
class _SingleLoop:
    """The settings SOBA and SABA share (documented on each), checked at construction."""

    inner_lr: float
    outer_lr: float
    batch_size: int = 64
    outer_batch_size: int | None = None
    inner_schedule: StepSchedule = Constant()
    outer_schedule: StepSchedule = Constant()
    max_norm: float = 1e10
    check_every: int = 100
    compile: bool = False
    chunk: int = 1
    contiguous_batches: bool = False

    def __post_init__(self) -> None:
        who = type(self).__name__
        _validate_common(
            who,
            {"inner_lr": self.inner_lr, "outer_lr": self.outer_lr},
            self.batch_size,
            self.outer_batch_size,
            {"inner_schedule": self.inner_schedule, "outer_schedule": self.outer_schedule},
            self.max_norm,
        )
        check_int(who, "check_every", self.check_every, 1)
        check_flag(who, "compile", self.compile)
        check_flag(who, "contiguous_batches", self.contiguous_batches)
        _check_chunk_setting(who, self.chunk, self.compile)

    def _factors(self) -> tuple[Callable[[int], float], Callable[[int], float]]:
        """The inner and outer schedules, each checked at every call (a plain float out)."""
        who = type(self).__name__
        return (
            _checked_schedule(who, "inner_schedule", self.inner_schedule),
            _checked_schedule(who, "outer_schedule", self.outer_schedule),
        )

    def run(
        self,
        problem: StochasticBilevel,
        z0: torch.Tensor,
        x0: torch.Tensor,
        *,
        max_iter: int = 1000,
        seed: int = 0,
        callback: Callback | None = None,
        eval_every: int | None = None,
        time_limit: float | None = None,
        metric: Metric | None = None,
    ) -> StochasticResult:
        state = _start(
            type(self).__name__,
            problem,
            z0,
            x0,
            self.batch_size,
            self.outer_batch_size,
            seed,
            {"z": "inner_lr", "v": "inner_lr", "x": "outer_lr"},
            self.max_norm,
            self.contiguous_batches,
        )
        step, chunked = self._steps(state)
        return _drive(
            state,
            step,
            max_iter=max_iter,
            callback=callback,
            eval_every=eval_every,
            time_limit=time_limit,
            metric=metric,
            check_every=self.check_every,
            chunk=chunked,
        )

    def _steps(self, state: _State) -> tuple[Callable[[_State], None], _Chunked]:
        """The method's one-iteration step on ``state`` (eager or compiled), and its chunked step."""
        raise NotImplementedError


#: A compiled step over up to K iterations and its K, where the run may take chunks:
#: ``chunk_step(state, p)`` runs the next p <= K iterations.
_Chunked = tuple[int, Callable[[_State, int], None]] | None


def _draw(
    s: _State,
) -> tuple[int, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The next inner and outer batches and their directions (checked): (j, k, (g, Hv, cross v), (gz, gx))."""
    ora = s.oracles
    j = s.inner.next()
    g, hvp, cross = ora.inner_directions(s.z, s.x, s.v, s.inner.batches[j])
    _note(s, "gradient, HVP or cross term", "inner", g, hvp, cross)
    k = s.outer.next()
    gz, gx = ora.outer_grads(s.z, s.x, s.outer.batches[k])
    _note(s, "gradient", "outer", gz, gx)
    return j, k, (g, hvp, cross), (gz, gx)


@dataclasses.dataclass(frozen=True)
class SOBA(_SingleLoop):
    """Stochastic Bilevel Algorithm (Dagréou et al. 2022): one step of z, v and x per iteration.

    At iteration t, with an inner batch B (scale s_B, see the module doc) and an outer batch B':

        z <- z - rho_t s_B grad_z G_B(z, x)
        v <- v - rho_t (s_B (d2G_B/dz2) v + s_B' grad_z F_B'(z, x))
        x <- x - gamma_t (s_B (d2G_B/dx dz) v + s_B' grad_x F_B'(z, x))

    all directions evaluated at the iterates before the step; rho_t = inner_lr *
    inner_schedule(t), gamma_t = outer_lr * outer_schedule(t).  Constant steps leave a noise
    floor proportional to the step sizes; the paper's decreasing steps
    (``inner_schedule=Decay(0.4), outer_schedule=Decay(0.6)``) converge, slowly.  With
    ``batch_size`` equal to the data it is deterministic gradient descent on (z, v, x).

    Args:
        inner_lr: rho, the step size of z and v (> 0; below 2 / L, L the inner Lipschitz
            constant of grad_z G).
        outer_lr: gamma, the step size of x (> 0; Benchopt's ``outer_ratio`` is
            inner_lr / outer_lr).
        batch_size: the inner batch size (<= n_inner).
        outer_batch_size: the outer batch size (<= n_outer); ``None``: ``batch_size``.
        inner_schedule, outer_schedule: factors of the step sizes per iteration
            (`Constant`, `Decay`, or any ``t -> factor``; a factor that is not a finite
            number >= 0 stops the run with a ``ValueError`` naming the schedule and t).
        max_norm: divergence threshold on the iterates' norms, relative to
            1 + ||z0|| + ||x0||.
        check_every: iterations between divergence checks on an accelerator (each reads the
            norms on the host); on the CPU, where reading is free, every iteration is checked.
        compile: run each iteration as one ``torch.compile``-d graph (derivatives by
            ``torch.func``), an order of magnitude less time per iteration on small models,
            after a compilation of seconds to a minute at the first iteration (and one more
            for a shorter last batch).  The oracles must then be traceable (no ``.item()``,
            NumPy or data-dependent Python branches); a failure raises a `BilevelError`
            saying so.  The result equals the eager one up to rounding.
        chunk: with ``compile=True``, iterations per compiled call (>= 1).  K > 1 compiles
            K iterations into one graph (a longer compilation, growing with K: minutes for
            K = 16 with a cold Inductor cache).  A call takes the next K iterations, or fewer
            where a record, ``max_iter`` or a shorter last batch (whose shape the graph does
            not have) comes first, the rest of the K idle (computed and discarded); fewer
            than K / 4 and the iteration runs alone, as with ``chunk=1``.  Each iteration is
            still checked and a failure named at its iteration (the norms and oracle checks
            of a chunk are read once, after it); ``time_limit`` is tested between calls, so a
            run may exceed it by up to one chunk.  The result is the one-by-one result up to
            rounding.  On small models K = 16 takes a fraction of ``chunk=1``'s time per
            iteration on a CPU (the per-call cost of a compiled function, about 100 us, is
            paid once per chunk; ``benchmarks/stochastic_speed.py`` and
            ``benchmarks/bilevel_suite`` measure it).
        contiguous_batches: the batches are the data's consecutive index blocks (0 .. b - 1,
            b .. 2b - 1, ...), visited in a fresh random order each epoch, as Benchopt's
            ``benchmark_bilevel`` samples, instead of a random partition.  For data whose rows
            are already in random order (shuffle them once beforehand: otherwise the batches
            are biased by the stored order): oracles that gather ``X[idx]`` then read memory in
            order, which on a CPU is several times cheaper than random rows for small models.

    Raises:
        ValueError, TypeError: a step size <= 0, a batch size < 1, a schedule that is not callable.
    """

    def _steps(self, state: _State) -> tuple[Callable[[_State], None], _Chunked]:
        ora = state.oracles
        inner_lr, outer_lr = float(self.inner_lr), float(self.outer_lr)
        inner_schedule, outer_schedule = self._factors()

        def step(s: _State) -> None:
            j, k, (g, hvp, cross), (gz, gx) = _draw(s)
            rho = inner_lr * inner_schedule(s.t)
            gamma = outer_lr * outer_schedule(s.t)
            si, so = s.inner.scales[j], s.outer.scales[k]
            with torch.no_grad():
                s.z.add_(g, alpha=-rho * si)
                s.v.add_(hvp, alpha=-rho * si).add_(gz, alpha=-rho * so)
                s.x.add_(cross, alpha=-gamma * si).add_(gx, alpha=-gamma * so)

        chunked: _Chunked = None
        if self.compile:
            directions = _func_directions(ora)

            def body(
                z: torch.Tensor,
                x: torch.Tensor,
                v: torch.Tensor,
                i_in: torch.Tensor,
                i_out: torch.Tensor,
                j_in: torch.Tensor,
                j_out: torch.Tensor,
                coef: torch.Tensor,
                bufs: tuple[torch.Tensor, ...],
            ) -> _BodyOut:
                g, h, c, gz, gx = directions(z, x, v, i_in, i_out)
                z2 = z - coef[0] * g
                v2 = v - coef[0] * h - coef[1] * gz
                x2 = x - coef[2] * c - coef[3] * gx
                return z2, v2, x2, (g, h, c), (gz, gx)

            def coef_row(s: _State, t: int, j: int, k: int) -> list[float]:
                rho = inner_lr * inner_schedule(t)
                gamma = outer_lr * outer_schedule(t)
                si, so = s.inner.scales[j], s.outer.scales[k]
                return [rho * si, rho * so, gamma * si, gamma * so]

            compiled_step, chunked = _compiled_steps("SOBA", state, body, coef_row, (), self.chunk)

        return (compiled_step if self.compile else step), chunked


@dataclasses.dataclass(frozen=True)
class SABA(_SingleLoop):
    """Stochastic Average Bilevel Algorithm (Dagréou et al. 2022): SOBA with SAGA estimates.

    Each of the five stochastic terms (grad_z G, (d2G/dz2) v, (d2G/dx dz) v on the inner batch;
    grad_z F, grad_x F on the outer batch) is replaced by its SAGA estimate: with M_j the value
    last computed on batch j (zero before the first visit: Benchopt's ``mode_init_memory="zero"``),
    A = sum_j w_j M_j their weighted average and d the new value on batch j,

        estimate = s_j (d - M_j) + A;   then A <- A + w_j (d - M_j),  M_j <- d

    and z, v, x step along the estimates as in `SOBA`.  The variance of the estimates vanishes
    at the solution, so constant step sizes converge (linearly on strongly convex problems).

    Memory: ceil(n_inner / b) x (2 dim z + dim x) + ceil(n_outer / b') x (dim z + dim x)
    numbers, one row per batch (the mini-batches are the finite sum's terms, as in Benchopt's
    SABA; smaller batches are closer to the paper's per-sample memory at more memory).

    Args:
        inner_lr, outer_lr, batch_size, outer_batch_size, max_norm, check_every: as in `SOBA`.
        compile, chunk, contiguous_batches: as in `SOBA`.
        inner_schedule, outer_schedule: as in `SOBA`; SABA's analysis takes constant steps.

    Raises:
        ValueError, TypeError: as `SOBA`.
    """

    def _steps(self, state: _State) -> tuple[Callable[[_State], None], _Chunked]:
        ora = state.oracles
        dz, dx = state.z.numel(), state.x.numel()
        # One table per level, the level's terms side by side in a row: [grad_z G | Hv | cross v]
        # and [grad_z F | grad_x F], so one batch's memory update is a few vector operations.
        # One row per batch, plus a scratch row (id n_batches) for a chunk's idle iterations.
        mem_in = state.z.new_zeros((state.inner.n_batches + 1, 2 * dz + dx))
        mem_out = state.z.new_zeros((state.outer.n_batches + 1, dz + dx))
        avg_in = state.z.new_zeros(2 * dz + dx)
        avg_out = state.z.new_zeros(dz + dx)
        inner_lr, outer_lr = float(self.inner_lr), float(self.outer_lr)
        inner_schedule, outer_schedule = self._factors()

        def saga(
            mem: torch.Tensor, avg: torch.Tensor, new: torch.Tensor, j: int, w: float, s: float
        ) -> torch.Tensor:
            diff = new - mem[j]
            direction = torch.add(avg, diff, alpha=s)
            avg.add_(diff, alpha=w)
            mem[j] = new
            return direction

        chunked: _Chunked = None
        if self.compile:
            directions = _func_directions(ora)

            def body(
                z: torch.Tensor,
                x: torch.Tensor,
                v: torch.Tensor,
                i_in: torch.Tensor,
                i_out: torch.Tensor,
                j_in: torch.Tensor,
                j_out: torch.Tensor,
                coef: torch.Tensor,
                bufs: tuple[torch.Tensor, ...],
            ) -> _BodyOut:
                mem_in, avg_in, mem_out, avg_out = bufs
                g, h, c, gz, gx = directions(z, x, v, i_in, i_out)
                new_in, new_out = torch.cat((g, h, c)), torch.cat((gz, gx))
                diff_in = new_in - mem_in.index_select(0, j_in)[0]
                diff_out = new_out - mem_out.index_select(0, j_out)[0]
                d_in = avg_in + coef[1] * diff_in
                d_out = avg_out + coef[3] * diff_out
                # An idle iteration of a chunk has weight 0: the averages stay as they were even
                # where its outputs are not finite (0 * NaN is NaN).
                avg_in.add_(torch.where(coef[0] > 0, coef[0] * diff_in, 0.0))
                avg_out.add_(torch.where(coef[2] > 0, coef[2] * diff_out, 0.0))
                mem_in.index_copy_(0, j_in, new_in.view(1, -1))
                mem_out.index_copy_(0, j_out, new_out.view(1, -1))
                z2 = z - coef[4] * d_in[:dz]
                v2 = v - coef[4] * (d_in[dz : 2 * dz] + d_out[:dz])
                x2 = x - coef[5] * (d_in[2 * dz :] + d_out[dz:])
                return z2, v2, x2, (g, h, c), (gz, gx)

            def coef_row(s: _State, t: int, j: int, k: int) -> list[float]:
                return [
                    s.inner.weights[j],
                    s.inner.scales[j],
                    s.outer.weights[k],
                    s.outer.scales[k],
                    inner_lr * inner_schedule(t),
                    outer_lr * outer_schedule(t),
                ]

            compiled_step, chunked = _compiled_steps(
                "SABA", state, body, coef_row, (mem_in, avg_in, mem_out, avg_out), self.chunk
            )

        def step(s: _State) -> None:
            j, k, (g, hvp, cross), (gz, gx) = _draw(s)
            with torch.no_grad():
                d_in = saga(
                    mem_in, avg_in, torch.cat((g, hvp, cross)), j, s.inner.weights[j], s.inner.scales[j]
                )
                d_out = saga(mem_out, avg_out, torch.cat((gz, gx)), k, s.outer.weights[k], s.outer.scales[k])
                rho = inner_lr * inner_schedule(s.t)
                gamma = outer_lr * outer_schedule(s.t)
                s.z.add_(d_in[:dz], alpha=-rho)
                s.v.add_(d_in[dz : 2 * dz] + d_out[:dz], alpha=-rho)
                s.x.add_(d_in[2 * dz :] + d_out[dz:], alpha=-gamma)

        return (compiled_step if self.compile else step), chunked


@dataclasses.dataclass(frozen=True)
class StocBiO:
    """Stochastic Bilevel Optimizer (Ji, Yang & Liang 2021), as in Benchopt's StocBiO.

    One iteration, drawing every inner batch from the inner sampler in this order:

    1. ``n_inner_steps`` SGD steps z <- z - alpha s_B grad_z G_B(z, x) (warm-started: z carries
       over between iterations);
    2. an outer batch B': q = s_B' grad_z F_B'(z, x), gx = s_B' grad_x F_B'(z, x);
    3. the stochastic Neumann series of (d2G/dz2)^-1 q: p_0 = q, u = q, then for
       k = 1 .. ``n_neumann_steps``: p <- p - eta s_B (d2G_B/dz2) p, u <- u + p; estimate
       eta u;
    4. one more inner batch: x <- x - gamma (gx - s_B (d2G_B/dx dz) (eta u)).

    The Neumann series needs eta < 1 / L (L the largest eigenvalue of d2G/dz2); it
    approximates the inverse to (1 - eta mu)^Q (mu the smallest), so with Q steps its bias
    stays: StocBiO converges to a neighbourhood, which Q and the batch size shrink.

    Args:
        inner_lr: alpha, the inner SGD step size.
        outer_lr: gamma, the outer step size.
        neumann_lr: eta, the Neumann step size; ``None``: ``inner_lr`` (as Benchopt).
        n_inner_steps: inner SGD steps per iteration (>= 1).
        n_neumann_steps: Neumann terms per iteration (>= 0).
        batch_size, outer_batch_size, max_norm, check_every, contiguous_batches: as in `SOBA`
            (v: the last estimate -eta u, whose divergence names ``neumann_lr``).

    Raises:
        ValueError: a step size <= 0, a step count or batch size out of range.
    """

    inner_lr: float
    outer_lr: float
    neumann_lr: float | None = None
    n_inner_steps: int = 10
    n_neumann_steps: int = 10
    batch_size: int = 64
    outer_batch_size: int | None = None
    max_norm: float = 1e10
    check_every: int = 100
    contiguous_batches: bool = False

    def __post_init__(self) -> None:
        lrs = {"inner_lr": self.inner_lr, "outer_lr": self.outer_lr}
        if self.neumann_lr is not None:
            lrs["neumann_lr"] = self.neumann_lr
        _validate_common("StocBiO", lrs, self.batch_size, self.outer_batch_size, {}, self.max_norm)
        check_flag("StocBiO", "contiguous_batches", self.contiguous_batches)
        check_int("StocBiO", "n_inner_steps", self.n_inner_steps, 1)
        check_int("StocBiO", "n_neumann_steps", self.n_neumann_steps, 0)
        check_int("StocBiO", "check_every", self.check_every, 1)

    def run(
        self,
        problem: StochasticBilevel,
        z0: torch.Tensor,
        x0: torch.Tensor,
        *,
        max_iter: int = 1000,
        seed: int = 0,
        callback: Callback | None = None,
        eval_every: int | None = None,
        time_limit: float | None = None,
        metric: Metric | None = None,
    ) -> StochasticResult:
        state = _start(
            "StocBiO",
            problem,
            z0,
            x0,
            self.batch_size,
            self.outer_batch_size,
            seed,
            {
                "z": "inner_lr",
                "v": "neumann_lr" if self.neumann_lr is not None else "inner_lr (which sets neumann_lr)",
                "x": "outer_lr",
            },
            self.max_norm,
            self.contiguous_batches,
        )
        ora = state.oracles
        alpha, gamma = float(self.inner_lr), float(self.outer_lr)
        eta = alpha if self.neumann_lr is None else float(self.neumann_lr)
        n_inner, n_neumann = self.n_inner_steps, self.n_neumann_steps

        def step(s: _State) -> None:
            with torch.no_grad():
                for _ in range(n_inner):
                    j = s.inner.next()
                    g = ora.inner_grad(s.z, s.x, s.inner.batches[j])
                    _note(s, "gradient", "inner", g)
                    s.z.add_(g, alpha=-alpha * s.inner.scales[j])
                k = s.outer.next()
                gz, gx = ora.outer_grads(s.z, s.x, s.outer.batches[k])
                _note(s, "gradient", "outer", gz, gx)
                so = s.outer.scales[k]
                p = gz * so
                u = p.clone()
                for _ in range(n_neumann):
                    j = s.inner.next()
                    h = ora.hvp(s.z, s.x, p, s.inner.batches[j])
                    _note(s, "HVP", "inner", h)
                    p = p - (eta * s.inner.scales[j]) * h
                    u.add_(p)
                # v as in SOBA: -(d2G/dz2)^-1 grad_z F, here its Neumann estimate.
                s.v = u.mul_(-eta)
                j = s.inner.next()
                c = ora.cross(s.z, s.x, s.v, s.inner.batches[j])
                _note(s, "cross term", "inner", c)
                s.x.add_(c, alpha=-gamma * s.inner.scales[j]).add_(gx, alpha=-gamma * so)

        return _drive(
            state,
            step,
            max_iter=max_iter,
            callback=callback,
            eval_every=eval_every,
            time_limit=time_limit,
            metric=metric,
            check_every=self.check_every,
        )


def _check_chunk_setting(who: str, chunk: int, compile: bool) -> None:
    check_int(who, "chunk", chunk, 1)
    if chunk > 1 and not compile:
        raise ValueError(
            f"{who}(chunk={chunk}): chunks of iterations are compiled graphs; set compile=True "
            "(eager mode runs one iteration at a time)"
        )


for _cls in (SOBA, SABA, StocBiO):
    _cls.run.__doc__ = f"Run {_cls.__name__} from (z0, x0, v = 0) for max_iter iterations.\n{_RUN_DOC}"
del _cls
