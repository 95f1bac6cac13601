"""Shared test configuration: deterministic hypothesis profile, dtype tolerances, a tiny run."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from hypothesis import settings

if TYPE_CHECKING:
    from bilevel.metalearn import TrainConfig

# CI must be deterministic: the same examples every run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite's problems are small: a second thread only adds synchronization (measured: a
# 50-dimensional gradient took 3-30 ms with 2 threads against 0.6 ms with 1 on a loaded machine).
torch.set_num_threads(1)

#: Relative tolerances by dtype for comparisons against independent references.
RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}

#: The fields of a sinusoid run that meta-trains and evaluates in about a second (`tiny_config`).
TINY_SINUSOID: dict[str, Any] = dict(
    algo="fomaml",
    dataset="sinusoid",
    shots=5,
    queries=5,
    meta_batch=2,
    inner_steps=2,
    inner_lr=0.01,
    test_tasks=3,
    threads=1,
)


def tiny_config(out: str | os.PathLike[str] | None = None, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` of `TINY_SINUSOID` and two meta-steps, with ``overrides``.

    Args:
        out: the run's folder (default: `TrainConfig`'s).
        **overrides: fields that differ from the tiny run's.
    """
    from bilevel.metalearn import TrainConfig  # here, so that tests of the core need not import it

    fields = {**TINY_SINUSOID, "meta_steps": 2, **overrides}
    if out is not None:
        fields["out"] = str(out)
    return TrainConfig(**fields)
