"""The B inner problems of a meta-batch, written once for every algorithm, and the inner solvers run on them.

Every algorithm solves the same B inner problems of a meta-batch at once,

    G_i(phi, theta) = Lhat_i(phi) + lam/2 ||phi - theta||^2          (Eq. 4 of iMAML)

(``lam = 0`` gives the plain support loss of MAML, FOMAML and Reptile) with a `bilevel.solvers`
instance (`GradientDescent`, `Nesterov`, `NewtonCG`, `TrustRegionNewtonCG`), which `MetaBatch.minimize`
runs in its batched mode (`batched_solver`).  The B per-task models run through one `BatchedModel`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import bilevel as bl
from bilevel.solvers import GradientDescent, Nesterov, NewtonCG, TrustRegionNewtonCG
from bilevel.tree import (
    packed_ravel,
    problems_named,
    ravel,
    rows_finite,
    unravel_like,
    unravel_rows,
)

from .batched import BatchedModel, task_losses
from .models import LossFn, Params
from .proximal import LamVector, ProximalWeight
from .tasks import Task

__all__ = [
    "GRADIENT_ONLY",
    "INNER_SOLVERS",
    "STEP_PREFIX",
    "InnerSolver",
    "MetaBatch",
    "batched_solver",
    "check_task_rows",
    "checked",
    "divergence_remedies",
    "or_zeros",
    "step_size_summary",
]

#: The inner solvers a meta-batch runs (in their batched mode).
InnerSolver = Union[GradientDescent, Nesterov, NewtonCG, TrustRegionNewtonCG]
#: The classes of `InnerSolver`, for the checks at construction.
INNER_SOLVERS: tuple[type, ...] = (GradientDescent, Nesterov, NewtonCG, TrustRegionNewtonCG)
#: The theta-tree key prefix of a learned per-parameter inner step size (Meta-SGD): ``"lr:<name>"``
#: holds the step sizes of parameter ``<name>``, shaped like it.  They are meta-parameters (trained,
#: checkpointed and all-reduced with theta) but not model parameters: `MetaBatch` keeps them apart.
STEP_PREFIX = "lr:"


def step_size_summary(theta: Params) -> dict[str, float] | None:
    """The learned step sizes of a theta tree for a log: their mean per parameter name (one device
    read); ``None`` where theta holds none."""
    steps = {k[len(STEP_PREFIX) :]: v for k, v in theta.items() if k.startswith(STEP_PREFIX)}
    if not steps:
        return None
    means = torch.stack([v.detach().double().mean() for v in steps.values()]).tolist()
    return dict(zip(steps, means))


#: Inner solvers that take gradients of G only (no HVPs): the model's fused losses may serve them.
GRADIENT_ONLY: tuple[type, ...] = (GradientDescent, Nesterov)


def batched_solver(
    solver: InnerSolver, weight: ProximalWeight, *, differentiable: bool = False
) -> InnerSolver:
    """``solver`` as a meta-batch runs it: batched over the B tasks (``differentiable``: keep the
    graph of every step, `GradientDescent` only).

    An accelerated solver given neither ``momentum`` nor ``mu`` takes ``mu = lam`` where
    ``0 < lr * lam <= 1``: G is lam-strongly convex where Lhat is convex (the momentum of
    Theorem 2); otherwise, and for a learned lambda, the k/(k+3) schedule with restart.
    """
    changes: dict[str, Any] = {"batched": True}
    if differentiable:
        changes["differentiable"] = True
    if isinstance(solver, Nesterov) and solver.mu is None and solver.momentum is None:
        mu = weight.strong_convexity()
        if mu is not None and mu * solver.lr <= 1:
            changes["mu"] = mu
    return dataclasses.replace(solver, **changes)


class MetaBatch:
    """The B inner problems of a meta-batch, written once for every algorithm.

    ``theta`` (no task dimension) and the fixed or learned ``lam`` define G_i.  The inner
    unknowns are one flat matrix ``X`` of shape (B, n) (row b: task b's parameters, raveled
    in ``theta``'s order): the solvers update it in one op per step, the proximal term is one
    row-wise product, and the model reads per-tensor views of it (`unflat`).  The objectives
    take ``X`` and a theta tree that may carry learned lam values under ``"lam:<name>"`` (per
    tensor) or ``"lam:"`` (shared).  Learned inner step sizes in ``theta`` (keys ``"lr:<name>"``,
    `STEP_PREFIX`) are kept apart in `step_sizes`, by parameter name.
    """

    def __init__(
        self,
        bm: BatchedModel,
        loss: LossFn,
        classification: bool,
        batch: Task,
        theta: Params,
        weight: ProximalWeight,
        *,
        theta_flat: torch.Tensor | None = None,
    ) -> None:
        self.bm = bm
        self.loss = loss
        self.classification = classification
        self.batch = batch
        self.theta = {k: v.detach() for k, v in theta.items() if not k.startswith(STEP_PREFIX)}
        #: learned per-parameter inner step sizes by parameter name (Meta-SGD), detached; {} if none
        self.step_sizes = {
            k[len(STEP_PREFIX) :]: v.detach() for k, v in theta.items() if k.startswith(STEP_PREFIX)
        }
        self.names = list(self.theta)
        self.shapes = [tuple(v.shape) for v in self.theta.values()]
        self.sizes = [v.numel() for v in self.theta.values()]
        n = sum(self.sizes)
        if theta_flat is not None and (
            theta_flat.shape != (n,) or theta_flat.dtype != next(iter(self.theta.values())).dtype
        ):
            raise ValueError(
                f"MetaBatch(theta_flat=...): the ({n},) ravel of theta, not {tuple(theta_flat.shape)} "
                f"{theta_flat.dtype}"
            )
        if theta_flat is None:
            # theta kept packed (`bilevel.tree.pack`, as the training state keeps it) is read
            # in place: one theta-sized copy fewer at every meta-step's peak
            theta_flat = packed_ravel(tuple(self.theta[k] for k in self.names))
        #: theta raveled (n,), detached; ``theta_flat`` passes in the one of another chunk of the
        #: same meta-batch (theta's values, raveled once)
        self.theta_flat = self.flat(self.theta) if theta_flat is None else theta_flat.detach()
        self.B = batch.support_x.shape[0]
        self.weight = weight
        self.learned = weight.learned
        # lam per coordinate for the solver's objective (no gradient): a number when shared
        self.lam_fixed = weight.detach(self.lam_vec(self.theta_values()))

    # -- the flat layout
    def flat(self, tree: Params) -> torch.Tensor:
        """The tensors of ``tree`` (theta's names, no task dimension) raveled into one (n,) tensor
        (`bilevel.tree.ravel`; a theta tree may carry learned lam entries, left out here)."""
        return ravel(tuple(tree[k] for k in self.names))

    def flat_theta(self, th: Params) -> torch.Tensor:
        """`flat` of a theta tree; no copy where ``th`` holds this meta-batch's theta (the
        solvers pass it on detached, as new tensors over the same memory)."""
        same = all(
            th[k].data_ptr() == t.data_ptr() and th[k].shape == t.shape and th[k].stride() == t.stride()
            for k, t in self.theta.items()
        )
        return self.theta_flat if same else self.flat(th)

    def unflat(self, X: torch.Tensor) -> Params:
        """Per-tensor views (b, *shape) of a flat (b, n) matrix, by name (`bilevel.tree.unravel_rows`;
        b may be a chunk of the B tasks)."""
        return unravel_rows(X, self.theta)  # type: ignore[return-value]  # a dict like theta

    def tree(self, x: torch.Tensor) -> Params:
        """A flat (n,) vector as tensors shaped like theta's, by name (views; `bilevel.tree.unravel_like`)."""
        return unravel_like(x, self.theta)  # type: ignore[return-value]  # a dict like theta

    def params(self, X: torch.Tensor) -> Params:
        """Fresh contiguous per-tensor copies (B, *shape) of a flat (B, n) matrix, by name."""
        return {k: v.contiguous() for k, v in self.unflat(X.detach()).items()}

    # -- lam
    def lam_tree(self) -> dict[str, torch.Tensor]:
        """Learned lam values as theta-tree entries, each a fresh leaf that requires grad."""
        return self.weight.tree()

    def lam_vec(self, th: Params) -> LamVector:
        """lam per coordinate of a task's flat parameters, (n,), differentiable in the learned
        values of ``th``; a number (or 0-d tensor) when one lam is shared."""
        return self.weight.vector(th, self.names, self.sizes)

    # -- objectives
    def prox(self, X: torch.Tensor, th: Params) -> torch.Tensor:
        """lam/2 ||phi_i - theta||^2 per task (B,), differentiable in X, theta and learned lam."""
        lam = self.lam_vec(th)
        d = X - self.flat(th)
        # d.square().sum, not norm(d)**2, whose second derivative is wrong where d = 0
        if self.weight.per_coordinate:
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
        zero = not prox or self.weight.is_zero()
        fused = self._flat_loss(x, y) if gradients_only and not exact else None

        def G(X: torch.Tensor, th: Params) -> torch.Tensor:
            support = (
                fused(X)[0] if fused is not None else task_losses(self.loss, forward(self.unflat(X), x), y)
            )
            if zero:
                return support
            if exact or any(t.requires_grad for t in th.values()):
                return support + self.prox(X, th)
            return support + _ProxFirstOrder.apply(
                self.lam_fixed, self.weight.per_coordinate, self.flat_theta(th), X
            )

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
            values = self.objective(exact=True, prox=prox)(Xr, self.theta_values())
            (g,) = torch.autograd.grad(values.sum(), Xr, create_graph=True)

        def matvec(V: torch.Tensor) -> torch.Tensor:
            (hv,) = torch.autograd.grad(g, Xr, grad_outputs=V, retain_graph=True)
            return hv

        return matvec

    def init(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """X = theta for every task: an expanded (B, n) view of ``flat`` (default `theta_flat`;
        attached to it where it requires grad, as `theta_leaf`'s does)."""
        t = self.theta_flat if flat is None else flat
        return t.unsqueeze(0).expand(self.B, -1)

    def theta_leaf(self) -> tuple[torch.Tensor, Params]:
        """A new (n,) leaf over `theta_flat`'s memory that requires grad, and theta's tensors as
        views of it by name.

        Differentiating in the leaf gives the whole meta-gradient as one (n,) tensor, and
        ``init(leaf)`` starts the tasks there: no second raveled copy of theta in the graph.
        """
        leaf = self.theta_flat.detach().requires_grad_(True)
        return leaf, self.tree(leaf)

    def minimize(
        self, solver: InnerSolver, *, prox: bool = True, fixed_path: bool = False
    ) -> bl.SolverResult:
        """The inner answers X (B, n) of the B tasks (no graph), with per-task diagnostics.

        ``solver`` runs batched (`batched_solver`) from theta on the B tasks' G (``prox=False``:
        the support losses alone) through the fast model (the fused losses where the solver
        takes gradients only); a diverged task raises (`checked`), naming the remedies that
        this solver and G allow (``fixed_path``: the method needs the solver's fixed path, so
        a line search is none).
        """
        objective = self.objective(exact=False, prox=prox, gradients_only=isinstance(solver, GRADIENT_ONLY))
        res = batched_solver(solver, self.weight)(objective, self.init(), self.theta_values())
        return checked(res, divergence_remedies(solver, self.weight if prox else None, fixed_path=fixed_path))

    def theta_values(self) -> Params:
        """theta with the learned lam values (detached) under their tree keys."""
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


class _ProxFirstOrder(torch.autograd.Function):
    """lam/2 ||X_i - theta||^2 per task (B,) of the flat X (B, n), differentiable once and in X only.

    The proximal term of the inner solver's objective: its gradient lam (X - theta) is one
    fused product here, where autograd through (d * d).sum would take three passes over the
    parameters per step.  Second derivatives (HVPs) go through `MetaBatch.prox`.
    """

    @staticmethod
    def forward(ctx: Any, lam: LamVector, vec: bool, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        d = X - theta
        # the row-wise inner product in one fused pass, as a batched matrix product
        dl = d * lam if vec else d
        out = torch.bmm(dl.unsqueeze(1), d.unsqueeze(2)).reshape(X.shape[0])
        out = out * 0.5 if vec else out * (0.5 * lam)
        ctx.lam, ctx.vec = lam, vec
        ctx.save_for_backward(d)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
        (d,) = ctx.saved_tensors
        lam = ctx.lam
        if ctx.vec:
            return None, None, None, d * lam * go[:, None]
        return None, None, None, d * (go * lam)[:, None]


def or_zeros(like: Params, grads: tuple[torch.Tensor | None, ...]) -> Params:
    """Gradients by name, zeros where autograd returned None (an unused parameter)."""
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(like.items(), grads)}


def divergence_remedies(solver: InnerSolver, weight: ProximalWeight | None, *, fixed_path: bool) -> str:
    """What may stop ``solver`` from diverging on G with proximal weight ``weight`` (``None``: no
    proximal term), naming only settings this method has: a smaller step for a fixed-step
    solver, a line search where the method allows one (not ``fixed_path``), a larger lam where G
    has a fixed proximal weight."""
    out = []
    lr = getattr(solver, "lr", None)
    if isinstance(solver, GRADIENT_ONLY) and lr is not None:
        out.append(f"lower the inner step size ({type(solver).__name__}(lr={lr:g}))")
    if isinstance(solver, GradientDescent) and solver.line_search is None and not fixed_path:
        out.append("give the inner GradientDescent a line search (line_search=StepHalving())")
    if weight is not None and not weight.learned and not weight.is_zero():
        out.append("raise lam (a stronger proximal term makes each task's G better conditioned)")
    out.append("check the model's loss on those tasks' support data")
    return ", ".join(out[:-1]) + (", or " if len(out) > 1 else "") + out[-1]


def checked(res: bl.SolverResult, remedies: str) -> bl.SolverResult:
    """Stop on a diverged inner solve: its NaN would otherwise be frozen out of the answer silently
    (now, or at the end of a `bilevel.deferred_checks` block).  The error names the tasks, carries
    ``res.facts()`` (without its answer) as its ``info`` (per-task statuses in
    ``problem_status``) and says ``remedies`` (`divergence_remedies`)."""
    # Queued, the check lives to the block's end: it keeps the statuses, neither the answers
    # (one theta-sized row per task of every chunk) nor their graph (the whole unrolled inner
    # loop of a task chunk that has long been differentiated).
    bl.defer_check(functools.partial(_raise_if_diverged, res.facts(), remedies))
    return res


def _raise_if_diverged(res: bl.SolverResult, remedies: str) -> None:
    bad = res.problems_with(bl.SolverStatus.NONFINITE)
    if bad:
        raise bl.NonFiniteError(
            f"the inner solve produced NaN or infinity in {_tasks(bad)}: "
            f"the inner loop diverged there; {remedies}",
            info=res,
        )


def _tasks(idx: list[int]) -> str:
    return problems_named(idx, noun="task", of="the meta-batch")


def check_task_rows(what: str, rows: torch.Tensor, why: str) -> None:
    """Raise `bilevel.NonFiniteError` naming the tasks whose row of ``rows`` ((B, ...): task b's
    values in row b) has NaN or infinity (the mask is taken now; read now, or at the end of a
    `bilevel.deferred_checks` block).

    Args:
        what: what the rows are, for the message ("the query gradients").
        rows: per-task values, the task along the leading dimension.
        why: the likely cause and what to do.
    """
    ok = rows_finite(rows.detach())
    bl.defer_check(functools.partial(_raise_if_rows, what, ok, why))


def _raise_if_rows(what: str, ok: torch.Tensor, why: str) -> None:
    if bool(ok.all()):
        return
    bad = torch.nonzero(~ok).flatten().tolist()
    raise bl.NonFiniteError(f"{what} have NaN or infinity in {_tasks(bad)}: {why}")
