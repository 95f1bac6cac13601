"""A run's files on disk: atomic writes and the checkpoint `train` writes.

``checkpoint.pt`` is a dict of tensors and strings, read back with ``torch.load(...,
weights_only=True)`` (no code is unpickled):

* ``theta``: the meta-parameters by name; ``log_lam``: learned log-lambda leaves by name (empty
  where lambda is fixed);
* ``optimizer``: Adam's state; ``step``: meta-steps done; ``elapsed``: seconds of the training clock;
* ``history``, ``config``: the curves and the `TrainConfig`, as JSON strings;
* ``image_shape``: ``[C, H, W]`` of an image dataset's images, ``None`` for sinusoid (absent from
  checkpoints written before it was added).

`bilevel.metalearn.load_run` turns a checkpoint into a model function, parameters and algorithm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_json", "atomic_save", "load_checkpoint"]


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON through a temporary file renamed over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `train` (``weights_only=True``: no code is unpickled).

    Args:
        path: the ``checkpoint.pt`` of a run.
        device: where to put its tensors.

    Returns:
        The checkpoint's dict (see the module docstring for its keys).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}: pass the checkpoint.pt written by `train`")
    ck: dict[str, Any] = torch.load(p, map_location=device, weights_only=True)
    return ck
