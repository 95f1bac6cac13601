"""A truly external inner solver: a separate program, exchanging ``.npz`` files.

Recipe.  The inner problem is solved by any program (another Python, Julia, a
compiled binary, a commercial solver's CLI) that reads a request file and writes an
answer file.  The implicit layer needs only the answer plus, in torch, the optimality
condition of the same problem (the objective's gradient, a fixed point, a KKT system).

1. Write the program.  It is called as ``command... REQUEST ANSWER`` (two paths
   appended to ``command``).  ``REQUEST`` is an ``.npz`` archive with float64 arrays
   ``init_0 ... init_{k-1}`` (the leaves of ``init``, their shapes), ``theta_0 ...
   theta_{m-1}`` (the leaves of theta) and the ints ``n_init = k`` and ``n_theta = m``.
   A dict ``init`` (or theta) is sent in its key order, with its keys as a string array
   ``init_keys`` (``theta_keys``): ``init_i`` is the leaf named ``init_keys[i]``.
   It writes ``ANSWER`` as an ``.npz`` with ``x_0 ... x_{k-1}`` (as many entries as the
   corresponding ``init_i``) and, optionally, ``status`` (a string: ``converged``,
   ``max_iter``, ``line_search_failed``, ``nonfinite``, ``negative_curvature``,
   ``failed`` or ``unknown``, the default), ``n_iter`` (int), ``fun`` (float),
   ``grad_norm`` (float) and ``message`` (string).  In Python::

       # ridge_solver.py: argmin_w ||y - X w||^2 + alpha ||w||^2
       import sys, numpy as np
       req = np.load(sys.argv[1])
       alpha = float(req["theta_0"])
       X, y = np.load("data.npz")["X"], np.load("data.npz")["y"]
       w = np.linalg.solve(X.T @ X + alpha * np.eye(X.shape[1]), X.T @ y)
       np.savez(sys.argv[2], x_0=w, status="converged", n_iter=1)

2. Give the same problem to the implicit layer in torch::

       solver = Subprocess([sys.executable, "ridge_solver.py"], timeout=60)
       obj = lambda w, alpha: ((y_t - X_t @ w) ** 2).sum() + alpha * (w ** 2).sum()
       w = bl.implicit_argmin(obj, torch.zeros(d), alpha, solver=solver)

   The layer measures ||grad_phi G|| at the answer and rejects it above
   ``optimality_tol``, which also catches a program that solves a different problem.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import tempfile
import types
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import StructureError
from .._results import SolverResult
from .._status import SolverStatus
from .._types import Objective, TensorTree
from ..tree import all_finite, leaves
from ._common import check_positive, measure, tree_from_arrays, tree_to_arrays
from ._messages import check_setting

__all__ = ["Subprocess"]

_STATUS = {s.name.lower(): s for s in SolverStatus}


@dataclasses.dataclass(frozen=True)
class Subprocess:
    """Solve the inner problem in a separate process: ``command + [request.npz, answer.npz]``.

    The file protocol and a worked recipe are in this module's docstring
    (`bilevel.solvers._subprocess`): the request holds ``init_i`` and ``theta_j`` as
    float64 arrays, the answer ``x_i`` and optionally ``status``, ``n_iter``, ``fun``,
    ``grad_norm`` and ``message``.  Files live in a fresh temporary directory, deleted
    afterwards.  The ``objective`` argument of the call is only used by
    ``measure_grad``.

    Args:
        command: the program and its arguments (the two paths are appended).
        timeout: seconds before the process is killed (status ``FAILED``); ``None``
            waits forever.
        env: environment of the process (``None``: this process's).
        cwd: working directory of the process (``None``: this process's).
        measure_grad: evaluate the gradient of the call's ``objective`` at the answer
            (one gradient) and report its norm and value, overriding the program's
            ``grad_norm`` and ``fun``.  Only for scalar objectives (implicit_argmin).

    Call:
        ``solver(objective, init, theta) -> SolverResult`` with ``x`` cast to the
        dtype and device of ``init``.  A non-zero exit code, a timeout or a missing
        answer file gives status ``FAILED`` with ``x = init`` and the reason (and the
        tail of stderr) in ``info["message"]``; the status the program wrote is
        reported as is (``UNKNOWN`` if none).

    The cause of a failure (the program not found, its exit code and stderr tail, a
    timeout, no answer file), or the program's own message with a non-converged status,
    is also `SolverResult.reason` (``message``), which the implicit layer quotes.

    Raises:
        StructureError: the answer file is not an ``.npz`` archive of numeric arrays, misses
            ``x_i`` or has the wrong number of entries, or its ``status`` is not one of the
            names above.
        TypeError: ``command`` is a string, a function or a tensor (a solver class is
            created with its settings, then called).
    """

    command: Sequence[str]
    timeout: float | None = None
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    measure_grad: bool = False

    def __post_init__(self) -> None:
        check_setting("Subprocess", "command", self.command)
        if isinstance(self.command, (str, bytes)):
            raise TypeError(
                f"Subprocess(command={self.command!r}): give the program and its arguments as a "
                "sequence, e.g. [sys.executable, 'solve.py']"
            )
        command = tuple(os.fspath(c) for c in self.command)
        if not command:
            raise ValueError("Subprocess(command=()): command must name a program")
        if self.timeout is not None:
            check_positive("Subprocess", "timeout", self.timeout)
        object.__setattr__(self, "command", command)
        if self.env is not None:
            object.__setattr__(self, "env", types.MappingProxyType(dict(self.env)))

    def __call__(self, objective: Objective, init: TensorTree, theta: TensorTree) -> SolverResult:
        init_arrays = tree_to_arrays(init, "init")
        theta_arrays = tree_to_arrays(theta, "theta")
        with tempfile.TemporaryDirectory(prefix="bilevel-subprocess-") as tmp:
            request = os.path.join(tmp, "request.npz")
            answer = os.path.join(tmp, "answer.npz")
            payload: dict[str, Any] = {"n_init": len(init_arrays), "n_theta": len(theta_arrays)}
            payload.update({f"init_{i}": a for i, a in enumerate(init_arrays)})
            payload.update({f"theta_{j}": a for j, a in enumerate(theta_arrays)})
            # Names of a dict's leaves, so that the program need not rely on their order.
            for name, tree in (("init", init), ("theta", theta)):
                if isinstance(tree, Mapping):
                    payload[f"{name}_keys"] = np.array([str(k) for k in tree.keys()], dtype=np.str_)
            np.savez(request, **payload)
            try:
                proc = subprocess.run(
                    [*self.command, request, answer],
                    capture_output=True,
                    text=True,
                    timeout=self.timeout,
                    env=None if self.env is None else dict(self.env),
                    cwd=self.cwd,
                    check=False,
                )
            except subprocess.TimeoutExpired as err:
                return self._failed(
                    init,
                    f"the process timed out after {self.timeout} s (raise timeout, or make the program "
                    "faster)",
                    stderr=_text(err.stderr),
                )
            except OSError as err:
                return self._failed(
                    init,
                    f"the process could not start: {err} (check command[0] = {self.command[0]!r}: an "
                    "executable on PATH or a path to one, e.g. sys.executable for a Python script)",
                )
            if proc.returncode != 0:
                return self._failed(
                    init,
                    f"the process exited with code {proc.returncode}",
                    stderr=proc.stderr,
                    returncode=proc.returncode,
                )
            if not os.path.exists(answer):
                return self._failed(
                    init,
                    "the process exited normally but wrote no answer file (it must write an .npz "
                    "archive to the path given as its last argument)",
                    stderr=proc.stderr,
                )
            fields = _read_answer(answer)
        return self._result(fields, objective, init, theta, proc.stdout)

    def _failed(
        self, init: TensorTree, cause: str, *, stderr: str = "", returncode: int | None = None
    ) -> SolverResult:
        x = tree_from_arrays(tree_to_arrays(init, "init"), init, "Subprocess", "init")
        tail = stderr.strip()[-2000:]
        message = f"Subprocess({list(self.command)!r}) returned no answer (x is init): {cause}"
        if tail:
            message += f"; stderr tail: {tail}"
        info: dict[str, Any] = {"message": message, "command": self.command}
        if returncode is not None:
            info["returncode"] = returncode
        return SolverResult(x=x, status=SolverStatus.FAILED, info=info, message=message)

    def _result(
        self,
        fields: dict[str, np.ndarray],
        objective: Objective,
        init: TensorTree,
        theta: TensorTree,
        stdout: str,
    ) -> SolverResult:
        k = len(leaves(init, name="init"))
        missing = [f"x_{i}" for i in range(k) if f"x_{i}" not in fields]
        if missing:
            raise StructureError(
                f"Subprocess: the answer file lacks {missing} (it has {sorted(fields)}); write one x_i per "
                "leaf of init"
            )
        x = tree_from_arrays([fields[f"x_{i}"] for i in range(k)], init, "Subprocess", "the answer's x")
        status = SolverStatus.UNKNOWN
        if "status" in fields:
            name = str(fields["status"]).strip().lower()
            if name not in _STATUS:
                raise StructureError(
                    f"Subprocess: the answer's status {name!r} is not one of {sorted(_STATUS)}"
                )
            status = _STATUS[name]
        info: dict[str, Any] = {"command": self.command}
        if "message" in fields:
            info["message"] = str(fields["message"])
        if stdout:
            info["stdout"] = stdout[-2000:]
        message = ""
        if status not in (SolverStatus.CONVERGED, SolverStatus.UNKNOWN):
            said = f": {info['message']}" if "message" in info else " (no message in the answer file)"
            message = f"Subprocess({list(self.command)!r}): the program reported {status.name.lower()}{said}"
        n_iter = int(fields["n_iter"]) if "n_iter" in fields else 0
        fun = float(fields["fun"]) if "fun" in fields else math.nan
        grad_norm = float(fields["grad_norm"]) if "grad_norm" in fields else math.nan
        n_gev = 0
        if not bool(all_finite(x).all()):
            status = SolverStatus.NONFINITE
            message = f"Subprocess({list(self.command)!r}): the program's answer x holds NaN or infinity"
        elif self.measure_grad:
            fun, grad_norm, n_gev = measure(objective, x, theta, "Subprocess")
        return SolverResult(
            x=x,
            status=status,
            n_iter=n_iter,
            grad_norm=grad_norm,
            n_gev=n_gev,
            fun=fun,
            info=info,
            message=message,
        )


def _text(out: str | bytes | None) -> str:
    """A captured stream as text (``TimeoutExpired`` may hold bytes or ``None``)."""
    if out is None:
        return ""
    return out.decode(errors="replace") if isinstance(out, bytes) else out


def _read_answer(path: str) -> dict[str, np.ndarray]:
    """The arrays of the answer file, or a `StructureError` that says what the file should be.

    Raises:
        StructureError: the file is not an ``.npz`` archive (``np.savez``), is damaged, or holds
            object arrays (pickles are never loaded).
    """
    fmt = (
        "the answer must be an .npz archive written with np.savez(path, x_0=..., ...) holding "
        "numeric arrays and strings"
    )
    if not zipfile.is_zipfile(path):
        size = os.path.getsize(path)
        raise StructureError(f"Subprocess: the answer file ({size} bytes) is not an .npz archive: {fmt}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except ValueError as err:  # object arrays: numpy would suggest allow_pickle=True, which we never do
        raise StructureError(
            f"Subprocess: the answer file holds an object array (a pickle), which is not read: {fmt}"
        ) from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise StructureError(f"Subprocess: the answer file is damaged ({err}): {fmt}") from err
