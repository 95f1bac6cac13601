"""The command line: usage errors that name the flag, a run that talks, and a killed run that resumes.

Bad values and flags that the chosen algorithm or dataset would ignore are argparse usage
errors (exit code 2, one line, no traceback); a banner, progress and periodic results go to
standard error, the result to standard output.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from bilevel import BilevelWarning
from bilevel.metalearn import TrainConfig, load_checkpoint, train
from bilevel.metalearn.training.cli import main
from bilevel.metalearn.training.console import Console

SINE = [
    "train",
    "--algo",
    "fomaml",
    "--dataset",
    "sinusoid",
    "--shots",
    "5",
    "--queries",
    "5",
    "--meta-batch",
    "2",
    "--inner-steps",
    "2",
    "--inner-lr",
    "0.01",
    "--test-tasks",
    "3",
    "--eval-batch",
    "3",
    "--dtype",
    "float64",
    "--threads",
    "1",
]


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``main(argv)``, expect a usage error (exit code 2) and return its one-line message."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) <= 2 and ": error: " in lines[-1], text  # a short usage line, then the error
    return lines[-1]


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--log-every", "0"], "argument --log-every: 0 is refused: must be >= 1"),
        (["--eval-every", "1", "--eval-tasks", "0"], "argument --eval-tasks: 0 is refused: must be >= 1"),
        (["--eval-tasks", "5"], "argument --eval-tasks: .* --eval-every N or --eval-every-minutes M too"),
        (["--time-limit", "-1"], "argument --time-limit: -1.0 is refused: must be finite and > 0"),
        (["--meta-lr", "nan"], "argument --meta-lr: nan is refused"),
        (["--seed", "-3"], "argument --seed: -3 is refused: must be >= 0"),
        (["--lam", "0.5"], "argument --lam: iMAML's proximal weight; --algo fomaml does not use it"),
        (["--cg-iters", "3"], "argument --cg-iters: .* --algo fomaml does not use it"),
        (["--lanczos-steps", "3"], "argument --lanczos-steps: .* --algo fomaml does not use it"),
        (["--ways", "3"], "argument --ways: .* --dataset sinusoid does not use it"),
        (["--split", "lake"], "argument --split: Omniglot's class split; --dataset sinusoid"),
        (["--algo", "maml", "--backtrack"], "argument --backtrack: .* --algo maml does not use it"),
        (["--eval-lam", "0"], "argument --eval-lam: .* --algo fomaml does not use it"),
        (["--algo", "maml", "--inner-solver", "nesterov"], "argument --inner-solver: .* --algo maml"),
        (["--adam-eps", "0"], "argument --adam-eps: 0.0 is refused: must be finite and > 0"),
        (["--clip-grad-norm", "-1"], "argument --clip-grad-norm: -1.0 is refused: must be finite and > 0"),
        (["--cg-warm-start"], "argument --cg-warm-start: .* --algo fomaml does not use it"),
        (["--device", "cuda:99"], "argument --device"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    flags: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if flags == ["--device", "cuda:99"] and torch.cuda.device_count() >= 100:
        pytest.skip("a machine with 100 GPUs")
    import re

    msg = usage_error(capsys, [*SINE, *flags, "--out", str(tmp_path / "o")])
    assert re.search(match, msg), msg
    assert not (tmp_path / "o").exists()


def test_compile_flag_modes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Bare --compile is torch.compile's default mode; a mode can be named; others are refused."""
    from bilevel.metalearn.training.cli import _parser, config_from_args

    assert config_from_args(_parser().parse_args([*SINE])).compile == "none"
    assert config_from_args(_parser().parse_args([*SINE, "--compile"])).compile == "default"
    cfg = config_from_args(_parser().parse_args([*SINE, "--compile", "reduce-overhead"]))
    assert cfg.compile == "reduce-overhead"
    msg = usage_error(capsys, [*SINE, "--compile", "fast", "--out", str(tmp_path / "o")])
    assert "argument --compile: invalid choice: 'fast'" in msg


def test_the_algorithms_own_flags_are_accepted(tmp_path: Path) -> None:
    # --lam is iMAML's; a preset's values are not flags, so a preset with another algorithm is fine
    from bilevel.metalearn.training.cli import _parser, config_from_args

    cfg = config_from_args(
        _parser().parse_args([*SINE, "--algo", "imaml-gd", "--lam", "0.5", "--cg-iters", "2"])
    )
    assert cfg.lam == 0.5 and cfg.cg_iters == 2
    assert not cfg.cg_warm_start and not cfg.algorithm().meta_gradient.warm_start  # type: ignore[union-attr]
    cfg = config_from_args(_parser().parse_args([*SINE, "--algo", "imaml-gd", "--cg-warm-start"]))
    assert cfg.cg_warm_start and cfg.algorithm().meta_gradient.warm_start  # type: ignore[union-attr]
    cfg = config_from_args(_parser().parse_args(["train", "--preset", "sinusoid-5s", "--algo", "maml"]))
    assert cfg.algo == "maml" and cfg.dataset == "sinusoid"


def test_a_preset_gives_each_algorithm_its_measured_settings() -> None:
    from bilevel.metalearn.training.cli import _parser, config_from_args

    def cfg(*flags: str) -> TrainConfig:
        return config_from_args(_parser().parse_args(["train", *flags]))

    gd = cfg("--preset", "omniglot-5w1s", "--algo", "imaml-gd")
    assert (gd.ways, gd.shots, gd.lam, gd.backtrack, gd.inner_steps, gd.cg_iters) == (5, 1, 0.5, True, 16, 5)
    assert (gd.meta_batch, gd.meta_lr, gd.lr_schedule, gd.init) == (16, 1e-3, "cosine", "torch")
    assert gd.clip_grad_norm == 1.0
    fo = cfg("--preset", "omniglot-5w1s", "--algo", "fomaml")
    assert (fo.inner_steps, fo.inner_lr, fo.eval_inner_steps, fo.backtrack) == (5, 0.4, 10, False)
    assert (fo.lr_schedule, fo.clip_grad_norm) == ("constant", None)
    ma = cfg("--preset", "omniglot-5w1s", "--algo", "maml")
    assert (ma.inner_steps, ma.inner_lr) == (1, 0.4)
    # no measurement for reptile: the paper's settings, as for every algorithm of paper-omniglot-5w1s
    re = cfg("--preset", "omniglot-5w1s", "--algo", "reptile")
    paper = cfg("--preset", "paper-omniglot-5w1s", "--algo", "imaml-gd")
    for c in (re, paper):
        assert (c.inner_steps, c.lam, c.cg_iters, c.backtrack, c.init) == (16, 2.0, 5, False, "glorot")
    w20 = cfg("--preset", "omniglot-20w1s", "--algo", "imaml-gd")
    assert (w20.ways, w20.inner_steps, w20.lam, w20.backtrack, w20.clip_grad_norm) == (20, 25, 0.5, True, 1.0)
    assert w20.lr_schedule == "constant"
    assert cfg("--preset", "paper-omniglot-20w1s", "--algo", "imaml-gd").lam == 2.0
    # explicit flags still win
    assert cfg("--preset", "omniglot-5w1s", "--algo", "imaml-gd", "--lam", "2").lam == 2.0


def test_the_released_recipe_then_the_preset_then_the_flags() -> None:
    from bilevel.metalearn.training.cli import _parser, config_from_args
    from bilevel.metalearn.training.config import RECIPES

    cfg = config_from_args(_parser().parse_args(["train", "--recipe", "released"]))
    assert {k: getattr(cfg, k) for k in RECIPES["released"]} == RECIPES["released"]
    cfg = config_from_args(
        _parser().parse_args(
            ["train", "--recipe", "released", "--preset", "omniglot-20w1s", "--meta-batch", "8"]
        )
    )
    assert (cfg.algo, cfg.ways, cfg.inner_steps, cfg.meta_batch, cfg.adam_eps) == (
        "imaml-released",
        20,
        25,
        8,
        1e-3,
    )
    # an explicit --algo wins over the recipe's (the rest of the recipe stays)
    cfg = config_from_args(_parser().parse_args(["train", "--recipe", "released", "--algo", "imaml-gd"]))
    assert cfg.algo == "imaml-gd" and cfg.eval_lam == 0.0 and cfg.init == "released"
    assert config_from_args(_parser().parse_args(["train"])).algo == "imaml-gd"


def test_resume_errors_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "run")
    msg = usage_error(capsys, [*SINE, "--meta-steps", "1", "--resume", "--out", out])
    assert "nothing to resume: no checkpoint at" in msg
    assert main([*SINE, "--meta-steps", "1", "--quiet", "--out", out]) == 0
    capsys.readouterr()
    msg = usage_error(capsys, [*SINE, "--meta-steps", "1", "--meta-batch", "3", "--resume", "--out", out])
    assert "meta_batch: saved 2, now 3" in msg
    assert "already holds a run" in usage_error(capsys, [*SINE, "--meta-steps", "1", "--out", out])
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    msg = usage_error(capsys, ["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt")])
    assert "the file is empty" in msg


def test_help_shows_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for dup in ("(default: None)", "(default: False)", ") (default"):  # a formatter's second copy
        assert dup not in text
    assert "--ways WAYS classes per task (default 5) --shots" in text


def test_the_command_line_talks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = [*SINE, "--meta-steps", "4", "--eval-every", "2", "--eval-tasks", "2", "--log-every", "2"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    err = cap.err
    assert "bilevel.metalearn train: fomaml on sinusoid regression, 5 support and 5 query points" in err
    assert "meta-training: 4 steps of 2 tasks" in err and "device cpu (float64, 1 threads" in err
    assert f"output {out.resolve()}" in err
    assert "step 2: query MSE" in err and "step 4: query MSE" in err  # periodic results, printed
    assert "fomaml: 2/4 steps" in err and "fomaml: 4/4 steps" in err  # plain lines, no terminal
    assert "final evaluation: 3/3 tasks" in err
    # the result: in words that fit a regression (no "accuracy nan +- nan %")
    assert "test MSE" in cap.out and "nan" not in cap.out and "metrics.json" in cap.out
    assert (
        main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--test-tasks", "4", "--no-progress"]) == 0
    )
    cap = capsys.readouterr()
    assert "bilevel.metalearn eval:" in cap.err and "evaluation: 3/4 tasks" in cap.err
    assert "evaluation: 4/4 tasks" in cap.err and json.loads(cap.out)["n_tasks"] == 4
    assert main([*argv, "--quiet", "--out", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().err == ""


def test_console_modes() -> None:
    buf = io.StringIO()  # not a terminal: plain lines
    c = Console(True, buf, min_interval=0.0)
    assert c.mode == "lines"
    with c.progress(4, "work", unit="task", every=2) as p:
        for _ in range(4):
            p.update(1, loss="0.5")
    assert buf.getvalue().count("work: ") == 2 and "work: 4/4 tasks  loss 0.5" in buf.getvalue()
    quiet = io.StringIO()
    with Console(False, quiet).progress(3, "x", unit="step") as p:
        p.update(3)
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="progress='loud'"):
        Console("loud")  # type: ignore[arg-type]


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """SIGKILL mid-run (no handler runs), then --resume: the run continues from its last checkpoint
    and ends where an uninterrupted run ends (float64, one thread: to the bit)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "bilevel.metalearn", *SINE, "--log-every", "1", "--checkpoint-every", "2"]
    proc = subprocess.Popen(
        [*cmd, "--meta-steps", "1000000", "--quiet", "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    try:
        while not (out / "checkpoint.pt").exists() or load_checkpoint(out / "checkpoint.pt")["step"] < 4:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "metrics.json").exists()
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    total = step + 2
    r = subprocess.run(
        [*cmd, "--meta-steps", str(total), "--resume", "--no-progress", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from step {step} " in r.stderr
    # the killed run's lock names a pid that no longer runs: replaced, with a word
    assert "replacing the stale lock" in r.stderr and not (out / "run.lock").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta_steps_done"] == total and not metrics["stopped_early"]
    # the killed run logged steps past its checkpoint: they are redone, not duplicated
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(total))
    straight = tmp_path / "straight"
    cfg = TrainConfig(**{**metrics["config"], "out": str(straight)})
    train(cfg, progress=False)
    a, b = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(straight / "checkpoint.pt")
    for k in a["theta"]:
        torch.testing.assert_close(a["theta"][k], b["theta"][k], rtol=0, atol=0)


def test_a_crossed_threshold_warns_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The library's warnings reach a command-line user as ``warning: ...``, without a source line."""
    argv = [*SINE, "--algo", "imaml-gd", "--inner-steps", "3", "--meta-steps", "2", "--meta-batch", "4"]
    with warnings.catch_warnings():  # a fresh process's registry: an earlier test may have warned alike
        warnings.simplefilter("always", BilevelWarning)
        assert main([*argv, "--no-progress", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert warned and all("imaml-gd: meta-step" in ln for ln in warned), err
    assert "BilevelWarning" not in err and "recorder.step(" not in err  # not Python's format
