"""The algorithm registry: one entry per name; the command line and the configuration derive from it."""

from __future__ import annotations

import pytest

from bilevel.metalearn.gradients import (
    FirstOrder,
    HeadOnly,
    Implicit,
    LearnedSteps,
    ReleasedCG,
    ReptileStep,
    Unrolled,
)
from bilevel.metalearn.registry import ALGORITHMS, INNER_KINDS, make_algorithm, readers
from bilevel.metalearn.training.cli import ALGO_FLAGS, main
from bilevel.metalearn.training.config import ALGOS, IMAML_ALGOS, IMPLICIT_ALGOS, ConfigError, TrainConfig
from bilevel.solvers import GradientDescent, Nesterov, NewtonCG, StepHalving, TrustRegionNewtonCG


def test_the_names_are_the_registrys() -> None:
    assert ALGOS == (
        "imaml-gd",
        "imaml-hf",
        "maml",
        "fomaml",
        "reptile",
        "imaml-released",
        "anil",
        "meta-sgd",
    )
    assert IMAML_ALGOS == ("imaml-gd", "imaml-hf", "imaml-released")
    assert IMPLICIT_ALGOS == ("imaml-gd", "imaml-hf")
    assert set(INNER_KINDS) == {"gd", "nesterov", "trust-region"}
    for field, (algos, _) in ALGO_FLAGS.items():
        assert algos == tuple(a for a in ALGOS if field in ALGORITHMS[a].flags)


@pytest.mark.parametrize(
    ("name", "inner", "kind", "lam"),
    [
        ("imaml-gd", GradientDescent(lr=0.1, max_iter=16, tol=0.0), Implicit(5, 0.0, False), 2.0),
        ("imaml-hf", NewtonCG(newton_iters=3, cg_iters=5), Implicit(5, 0.0, False), 2.0),
        ("maml", GradientDescent(lr=0.1, max_iter=16, tol=0.0), Unrolled(), 0.0),
        ("fomaml", GradientDescent(lr=0.1, max_iter=16, tol=0.0), FirstOrder(), 0.0),
        ("reptile", GradientDescent(lr=0.1, max_iter=16, tol=0.0), ReptileStep(), 0.0),
        ("imaml-released", GradientDescent(lr=0.1, max_iter=16, tol=0.0), ReleasedCG(5, 0.0), 2.0),
        ("anil", GradientDescent(lr=0.1, max_iter=16, tol=0.0), HeadOnly(), 0.0),
        ("meta-sgd", GradientDescent(lr=0.1, max_iter=16, tol=0.0), LearnedSteps(0.1), 0.0),
    ],
)
def test_each_entry_builds_its_algorithm(name: str, inner: object, kind: object, lam: float) -> None:
    algo = make_algorithm(name)
    assert algo.inner == inner and algo.meta_gradient == kind and algo.lam == lam
    assert TrainConfig(algo=name).algorithm() == algo


def test_inner_solver_kinds_and_switches() -> None:
    assert make_algorithm("fomaml", inner_solver="nesterov", inner_steps=4).inner == Nesterov(
        lr=0.1, max_iter=4, tol=0.0, restart=True
    )
    assert make_algorithm("imaml-hf", inner_solver="trust-region").inner == TrustRegionNewtonCG(
        newton_iters=3, cg_iters=5, radius=0.3, tol=0.0
    )
    bt = make_algorithm("reptile", backtrack=True, inner_tol=1e-3).inner
    assert bt == GradientDescent(lr=0.1, max_iter=16, tol=1e-3, line_search=StepHalving())


def test_an_entry_refuses_what_it_does_not_read() -> None:
    with pytest.raises(ValueError, match="own line search: drop backtrack"):
        make_algorithm("imaml-hf", backtrack=True)
    with pytest.raises(
        ValueError, match="inner_solver='nesterov' is for imaml-gd, fomaml and reptile, not imaml-hf"
    ):
        make_algorithm("imaml-hf", inner_solver="nesterov")
    with pytest.raises(
        ConfigError, match="nesterov' is for imaml-gd, fomaml and reptile, not imaml-released"
    ):
        TrainConfig(algo="imaml-released", inner_solver="nesterov")
    with pytest.raises(ConfigError, match=r"implicit iMAML algorithm \(imaml-gd or imaml-hf\), not reptile"):
        TrainConfig(algo="reptile", learn_lam="per-tensor")
    with pytest.raises(TypeError, match="steps"):
        make_algorithm("maml", steps=3)
    assert ALGORITHMS["maml"].refusal("cg_iters", 7) is None  # a preset may set it; the flag is refused
    assert ALGORITHMS["imaml-gd"].refusal("backtrack", True) is None
    assert readers("newton_iters") == ("imaml-hf",)


def test_the_command_line_refuses_a_flag_the_entry_does_not_read(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["train", "--algo", "maml", "--cg-iters", "3", "--dataset", "sinusoid"])
    assert err.value.code == 2
    assert (
        "argument --cg-iters: the CG steps of iMAML's meta-gradient; --algo maml does not use it "
        "(it applies to imaml-gd, imaml-hf, imaml-released): drop it"
    ) in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["train", "--algo", "imaml-released", "--inner-solver", "nesterov", "--dataset", "sinusoid"])
    assert err.value.code == 2
    assert "it applies to imaml-gd, imaml-hf, fomaml, reptile" in capsys.readouterr().err
