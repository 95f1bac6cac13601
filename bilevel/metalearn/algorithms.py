"""Meta-gradients of iMAML, MAML, first-order MAML, Reptile, ANIL and Meta-SGD: `MetaAlgorithm`, entry points.

A `MetaAlgorithm` is an inner solver (a `bilevel.solvers` instance, run batched over the B tasks
of a meta-batch: `bilevel.metalearn.metabatch`), a way to form the meta-gradient (a value with an
``apply`` method: `Implicit`, `Unrolled`, `FirstOrder`, `ReptileStep`, `ReleasedCG`, `HeadOnly`,
`LearnedSteps`, in
`bilevel.metalearn.gradients`) and a proximal weight lam.  `meta_gradient` computes Algorithm 1's
direction; `adapt`, `predict_batch` and `evaluate_batch` adapt without a gradient.  The command
line's algorithm names are entries of `bilevel.metalearn.registry` (`make_algorithm`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import bilevel as bl
from bilevel.internal import check_int

from .batched import BatchedModel, as_batched, task_losses
from .gradients import (
    FirstOrder,
    HeadOnly,
    Implicit,
    LearnedSteps,
    MetaAlgorithm,
    Outcome,
    ReleasedCG,
    ReptileStep,
    Unrolled,
)
from .metabatch import MetaBatch
from .models import LossFn, ModelFn, Params
from .registry import make_algorithm
from .tasks import Task

__all__ = [
    "FirstOrder",
    "HeadOnly",
    "Implicit",
    "LearnedSteps",
    "MetaAlgorithm",
    "MetaStats",
    "ReleasedCG",
    "ReptileStep",
    "Unrolled",
    "adapt",
    "evaluate_batch",
    "make_algorithm",
    "meta_gradient",
    "min_eig",
    "predict_batch",
]


@dataclasses.dataclass(frozen=True)
class MetaStats:
    """Per-task diagnostics of one meta-gradient computation, each a tensor of shape (B,).

    Attributes:
        query_loss, query_acc: query loss and accuracy (accuracy NaN for regression)
            at phi_i, i.e. after adaptation.
        support_loss: Lhat_i(phi_i).
        inner_grad_norm: ||grad_phi G_i(phi_i, theta)|| at the inner answer (ANIL: over the
            head's coordinates, the ones its inner loop adapts).
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
        cg_relative_residual: ``cg_residual / ||v_i||``, the residual relative to the task's
            right-hand side (1 means CG did not reduce it at all), NaN without CG.
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
    cg_relative_residual: torch.Tensor | None = None


def min_eig(mb: MetaBatch, X: torch.Tensor, steps: int) -> torch.Tensor:
    """Smallest eigenvalue of I + Lhat''/lam at X per task (B,), by ``steps`` Lanczos steps on HVPs of
    G (`MetaStats.min_eig`; with per-tensor lam, of I + D^-1/2 Lhat'' D^-1/2, D = diag(lam))."""
    hvp = mb.hvp(X)
    scale = mb.weight.inverse_sqrt(mb.weight.detach(mb.lam_vec(mb.theta_values())))

    def matvec(V: torch.Tensor) -> torch.Tensor:
        return hvp(V * scale) * scale

    v0 = torch.randn(X.shape, generator=torch.Generator().manual_seed(0), dtype=X.dtype).to(X.device)
    lo, _ = bl.lanczos_extremes(matvec, v0, steps)
    return lo


def _stats(mb: MetaBatch, out: Outcome, diagnostics: bool, lanczos_steps: int = 0) -> MetaStats:
    B, device = mb.B, out.query_loss.device
    nan = torch.full((B,), float("nan"), dtype=out.query_loss.dtype, device=device)
    cg = out.cg
    if cg is not None and cg.problem_residual_norm is not None:  # batched (read nothing)
        assert cg.problem_n_iter is not None
        residual = cg.problem_residual_norm.to(device)
        negative = cg.status_mask(bl.LinearStatus.NEGATIVE_CURVATURE).to(device)
        iters = cg.problem_n_iter.to(device=device, dtype=nan.dtype)
        relative = nan
        if cg.problem_b_norm is not None:
            b_norm = cg.problem_b_norm.to(device=device, dtype=residual.dtype)
            # a zero right-hand side has the solution 0, which CG returns at once (residual 0)
            relative = (residual / torch.where(b_norm > 0, b_norm, 1.0)).to(nan.dtype)
    else:
        negative = torch.zeros(B, dtype=torch.bool, device=device)
        residual, iters, relative = nan, torch.zeros_like(nan), nan
    if diagnostics:
        # One gradient of G at the answers (the fixed-budget inner solver takes none there).
        X = out.phi.detach().requires_grad_(True)
        th = mb.theta_values()
        with torch.enable_grad():
            values = mb.objective(exact=False)(X, th)
            (grad,) = torch.autograd.grad(values.sum(), X, allow_unused=True, materialize_grads=True)
        if out.adapted is not None:  # the inner loop moved these coordinates only (ANIL's head)
            grad = grad[:, out.adapted[0] : out.adapted[1]]
        grad_norm = torch.linalg.vector_norm(grad, dim=1).detach().to(nan.dtype)
        with torch.no_grad():
            support = (values.detach() - mb.prox(out.phi, th)).to(nan.dtype)
            distance = torch.linalg.vector_norm(out.phi.detach() - mb.theta_flat, dim=1).to(nan.dtype)
    else:
        grad_norm, support, distance = nan, nan, nan
    lowest = nan
    if diagnostics and lanczos_steps > 0 and not mb.weight.is_zero():
        lowest = min_eig(mb, out.phi, lanczos_steps).to(nan.dtype)
    return MetaStats(
        out.query_loss,
        out.query_acc,
        support,
        grad_norm,
        residual,
        negative,
        iters,
        lowest,
        distance,
        relative,
    )


def meta_gradient(
    algo: MetaAlgorithm,
    model: ModelFn,
    loss: LossFn,
    theta: Params,
    batch: Task,
    *,
    lam: Any = None,
    classification: bool = True,
    vectorize: bool = True,
    diagnostics: bool = True,
    batched: BatchedModel | None = None,
    lanczos_steps: int = 0,
    task_chunk: int | None = None,
) -> tuple[Params, dict[str, torch.Tensor] | None, MetaStats]:
    """The average task meta-gradient of a meta-batch (Algorithm 1's direction).

    Args:
        algo: what to compute (see the module docstring).
        model: ``model(params, x) -> outputs`` for one task.
        loss: ``loss(outputs, y) -> scalar`` (cross-entropy, MSE, ...).
        theta: meta-parameters by name (no leading task dimension).
        batch: a meta-batch `Task` with leading dimension B on every field.
        lam: overrides ``algo.lam``: a `ProximalWeight` (`bilevel.metalearn.proximal`), a float,
            or learned 0-d tensors (one shared or one per parameter name) whose gradient is
            returned too (d/dlam, whatever the weight's leaves are: `ProximalWeight.chain_rule`
            turns it into the leaves' gradients).
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
        task_chunk: compute the meta-batch ``task_chunk`` tasks at a time and add up their
            gradients (``None``: all B tasks at once).  Each task's meta-gradient depends on
            that task alone, so the result is the same up to rounding; the peak memory is that
            of one chunk's graphs (the inner loops, and MAML's unrolled path, of
            ``task_chunk`` tasks instead of B), for more, smaller calls.  Inside a
            `bilevel.deferred_checks` block (the training loop's meta-step on an accelerator)
            the queued checks keep statuses and norms, not a chunk's graph, answers or backward
            solutions: measured on CPU in float32, 32 random tasks of 5-way 1-shot (5 queries)
            at one task per chunk, the live tensors' peak was the same with the block as
            without it (iMAML-GD at its defaults 9.6 MiB, MAML with one inner step 7.8 MiB).

    Returns:
        ``(grad, lam_grad, stats)``: the mean meta-gradient by name (like ``theta``),
        the gradient with respect to a learned ``lam`` (``None`` if ``lam`` is not a
        tensor or dict of tensors; keys ``"lam"`` or the parameter names) and the
        per-task `MetaStats`.

    Raises:
        NonFiniteError: the inner solve diverged in some task.
        ValueError: a learned lam with a kind other than `Implicit`; ``lanczos_steps`` < 0;
            ``task_chunk`` < 1.
        TypeError: ``lanczos_steps`` or ``task_chunk`` is not an int.
    """
    check_int("meta_gradient", "lanczos_steps", lanczos_steps, 0)
    if task_chunk is not None:  # None: all tasks at once
        check_int("meta_gradient", "task_chunk", task_chunk, 1)
    engine = as_batched(model, batched, vectorize)
    weight = algo.weight(lam)
    B = batch.support_x.shape[0]
    size = B if task_chunk is None else min(B, task_chunk)
    grad: Params = {}
    lam_grad: dict[str, torch.Tensor] | None = None
    stats: list[MetaStats] = []
    flat: torch.Tensor | None = None  # theta raveled once for all chunks
    for start in range(0, B, size):
        part = batch if size == B else Task(*(t[start : start + size] for t in batch))
        mb = MetaBatch(engine, loss, classification, part, theta, weight, theta_flat=flat)
        flat = mb.theta_flat
        if mb.learned and not algo.meta_gradient.learns_lam:
            raise ValueError("a learned lam needs the Implicit meta-gradient (iMAML)")
        out = algo.meta_gradient.apply(algo.inner, mb)
        # per-task sums (detached: the chunk's graph is freed before the next chunk runs)
        grad = _add(grad, out.grad)
        if out.lam_grad is not None:
            lam_grad = _add(lam_grad or {}, out.lam_grad)
        stats.append(_stats(mb, out, diagnostics, lanczos_steps))
        # the next chunk's peak must not hold this chunk's answers and gradients
        del mb, out
    mean = {k: t / B for k, t in grad.items()}
    lam_mean = None if lam_grad is None else {k: t / B for k, t in lam_grad.items()}
    return mean, lam_mean, stats[0] if len(stats) == 1 else _concat_stats(stats)


def _add(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total + part`` by name (``total`` empty: a detached copy of ``part``), added into
    ``total`` in place: a chunked meta-batch keeps one running sum, not one per chunk."""
    if not total:
        return {k: v.detach().clone() for k, v in part.items()}
    for k, t in total.items():
        t.add_(part[k].detach())
    return total


def _concat_stats(parts: list[MetaStats]) -> MetaStats:
    """The per-task stats of consecutive chunks of a meta-batch, as one `MetaStats` over all tasks."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(MetaStats):
        values = [getattr(p, f.name) for p in parts]
        fields[f.name] = None if any(v is None for v in values) else torch.cat(values)
    return MetaStats(**fields)


def adapt(
    algo: MetaAlgorithm,
    model: ModelFn,
    loss: LossFn,
    theta: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    lam: Any = None,
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
    empty = support_x[:, :0]
    batch = Task(support_x, support_y, empty, support_y[:, :0])
    mb = MetaBatch(as_batched(model, batched, vectorize), loss, True, batch, theta, algo.weight(lam))
    with torch.no_grad():
        return mb.params(algo.meta_gradient.inner_answers(algo.inner, mb).x)  # type: ignore[arg-type]


def predict_batch(
    algo: MetaAlgorithm,
    model: ModelFn,
    loss: LossFn,
    theta: Params,
    batch: Task,
    *,
    lam: Any = None,
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
    mb = MetaBatch(
        as_batched(model, batched, vectorize), loss, classification, batch, theta, algo.weight(lam)
    )
    with torch.no_grad():
        X: torch.Tensor = algo.meta_gradient.inner_answers(algo.inner, mb).x  # type: ignore[assignment]
        out = mb.bm.outputs(mb.unflat(X), batch.query_x)
        return task_losses(loss, out, batch.query_y), mb.accuracy(out, batch.query_y), out


def evaluate_batch(
    algo: MetaAlgorithm,
    model: ModelFn,
    loss: LossFn,
    theta: Params,
    batch: Task,
    *,
    lam: Any = None,
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
