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
===============  =================================================================

The B per-task models run through one `BatchedModel` (the seam): built from the model's
structure (`batched_model`) or from the per-task function (vmap or a loop).

Deviations from the paper, each measured and switchable:

* CG starts from g = grad L_i(phi_i) (the first-order gradient), not from 0, so that
  0 CG steps are exactly first-order MAML (Appendix A) and every CG step improves on
  it.  ``Implicit(warm_start=False)`` starts from 0 as in the paper.
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
from collections.abc import Callable
from typing import Any, ClassVar, Union

import torch
from torch.autograd.function import once_differentiable

import bilevel as bl
from bilevel.solvers import GradientDescent, NewtonCG, StepHalving

from .models import BatchedModel, as_batched, task_losses
from .tasks import Task

__all__ = [
    "FirstOrder",
    "Implicit",
    "InnerGD",
    "InnerNewtonCG",
    "MetaAlgorithm",
    "MetaStats",
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

    steps: int = 16
    lr: float = 0.1
    tol: float | None = None
    backtrack: bool = False
    #: whether the solver takes second derivatives of G (then through the exact model)
    second_order: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"InnerGD(steps={self.steps}): steps must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"InnerGD(lr={self.lr}): lr must be > 0")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"InnerGD(tol={self.tol}): tol must be >= 0 or None")

    def solver(self, *, differentiable: bool = False) -> GradientDescent:
        """The batched `GradientDescent` this configuration stands for."""
        return GradientDescent(
            lr=self.lr,
            max_iter=self.steps,
            tol=0.0 if self.tol is None else self.tol,
            line_search=StepHalving() if self.backtrack else None,
            batched=True,
            differentiable=differentiable,
        )


@dataclasses.dataclass(frozen=True)
class InnerNewtonCG:
    """Hessian-free Newton on G: ``newton_iters`` x (``cg_iters`` CG steps + Armijo line search).

    iMAML-HF of the paper (3 x 5 by default).  Runs `bilevel.solvers.NewtonCG` on the
    meta-batch in its batched mode.  Cannot be unrolled.
    """

    newton_iters: int = 3
    cg_iters: int = 5
    second_order: ClassVar[bool] = True

    def solver(self, *, differentiable: bool = False) -> NewtonCG:
        if differentiable:
            raise ValueError("InnerNewtonCG: a line search cannot be unrolled")
        return NewtonCG(newton_iters=self.newton_iters, cg_iters=self.cg_iters, batched=True)


InnerSolver = Union[InnerGD, InnerNewtonCG]


# ---------------------------------------------------------------------------------- one meta-batch
@dataclasses.dataclass
class _Outcome:
    """What a meta-gradient kind returns: per-task sums of gradients and the inner answers."""

    grad: Params  # sum over tasks
    lam_grad: dict[str, torch.Tensor] | None  # sum over tasks
    phi: Params  # (B, ...) detached
    query_loss: torch.Tensor  # (B,)
    query_acc: torch.Tensor  # (B,)
    inner: bl.SolverResult
    cg: bl.LinearSolveResult | None = None


class _MetaBatch:
    """The B inner problems of a meta-batch, written once for every algorithm.

    ``theta`` (no task dimension) and the fixed or learned ``lam`` define G_i; the
    objectives take phi with a leading B and a theta tree that may carry learned lam
    values under ``"lam:<name>"`` (per tensor) or ``"lam:"`` (shared).
    """

    def __init__(
        self, bm: BatchedModel, loss: LossFn, classification: bool, batch: Task, theta: Params, lam: Lam
    ) -> None:
        self.bm = bm
        self.loss = loss
        self.classification = classification
        self.batch = batch
        self.theta = {k: v.detach() for k, v in theta.items()}
        self.B = batch.support_x.shape[0]
        self.lam = lam
        self.learned = isinstance(lam, (torch.Tensor, dict))

    # -- lam
    def lam_tree(self) -> dict[str, torch.Tensor]:
        """Learned lam values as theta-tree entries, each a fresh leaf that requires grad."""
        lam = self.lam
        if isinstance(lam, dict):
            return {_LAM + k: v.detach().requires_grad_(True) for k, v in lam.items()}
        if isinstance(lam, torch.Tensor):
            return {_LAM: lam.detach().requires_grad_(True)}
        return {}

    def lam_of(self, k: str, th: Params) -> torch.Tensor | float:
        if _LAM + k in th:
            return th[_LAM + k]
        if _LAM in th:
            return th[_LAM]
        lam = self.lam
        if isinstance(lam, dict):
            return lam[k].detach()
        return lam.detach() if isinstance(lam, torch.Tensor) else lam

    # -- objectives
    def prox(self, phi: Params, th: Params) -> torch.Tensor:
        """sum_k lam_k/2 ||phi_k - theta_k||^2 per task, shape (B,).

        Tensor by tensor, without concatenating phi (a copy of every parameter per evaluation):
        one subtraction, one square and one row sum per tensor.
        """
        out: torch.Tensor | None = None
        for k, p in phi.items():
            lam = self.lam_of(k, th)
            if isinstance(lam, float) and lam == 0.0:
                continue
            # d.square().sum, not norm(d)**2, whose second derivative is wrong where d = 0; and
            # not d * d, whose double backward takes twice the passes over the parameters
            d = (p - th[k]).reshape(self.B, -1)
            term = (0.5 * lam) * d.square().sum(1)
            out = term if out is None else out + term
        if out is None:
            return torch.zeros(self.B, dtype=self.batch.support_x.dtype, device=self.batch.support_x.device)
        return out

    def objective(self, *, exact: bool) -> Callable[[Params, Params], torch.Tensor]:
        """G_i(phi_i, theta) per task, shape (B,); ``exact`` for second derivatives."""
        x, y = self.batch.support_x, self.batch.support_y
        forward = self.bm.exact if exact else self.bm.fast

        def G(phi: Params, th: Params) -> torch.Tensor:
            support = task_losses(self.loss, forward(phi, x), y)
            if exact or any(t.requires_grad for t in th.values()):
                return support + self.prox(phi, th)
            # The inner solver's objective: differentiated once, in phi only.
            names = [k for k in phi if not (isinstance(lam := self.lam_of(k, th), float) and lam == 0.0)]
            if not names:
                return support
            lams = tuple(self.lam_of(k, th) for k in names)
            thetas = tuple(th[k] for k in names)
            return support + _ProxFirstOrder.apply(lams, thetas, *(phi[k] for k in names))

        return G

    def init(self, theta: Params | None = None) -> Params:
        """phi = theta for every task (expanded views of ``theta``, attached if it is)."""
        th = self.theta if theta is None else theta
        return {k: v.unsqueeze(0).expand(self.B, *v.shape) for k, v in th.items()}

    def solve(self, inner: InnerSolver) -> bl.SolverResult:
        """The inner answers of the B tasks (no graph), with the solver's per-task diagnostics."""
        G = self.objective(exact=inner.second_order)
        return _checked(inner.solver()(G, self.init(), self._theta_values()))

    def _theta_values(self) -> Params:
        return {**self.theta, **{k: v.detach() for k, v in self.lam_tree().items()}}

    # -- query
    def query(self, phi: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Query losses (B,) (differentiable in phi) and accuracies (B,) of the adapted models."""
        out = self.bm.outputs(phi, self.batch.query_x)
        return task_losses(self.loss, out, self.batch.query_y), self.accuracy(out, self.batch.query_y)

    def accuracy(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return (out.detach().argmax(-1) == y).float().mean(-1)
        return torch.full(out.shape[:1], float("nan"), dtype=out.dtype, device=out.device)

    def query_gradients(self, phi: Params) -> tuple[Params, torch.Tensor, torch.Tensor]:
        """Per-task query gradients grad L_i(phi_i) (B, ...), losses (B,) and accuracies (B,).

        First order, through the fast model.  Where ``loop_large`` runs the query sets task by
        task, each task's gradient is taken at its own detached copy of phi_i: no gradient is
        scattered back into a (B, ...) tensor per task and parameter.
        """
        if not self.bm.loop_large:
            leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
            with torch.enable_grad():
                ql, qa = self.query(leaves)
                gs = torch.autograd.grad(ql.sum(), list(leaves.values()), allow_unused=True)
            return _or_zeros(leaves, gs), ql.detach(), qa
        x, y = self.batch.query_x, self.batch.query_y
        grads, losses, outs = [], [], []
        for i in range(self.B):
            p = {k: v[i].detach().requires_grad_(True) for k, v in phi.items()}
            with torch.enable_grad():
                out = self.bm.single(p, x[i])
                loss = self.loss(out, y[i])
                grads.append(_or_zeros(p, torch.autograd.grad(loss, list(p.values()), allow_unused=True)))
            losses.append(loss.detach())
            outs.append(out.detach())
        out_b = torch.stack(outs)
        g = {k: torch.stack([gi[k] for gi in grads]) for k in phi}
        return g, torch.stack(losses), self.accuracy(out_b, y)


class _ProxFirstOrder(torch.autograd.Function):
    """sum_k lam_k/2 ||phi_k - theta_k||^2 per task (B,), differentiable once and in phi only.

    The proximal term of the inner solver's objective: its gradient lam_k (phi_k - theta_k) is
    one fused product per tensor here, where autograd through (d * d).sum would take three
    passes over every parameter per step.  Second derivatives (HVPs) go through `_MetaBatch.prox`.
    """

    @staticmethod
    def forward(
        ctx: Any, lams: tuple[float | torch.Tensor, ...], thetas: tuple[torch.Tensor, ...], *phi: torch.Tensor
    ) -> torch.Tensor:
        B = phi[0].shape[0]
        diffs = [(p - t).reshape(B, -1) for p, t in zip(phi, thetas)]
        out = None
        for d, lam in zip(diffs, lams):
            # one fused pass: the row-wise inner product as a batched matrix product
            term = (0.5 * lam) * torch.bmm(d.unsqueeze(1), d.unsqueeze(2)).reshape(B)
            out = term if out is None else out + term
        ctx.lams = lams
        ctx.shapes = [p.shape for p in phi]
        ctx.save_for_backward(*diffs)
        assert out is not None  # at least one tensor: the caller drops the prox term otherwise
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
        grads = [
            d.mul(go[:, None] * lam).reshape(shape)
            for d, lam, shape in zip(ctx.saved_tensors, ctx.lams, ctx.shapes)
        ]
        return (None, None, *grads)


def _or_zeros(like: Params, grads: tuple[torch.Tensor | None, ...]) -> Params:
    """Gradients by name, zeros where autograd returned None (an unused parameter)."""
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(like.items(), grads)}


def _checked(res: bl.SolverResult) -> bl.SolverResult:
    """Stop on a diverged inner solve: its NaN would otherwise be frozen out of the answer silently."""
    statuses = res.problem_status or (res.status,)
    bad = [i for i, s in enumerate(statuses) if s is bl.SolverStatus.NONFINITE]
    if bad:
        raise bl.NonFiniteError(
            f"the inner solve produced NaN or infinity in task(s) {bad[:10]} of the meta-batch: the inner "
            "loop diverged; lower --inner-lr (InnerGD(lr=...)), raise --lam, or use --backtrack"
        )
    return res


# ---------------------------------------------------------------------------------- meta-gradient kinds
@dataclasses.dataclass(frozen=True)
class Implicit:
    """iMAML's meta-gradient: CG on (I + Lhat''/lam) g = grad L(phi), through `bilevel.implicit_argmin`.

    Args:
        cg_iters: CG iterations (5 in the paper).
        damping: solve ((1 + damping) I + Lhat''/lam) g = v; 0 is the paper's system.
        warm_start: start CG from v (so 0 iterations = first-order MAML); ``False``
            starts from 0.
    """

    cg_iters: int = 5
    damping: float = 0.0
    warm_start: bool = True

    def __post_init__(self) -> None:
        if self.cg_iters < 0:
            raise ValueError(f"Implicit(cg_iters={self.cg_iters}): cg_iters must be >= 0")
        if not self.damping >= 0:
            raise ValueError(f"Implicit(damping={self.damping}): damping must be >= 0")

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        theta = {k: v.detach().requires_grad_(True) for k, v in mb.theta.items()}
        tree = {**theta, **mb.lam_tree()}
        fast = mb.objective(exact=inner.second_order)
        solver = inner.solver()

        def solve(_exact: Any, init: Params, th: Params) -> bl.SolverResult:
            # The inner steps use the fast model; the layer linearizes the exact one.
            return _checked(solver(fast, init, th))

        d = 1.0 + self.damping
        lam_flat = self._lam_flat(mb, tree)
        shift = None
        if self.damping > 0:
            shift = {k: self.damping * mb.lam_of(k, tree) for k in theta}
            shift = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in shift.items()}
        with torch.enable_grad():
            phi, info = bl.implicit_argmin(
                mb.objective(exact=True),
                mb.init(),
                tree,
                solve,
                hvp=None if shift is None else bl.Damped(shift),  # type: ignore[arg-type]
                linear_solver=bl.CG(max_iter=self.cg_iters, rtol=0.0, atol=0.0, check_residual=False),
                batched=True,
                optimality_tol=None,
                throw=False,
                warn=False,
                measure_residual=False,
                backward_x0=(lambda b: b / (d * lam_flat)) if self.warm_start else None,
                return_info=True,
            )
            # v_i = grad L_i(phi_i), first order, then back through the layer: each task's
            # right-hand side is its own query gradient, so the CG residuals are in its units.
            v, ql, qa = mb.query_gradients(phi)
            grads = torch.autograd.grad(
                list(phi.values()), list(tree.values()), grad_outputs=list(v.values()), allow_unused=True
            )
        g = _or_zeros(tree, grads)
        assert info.solver_result is not None and info.last_backward is not None
        lam_grad = None
        if mb.learned:
            lam_grad = {(k[len(_LAM) :] or "lam"): g[k] for k in tree if k.startswith(_LAM)}
        return _Outcome(
            {k: g[k] for k in theta},
            lam_grad,
            {k: v.detach() for k, v in phi.items()},
            ql,
            qa,
            info.solver_result,
            info.last_backward,
        )

    @staticmethod
    def _lam_flat(mb: _MetaBatch, tree: Params) -> torch.Tensor | float:
        """lam per coordinate of a task's flattened phi (a number when lam is shared)."""
        per = [mb.lam_of(k, tree) for k in mb.theta]
        if all(not isinstance(v, torch.Tensor) for v in per):
            return float(per[0])
        return torch.cat(
            [
                torch.as_tensor(v, dtype=t.dtype, device=t.device).detach().expand(t.numel())
                for v, t in zip(per, mb.theta.values())
            ]
        )


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """MAML: differentiate through the inner GD path (`GradientDescent(differentiable=True)`)."""

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        theta = {k: v.detach().requires_grad_(True) for k, v in mb.theta.items()}
        with torch.enable_grad():
            res = _checked(inner.solver(differentiable=True)(mb.objective(exact=True), mb.init(theta), theta))
            phi: Params = res.x  # type: ignore[assignment]
            ql, qa = mb.query(phi)
            grads = torch.autograd.grad(ql.sum(), list(theta.values()), allow_unused=True)
        return _Outcome(
            _or_zeros(theta, grads), None, {k: v.detach() for k, v in phi.items()}, ql.detach(), qa, res
        )


@dataclasses.dataclass(frozen=True)
class FirstOrder:
    """First-order MAML: the query gradient at phi_i, taken as the meta-gradient."""

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        res = mb.solve(inner)
        phi: Params = res.x  # type: ignore[assignment]
        v, ql, qa = mb.query_gradients(phi)
        return _Outcome({k: t.sum(0) for k, t in v.items()}, None, phi, ql, qa, res)


@dataclasses.dataclass(frozen=True)
class ReptileStep:
    """Reptile: theta - phi_i, taken as the meta-gradient (Nichol et al. 2018)."""

    def apply(self, inner: InnerSolver, mb: _MetaBatch) -> _Outcome:
        res = mb.solve(inner)
        phi: Params = res.x  # type: ignore[assignment]
        with torch.no_grad():
            ql, qa = mb.query(phi)
        grad = {k: (mb.theta[k].unsqueeze(0) - phi[k]).sum(0) for k in phi}
        return _Outcome(grad, None, phi, ql, qa, res)


MetaGradientKind = Union[Implicit, Unrolled, FirstOrder, ReptileStep]


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
    inner_tol: float | None = None,
    backtrack: bool = False,
) -> MetaAlgorithm:
    """The command line's algorithm names, mapped to configurations.

    ``imaml-gd``, ``imaml-hf`` minimize G with proximal weight ``lam``; ``maml``,
    ``fomaml`` and ``reptile`` minimize the support loss alone (lam = 0), as
    published.  Every other setting is shared, for apples-to-apples comparisons.
    """
    gd = InnerGD(steps=inner_steps, lr=inner_lr, tol=inner_tol, backtrack=backtrack)
    if name == "imaml-gd":
        return MetaAlgorithm(gd, Implicit(cg_iters=cg_iters, damping=damping), lam)
    if name == "imaml-hf":
        return MetaAlgorithm(InnerNewtonCG(newton_iters, cg_iters), Implicit(cg_iters, damping), lam)
    if name == "maml":
        if backtrack:
            raise ValueError("maml differentiates through a fixed inner path: backtrack=True is not possible")
        return MetaAlgorithm(InnerGD(steps=inner_steps, lr=inner_lr), Unrolled(), 0.0)
    if name == "fomaml":
        return MetaAlgorithm(gd, FirstOrder(), 0.0)
    if name == "reptile":
        return MetaAlgorithm(gd, ReptileStep(), 0.0)
    raise ValueError(f"unknown algorithm {name!r}: choose imaml-gd, imaml-hf, maml, fomaml or reptile")


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
    """

    query_loss: torch.Tensor
    query_acc: torch.Tensor
    support_loss: torch.Tensor
    inner_grad_norm: torch.Tensor
    cg_residual: torch.Tensor
    negative_curvature: torch.Tensor
    cg_iters: torch.Tensor


def _stats(mb: _MetaBatch, out: _Outcome, diagnostics: bool) -> MetaStats:
    B, device = mb.B, out.query_loss.device
    nan = torch.full((B,), float("nan"), dtype=out.query_loss.dtype, device=device)
    cg = out.cg
    if cg is not None and cg.problem_status is not None:
        assert cg.problem_residual_norm is not None and cg.problem_n_iter is not None
        residual = cg.problem_residual_norm.to(device)
        negative = torch.tensor(
            [s is bl.LinearStatus.NEGATIVE_CURVATURE for s in cg.problem_status], device=device
        )
        iters = cg.problem_n_iter.to(device=device, dtype=nan.dtype)
    else:
        negative = torch.zeros(B, dtype=torch.bool, device=device)
        residual, iters = nan, torch.zeros_like(nan)
    if diagnostics:
        # One gradient of G at the answers (the fixed-budget inner solver takes none there).
        phi = {k: v.detach().requires_grad_(True) for k, v in out.phi.items()}
        th = mb._theta_values()
        with torch.enable_grad():
            values = mb.objective(exact=False)(phi, th)
            grads = torch.autograd.grad(values.sum(), list(phi.values()), allow_unused=True)
        grad_norm = bl.tree.batch_norm_sq(_or_zeros(phi, grads)).sqrt().detach().to(nan.dtype)
        with torch.no_grad():
            support = (values.detach() - mb.prox(out.phi, th)).to(nan.dtype)
    else:
        grad_norm, support = nan, nan
    return MetaStats(out.query_loss, out.query_acc, support, grad_norm, residual, negative, iters)


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

    Returns:
        ``(grad, lam_grad, stats)``: the mean meta-gradient by name (like ``theta``),
        the gradient with respect to a learned ``lam`` (``None`` if ``lam`` is not a
        tensor or dict of tensors; keys ``"lam"`` or the parameter names) and the
        per-task `MetaStats`.

    Raises:
        NonFiniteError: the inner solve diverged in some task.
        ValueError: a learned lam with a kind other than `Implicit`.
    """
    lam_v: Lam = algo.lam if lam is None else lam
    mb = _MetaBatch(as_batched(model, batched, vectorize), loss, classification, batch, theta, lam_v)
    if mb.learned and not isinstance(algo.meta_gradient, Implicit):
        raise ValueError("a learned lam needs the Implicit meta-gradient (iMAML)")
    out = algo.meta_gradient.apply(algo.inner, mb)
    mean = {k: t / mb.B for k, t in out.grad.items()}
    lam_grad = None if out.lam_grad is None else {k: t / mb.B for k, t in out.lam_grad.items()}
    return mean, lam_grad, _stats(mb, out, diagnostics)


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
        return mb.solve(algo.inner).x  # type: ignore[return-value]


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
        phi: Params = mb.solve(algo.inner).x  # type: ignore[assignment]
        out = mb.bm.outputs(phi, batch.query_x)
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
