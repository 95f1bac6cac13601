"""Guards of the meta-learning module API and of training: arguments checked at construction, task
batches checked at the door, divergence advice from the algorithm registry, warnings where a
diagnostic crosses its documented threshold, and image files that declare too many pixels.

Every guard has a negative test naming the error type and the cause; where a guard has a healthy
side, a positive test shows that it lets healthy input through."""

from __future__ import annotations

import dataclasses
import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config
from torch import nn

from bilevel import BilevelWarning, NonFiniteError, StructureError
from bilevel.metalearn import (
    ANIL,
    FOMAML,
    IMAML,
    MAML,
    MetaSGD,
    Reptile,
    SinusoidTasks,
    Task,
    TrainConfig,
    train,
)
from bilevel.metalearn.algorithms import MetaStats
from bilevel.metalearn.data.datasets import DatasetFormatError
from bilevel.metalearn.data.images import max_image_pixels, open_image
from bilevel.metalearn.data.sources import decode_image
from bilevel.metalearn.models import omniglot_cnn
from bilevel.metalearn.registry import ALGORITHMS
from bilevel.metalearn.tasks import check_finite
from bilevel.metalearn.training.distributed import Dist
from bilevel.metalearn.training.experiment import build_experiment
from bilevel.metalearn.training.recorder import ALARMS, alarm_values
from bilevel.metalearn.training.step import _DIVERGED, MetaStep, StepRecord, StepSums, TrainState, advice
from bilevel.solvers import GradientDescent, Nesterov, NewtonCG

D = torch.float64
B = 3
SMALL = GradientDescent(lr=0.05, max_iter=2, tol=0.0)


def images(ways: int = 3, shots: int = 2, queries: int = 2) -> Task:
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(B, ways * shots, 1, 8, 8, generator=g, dtype=D)
    qx = torch.rand(B, ways * queries, 1, 8, 8, generator=g, dtype=D)
    sy = torch.arange(ways).repeat_interleave(shots).expand(B, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(queries).expand(B, -1).contiguous()
    return Task(sx, sy, qx, qy)


def waves() -> Task:
    return SinusoidTasks(4, 5, seed=0, dtype=D).meta_batch(0, B)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return omniglot_cnn(3, hidden=2, image_size=8).to(D)


def mlp(*middle: nn.Module) -> nn.Module:
    """A plain nn.Sequential (no batched structure: it runs under the vmap or loop engine)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), *middle, nn.Linear(8, 1)).to(D)


# ------------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lam=-1.0), ValueError, r"IMAML\(lam=-1.0\): lam must be > 0"),
        (dict(lam=0.0), ValueError, r"IMAML\(lam=0.0\): lam must be > 0"),
        (dict(lam=math.inf), ValueError, r"IMAML\(lam=inf\): lam must be > 0 and finite"),
        (dict(lam=math.nan), ValueError, r"IMAML\(lam=nan\): lam must be > 0"),
        (dict(lam="2"), TypeError, r"IMAML\(lam='2'\): lam must be a number, not str"),
        (dict(lam=True), TypeError, r"IMAML\(lam=True\): lam must be a number"),
        (dict(cg_iters=-1), ValueError, r"IMAML\(cg_iters=-1\): cg_iters must be >= 0"),
        (dict(cg_iters=2.5), TypeError, r"IMAML\(cg_iters=2.5\): cg_iters must be an int"),
        (dict(damping=-0.5), ValueError, r"IMAML\(damping=-0.5\): damping must be >= 0"),
        (dict(damping=math.inf), ValueError, r"IMAML\(damping=inf\): damping must be >= 0 and finite"),
        (dict(inner=GradientDescent), TypeError, r"IMAML\(inner=GradientDescent\): a class, not a solver"),
        (dict(inner="gd"), TypeError, r"IMAML\(inner='gd'\): expected an instance of GradientDescent"),
        (dict(vectorize="loop"), TypeError, r"IMAML\(vectorize='loop'\): choose the engine with a bool"),
    ],
)
def test_imaml_arguments_are_checked_at_construction(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        IMAML(mlp(), **kwargs)


@pytest.mark.parametrize("cls", [FOMAML, Reptile, MAML])
def test_a_solver_class_or_another_value_as_inner_is_refused(cls: type) -> None:
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(inner=GradientDescent\): a class, not a solver"):
        cls(mlp(), inner=GradientDescent)
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(inner=0.1\): expected an instance"):
        cls(mlp(), inner=0.1)
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(vectorize=1\): choose the engine with a bool"):
        cls(mlp(), vectorize=1)


def test_maml_takes_fixed_step_gradient_descent_only() -> None:
    with pytest.raises(TypeError, match=r"MAML\(inner=Nesterov.*expected an instance of GradientDescent"):
        MAML(mlp(), inner=Nesterov(lr=0.1, max_iter=3, tol=0.0))
    with pytest.raises(ValueError, match=r"MAML\(inner=GradientDescent.*fixed inner path.*tol=0.0"):
        MAML(mlp(), inner=GradientDescent(lr=0.1, max_iter=3, tol=1e-3))


def test_negative_or_non_finite_inner_settings_are_refused_where_the_solver_is_built() -> None:
    with pytest.raises(ValueError, match=r"GradientDescent\(lr=-0.1\): lr must be > 0"):
        IMAML(mlp(), inner=GradientDescent(lr=-0.1, max_iter=3, tol=0.0))
    with pytest.raises(ValueError, match=r"GradientDescent\(lr=inf\)"):
        FOMAML(mlp(), inner=GradientDescent(lr=math.inf, max_iter=3, tol=0.0))
    with pytest.raises(ValueError, match=r"GradientDescent\(max_iter=-1\)"):
        Reptile(mlp(), inner=GradientDescent(lr=0.1, max_iter=-1, tol=0.0))


def test_valid_arguments_build_every_learner() -> None:
    assert (
        IMAML(mlp(), lam=0.5, cg_iters=0, damping=1.0, inner=NewtonCG(), vectorize=False).algorithm.lam == 0.5
    )
    for cls in (FOMAML, Reptile, MAML):
        assert cls(mlp(), inner=SMALL).algorithm.inner == SMALL


def test_the_engine_is_a_bool_in_the_function_api_too() -> None:
    from bilevel.metalearn import make_functional, meta_gradient
    from bilevel.metalearn.batched import BatchedModel
    from bilevel.metalearn.models import mse

    fn, theta = make_functional(mlp())
    with pytest.raises(TypeError, match=r"BatchedModel.from_function\(vectorize='loop'\): choose the engine"):
        BatchedModel.from_function(fn, vectorize="loop")  # type: ignore[arg-type]
    algo = FOMAML(mlp(), inner=SMALL).algorithm
    with pytest.raises(TypeError, match=r"vectorize='vmap'"):
        meta_gradient(algo, fn, mse, theta, waves(), vectorize="vmap")  # type: ignore[arg-type]
    assert BatchedModel.from_function(fn, vectorize=False).fast is not None


def test_adapt_refuses_a_solver_class_as_inner() -> None:
    with pytest.raises(TypeError, match=r"FOMAML.adapt\(inner=GradientDescent\): a class, not a solver"):
        FOMAML(mlp(), inner=SMALL).adapt(waves(), inner=GradientDescent)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ batches at the door


def test_empty_support_or_query_sets_are_refused() -> None:
    t = waves()
    no_support = Task(t.support_x[:, :0], t.support_y[:, :0], t.query_x, t.query_y)
    no_query = Task(t.support_x, t.support_y, t.query_x[:, :0], t.query_y[:, :0])
    learner = FOMAML(mlp(), inner=SMALL)
    for call in (learner.step, learner.adapt, learner.evaluate):
        with pytest.raises(ValueError, match=r"the support sets are empty \(support_x \(3, 0, 1\)\)"):
            call(no_support)
    for call in (learner.step, learner.evaluate):
        with pytest.raises(ValueError, match=r"the query sets are empty \(query_x \(3, 0, 1\)\)"):
            call(no_query)
    assert len(learner.adapt(no_query)) == B  # adaptation reads no query set
    with pytest.raises(
        TypeError, match=r"FOMAML.step\(return_stats='yes'\): return_stats must be True or False"
    ):
        learner.step(t, return_stats="yes")  # type: ignore[arg-type]
    none = Task(*(x[:0] for x in t))
    with pytest.raises(ValueError, match=r"FOMAML.step: the meta-batch holds no tasks \(B = 0\)"):
        learner.step(none)


@pytest.mark.parametrize(
    ("field", "task", "value", "match"),
    [
        ("query_x", 2, math.nan, r"task 2 of the meta-batch has NaN in query_x \(its query inputs\)"),
        (
            "support_x",
            1,
            math.inf,
            r"task 1 of the meta-batch has infinity in support_x \(its support inputs\)",
        ),
        ("support_y", 0, -math.inf, r"task 0 .* infinity in support_y \(its support labels or targets\)"),
    ],
)
def test_non_finite_task_data_are_named_by_task_and_tensor(
    field: str, task: int, value: float, match: str
) -> None:
    t = waves()
    broken = getattr(t, field).clone()
    broken[task, 1] = value
    batch = t._replace(**{field: broken})
    learner = IMAML(mlp(), lam=2.0, inner=SMALL, cg_iters=2)
    for call in (learner.step, learner.evaluate, learner.adapt):
        if field.startswith("query") and call == learner.adapt:
            assert len(learner.adapt(batch)) == B  # adaptation reads no query set
            continue
        with pytest.raises(NonFiniteError, match=match):
            call(batch)
    assert not any(p.grad is not None for p in learner.model.parameters())  # refused before any work


def test_check_finite_names_the_meta_batch_position_of_a_ranks_task() -> None:
    t = waves()
    x = t.query_x.clone()
    x[1, 0] = math.nan
    with pytest.raises(NonFiniteError, match="rank: task 5 of the meta-batch has NaN in query_x"):
        check_finite(t._replace(query_x=x), "rank", index=[1, 5, 9])
    check_finite(t, "healthy")  # nothing to say


@pytest.mark.parametrize("make", [lambda m: MAML(m), lambda m: ANIL(m, head="head"), lambda m: MetaSGD(m)])
def test_inputs_the_model_cannot_take_are_named_before_any_work(make: Any) -> None:
    """Sinusoid tasks into a CNN: a StructureError that names the inputs' shapes and the model's
    own error (for ANIL too, rather than blaming its head); a fitting batch then runs, and the
    probe leaves the model's train/eval state as it was (batch norm that tracks running
    statistics is refused at construction, so the probe's eval mode changes no statistics)."""
    learner = make(cnn())
    for call in (learner.step, learner.adapt, learner.evaluate):
        with pytest.raises(
            StructureError,
            match=r"the model cannot take these tasks' inputs: on task 0's support_x, of shape \(4, 1\) "
            r"\(N = 4 examples of shape \(1,\)\), it raised RuntimeError: .*conv2d",
        ):
            call(waves())
    model = cnn()
    model.train()
    model.features[0].eval()  # a mixed state, kept as it is
    fit = make(model)
    fit.step(images())
    assert [m.training for m in model.modules()].count(False) == len(list(model.features[0].modules()))
    assert not model.features[0].training and model.training


@pytest.mark.parametrize(("bad", "match"), [(3, "label 3, outside 0 .. 2"), (-1, "label -1, outside 0 .. 2")])
def test_class_labels_outside_the_model_outputs_are_refused(bad: int, match: str) -> None:
    t = images()
    qy = t.query_y.clone()
    qy[1, 2] = bad
    learner = FOMAML(cnn(), inner=SMALL)
    with pytest.raises(
        ValueError, match=rf"FOMAML.step: query_y of task 1 holds the {match} \(the model returns 3"
    ):
        learner.step(t._replace(query_y=qy))
    with pytest.raises(ValueError, match=rf"FOMAML.evaluate: query_y of task 1 holds the {match}"):
        learner.evaluate(t._replace(query_y=qy))
    sy = t.support_y.clone()
    sy[0, 0] = bad
    with pytest.raises(ValueError, match=rf"FOMAML.adapt: support_y of task 0 holds the {match}"):
        learner.adapt(t._replace(support_y=sy))
    learner.step(t)  # labels 0 .. 2: accepted


def test_float_labels_name_the_dtype_the_inferred_task_type_and_how_to_set_it() -> None:
    """Class indices stored as floats are read as regression targets; the error says so."""
    t = images()
    floats = Task(t.support_x, t.support_y.to(D), t.query_x, t.query_y.to(D))
    with pytest.raises(
        ValueError,
        match=r"regression: the model returned \(6, 3\) for targets \(6,\).*labels are torch.float64, so "
        r"task_type was inferred as 'regression'; for classification convert them \(y.long\(\)\) or pass "
        r"task_type='classification'",
    ):
        FOMAML(cnn(), inner=SMALL).step(floats)
    # fixed by the user: the task type is not inferred, and the batch of the other kind is refused
    with pytest.raises(ValueError, match=r"task_type='classification' but support_y is torch.float64"):
        FOMAML(cnn(), inner=SMALL, task_type="classification").step(floats)


def test_integer_targets_name_the_inferred_classification() -> None:
    t = waves()
    ints = Task(t.support_x, t.support_y.round().long(), t.query_x, t.query_y.round().long())
    with pytest.raises(
        ValueError,
        match=r"labels are torch.int64, so task_type was inferred as 'classification'; for regression "
        r"convert them \(y.float\(\)\) or pass task_type='regression'",
    ):
        FOMAML(mlp(), inner=SMALL).step(Task(*(x.squeeze(-1) if x.dtype == torch.int64 else x for x in ints)))


def test_dropout_under_vmap_says_how_to_get_out() -> None:
    learner = FOMAML(mlp(nn.Dropout(0.3)), inner=SMALL)
    for call in (learner.step, learner.adapt, learner.evaluate):
        with pytest.raises(
            ValueError,
            match=r"Dropout '2' draws random numbers, which torch.func.vmap \(vectorize=True.*"
            r"model.eval\(\).*"
            r"FOMAML\(\.\.\., vectorize=False\)",
        ):
            call(waves())
    # the two ways out
    learner.model.eval()
    assert torch.isfinite(learner.step(waves())).all()
    learner.model.train()
    assert torch.isfinite(FOMAML(mlp(nn.Dropout(0.3)), inner=SMALL, vectorize=False).step(waves())).all()


class _Noisy(nn.Module):
    """Random numbers outside any dropout module: seen only when vmap meets them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.01 * torch.randn_like(x)


def test_other_randomness_under_vmap_says_how_to_get_out() -> None:
    with pytest.raises(
        ValueError, match=r"an operation of the model draws random numbers.*vectorize=False"
    ) as e:
        FOMAML(mlp(_Noisy()), inner=SMALL).step(waves())
    assert "randomness" in str(e.value.__cause__)  # torch.func's own error, kept as the cause
    assert torch.isfinite(FOMAML(mlp(_Noisy()), inner=SMALL, vectorize=False).step(waves())).all()


# ------------------------------------------------------------------------ divergence advice


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_divergence_advice_names_only_flags_the_algorithm_reads(algo: str) -> None:
    cfg = TrainConfig(algo=algo, dataset="sinusoid")
    said = advice(cfg, _DIVERGED)
    entry = ALGORITHMS[algo]
    specific = set().union(*(e.flags for e in ALGORITHMS.values()))
    for field in ("inner_lr", "lam", "backtrack"):
        flag = "--" + field.replace("_", "-")
        assert (flag in said) == (field in entry.flags), (algo, said)
    assert "lower --meta-lr (now 0.001)" in said and "meta_lr" not in specific
    if "lam" not in entry.flags:
        assert "--lam" not in said


def test_a_switch_already_on_is_not_advised() -> None:
    assert "use --backtrack" in advice(TrainConfig(algo="fomaml"), _DIVERGED)
    assert "backtrack" not in advice(TrainConfig(algo="fomaml", backtrack=True), _DIVERGED)
    assert advice(TrainConfig(algo="maml"), [("raise", "lam")]) == ""


def test_a_diverging_maml_run_is_not_told_to_raise_lam(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, algo="maml", meta_steps=3, inner_steps=30, inner_lr=50.0, test_tasks=2)
    with pytest.raises(
        NonFiniteError, match=r"maml: meta-step 0: .*diverged.*lower --inner-lr \(now 50\)"
    ) as e:
        train(cfg, progress=False)
    assert "--lam" not in str(e.value) and "backtrack" not in str(e.value)


def test_broken_task_data_in_training_are_named_not_called_a_divergence() -> None:
    cfg = tiny_config(None, algo="imaml-gd", meta_batch=3, dtype="float64")
    exp = build_experiment(cfg)
    d = Dist()
    state = TrainState.start(cfg, exp, d)
    batch = exp.train_sampler.meta_batch(0, range(3))
    x = batch.support_x.clone()
    x[2, 0] = math.nan
    step = MetaStep(cfg, exp, d, 3, lambda: 0.0, lambda: False)
    with pytest.raises(
        NonFiniteError, match=r"imaml-gd: meta-step 0: task 2 of the meta-batch has NaN in support_x"
    ):
        step(state, batch._replace(support_x=x))
    rec = step(state, batch)  # the same state takes a healthy batch
    assert rec.step == 0 and state.step == 1


# ------------------------------------------------------------------------ warnings during training


def _record(
    *,
    relative: list[float],
    grad: list[float],
    distance: list[float],
    negative: list[bool],
    logged: bool = True,
) -> StepRecord:
    n = len(relative)
    nan = torch.full((n,), math.nan, dtype=D)
    stats = MetaStats(
        query_loss=torch.ones(n, dtype=D),
        query_acc=nan,
        support_loss=nan,
        inner_grad_norm=torch.tensor(grad, dtype=D),
        cg_residual=nan,
        negative_curvature=torch.tensor(negative),
        cg_iters=torch.full((n,), 5.0, dtype=D),
        distance=torch.tensor(distance, dtype=D),
        cg_relative_residual=torch.tensor(relative, dtype=D),
    )
    sums = StepSums(float(n), 0.0, float(sum(negative)), 0.0, 0.0)
    return StepRecord(7, logged, sums, 1e-3, False, stats, None)


@pytest.fixture(scope="module")
def imaml_run() -> tuple[TrainConfig, Any, TrainState]:
    cfg = tiny_config(None, algo="imaml-gd", meta_batch=4, lam=2.0, cg_iters=5, dtype="float64")
    exp = build_experiment(cfg)
    return cfg, exp, TrainState.start(cfg, exp, Dist())


def test_alarm_values_are_the_documented_ratios(imaml_run: tuple[TrainConfig, Any, TrainState]) -> None:
    cfg, exp, state = imaml_run
    rec = _record(
        relative=[0.1, 0.3, 9.0, math.nan],
        grad=[1.0, 3.0, 0, 0],
        distance=[0.5, 0.5, 1.0, 0.0],
        negative=[False, False, True, False],
    )
    v = alarm_values(cfg, exp, state, rec)
    assert v["failed_tasks"] == 0.25  # 1 of 4 tasks met negative curvature
    assert v["cg_residual"] == pytest.approx(0.2)  # mean over the tasks without negative curvature
    assert v["inner_residual"] == pytest.approx(1.0 / (2.0 * 0.5))  # mean ||grad G|| / (lam mean distance)
    # an unlogged step measured only the negative curvature count
    assert set(
        alarm_values(
            cfg,
            exp,
            state,
            _record(
                relative=[1.0] * 4, grad=[1.0] * 4, distance=[1.0] * 4, negative=[True] * 4, logged=False
            ),
        )
    ) == {"failed_tasks"}


def test_first_order_runs_have_no_cg_or_inner_alarm() -> None:
    cfg = tiny_config(None, algo="fomaml")
    exp = build_experiment(cfg)
    state = TrainState.start(cfg, exp, Dist())
    rec = _record(relative=[math.nan] * 2, grad=[100.0] * 2, distance=[0.01] * 2, negative=[False] * 2)
    v = alarm_values(cfg, exp, state, rec)
    assert math.isnan(v.get("cg_residual", math.nan)) and "inner_residual" not in v


def _alarms(cfg: TrainConfig, exp: Any, state: TrainState, records: list[StepRecord]) -> list[str]:
    """The BilevelWarnings a Recorder issues for these records."""
    from bilevel.metalearn.training.console import Console
    from bilevel.metalearn.training.recorder import Recorder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(cfg, exp, Console(False), Dist(), torch.device("cpu"), state, None) as recorder:
            for rec in records:
                recorder.step(rec, state)
    return [str(w.message) for w in caught if issubclass(w.category, BilevelWarning)]


@pytest.mark.parametrize("kind", sorted(ALARMS))
def test_crossing_a_threshold_warns_once_and_staying_below_does_not(
    kind: str, imaml_run: tuple[TrainConfig, Any, TrainState], tmp_path: Path
) -> None:
    cfg, exp, state = imaml_run
    cfg = dataclasses.replace(cfg, out=str(tmp_path))
    t = ALARMS[kind].threshold
    healthy = dict(relative=[0.01] * 4, grad=[0.1] * 4, distance=[1.0] * 4, negative=[False] * 4)

    def crossing(value: float) -> dict[str, Any]:
        if kind == "cg_residual":
            return {**healthy, "relative": [value] * 4}
        if kind == "inner_residual":  # lam 2, distance 1
            return {**healthy, "grad": [2.0 * value] * 4}
        return {**healthy, "negative": [True] * round(4 * value) + [False] * (4 - round(4 * value))}

    below = 0.5 if kind == "failed_tasks" else 0.99 * t  # 2 of 4 tasks: not above a half
    above = 0.75 if kind == "failed_tasks" else 1.01 * t
    assert _alarms(cfg, exp, state, [_record(**crossing(below))] * 3) == []
    said = _alarms(cfg, exp, state, [_record(**crossing(below)), *[_record(**crossing(above))] * 3])
    assert len(said) == 1 and said[0].startswith(f"imaml-gd: meta-step 7: {kind} ")
    assert f"is above {t:g}" in said[0] and "raise --lam (now 2)" in said[0]


def test_a_run_whose_cg_solves_roughly_warns_and_a_healthy_run_does_not(tmp_path: Path) -> None:
    """Real trainings: lam 0.05 with one CG step leaves most of the residual; lam 20 with five
    steps solves the system (relative residuals near 1e-3 on this task, measured)."""
    rough = tiny_config(tmp_path / "rough", algo="imaml-gd", lam=0.05, cg_iters=1, meta_steps=2, log_every=1)
    with pytest.warns(BilevelWarning, match=r"cg_residual .* is above 0.25: .*raise --cg-iters \(now 1\)"):
        train(rough, progress=False)
    fine = tiny_config(
        tmp_path / "fine",
        algo="imaml-gd",
        lam=20.0,
        cg_iters=5,
        inner_steps=5,
        inner_lr=0.02,
        backtrack=True,
        meta_steps=2,
        log_every=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(fine, progress=False)
    assert [str(w.message) for w in caught if issubclass(w.category, BilevelWarning)] == []


# ------------------------------------------------------------------------ image files


def _png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grayscale pixels (its data are a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _png(100_000, 100_000)
    assert len(bomb) < 100
    with pytest.raises(
        DatasetFormatError, match=r"more than twice the limit of 89,478,485 pixels.*decompression bomb"
    ):
        decode_image(bomb, size=(28, 28), channels=1)


def test_an_image_above_the_pixel_limit_is_refused_with_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert max_image_pixels() == 10_000
    with pytest.raises(
        ValueError, match=r"declares a 150x100 image \(15,000 pixels\), more than the limit of 10,000"
    ):
        open_image(_png(150, 100))
    with open_image(_png(100, 100)) as im:  # at the limit: opened (only the header is read)
        assert im.size == (100, 100)


def test_a_bomb_in_a_folder_dataset_names_the_file(tmp_path: Path) -> None:
    from PIL import Image

    from bilevel.metalearn.data.folder import load_image_folder

    root = tmp_path / "data"
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for k in range(2):
            Image.new("L", (10, 10), color=40 * c + k).save(root / f"class_{c}" / f"{k}.png")
    (root / "class_1" / "1.png").write_bytes(_png(100_000, 100_000))
    with pytest.raises(DatasetFormatError, match=r"image 'class_1/1.png'.*decompression bomb"):
        load_image_folder(root, image_size=8, sizes=(1, 1, 1), cache_dir=tmp_path / "cache", workers=1)


def test_healthy_images_still_decode() -> None:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("L", (20, 10), color=200).save(buf, format="PNG")
    a = decode_image(buf.getvalue(), size=(5, 10), channels=1)
    assert a.shape == (1, 5, 10) and int(a.min()) == int(a.max()) == 200


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_door_refuses_bad_labels_and_nan_on_cuda_before_any_kernel_asserts() -> None:
    """On an accelerator an out-of-range label would end in a device-side assertion that poisons the
    CUDA context; the door reads the labels first."""
    learner = FOMAML(cnn().cuda(), inner=SMALL)
    t = images()
    qy = t.query_y.clone()
    qy[0, 0] = 7
    with pytest.raises(ValueError, match=r"label 7, outside 0 \.\. 2"):
        learner.step(t._replace(query_y=qy))
    x = t.support_x.clone()
    x[1, 0] = math.nan
    with pytest.raises(NonFiniteError, match="task 1 of the meta-batch has NaN in support_x"):
        learner.step(t._replace(support_x=x))
    assert torch.isfinite(learner.step(t)).all()  # the context is still usable
