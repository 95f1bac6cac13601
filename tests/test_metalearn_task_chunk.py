"""A meta-batch computed a few tasks at a time (``task_chunk``) gives the whole batch's meta-step.

Each task's meta-gradient depends on that task alone, so the chunks' sums must add up to the
all-at-once result (float64, to rounding), per-task diagnostics in task order included; and the
peak memory must fall with the chunk (measured on the process's allocations).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import LiveTensorBytes, run_cli

import bilevel as bl
from bilevel.metalearn import make_algorithm, meta_gradient
from bilevel.metalearn.batched import batched_model
from bilevel.metalearn.models import Params, make_functional, omniglot_cnn
from bilevel.metalearn.proximal import lam_from_config
from bilevel.metalearn.tasks import Task

D = torch.float64
WAYS, SHOTS, QUERIES, B = 3, 1, 2, 5
CNN = omniglot_cnn(WAYS, hidden=3, image_size=8)


def _images(seed: int, b: int = B, size: int = 8) -> Task:
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(b, WAYS * SHOTS, 1, size, size, generator=g, dtype=D)
    qx = torch.rand(b, WAYS * QUERIES, 1, size, size, generator=g, dtype=D)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(b, -1).contiguous()
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(b, -1).contiguous()
    return Task(sx, sy, qx, qy)


ALGOS = {
    "imaml-gd": dict(inner_steps=3, inner_lr=0.1, lam=2.0, cg_iters=3),
    "imaml-hf": dict(newton_iters=2, lam=2.0, cg_iters=3),
    "maml": dict(inner_steps=2, inner_lr=0.3),
    "fomaml": dict(inner_steps=2, inner_lr=0.3),
    "reptile": dict(inner_steps=2, inner_lr=0.3),
    "anil": dict(inner_steps=2, inner_lr=0.3),
    "meta-sgd": dict(inner_steps=2, inner_lr=0.1),
}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert (a is None) == (b is None)
    if a is not None and b is not None:
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("algo_name", list(ALGOS))
@pytest.mark.parametrize("engine", ["structure", "vmap"])
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunked_meta_gradient_equals_the_whole_batch(algo_name: str, engine: str, chunk: int) -> None:
    fn, theta = make_functional(CNN, torch.Generator().manual_seed(0), dtype=D)
    algo = make_algorithm(algo_name, **ALGOS[algo_name])  # type: ignore[arg-type]
    if algo_name == "meta-sgd":
        theta = {**theta, **{f"lr:{k}": torch.full_like(v, 0.1) for k, v in theta.items()}}
    batch = _images(1)
    kw = dict(classification=True, batched=batched_model(CNN) if engine == "structure" else None,
              diagnostics=True, lanczos_steps=2 if algo_name.startswith("imaml") else 0)  # fmt: skip
    g0, l0, s0 = meta_gradient(algo, fn, F.cross_entropy, theta, batch, **kw)  # type: ignore[arg-type]
    g1, l1, s1 = meta_gradient(algo, fn, F.cross_entropy, theta, batch, task_chunk=chunk, **kw)  # type: ignore[arg-type]
    assert list(g1) == list(g0) and l0 is None and l1 is None
    for k in g0:
        _same(g1[k], g0[k])
    assert float(torch.cat([v.reshape(-1) for v in g0.values()]).abs().sum()) > 0
    for f in ("query_loss", "query_acc", "support_loss", "inner_grad_norm", "cg_residual",
              "negative_curvature", "cg_iters", "distance", "cg_relative_residual"):  # fmt: skip
        a, b = getattr(s1, f), getattr(s0, f)
        if a is not None:
            assert a.shape == (B,), f
        _same(a, b)
    # Lanczos starts from random vectors drawn per call: an estimate either way, per task
    assert (s1.min_eig is None) == (s0.min_eig is None)
    if s1.min_eig is not None and algo_name.startswith("imaml"):
        assert s1.min_eig.shape == (B,) and bool(torch.isfinite(s1.min_eig).all())


def test_a_learned_lambda_gets_the_same_gradient_in_chunks() -> None:
    fn, theta = make_functional(CNN, torch.Generator().manual_seed(0), dtype=D)
    algo = make_algorithm("imaml-gd", **ALGOS["imaml-gd"])  # type: ignore[arg-type]
    lam = lam_from_config("per-tensor", 1.5, list(theta), device="cpu", dtype=D)
    batch = _images(2)
    g0, l0, _ = meta_gradient(algo, fn, F.cross_entropy, theta, batch, lam=lam, batched=batched_model(CNN))
    g1, l1, _ = meta_gradient(
        algo, fn, F.cross_entropy, theta, batch, lam=lam, batched=batched_model(CNN), task_chunk=2
    )
    assert l0 is not None and l1 is not None and list(l0) == list(l1)
    for k in l0:
        _same(l1[k], l0[k])
    assert float(torch.stack([v.abs().sum() for v in l0.values()]).sum()) > 0
    for k in g0:
        _same(g1[k], g0[k])


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (0, ValueError, "task_chunk must be >= 1"),
        (-1, ValueError, "task_chunk must be >= 1"),
        (2.0, TypeError, "task_chunk must be an int, not float"),
        (True, TypeError, "task_chunk must be an int, not bool"),
        ("2", TypeError, "task_chunk must be an int, not str"),
    ],
)
def test_a_bad_task_chunk_is_refused(bad: object, error: type[Exception], match: str) -> None:
    fn, theta = make_functional(CNN, torch.Generator().manual_seed(0), dtype=D)
    algo = make_algorithm("maml", inner_steps=1, inner_lr=0.3)
    with pytest.raises(error, match=rf"meta_gradient\(task_chunk=.*\): {match}"):
        meta_gradient(algo, fn, F.cross_entropy, theta, _images(3), task_chunk=bad)  # type: ignore[arg-type]


def test_live_tensor_bytes_counts_new_storages_once_while_alive() -> None:
    """The measure the memory tests rely on: new tensors by storage, views of them once, tensors
    made before and writes into them not at all, and the peak outlives what was freed."""
    before = torch.zeros(1000)
    with LiveTensorBytes() as count:
        a = torch.ones(1000)  # 4,000 bytes
        view = a[10:20].reshape(2, 5)
        before.add_(1)  # in place into an older tensor
        old_view = before[:500]
        b = a * 2  # 4,000 more: the peak
        del a, view, b
        c = torch.ones(250)  # 1,000: after the others were freed
    assert count.peak == 8000
    assert count.current == 1000
    del c, old_view


@pytest.mark.parametrize("algo_name", ["maml", "imaml-gd"])
def test_chunks_lower_the_peak_memory_of_a_meta_step(algo_name: str) -> None:
    """All B tasks' graphs at once (MAML's unrolled paths; iMAML's inner loops and the graph its
    HVPs reuse) against one task's at a time: the peak bytes of the tensors the meta-gradient
    creates and holds.  Inside `bl.deferred_checks` (the meta-step on an accelerator) the queued
    checks keep nothing of a task: no chunk's graph, and none of iMAML's answers or backward
    solutions."""
    model = omniglot_cnn(5, hidden=16, image_size=28)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=torch.float32)
    kwargs = {"lam": 2.0, "cg_iters": 3} if algo_name == "imaml-gd" else {}
    algo = make_algorithm(algo_name, inner_steps=2, inner_lr=0.3, **kwargs)
    x = _images(4, b=16, size=28)
    batch = Task(x.support_x.float(), x.support_y, x.query_x.float(), x.query_y)

    def peak(chunk: int | None, deferred: bool = False) -> int:
        checks = bl.deferred_checks() if deferred else contextlib.nullcontext()
        with LiveTensorBytes() as count, checks:
            meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=batched_model(model),
                          diagnostics=False, task_chunk=chunk)  # fmt: skip
        return count.peak

    whole, single, deferred = peak(None), peak(1), peak(1, deferred=True)
    # one chunk's graphs are one task's: about 1/16 of the whole batch's
    assert whole > 6 * single > 0, (whole, single)
    # the queued checks keep statuses and norms: less than two theta-sized float32 vectors in all,
    # where iMAML's 16 answers and 16 backward solutions would be 32
    n = sum(t.numel() for t in theta.values())
    assert deferred < single + 2 * n * 4, (deferred, single, n)


@pytest.mark.parametrize("algo_name", list(ALGOS))
def test_a_chunk_holds_nothing_of_the_chunks_before(algo_name: str) -> None:
    """At one task per chunk, 8 tasks peak where one task does, plus the running sum of the
    gradients (one theta-sized tensor): no earlier chunk's answers, gradients or raveled theta
    stay alive through the next chunk's graph."""
    model = omniglot_cnn(5, hidden=16, image_size=28)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=torch.float32)
    if algo_name == "meta-sgd":
        theta = {**theta, **{f"lr:{k}": torch.full_like(v, 0.1) for k, v in theta.items()}}
    algo = make_algorithm(algo_name, **ALGOS[algo_name])  # type: ignore[arg-type]
    x = _images(5, b=8, size=28)
    batch = Task(x.support_x.float(), x.support_y, x.query_x.float(), x.query_y)

    def peak(tasks: int) -> int:
        part = Task(*(t[:tasks] for t in batch))
        with LiveTensorBytes() as count:
            meta_gradient(algo, fn, F.cross_entropy, theta, part, batched=batched_model(model),
                          diagnostics=False, task_chunk=1)  # fmt: skip
        return count.peak

    one, eight = peak(1), peak(8)
    size = 4 * sum(t.numel() for t in theta.values())  # theta's bytes, the running sum's
    assert eight <= one + 1.25 * size, (algo_name, one, eight, size)


SINE = ["--dataset", "sinusoid", "--meta-batch", "5", "--inner-steps", "2", "--meta-steps", "6"]
SINE += ["--log-every", "2", "--test-tasks", "6", "--eval-batch", "3", "--checkpoint-every", "0"]
SINE += ["--dtype", "float64", "--algo", "maml", "--inner-lr", "0.05"]


def test_task_chunk_through_the_command_line_trains_the_samerun_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = {}
    for name, extra in (("whole", []), ("chunked", ["--task-chunk", "2"])):
        code, _, err = run_cli(["train", *SINE, *extra, "--out", str(tmp_path / name)], capsys)
        assert code == 0, err
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert math.isclose(results["whole"]["test_loss"], results["chunked"]["test_loss"], rel_tol=1e-9)
    code, _, err = run_cli(["train", *SINE, "--task-chunk", "0", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "--task-chunk" in err and "must be >= 1" in err


@pytest.mark.parametrize("learner", ["MAML", "IMAML"])
def test_a_learner_step_in_chunks_fills_the_same_gradients(learner: str) -> None:
    from bilevel.metalearn import IMAML, MAML
    from bilevel.solvers import GradientDescent

    grads = []
    for chunk in (None, 2):
        model = omniglot_cnn(WAYS, hidden=3, image_size=8).double()
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        inner = GradientDescent(lr=0.1, max_iter=2, tol=0.0)
        meta = (
            MAML(model, inner=inner) if learner == "MAML" else IMAML(model, lam=2.0, inner=inner, cg_iters=3)
        )
        loss, stats = meta.step(_images(5), return_stats=True, task_chunk=chunk)
        assert stats.query_loss.shape == (B,)
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    _same(l1, l0)
    assert list(g1) == list(g0) and len(g0) > 0
    for n in g0:
        _same(g1[n], g0[n])


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_a_theta_ravel_of_another_shape_or_dtype_is_refused(bad: str) -> None:
    from bilevel.metalearn.batched import as_batched
    from bilevel.metalearn.metabatch import MetaBatch

    model = omniglot_cnn(5, hidden=8, image_size=8)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=torch.float32)
    n = sum(t.numel() for t in theta.values())
    flat = torch.zeros(n + 1) if bad == "shape" else torch.zeros(n, dtype=torch.float64)
    algo = make_algorithm("maml", inner_steps=1)
    x = _images(1, b=2)
    batch = Task(x.support_x.float(), x.support_y, x.query_x.float(), x.query_y)
    with pytest.raises(ValueError, match="ravel of theta"):
        MetaBatch(as_batched(fn, None, False), F.cross_entropy, True, batch, theta, algo.weight(None),
                  theta_flat=flat)  # fmt: skip


def test_the_few_ops_double_backward_holds_no_more_than_pytorchs_on_an_unrolled_path() -> None:
    """One task's 5-step MAML meta-gradient (the one-task chunks that save memory) peaks lower
    through the hand-written convolution and norm than through PyTorch's double backward, with
    the same gradient: why ``auto`` takes them for one task too."""
    model = omniglot_cnn(5, hidden=16, image_size=28)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=torch.float32)
    algo = make_algorithm("maml", inner_steps=5, inner_lr=0.1)
    x = _images(6, b=1, size=28)
    batch = Task(x.support_x.float(), x.support_y, x.query_x.float(), x.query_y)

    def peak(double_backward: str) -> tuple[int, Params]:
        bm = batched_model(model, double_backward=double_backward)
        with LiveTensorBytes() as count:
            g, _, _ = meta_gradient(algo, fn, F.cross_entropy, theta, batch, batched=bm, diagnostics=False)
        return count.peak, g

    few, g_few = peak("few-ops")
    native, g_native = peak("native")
    for k in theta:
        torch.testing.assert_close(g_few[k], g_native[k], rtol=1e-4, atol=1e-6)
    assert few < native, (few, native)


@pytest.mark.parametrize("algo_name", ["maml", "meta-sgd"])
def test_the_training_state_keeps_theta_packed_and_the_meta_step_reads_it_in_place(algo_name: str) -> None:
    """The state's theta lies back to back in one buffer through Adam's steps and a checkpoint
    load, and a meta-batch's raveled theta is that buffer (no theta-sized copy per step)."""
    from conftest import tiny_config

    from bilevel.metalearn.batched import as_batched
    from bilevel.metalearn.metabatch import MetaBatch
    from bilevel.metalearn.training.distributed import Dist
    from bilevel.metalearn.training.experiment import build_experiment
    from bilevel.metalearn.training.step import MetaStep, TrainState
    from bilevel.tree import packed_ravel

    cfg = tiny_config(None, algo=algo_name, meta_batch=3, dtype="float64")
    exp = build_experiment(cfg)
    state = TrainState.start(cfg, exp, Dist())
    before = packed_ravel(state.theta)
    assert before is not None and before.numel() == sum(v.numel() for v in state.theta.values())
    start = before.clone()
    step = MetaStep(cfg, exp, Dist(), 3, lambda: 0.0, lambda: False)
    for i in range(2):
        step(state, exp.train_sampler.meta_batch(i, range(3)))
    after = packed_ravel(state.theta)
    assert after is not None and after.data_ptr() == before.data_ptr() and not torch.equal(after, start)
    state.load_state_dict(state.state_dict(), "itself")
    assert packed_ravel(state.theta) is not None
    batch = exp.train_sampler.meta_batch(2, range(3))
    mb = MetaBatch(as_batched(exp.model_fn, exp.batched, False), exp.loss, exp.classification, batch,
                   state.theta, exp.algorithm.weight(state.lam))  # fmt: skip
    assert mb.theta_flat.data_ptr() == before.data_ptr()
    torch.testing.assert_close(mb.theta_flat, mb.flat(state.theta), rtol=0, atol=0)
