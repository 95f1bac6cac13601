"""Meta-gradients of iMAML, MAML, first-order MAML and Reptile: applications of the core.

Every algorithm solves the same B inner problems of a meta-batch at once,

    G_i(phi, theta) = Lhat_i(phi) + lam/2 ||phi - theta||^2          (Eq. 4 of iMAML)

(``lam = 0`` gives the plain support loss of MAML, FOMAML and Reptile), with a batched
inner solver of `bilevel.solvers` (`GradientDescent`, optionally with `Armijo`
backtracking, or `NewtonCG`), and forms the task meta-gradient g_i with a value whose
``apply`` method says how, like Optimistix's ``adjoint.apply``:

===============  =================================================================
`Implicit`        iMAML: `bilevel.implicit_argmin` with ``batched=True``: the B Hessian
                  systems (I + Lhat''(phi_i)/lam) g_i = grad L_i(phi_i) are solved by the
                  library's batched `bilevel.CG` (``cg_iters`` steps, per-task status).
                  The inner solver's path is not stored.
`Unrolled`        MAML: `GradientDescent(differentiable=True)`: autograd through every
                  inner step (memory grows with steps).
`FirstOrder`      first-order MAML: the inner solve alone; g_i = grad L_i(phi_i).
`ReptileStep`     Reptile: the inner solve alone; g_i = theta - phi_i.
`ReleasedCG`      the authors' released iMAML code (``imaml-released``; NOT the paper's
                  method): with `InnerGDPullBack`'s inner loop, CG from 0 on
                  ((1 + damping) I + Lhat''(phi_i)/(lam + 10)) g_i = grad L_i(phi_i).
===============  =================================================================

The B per-task models run through one `BatchedModel` (the seam): built from the model's
structure (`batched_model`) or from the per-task function (vmap or a loop).

CG starts from 0 as in the paper.  ``Implicit(warm_start=True)`` (``--cg-warm-start``)
starts from g = grad L_i(phi_i), the first-order gradient, so that 0 CG steps are exactly
first-order MAML (Appendix A), at the price of one more HVP (the initial residual).  At
equal HVPs the start from 0 is the more accurate (for a positive definite system CG from 0
is optimal in the energy norm over a Krylov space that holds the warm start's iterate):
measured on 16 Omniglot tasks at a trained theta, float64, against a converged solve,
median relative errors 0.153 (from 0, 6 steps) vs 0.190 (warm, 5 steps) at 6 HVPs and
0.240 vs 0.272 at 5 (lam 2).  The default was the warm start until 2026-11-29.

Deviations from the paper, each measured and switchable:

* Early in meta-training the support loss of a CNN with batch norm on 5 images is far
  from convex (Hessian eigenvalues below -40 at a random theta, measured), so
  I + Lhat''/lam can be indefinite and CG can meet negative curvature.  CG then stops
  for that task and keeps its last iterate (truncated CG, as in Steihaug's method);
  the event is counted in `MetaStats.negative_curvature`, never hidden.
* ``Implicit(damping=d)`` solves ((1 + d) I + Lhat''/lam) g = v (`bilevel.Damped`), the
  damped system of the authors' released code; the paper's system is ``d = 0``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import bilevel as bl
from bilevel.solvers import GradientDescent, Nesterov, NewtonCG, StepHalving, TrustRegionNewtonCG

from .batched import BatchedModel, as_batched, task_losses
from .tasks import Task

__all__ = [
    "FirstOrder",
    "Implicit",
    "InnerGD",
    "InnerGDPullBack",
    "InnerNesterov",
    "InnerNewtonCG",
    "InnerTrustRegion",
    "MetaAlgorithm",
    "MetaStats",
    "ReleasedCG",
    "ReptileStep",
    "Unrolled",
    "adapt",
    "evaluate_batch",
    "make_algorithm",
    "meta_gradient",
    "predict_batch",
]

Params = dict[str, torch.Tensor]
ModelFn = Callable[[Params, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: lam as a float, a 0-d tensor, or one 0-d tensor per parameter name.
Lam = Union[float, torch.Tensor, dict[str, torch.Tensor]]

# Keys of learned lam values in the theta tree given to the implicit layer.
_LAM = "lam:"


# ---------------------------------------------------------------------------------- inner solvers
def _check_steps_lr(who: str, steps: int, lr: float) -> None:
    if steps < 0:
        raise ValueError(f"{who}(steps={steps}): steps must be >= 0")
    if not lr > 0:
        raise ValueError(f"{who}(lr={lr}): lr must be > 0")


@dataclasses.dataclass(frozen=True)
class InnerGD:
    """Gradient descent on G for ``steps`` steps (or until ||grad G|| <= ``tol`` per task).

    Runs `bilevel.solvers.GradientDescent` on the meta-batch in its batched mode.

    Args:
        steps: number of GD steps (16 and 25 in the paper's Omniglot settings).
        lr: step size.
        tol: per-task gradient-norm tolerance; a task that reaches it stops moving.
            ``None`` runs exactly ``steps`` steps (needed by `Unrolled`).
        backtrack: a per-task step size that starts at ``lr`` and halves whenever a step
            would not decrease G by the Armijo amount (`bilevel.solvers.StepHalving`: the
            step is then not taken and still counts; one evaluation of the meta-batch per
            step, where a full `Armijo` search re-evaluates it until its slowest task finds
            a step).  Fixed-step GD diverges once
            meta-training sharpens the support loss beyond 2 / lr (measured on the
            sinusoid: NaN after 200-900 meta-steps at lr 0.005-0.02); backtracking cannot.
            Not with `Unrolled`.
    """

    #: takes gradients of G only (no HVPs): the model's fused losses may serve it
    gradients_only: ClassVar[bool] = True

    steps: int = 16
    lr: float = 0.1
    tol: float | None = None
    backtrack: bool = False

    def __post_init__(self) -> None:
        _check_steps_lr("InnerGD", self.steps, self.lr)
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"InnerGD(tol={self.tol}): tol must be >= 0 or None")

    def solver(self, *, differentiable: bool = False, lam: Any = None) -> GradientDescent:
        """The batched `GradientDescent` this configuration stands for (``lam`` is not used)."""
        return GradientDescent(
            lr=self.lr,
            max_iter=self.steps,
            tol=0.0 if self.tol is None else self.tol,
            line_search=StepHalving() if self.backtrack else None,
            batched=True,
            differentiable=differentiable,
        )

    def run(self, mb: _MetaBatch) -> bl.SolverResult:
        """The B tasks' answers of G (flat (B, n), no graph), with per-task diagnostics."""
        return _minimize(self.solver(), mb, gradients_only=self.gradients_only)


@dataclasses.dataclass(frozen=True)
class InnerNewtonCG:
    """Hessian-free Newton on G: ``newton_iters`` x (``cg_iters`` CG steps + Armijo line search).

    iMAML-HF of the paper (3 x 5 by default).  Runs `bilevel.solvers.NewtonCG` on the
    meta-batch in its batched mode.  Cannot be unrolled.
    """

    #: takes HVPs of G (torch.func): the model's fused first-order losses cannot serve it
    gradients_only: ClassVar[bool] = False

    newton_iters: int = 3
    cg_iters: int = 5

    def solver(self, *, differentiable: bool = False, lam: Any = None) -> NewtonCG:
        """The batched `NewtonCG` this configuration stands for (``lam`` is not used)."""
        if differentiable:
            raise ValueError("InnerNewtonCG: a line search cannot be unrolled")
        return NewtonCG(newton_iters=self.newton_iters, cg_iters=self.cg_iters, batched=True)

    def run(self, mb: _MetaBatch) -> bl.SolverResult:
        """The B tasks' answers of G (flat (B, n), no graph), with per-task diagnostics."""
        return _minimize(self.solver(), mb, gradients_only=self.gradients_only)


@dataclasses.dataclass(frozen=True)
class InnerTrustRegion:
    """Trust-region Newton-CG on G: ``newton_iters`` x ``cg_iters`` Steihaug-CG steps.

    iMAML-HF with the line search replaced by a trust region (`bilevel.solvers.TrustRegionNewtonCG`
    in batched mode): where I + H/lam is indefinite -- on few-shot tasks, at most inner answers
    far from the argmin -- the line-search Newton-CG truncates its direction at the first
    negative curvature and barely moves, whereas the trust-region step follows that direction
    to the boundary.  ``radius`` is the initial radius in the flat parameters' Euclidean norm,
    per task: 0.3 reached a lower G than 1 or 3 at 3 x 5 on 16 Omniglot 5-way 1-shot tasks at an
    untrained theta (median G 0.130 / 0.177 / 0.524, lam 0.5) and as low at a trained one (0.199 /
    0.196 / 0.199; `benchmarks/RESULTS.md`, issue 17, session 8).  Cannot be unrolled.
    """

    #: takes HVPs of G (torch.func): the model's fused first-order losses cannot serve it
    gradients_only: ClassVar[bool] = False

    newton_iters: int = 3
    cg_iters: int = 5
    radius: float = 0.3

    def solver(self, *, differentiable: bool = False, lam: Any = None) -> TrustRegionNewtonCG:
        """The batched `TrustRegionNewtonCG` this configuration stands for (``lam`` is not used)."""
        if differentiable:
            raise ValueError("InnerTrustRegion: a trust-region path cannot be unrolled")
        return TrustRegionNewtonCG(
            newton_iters=self.newton_iters, cg_iters=self.cg_iters, radius=self.radius, tol=0.0, batched=True
        )

    def run(self, mb: _MetaBatch) -> bl.SolverResult:
        """The B tasks' answers of G (flat (B, n), no graph), with per-task diagnostics."""
        return _minimize(self.solver(), mb, gradients_only=self.gradients_only)


@dataclasses.dataclass(frozen=True)
class InnerNesterov:
    """Accelerated GD on G for ``steps`` steps: `bilevel.solvers.Nesterov` in batched mode.

    The scheme of Theorem 2: G is lam-strongly convex where Lhat is convex, so the momentum is
    (sqrt(kappa) - 1) / (sqrt(kappa) + 1) with kappa = 1 / (lr lam) (``mu = lam``), with
    adaptive restart per task; where ``lr * lam > 1`` (or lam is learned or 0) the k/(k+3)
    schedule with restart.  No line search: like fixed-step GD it diverges once the support
    loss is sharper than about 2 / lr.
    """

    #: takes gradients of G only (no HVPs): the model's fused losses may serve it
    gradients_only: ClassVar[bool] = True

    steps: int = 16
    lr: float = 0.1

    def __post_init__(self) -> None:
        _check_steps_lr("InnerNesterov", self.steps, self.lr)

    def solver(self, *, differentiable: bool = False, lam: Any = None) -> Nesterov:
        """The batched `Nesterov` this configuration stands for at proximal weight ``lam``."""
        if differentiable:
            raise ValueError("InnerNesterov: the accelerated path is not unrolled (use InnerGD for MAML)")
        mu = float(lam) if isinstance(lam, (int, float)) and 0 < lam * self.lr <= 1 else None
        return Nesterov(lr=self.lr, mu=mu, max_iter=self.steps, tol=0.0, restart=True, batched=True)

    def run(self, mb: _MetaBatch) -> bl.SolverResult:
        """The B tasks' answers of G (flat (B, n), no graph), with per-task diagnostics."""
        return _minimize(self.solver(lam=mb.lam_fixed), mb, gradients_only=self.gradients_only)


@dataclasses.dataclass(frozen=True)
class InnerGDPullBack:
    """The inner loop of the authors' released iMAML code; it does NOT minimize G.

    ``steps`` plain GD steps of ``lr`` on the support loss alone (no proximal term), from theta,
    then one GD step of ``lr`` on the proximal term lam/2 ||phi - theta||^2 alone:
    phi <- theta + (1 - lr lam) (phi - theta) (0.8 at the released lr 0.1, lam 2).  This is
    ``learn_task`` followed by the "pull back for regularization" step of aravindr93/imaml_dev,
    ``examples/omniglot_implicit_maml.py``.  With lam = 0 (how that code evaluates) it is plain GD
    on the support loss.  Only with `ReleasedCG` or first-order kinds: Lemma 1 needs the argmin.
    """

    #: takes gradients of G only (no HVPs): the model's fused losses may serve it
    gradients_only: ClassVar[bool] = True

    steps: int = 16
    lr: float = 0.1

    def __post_init__(self) -> None:
        _check_steps_lr("InnerGDPullBack", self.steps, self.lr)

    def run(self, mb: _MetaBatch) -> bl.SolverResult:
        """``steps`` GD steps on the support losses, then the pull-back step (flat (B, n), no graph)."""
        res = _minimize(InnerGD(self.steps, self.lr).solver(), mb, prox=False, gradients_only=True)
        lam = mb.lam_fixed
        X: torch.Tensor = res.x  # type: ignore[assignment]
        with torch.no_grad():
            t = mb.theta_flat
            X = t + (1.0 - self.lr * lam) * (X - t)
        return res.replace(x=X)


InnerSolver = Union[InnerGD, InnerNewtonCG, InnerTrustRegion, InnerNesterov, InnerGDPullBack]


def _minimize(
    solver: Callable[..., bl.SolverResult], mb: _MetaBatch, *, prox: bool = True, gradients_only: bool
) -> bl.SolverResult:
    """A batched core solver run from theta on the B tasks' G (``prox=False``: support losses
    alone) through the fast model (fused where ``gradients_only``); stops on a diverged task
    (`_checked`)."""
    objective = mb.objective(exact=False, prox=prox, gradients_only=gradients_only)
    return _checked(solver(objective, mb.init(), mb._theta_values()))


# ---------------------------------------------------------------------------------- one meta-batch
@dataclasses.dataclass
class _Outcome:
    """What a meta-gradient kind returns: per-task sums of gradients and the inner answers."""

    grad: Params  # sum over tasks
    lam_grad: dict[str, torch.Tensor] | None  # sum over tasks
    phi: torch.Tensor  # (B, n) flat, detached
    query_loss: torch.Tensor  # (B,)
    query_acc: torch.Tensor  # (B,)
    inner: bl.SolverResult
    cg: bl.LinearSolveResult | None = None


class _MetaBatch:
    """The B inner problems of a meta-batch, written once for every algorithm.

    ``theta`` (no task dimension) and the fixed or learned ``lam`` define G_i.  The inner
    unknowns are one flat matrix ``X`` of shape (B, n) (row b: task b's parameters, raveled
    in ``theta``'s order): the solvers update it in one op per step, the proximal term is one
    row-wise product, and the model reads per-tensor views of it (`unflat`).  The objectives
    take ``X`` and a theta tree that may carry learned lam values under ``"lam:<name>"`` (per
    tensor) or ``"lam:"`` (shared).
    """

    def __init__(
        self, bm: BatchedModel, loss: LossFn, classification: bool, batch: Task, theta: Params, lam: Lam
    ) -> None:
        self.bm = bm
        self.loss = loss
        self.classification = classification
        self.batch = batch
        self.theta = {k: v.detach() for k, v in theta.items()}
        self.names = list(self.theta)
        self.shapes = [tuple(v.shape) for v in self.theta.values()]
        self.sizes = [v.numel() for v in self.theta.values()]
        self.theta_flat = self.flat(self.theta)
        self.B = batch.support_x.shape[0]
        self.lam = lam
        self.learned = isinstance(lam, (torch.Tensor, dict))
        # lam per coordinate for the solver's objective (no gradient): a number when shared
        self.lam_fixed = _detached(self.lam_vec(self._theta_values()))

    # -- the flat layout
    def flat(self, tree: Params) -> torch.Tensor:
        """The tensors of ``tree`` (theta's names, no task dimension) raveled into one (n,) tensor."""
        return torch.cat([tree[k].reshape(-1) for k in self.names])

    def flat_theta(self, th: Params) -> torch.Tensor:
        """`flat` of a theta tree; no copy where ``th`` holds this meta-batch's theta (the
        solvers pass it on detached, as new tensors over the same memory)."""
        same = all(
            th[k].data_ptr() == t.data_ptr() and th[k].shape == t.shape and th[k].stride() == t.stride()
            for k, t in self.theta.items()
        )
        return self.theta_flat if same else self.flat(th)

    def unflat(self, X: torch.Tensor) -> Params:
        """Per-tensor views (b, *shape) of a flat (b, n) matrix, by name."""
        b = X.shape[0]
        return {
            k: part.view(b, *shape) for k, part, shape in zip(self.names, X.split(self.sizes, 1), self.shapes)
        }

    def tree(self, x: torch.Tensor) -> Params:
        """A flat (n,) vector as tensors shaped like theta's, by name (views)."""
        return {k: part.view(shape) for k, part, shape in zip(self.names, x.split(self.sizes), self.shapes)}

    def params(self, X: torch.Tensor) -> Params:
        """Fresh contiguous per-tensor copies (B, *shape) of a flat (B, n) matrix, by name."""
        return {k: v.contiguous() for k, v in self.unflat(X.detach()).items()}

    # -- lam
    def lam_tree(self) -> dict[str, torch.Tensor]:
        """Learned lam values as theta-tree entries, each a fresh leaf that requires grad."""
        lam = self.lam
        if isinstance(lam, dict):
            return {_LAM + k: v.detach().requires_grad_(True) for k, v in lam.items()}
        if isinstance(lam, torch.Tensor):
            return {_LAM: lam.detach().requires_grad_(True)}
        return {}

    def lam_vec(self, th: Params) -> torch.Tensor | float:
        """lam per coordinate of a task's flat parameters, (n,), differentiable in the learned
        values of ``th``; a number (or 0-d tensor) when one lam is shared."""
        if _LAM in th:
            return th[_LAM]
        lam = self.lam
        if isinstance(lam, dict):
            t = self.theta_flat
            return torch.cat(
                [
                    torch.as_tensor(th.get(_LAM + k, lam[k]), dtype=t.dtype, device=t.device).expand(size)
                    for k, size in zip(self.names, self.sizes)
                ]
            )
        return lam.detach() if isinstance(lam, torch.Tensor) else float(lam)

    # -- objectives
    def prox(self, X: torch.Tensor, th: Params) -> torch.Tensor:
        """lam/2 ||phi_i - theta||^2 per task (B,), differentiable in X, theta and learned lam."""
        lam = self.lam_vec(th)
        d = X - self.flat(th)
        # d.square().sum, not norm(d)**2, whose second derivative is wrong where d = 0
        if isinstance(lam, torch.Tensor) and lam.ndim == 1:
            return 0.5 * (d.square() * lam).sum(1)
        return (0.5 * lam) * d.square().sum(1)

    def objective(
        self, *, exact: bool, prox: bool = True, gradients_only: bool = False
    ) -> Callable[[torch.Tensor, Params], torch.Tensor]:
        """G_i(phi_i, theta) per task, shape (B,), of the flat X (B, n); with ``prox=False`` the
        support losses Lhat_i(phi_i) alone.

        ``exact``: through `BatchedModel.exact`, for autograd's double backward (the implicit
        layer's HVPs, MAML's unrolled path) and derivatives in theta.  Otherwise through
        `BatchedModel.fast`, for the inner solvers (gradients in X; NewtonCG's HVPs by
        ``torch.func``, exact there too).  ``gradients_only``: the caller takes first
        derivatives in X and nothing else (GD, Nesterov), so the support losses may come from
        the model's fused `BatchedModel.flat_cross_entropy` where it has one.
        """
        x, y = self.batch.support_x, self.batch.support_y
        forward = self.bm.exact if exact else self.bm.fast
        zero = not prox or (isinstance(self.lam_fixed, float) and self.lam_fixed == 0.0)
        fused = self._flat_loss(x, y) if gradients_only and not exact else None

        def G(X: torch.Tensor, th: Params) -> torch.Tensor:
            support = (
                fused(X)[0] if fused is not None else task_losses(self.loss, forward(self.unflat(X), x), y)
            )
            if zero:
                return support
            if exact or any(t.requires_grad for t in th.values()):
                return support + self.prox(X, th)
            return support + _ProxFirstOrder.apply(self.lam_fixed, self.flat_theta(th), X)

        return G

    def _flat_loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """The model's fused per-task losses of the flat X on (x, y), where it has them for this
        loss (cross-entropy on class indices), else ``None``."""
        build = self.bm.flat_cross_entropy
        if (
            build is None
            or self.loss is not F.cross_entropy
            or y.shape != x.shape[:2]
            or y.is_floating_point()
        ):
            return None
        return build(self.names, self.shapes, x, y, self.bm.chunk(x))

    def hvp(self, X: torch.Tensor, *, prox: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        """V (B, n) -> the B Hessian-vector products of G_i (``prox=False``: of Lhat_i) at X, row by row.

        Through the exact model; the gradient's graph is built once here and every call runs
        its double backward.
        """
        Xr = X.detach().requires_grad_(True)
        with torch.enable_grad():
            values = self.objective(exact=True, prox=prox)(Xr, self._theta_values())
            (g,) = torch.autograd.grad(values.sum(), Xr, create_graph=True)

        def matvec(V: torch.Tensor) -> torch.Tensor:
            (hv,) = torch.autograd.grad(g, Xr, grad_outputs=V, retain_graph=True)
            return hv

        return matvec

    def init(self, theta: Params | None = None) -> torch.Tensor:
        """X = theta for every task: an expanded (B, n) view (attached to ``theta`` if it is)."""
        t = self.theta_flat if theta is None else self.flat(theta)
        return t.unsqueeze(0).expand(self.B, -1)

    def solve(self, inner: InnerSolver) -> bl.SolverResult:
        """The inner answers X (B, n) of the B tasks (no graph), with per-task diagnostics."""
        return inner.run(self)

    def _theta_values(self) -> Params:
        return {**self.theta, **{k: v.detach() for k, v in self.lam_tree().items()}}

    # -- query
    def query(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query losses (B,) (differentiable in X) and accuracies (B,) of the adapted models."""
        out = self.bm.outputs(self.unflat(X), self.batch.query_x)
        return task_losses(self.loss, out, self.batch.query_y), self.accuracy(out, self.batch.query_y)

    def accuracy(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return (out.detach().argmax(-1) == y).float().mean(-1)
        return torch.full(out.shape[:1], float("nan"), dtype=out.dtype, device=out.device)

    def query_gradients(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-task query gradients grad L_i(phi_i), flat (B, n), losses (B,) and accuracies (B,).

        First order, through the model's fused losses where it has them (which take the tasks
        in chunks themselves), else through the fast model in chunks of tasks where
        `BatchedModel.chunk` says so, each chunk's gradient taken right after its forward pass
        while its activations are still in the cache.
        """
        x, y = self.batch.query_x, self.batch.query_y
        fused = self._flat_loss(x, y)
        with torch.enable_grad():
            if fused is not None:
                Xg = X.detach().requires_grad_(True)
                ql, out = fused(Xg)
                (g,) = torch.autograd.grad(ql.sum(), Xg)
                return g, ql.detach(), self.accuracy(out, y)
            c = self.bm.chunk(x)
            grads, losses, outs = [], [], []
            for Xc, xc, yc in zip(X.detach().split(c), x.split(c), y.split(c)):
                Xc = Xc.requires_grad_(True)
                out = self.bm.fast(self.unflat(Xc), xc)
                ql = task_losses(self.loss, out, yc)
                (g,) = torch.autograd.grad(ql.sum(), Xc, allow_unused=True, materialize_grads=True)
                grads.append(g)
                losses.append(ql.detach())
                outs.append(out.detach())
        return _cat(grads), _cat(losses), self.accuracy(_cat(outs), y)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` without a copy when there is one part (one chunk of tasks)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _detached(v: torch.Tensor | float) -> torch.Tensor | float:
    return v.detach() if isinstance(v, torch.Tensor) else v


class _ProxFirstOrder(torch.autograd.Function):
    """lam/2 ||X_i - theta||^2 per task (B,) of the flat X (B, n), differentiable once and in X only.

    The proximal term of the inner solver's objective: its gradient lam (X - theta) is one
    fused product here, where autograd through (d * d).sum would take three passes over the
    parameters per step.  Second derivatives (HVPs) go through `_MetaBatch.prox`.
    """

    @staticmethod
    def forward(ctx: Any, lam: float | torch.Tensor, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        d = X - theta
        # the row-wise inner product in one fused pass, as a batched matrix product
        vec = isinstance(lam, torch.Tensor) and lam.ndim == 1
        dl = d * lam if vec else d
        out = torch.bmm(dl.unsqueeze(1), d.unsqueeze(2)).reshape(X.shape[0])
        out = out * 0.5 if vec else out * (0.5 * lam)
        ctx.lam = lam
        ctx.save_for_backward(d)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
        (d,) = ctx.saved_tensors
        lam = ctx.lam
        if isinstance(lam, torch.Tensor) and lam.ndim == 1:
            return None, None, d * lam * go[:, None]
        return None, None, d * (go * lam)[:, None]


def _or_zeros(like: Params, grads: tuple[torch.Tensor | None, ...]) -> Params:
    """Gradients by name, zeros where autograd returned None (an unused parameter)."""
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(like.items(), grads)}


def _checked(res: bl.SolverResult) -> bl.SolverResult:
    """Stop on a diverged inner solve: its NaN would otherwise be frozen out of the answer silently
    (now, or at the end of a `bilevel.deferred_checks` block)."""
    bl.defer_check(functools.partial(_raise_if_diverged, res))
    return res


def _raise_if_diverged(res: bl.SolverResult) -> None:
    statuses = res.problem_status or (res.status,)
    bad = [i for i, s in enumerate(statuses) if s is bl.SolverStatus.NONFINITE]
    if bad:
        raise bl.NonFiniteError(
            f"the inner solve produced NaN or infinity in task(s) {bad[:10]} of the meta-batch: the inner "
            "loop diverged; lower --inner-lr (InnerGD(lr=...)), raise --lam, or use --backtrack"
        )


# ---------------------------------------------------------------------------------- meta-gradient kinds
@dataclasses.dataclass(frozen=True)
class Implicit:
    """iMAML's meta-gradient: CG on (I + Lhat''/lam) g = grad L(phi), through `bilevel.implicit_argmin`.

    Args:
        cg_iters: CG iterations (5 in the paper).
        damping: solve ((1 + damping) I + Lhat''/lam) g = v; 0 is the paper's system.
        warm_start: start CG from v (so 0 iterations = first-order MAML; one more HVP);
            ``False`` (the paper's) starts from 0.
    """

    cg_iters: int = 5
    damping: float = 0.0
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.cg_iters < 0:
            raise ValueError(f"Implicit(cg_iters={self.cg_iters}): cg_iters must be >= 0")
        if not self.damping >= 0:
            raise ValueError(f"Implicit(damping={self.damping}): damping must be >= 0")

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        theta = {k: v.detach().requires_grad_(True) for k, v in mb.theta.items()}
        tree = {**theta, **mb.lam_tree()}
        fast = mb.objective(exact=False, gradients_only=inner.gradients_only)
        solver = inner.solver(lam=mb.lam_fixed)  # type: ignore[union-attr]  # not InnerGDPullBack (checked)

        def solve(_exact: Any, init: torch.Tensor, th: Params) -> bl.SolverResult:
            # The inner steps use the fast model; the layer linearizes the exact one.
            return _checked(solver(fast, init, th))

        d = 1.0 + self.damping
        lam_vec = mb.lam_fixed
        hvp = None
        if self.damping > 0:
            hvp = bl.Damped(self.damping * lam_vec)
        with torch.enable_grad():
            X, info = bl.implicit_argmin(
                mb.objective(exact=True),
                mb.init(),
                tree,
                solve,
                hvp=hvp,
                linear_solver=bl.CG(max_iter=self.cg_iters, rtol=0.0, atol=0.0, check_residual=False),
                batched=True,
                optimality_tol=None,
                throw=False,
                warn=False,
                measure_residual=False,
                backward_x0=(lambda b: b / (d * lam_vec)) if self.warm_start else None,
                return_info=True,
            )
            # v_i = grad L_i(phi_i), first order, then back through the layer: each task's
            # right-hand side is its own query gradient, so the CG residuals are in its units.
            v, ql, qa = mb.query_gradients(X)
            grads = torch.autograd.grad(X, list(tree.values()), grad_outputs=v, allow_unused=True)
        g = _or_zeros(tree, grads)
        assert info.solver_result is not None and info.last_backward is not None
        lam_grad = None
        if mb.learned:
            lam_grad = {(k[len(_LAM) :] or "lam"): g[k] for k in tree if k.startswith(_LAM)}
        return _Outcome(
            {k: g[k] for k in theta}, lam_grad, X.detach(), ql, qa, info.solver_result, info.last_backward
        )


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """MAML: differentiate through the inner GD path (`GradientDescent(differentiable=True)`)."""

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        theta = {k: v.detach().requires_grad_(True) for k, v in mb.theta.items()}
        assert isinstance(inner, InnerGD)  # MetaAlgorithm refuses any other inner solver with Unrolled
        with torch.enable_grad():
            res = _checked(inner.solver(differentiable=True)(mb.objective(exact=True), mb.init(theta), theta))
            X: torch.Tensor = res.x  # type: ignore[assignment]
            ql, qa = mb.query(X)
            grads = torch.autograd.grad(ql.sum(), list(theta.values()), allow_unused=True)
        return _Outcome(_or_zeros(theta, grads), None, X.detach(), ql.detach(), qa, res)


@dataclasses.dataclass(frozen=True)
class FirstOrder:
    """First-order MAML: the query gradient at phi_i, taken as the meta-gradient."""

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        res = mb.solve(inner)
        X: torch.Tensor = res.x  # type: ignore[assignment]
        v, ql, qa = mb.query_gradients(X)
        return _Outcome(mb.tree(v.sum(0)), None, X, ql, qa, res)


@dataclasses.dataclass(frozen=True)
class ReptileStep:
    """Reptile: theta - phi_i, taken as the meta-gradient (Nichol et al. 2018)."""

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        res = mb.solve(inner)
        X: torch.Tensor = res.x  # type: ignore[assignment]
        with torch.no_grad():
            ql, qa = mb.query(X)
        grad = mb.tree(mb.B * mb.theta_flat - X.sum(0))
        return _Outcome(grad, None, X, ql, qa, res)


@dataclasses.dataclass(frozen=True)
class ReleasedCG:
    """The meta-gradient of the authors' released iMAML code; NOT the paper's Algorithm 2.

    At the inner answer phi_i (of `InnerGDPullBack`), CG from 0 for ``cg_iters`` steps on

        ((1 + damping) I + Lhat_i''(phi_i) / (lam + lam_damping)) g_i = grad L_i(phi_i),

    Lhat_i'' the Hessian of the support loss alone; g_i is the task meta-gradient (no cross
    term).  Released defaults: ``damping`` 1 (``--cg_damping``), ``lam_damping`` 10
    (``Learner.matrix_evaluator``), so at lam 2 the system is (2 I + H / 12) g = v.

    Args:
        cg_iters: CG steps (5 released).
        damping: ``regu_coef`` of the released code.
        lam_damping: added to lam in the Hessian's weight.
    """

    cg_iters: int = 5
    damping: float = 1.0
    lam_damping: float = 10.0

    def __post_init__(self) -> None:
        if self.cg_iters < 0:
            raise ValueError(f"ReleasedCG(cg_iters={self.cg_iters}): cg_iters must be >= 0")
        if not (self.damping >= 0 and self.lam_damping >= 0):
            raise ValueError(
                f"ReleasedCG: damping {self.damping} and lam_damping {self.lam_damping} must be >= 0"
            )

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        res = mb.solve(inner)
        X: torch.Tensor = res.x  # type: ignore[assignment]
        v, ql, qa = mb.query_gradients(X)
        hvp = mb.hvp(X, prox=False)
        # lam is a number here: meta_gradient refuses a learned lam with any kind but Implicit
        weight = 1.0 / (mb.lam_fixed + self.lam_damping)
        d = 1.0 + self.damping

        def matvec(V: torch.Tensor) -> torch.Tensor:
            return d * V + weight * hvp(V)

        cg = bl.CG(max_iter=self.cg_iters, rtol=0.0, atol=0.0, check_residual=False)(matvec, v)
        return _Outcome(mb.tree(cg.x.sum(0)), None, X, ql, qa, res, cg)


MetaGradientKind = Union[Implicit, Unrolled, FirstOrder, ReptileStep, ReleasedCG]


@dataclasses.dataclass(frozen=True)
class MetaAlgorithm:
    """An inner solver, a proximal weight and a way to form the meta-gradient."""

    inner: InnerSolver
    meta_gradient: MetaGradientKind
    lam: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.meta_gradient, Unrolled):
            if not isinstance(self.inner, InnerGD):
                raise ValueError(
                    "MetaAlgorithm: Unrolled (MAML) needs InnerGD; a line search cannot be unrolled"
                )
            if self.inner.tol:
                raise ValueError("MetaAlgorithm: Unrolled (MAML) needs InnerGD(tol=None): a fixed path")
            if self.inner.backtrack:
                raise ValueError(
                    "MetaAlgorithm: Unrolled (MAML) needs InnerGD(backtrack=False): a fixed path"
                )
        if isinstance(self.meta_gradient, Implicit) and not self.lam > 0:
            raise ValueError(f"MetaAlgorithm(lam={self.lam}): Implicit needs lam > 0")
        if isinstance(self.meta_gradient, Implicit) and isinstance(self.inner, InnerGDPullBack):
            raise ValueError(
                "MetaAlgorithm: Implicit needs an inner solver that minimizes G (Lemma 1); "
                "InnerGDPullBack (the released code's loop) goes with ReleasedCG"
            )
        if not self.lam >= 0:
            raise ValueError(f"MetaAlgorithm(lam={self.lam}): lam must be >= 0")


def make_algorithm(
    name: str,
    *,
    inner_steps: int = 16,
    inner_lr: float = 0.1,
    lam: float = 2.0,
    cg_iters: int = 5,
    newton_iters: int = 3,
    damping: float = 0.0,
    cg_warm_start: bool = False,
    inner_tol: float | None = None,
    backtrack: bool = False,
    inner_solver: str = "gd",
) -> MetaAlgorithm:
    """The command line's algorithm names, mapped to configurations.

    ``imaml-gd``, ``imaml-hf`` minimize G with proximal weight ``lam``; ``maml``,
    ``fomaml`` and ``reptile`` minimize the support loss alone (lam = 0), as
    published.  ``inner_solver="nesterov"`` replaces their inner GD by accelerated GD
    (`InnerNesterov`); ``inner_solver="trust-region"`` replaces imaml-hf's line-search Newton-CG
    (the paper's) by trust-region Newton-CG (`InnerTrustRegion`).  ``imaml-released`` is the
    authors' released code (`InnerGDPullBack` + `ReleasedCG` with ``damping`` as its
    ``regu_coef``; the released value is 1), not the paper's method.  Every other setting is
    shared, for apples-to-apples comparisons.
    """
    gd: InnerSolver = InnerGD(steps=inner_steps, lr=inner_lr, tol=inner_tol, backtrack=backtrack)
    if inner_solver == "nesterov":
        if backtrack or inner_tol is not None:
            raise ValueError(
                "inner_solver='nesterov' runs a fixed number of accelerated steps: no backtrack or inner_tol"
            )
        if name not in ("imaml-gd", "fomaml", "reptile"):
            raise ValueError(f"inner_solver='nesterov' is for imaml-gd, fomaml and reptile, not {name}")
        gd = InnerNesterov(steps=inner_steps, lr=inner_lr)
    elif inner_solver == "trust-region":
        if name != "imaml-hf":
            raise ValueError(
                f"inner_solver='trust-region' replaces imaml-hf's line search by a trust region; "
                f"{name} takes 'gd' or 'nesterov'"
            )
    elif inner_solver != "gd":
        raise ValueError(
            f"make_algorithm(inner_solver={inner_solver!r}): choose 'gd', 'nesterov' or 'trust-region'"
        )
    if name == "imaml-gd":
        return MetaAlgorithm(gd, Implicit(cg_iters, damping, cg_warm_start), lam)
    if name == "imaml-hf":
        newton: InnerSolver = (
            InnerTrustRegion(newton_iters, cg_iters)
            if inner_solver == "trust-region"
            else InnerNewtonCG(newton_iters, cg_iters)
        )
        return MetaAlgorithm(newton, Implicit(cg_iters, damping, cg_warm_start), lam)
    if name == "maml":
        if backtrack:
            raise ValueError("maml differentiates through a fixed inner path: backtrack=True is not possible")
        return MetaAlgorithm(InnerGD(steps=inner_steps, lr=inner_lr), Unrolled(), 0.0)
    if name == "fomaml":
        return MetaAlgorithm(gd, FirstOrder(), 0.0)
    if name == "reptile":
        return MetaAlgorithm(gd, ReptileStep(), 0.0)
    if name == "imaml-released":
        if backtrack:
            raise ValueError(
                "imaml-released runs the released code's fixed-step loop: backtrack=True is not possible"
            )
        return MetaAlgorithm(InnerGDPullBack(inner_steps, inner_lr), ReleasedCG(cg_iters, damping), lam)
    raise ValueError(
        f"unknown algorithm {name!r}: choose imaml-gd, imaml-hf, maml, fomaml, reptile or imaml-released"
    )


@dataclasses.dataclass(frozen=True)
class MetaStats:
    """Per-task diagnostics of one meta-gradient computation, each a tensor of shape (B,).

    Attributes:
        query_loss, query_acc: query loss and accuracy (accuracy NaN for regression)
            at phi_i, i.e. after adaptation.
        support_loss: Lhat_i(phi_i).
        inner_grad_norm: ||grad_phi G_i(phi_i, theta)|| at the inner answer.
        cg_residual: ||(I + Lhat''/lam) g_i - v_i|| in the units of v_i (recursively
            updated, CG's own estimate) for `Implicit`, NaN otherwise.
        negative_curvature: True where CG met p'Ap <= 0 and stopped early.
        cg_iters: CG iterations done per task (the one that met negative curvature included).
        min_eig: the smallest eigenvalue of I + Lhat''(phi_i)/lam at the inner answer, estimated
            by ``lanczos_steps`` Lanczos steps (`bilevel.lanczos_extremes`; an upper bound that
            tightens with the steps), NaN unless asked for.  Negative: phi_i is not a minimum of
            G_i, so Lemma 1's implicit gradient does not apply there.  With per-tensor lam, of
            the similar matrix I + D^-1/2 Lhat'' D^-1/2, D = diag(lam).
        distance: ||phi_i - theta||, the Euclidean norm over every parameter (how far the inner
            answer moved; NaN without diagnostics).
    """

    query_loss: torch.Tensor
    query_acc: torch.Tensor
    support_loss: torch.Tensor
    inner_grad_norm: torch.Tensor
    cg_residual: torch.Tensor
    negative_curvature: torch.Tensor
    cg_iters: torch.Tensor
    min_eig: torch.Tensor | None = None
    distance: torch.Tensor | None = None


def _min_eig(mb: _MetaBatch, X: torch.Tensor, steps: int) -> torch.Tensor:
    """Smallest eigenvalue of I + Lhat''/lam at X per task (B,), by Lanczos on HVPs of G."""
    hvp = mb.hvp(X)
    lam = _detached(mb.lam_vec(mb._theta_values()))
    scale = lam.rsqrt() if isinstance(lam, torch.Tensor) else lam**-0.5

    def matvec(V: torch.Tensor) -> torch.Tensor:
        return hvp(V * scale) * scale

    v0 = torch.randn(X.shape, generator=torch.Generator().manual_seed(0), dtype=X.dtype).to(X.device)
    lo, _ = bl.lanczos_extremes(matvec, v0, steps)
    return lo


def _stats(mb: _MetaBatch, out: _Outcome, diagnostics: bool, lanczos_steps: int = 0) -> MetaStats:
    B, device = mb.B, out.query_loss.device
    nan = torch.full((B,), float("nan"), dtype=out.query_loss.dtype, device=device)
    cg = out.cg
    if cg is not None and cg.problem_residual_norm is not None:  # batched (read nothing)
        assert cg.problem_n_iter is not None
        residual = cg.problem_residual_norm.to(device)
        negative = cg.status_mask(bl.LinearStatus.NEGATIVE_CURVATURE).to(device)
        iters = cg.problem_n_iter.to(device=device, dtype=nan.dtype)
    else:
        negative = torch.zeros(B, dtype=torch.bool, device=device)
        residual, iters = nan, torch.zeros_like(nan)
    if diagnostics:
        # One gradient of G at the answers (the fixed-budget inner solver takes none there).
        X = out.phi.detach().requires_grad_(True)
        th = mb._theta_values()
        with torch.enable_grad():
            values = mb.objective(exact=False)(X, th)
            (grad,) = torch.autograd.grad(values.sum(), X, allow_unused=True, materialize_grads=True)
        grad_norm = torch.linalg.vector_norm(grad, dim=1).detach().to(nan.dtype)
        with torch.no_grad():
            support = (values.detach() - mb.prox(out.phi, th)).to(nan.dtype)
            distance = torch.linalg.vector_norm(out.phi.detach() - mb.theta_flat, dim=1).to(nan.dtype)
    else:
        grad_norm, support, distance = nan, nan, nan
    min_eig = nan
    no_prox = isinstance(mb.lam_fixed, float) and mb.lam_fixed == 0.0
    if diagnostics and lanczos_steps > 0 and not no_prox:
        min_eig = _min_eig(mb, out.phi, lanczos_steps).to(nan.dtype)
    return MetaStats(
        out.query_loss, out.query_acc, support, grad_norm, residual, negative, iters, min_eig, distance
    )


def meta_gradient(
    algo: MetaAlgorithm,
    model: ModelFn,
    loss: LossFn,
    theta: Params,
    batch: Task,
    *,
    lam: Lam | None = None,
    classification: bool = True,
    vectorize: bool = True,
    diagnostics: bool = True,
    batched: BatchedModel | None = None,
    lanczos_steps: int = 0,
) -> tuple[Params, dict[str, torch.Tensor] | None, MetaStats]:
    """The average task meta-gradient of a meta-batch (Algorithm 1's direction).

    Args:
        algo: what to compute (see the module docstring).
        model: ``model(params, x) -> outputs`` for one task.
        loss: ``loss(outputs, y) -> scalar`` (cross-entropy, MSE, ...).
        theta: meta-parameters by name (no leading task dimension).
        batch: a meta-batch `Task` with leading dimension B on every field.
        lam: overrides ``algo.lam``: a float, or learned 0-d tensors (one shared or
            one per parameter name) whose gradient is returned too.
        classification: whether to report query accuracy.
        vectorize: without ``batched``, run the per-task model under ``torch.func.vmap``
            (``True``) or in a Python loop (for models or ops without batching rules).
        diagnostics: measure the support loss and ||grad G|| at phi for the stats (one
            more gradient per task); ``False`` reports them as NaN.
        batched: the `BatchedModel` of ``model`` (`bilevel.metalearn.batched_model`): the
            B tasks' models then run in one call with plain autograd (faster on CPU than
            vmap); same result.
        lanczos_steps: with ``diagnostics``, estimate `MetaStats.min_eig` (the smallest
            eigenvalue of I + Lhat''/lam at each inner answer) with this many Lanczos steps
            (one HVP each); 0: not estimated (NaN, also for lam = 0).

    Returns:
        ``(grad, lam_grad, stats)``: the mean meta-gradient by name (like ``theta``),
        the gradient with respect to a learned ``lam`` (``None`` if ``lam`` is not a
        tensor or dict of tensors; keys ``"lam"`` or the parameter names) and the
        per-task `MetaStats`.

    Raises:
        NonFiniteError: the inner solve diverged in some task.
        ValueError: a learned lam with a kind other than `Implicit`.
    """
    if lanczos_steps < 0:
        raise ValueError(f"meta_gradient(lanczos_steps={lanczos_steps}): must be >= 0")
    lam_v: Lam = algo.lam if lam is None else lam
    mb = _MetaBatch(as_batched(model, batched, vectorize), loss, classification, batch, theta, lam_v)
    if mb.learned and not isinstance(algo.meta_gradient, Implicit):
        raise ValueError("a learned lam needs the Implicit meta-gradient (iMAML)")
    out = algo.meta_gradient.apply(algo.inner, mb)
    mean = {k: t / mb.B for k, t in out.grad.items()}
    lam_grad = None if out.lam_grad is None else {k: t / mb.B for k, t in out.lam_grad.items()}
    return mean, lam_grad, _stats(mb, out, diagnostics, lanczos_steps)


def adapt(
    algo: MetaAlgorithm,
    model: ModelFn,
    loss: LossFn,
    theta: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    lam: Lam | None = None,
    vectorize: bool = True,
    batched: BatchedModel | None = None,
) -> Params:
    """Adapt theta to a batch of support sets with the algorithm's inner solver (no gradient).

    Args:
        support_x, support_y: support sets with a leading task dimension B.
        batched: run the inner solver with this `BatchedModel` of ``model`` (see `meta_gradient`).

    Returns:
        phi by name, every tensor with the leading dimension B.
    """
    lam_v: Lam = algo.lam if lam is None else lam
    empty = support_x[:, :0]
    batch = Task(support_x, support_y, empty, support_y[:, :0])
    mb = _MetaBatch(as_batched(model, batched, vectorize), loss, True, batch, theta, lam_v)
    with torch.no_grad():
        return mb.params(mb.solve(algo.inner).x)  # type: ignore[arg-type]


def predict_batch(
    algo: MetaAlgorithm,
    model: ModelFn,
    loss: LossFn,
    theta: Params,
    batch: Task,
    *,
    lam: Lam | None = None,
    classification: bool = True,
    vectorize: bool = True,
    batched: BatchedModel | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adapt to each task with the algorithm's inner solver and predict its query set (no gradient).

    Returns:
        ``(query_loss, query_acc, outputs)``: per-task losses and accuracies, shape (B,) each
        (accuracy NaN for regression), and the adapted models' outputs on the query inputs,
        shape (B, Nq, ...) (logits for classification).
    """
    lam_v: Lam = algo.lam if lam is None else lam
    mb = _MetaBatch(as_batched(model, batched, vectorize), loss, classification, batch, theta, lam_v)
    with torch.no_grad():
        X: torch.Tensor = mb.solve(algo.inner).x  # type: ignore[assignment]
        out = mb.bm.outputs(mb.unflat(X), batch.query_x)
        return task_losses(loss, out, batch.query_y), mb.accuracy(out, batch.query_y), out


def evaluate_batch(
    algo: MetaAlgorithm,
    model: ModelFn,
    loss: LossFn,
    theta: Params,
    batch: Task,
    *,
    lam: Lam | None = None,
    classification: bool = True,
    vectorize: bool = True,
    batched: BatchedModel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt to each task with the algorithm's inner solver and score its query set.

    Args:
        batched: evaluate with this `BatchedModel` of ``model`` (see `meta_gradient`).

    Returns:
        ``(query_loss, query_acc)`` per task, shape (B,) each.
    """
    ql, qa, _ = predict_batch(
        algo,
        model,
        loss,
        theta,
        batch,
        lam=lam,
        classification=classification,
        vectorize=vectorize,
        batched=batched,
    )
    return ql, qa
