"""Host reads (`bilevel._sync`): deferred checks raise what immediate ones raise, results read their
host values once and only when asked, and a fixed-budget meta-step reads nothing on the host."""

from __future__ import annotations

import collections
import dataclasses
import gc
import inspect
import math
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from helpers import LiveTensorBytes
from test_metalearn_compile import _problem  # a 3-task meta-batch of the Omniglot CNN, random images
from torch.utils._python_dispatch import TorchDispatchMode

import bilevel as bl
import bilevel._sync
from bilevel.metalearn import build_experiment, make_algorithm, meta_gradient
from bilevel.metalearn.batched import batched_model
from bilevel.metalearn.training import step as step_module
from bilevel.metalearn.training.distributed import Dist
from bilevel.metalearn.training.step import MetaStep, TrainState
from bilevel.solvers import GradientDescent

D = torch.float64


def _quad(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((p - 2.0 * t) ** 2).sum()


def _exact(objective: Any, init: Any, theta: torch.Tensor) -> torch.Tensor:
    return 2.0 * theta


def _nan_theta() -> None:
    bl.implicit_argmin(_quad, torch.zeros(2, dtype=D), torch.tensor([1.0, float("nan")], dtype=D), _exact)


def _inf_objective() -> None:
    theta = torch.ones(2, dtype=D, requires_grad=True)
    bl.implicit_argmin(
        lambda p, t: _quad(p, t) - torch.log(torch.zeros((), dtype=D)), torch.zeros(2, dtype=D), theta, _exact
    )


def _far_answer() -> None:
    theta = torch.ones(3, dtype=D, requires_grad=True)
    bl.implicit_argmin(_quad, torch.zeros(3, dtype=D), theta, lambda o, i, th: 2.0 * th + 0.1)


def _saddle() -> None:
    theta = torch.ones(2, dtype=D, requires_grad=True)
    G = lambda p, t: 0.5 * (p[0] - t[0]) ** 2 - 0.5 * (p[1] - t[1]) ** 2  # noqa: E731
    bl.implicit_argmin(G, torch.zeros(2, dtype=D), theta, lambda o, i, th: th).sum().backward()


def _cg_budget_short() -> None:
    A = torch.diag(torch.logspace(0, 3, 10, dtype=D))
    theta = torch.ones(10, dtype=D, requires_grad=True)
    phi = bl.implicit_argmin(
        lambda p, t: 0.5 * p @ A @ p - t @ p,
        torch.zeros(10, dtype=D),
        theta,
        lambda o, i, th: torch.linalg.solve(A, th),
        linear_solver=bl.CG(max_iter=2),
    )
    phi.sum().backward()


def _diverged_inner_loop() -> None:
    _, fn, theta, batch = _problem(D)
    algo = make_algorithm("imaml-gd", inner_steps=20, inner_lr=1e6, lam=1.0)
    meta_gradient(algo, fn, F.cross_entropy, theta, batch, diagnostics=False)


GUARDS = {
    "nan theta": (_nan_theta, bl.NonFiniteError, r"theta contains NaN"),
    "infinite objective": (_inf_objective, bl.NonFiniteError, r"objective is inf at the solver's answer"),
    "optimality residual": (_far_answer, bl.OptimalityError, r"exceeds optimality_tol"),
    "negative curvature in the backward CG": (_saddle, bl.NegativeCurvatureError, "not positive definite"),
    "backward CG short of its tolerance": (_cg_budget_short, bl.LinearSolveError, "status MAX_ITER"),
    "diverged inner loop (engine)": (_diverged_inner_loop, bl.NonFiniteError, r"task\(s\) .* diverged"),
}


@pytest.mark.parametrize("name", list(GUARDS))
def test_deferred_checks_raise_what_immediate_checks_raise(name: str) -> None:
    run, error, match = GUARDS[name]
    with pytest.raises(error, match=match) as now:
        run()
    reached = []
    with pytest.raises(error, match=match) as later:
        with bl.deferred_checks():
            run()
            reached.append(True)  # the computation went on; the check waited for the block's end
    assert reached == [True]
    assert str(later.value) == str(now.value)


def test_an_exception_in_the_block_is_explained_by_the_failed_check_queued_before_it() -> None:
    with pytest.raises(bl.NonFiniteError, match="theta contains NaN") as err:
        with bl.deferred_checks():
            _nan_theta()
            raise RuntimeError("a later failure caused by the NaN")
    assert isinstance(err.value.__cause__, RuntimeError)
    # with nothing queued that fails, the exception itself propagates
    with pytest.raises(KeyError):
        with bl.deferred_checks():
            bl.implicit_argmin(_quad, torch.zeros(2, dtype=D), torch.ones(2, dtype=D), _exact)
            raise KeyError("unrelated")


def test_a_queued_check_keeps_no_answer_and_its_error_carries_the_diagnostics() -> None:
    """A queued check holds the call's info weakly and the solver's result without its answer: an
    answer the caller dropped is freed before the block ends, and the error then carries a
    stand-in info with the check's figures; an info the caller holds is the error's."""
    n = 1000  # an answer of 8,000 bytes

    def far(objective: Any, init: Any, theta: torch.Tensor) -> torch.Tensor:
        return 2.0 * theta + 0.1  # ||F|| = 0.1 * sqrt(n), above the default optimality_tol

    theta = torch.ones(n, dtype=D, requires_grad=True)
    with pytest.raises(bl.OptimalityError, match="exceeds optimality_tol") as dropped:
        with LiveTensorBytes() as count, bl.deferred_checks():
            bl.implicit_argmin(_quad, torch.zeros(n, dtype=D), theta, far)
            gc.collect()
            queued = count.current  # (an assertion here would be chained under the check's error)
    # what the queued check holds (a residual, a value), not the answer (nor the graph)
    assert 0 < queued < 8 * n / 10, queued
    info = dropped.value.info
    assert isinstance(info, bl.ImplicitInfo)
    assert info.residual_norm == pytest.approx(0.1 * math.sqrt(n), rel=1e-12)
    assert info.solver_result is not None and info.solver_result.x is None

    with pytest.raises(bl.OptimalityError) as held:
        with bl.deferred_checks():
            _, kept = bl.implicit_argmin(_quad, torch.zeros(n, dtype=D), theta, far, return_info=True)
    assert held.value.info is kept
    assert kept.residual_norm == pytest.approx(0.1 * math.sqrt(n), rel=1e-12)
    assert kept.solver_result is not None and isinstance(kept.solver_result.x, torch.Tensor)

    # the backward solve's check: a stand-in with the solve's statuses, not its solution
    with pytest.raises(bl.LinearSolveError, match="status MAX_ITER") as short:
        with bl.deferred_checks():
            _cg_budget_short()
    solves = short.value.info.backward
    assert [r.status for r in solves] == [bl.LinearStatus.MAX_ITER] and solves[0].x.numel() == 0


def test_nested_blocks_check_at_the_end_of_the_outermost() -> None:
    order: list[str] = []
    with bl.deferred_checks():
        with bl.deferred_checks():
            bl.defer_check(lambda: order.append("inner"))
        order.append("inner block ended")
        bl.defer_check(lambda: order.append("outer"))
    assert order == ["inner block ended", "inner", "outer"]
    bl.defer_check(lambda: order.append("now"))  # outside any block: at once
    assert order[-1] == "now"


# --------------------------------------------------------------------------- results read on first access


def test_host_values_are_read_once_on_first_access_and_kept_unread_by_replace() -> None:
    calls: list[int] = []

    def read() -> dict[str, Any]:
        calls.append(1)
        return {"status": bl.SolverStatus.BUDGET, "n_iter": 7, "grad_norm": 0.5, "fun": 1.5}

    hv = bl.HostValues(read)
    res = bl.SolverResult(torch.zeros(2), status=hv, n_iter=hv, grad_norm=hv, fun=hv)
    copy = res.replace(info={"k": 1})
    assert calls == [] and copy.info == {"k": 1}
    assert (copy.status, copy.n_iter, res.grad_norm, res.fun) == (bl.SolverStatus.BUDGET, 7, 0.5, 1.5)
    assert calls == [1]
    # dataclasses.replace reads every field (so the values it copies are the read ones)
    eager = bl.SolverResult(torch.zeros(2), status=bl.HostValues(read), n_iter=3)
    assert dataclasses.replace(eager, n_iter=4).status is bl.SolverStatus.BUDGET and calls == [1, 1]
    with pytest.raises(TypeError, match="expected a SolverStatus"):
        bl.SolverResult(torch.zeros(2), status="budget")  # type: ignore[arg-type]


def test_facts_drop_the_answer_and_keep_the_unread_host_values() -> None:
    calls: list[int] = []

    def read() -> dict[str, Any]:
        calls.append(1)
        return {"status": bl.LinearStatus.CONVERGED, "residual_norm": 1e-9, "b_norm": 2.0}

    hv = bl.HostValues(read)
    x = torch.ones(3, dtype=D)
    lin = bl.LinearSolveResult(x, status=hv, n_iter=4, n_matvec=5, residual_norm=hv, b_norm=hv)
    facts = lin.facts()
    assert calls == [] and facts.x.shape == (0,) and facts.x.dtype == D
    assert facts.status is bl.LinearStatus.CONVERGED
    assert (facts.n_iter, facts.n_matvec, facts.b_norm) == (4, 5, 2.0)
    assert calls == [1] and lin.x is x  # the original keeps its solution
    res = bl.SolverResult(x, status=bl.SolverStatus.BUDGET, n_iter=7, n_hvp=3)
    kept = res.facts()
    assert kept.x is None and (kept.status, kept.n_iter, kept.n_hvp) == (bl.SolverStatus.BUDGET, 7, 3)


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_a_lazy_batched_result_holds_the_values_of_its_problems(dtype: torch.dtype) -> None:
    """Per-problem GD on 1/2 a_b ||x - c_b||^2 from 0 after k steps of lr: x = (1 - (1 - lr a_b)^k) c_b
    (closed form); one problem diverges and is reported NONFINITE."""
    a = torch.tensor([1.0, 2.0, 300.0], dtype=dtype)
    c = torch.tensor([[1.0, -1.0], [2.0, 0.5], [1.0, 1.0]], dtype=dtype)
    G = bl.solvers.BatchedObjective(lambda x, th: 0.5 * a * ((x - th) ** 2).sum(1))
    res = GradientDescent(lr=0.1, max_iter=400, tol=0.0, batched=True)(G, torch.zeros_like(c), c)
    assert bl.SolverResult.__dict__["status"].held(res).__class__ is bl.HostValues  # not read yet
    assert res.problem_status == (bl.SolverStatus.BUDGET, bl.SolverStatus.BUDGET, bl.SolverStatus.NONFINITE)
    assert res.status is bl.SolverStatus.NONFINITE and res.n_iter == 400
    iters = res.problem_n_iter.tolist()  # type: ignore[union-attr]
    assert iters[:2] == [400, 400] and iters[2] < 400  # frozen at its last finite iterate
    assert bool(torch.isfinite(res.x).all())  # type: ignore[arg-type]
    closed = (1 - (1 - 0.1 * a[:2, None]) ** 400) * c[:2]
    torch.testing.assert_close(res.x[:2], closed)  # type: ignore[index]
    assert "NaN or infinity appeared in 1 of 3 problems ([2])" in res.reason


def test_status_mask_from_device_codes_equals_the_read_statuses() -> None:
    # one problem indefinite: CG meets negative curvature there and nowhere else
    A = torch.stack([torch.diag(torch.tensor(d, dtype=D)) for d in ([1.0, 2.0], [1.0, -3.0], [4.0, 1.0])])
    b = torch.ones(3, 2, dtype=D)
    res = bl.CG(max_iter=5)(lambda X: torch.einsum("bij,bj->bi", A, X), b)
    assert res.problem_codes is not None
    for statuses in [
        (bl.LinearStatus.NEGATIVE_CURVATURE,),
        (bl.LinearStatus.CONVERGED, bl.LinearStatus.BUDGET),
    ]:
        device = res.status_mask(*statuses)
        host = torch.tensor([s in statuses for s in res.problem_status])  # type: ignore[union-attr]
        assert torch.equal(device, host)
    assert res.status_mask(bl.LinearStatus.NEGATIVE_CURVATURE).tolist() == [False, True, False]


# --------------------------------------------------------------------------- a meta-step reads nothing


_READ_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}


class _HostReads(TorchDispatchMode):
    """Counts what waits for a device: scalar reads and data-dependent shapes (dispatched ops), and
    copies to the host that dispatch nothing when the tensor is already there (`tolist`, `cpu`,
    `numpy`, patched)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ in _READ_OPS:
            self._record(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/bilevel/" in f.filename]
        self.sites[f"{what} at {frames[-1].filename.split('/bilevel/')[-1]}:{frames[-1].lineno}"] += 1


@pytest.fixture
def on_a_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[_HostReads]:
    """The solvers' loops as on an accelerator (no read to skip work: `host_checks` is False), and
    every host read counted."""
    monkeypatch.setattr(bilevel._sync, "host_checks", lambda x: False)
    reads = _HostReads()
    for name in ("tolist", "cpu", "numpy"):
        original: Callable[..., Any] = getattr(torch.Tensor, name)

        def counted(
            self: torch.Tensor, *a: Any, _orig: Callable[..., Any] = original, _n: str = name, **k: Any
        ) -> Any:
            reads._record(_n)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield reads


@pytest.mark.parametrize(
    ("algo", "settings"),
    [
        ("imaml-gd", dict(inner_steps=4, inner_lr=0.1, lam=2.0, cg_iters=3)),
        ("imaml-gd", dict(inner_steps=4, inner_lr=0.1, lam=0.5, cg_iters=3, backtrack=True)),
        ("fomaml", dict(inner_steps=3, inner_lr=0.4)),
        ("maml", dict(inner_steps=2, inner_lr=0.4)),
    ],
    ids=["imaml-gd", "imaml-gd-backtrack", "fomaml", "maml"],
)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "vmap"])
def test_a_fixed_budget_meta_step_reads_nothing_until_its_block_ends(
    on_a_device: _HostReads, algo: str, settings: dict[str, Any], batched: bool
) -> None:
    model, fn, theta, batch = _problem(D)
    alg = make_algorithm(algo, **settings)
    bm = batched_model(model) if batched else None
    reference, _, _ = meta_gradient(alg, fn, F.cross_entropy, theta, batch, diagnostics=False, batched=bm)
    on_a_device.sites.clear()
    with on_a_device:
        with bl.deferred_checks():
            g, _, _ = meta_gradient(alg, fn, F.cross_entropy, theta, batch, diagnostics=False, batched=bm)
            inside = dict(on_a_device.sites)
    assert inside == {}
    assert sum(on_a_device.sites.values()) > 0  # the checks did read, at the end
    for k in theta:
        torch.testing.assert_close(g[k], reference[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("learn_lam", ["none", "scalar"])
def test_a_training_meta_step_reads_the_host_once_for_its_gradient_and_once_for_its_sums(
    on_a_device: _HostReads, learn_lam: str
) -> None:
    """An unlogged `MetaStep` reads the device at two places of its own: the meta-gradient's
    finiteness and the all-reduced `StepSums` (the deferred checks of the core read at their
    block's end, as tested above)."""
    cfg = tiny_config(algo="imaml-gd", meta_steps=3, log_every=100, learn_lam=learn_lam, dtype="float64")
    exp = build_experiment(cfg, device="cpu")
    state = TrainState.start(cfg, exp, Dist())
    meta_step = MetaStep(cfg, exp, Dist(), cfg.meta_batch, clock=lambda: 0.0, stop_requested=lambda: False)
    meta_step(state, exp.train_sampler.meta_batch(0, range(cfg.meta_batch)))  # step 0 is logged
    batch = exp.train_sampler.meta_batch(1, range(cfg.meta_batch))
    on_a_device.sites.clear()
    with on_a_device:
        record = meta_step(state, batch)
    assert not record.logged and state.step == 2
    source = inspect.getsource(step_module).splitlines()

    def line(text: str) -> str:
        (n,) = [i for i, s in enumerate(source, 1) if text in s]
        return f"metalearn/training/step.py:{n}"

    ours = {k.split(" at ")[1]: v for k, v in on_a_device.sites.items() if "training/" in k}
    # Adam keeps its step counts on the host (unless capturable): reading them waits for nothing
    ours.pop(line("state.optimizer.step()"), None)
    assert ours == {line("all_finite(list(g.values()))"): 1, line("cls(*t.tolist())"): 1}
