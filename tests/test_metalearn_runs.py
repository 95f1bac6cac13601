"""Run folders a user can trust: provenance and the pinned split, one run per folder, atomic writes,
one rule for the flags of ``train`` and ``eval``, strict JSON, and the sinusoid's task format.

Each guard has a test that fails where the guard is removed: the premise of each (a recomputed split
that leaks, a write that fails, a live holder of the lock) is checked before the guard's outcome.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

import bilevel
from bilevel import BilevelWarning, CheckpointError
from bilevel.metalearn import ConfigError, TrainConfig, build_experiment, load_checkpoint, load_run, train
from bilevel.metalearn.data.datasets import DatasetFormatError, SplitMismatchError
from bilevel.metalearn.data.folder import classes_needed, load_image_folder
from bilevel.metalearn.data.splits import ClassSplit, split_classes
from bilevel.metalearn.training.checkpoint import CheckpointWriteError, atomic_json, strict_json
from bilevel.metalearn.training.cli import _parser, config_from_args, main
from bilevel.metalearn.training.provenance import Provenance, saved_provenance
from bilevel.metalearn.training.runlock import LOCK_NAME, RunLock, RunLockedError
from bilevel.metalearn.training.signals import exit_on_sigterm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))


def add_classes(root: Path, names: list[str], per_class: int = 3) -> None:
    """Class folders of 12x12 grayscale PNGs (random pixels: only the listing matters here)."""
    rng = np.random.default_rng(len(names))
    for name in names:
        d = root / name
        d.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, size=(12, 12), dtype=np.uint8)).save(d / f"{j}.png")


def folder_run(tmp_path: Path, n_classes: int = 10) -> TrainConfig:
    root = tmp_path / "data"
    add_classes(root, [f"c{i:02d}" for i in range(n_classes)])
    return TrainConfig(
        algo="fomaml",
        dataset="folder",
        ways=2,
        shots=1,
        queries=1,
        meta_batch=2,
        meta_steps=1,
        inner_steps=1,
        test_tasks=2,
        eval_batch=2,
        threads=1,
        data_root=str(root),
        out=str(tmp_path / "run"),
    )


def strict(text: str) -> Any:
    """Parse JSON, refusing NaN and infinities (which strict JSON has no form for)."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def eval_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[dict[str, Any], str]:
    assert main(argv) == 0
    cap = capsys.readouterr()
    return strict(cap.out), cap.err


# ------------------------------------------------------------------------------ provenance, pinned split
def test_a_run_whose_data_changed_never_evaluates_a_trained_class_as_a_test_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = folder_run(tmp_path)
    train(cfg, progress=False)
    out, root = Path(cfg.out), Path(str(cfg.data_root))
    saved = ClassSplit.load_json(out / "split.json")
    prov = saved_provenance(load_checkpoint(out / "checkpoint.pt"), out / "checkpoint.pt")
    assert prov.split == saved and prov.version == bilevel.__version__ and prov.source == "checkpoint"
    assert prov.n_classes == 10 and prov.fingerprint is not None
    assert json.loads((out / "metrics.json").read_text())["environment"]["bilevel"] == bilevel.__version__
    # add classes until a split recomputed from the new listing puts a meta-trained class in test
    added: list[str] = []
    while not set(split_classes(sorted(saved.all_classes) + added, (0.7, 0.1, 0.2)).test_classes) & set(
        saved.train_classes
    ):
        added.append(f"new{len(added):02d}")
    add_classes(root, added)
    split_before = (out / "split.json").read_bytes()
    # eval: the saved split's test classes, a note on the added classes, strict JSON
    res, err = eval_json(capsys, ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--test-tasks", "2"])
    assert f"the data holds {len(added)} class(es) outside the run's saved split" in err
    assert res["data_notes"] and "keeps the split it was trained on" in res["data_notes"][0]
    assert res["trained_with_version"] == bilevel.__version__
    exp = build_experiment(cfg, device="cpu", provenance=prov)
    assert exp.split == saved and not set(exp.data.test.classes if exp.data else ()) & set(
        saved.train_classes
    )
    assert exp.provenance == prov  # what a resumed run goes on recording: the data it was trained on
    # resume: the saved split, never rewritten
    train(dataclasses.replace(cfg, meta_steps=2), resume=True, progress="lines")
    assert "outside the run's saved split" in capsys.readouterr().err
    assert (out / "split.json").read_bytes() == split_before
    again = saved_provenance(load_checkpoint(out / "checkpoint.pt"), out)
    assert again.split == saved and again.fingerprint == prov.fingerprint


def test_a_class_of_the_saved_split_removed_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = folder_run(tmp_path)
    train(cfg, progress=False)
    out, root = Path(cfg.out), Path(str(cfg.data_root))
    saved = ClassSplit.load_json(out / "split.json")
    gone = saved.test_classes[0]
    shutil.rmtree(root / gone)
    add_classes(root, ["replacement"])  # as many classes as before: a recomputed split would go on
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--test-tasks", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and err[-1].startswith("python -m bilevel.metalearn eval: error: ")
    assert [line for line in err if "error" in line] == err[-1:]  # the banner lines, then one error line
    assert f"does not hold 1 class(es) of the split 'folder' (test: {gone!r})" in err[-1]
    with pytest.raises(SplitMismatchError, match=re.escape(repr(gone))):
        train(dataclasses.replace(cfg, meta_steps=2), resume=True, progress=False)
    assert ClassSplit.load_json(out / "split.json") == saved


def test_an_older_run_folder_loads_on_its_split_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint without provenance: the split.json beside it pins the split; without that too,
    the split is recomputed and the run says so."""
    cfg = folder_run(tmp_path)
    train(cfg, progress=False)
    out, root = Path(cfg.out), Path(str(cfg.data_root))
    ck = load_checkpoint(out / "checkpoint.pt")
    del ck["provenance"]
    torch.save(ck, out / "checkpoint.pt")
    saved = ClassSplit.load_json(out / "split.json")
    prov = saved_provenance(load_checkpoint(out / "checkpoint.pt"), out / "checkpoint.pt")
    assert prov.source == "split.json" and prov.split == saved and prov.version == ""
    add_classes(root, [f"new{i}" for i in range(6)])
    assert build_experiment(cfg, device="cpu", provenance=prov).split == saved
    res, _ = eval_json(capsys, ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--test-tasks", "2"])
    assert res["trained_with_version"] is None and "outside the run's saved split" in res["data_notes"][0]
    (out / "split.json").unlink()
    bare = saved_provenance(load_checkpoint(out / "checkpoint.pt"), out / "checkpoint.pt")
    assert bare.split is None
    notes = build_experiment(cfg, device="cpu", provenance=bare).notes
    assert len(notes) == 1 and "no class split recorded with this run" in notes[0]
    # a damaged record is refused, not ignored
    ck["provenance"] = "{not json"
    torch.save(ck, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="'provenance' is damaged"):
        load_checkpoint(tmp_path / "damaged.pt")
    (out / "split.json").write_text('{"train_classes": ["a"], "test_classes": ["a"]}')
    with pytest.raises(CheckpointError, match=r"split.json: the class split .* is damaged"):
        saved_provenance(load_checkpoint(out / "checkpoint.pt"), out / "checkpoint.pt")


def test_the_fingerprint_is_of_the_listing(tmp_path: Path) -> None:
    root = tmp_path / "a"
    add_classes(root, ["x", "y", "z", "w", "v", "t"])
    first = load_image_folder(root, cache=False)
    shutil.copytree(root, tmp_path / "b")  # a copy: other paths and times, the same listing
    assert load_image_folder(tmp_path / "b", cache=False).fingerprint == first.fingerprint
    (root / "x" / "0.png").unlink()  # one image fewer
    assert load_image_folder(root, cache=False).fingerprint != first.fingerprint
    add_classes(tmp_path / "b", ["u"])
    grown = load_image_folder(tmp_path / "b", cache=False, split=first.split)
    assert grown.fingerprint != first.fingerprint and grown.unused_classes == ("u",)
    notes = Provenance.of(first).notes(grown)
    assert len(notes) == 2 and "('u')" in notes[0] and "6 classes then, 7 now" in notes[1]
    assert Provenance.of(first).notes(first) == []
    back = Provenance.from_json(Provenance.of(first).to_json(), "x")
    assert back.source == "checkpoint" and dataclasses.replace(back, source="data") == Provenance.of(first)


def test_too_few_classes_for_the_split_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert classes_needed((0.7, 0.1, 0.2)) == 6 and classes_needed((3, 1, 2)) == 6
    for n in (5, 6):  # the premise: split_classes itself refuses 5 classes (no val class), takes 6
        ids = [str(i) for i in range(n)]
        if n < 6:
            with pytest.raises(ValueError):
                split_classes(ids, (0.7, 0.1, 0.2))
        else:
            split_classes(ids, (0.7, 0.1, 0.2))
    cfg = folder_run(tmp_path, n_classes=5)
    with pytest.raises(
        DatasetFormatError, match=r"found 5 class folder\(s\), but the split .* needs at least 6"
    ):
        train(cfg, progress=False)
    argv = [
        "train",
        "--dataset",
        "folder",
        "--algo",
        "fomaml",
        "--ways",
        "2",
        "--data-root",
        str(cfg.data_root),
    ]
    assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "found 5 class folder(s)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------- one run per folder
def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _write_lock(folder: Path, pid: int, host: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "started": "then", "token": "t"}))


def test_a_folder_held_by_a_live_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    holder = _sleeper()
    try:
        _write_lock(out, holder.pid, socket.gethostname())
        with pytest.raises(
            RunLockedError, match=rf"{re.escape(str(out))} is in use by another run.*pid {holder.pid}"
        ):
            train(tiny_config(out), progress=False)
        assert (
            main(
                ["train", "--dataset", "sinusoid", "--algo", "fomaml", "--meta-steps", "1", "--out", str(out)]
            )
            == 1
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid}" in err[0] and "usage:" not in err[0]
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # never taken from it
    finally:
        holder.kill()
        holder.wait()
    # another host's lock cannot be checked from here: refused, even with a pid that is dead here
    _write_lock(out, holder.pid, "elsewhere.example")
    with pytest.raises(RunLockedError, match=r"elsewhere\.example"):
        train(tiny_config(out), progress=False)


def test_a_stale_lock_is_replaced_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "run"
    dead = _sleeper()
    dead.kill()
    dead.wait()
    _write_lock(out, dead.pid, socket.gethostname())
    with pytest.warns(BilevelWarning, match=f"stale lock .* pid {dead.pid}"):
        train(tiny_config(out), progress=False)
    assert not (out / LOCK_NAME).exists() and (out / "metrics.json").is_file()


def test_the_lock_is_held_for_the_run_and_released_on_any_exit(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunLock(out) as lock:
        assert lock.held and json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(out).acquire()  # a second run of this very process too
    assert not (out / LOCK_NAME).exists() and not out.exists()  # the empty folder it made is gone
    # an exception inside (a diverging run), and SIGTERM (a batch system's notice) both release it
    with pytest.raises(ZeroDivisionError), RunLock(out):
        raise ZeroDivisionError
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(SystemExit) as ended, RunLock(out):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
    assert ended.value.code == 128 + signal.SIGTERM and not (out / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def mine(signum: int, frame: object) -> None: ...

    signal.signal(signal.SIGTERM, mine)
    try:
        with exit_on_sigterm():  # a handler someone installed is kept
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # a run that fails on its data releases the lock too
    with pytest.raises(DatasetFormatError):
        train(dataclasses.replace(folder_run(tmp_path, n_classes=3), out=str(out)), progress=False)
    assert not (out / LOCK_NAME).exists()


def test_two_trainings_into_one_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real second run while the first trains (before its first checkpoint): refused; SIGTERM stops
    the first after its current step, and it releases the folder."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = ["train", "--dataset", "sinusoid", "--algo", "fomaml", "--meta-batch", "2", "--inner-steps", "1"]
    argv += ["--test-tasks", "2", "--threads", "1", "--checkpoint-every", "0", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bilevel.metalearn", *argv, "--meta-steps", "1000000", "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    try:
        while not (out / "log.jsonl").exists():
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        assert not (out / "checkpoint.pt").exists()  # the old guard would have let the second run in
        assert main([*argv, "--meta-steps", "1", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"{out} is in use by another run" in err and f"pid {proc.pid}" in err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 0 and not (out / LOCK_NAME).exists()
    assert (out / "metrics.json").is_file()


# -------------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device: free space"),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied: make the folder writable"),
        (
            RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed"),
            "RuntimeError",
        ),
    ],
)
def test_a_failed_checkpoint_write_leaves_no_debris(
    failure: BaseException,
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    train(tiny_config(out), progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    save = torch.save

    def half_then_fail(obj: Any, path: Any) -> None:
        Path(path).write_bytes(b"PK half a file")  # what a disk that fills up mid-write leaves
        raise failure

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(
        CheckpointWriteError, match=f"cannot write {re.escape(str(out / 'checkpoint.pt'))}: {re.escape(said)}"
    ):
        train(tiny_config(out, meta_steps=3), resume=True, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / LOCK_NAME).exists()
    flags = [
        "--dataset",
        "sinusoid",
        "--algo",
        "fomaml",
        "--shots",
        "5",
        "--queries",
        "5",
        "--meta-batch",
        "2",
    ]
    flags += ["--inner-steps", "2", "--inner-lr", "0.01", "--test-tasks", "3", "--threads", "1"]
    assert main(["train", *flags, "--meta-steps", "3", "--resume", "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "Traceback" not in err[0]
    monkeypatch.setattr(torch, "save", save)

    # the JSON writer: the same rule
    def fail(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        self.with_name(self.name).open("w").close()  # the temporary file exists when the write fails
        raise failure

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(CheckpointWriteError, match="cannot write"):
        atomic_json({"a": 1}, out / "x.json")
    assert not (out / "x.json.tmp").exists() and not (out / "x.json").exists()


def test_an_adam_state_of_other_parameters_is_refused_on_load(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(out), progress=False)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2  # the premise: the file itself is good
    fewer = {**ck, "optimizer": {**ck["optimizer"], "param_groups": [
        {**ck["optimizer"]["param_groups"][0], "params": ck["optimizer"]["param_groups"][0]["params"][:-1]}
    ]}}  # fmt: skip
    torch.save(fewer, tmp_path / "fewer.pt")
    n = len(ck["theta"]) + len(ck["log_lam"])
    with pytest.raises(CheckpointError, match=f"Adam state is for {n - 1} parameter tensor.*hold {n}"):
        load_checkpoint(tmp_path / "fewer.pt")
    state = {k: dict(v) for k, v in ck["optimizer"]["state"].items()}
    state[0]["exp_avg"] = state[0]["exp_avg"][:1]
    shape = tuple(next(iter(ck["theta"].values())).shape)
    torch.save({**ck, "optimizer": {**ck["optimizer"], "state": state}}, tmp_path / "shape.pt")
    with pytest.raises(
        CheckpointError,
        match=rf"exp_avg of parameter 0 has shape \(1, 1\), the parameter {re.escape(str(shape))}",
    ):
        load_checkpoint(tmp_path / "shape.pt")


# ------------------------------------------------------------------------------ train and eval: one rule
def _sine_run(tmp_path: Path, algo: str = "fomaml") -> Path:
    out = tmp_path / algo
    train(tiny_config(out, algo=algo), progress=False)
    return out / "checkpoint.pt"


def _usage(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[str]:
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_eval_refuses_what_train_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = _sine_run(tmp_path)
    train_says = _usage(capsys, ["train", "--dataset", "sinusoid", "--algo", "fomaml", "--eval-lam", "0"])[-1]
    eval_says = _usage(capsys, ["eval", "--checkpoint", str(ck), "--eval-lam", "0"])
    msg = "argument --eval-lam: iMAML's proximal weight at evaluation; --algo fomaml does not use it"
    assert msg in train_says and msg in eval_says[-1]
    with pytest.raises(
        ConfigError, match=r"eval_lam=0\.5\): fomaml does not read it \(it applies to imaml-gd"
    ):
        load_run(ck, eval_lam=0.5)  # the library applies the same rule
    assert load_run(ck, eval_inner_steps=4).config.eval_inner_steps == 4  # and takes what fomaml reads
    assert eval_says[0].startswith("usage: python -m bilevel.metalearn eval")  # its own usage line
    said = _usage(capsys, ["eval", "--checkpoint", str(ck), "--data-root", str(tmp_path)])[-1]
    assert "argument --data-root" in said and "--dataset sinusoid does not use it" in said
    hf = _sine_run(tmp_path, "imaml-hf")
    said = _usage(capsys, ["eval", "--checkpoint", str(hf), "--eval-inner-steps", "3"])[-1]
    assert "argument --eval-inner-steps" in said and "--algo imaml-hf does not use it" in said
    # an unknown flag: the subcommand's usage, not the top-level one
    lines = _usage(capsys, ["eval", "--checkpoint", str(ck), "--bogus"])
    assert (
        lines[0].startswith("usage: python -m bilevel.metalearn eval")
        and "unrecognized arguments: --bogus" in lines[-1]
    )
    lines = _usage(capsys, ["train", "--bogus"])
    assert lines[0].startswith("usage: python -m bilevel.metalearn train")


def test_eval_records_what_differs_from_training_in_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = _sine_run(tmp_path, "imaml-gd")
    trained = json.loads(load_checkpoint(ck)["config"])
    assert trained["threads"] == 1 and trained["test_tasks"] == 3
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    argv = ["eval", "--checkpoint", str(ck), "--test-tasks", "2", "--eval-lam", "0.5", "--threads", "2"]
    res, err = eval_json(capsys, [*argv, "--out", str(tmp_path / "eval.json")])
    assert threads == [2]
    assert res["differs_from_training"] == {
        "eval_lam": {"trained": None, "now": 0.5},
        "test_tasks": {"trained": 3, "now": 2},
        "threads": {"trained": 1, "now": 2},
    }  # a training on "the machine's device" (None) does not differ from one on cpu
    assert (
        "settings that differ from training: " in err
        and "test_tasks 3 -> 2" in err
        and "threads 1 -> 2" in err
    )
    assert res["accuracy"] is None and res["ci95"] is None and res["n_tasks"] == 2  # regression: no accuracy
    assert strict((tmp_path / "eval.json").read_text()) == res
    assert "NaN" not in (tmp_path / "eval.json").read_text()
    metrics = (ck.parent / "metrics.json").read_text()
    assert strict(metrics)["test_accuracy"] is None
    for line in (ck.parent / "log.jsonl").read_text().splitlines():
        strict(line)
    assert strict_json({"a": [float("nan"), float("inf"), 1.5]}) == '{"a": [null, null, 1.5]}'


# -------------------------------------------------------------------------------- the sinusoid's format
def _tutorial() -> str:
    return (REPO / "docs" / "tutorials" / "imaml-module-api.md").read_text()


def test_the_tutorials_command_trains_the_module_examples_task_format() -> None:
    text = _tutorial()
    module = re.search(r"SinusoidTasks\(shots=(\d+), queries=(\d+)", text)
    assert module is not None
    command = re.search(r"```bash\n(python -m bilevel\.metalearn train .*?)\n(?=python|```)", text, re.S)
    assert command is not None
    argv = shlex.split(command.group(1).replace("\\\n", " "))[3:]
    cfg = config_from_args(_parser().parse_args(argv))
    assert cfg.dataset == "sinusoid"
    assert (cfg.shots, cfg.queries) == (int(module.group(1)), int(module.group(2))) == (5, 10)
    # the dataset's format is a default: a flag or a preset that sets it wins
    cfg = config_from_args(_parser().parse_args(["train", "--dataset", "sinusoid", "--shots", "1"]))
    assert (cfg.shots, cfg.queries) == (1, 10)
    cfg = config_from_args(_parser().parse_args(["train", "--dataset", "omniglot"]))
    assert (cfg.shots, cfg.queries) == (TrainConfig().shots, TrainConfig().queries)
