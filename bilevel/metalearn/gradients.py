"""How the task meta-gradient g_i is formed at the inner answers: a value whose ``apply`` says how.

Like Optimistix's ``adjoint.apply``, iMAML, MAML and first-order MAML differ in this one value:

===============  =================================================================
`Implicit`        iMAML: `bilevel.implicit_argmin` with ``batched=True``: the B Hessian
                  systems (I + Lhat''(phi_i)/lam) g_i = grad L_i(phi_i) are solved by the
                  library's batched `bilevel.CG` (``cg_iters`` steps, per-task status).
                  The inner solver's path is not stored.
`Unrolled`        MAML: `GradientDescent(differentiable=True)`: autograd through every
                  inner step (memory grows with steps).
`FirstOrder`      first-order MAML: the inner solve alone; g_i = grad L_i(phi_i).
`ReptileStep`     Reptile: the inner solve alone; g_i = theta - phi_i.
`HeadOnly`        ANIL: MAML's unrolled path through the head alone (the last linear
                  layer); the body's features are computed once per task.
`LearnedSteps`    Meta-SGD: the unrolled path of GD with a learned step size per
                  parameter entry, meta-learned with theta (``"lr:<name>"`` entries).
`ReleasedCG`      the authors' released iMAML code (``imaml-released``; NOT the paper's
                  method): its own inner loop (GD on the support loss, then a pull-back step
                  toward theta), then CG from 0 on
                  ((1 + damping) I + Lhat''(phi_i)/(lam + 10)) g_i = grad L_i(phi_i).
===============  =================================================================

Each kind also says which inner solvers it can use (``check``) and how it forms the inner answers
(``inner_answers``; adaptation at evaluation uses the same).

CG starts from 0 as in the paper.  ``Implicit(warm_start=True)`` (``--cg-warm-start``) starts from
g = grad L_i(phi_i), the first-order gradient, so that 0 CG steps are exactly first-order MAML
(Appendix A), at the price of one more HVP (the initial residual).  At equal HVPs the start from 0
is the more accurate (for a positive definite system CG from 0 is optimal in the energy norm over a
Krylov space that holds the warm start's iterate): measured on 16 Omniglot tasks at a trained theta,
float64, against a converged solve, median relative errors 0.153 (from 0, 6 steps) vs 0.190 (warm,
5 steps) at 6 HVPs and 0.240 vs 0.272 at 5 (lam 2).

Deviations from the paper, each measured and switchable:

* Early in meta-training the support loss of a CNN with batch norm on 5 images is far from convex
  (Hessian eigenvalues below -40 at a random theta, measured), so I + Lhat''/lam can be indefinite
  and CG can meet negative curvature.  CG then stops for that task and keeps its last iterate
  (truncated CG, as in Steihaug's method); the event is counted in `MetaStats.negative_curvature`,
  never hidden.
* ``Implicit(damping=d)`` solves ((1 + d) I + Lhat''/lam) g = v (`bilevel.Damped`), the damped
  system of the authors' released code; the paper's system is ``d = 0``.  A learned lam (one
  shared, or one per tensor) gets its gradient from the same damped solve, as theta does:
  dL/dlam_k = -<w, phi - theta> over tensor k, w = (Lhat'' + (1 + d) lam)^-1 grad L(phi), which
  is the exact derivative only at ``d = 0`` (tested against dense solves with and without).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Union

import torch

import bilevel as bl
from bilevel.internal import check_positive
from bilevel.solvers import GradientDescent

from .batched import task_losses
from .heads import HeadSplit, split_head
from .metabatch import (
    GRADIENT_ONLY,
    INNER_SOLVERS,
    STEP_PREFIX,
    InnerSolver,
    MetaBatch,
    Params,
    batched_solver,
    check_task_rows,
    checked,
    divergence_remedies,
    or_zeros,
)
from .proximal import ProximalWeight, coerce

__all__ = [
    "NO_STEP",
    "FirstOrder",
    "HeadOnly",
    "Implicit",
    "LearnedSteps",
    "MetaAlgorithm",
    "MetaGradientKind",
    "Outcome",
    "ReleasedCG",
    "ReptileStep",
    "Unrolled",
]

#: What a NaN in the tasks' query losses or gradients means.
_QUERY_NAN = "the adapted model's query loss is not finite there: check those tasks' query data and the model"


@dataclasses.dataclass
class Outcome:
    """What a meta-gradient kind returns: per-task sums of gradients and the inner answers."""

    grad: Params  # sum over tasks
    lam_grad: dict[str, torch.Tensor] | None  # sum over tasks
    phi: torch.Tensor  # (B, n) flat, detached
    query_loss: torch.Tensor  # (B,)
    query_acc: torch.Tensor  # (B,)
    inner: bl.SolverResult
    cg: bl.LinearSolveResult | None = None
    #: the columns [start, stop) of phi that the inner loop adapts (ANIL's head); None: all
    adapted: tuple[int, int] | None = None


def _solver_of_g(kind: str, inner: Any) -> None:
    """Refuse an inner value that is not a batched `bilevel.solvers` solver of G."""
    if not isinstance(inner, INNER_SOLVERS):
        names = ", ".join(t.__name__ for t in INNER_SOLVERS)
        raise TypeError(f"MetaAlgorithm: {kind} takes a bilevel.solvers instance ({names}), not {inner!r}")


@dataclasses.dataclass(frozen=True)
class Implicit:
    """iMAML's meta-gradient: CG on (I + Lhat''/lam) g = grad L(phi), through `bilevel.implicit_argmin`.

    Args:
        cg_iters: CG iterations (5 in the paper).
        damping: solve ((1 + damping) I + Lhat''/lam) g = v; 0 is the paper's system.
        warm_start: start CG from v (so 0 iterations = first-order MAML; one more HVP);
            ``False`` (the paper's) starts from 0.
    """

    #: whether a learned lam gets its gradient (Lemma 1 in theta and lam alike)
    learns_lam: ClassVar[bool] = True

    cg_iters: int = 5
    damping: float = 0.0
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.cg_iters < 0:
            raise ValueError(f"Implicit(cg_iters={self.cg_iters}): cg_iters must be >= 0")
        if not self.damping >= 0:
            raise ValueError(f"Implicit(damping={self.damping}): damping must be >= 0")

    def meta_parameters(self, theta: Params) -> Params:
        """Meta-parameters beyond theta: none."""
        return {}

    def check(self, inner: InnerSolver, lam: float) -> None:
        """Refuse what Lemma 1 does not cover: lam <= 0, or an inner value that is not a solver of G."""
        _solver_of_g("Implicit", inner)
        if not lam > 0:
            raise ValueError(f"MetaAlgorithm(lam={lam}): Implicit needs lam > 0")

    def inner_answers(self, inner: InnerSolver, mb: MetaBatch) -> bl.SolverResult:
        """The B inner answers (no graph): ``inner`` minimizes G."""
        return mb.minimize(inner)

    def policy(self, lam: float | torch.Tensor) -> bl.ImplicitPolicy:
        """The implicit layer's policy for the B tasks at proximal weight ``lam`` (a float or the (n,) row).

        A fixed budget of ``cg_iters`` CG steps, counted as done, never as a failure (the paper's
        method); no optimality check and no residual measured (the inner answers are checked by the
        meta-batch); damping adds ``damping * lam`` to the Hessian; a warm start begins CG at
        ``v / ((1 + damping) lam)``, the solution where Lhat'' = 0.
        """
        d = 1.0 + self.damping
        return bl.ImplicitPolicy(
            hvp=bl.Damped(self.damping * lam) if self.damping > 0 else None,
            linear_solver=bl.CG(max_iter=self.cg_iters, rtol=0.0, atol=0.0, check_residual=False),
            optimality_tol=None,
            throw=False,
            warn=False,
            measure_residual=False,
            backward_x0=(lambda b: b / (d * lam)) if self.warm_start else None,
            batched=True,
        )

    def apply(self, inner: InnerSolver, mb: MetaBatch) -> Outcome:
        theta = {k: v.detach().requires_grad_(True) for k, v in mb.theta.items()}
        tree = {**theta, **mb.lam_tree()}
        fast = mb.objective(exact=False, gradients_only=isinstance(inner, GRADIENT_ONLY))
        solver = batched_solver(inner, mb.weight)
        remedies = divergence_remedies(inner, mb.weight, fixed_path=False)

        def solve(_exact: Any, init: torch.Tensor, th: Params) -> bl.SolverResult:
            # The inner steps use the fast model; the layer linearizes the exact one.
            return checked(solver(fast, init, th), remedies)

        with torch.enable_grad():
            X, info = bl.implicit_argmin(
                mb.objective(exact=True),
                mb.init(),
                tree,
                solve,
                policy=self.policy(mb.lam_fixed),
                return_info=True,
            )
            # v_i = grad L_i(phi_i), first order, then back through the layer: each task's
            # right-hand side is its own query gradient, so the CG residuals are in its units.
            v, ql, qa = mb.query_gradients(X)
            grads = torch.autograd.grad(X, list(tree.values()), grad_outputs=v, allow_unused=True)
        g = or_zeros(tree, grads)
        assert info.solver_result is not None and info.last_backward is not None
        lam_grad = mb.weight.lam_grad({k: g[k] for k in tree if k not in theta})
        return Outcome(
            {k: g[k] for k in theta}, lam_grad, X.detach(), ql, qa, info.solver_result, info.last_backward
        )


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """MAML: differentiate through the inner GD path (`GradientDescent(differentiable=True)`)."""

    #: whether a learned lam gets its gradient (Lemma 1 in theta and lam alike)
    learns_lam: ClassVar[bool] = False

    def meta_parameters(self, theta: Params) -> Params:
        """Meta-parameters beyond theta: none."""
        return {}

    def check(self, inner: InnerSolver, lam: float) -> None:
        """Refuse an inner solver whose path cannot be unrolled: anything but fixed-step GD."""
        if not isinstance(inner, GradientDescent):
            raise ValueError(
                "MetaAlgorithm: Unrolled (MAML) needs GradientDescent; a line search or trust region "
                f"cannot be unrolled, not {type(inner).__name__}"
            )
        if inner.tol:
            raise ValueError("MetaAlgorithm: Unrolled (MAML) needs GradientDescent(tol=0): a fixed path")
        if inner.line_search is not None:
            raise ValueError(
                "MetaAlgorithm: Unrolled (MAML) needs GradientDescent(line_search=None): a fixed inner path"
            )

    def inner_answers(self, inner: InnerSolver, mb: MetaBatch) -> bl.SolverResult:
        """The B inner answers (no graph): the same GD path, not unrolled."""
        return mb.minimize(inner, fixed_path=True)

    def apply(self, inner: InnerSolver, mb: MetaBatch) -> Outcome:
        leaf, theta = mb.theta_leaf()
        solver = batched_solver(inner, mb.weight, differentiable=True)
        with torch.enable_grad():
            res = checked(
                solver(mb.objective(exact=True), mb.init(leaf), theta),
                divergence_remedies(inner, mb.weight, fixed_path=True),
            )
            X: torch.Tensor = res.x  # type: ignore[assignment]
            ql, qa = mb.query(X)
            # the unrolled gradient sums the tasks': a NaN query loss names its task first
            check_task_rows("the query losses", ql, _QUERY_NAN)
            (grad,) = torch.autograd.grad(ql.sum(), leaf, allow_unused=True, materialize_grads=True)
        return Outcome(mb.tree(grad), None, X.detach(), ql.detach(), qa, res)


@dataclasses.dataclass(frozen=True)
class FirstOrder:
    """First-order MAML: the query gradient at phi_i, taken as the meta-gradient."""

    #: whether a learned lam gets its gradient (Lemma 1 in theta and lam alike)
    learns_lam: ClassVar[bool] = False

    def meta_parameters(self, theta: Params) -> Params:
        """Meta-parameters beyond theta: none."""
        return {}

    def check(self, inner: InnerSolver, lam: float) -> None:
        _solver_of_g("FirstOrder", inner)

    def inner_answers(self, inner: InnerSolver, mb: MetaBatch) -> bl.SolverResult:
        return mb.minimize(inner)

    def apply(self, inner: InnerSolver, mb: MetaBatch) -> Outcome:
        res = self.inner_answers(inner, mb)
        X: torch.Tensor = res.x  # type: ignore[assignment]
        v, ql, qa = mb.query_gradients(X)
        check_task_rows("the query gradients", v, _QUERY_NAN)
        return Outcome(mb.tree(v.sum(0)), None, X, ql, qa, res)


@dataclasses.dataclass(frozen=True)
class ReptileStep:
    """Reptile: theta - phi_i, taken as the meta-gradient (Nichol et al. 2018)."""

    #: whether a learned lam gets its gradient (Lemma 1 in theta and lam alike)
    learns_lam: ClassVar[bool] = False

    def meta_parameters(self, theta: Params) -> Params:
        """Meta-parameters beyond theta: none."""
        return {}

    def check(self, inner: InnerSolver, lam: float) -> None:
        _solver_of_g("ReptileStep", inner)

    def inner_answers(self, inner: InnerSolver, mb: MetaBatch) -> bl.SolverResult:
        return mb.minimize(inner)

    def apply(self, inner: InnerSolver, mb: MetaBatch) -> Outcome:
        res = self.inner_answers(inner, mb)
        X: torch.Tensor = res.x  # type: ignore[assignment]
        with torch.no_grad():
            ql, qa = mb.query(X)
        grad = mb.tree(mb.B * mb.theta_flat - X.sum(0))
        return Outcome(grad, None, X, ql, qa, res)


@dataclasses.dataclass(frozen=True)
class ReleasedCG:
    """The meta-gradient of the authors' released iMAML code; NOT the paper's Algorithm 2.

    Its inner loop (`inner_answers`) does NOT minimize G: ``max_iter`` plain GD steps of ``lr`` on
    the support loss alone (no proximal term) from theta, then one GD step of ``lr`` on the
    proximal term lam/2 ||phi - theta||^2 alone: phi <- theta + (1 - lr lam) (phi - theta) (0.8
    at the released lr 0.1, lam 2).  This is ``learn_task`` followed by the "pull back for
    regularization" step of aravindr93/imaml_dev, ``examples/omniglot_implicit_maml.py``; with
    lam = 0 (how that code evaluates) it is plain GD on the support loss.  Hence the inner solver
    must be fixed-step `GradientDescent`, whose ``lr`` the pull-back step shares.

    At that inner answer phi_i, CG from 0 for ``cg_iters`` steps on

        ((1 + damping) I + Lhat_i''(phi_i) / (lam + lam_damping)) g_i = grad L_i(phi_i),

    Lhat_i'' the Hessian of the support loss alone; g_i is the task meta-gradient (no cross
    term).  Released defaults: ``damping`` 1 (``--cg_damping``), ``lam_damping`` 10
    (``Learner.matrix_evaluator``), so at lam 2 the system is (2 I + H / 12) g = v.

    Args:
        cg_iters: CG steps (5 released).
        damping: ``regu_coef`` of the released code.
        lam_damping: added to lam in the Hessian's weight.
    """

    #: whether a learned lam gets its gradient (Lemma 1 in theta and lam alike)
    learns_lam: ClassVar[bool] = False

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

    def meta_parameters(self, theta: Params) -> Params:
        """Meta-parameters beyond theta: none."""
        return {}

    def check(self, inner: InnerSolver, lam: float) -> None:
        """Refuse an inner solver other than the released code's fixed-step GD loop."""
        if not isinstance(inner, GradientDescent) or inner.line_search is not None:
            raise ValueError(
                "MetaAlgorithm: ReleasedCG runs the released code's inner loop (fixed-step GD on the support "
                "loss, then the pull-back step; it does not minimize G): give "
                f"GradientDescent(lr=..., max_iter=..., tol=0), not {inner!r}"
            )

    def inner_answers(self, inner: InnerSolver, mb: MetaBatch) -> bl.SolverResult:
        """``max_iter`` GD steps on the support losses, then the pull-back step (flat (B, n), no graph)."""
        res = mb.minimize(inner, prox=False, fixed_path=True)
        lr: float = inner.lr  # type: ignore[union-attr]  # GradientDescent (check)
        X: torch.Tensor = res.x  # type: ignore[assignment]
        with torch.no_grad():
            t = mb.theta_flat
            X = t + (1.0 - lr * mb.lam_fixed) * (X - t)
        return res.replace(x=X)

    def apply(self, inner: InnerSolver, mb: MetaBatch) -> Outcome:
        res = self.inner_answers(inner, mb)
        X: torch.Tensor = res.x  # type: ignore[assignment]
        v, ql, qa = mb.query_gradients(X)
        hvp = mb.hvp(X, prox=False)
        # lam is a number here: meta_gradient refuses a learned lam with any kind but Implicit
        weight = 1.0 / (mb.lam_fixed + self.lam_damping)
        d = 1.0 + self.damping

        def matvec(V: torch.Tensor) -> torch.Tensor:
            return d * V + weight * hvp(V)

        check_task_rows("the query gradients", v, _QUERY_NAN)
        cg = bl.CG(max_iter=self.cg_iters, rtol=0.0, atol=0.0, check_residual=False)(matvec, v)
        # a fixed budget (BUDGET) is what was asked for; a task whose CG is NaN is named
        check_task_rows(
            "the CG solutions", cg.x, "the support loss's Hessian is NaN or infinite at those tasks' answers"
        )
        return Outcome(mb.tree(cg.x.sum(0)), None, X, ql, qa, res, cg)


def _fixed_gd(kind: str, inner: InnerSolver, lam: float) -> None:
    """Refuse an inner solver whose path cannot be unrolled (anything but fixed-step GD), or lam != 0."""
    if not isinstance(inner, GradientDescent) or inner.tol or inner.line_search is not None:
        raise ValueError(
            f"MetaAlgorithm: {kind} differentiates through a fixed inner path: give "
            f"GradientDescent(lr=..., max_iter=..., tol=0.0, line_search=None), not {inner!r}"
        )
    if lam != 0:
        raise ValueError(f"MetaAlgorithm(lam={lam}): {kind} adapts on the support loss alone; lam must be 0")


@dataclasses.dataclass(frozen=True)
class HeadOnly:
    """ANIL (Raghu et al. 2020): MAML's unrolled meta-gradient with the inner loop on the head alone.

    The inner GD (``inner.max_iter`` fixed steps of ``inner.lr``) adapts only the head, the last
    linear layer; the body stays at theta.  The body's features of each task's support and query
    sets are computed once (`bilevel.metalearn.heads`: the model run with an identity head), and
    the inner loop runs on ``features @ W.T + b``.  The meta-gradient is autograd through that
    path, in every parameter: exactly MAML's with the body's inner steps frozen.

    Args:
        head: the head module's name (``"head"`` of a `ConvNet`); ``None``: the module owning the
            model's last parameter (the last ``Linear`` of the package's `ConvNet` and `MLP`).
    """

    #: whether a learned lam gets its gradient (Lemma 1 in theta and lam alike)
    learns_lam: ClassVar[bool] = False

    head: str | None = None

    def __post_init__(self) -> None:
        if self.head is not None and (not isinstance(self.head, str) or not self.head):
            raise ValueError(
                f"HeadOnly(head={self.head!r}): name the head module (e.g. 'head'), or None for the "
                "last layer"
            )

    def meta_parameters(self, theta: Params) -> Params:
        """Meta-parameters beyond theta: none."""
        return {}

    def check(self, inner: InnerSolver, lam: float) -> None:
        """Refuse an inner solver other than fixed-step GD, or a proximal term."""
        _fixed_gd("HeadOnly (ANIL)", inner, lam)

    def _adapt(
        self, inner: InnerSolver, mb: MetaBatch, theta: Params, *, differentiable: bool
    ) -> tuple[HeadSplit, bl.SolverResult, Params]:
        """The B adapted heads (B, head size) with the split and the body; a graph in theta if
        ``differentiable``."""
        split = split_head(self.head, mb.names, mb.shapes)
        body = split.body(theta)
        fs = split.features_of(mb.bm, body, mb.batch.support_x)
        init = split.flat_head(theta).unsqueeze(0).expand(mb.B, -1)
        with torch.no_grad():  # the model's outputs at theta must be its head's on these features
            split.check_against(mb.bm.outputs(mb.unflat(mb.init()), mb.batch.support_x), fs, init)
        ys = mb.batch.support_y

        def G(H: torch.Tensor, _th: Params) -> torch.Tensor:
            return task_losses(mb.loss, split.outputs_of(fs, H), ys)

        solver = batched_solver(inner, mb.weight, differentiable=differentiable)
        res = checked(solver(G, init, theta), divergence_remedies(inner, None, fixed_path=True))
        return split, res, body

    def _full(self, mb: MetaBatch, split: HeadSplit, H: torch.Tensor) -> torch.Tensor:
        """phi (B, n), detached: theta with the adapted heads in their columns."""
        X = mb.init().clone()
        X[:, split.start : split.stop] = H.detach()
        return X

    def inner_answers(self, inner: InnerSolver, mb: MetaBatch) -> bl.SolverResult:
        """The B inner answers (no graph): theta with each task's adapted head."""
        split, res, _ = self._adapt(inner, mb, mb.theta, differentiable=False)
        return res.replace(x=self._full(mb, split, res.x))  # type: ignore[arg-type]

    def apply(self, inner: InnerSolver, mb: MetaBatch) -> Outcome:
        theta = {k: v.detach().requires_grad_(True) for k, v in mb.theta.items()}
        with torch.enable_grad():
            split, res, body = self._adapt(inner, mb, theta, differentiable=True)
            H: torch.Tensor = res.x  # type: ignore[assignment]
            out = split.outputs_of(split.features_of(mb.bm, body, mb.batch.query_x), H)
            ql = task_losses(mb.loss, out, mb.batch.query_y)
            check_task_rows("the query losses", ql, _QUERY_NAN)
            grads = torch.autograd.grad(ql.sum(), list(theta.values()), allow_unused=True)
        qa = mb.accuracy(out, mb.batch.query_y)
        X = self._full(mb, split, H)
        return Outcome(
            or_zeros(theta, grads), None, X, ql.detach(), qa, res, adapted=(split.start, split.stop)
        )


#: why Meta-SGD does not meta-train without an inner step
NO_STEP = (
    "Meta-SGD with 0 inner steps never uses its learned step sizes, so they would get no gradient and "
    "stay at their start: take at least one inner step"
)


@dataclasses.dataclass(frozen=True)
class LearnedSteps:
    """Meta-SGD (Li et al. 2017): GD with a learned step size per parameter entry, unrolled.

    The inner loop takes ``inner.max_iter`` steps phi <- phi - alpha * grad Lhat(phi) (elementwise
    product; one step in the paper) from theta; alpha, shaped like theta, is a meta-parameter:
    the theta tree carries it under ``"lr:<name>"`` (`bilevel.metalearn.metabatch.STEP_PREFIX`),
    `meta_parameters` gives its initial value and the meta-gradient holds its gradient, by
    autograd through the path (like MAML's).  ``inner.lr`` is not used by the path.

    Args:
        init_lr: every step size's initial value (finite, > 0); learn2learn's examples start at
            0.5 (Omniglot) and 0.01 (sinusoid), and Li et al. draw it uniformly in [0.005, 0.1].
    """

    #: whether a learned lam gets its gradient (Lemma 1 in theta and lam alike)
    learns_lam: ClassVar[bool] = False

    init_lr: float = 0.1

    def __post_init__(self) -> None:
        check_positive("LearnedSteps", "init_lr", self.init_lr)

    def meta_parameters(self, theta: Params) -> Params:
        """The learned step sizes at their start: ``init_lr`` per entry, under ``"lr:<name>"``."""
        return {STEP_PREFIX + k: torch.full_like(v.detach(), float(self.init_lr)) for k, v in theta.items()}

    def check(self, inner: InnerSolver, lam: float) -> None:
        """Refuse an inner solver other than fixed-step GD, or a proximal term.  (No inner step is
        allowed here, to evaluate theta itself; `apply` refuses it for meta-training.)"""
        _fixed_gd("LearnedSteps (Meta-SGD)", inner, lam)

    def _steps(self, mb: MetaBatch) -> Params:
        missing = [k for k in mb.names if k not in mb.step_sizes]
        if missing:
            raise bl.StructureError(
                f"LearnedSteps (Meta-SGD): theta has no learned step sizes {STEP_PREFIX}{missing[0]!r} "
                f"(of {len(missing)} parameters): add MetaAlgorithm.meta_parameters(theta) to theta"
            )
        return {k: mb.step_sizes[k] for k in mb.names}

    def _path(
        self, inner: InnerSolver, mb: MetaBatch, X: torch.Tensor, alpha: torch.Tensor, graph: bool
    ) -> bl.SolverResult:
        """``max_iter`` steps X <- X - alpha * grad Lhat(X) of the B tasks; the graph of each if ``graph``."""
        steps: int = inner.max_iter  # type: ignore[union-attr]  # GradientDescent (check)
        G = mb.objective(exact=graph, prox=False, gradients_only=not graph)
        th = mb.theta_values()
        with torch.enable_grad():
            for _ in range(steps):
                Xk = X if graph else X.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(
                    G(Xk, th).sum(), Xk, create_graph=graph, allow_unused=True, materialize_grads=True
                )
                X = Xk - alpha * g if graph else (Xk - alpha * g).detach()
        check_task_rows(
            "the inner answers",
            X,
            "the learned step sizes made the inner loop diverge there: lower the initial step size "
            "(init_lr, --inner-lr) or the meta learning rate",
        )
        B = mb.B
        return bl.SolverResult(
            x=X,
            status=bl.SolverStatus.BUDGET,
            n_iter=steps,
            n_gev=steps,
            problem_status=(bl.SolverStatus.BUDGET,) * B,
            problem_n_iter=torch.full((B,), steps, dtype=torch.int64),
        )

    def inner_answers(self, inner: InnerSolver, mb: MetaBatch) -> bl.SolverResult:
        """The B inner answers (no graph), with the learned step sizes."""
        return self._path(inner, mb, mb.init(), mb.flat(self._steps(mb)), graph=False)

    def apply(self, inner: InnerSolver, mb: MetaBatch) -> Outcome:
        if inner.max_iter == 0:  # type: ignore[union-attr]  # GradientDescent (check)
            raise ValueError(NO_STEP)
        leaf, _ = mb.theta_leaf()
        # a leaf of its own (`flat` is a view of the step sizes where there is one parameter)
        alpha = mb.flat(self._steps(mb)).detach().requires_grad_(True)
        with torch.enable_grad():
            res = self._path(inner, mb, mb.init(leaf), alpha, graph=True)
            X: torch.Tensor = res.x  # type: ignore[assignment]
            ql, qa = mb.query(X)
            check_task_rows("the query losses", ql, _QUERY_NAN)
            g_theta, g_alpha = torch.autograd.grad(ql.sum(), (leaf, alpha), materialize_grads=True)
        grad = {**mb.tree(g_theta), **{STEP_PREFIX + k: v for k, v in mb.tree(g_alpha).items()}}
        return Outcome(grad, None, X.detach(), ql.detach(), qa, res.replace(x=X.detach()))


MetaGradientKind = Union[Implicit, Unrolled, FirstOrder, ReptileStep, ReleasedCG, HeadOnly, LearnedSteps]


@dataclasses.dataclass(frozen=True)
class MetaAlgorithm:
    """An inner solver, a way to form the meta-gradient and a proximal weight.

    Args:
        inner: a `bilevel.solvers` instance (`GradientDescent`, `Nesterov`, `NewtonCG`,
            `TrustRegionNewtonCG`), run batched over the tasks (`bilevel.metalearn.metabatch.batched_solver`);
            its ``max_iter`` / ``tol`` / ``line_search`` are the inner loop's.
        meta_gradient: how g_i is formed; its ``check`` refuses the inner solvers it cannot use
            (`Unrolled`: fixed-step `GradientDescent` only; `ReleasedCG`: the released code's loop).
        lam: the proximal weight of G (>= 0; > 0 for `Implicit`).

    Raises:
        ValueError, TypeError: a combination the meta-gradient cannot use, or lam < 0.
    """

    inner: InnerSolver
    meta_gradient: MetaGradientKind
    lam: float = 2.0

    def __post_init__(self) -> None:
        self.meta_gradient.check(self.inner, self.lam)
        if not self.lam >= 0:
            raise ValueError(f"MetaAlgorithm(lam={self.lam}): lam must be >= 0")

    def meta_parameters(self, theta: Params) -> Params:
        """The meta-parameters this algorithm learns beyond theta, at their start (Meta-SGD's step
        sizes under ``"lr:<name>"``; ``{}`` for the others): add them to theta before training."""
        return self.meta_gradient.meta_parameters(theta)

    def weight(self, lam: Any = None) -> ProximalWeight:
        """The proximal weight of a call: ``lam`` (`proximal.coerce`), else this algorithm's."""
        if lam is None:
            return coerce(float(self.lam))
        return coerce(lam).resolve(self.lam)
