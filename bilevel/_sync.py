"""When a loop may read device values on the host.

A solver loop can skip work by reading a device value (``bool(active.all())``: every problem
still moves, so no masked copy is needed).  On the CPU that read is free.  On an accelerator it
waits until every queued kernel has run, which leaves the device idle while Python launches the
next ones, and under ``torch.compile`` it breaks the captured graph.  There the loops keep their
per-problem masks and read nothing until they return.
"""

from __future__ import annotations

import torch

__all__ = ["host_checks"]


def host_checks(x: torch.Tensor) -> bool:
    """Whether a loop over tensors like ``x`` may read their values on the host to skip work."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()
