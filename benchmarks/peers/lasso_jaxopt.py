"""Elastic-net and lasso hypergradients on diabetes: `bilevel` against JAXopt's implicit differentiation.

The problem of ``examples/lasso_hyperparameter.py``: w*(theta) = argmin_w 1/(2m) ||Xw - y||^2
+ l2/2 ||w||^2 + l1 ||w||_1 with (l1, l2) = exp(theta) on the diabetes training split, and the
hypergradient of the validation MSE at w*(theta).

* ours: FISTA (the example's solver) as a black box, differentiated by `bilevel.implicit_argmin`
  with ``condition=ProximalFixedPoint(soft-threshold)``;
* JAXopt: ``jaxopt.ProximalGradient(fun, prox=prox_lasso, implicit_diff=True)`` (accelerated,
  tol 1e-12), differentiated by ``jax.grad`` through its implicit-differentiation rule, the
  structure of JAXopt's own ``examples/implicit_diff/lasso_implicit_diff.py``.

Both in float64 on the same splits, both backward solves to a relative residual of 1e-12 (GMRES
for JAXopt: its default, CG on the normal equations to 1e-5, left a 2.3e-4 relative difference at
l1 = 0.02, l2 = 0.005); prints each hypergradient, the max relative difference between them, and
the central finite difference of a re-solve (eps 1e-6) as the referee.  Measured (jax 0.10.2,
jaxopt 0.8.5): max relative difference 9e-10 to 2e-8 at the four settings, each within 2e-8 of
the finite differences.

The peers' environment has JAX and JAXopt but not scikit-learn, so the data are read from the
two CSV files scikit-learn bundles (``diabetes_data_raw.csv.gz``, ``diabetes_target.csv.gz``);
``--diabetes`` names their folder (default: the folder of scikit-learn in ``.venv``).  The
example's split standardizes the raw features exactly as it does scikit-learn's scaled ones.

    benchmarks/.venv-peers/bin/python benchmarks/peers/lasso_jaxopt.py
"""

from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import math
import os
import pathlib
import sys
from types import ModuleType

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np
import torch

jax.config.update("jax_enable_x64", True)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_lasso_example", ROOT / "examples" / "lasso_hyperparameter.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _diabetes_dir(given: str | None) -> pathlib.Path:
    if given:
        return pathlib.Path(given)
    found = glob.glob(
        str(ROOT / ".venv" / "lib" / "python*" / "site-packages" / "sklearn" / "datasets" / "data")
    )
    if not found:
        raise SystemExit("scikit-learn's diabetes CSV files not found under .venv: pass --diabetes DIR")
    return pathlib.Path(found[0])


def jaxopt_hypergradient(
    ex: ModuleType, train: object, val: object, theta: np.ndarray, lasso: bool
) -> np.ndarray:
    from jaxopt import ProximalGradient, linear_solve, prox

    Xtr, ytr = jnp.asarray(train.X.numpy()), jnp.asarray(train.y.numpy())  # type: ignore[attr-defined]
    Xva, yva = jnp.asarray(val.X.numpy()), jnp.asarray(val.y.numpy())  # type: ignore[attr-defined]

    def fun(w: jax.Array, th: jax.Array) -> jax.Array:
        l2 = 0.0 if lasso else jnp.exp(th[1])
        return 0.5 * jnp.mean((Xtr @ w - ytr) ** 2) + 0.5 * l2 * jnp.sum(w**2)

    # the backward solve to 1e-12 like ours (JAXopt's default normal-equation CG stops at 1e-5)
    solve = functools.partial(linear_solve.solve_gmres, tol=1e-12, maxiter=1000)
    pg = ProximalGradient(
        fun=fun,
        prox=prox.prox_lasso,
        tol=1e-12,
        maxiter=50_000,
        implicit_diff=True,
        implicit_diff_solve=solve,
    )

    def outer(th: jax.Array) -> jax.Array:
        w = pg.run(jnp.zeros(Xtr.shape[1]), jnp.exp(th[0]), th).params
        return jnp.mean((Xva @ w - yva) ** 2)

    return np.asarray(jax.grad(outer)(jnp.asarray(theta)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diabetes", default=None, help="folder of diabetes_data_raw.csv.gz")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ex = _example()
    folder = _diabetes_dir(args.diabetes)
    X = np.loadtxt(folder / "diabetes_data_raw.csv.gz")
    y = np.loadtxt(folder / "diabetes_target.csv.gz")
    train, val, _ = ex.split(X, y, args.seed)
    print(f"diabetes: {X.shape[0]} samples, {X.shape[1]} features; jax {jax.__version__}")
    for lasso in (False, True):
        tuner = ex.Tuner(train, val, lasso, "fista")
        for l1, l2 in ((0.3, 0.1), (0.02, 0.005)):
            theta = torch.tensor([math.log(l1), math.log(l2)], dtype=torch.float64)
            ours = tuner.check(theta)
            k = 1 if lasso else 2
            theirs = jaxopt_hypergradient(ex, train, val, theta.numpy(), lasso)[:k]
            a = np.asarray(ours.hypergradient)
            rel = float(np.abs(a - theirs).max() / np.abs(theirs).max())
            rel_fd = float(
                np.abs(theirs - ours.finite_difference).max() / np.abs(ours.finite_difference).max()
            )
            name = "lasso" if lasso else "elastic net"
            print(
                f"{name:11s} l1={l1:<5g} l2={0.0 if lasso else l2:<6g} support {ours.support}/10  "
                f"bilevel {np.array2string(a, precision=9)}  jaxopt {np.array2string(theirs, precision=9)}  "
                f"max rel. diff {rel:.1e}  (vs finite differences: bilevel {ours.rel_fd:.1e}, "
                f"jaxopt {rel_fd:.1e})"
            )


if __name__ == "__main__":
    main()
