"""Shared test configuration: deterministic hypothesis profile and dtype tolerances."""

from __future__ import annotations

import os

import torch
from hypothesis import settings

# CI must be deterministic: the same examples every run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite's problems are small: a second thread only adds synchronization (measured: a
# 50-dimensional gradient took 3-30 ms with 2 threads against 0.6 ms with 1 on a loaded machine).
torch.set_num_threads(1)

#: Relative tolerances by dtype for comparisons against independent references.
RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
