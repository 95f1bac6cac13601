"""The meta-learning package computes what its reference version computed (`equivalence_cases`).

``tests/data/equivalence.json.gz`` and ``equivalence-checkpoint.pt`` were written by the package's
reference version (``tests/equivalence_cases.py --write``): meta-gradients and their diagnostics for
every algorithm, engine and learned lambda in float64, six 20-step command-line runs (trained
parameters, learned lambda, console output, metrics, log), their ``eval`` outputs and refusals.
Numbers must agree to 1e-8 (relative, float64), text exactly.  Not closer: float64 results move
with the CPU the kernels run on (oneDNN and BLAS pick their blocking, hence their summation order,
by instruction set), by up to 4e-10 relative after a 20-step run on an AMD EPYC against the
reference's Intel machine; any change of what is computed moves them by orders of magnitude more.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path
from typing import Any

import equivalence_cases as cases
import pytest
import torch

from bilevel.metalearn import load_checkpoint, load_run

DATA = Path(__file__).parent / "data"
RTOL = 1e-8
ATOL = 1e-12


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    with gzip.open(DATA / "equivalence.json.gz", "rt") as f:
        return json.load(f)


def _assert_same(new: Any, old: Any, where: str) -> None:
    if isinstance(old, dict):
        assert isinstance(new, dict) and sorted(new) == sorted(old), (
            f"{where}: keys {sorted(new)} != {sorted(old)}"
        )
        for k in old:
            _assert_same(new[k], old[k], f"{where}/{k}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), f"{where}: length differs"
        for i, (a, b) in enumerate(zip(new, old)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(old, float) and not isinstance(old, bool):
        assert isinstance(new, (int, float)) and (
            math.isclose(new, old, rel_tol=RTOL, abs_tol=ATOL) or (math.isnan(new) and math.isnan(old))
        ), f"{where}: {new!r} != {old!r}"
    else:
        assert new == old or _same_missing(new, old), f"{where}: {new!r} != {old!r}"


def test_meta_gradients_equal_the_reference(reference: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _assert_same(cases.meta_gradient_cases(), reference["meta_gradient"], "meta_gradient")


def test_cli_runs_equal_the_reference(reference: dict[str, Any]) -> None:
    """Trained parameters, learned lambda, console, metrics, log, eval output and refusals."""
    torch.set_num_threads(1)
    _assert_same(_as_reference(cases.run_cases()), _eval_parsed(reference["runs"]), "runs")


#: Algorithms registered after the reference was written: a refusal's "(it applies to ...)" list of
#: the algorithms that read a flag names them too (the registry's one rule).
_ADDED_ALGOS = ("anil", "meta-sgd")
#: `TrainConfig` fields added after the reference was written, with their defaults: a run that
#: leaves them at the default computes what the reference computed, and its saved configuration
#: must hold them at that default.
_CONFIG_ADDED = {"task_chunk": None, "eval_every_minutes": None}
#: What ``eval`` adds to its JSON beyond the reference's fields (the run's provenance).
_EVAL_ADDED = ("differs_from_training", "data_notes", "trained_with_version")


def _as_reference(runs: dict[str, Any]) -> dict[str, Any]:
    """The outputs in the reference's format, undoing only the documented format changes.

    Run outputs are strict JSON now: a NaN is written as ``null`` (the reference wrote ``NaN``),
    and ``eval`` also records the settings that differ from training and the data's provenance,
    in its JSON and in a console line.  Training prints a ``warning: ...`` line when a
    diagnostic crosses its threshold (the reference runs are short and rough on purpose).
    A refusal's list of the algorithms a flag applies to also names those registered since
    (`_ADDED_ALGOS`).  The numbers and every other line must still equal the reference's.
    """
    out = {}
    for name, run in runs.items():
        run = _without_added_config(run)
        if "stderr" in run:
            kept = (ln for ln in run["stderr"].splitlines(True) if not ln.startswith("warning: "))
            run = {**run, "stderr": _without_added_algos("".join(kept))}
        if "eval" in run:
            code, so, se = run["eval"]
            res = json.loads(so)
            assert set(_EVAL_ADDED) <= set(res), f"{name}: eval lacks {_EVAL_ADDED}"
            res = {k: (math.nan if v is None else v) for k, v in res.items() if k not in _EVAL_ADDED}
            se = "".join(
                line
                for line in se.splitlines(True)
                if not line.startswith("settings that differ from training")
            )
            run = {**run, "eval": [code, res, se]}
        out[name] = run
    return out


def _without_added_config(value: Any) -> Any:
    """``value`` with `_CONFIG_ADDED` taken out of every saved `TrainConfig` (a dict with an
    ``algo`` and a ``meta_batch``), after checking that each holds its default."""
    if isinstance(value, list):
        return [_without_added_config(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "algo" in value and "meta_batch" in value:
        for k, default in _CONFIG_ADDED.items():
            assert value.get(k, default) == default, f"config field {k}: {value.get(k)!r} != {default!r}"
        value = {k: v for k, v in value.items() if k not in _CONFIG_ADDED}
    return {k: _without_added_config(v) for k, v in value.items()}


def _eval_parsed(runs: dict[str, Any]) -> dict[str, Any]:
    """The reference's runs with each ``eval`` JSON text parsed, so that its numbers are compared
    as numbers (to `RTOL`), not as the digits they were printed with."""
    return {
        name: {**run, "eval": [run["eval"][0], json.loads(run["eval"][1]), run["eval"][2]]}
        if "eval" in run
        else run
        for name, run in runs.items()
    }


def _without_added_algos(text: str) -> str:
    """``text`` with `_ADDED_ALGOS` taken out of each "(it applies to a, b, ...)" list."""

    def drop(m: re.Match[str]) -> str:
        names = [n for n in m.group(1).split(", ") if n not in _ADDED_ALGOS]
        return f"(it applies to {', '.join(names)})"

    return re.sub(r"\(it applies to ([^)]*)\)", drop, text)


def _same_missing(new: Any, old: Any) -> bool:
    """A NaN the reference wrote (scrubbed to ``'nan'``) is ``null`` in strict JSON."""
    return new is None and old == "nan"


def test_a_reference_checkpoint_loads_and_evaluates_as_written(reference: dict[str, Any]) -> None:
    ck = load_checkpoint(DATA / "equivalence-checkpoint.pt")
    first = reference["runs"][next(iter(cases.RUNS))]  # the run whose checkpoint was kept
    _assert_same(cases._tensors(ck["theta"]), first["theta"], "checkpoint/theta")
    run = load_run(DATA / "equivalence-checkpoint.pt")
    assert run.step == 20
    _assert_same(cases._tensors(run.params), first["theta"], "load_run/params")
    _assert_same(cases._tensors(ck["log_lam"]), first["log_lam"], "checkpoint/log_lam")
    _assert_same(math.log(float(run.lam)), first["log_lam"]["lam"][0], "load_run/lam")
