"""Meta-gradients of iMAML, MAML, first-order MAML and Reptile, from one code path.

Every algorithm runs the same inner solver on the same inner objective

    G_i(phi, theta) = Lhat_i(phi) + lam/2 ||phi - theta||^2          (Eq. 4 of iMAML)

(``lam = 0`` gives the plain support loss of MAML, FOMAML and Reptile) and differs
only in how the task meta-gradient g_i is formed from the inner answer phi_i,
chosen by one value, like Optimistix's ``adjoint=``:

===============  =================================================================
`Implicit`        iMAML (Algorithm 2): solve (I + Lhat''(phi_i)/lam) g_i = grad L_i(phi_i)
                  with ``cg_iters`` CG steps on Hessian-vector products.  The path of
                  the inner solver is not stored.
`Unrolled`        MAML: backpropagate through every inner step (memory grows with steps).
`FirstOrder`      first-order MAML: g_i = grad L_i(phi_i).
`ReptileStep`     Reptile: g_i = theta - phi_i.
===============  =================================================================

Tasks of a meta-batch are independent, so every per-task computation is written for
one task and mapped over the batch with ``torch.func.vmap`` (``vectorize=True``) or a
Python loop (``vectorize=False``, for models or ops without batching rules).

Deviations from the paper, each measured and switchable:

* CG starts from g = grad L_i(phi_i) (the first-order gradient), not from 0, so that
  0 CG steps are exactly first-order MAML (Appendix A) and every CG step improves on
  it.  ``Implicit(warm_start=False)`` starts from 0 as in the paper.
* Early in meta-training the support loss of a CNN with batch norm on 5 images is far
  from convex (Hessian eigenvalues below -40 at a random theta, measured), so
  I + Lhat''/lam can be indefinite and CG can meet negative curvature.  CG then stops
  for that task and keeps its last iterate (truncated CG, as in Steihaug's method);
  the event is counted in `MetaStats.negative_curvature`, never hidden.
* ``Implicit(damping=d)`` solves ((1 + d) I + Lhat''/lam) g = v, the damped system of
  the authors' released code; the paper's system is ``d = 0`` (the default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Union

import torch
import torch.func as tf

from .._status import SolverStatus
from .models import BatchedModel
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
]

Params = dict[str, torch.Tensor]
ModelFn = Callable[[Params, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: lam as a float, a 0-d tensor, or one 0-d tensor per parameter name.
Lam = Union[float, torch.Tensor, dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class InnerGD:
    """Gradient descent on G for ``steps`` steps (or until ||grad G|| <= ``tol`` per task).

    Args:
        steps: number of GD steps (16 and 25 in the paper's Omniglot settings).
        lr: step size.
        tol: per-task gradient-norm tolerance; a task that reaches it stops moving.
            ``None`` runs exactly ``steps`` steps (needed by `Unrolled`).
        backtrack: a per-task step size that starts at ``lr`` and halves whenever a step
            would not decrease G by the Armijo amount 1e-4 s ||grad G||^2 (the step is then
            not taken; it still counts as one of ``steps``).  One more evaluation of G per
            step.  Fixed-step GD diverges once meta-training sharpens the support loss
            beyond 2 / lr (measured on the sinusoid: NaN after 200-900 meta-steps at lr
            0.005-0.02); backtracking cannot.  Not with `Unrolled`.
    """

    steps: int = 16
    lr: float = 0.1
    tol: float | None = None
    backtrack: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"InnerGD(steps={self.steps}): steps must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"InnerGD(lr={self.lr}): lr must be > 0")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"InnerGD(tol={self.tol}): tol must be >= 0 or None")


@dataclasses.dataclass(frozen=True)
class InnerNewtonCG:
    """Hessian-free Newton on G: ``newton_iters`` x (``cg_iters`` CG steps + Armijo line search).

    iMAML-HF of the paper (3 x 5 by default).  Runs `bilevel.solvers.NewtonCG` on the
    meta-batch in its batched mode.  Cannot be unrolled.
    """

    newton_iters: int = 3
    cg_iters: int = 5


@dataclasses.dataclass(frozen=True)
class Implicit:
    """iMAML's meta-gradient: CG on (I + Lhat''/lam) g = grad L(phi).

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


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """MAML: differentiate through the inner GD path (second order)."""


@dataclasses.dataclass(frozen=True)
class FirstOrder:
    """First-order MAML: the query gradient at phi_i, taken as the meta-gradient."""


@dataclasses.dataclass(frozen=True)
class ReptileStep:
    """Reptile: theta - phi_i, taken as the meta-gradient (Nichol et al. 2018)."""


MetaGradientKind = Union[Implicit, Unrolled, FirstOrder, ReptileStep]


@dataclasses.dataclass(frozen=True)
class MetaAlgorithm:
    """An inner solver, a proximal weight and a way to form the meta-gradient."""

    inner: InnerGD | InnerNewtonCG
    meta_gradient: MetaGradientKind
    lam: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.meta_gradient, Unrolled) and not isinstance(self.inner, InnerGD):
            raise ValueError("MetaAlgorithm: Unrolled (MAML) needs InnerGD; a line search cannot be unrolled")
        if isinstance(self.meta_gradient, Unrolled) and isinstance(self.inner, InnerGD) and self.inner.tol:
            raise ValueError("MetaAlgorithm: Unrolled (MAML) needs InnerGD(tol=None): a fixed path")
        if (
            isinstance(self.meta_gradient, Unrolled)
            and isinstance(self.inner, InnerGD)
            and self.inner.backtrack
        ):
            raise ValueError("MetaAlgorithm: Unrolled (MAML) needs InnerGD(backtrack=False): a fixed path")
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
        cg_residual: ||(I + Lhat''/lam) g_i - v_i|| (recursively updated) for `Implicit`,
            NaN otherwise.
        negative_curvature: True where CG met p'Ap <= 0 and stopped early.
        cg_iters: CG iterations done per task.
    """

    query_loss: torch.Tensor
    query_acc: torch.Tensor
    support_loss: torch.Tensor
    inner_grad_norm: torch.Tensor
    cg_residual: torch.Tensor
    negative_curvature: torch.Tensor
    cg_iters: torch.Tensor


# ---------------------------------------------------------------------------------- tree helpers
def _lam_of(lam: Lam, name: str) -> torch.Tensor | float:
    return lam[name] if isinstance(lam, dict) else lam


def _bdot(a: Params, b: Params) -> torch.Tensor:
    """Per-task inner product of two batched trees: shape (B,)."""
    return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)  # type: ignore[return-value]


def _bnorm(a: Params) -> torch.Tensor:
    return _bdot(a, a).sqrt()


def _bscale(s: torch.Tensor, a: Params) -> Params:
    """Multiply each task's slice of a batched tree by s[task]."""
    return {k: v * s.view(-1, *([1] * (v.ndim - 1))) for k, v in a.items()}


def _axpy(a: Params, s: torch.Tensor, b: Params) -> Params:
    """a + s[task] * b."""
    return {k: a[k] + s.view(-1, *([1] * (a[k].ndim - 1))) * b[k] for k in a}


def _batch_map(
    fn: Callable[..., Any], vectorize: bool, in_dims: tuple[int | None, ...]
) -> Callable[..., Any]:
    """vmap, or the same per-task function in a Python loop with stacked outputs."""
    if vectorize:
        return tf.vmap(fn, in_dims=in_dims)

    def looped(*args: Any) -> Any:
        B = next(_leading(a) for a, d in zip(args, in_dims) if d is not None)
        outs = []
        for i in range(B):
            sliced = [_index(a, i) if d is not None else a for a, d in zip(args, in_dims)]
            outs.append(fn(*sliced))
        return _stack(outs)

    return looped


def _leading(a: object) -> int:
    if isinstance(a, torch.Tensor):
        return a.shape[0]
    if isinstance(a, dict):
        return next(iter(a.values())).shape[0]
    return _leading(a[0])  # type: ignore[index]


def _index(a: object, i: int) -> object:
    if isinstance(a, torch.Tensor):
        return a[i]
    if isinstance(a, dict):
        return {k: v[i] for k, v in a.items()}
    return type(a)(_index(x, i) for x in a)  # type: ignore[call-arg, attr-defined]


def _stack(outs: list) -> object:
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outs)
    if isinstance(first, dict):
        return {k: torch.stack([o[k] for o in outs]) for k in first}
    return type(first)(_stack([o[j] for o in outs]) for j in range(len(first)))


# ---------------------------------------------------------------------------------- the engine
class _Task:
    """The per-task functions of one (model, loss) pair, written for a single task."""

    def __init__(self, model: ModelFn, loss: LossFn, classification: bool) -> None:
        self.model = model
        self.loss = loss
        self.classification = classification

    def support_loss(self, phi: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(phi, x), y)

    def G(self, phi: Params, theta: Params, lam: Lam, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        prox = sum(0.5 * _lam_of(lam, k) * ((phi[k] - theta[k]) ** 2).sum() for k in phi)
        return self.support_loss(phi, x, y) + prox

    def query(self, phi: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(self.model(phi, x), y)

    def score(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of one task's outputs."""
        return self.loss(out, y), self.accuracy(out, y)

    def accuracy(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accuracy over the second-to-last dimension of ``out`` (one task, or (B, N, ...) for B
        tasks); NaN for regression."""
        if self.classification:
            return (out.detach().argmax(-1) == y).float().mean(-1)
        return torch.full(out.shape[:-2], float("nan"), dtype=out.dtype, device=out.device)


def _inner_gd(
    task: _Task, cfg: InnerGD, theta: Params, lam: Lam, x: torch.Tensor, y: torch.Tensor, vectorize: bool
) -> Params:
    """GD on G for a meta-batch, from phi = theta.  Differentiable if called under autograd."""
    if cfg.backtrack:
        grad_value = _batch_map(tf.grad_and_value(task.G), vectorize, (0, None, None, 0, 0))
        value = _batch_map(task.G, vectorize, (0, None, None, 0, 0))
        return _backtracking_gd(
            cfg,
            theta,
            x.shape[0],
            lambda p: grad_value(p, theta, lam, x, y),
            lambda p: value(p, theta, lam, x, y),
        )
    gradG = _batch_map(tf.grad(task.G), vectorize, (0, None, None, 0, 0))
    return _fixed_step_gd(cfg, theta, x.shape[0], lambda p: gradG(p, theta, lam, x, y))


def _fixed_step_gd(cfg: InnerGD, theta: Params, B: int, grad: Callable[[Params], Params]) -> Params:
    """``cfg.steps`` steps of size ``cfg.lr`` from theta, a task frozen once ||grad G|| <= ``cfg.tol``.

    No in-place updates: differentiable through the path when ``grad`` is (`Unrolled`).
    """
    phi = {k: v.unsqueeze(0).expand(B, *v.shape) for k, v in theta.items()}
    active = torch.ones(B, dtype=torch.bool, device=next(iter(theta.values())).device)
    for _ in range(cfg.steps):
        g = grad(phi)
        if cfg.tol is not None:
            active = active & (_bnorm(g) > cfg.tol)
            if not bool(active.any()):
                break
            g = _bscale(active.to(next(iter(g.values())).dtype), g)
        phi = {k: phi[k] - cfg.lr * g[k] for k in phi}
    return phi


def _backtracking_gd(
    cfg: InnerGD,
    theta: Params,
    B: int,
    grad_value: Callable[[Params], tuple[Params, torch.Tensor]],
    value: Callable[[Params], torch.Tensor],
) -> Params:
    """GD with a per-task step size halved on every failed Armijo test (see `InnerGD.backtrack`)."""
    phi = {k: v.unsqueeze(0).expand(B, *v.shape).clone() for k, v in theta.items()}
    first = next(iter(theta.values()))
    step = torch.full((B,), cfg.lr, dtype=first.dtype, device=first.device)
    active = torch.ones(B, dtype=torch.bool, device=first.device)
    for _ in range(cfg.steps):
        g, G0 = grad_value(phi)
        gg = _bdot(g, g)
        if cfg.tol is not None:
            active = active & (gg.sqrt() > cfg.tol)
            if not bool(active.any()):
                break
        trial = _axpy(phi, -step, g)
        ok = active & (value(trial) <= G0 - 1e-4 * step * gg)
        phi = {k: torch.where(ok.view(-1, *([1] * (t.ndim - 1))), trial[k], t) for k, t in phi.items()}
        step = torch.where(ok | ~active, step, 0.5 * step)
    return phi


def _solve_inner(
    task: _Task,
    inner: InnerGD | InnerNewtonCG,
    theta: Params,
    lam: Lam,
    x: torch.Tensor,
    y: torch.Tensor,
    vectorize: bool,
    batched: BatchedModel | None,
) -> Params:
    """The inner answers phi of a meta-batch (leading dimension B), without an autograd graph."""
    with torch.no_grad():
        if isinstance(inner, InnerNewtonCG):
            return _inner_newton(task, inner, theta, lam, x, y)
        if batched is not None:
            return _inner_gd_batched(batched, task.loss, inner, theta, lam, x, y)
        return _inner_gd(task, inner, theta, lam, x, y, vectorize)


def _inner_newton(
    task: _Task, cfg: InnerNewtonCG, theta: Params, lam: Lam, x: torch.Tensor, y: torch.Tensor
) -> Params:
    from ..solvers import NewtonCG

    names = list(theta)
    B = x.shape[0]

    def objective(phi: tuple[torch.Tensor, ...], th: tuple[torch.Tensor, ...]) -> torch.Tensor:
        p = dict(zip(names, phi))
        t = dict(zip(names, th))
        return tf.vmap(task.G, in_dims=(0, None, None, 0, 0))(p, t, lam, x, y)

    init = tuple(theta[k].unsqueeze(0).expand(B, *theta[k].shape).clone() for k in names)
    solver = NewtonCG(newton_iters=cfg.newton_iters, cg_iters=cfg.cg_iters, batched=True)
    res = solver(objective, init, tuple(theta[k] for k in names))
    if res.status is SolverStatus.NONFINITE:
        raise FloatingPointError("imaml-hf: Newton-CG produced NaN or infinity in the inner solve")
    return dict(zip(names, res.x))


# ---------------------------------------------------------------------------------- batched path
# With a `BatchedModel`, B per-task models run in one call and one torch.autograd.grad of the
# summed task losses gives every task's gradient (the tasks share no parameters and batch
# statistics are per task).  Same quantities as the vmap path, tested to 1e-10 in float64.
def _task_losses(loss: LossFn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([loss(out[i], y[i]) for i in range(out.shape[0])])


def _or_zeros(like: Params, grads: tuple[torch.Tensor | None, ...]) -> Params:
    """Gradients by name, zeros where autograd returned None (an unused parameter)."""
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(like.items(), grads)}


def _grads(
    f: Callable[[Params, torch.Tensor], torch.Tensor],
    loss: LossFn,
    phi: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    create_graph: bool = False,
) -> tuple[Params, Params, torch.Tensor, torch.Tensor]:
    """(per-task gradients, the leaves they are taken at, per-task losses (B,), outputs (detached))."""
    leaves = {k: t.detach().requires_grad_(True) for k, t in phi.items()}
    with torch.enable_grad():
        out = f(leaves, x)
        per = _task_losses(loss, out, y)
        gs = torch.autograd.grad(
            per.sum(), list(leaves.values()), create_graph=create_graph, allow_unused=True
        )
    return _or_zeros(leaves, gs), leaves, per.detach(), out.detach()


def _grad_G_batched(
    bm: BatchedModel, loss: LossFn, phi: Params, theta: Params, lam: Lam, x: torch.Tensor, y: torch.Tensor
) -> tuple[Params, torch.Tensor]:
    g, _, per, _ = _grads(bm.fast, loss, phi, x, y)
    return {k: g[k] + _lam_of(lam, k) * (phi[k] - theta[k].unsqueeze(0)) for k in g}, per


def _inner_gd_batched(
    bm: BatchedModel, loss: LossFn, cfg: InnerGD, theta: Params, lam: Lam, x: torch.Tensor, y: torch.Tensor
) -> Params:
    """`_inner_gd` with the batched model (no autograd graph is kept)."""
    B = x.shape[0]
    if cfg.backtrack:

        def prox(p: Params) -> torch.Tensor:
            return sum(  # type: ignore[return-value]
                0.5 * _lam_of(lam, k) * ((p[k] - theta[k].unsqueeze(0)) ** 2).flatten(1).sum(1) for k in p
            )

        def grad_value(p: Params) -> tuple[Params, torch.Tensor]:
            g, per = _grad_G_batched(bm, loss, p, theta, lam, x, y)
            return g, per + prox(p)

        def value(p: Params) -> torch.Tensor:
            with torch.no_grad():
                return _task_losses(loss, bm.fast(p, x), y) + prox(p)

        return _backtracking_gd(cfg, theta, B, grad_value, value)
    return _fixed_step_gd(cfg, theta, B, lambda p: _grad_G_batched(bm, loss, p, theta, lam, x, y)[0])


def _query_batched(
    bm: BatchedModel, task: _Task, phi: Params, x: torch.Tensor, y: torch.Tensor, grad: bool
) -> tuple[Params | None, torch.Tensor, torch.Tensor]:
    """Query gradients (if ``grad``), losses and accuracies per task, first order (fused ops)."""
    if not bm.loop_large:
        if grad:
            g, _, per, out = _grads(bm.fast, task.loss, phi, x, y)
        else:
            g = None
            with torch.no_grad():
                out = bm.fast(phi, x)
                per = _task_losses(task.loss, out, y)
        return g, per, task.accuracy(out, y)
    grads: list[Params] = []
    losses, accs = [], []
    for i in range(x.shape[0]):
        p = {k: t[i].detach().requires_grad_(grad) for k, t in phi.items()}
        with torch.set_grad_enabled(grad):
            lq, acc = task.score(bm.single(p, x[i]), y[i])
        if grad:
            grads.append(_or_zeros(p, torch.autograd.grad(lq, list(p.values()), allow_unused=True)))
        losses.append(lq.detach())
        accs.append(acc)
    g_out = {k: torch.stack([gi[k] for gi in grads]) for k in phi} if grad else None
    return g_out, torch.stack(losses), torch.stack(accs)


def _support_hvp_batched(
    bm: BatchedModel, loss: LossFn, phi: Params, x: torch.Tensor, y: torch.Tensor
) -> Callable[[Params], Params]:
    """u -> Lhat''(phi) u per task: one retained graph of the gradient (exact norm), one backward per u."""
    g, leaves, _, _ = _grads(bm.exact, loss, phi, x, y, create_graph=True)
    names = [k for k in g if g[k].requires_grad]
    outs = [g[k] for k in names]
    ins = list(leaves.values())

    def hvp(u: Params) -> Params:
        if not outs:
            return {k: torch.zeros_like(t) for k, t in u.items()}
        hs = torch.autograd.grad(outs, ins, [u[k] for k in names], retain_graph=True, allow_unused=True)
        return _or_zeros(leaves, hs)

    return hvp


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
        vectorize: vmap over tasks (``True``) or loop.
        diagnostics: measure ||grad G|| and the support loss at phi (one more gradient
            per task); ``False`` reports them as NaN.
        batched: the `BatchedModel` of ``model`` (`bilevel.metalearn.batched_model`): the
            inner steps, query gradients and HVPs then run the B tasks' models in one call
            with plain autograd, not ``torch.func``; same result, faster on CPU.  For
            `Unrolled` (MAML) the inner steps stay in the autograd graph (``create_graph``).

    Returns:
        ``(grad, lam_grad, stats)``: the mean meta-gradient by name (like ``theta``),
        the gradient with respect to a learned ``lam`` (``None`` if ``lam`` is not a
        tensor or dict of tensors) and the per-task `MetaStats`.
    """
    task = _Task(model, loss, classification)
    lam_v: Lam = algo.lam if lam is None else lam
    learn_lam = isinstance(lam_v, torch.Tensor) or isinstance(lam_v, dict)
    if learn_lam and not isinstance(algo.meta_gradient, Implicit):
        raise ValueError("a learned lam needs the Implicit meta-gradient (iMAML)")
    xs, ys, xq, yq = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    B = xs.shape[0]
    query = _batch_map(task.query, vectorize, (0, 0, 0))
    lam_det: Lam = (
        {k: v.detach() for k, v in lam_v.items()}
        if isinstance(lam_v, dict)
        else (lam_v.detach() if isinstance(lam_v, torch.Tensor) else lam_v)
    )

    if isinstance(algo.meta_gradient, Unrolled):
        assert isinstance(algo.inner, InnerGD)  # guaranteed by MetaAlgorithm

        def meta_loss(th: Params) -> tuple[torch.Tensor, tuple[Params, torch.Tensor, torch.Tensor]]:
            phi = _inner_gd(task, algo.inner, th, lam_det, xs, ys, vectorize)  # type: ignore[arg-type]
            ql, qa = query(phi, xq, yq)
            return ql.mean(), (phi, ql.detach(), qa.detach())

        th = {k: v.detach() for k, v in theta.items()}
        if batched is not None:
            grads, (phi, ql, qa) = _unrolled_batched(batched, task, algo.inner, th, lam_det, batch)
        else:
            grads, (phi, ql, qa) = tf.grad(meta_loss, has_aux=True)(th)
        phi = {k: v.detach() for k, v in phi.items()}
        stats_extra = (torch.full((B,), float("nan")), torch.zeros(B, dtype=torch.bool), torch.zeros(B))
        stats = _stats(task, phi, th, lam_det, batch, ql, qa, stats_extra, vectorize, diagnostics, batched)
        return grads, None, stats

    theta_d = {k: v.detach() for k, v in theta.items()}
    phi = _solve_inner(task, algo.inner, theta_d, lam_det, xs, ys, vectorize, batched)
    phi = {k: v.detach() for k, v in phi.items()}

    if batched is not None:
        v, ql, qa = _query_batched(batched, task, phi, xq, yq, grad=True)
        assert v is not None
    else:

        def query_grad(
            p: Params, x: torch.Tensor, y: torch.Tensor
        ) -> tuple[Params, tuple[torch.Tensor, torch.Tensor]]:
            lq, acc = task.query(p, x, y)
            return lq, (lq, acc)  # type: ignore[return-value]

        v, (ql, qa) = _batch_map(tf.grad(query_grad, has_aux=True), vectorize, (0, 0, 0))(phi, xq, yq)
    nan = torch.full((B,), float("nan"), device=xs.device)
    no = torch.zeros(B, dtype=torch.bool, device=xs.device)
    zero = torch.zeros(B, device=xs.device)
    lam_grad: dict[str, torch.Tensor] | None = None

    if isinstance(algo.meta_gradient, FirstOrder):
        g, extra = v, (nan, no, zero)
    elif isinstance(algo.meta_gradient, ReptileStep):
        g, extra = {k: theta_d[k].unsqueeze(0) - phi[k] for k in phi}, (nan, no, zero)
    else:
        hvp = (
            _support_hvp_batched(batched, loss, phi, xs, ys)
            if batched is not None
            else _support_hvp(task, phi, xs, ys, vectorize)
        )
        g, extra = _cg(algo.meta_gradient, lam_det, v, hvp)
        if learn_lam:
            lam_grad = _lam_gradient(phi, theta_d, g, lam_det, not isinstance(lam_v, dict))
    mean_g = {k: t.mean(0) for k, t in g.items()}
    stats = _stats(task, phi, theta_d, lam_det, batch, ql, qa, extra, vectorize, diagnostics, batched)
    return mean_g, lam_grad, stats


def _lam_gradient(phi: Params, theta: Params, g: Params, lam: Lam, shared: bool) -> dict[str, torch.Tensor]:
    # d phi*/d lam_k = -H_G^-1 (phi_k - theta_k) restricted to block k, so
    # dL/dlam_k = -(phi_k - theta_k) . w_k with w = H_G^-1 v = g / lam.
    out: dict[str, torch.Tensor] = {}
    for k in phi:
        contrib = -((phi[k] - theta[k].unsqueeze(0)) * g[k]).flatten(1).sum(1).mean() / _lam_of(lam, k)
        key = "lam" if shared else k
        out[key] = out.get(key, 0.0) + contrib
    return out


def _unrolled_batched(
    bm: BatchedModel, task: _Task, cfg: InnerGD, theta: Params, lam: Lam, batch: Task
) -> tuple[Params, tuple[Params, torch.Tensor, torch.Tensor]]:
    """MAML with plain autograd: inner GD steps kept in the graph (``create_graph``) through the exact
    batched model, query losses through the fused per-task model (differentiated once), one backward."""
    names = list(theta)
    th = {k: theta[k].detach().requires_grad_(True) for k in names}
    B = batch.support_x.shape[0]

    def grad_G(p: Params) -> Params:
        per = _task_losses(task.loss, bm.exact(p, batch.support_x), batch.support_y)
        gs = torch.autograd.grad(per.sum(), list(p.values()), create_graph=True)
        return {k: g + _lam_of(lam, k) * (p[k] - th[k]) for k, g in zip(names, gs)}

    with torch.enable_grad():
        phi = _fixed_step_gd(cfg, th, B, grad_G)
        scores = [
            task.score(bm.single({k: t[i] for k, t in phi.items()}, batch.query_x[i]), batch.query_y[i])
            for i in range(B)
        ]
        ql = torch.stack([lq for lq, _ in scores])
        grads = torch.autograd.grad(ql.mean(), list(th.values()), allow_unused=True)
    qa = torch.stack([acc for _, acc in scores])
    return _or_zeros(th, grads), ({k: t.detach() for k, t in phi.items()}, ql.detach(), qa)


def _support_hvp(
    task: _Task, phi: Params, xs: torch.Tensor, ys: torch.Tensor, vectorize: bool
) -> Callable[[Params], Params]:
    """u -> Lhat''(phi) u per task, by the per-task model (vmap or loop).

    The forward pass and the first backward pass of grad Lhat are computed once
    (``torch.func.vjp``) and reused by every HVP: each CG step costs one extra backward pass.
    """
    grad_support = _batch_map(tf.grad(task.support_loss), vectorize, (0, 0, 0))
    _, vjp = tf.vjp(lambda p: grad_support(p, xs, ys), phi)[:2]
    return lambda u: vjp(u)[0]


def _cg(
    cfg: Implicit, lam: Lam, v: Params, hvp_support: Callable[[Params], Params]
) -> tuple[Params, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-task CG on H_G w = v with H_G = Lhat'' + (1 + damping) Lam, batched; returns g = Lam w.

    Solving in w (the Hessian of G itself) keeps the system symmetric for a per-tensor lam;
    g = lam w is the task meta-gradient.  Diagnostics: (residual norm, negative curvature met,
    iterations), each of shape (B,).
    """
    first = next(iter(v.values()))
    B = first.shape[0]
    d = 1.0 + cfg.damping

    def H(u: Params) -> Params:
        hu = hvp_support(u)
        return {k: hu[k] + d * _lam_of(lam, k) * u[k] for k in u}

    x = (
        {k: v[k] / (d * _lam_of(lam, k)) for k in v}
        if cfg.warm_start
        else {k: torch.zeros_like(t) for k, t in v.items()}
    )
    r = {k: v[k] - t for k, t in H(x).items()} if cfg.warm_start else dict(v)
    p = dict(r)
    rr = _bdot(r, r)
    alive = torch.ones(B, dtype=torch.bool, device=first.device)
    neg = torch.zeros(B, dtype=torch.bool, device=first.device)
    iters = torch.zeros(B, device=first.device)
    # Below this the residual is rounding noise: stop that task (no spurious negative curvature
    # from an underflowing p'Hp).
    floor = (1e-3 * torch.finfo(rr.dtype).eps) ** 2 * _bdot(v, v) + torch.finfo(rr.dtype).tiny
    for _ in range(cfg.cg_iters):
        Hp = H(p)
        pHp = _bdot(p, Hp)
        neg_now = alive & (pHp <= 0)
        neg |= neg_now
        alive = alive & ~neg_now & (rr > floor)
        if not bool(alive.any()):
            break
        alpha = torch.where(alive, rr / torch.where(alive, pHp, torch.ones_like(pHp)), torch.zeros_like(rr))
        x = _axpy(x, alpha, p)
        r = _axpy(r, -alpha, Hp)
        rr_new = _bdot(r, r)
        beta = torch.where(alive, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = _axpy(r, beta, p)
        rr = torch.where(alive, rr_new, rr)
        iters += alive.float()
    g = {k: _lam_of(lam, k) * x[k] for k in x}  # g = lam w: the meta-gradient
    return g, (rr.sqrt(), neg, iters)


def _stats(
    task: _Task,
    phi: Params,
    theta: Params,
    lam: Lam,
    batch: Task,
    ql: torch.Tensor,
    qa: torch.Tensor,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    vectorize: bool,
    diagnostics: bool,
    batched: BatchedModel | None,
) -> MetaStats:
    res, neg, iters = extra
    B = ql.shape[0]
    if not diagnostics:
        nan = torch.full((B,), float("nan"), device=ql.device)
        return MetaStats(ql, qa, nan, nan, res, neg, iters)
    th = {k: v.detach() for k, v in theta.items()}
    xs, ys = batch.support_x, batch.support_y
    if batched is not None:
        gG, sl = _grad_G_batched(batched, task.loss, phi, th, lam, xs, ys)
        return MetaStats(ql, qa, sl, _bnorm(gG), res, neg, iters)
    with torch.no_grad():
        gradG = _batch_map(tf.grad(task.G), vectorize, (0, None, None, 0, 0))
        gn = _bnorm(gradG(phi, th, lam, xs, ys))
        sl = _batch_map(task.support_loss, vectorize, (0, 0, 0))(phi, xs, ys)
    return MetaStats(ql, qa, sl, gn, res, neg, iters)


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
        batched: run inner GD with this `BatchedModel` of ``model`` (see `meta_gradient`).

    Returns:
        phi by name, every tensor with the leading dimension B.
    """
    task = _Task(model, loss, True)
    lam_v: Lam = algo.lam if lam is None else lam
    if isinstance(lam_v, dict):
        lam_v = {k: v.detach() for k, v in lam_v.items()}
    elif isinstance(lam_v, torch.Tensor):
        lam_v = lam_v.detach()
    theta_d = {k: v.detach() for k, v in theta.items()}
    return _solve_inner(task, algo.inner, theta_d, lam_v, support_x, support_y, vectorize, batched)


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
    task = _Task(model, loss, classification)
    phi = adapt(
        algo,
        model,
        loss,
        theta,
        batch.support_x,
        batch.support_y,
        lam=lam,
        vectorize=vectorize,
        batched=batched,
    )
    if batched is not None:
        _, ql, qa = _query_batched(batched, task, phi, batch.query_x, batch.query_y, grad=False)
        return ql, qa
    with torch.no_grad():
        ql, qa = _batch_map(task.query, vectorize, (0, 0, 0))(phi, batch.query_x, batch.query_y)
    return ql, qa
