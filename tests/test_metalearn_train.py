"""Meta-training loop and command line: outputs, resume, evaluation, distributed equivalence."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_metalearn_data import make_omniglot  # generated images in the official layout
from torch.optim.optimizer import register_optimizer_step_pre_hook

import bilevel as bl
from bilevel.metalearn import DatasetNotFoundError, TrainConfig, build_experiment, load_checkpoint, train
from bilevel.metalearn.models import omniglot_cnn
from bilevel.metalearn.training.cli import main

FAST = ["--meta-batch", "2", "--test-tasks", "4", "--eval-batch", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def omni(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_omniglot(tmp_path_factory.mktemp("omni"), layout="zip")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))


def test_cli_train_writes_metrics_split_and_checkpoint(omni: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        "--algo",
        "imaml-gd",
        "--ways",
        "3",
        "--shots",
        "1",
        "--queries",
        "2",
        "--meta-steps",
        "3",
        "--inner-steps",
        "2",
        "--split",
        "lake",
        "--data-root",
        str(omni),
        "--out",
        str(out),
        *FAST,
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 100.0 and metrics["test_ci95"] >= 0.0
    assert metrics["config"]["algo"] == "imaml-gd" and metrics["meta_steps_done"] == 3
    assert metrics["environment"]["torch"] == torch.__version__
    split = json.loads((out / "split.json").read_text())
    assert split["train_classes"] and split["test_classes"]
    assert not set(split["train_classes"]) & set(split["test_classes"])
    assert all(c.startswith("images_background") for c in split["train_classes"])
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 3 and ck["image_shape"] == [1, 28, 28]
    assert list(ck["theta"]) == [n for n, _ in omniglot_cnn(3).named_parameters()]
    lines = (out / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 0


def test_resume_continues_exactly(tmp_path: Path) -> None:
    common = dict(meta_batch=3, dtype="float64")
    straight = tmp_path / "straight"
    train(tiny_config(straight, meta_steps=4, **common), progress=False)
    part = tmp_path / "part"
    train(tiny_config(part, meta_steps=2, **common), progress=False)
    train(tiny_config(part, meta_steps=4, **common), resume=True, progress=False)
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for k in a["theta"]:
        torch.testing.assert_close(a["theta"][k], b["theta"][k], rtol=0, atol=0)
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]


@pytest.mark.parametrize("algo", ["imaml-gd", "imaml-hf", "maml", "fomaml", "reptile"])
def test_every_algorithm_trains_on_sinusoid(algo: str, tmp_path: Path) -> None:
    metrics = train(tiny_config(tmp_path, algo=algo, meta_steps=3, test_tasks=4), progress=False)
    assert (
        metrics["test_loss"] > 0 and metrics["test_accuracy"] != metrics["test_accuracy"]
    )  # NaN: regression


def test_a_diverging_inner_solver_stops_training_with_a_clear_error(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        meta_steps=3,
        inner_steps=30,
        inner_lr=50.0,  # GD on a loss of curvature ~10-100: diverges to infinity, then NaN
        test_tasks=2,
    )
    with pytest.raises(bl.NonFiniteError, match="lower --inner-lr"):
        train(cfg, progress=False)


@pytest.mark.parametrize("batched", [True, False])
def test_batched_and_vmap_training_agree(batched: bool, tmp_path: Path) -> None:
    """Two meta-steps of iMAML on the sinusoid MLP in float64: same metrics either way."""
    runs = []
    for b in (True, False):
        cfg = tiny_config(
            tmp_path / str(b),
            algo="imaml-gd",
            meta_batch=3,
            inner_steps=3,
            test_tasks=4,
            dtype="float64",
            batched=b,
            vectorize=batched,
        )
        runs.append(train(cfg, progress=False))
    assert runs[0]["test_loss"] == pytest.approx(runs[1]["test_loss"], rel=1e-10)


def test_torch_init_is_seeded_and_differs_from_glorot() -> None:
    def theta(init: str, seed: int) -> dict[str, torch.Tensor]:
        cfg = tiny_config(init=init, seed=seed)
        return build_experiment(cfg, device="cpu", dtype=torch.float32).theta

    a, b, c, g = theta("torch", 0), theta("torch", 0), theta("torch", 1), theta("glorot", 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.fc0.weight"], c["net.fc0.weight"])
    assert not torch.equal(a["net.fc1.weight"], g["net.fc1.weight"])
    bound = 1 / 40**0.5  # PyTorch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(a["net.fc1.weight"].abs().max()) <= bound
    with pytest.raises(ValueError, match="glorot, torch or released"):
        TrainConfig(init="he")
    r = theta("released", 0)  # Glorot gain 1.73, biases in [0, 0.05], seeded like glorot
    # the first layer draws the same numbers as glorot's, scaled by the gain
    torch.testing.assert_close(r["net.fc0.weight"], 1.73 * g["net.fc0.weight"])
    assert float(r["net.fc0.bias"].min()) >= 0 and 0 < float(r["net.fc0.bias"].max()) <= 0.05
    assert all(torch.equal(r[k], theta("released", 0)[k]) for k in r)


def test_learned_lambda_moves_and_is_saved(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        algo="imaml-gd",
        meta_steps=5,
        meta_lr=0.05,
        inner_steps=3,
        learn_lam="per-tensor",
        test_tasks=2,
    )
    metrics = train(cfg, progress=False)
    lams = metrics["lam"]
    assert len(lams) == 6 and any(abs(v - 2.0) > 1e-3 for v in lams.values())
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(ck["log_lam"]) == set(lams)


def test_learned_lambda_per_tensor_with_damping_from_the_command_line(tmp_path: Path) -> None:
    """``--learn-lam per-tensor --damping 0.5`` trains end to end: every lam moves, the config
    keeps the damping, and a run resumed from its checkpoint equals one that never stopped."""
    args = ["train", "--algo", "imaml-gd", "--dataset", "sinusoid", "--shots", "5", "--queries", "5"]
    args += ["--inner-steps", "3", "--inner-lr", "0.01", "--meta-lr", "0.05", "--learn-lam", "per-tensor"]
    args += ["--damping", "0.5", "--dtype", "float64", *FAST]
    straight, part = tmp_path / "straight", tmp_path / "part"
    assert main([*args, "--meta-steps", "4", "--out", str(straight)]) == 0
    assert main([*args, "--meta-steps", "2", "--out", str(part)]) == 0
    assert main([*args, "--meta-steps", "4", "--out", str(part), "--resume"]) == 0
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["config"]["damping"] == 0.5 and metrics["config"]["learn_lam"] == "per-tensor"
    assert len(metrics["lam"]) == 6 and all(abs(v - 2.0) > 1e-4 for v in metrics["lam"].values())
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for k in a["theta"]:
        torch.testing.assert_close(a["theta"][k], b["theta"][k], rtol=0, atol=0)
    for k in a["log_lam"]:
        torch.testing.assert_close(a["log_lam"][k], b["log_lam"][k], rtol=0, atol=0)
    # the damping reaches the meta-gradient: the same run without it ends elsewhere
    plain = tmp_path / "plain"
    undamped = args[: args.index("--damping")] + args[args.index("--damping") + 2 :]
    assert main([*undamped, "--meta-steps", "4", "--out", str(plain)]) == 0
    c = load_checkpoint(plain / "checkpoint.pt")
    assert any(not torch.allclose(a["log_lam"][k], c["log_lam"][k], rtol=1e-6) for k in a["log_lam"])


def test_cosine_schedule_decays_to_zero_and_is_logged(tmp_path: Path) -> None:
    cfg = TrainConfig(meta_steps=100, meta_lr=1e-3, lr_schedule="cosine")
    assert cfg.scheduled_lr(0, 0.0) == pytest.approx(1e-3)
    assert cfg.scheduled_lr(50, 0.0) == pytest.approx(5e-4)
    assert cfg.scheduled_lr(100, 0.0) == pytest.approx(0.0, abs=1e-18)
    # with a time limit the schedule follows whichever budget is used up faster
    timed = dataclasses.replace(cfg, time_limit=10.0)
    assert timed.scheduled_lr(10, 300.0) == pytest.approx(5e-4)
    assert timed.scheduled_lr(10, 10_000.0) == pytest.approx(0.0, abs=1e-18)
    assert timed.past_time_limit(601.0) and not timed.past_time_limit(599.0) and not cfg.past_time_limit(1e9)
    assert dataclasses.replace(cfg, lr_schedule="constant").scheduled_lr(99, 0.0) == 1e-3
    with pytest.raises(ValueError, match="constant or cosine"):
        TrainConfig(lr_schedule="step")
    run = tiny_config(tmp_path, meta_steps=4, meta_lr=1e-3, lr_schedule="cosine", log_every=1, test_tasks=2)
    lrs = [r["meta_lr"] for r in train(run, progress=False)["curves"]["steps"]]
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])


def test_eval_command_reads_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(tiny_config(tmp_path, meta_steps=1), progress=False)
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "checkpoint.pt"),
                "--test-tasks",
                "5",
                "--out",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["n_tasks"] == 5 and res["step"] == 1
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == res["loss"]


def test_missing_data_says_where_to_get_omniglot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the library raises; the command line says it in one line (exit code 1) and writes nothing
    with pytest.raises(DatasetNotFoundError, match="brendenlake/omniglot"):
        train(TrainConfig(data_root=str(tmp_path / "nowhere"), out=str(tmp_path / "o")), progress=False)
    assert main(["train", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "error: Omniglot: data root" in err and "brendenlake/omniglot" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # no empty output folder left behind
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(tmp_path / "none.pt")])
    assert exit_.value.code == 2 and "no checkpoint at" in capsys.readouterr().err


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--algo",
        "--ways",
        "--shots",
        "--meta-steps",
        "--meta-batch",
        "--data-root",
        "--split",
        "--out",
        "--preset",
        "--seed",
        "--resume",
        "--learn-lam",
        "--cg-iters",
        "--damping",
    ):
        assert flag in text


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="choose one of imaml-gd"):
        TrainConfig(algo="sgd")
    with pytest.raises(ValueError, match="learned lambda needs an implicit iMAML"):
        TrainConfig(algo="maml", learn_lam="scalar")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m bilevel.metalearn ARGS`` under torchrun with 2 local ranks."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "bilevel.metalearn",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    """torchrun with 2 CPU ranks = 1 process with the same total meta-batch, to 1e-6 (float64)."""
    args = [
        "train",
        "--algo",
        "imaml-gd",
        "--dataset",
        "sinusoid",
        "--shots",
        "5",
        "--queries",
        "5",
        "--meta-batch",
        "4",
        "--meta-steps",
        "3",
        "--inner-steps",
        "3",
        "--inner-lr",
        "0.01",
        "--learn-lam",
        "scalar",
        "--test-tasks",
        "2",
        "--dtype",
        "float64",
        "--no-progress",
        "--threads",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, "-m", "bilevel.metalearn", *args, "--out", str(one)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    two = tmp_path / "two"
    r = _torchrun([*args, "--out", str(two)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert a["step"] == b["step"] == 3
    for k in a["theta"]:
        torch.testing.assert_close(a["theta"][k], b["theta"][k], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["log_lam"]["lam"], b["log_lam"]["lam"], rtol=0, atol=1e-6)
    assert not torch.equal(a["log_lam"]["lam"], torch.tensor(0.6931471805599453, dtype=torch.float64))
    # only rank 0 wrote files
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    # A time limit stops every rank at the same step although their clocks differ: rank 0's
    # clock leaves out its evaluations (every step here), which the other rank spends waiting.
    timed = tmp_path / "timed"
    r = _torchrun(
        [
            *args,
            "--meta-steps",  # the later flag wins: until the time limit
            "100000",
            "--eval-every",
            "1",
            "--eval-tasks",
            "20",
            "--time-limit",
            "0.05",
            "--clock",
            "wall",
            "--out",
            str(timed),
        ],
        env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((timed / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["meta_steps_done"] >= 1


def test_sigterm_stops_after_the_step_and_still_evaluates(tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bilevel.metalearn",
            "train",
            "--algo",
            "fomaml",
            "--dataset",
            "sinusoid",
            "--shots",
            "5",
            "--meta-steps",
            "1000000",
            "--meta-batch",
            "2",
            "--inner-lr",
            "0.01",
            "--test-tasks",
            "3",
            "--log-every",
            "1",
            "--no-progress",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text().count("\n") >= 2:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] and 2 <= metrics["meta_steps_done"] < 1000000
    assert load_checkpoint(out / "checkpoint.pt")["step"] == metrics["meta_steps_done"]


def test_more_cuda_ranks_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun --nproc_per_node=2 on a one-GPU machine: nccl would fail with "invalid device ordinal"
    from bilevel.metalearn.training.distributed import Dist, init_distributed, rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for local_rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(bl.BilevelError, match=r"2 ranks on this node .* 1 GPU\(s\); nccl needs one GPU"):
            init_distributed(torch.device("cuda"))
    with pytest.raises(bl.BilevelError, match="--nproc_per_node=1 or fewer, or train on the CPU"):
        rank_device(torch.device("cuda"), Dist(rank=1, world=2))
    assert rank_device(torch.device("cpu"), Dist(rank=1, world=2)) == torch.device("cpu")


def test_clip_grad_norm_rescales_what_adam_sees_and_logs_the_norm_before(tmp_path: Path) -> None:
    """Step 0 has the same theta and batch with and without clipping: Adam must receive the
    unclipped meta-gradient times clip / norm, and both logs the unclipped norm."""

    def run(clip: float | None, out: Path) -> tuple[list[list[torch.Tensor]], list[float]]:
        seen: list[list[torch.Tensor]] = []

        def hook(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
            seen.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])

        handle = register_optimizer_step_pre_hook(hook)
        try:
            cfg = tiny_config(
                out, algo="imaml-gd", meta_steps=3, log_every=1, test_tasks=2, clip_grad_norm=clip
            )
            steps = train(cfg, progress=False)["curves"]["steps"]
        finally:
            handle.remove()
        return seen, [r["meta_grad_norm"] for r in steps]

    free, free_norms = run(None, tmp_path / "free")
    clipped, clip_norms = run(1e-3, tmp_path / "clipped")
    norm0 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in free[0]]))
    assert free_norms[0] == pytest.approx(float(norm0), rel=1e-6)
    assert clip_norms[0] == pytest.approx(free_norms[0], rel=1e-6) and clip_norms[0] > 1e-3
    for a, b in zip(free[0], clipped[0]):
        torch.testing.assert_close(b, a * (1e-3 / norm0), rtol=1e-5, atol=1e-12)
    for grads in clipped:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert float(total) <= 1e-3 * (1 + 1e-5)


def test_step_sums_travel_as_one_float64_vector_in_field_order() -> None:
    from bilevel.metalearn.algorithms import MetaStats
    from bilevel.metalearn.training.step import StepSums

    nan = torch.full((2,), math.nan)
    stats = MetaStats(
        query_loss=torch.tensor([0.5, 1.5]),
        query_acc=torch.tensor([1.0, math.nan]),  # NaN (regression) counts 0
        support_loss=nan,
        inner_grad_norm=nan,
        cg_residual=nan,
        negative_curvature=torch.tensor([True, True]),
        cg_iters=torch.tensor([3, 1]),
    )
    t = StepSums.local(stats, clock=12.5, stop=True, device=torch.device("cpu"))
    assert t.dtype == torch.float64 and t.shape == (len(dataclasses.fields(StepSums)),)
    want = StepSums(query_loss=2.0, query_acc=1.0, negative_curvature=2.0, clock=12.5, stop=1.0)
    assert StepSums.from_tensor(t) == want
    # a rank without tasks adds only its clock and its stop request
    idle = StepSums.local(None, clock=0.0, stop=False, device=torch.device("cpu"))
    assert StepSums.from_tensor(t + idle) == StepSums.from_tensor(t)


def test_a_stop_signal_is_recorded_not_raised_and_the_handlers_are_restored() -> None:
    import signal

    from bilevel.metalearn.training.signals import StopSignal

    before = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        assert not stop()
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: the run ends after its step
        assert stop() and stop.requested
    assert signal.getsignal(signal.SIGINT) is before


def test_the_reason_a_run_stopped_early_is_said() -> None:
    from bilevel.metalearn.training.results import stop_reason

    cfg = tiny_config(meta_steps=10)
    assert stop_reason(cfg, 0, 10, False, resumed=False) is None
    assert stop_reason(cfg, 0, 4, True, resumed=False) == (
        "stopped after 4 of 10 meta-steps: stop requested (SIGTERM or Ctrl-C)"
    )
    timed = tiny_config(meta_steps=10, time_limit=0.5)
    assert stop_reason(timed, 0, 4, False, resumed=False) == (
        "stopped after 4 of 10 meta-steps: time limit of 0.5 min reached"
    )
    assert stop_reason(cfg, 2, 4, False, resumed=True) == (
        "stopped after 4 of 10 meta-steps: another rank was asked to stop"
    )
    assert stop_reason(cfg, 12, 12, False, resumed=True) == (
        "the checkpoint is at step 12 >= meta_steps=10: nothing to train"
    )


def test_a_rank_without_tasks_adds_zeros(tmp_path: Path) -> None:
    """Two ranks and a meta-batch of one task: rank 1 computes nothing and contributes zero
    gradients (a learned lambda's too), so the run equals one process's."""
    args = ["train", "--algo", "imaml-gd", "--dataset", "sinusoid", "--shots", "5", "--queries", "5"]
    args += ["--meta-batch", "1", "--meta-steps", "2", "--inner-steps", "2", "--inner-lr", "0.01"]
    args += ["--learn-lam", "scalar", "--test-tasks", "2", "--dtype", "float64", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    one = tmp_path / "one"
    cfg = tiny_config(one, algo="imaml-gd", meta_batch=1, learn_lam="scalar", test_tasks=2, dtype="float64")
    train(cfg, progress=False)
    r = _torchrun([*args, "--threads", "1", "--out", str(tmp_path / "two")], env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(one), load_checkpoint(tmp_path / "two")
    assert a["step"] == b["step"] == 2
    for k in a["theta"]:
        torch.testing.assert_close(a["theta"][k], b["theta"][k], rtol=0, atol=1e-12)
    torch.testing.assert_close(a["log_lam"]["lam"], b["log_lam"]["lam"], rtol=0, atol=1e-12)
