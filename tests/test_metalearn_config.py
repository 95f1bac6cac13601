"""TrainConfig checks every field at construction, with a typed error that names it."""

from __future__ import annotations

import pytest

from bilevel.metalearn import ConfigError, TrainConfig


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("log_every", 0, "must be >= 1 .steps between log records"),
        ("eval_tasks", 0, "must be >= 1"),
        ("eval_every", -1, "must be >= 0"),
        ("checkpoint_every", -5, "must be >= 0"),
        ("time_limit", -1.0, "must be finite and > 0"),
        ("time_limit", float("inf"), "must be finite and > 0"),
        ("meta_lr", 0.0, "must be finite and > 0"),
        ("inner_lr", float("nan"), "must be finite and > 0"),
        ("lam", -2.0, "must be finite and > 0"),
        ("damping", -0.1, "must be finite and >= 0"),
        ("seed", -1, "must be >= 0"),
        ("threads", 0, "must be >= 1"),
        ("task_chunk", 0, "must be >= 1 .tasks per meta-gradient chunk"),
        ("task_chunk", 2.0, "must be an integer"),
        ("newton_iters", 0, "must be >= 1"),
        ("meta_batch", 2.5, "must be an integer"),
        ("ways", True, "must be an integer"),
        ("meta_lr", "fast", "must be a number"),
        ("split", "random", "choose one of vinyals or lake"),
        ("batched", "yes", "must be True or False"),
        ("out", "", "must name an output folder"),
        ("device", "gpu0", "not a device"),
        ("ways", 1, "needs ways >= 2"),
        ("lanczos_steps", -1, "must be >= 0"),
        ("eval_lam", -1.0, "must be finite and >= 0"),
        ("adam_eps", 0.0, "must be finite and > 0"),
        ("clip_grad_norm", 0.0, "must be finite and > 0 .the largest meta-gradient norm"),
        ("clip_grad_norm", float("nan"), "must be finite and > 0"),
        ("task_pool", -1, "must be >= 0"),
        ("inner_solver", "lbfgs", "choose one of gd, nesterov or trust-region"),
        ("init", "he", "choose one of glorot, torch or released"),
        ("compile", "fast", "choose one of none, default, reduce-overhead or max-autotune-no-cudagraphs"),
    ],
)
def test_every_field_is_checked(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        TrainConfig(**{field: value})  # type: ignore[arg-type]
    assert err.value.field == field and str(err.value).startswith(f"TrainConfig({field}=")


def test_contradictions_are_refused() -> None:
    with pytest.raises(ConfigError, match="own line search: drop backtrack"):
        TrainConfig(algo="imaml-hf", backtrack=True)
    with pytest.raises(ConfigError, match="fixed inner path: drop backtrack"):
        TrainConfig(algo="maml", backtrack=True)
    with pytest.raises(ConfigError, match="released code's fixed-step loop"):
        TrainConfig(algo="imaml-released", backtrack=True)
    with pytest.raises(ConfigError, match="implicit iMAML algorithm"):
        TrainConfig(algo="imaml-released", learn_lam="scalar")
    with pytest.raises(ValueError, match="no backtrack"):
        TrainConfig(inner_solver="nesterov", backtrack=True)
    with pytest.raises(ConfigError, match="replaces imaml-hf's line search; fomaml takes gd or nesterov"):
        TrainConfig(algo="fomaml", inner_solver="trust-region")
    assert TrainConfig(dataset="sinusoid", ways=1).ways == 1  # a sinusoid task has no classes


def test_the_released_recipe_is_a_valid_configuration_of_the_released_algorithm() -> None:
    from bilevel.metalearn.algorithms import ReleasedCG
    from bilevel.metalearn.training.config import RECIPES
    from bilevel.solvers import GradientDescent

    cfg = TrainConfig(**RECIPES["released"])
    algo = cfg.algorithm()
    released_loop = GradientDescent(lr=0.1, max_iter=16, tol=0.0)
    assert algo.inner == released_loop and algo.meta_gradient == ReleasedCG(5, 1.0, 10.0)
    assert algo.lam == 2.0 and cfg.meta_batch == 32 and cfg.adam_eps == 1e-3 and cfg.task_pool == 200_000
    assert cfg.evaluation_lam(2.0) == 0.0 and cfg.algorithm(evaluation=True).inner == released_loop
    assert TrainConfig().evaluation_lam(2.0) == 2.0  # as trained unless eval_lam is set


def test_resume_conflicts_list_the_fields_that_shape_the_run() -> None:
    saved = TrainConfig(algo="fomaml", meta_steps=100)
    assert saved.resume_conflicts(saved) == []
    more = TrainConfig(algo="fomaml", meta_steps=200, test_tasks=10, device="cpu", log_every=1)
    assert more.resume_conflicts(saved) == []
    other = TrainConfig(algo="maml", meta_steps=200, inner_lr=0.5)
    assert other.resume_conflicts(saved) == [
        "algo: saved 'fomaml', now 'maml'",
        "inner_lr: saved 0.1, now 0.5",
    ]
    cos = TrainConfig(algo="fomaml", meta_steps=200, lr_schedule="cosine")
    assert "meta_steps: saved 100, now 200" in cos.resume_conflicts(
        TrainConfig(algo="fomaml", lr_schedule="cosine", meta_steps=100)
    )
