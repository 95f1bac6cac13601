"""A run's files on disk: atomic writes, the checkpoint `train` writes, and reading it back safely.

``checkpoint.pt`` is a dict of tensors and strings, read back with ``torch.load(...,
weights_only=True)`` (no code is unpickled):

* ``theta``: the meta-parameters by name; ``log_lam``: learned log-lambda leaves by name (empty
  where lambda is fixed);
* ``optimizer``: Adam's state; ``step``: meta-steps done; ``elapsed``: seconds of the training clock;
* ``history``, ``config``: the curves and the `TrainConfig`, as JSON strings;
* ``image_shape``: ``[C, H, W]`` of an image dataset's images, ``None`` for sinusoid (optional:
  a checkpoint may lack it);
* ``provenance``: what the run was trained on (`bilevel.metalearn.training.provenance.Provenance`,
  a JSON string: the class split, the data listing's fingerprint, the library version; optional:
  older checkpoints lack it).

Every JSON file of a run is strict JSON (`strict_json`): a NaN or infinite number is written as
``null``, so any JSON reader can read it.

`save_checkpoint` is the one writer and `load_checkpoint` the one reader: every way a file can be
unusable (missing, empty, truncated, not a checkpoint, a model's ``state_dict``, a damaged
configuration, an Adam state that does not fit the parameters) is a `bilevel.CheckpointError` that
names the file and the damage; a write that fails (a full disk, no permission) leaves no temporary
file behind and is a `CheckpointWriteError` that names the file and the cause.  `saved_config`
reads the run's `TrainConfig` back, `open_run` checks a run folder against a request to train
there, and `keep_earlier` moves an earlier result aside instead of overwriting it.
`bilevel.metalearn.load_run` turns a checkpoint into a model function, parameters and algorithm.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ... import CheckpointError
from .config import IMPLICIT_ALGOS, TrainConfig
from .provenance import Provenance

__all__ = [
    "CheckpointWriteError",
    "adam_mismatch",
    "atomic_json",
    "atomic_save",
    "keep_earlier",
    "load_checkpoint",
    "open_run",
    "save_checkpoint",
    "saved_config",
    "shape_mismatch",
    "strict_json",
]

#: Keys every checkpoint written by `train` has (``image_shape`` is optional and may be absent).
REQUIRED_KEYS = ("theta", "log_lam", "optimizer", "step", "history", "elapsed", "config")


def shape_mismatch(want: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Names at which two parameter dicts differ (missing on one side, or of another shape); [] if none."""
    a = {k: tuple(v.shape) for k, v in want.items()}
    b = {k: tuple(v.shape) for k, v in found.items()}
    if a == b:
        return []
    return sorted(set(a) ^ set(b)) or sorted(k for k in a if a[k] != b[k])


class CheckpointWriteError(CheckpointError):
    """A run's file could not be written (a full disk, no permission, ...); nothing was left half-written."""


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (nested dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON: NaN and infinities become ``null`` (never the non-standard ``NaN``).

    Objects JSON has no form for are written as their ``str`` (a path, a dtype).
    """
    return json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False)


def _write_failed(path: Path, err: BaseException) -> CheckpointWriteError:
    """The one-line error of a failed write of ``path``."""
    if isinstance(err, OSError) and err.errno is not None:
        cause = os.strerror(err.errno)
        if err.errno == errno.ENOSPC:
            cause += ": free space on that disk, or pass another --out"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            cause += ": make the folder writable, or pass another --out"
    else:  # torch's writer reports a failed write as a RuntimeError from its C++ stream
        cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    return CheckpointWriteError(
        f"cannot write {path}: {cause} (nothing was written; the earlier file is kept)"
    )


def _atomic(write: Any, path: Path) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``; on any failure ``tmp`` is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the failure to report is the write's, not the clean-up's
            pass
        if isinstance(err, (OSError, RuntimeError)):
            raise _write_failed(path, err) from err
        raise


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a reader never sees half a file.

    Raises:
        CheckpointWriteError: the write failed (no temporary file is left; ``path`` is unchanged).
    """
    _atomic(lambda tmp: torch.save(obj, tmp), path)


def atomic_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented strict JSON (`strict_json`) through a temporary file renamed over ``path``.

    Raises:
        CheckpointWriteError: the write failed (no temporary file is left; ``path`` is unchanged).
    """
    text = strict_json(obj, indent=2)
    _atomic(lambda tmp: tmp.write_text(text), path)


def save_checkpoint(
    path: Path,
    state: Mapping[str, Any],
    cfg: TrainConfig,
    history: Mapping[str, Any],
    elapsed: float,
    image_shape: list[int] | None,
    provenance: Provenance | None = None,
) -> None:
    """Write a run's ``checkpoint.pt`` atomically (`atomic_save`).

    Args:
        path: the file.
        state: ``theta``, ``log_lam``, ``optimizer`` and ``step`` (`TrainState.state_dict`).
        cfg: the run's configuration.
        history: the curves (saved as JSON).
        elapsed: seconds of the training clock.
        image_shape: ``[C, H, W]`` of an image dataset's images; ``None`` for sinusoid.
        provenance: what the run was trained on (`Provenance`); ``None``: not recorded.

    Raises:
        CheckpointWriteError: the write failed (the earlier checkpoint is kept, no debris is left).
    """
    atomic_save(
        {
            **state,
            "history": strict_json(history),
            "elapsed": elapsed,
            "config": strict_json(dataclasses.asdict(cfg)),
            "image_shape": image_shape,
            "provenance": None if provenance is None else provenance.to_json(),
        },
        path,
    )


def _damage(p: Path, err: BaseException) -> str:
    """What is wrong with a file ``torch.load`` could not read."""
    size = p.stat().st_size
    said = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__
    if size == 0:
        return "the file is empty (0 bytes)"
    if isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(p):
        # torch's own message advises weights_only=False, i.e. running the file's code: never.
        return (
            "it holds Python objects other than tensors, numbers and strings, which are never "
            "unpickled (a file of another program, or a model saved whole)"
        )
    if not zipfile.is_zipfile(p):
        return (
            f"it is not a torch.save archive ({size} bytes; truncated by an interrupted copy, or "
            f"another kind of file): {said}"
        )
    return f"the archive is damaged ({size} bytes): {said}"


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `train` (``weights_only=True``: no code is unpickled), checked.

    Args:
        path: the ``checkpoint.pt`` of a run (or the run's folder, which holds it).
        device: where to put its tensors.

    Returns:
        The checkpoint's dict (see the module docstring for its keys), with ``theta`` and
        ``log_lam`` dicts of tensors, ``step`` an int and ``config`` a JSON object string.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated or damaged, holds Python objects, or is not a
            checkpoint of `train` (e.g. a model's ``state_dict``): the message names the file and
            what is wrong.
    """
    p = Path(path)
    if p.is_dir() and (p / "checkpoint.pt").is_file():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}: pass the checkpoint.pt written by `train`")
    try:
        ck: Any = torch.load(p, map_location=device, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, OSError, KeyError...
        raise CheckpointError(f"cannot read the checkpoint {p}: {_damage(p, err)}") from err
    hint = f"{p} is not a checkpoint written by `python -m bilevel.metalearn train`"
    if not isinstance(ck, Mapping):
        raise CheckpointError(f"{hint}: it holds a {type(ck).__name__}, not a dict")
    missing = [k for k in REQUIRED_KEYS if k not in ck]
    if missing:
        keys = sorted(str(k) for k in ck)[:8]
        raise CheckpointError(
            f"{hint}: it lacks {missing} (its keys are {keys}{', ...' if len(ck) > 8 else ''}; a model's "
            "state_dict is read with torch.load, not as a run)"
        )
    for name in ("theta", "log_lam"):
        leaves = ck[name]
        if not isinstance(leaves, Mapping) or not all(isinstance(v, torch.Tensor) for v in leaves.values()):
            raise CheckpointError(f"{hint}: its {name!r} is not a dict of tensors")
    if not ck["theta"]:
        raise CheckpointError(f"{hint}: its 'theta' holds no parameters")
    if isinstance(ck["step"], bool) or not isinstance(ck["step"], int) or ck["step"] < 0:
        raise CheckpointError(f"{hint}: its 'step' is {ck['step']!r}, not a count of meta-steps")
    for name in ("config", "history"):
        try:
            ok = isinstance(json.loads(ck[name]), dict)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{hint}: its {name!r} is not a JSON object")
    problem = adam_mismatch(ck["optimizer"], [*ck["theta"].values(), *ck["log_lam"].values()])
    if problem is not None:
        raise CheckpointError(f"the checkpoint {p} is damaged: {problem}")
    if ck.get("provenance") is not None:
        Provenance.from_json(ck["provenance"], str(p))  # its check: a damaged record is refused here
    return dict(ck)


def adam_mismatch(state: Any, params: list[torch.Tensor]) -> str | None:
    """How an Adam ``state_dict`` does not fit ``params`` (theta's tensors, then log-lambda's), or ``None``.

    Adam keeps, per parameter in its order, ``exp_avg`` and ``exp_avg_sq`` of the parameter's shape;
    a state of other parameters would be loaded by ``torch.optim.Adam.load_state_dict`` without a
    word (shapes are not checked there) and fail, or broadcast silently, at the next step.
    """
    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list):
        return "its 'optimizer' is not an optimizer's state_dict (no 'param_groups')"
    ids: list[Any] = []
    for group in state["param_groups"]:
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), list):
            return "its 'optimizer' has a parameter group without a 'params' list"
        ids.extend(group["params"])
    if len(ids) != len(params):
        return (
            f"its Adam state is for {len(ids)} parameter tensor(s), but theta and log_lam hold {len(params)}"
        )
    per = state.get("state", {})
    if not isinstance(per, Mapping):
        return "its 'optimizer' has no per-parameter 'state' dict"
    for i, (key, param) in enumerate(zip(ids, params)):
        entry = per.get(key)
        if entry is None:
            continue  # no step taken yet for this parameter
        for name in ("exp_avg", "exp_avg_sq"):
            moment = entry.get(name) if isinstance(entry, Mapping) else None
            if not isinstance(moment, torch.Tensor):
                return f"its Adam state of parameter {i} has no {name} tensor"
            if moment.shape != param.shape:
                return (
                    f"its Adam {name} of parameter {i} has shape {tuple(moment.shape)}, the parameter "
                    f"{tuple(param.shape)}"
                )
    return None


def saved_config(ck: Mapping[str, Any], path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
    """The `TrainConfig` saved in a checkpoint (`load_checkpoint`), with ``overrides`` applied.

    Args:
        ck: the checkpoint's dict.
        path: its file, for messages.
        **overrides: fields to replace (their values are checked as any `TrainConfig`'s).

    Returns:
        The configuration.

    Raises:
        CheckpointError: the saved configuration has fields this version does not know, or values
            it refuses.
        ConfigError: an override has a value no run can use (or contradicts the saved fields).
    """
    saved = json.loads(ck["config"])
    if "cg_warm_start" not in saved:
        # a configuration without the field is one whose iMAML CG started from the first-order
        # gradient; other algorithms have no CG and keep the default (a resume compares it)
        saved["cg_warm_start"] = saved.get("algo") in IMPLICIT_ALGOS
    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(
            f"the checkpoint {path} has configuration fields {unknown} that this version of bilevel does "
            "not know: it was written by another version"
        )
    try:
        TrainConfig(**saved)
    except ValueError as err:
        raise CheckpointError(f"the checkpoint {path} holds a configuration that is refused: {err}") from err
    return TrainConfig(**{**saved, **overrides})


def open_run(cfg: TrainConfig, resume: bool, overwrite: bool, device: torch.device) -> dict[str, Any] | None:
    """Check ``cfg.out`` against a request to train there: the checkpoint to resume, or ``None``.

    Args:
        cfg: the run; ``cfg.out`` its folder.
        resume: continue the run in ``cfg.out``.
        overwrite: start a new run in ``cfg.out`` although it holds one.
        device: where to load the checkpoint's tensors.

    Returns:
        The checkpoint (`load_checkpoint`) to resume, or ``None`` for a new run.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, a damaged one or one of another
            configuration; or a new run over an existing one without ``overwrite``.
    """
    path = Path(cfg.out) / "checkpoint.pt"
    if not resume:
        if path.is_file() and not overwrite:
            raise CheckpointError(
                f"{cfg.out} already holds a run ({path}): resume it (--resume, resume=True), start over "
                "there (--overwrite, overwrite=True; its metrics.json is kept), or choose another --out"
            )
        return None
    if not path.is_file():
        raise CheckpointError(
            f"nothing to resume: no checkpoint at {path}; drop --resume (resume=False) to start a new run, "
            "or pass the --out of the run to continue"
        )
    ck = load_checkpoint(path, device)
    conflicts = cfg.resume_conflicts(saved_config(ck, path))
    if conflicts:
        raise CheckpointError(
            f"cannot resume {path}: the run was started with another configuration ({'; '.join(conflicts)}); "
            "resume with the run's settings (see its config.json), or start a new run in another --out"
        )
    return ck


def keep_earlier(path: Path) -> Path | None:
    """Move an earlier result at ``path`` aside, to ``<stem>.step<N><suffix>``, before it is rewritten.

    ``N`` is the earlier result's ``meta_steps_done`` (where it is a JSON object that has one); a
    name already taken gets a counter.

    Returns:
        Where the earlier file now is, or ``None`` if there was none.
    """
    if not path.is_file():
        return None
    try:
        step = json.loads(path.read_text()).get("meta_steps_done", "earlier")
    except (ValueError, AttributeError, OSError):
        step = "earlier"
    target = path.with_name(f"{path.stem}.step{step}{path.suffix}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}.step{step}-{n}{path.suffix}")
    os.replace(path, target)
    return target
