"""Shared test configuration: deterministic hypothesis profile and dtype tolerances."""

from __future__ import annotations

import os

import torch
from hypothesis import settings

# CI must be deterministic: the same examples every run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores are shared by the whole suite; more threads only add contention.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

#: Relative tolerances by dtype for comparisons against independent references.
RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}
