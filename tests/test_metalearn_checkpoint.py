"""Checkpoints: one loader that names the file and the damage, and resumes that refuse a different run.

Every unusable file (empty, truncated, garbage, a pickle of objects, a model's state_dict) is a
`bilevel.CheckpointError` naming the file; a resume checks the saved configuration; an earlier
result is never overwritten without a word.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import bilevel as bl
from bilevel.metalearn import TrainConfig, load_checkpoint, load_run, train
from bilevel.metalearn.models import sinusoid_mlp


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good")
    train(tiny_config(out), progress=False)
    return out / "checkpoint.pt"


class Foo:
    """A class whose instances torch.load(weights_only=True) refuses to unpickle."""


def test_every_kind_of_damage_is_named(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    cases: dict[str, tuple[bytes | object, str]] = {
        "empty.pt": (b"", r"the file is empty \(0 bytes\)"),
        "truncated.pt": (data[: len(data) // 2], "not a torch.save archive .* truncated"),
        "garbage.pt": (bytes(range(256)) * 4, "not a torch.save archive"),
        "objects.pt": ({"x": Foo()}, "never unpickled"),
        "state_dict.pt": (sinusoid_mlp().state_dict(), r"lacks \['theta', 'log_lam'"),
        "tensor.pt": (torch.zeros(3), "holds a Tensor, not a dict"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        with pytest.raises(bl.CheckpointError, match=match) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)
        assert "weights_only=False" not in str(err.value)  # never advise running a file's code
        with pytest.raises(bl.CheckpointError, match=match):
            load_run(path)
    broken = torch.load(good, weights_only=True)
    broken["config"] = "{not json"
    torch.save(broken, tmp_path / "config.pt")
    with pytest.raises(bl.CheckpointError, match="'config' is not a JSON object"):
        load_checkpoint(tmp_path / "config.pt")
    broken["config"] = json.dumps({**json.loads(torch.load(good)["config"]), "future_field": 1})
    torch.save(broken, tmp_path / "future.pt")
    with pytest.raises(bl.CheckpointError, match=r"fields \['future_field'\] that this version"):
        load_run(tmp_path / "future.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "none.pt")
    assert load_checkpoint(good.parent)["step"] == 2  # the run's folder works too


def test_resume_needs_a_checkpoint_and_a_new_run_needs_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(bl.CheckpointError, match="nothing to resume: no checkpoint at"):
        train(tiny_config(tmp_path / "none"), resume=True, progress=False)
    assert not (tmp_path / "none").exists()
    out = tmp_path / "run"
    train(tiny_config(out), progress=False)
    with pytest.raises(bl.CheckpointError, match=r"already holds a run .* \(--resume, .* \(--overwrite,"):
        train(tiny_config(out), progress=False)
    first = json.loads((out / "metrics.json").read_text())
    again = train(tiny_config(out, seed=1), progress=False, overwrite=True)
    assert again["earlier_metrics"] == "metrics.step2.json"
    assert json.loads((out / "metrics.step2.json").read_text()) == first
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_resume_refuses_another_configuration_and_lists_the_fields(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(out), progress=False)
    saved = (out / "config.json").read_text()
    other = tiny_config(out, algo="reptile", meta_batch=3, inner_lr=0.02, ways=3)
    with pytest.raises(bl.CheckpointError, match="another configuration") as err:
        train(other, resume=True, progress=False)
    for field in ("algo: saved 'fomaml', now 'reptile'", "ways: saved 5, now 3", "meta_batch", "inner_lr"):
        assert field in str(err.value)
    assert (out / "config.json").read_text() == saved  # untouched
    # a cosine schedule is shaped by meta_steps: a longer run would change the trajectory
    cos = tmp_path / "cos"
    train(tiny_config(cos, lr_schedule="cosine"), progress=False)
    with pytest.raises(bl.CheckpointError, match="meta_steps: saved 2, now 4"):
        train(tiny_config(cos, lr_schedule="cosine", meta_steps=4), resume=True, progress=False)


def test_a_resumed_run_keeps_the_earlier_result(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(out, test_tasks=6), progress=False)
    first = json.loads((out / "metrics.json").read_text())
    # more steps, a smaller final evaluation and other evaluation settings may change on resume
    m = train(tiny_config(out, meta_steps=3, test_tasks=3, eval_batch=2), resume=True, progress=False)
    assert m["test_tasks"] == 3 and m["meta_steps_done"] == 3
    assert json.loads((out / "metrics.step2.json").read_text()) == first  # the 6-task result survives
    assert json.loads((out / "config.json").read_text())["meta_steps"] == 3
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(good: Path, tmp_path: Path) -> None:
    ck = torch.load(good, weights_only=True)
    ck["theta"] = {k: v[..., :1] for k, v in ck["theta"].items()}
    for moments in ck["optimizer"]["state"].values():  # a consistent file of another model
        for name in ("exp_avg", "exp_avg_sq"):
            moments[name] = moments[name][..., :1]
    out = tmp_path / "run"
    out.mkdir()
    torch.save(ck, out / "checkpoint.pt")
    cfg = TrainConfig(**{**json.loads(ck["config"]), "out": str(out)})
    with pytest.raises(bl.CheckpointError, match="does not fit the model"):
        train(cfg, resume=True, progress=False)
    with pytest.raises(bl.CheckpointError, match="do not fit the"):
        load_run(out / "checkpoint.pt")
    assert dataclasses.asdict(cfg)["out"] == str(out)


def test_a_checkpoint_without_cg_warm_start_keeps_its_warm_start(tmp_path: Path) -> None:
    """A saved configuration without ``cg_warm_start`` is one whose iMAML CG started from the
    first-order gradient: it loads with ``cg_warm_start=True``, so a resume continues the same
    algorithm; one of an algorithm without CG loads with the default, so its resume is not refused."""
    from bilevel.metalearn.training.checkpoint import saved_config

    cfg = tiny_config(tmp_path / "run", algo="imaml-gd")
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cg_warm_start"}
    assert saved_config({"config": json.dumps(old)}, "old.pt").cg_warm_start is True
    new = dataclasses.asdict(cfg)
    assert saved_config({"config": json.dumps(new)}, "new.pt").cg_warm_start is False
    fo = tiny_config(tmp_path / "fo")
    old_fo = {k: v for k, v in dataclasses.asdict(fo).items() if k != "cg_warm_start"}
    loaded = saved_config({"config": json.dumps(old_fo)}, "old_fo.pt")
    assert loaded.cg_warm_start is False and fo.resume_conflicts(loaded) == []
