"""A run's public seam: `build_experiment`, `load_run` and `evaluate_tasks` (experiment.py, evaluation.py)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SINUSOID
from PIL import Image

from bilevel.metalearn import (
    BatchedModel,
    ConfigError,
    EvalResult,
    Run,
    SinusoidTasks,
    Task,
    TaskSampler,
    TrainConfig,
    adapt,
    batched_model,
    build_experiment,
    evaluate_batch,
    evaluate_fixed,
    evaluate_tasks,
    load_checkpoint,
    load_run,
    make_algorithm,
    make_functional,
    mse,
    train,
)
from bilevel.metalearn.models import omniglot_cnn, sinusoid_mlp
from bilevel.metalearn.proximal import FixedLam, LearnedScalar, lam_from_config
from bilevel.metalearn.tasks import stack_tasks

SINE = {**TINY_SINUSOID, "algo": "imaml-gd", "queries": 4, "inner_steps": 3, "test_tasks": 5, "eval_batch": 2}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))


def make_folder(root: Path, n_classes: int = 15, per_class: int = 4) -> Path:
    """A folder-per-class dataset of 12x12 grayscale PNGs (class c: a bright square at a position)."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True)
        for j in range(per_class):
            a = rng.integers(0, 60, size=(12, 12), dtype=np.uint8)
            a[c % 8 : c % 8 + 4, c // 8 * 4 : c // 8 * 4 + 4] = 255
            Image.fromarray(a).save(d / f"{j}.png")
    return root


# ------------------------------------------------------------------------------------- build_experiment
def test_build_experiment_sinusoid() -> None:
    cfg = TrainConfig(**SINE, eval_inner_steps=6)  # type: ignore[arg-type]
    exp = build_experiment(cfg, device="cpu")
    assert exp.config is cfg and exp.device == torch.device("cpu") and exp.dtype == torch.float32
    assert not exp.classification and exp.loss is mse and exp.data is None and exp.split is None
    assert isinstance(exp.train_sampler, SinusoidTasks) and isinstance(exp.test_sampler, SinusoidTasks)
    assert exp.algorithm == cfg.algorithm() and exp.eval_algorithm == cfg.algorithm(evaluation=True)
    assert exp.eval_algorithm != exp.algorithm  # 6 inner steps at evaluation, 3 in training
    assert isinstance(exp.batched, BatchedModel)
    assert list(exp.theta) == [n for n, _ in sinusoid_mlp().named_parameters()]
    assert exp.model_fn(exp.theta, torch.zeros(7, 1)).shape == (7, 1)
    again = build_experiment(cfg, device="cpu", dtype=torch.float64)
    assert all(v.dtype == torch.float64 for v in again.theta.values())
    # the same seed, the same initialization (Glorot is drawn in float64, then cast)
    assert all(torch.equal(again.theta[k].float(), exp.theta[k]) for k in exp.theta)
    assert build_experiment(dataclasses.replace(cfg, batched=False)).batched is None


def test_build_experiment_image_folder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    cfg = TrainConfig(algo="fomaml", dataset="folder", ways=3, shots=1, queries=2, data_root=str(root))
    exp = build_experiment(cfg, device="cpu")
    assert exp.classification and exp.loss is F.cross_entropy
    assert exp.data is not None and exp.data.image_shape == (1, 28, 28)
    assert exp.split is not None and not set(exp.split.train_classes) & set(exp.split.test_classes)
    assert isinstance(exp.test_sampler, TaskSampler) and exp.test_sampler.eval_seed == cfg.seed + 1
    batch = exp.test_sampler.fixed_batch(range(2))
    assert batch.support_x.shape == (2, 3, 1, 28, 28) and batch.query_y.shape == (2, 6)
    assert exp.model_fn(exp.theta, batch.query_x[0]).shape == (6, 3)
    assert exp.batched is not None and exp.batched.cpu_chunk == 4


# ------------------------------------------------------------------------------------- load_run
def test_load_run_gives_back_the_trained_run(tmp_path: Path) -> None:
    cfg = TrainConfig(**SINE, meta_steps=2, eval_inner_steps=5, out=str(tmp_path))  # type: ignore[arg-type]
    metrics = train(cfg, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    run = load_run(tmp_path / "checkpoint.pt")
    assert run.step == 2 and ck["image_shape"] is None
    assert list(run.params) == list(ck["theta"])
    assert all(torch.equal(run.params[k], ck["theta"][k]) for k in ck["theta"])
    assert run.algorithm == cfg.algorithm(evaluation=True)
    assert float(run.lam) == cfg.algorithm(evaluation=True).lam == 2.0  # type: ignore[arg-type]
    assert run.config == dataclasses.replace(cfg, device="cpu")
    assert run.loss is mse and not run.classification and isinstance(run.batched, BatchedModel)
    # the run reproduces the test loss `train` reported, on the same fixed tasks
    res = evaluate_fixed(run, build_experiment(cfg, device="cpu").test_sampler, cfg.test_tasks)
    assert res.mean_loss == metrics["test_loss"] and res.n_tasks == cfg.test_tasks
    # overrides change the configuration, hence the evaluation algorithm
    seven = load_run(tmp_path / "checkpoint.pt", eval_inner_steps=7)
    assert seven.algorithm == dataclasses.replace(cfg, eval_inner_steps=7).algorithm(evaluation=True)
    # eval_lam adapts with another proximal weight (0: plain GD on the support loss), and the
    # evaluation from parts (what train reports) uses it too
    plain = load_run(tmp_path / "checkpoint.pt", eval_lam=0.0)
    assert plain.lam == FixedLam(0.0) and plain.algorithm == run.algorithm
    exp0 = build_experiment(dataclasses.replace(cfg, eval_lam=0.0), device="cpu")
    direct = evaluate_fixed(plain, exp0.test_sampler, cfg.test_tasks)
    parts = exp0.evaluate(run.params, cfg.test_tasks, None)
    assert parts["loss"] == direct.mean_loss != res.mean_loss
    with pytest.raises(TypeError, match="not TrainConfig fields"):
        load_run(tmp_path / "checkpoint.pt", inner_step=7)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run(tmp_path / "missing.pt")


def test_load_run_with_a_learned_lambda(tmp_path: Path) -> None:
    cfg = TrainConfig(**SINE, meta_steps=2, learn_lam="scalar", meta_lr=0.05, out=str(tmp_path))  # type: ignore[arg-type]
    train(cfg, progress=False)
    run = load_run(tmp_path / "checkpoint.pt")
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert isinstance(run.lam, LearnedScalar) and run.lam.leaf is not None
    assert torch.equal(run.lam.lam, ck["log_lam"]["lam"].exp())
    assert run.lam.values() == {"lam": float(ck["log_lam"]["lam"].exp())}
    assert float(run.lam) != 2.0


def test_load_run_of_an_image_folder_needs_no_data(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    cfg = TrainConfig(
        algo="fomaml",
        dataset="folder",
        ways=3,
        shots=1,
        queries=2,
        meta_batch=2,
        meta_steps=1,
        inner_steps=1,
        test_tasks=2,
        eval_batch=2,
        threads=1,
        data_root=str(root),
        out=str(tmp_path / "run"),
    )
    train(cfg, progress=False)
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["image_shape"] == [1, 28, 28]
    # a checkpoint from before `image_shape` was saved: the images are read for their shape
    del ck["image_shape"]
    torch.save(ck, tmp_path / "old.pt")
    old = load_run(tmp_path / "old.pt")
    shutil.rmtree(root)
    run = load_run(tmp_path / "run" / "checkpoint.pt")
    assert run.classification and run.loss is F.cross_entropy
    assert all(torch.equal(run.params[k], old.params[k]) for k in run.params)
    labels = torch.arange(3)
    task = Task(
        torch.rand(2, 3, 1, 28, 28), labels.repeat(2, 1), torch.rand(2, 6, 1, 28, 28), labels.repeat(2, 2)
    )
    assert evaluate_tasks(run, task).predictions.shape == (2, 6, 3)


# ------------------------------------------------------------------------------------- evaluate_tasks
def image_run(batched: bool, dtype: torch.dtype = torch.float64) -> Run:
    model = omniglot_cnn(3, hidden=8)
    fn, theta = make_functional(model, torch.Generator().manual_seed(0), dtype=dtype)
    algo = make_algorithm("imaml-gd", inner_steps=3, inner_lr=0.1, lam=1.0)
    return Run(
        model_fn=fn,
        params=theta,
        algorithm=algo,
        loss=F.cross_entropy,
        classification=True,
        batched=batched_model(model) if batched else None,
    )


def image_tasks(B: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(2)
    return Task(
        torch.rand(B, 6, 1, 28, 28, generator=g, dtype=dtype),
        labels.expand(B, 6).clone(),
        torch.rand(B, 9, 1, 28, 28, generator=g, dtype=dtype),
        torch.arange(3).repeat_interleave(3).expand(B, 9).clone(),
    )


@pytest.mark.parametrize(("batched", "vectorize"), [(True, True), (False, True), (False, False)])
def test_evaluate_tasks_predictions_and_accuracies(batched: bool, vectorize: bool) -> None:
    run, tasks = image_run(batched), image_tasks(5)
    res = evaluate_tasks(run, tasks, batch_size=5, vectorize=vectorize)
    assert isinstance(res, EvalResult) and res.n_tasks == 5
    assert res.predictions.shape == (5, 9, 3) and res.query_loss.shape == res.query_acc.shape == (5,)
    acc = (res.predictions.argmax(-1) == tasks.query_y).float().mean(-1)
    assert torch.equal(acc, res.query_acc)
    # the independent reference: adapt, then the per-task model function on each query set
    phi = adapt(run.algorithm, run.model_fn, run.loss, run.params, tasks.support_x, tasks.support_y)
    for b in range(5):
        out = run.model_fn({k: v[b] for k, v in phi.items()}, tasks.query_x[b])
        torch.testing.assert_close(res.predictions[b], out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(
            res.query_loss[b], F.cross_entropy(out, tasks.query_y[b]), rtol=1e-9, atol=0
        )
    # equal to evaluate_batch on the same tasks
    ql, qa = evaluate_batch(
        run.algorithm, run.model_fn, run.loss, run.params, tasks, vectorize=vectorize, batched=run.batched
    )
    assert torch.equal(qa, res.query_acc)
    torch.testing.assert_close(ql, res.query_loss, rtol=0, atol=0)
    # mean and 95% interval in percent
    assert res.mean_accuracy == pytest.approx(float(qa.mean()) * 100)
    assert res.ci95 == pytest.approx(1.96 * float(qa.std()) / 5**0.5 * 100)
    # a list of single tasks is the same batch; chunks of 2, 2 and 1 tasks give the same answers
    single = [Task(*(t[b] for t in tasks)) for b in range(5)]
    chunked = evaluate_tasks(run, single, batch_size=2, vectorize=vectorize)
    assert torch.equal(chunked.query_acc, res.query_acc)
    torch.testing.assert_close(chunked.predictions, res.predictions, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(chunked.query_loss, res.query_loss, rtol=1e-9, atol=0)


def test_evaluate_tasks_regression() -> None:
    exp = build_experiment(TrainConfig(**SINE), device="cpu")  # type: ignore[arg-type]
    run = exp.run()
    tasks = exp.test_sampler.fixed_batch(range(3))
    res = evaluate_tasks(run, tasks, batch_size=3)
    assert res.predictions.shape == (3, 4, 1) and bool(res.query_acc.isnan().all())
    assert res.mean_accuracy != res.mean_accuracy  # NaN
    for b in range(3):
        torch.testing.assert_close(res.query_loss[b], mse(res.predictions[b], tasks.query_y[b]))
    ql, _ = evaluate_batch(
        run.algorithm, run.model_fn, run.loss, run.params, tasks, classification=False, batched=run.batched
    )
    torch.testing.assert_close(ql, res.query_loss, rtol=0, atol=0)
    summary = exp.evaluate(exp.theta, 3)  # in chunks of eval_batch = 2
    assert summary["n_tasks"] == 3 and summary["loss"] == pytest.approx(res.mean_loss, rel=1e-6)


def test_evaluate_tasks_rejects_bad_tasks() -> None:
    run, tasks = image_run(batched=True), image_tasks(2)
    one = Task(*(t[0] for t in tasks))
    with pytest.raises(ValueError, match="leading task dimension"):
        evaluate_tasks(run, one)  # a single task, not stacked
    with pytest.raises(ValueError, match="leading task dimension"):
        evaluate_tasks(run, tasks._replace(support_y=tasks.support_y[:, :4]))
    with pytest.raises(ValueError, match="different numbers of tasks"):
        evaluate_tasks(run, tasks._replace(query_x=tasks.query_x[:1], query_y=tasks.query_y[:1]))
    with pytest.raises(ValueError, match="support examples have shape"):
        evaluate_tasks(run, tasks._replace(query_x=tasks.query_x[..., :20, :20]))
    bad = Task(*(t[0] for t in tasks))._replace(query_x=torch.rand(4, 1, 28, 28, dtype=torch.float64))
    with pytest.raises(ValueError, match="one format"):
        evaluate_tasks(run, [one, bad])
    with pytest.raises(TypeError, match="not a Task"):
        evaluate_tasks(run, [one, tuple(one)])
    with pytest.raises(TypeError, match="expected a Task"):
        evaluate_tasks(run, tasks.support_x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no tasks"):
        evaluate_tasks(run, [])
    with pytest.raises(ValueError, match="convert the tasks"):
        evaluate_tasks(run, image_tasks(2, dtype=torch.float32))
    with pytest.raises(TypeError, match="must be floating"):
        evaluate_tasks(run, tasks._replace(support_x=tasks.support_x.to(torch.uint8)))
    with pytest.raises(TypeError, match="integers"):
        evaluate_tasks(run, tasks._replace(query_y=tasks.query_y.double()))
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate_tasks(run, tasks, batch_size=0)
    sine = build_experiment(TrainConfig(**SINE), device="cpu").run()  # type: ignore[arg-type]
    single = SinusoidTasks(5, 4, seed=0).fixed_task(0)
    with pytest.raises(ValueError, match="leading task dimension"):
        evaluate_tasks(sine, single)
    assert evaluate_tasks(sine, [single]).predictions.shape == (1, 4, 1)
    assert evaluate_tasks(sine, stack_tasks([single, single])).n_tasks == 2


def test_labels_and_runs_are_checked(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    cfg = TrainConfig(algo="fomaml", dataset="folder", ways=3, shots=1, queries=2, data_root=str(root))
    exp = build_experiment(cfg, device="cpu")
    tasks = exp.test_sampler.fixed_batch(range(2))
    with pytest.raises(ValueError, match=r"3-way run needs 0..2"):
        evaluate_tasks(exp.run(), tasks._replace(query_y=tasks.query_y + 1))
    with pytest.raises(TypeError, match="expected a MetaAlgorithm"):
        dataclasses.replace(exp.run(), algorithm="imaml-gd")
    with pytest.raises(TypeError, match="non-empty dict"):
        dataclasses.replace(exp.run(), params={})
    with pytest.raises(ValueError, match=r"evaluate_fixed\(n_tasks=0\): n_tasks must be >= 1"):
        evaluate_fixed(exp.run(), exp.test_sampler, 0)
    with pytest.raises(TypeError, match=r"evaluate_fixed\(batch_size=1.5\): batch_size must be an int"):
        evaluate_fixed(exp.run(), exp.test_sampler, 2, batch_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"evaluate_tasks\(batch_size=2.5\): batch_size must be an int"):
        evaluate_tasks(exp.run(), tasks, batch_size=2.5)  # type: ignore[arg-type]


def test_reprs_are_short() -> None:
    """Run, Experiment and EvalResult print counts and settings, not tensors."""
    exp = build_experiment(TrainConfig(**SINE), device="cpu")  # type: ignore[arg-type]
    run = exp.run()
    res = evaluate_tasks(run, exp.test_sampler.fixed_batch(range(3)))
    for obj, head in (
        (exp, "Experiment(imaml-gd on sinusoid, model=MLP (1,761 parameters)"),
        (run, "Run(theta: 1,761 parameters, float32 on cpu, algorithm=MetaAlgorithm("),
        (res, "EvalResult(3 tasks, loss "),
    ):
        r = repr(obj)
        assert r.startswith(head) and len(r) < 600 and "tensor(" not in r, r
    assert "accuracy" not in repr(res) and "predictions (3, 4, 1)" in repr(res)


@pytest.mark.parametrize("algo", ["fomaml", "imaml-gd"])
def test_evaluate_takes_the_proximal_weight_of_the_train_loop(algo: str) -> None:
    """Experiment.evaluate with lam_from_config's value: a configured fixed lambda is the algorithm's
    own (fomaml's 0, not cfg.lam), a learned one is its exp(leaf), as the lambda tensor gives."""
    cfg = TrainConfig(**{**SINE, "algo": algo, "test_tasks": 4, "eval_batch": 4})  # type: ignore[arg-type]
    exp = build_experiment(cfg, device="cpu", dtype=torch.float64)
    names = list(exp.theta)
    fixed = lam_from_config("none", cfg.lam, names, device="cpu", dtype=torch.float64)

    def loss(lam: object) -> float:
        return exp.evaluate(exp.theta, 4, lam)["loss"]  # type: ignore[arg-type]  # regression: NaN accuracy

    assert loss(fixed) == loss(None)
    if algo == "imaml-gd":
        learned = lam_from_config("scalar", 0.5, names, device="cpu", dtype=torch.float64)
        as_tensor = learned.leaves()["lam"].detach().exp()
        assert loss(learned) == loss(as_tensor) != loss(None)


def test_build_experiment_refuses_a_cuda_device_this_machine_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda'.*CUDA is not available here"):
        build_experiment(TrainConfig(**SINE, device="cuda"))
    assert build_experiment(TrainConfig(**SINE)).theta["net.fc0.weight"].device.type == "cpu"
