"""Figure 2 of iMAML: the shapes the paper reports, on the quick versions of the two scripts.

Fig. 2a (``examples/synthetic_meta_gradient.py``): MAML and iMAML approach the exact
meta-gradient as inner GD steps grow, iMAML with 5 CG steps reaches a relative error <= 1e-4
and beats MAML at few steps, 2 CG steps leave a terminal error.  The pieces are checked against
independent references: central finite differences of the closed-form Alg*, the closed-form
Jacobian of K GD steps, a hand-written CG on the paper's system (I + A/lam) g = v, and the
meta-learning engine (`meta_gradient` with `Unrolled`, `Implicit(warm_start=False)`,
`FirstOrder`) on the same tasks.

Fig. 2b (``benchmarks/compute_memory.py``): iMAML's memory does not grow with inner steps,
MAML's does; `PeakMemory` itself is checked on allocations of known size.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from bilevel.metalearn.algorithms import FirstOrder, Implicit, MetaAlgorithm, Unrolled, meta_gradient
from bilevel.metalearn.tasks import Task
from bilevel.solvers import GradientDescent

ROOT = Path(__file__).resolve().parents[1]
D64 = torch.float64
LAM = 5.0


def _load(rel: str, name: str) -> ModuleType:
    """Import a script from examples/ or benchmarks/ (not packages) by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


synth = _load("examples/synthetic_meta_gradient.py", "_fig2a_synthetic_meta_gradient")
bench = _load("benchmarks/compute_memory.py", "_fig2b_compute_memory")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The scripts set one thread (tiny problems, a shared machine); restore the suite's setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


# ------------------------------------------------------------------------------------ Figure 2a
@pytest.fixture(scope="module")
def fig2a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[str, int], float]]:
    out = tmp_path_factory.mktemp("fig2a")
    synth.main(["--out", str(out), "--quick"])
    header, rows = _read(out / "fig2a.csv")
    assert header == ["method", "inner_steps", "rel_error"]
    return out, {(r["method"], int(r["inner_steps"])): float(r["rel_error"]) for r in rows}


def test_fig2a_writes_every_method_and_step_count(fig2a: tuple[Path, dict[tuple[str, int], float]]) -> None:
    out, err = fig2a
    assert set(err) == {(m, k) for m in synth.METHODS for k in synth.QUICK_STEPS}
    assert (out / "fig2a.png").stat().st_size > 10_000


def test_fig2a_shapes_match_the_paper(fig2a: tuple[Path, dict[tuple[str, int], float]]) -> None:
    _, err = fig2a
    ks = synth.QUICK_STEPS
    first, last = ks[0], ks[-1]
    # Both MAML and iMAML (5 CG steps) approach the exact meta-gradient as steps grow.
    for m in ("maml", "imaml-cg5"):
        curve = [err[(m, k)] for k in ks]
        assert all(b <= a for a, b in itertools.pairwise(curve[2:])), (m, curve)  # monotone from 10 steps
        assert err[(m, first)] > 1e-1 and err[(m, last)] < 1e-6, (m, curve)
    # iMAML with 5 CG steps reaches 1e-4 ...
    assert err[("imaml-cg5", last)] <= 1e-4
    # ... and is more accurate than MAML at finite step counts, markedly so at few steps.
    for k in ks:
        assert err[("imaml-cg5", k)] < err[("maml", k)], k
    for k in (1, 3, 10):
        assert err[("imaml-cg5", k)] < 0.5 * err[("maml", k)], k
    # 2 CG steps leave a terminal error: a plateau well above the 5-step answer.
    plateau = [err[("imaml-cg2", k)] for k in (300, 1000)]
    assert min(plateau) > 1e-2
    assert abs(plateau[1] - plateau[0]) < 0.01 * plateau[1]
    # First-order MAML ignores the Jacobian: it never gets close.
    assert err[("fomaml", last)] > 1.0


@pytest.fixture(scope="module")
def task() -> Any:
    return synth.make_tasks(1, seed=3)[0]


def test_exact_meta_gradient_matches_finite_differences(task: Any) -> None:
    theta = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=D64)
    H = task.hessian(LAM)

    def outer(th: torch.Tensor) -> float:
        return float(task.query_loss(torch.linalg.solve(H, LAM * th - task.b)))

    h = 1e-5
    fd = torch.tensor(
        [(outer(theta + h * e) - outer(theta - h * e)) / (2 * h) for e in torch.eye(50, dtype=D64)], dtype=D64
    )
    exact = task.exact_meta_gradient(theta, LAM)
    torch.testing.assert_close(exact, fd, rtol=1e-6, atol=1e-8)  # central differences: O(h^2) + rounding


def test_maml_gradient_is_the_closed_form_jacobian_of_gd(task: Any) -> None:
    # phi_K = M^K theta + ..., M = I - lr H, so dphi_K/dtheta = M^K + lam H^-1 (I - M^K).
    theta = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=D64)
    H = task.hessian(LAM)
    lr, K = 1.0 / float(torch.linalg.eigvalsh(H).max()), 7
    eye = torch.eye(50, dtype=D64)
    MK = torch.linalg.matrix_power(eye - lr * H, K)
    J = MK + LAM * torch.linalg.solve(H, eye - MK)
    phi_K = synth.inner_path([task], theta, LAM, lr, [K])[K][0]
    expected = J.T @ task.query_grad(phi_K)
    torch.testing.assert_close(synth.maml_gradient(task, theta, LAM, K, lr), expected, rtol=1e-10, atol=1e-12)
    # inner_path (the library's batched GD) agrees with the closed form too
    phi_cf = MK @ theta + torch.linalg.solve(H, (eye - MK) @ (LAM * theta - task.b))
    torch.testing.assert_close(phi_K, phi_cf, rtol=1e-10, atol=1e-12)


def _paper_cg(A: torch.Tensor, v: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` CG iterations from 0 on the paper's system (I + A/LAM) g = v, written out."""
    M = torch.eye(A.shape[0], dtype=A.dtype) + A / LAM
    g, r = torch.zeros_like(v), v.clone()
    p, rr = r.clone(), r @ r
    for _ in range(steps):
        Mp = M @ p
        alpha = rr / (p @ Mp)
        g, r = g + alpha * p, r - alpha * Mp
        rr_new = r @ r
        p, rr = r + (rr_new / rr) * p, rr_new
    return g


@pytest.mark.parametrize("spectrum", ["bands", "continuous"])
def test_imaml_gradient_is_cg_from_zero_on_the_papers_system(spectrum: str) -> None:
    task = synth.make_tasks(1, spectrum=spectrum, seed=4)[0]
    theta = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=D64)
    H = task.hessian(LAM)
    lr, K = 1.0 / float(torch.linalg.eigvalsh(H).max()), 20
    phi_K = synth.inner_path([task], theta, LAM, lr, [K])[K][0]
    v = task.query_grad(phi_K)
    for c in (1, 2, 5):
        got = synth.imaml_gradient(task, theta, LAM, phi_K, K, c)
        torch.testing.assert_close(got, _paper_cg(task.A, v, c), rtol=1e-9, atol=1e-12)
    # enough CG steps give the exact implicit gradient at phi_K
    exact_at_phi_K = LAM * torch.linalg.solve(H, v)
    many = 5 if spectrum == "bands" else 200  # five distinct eigenvalues: CG is exact in 5 steps
    got = synth.imaml_gradient(task, theta, LAM, phi_K, K, many)
    torch.testing.assert_close(got, exact_at_phi_K, rtol=1e-8, atol=1e-10)


def test_engine_computes_the_same_meta_gradients(task: Any) -> None:
    """`meta_gradient` on the same task written as least squares: Lhat = 1/2 ||X phi - y||^2 + const."""
    theta = torch.randn(50, generator=torch.Generator().manual_seed(5), dtype=D64)
    A, b, Xq, yq = task.A, task.b, task.Xq, task.yq
    L = torch.linalg.cholesky(A)  # A = L L' = X'X with X = L'
    X = L.T
    y = torch.linalg.solve_triangular(L, -b[:, None], upper=False)[:, 0]  # X' y = -b
    n = yq.numel() ** 0.5
    batch = Task(X[None], y[None], (Xq / n)[None], (yq / n)[None])

    def model(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x @ params["w"]

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out - target) ** 2).sum()

    lr, K = 1.0 / float(torch.linalg.eigvalsh(task.hessian(LAM)).max()), 6
    phi_K = synth.inner_path([task], theta, LAM, lr, [K])[K][0]
    inner = GradientDescent(lr=lr, max_iter=K, tol=0.0)
    expected: dict[Any, torch.Tensor] = {
        Unrolled(): synth.maml_gradient(task, theta, LAM, K, lr),
        Implicit(cg_iters=2, warm_start=False): synth.imaml_gradient(task, theta, LAM, phi_K, K, 2),
        Implicit(cg_iters=5, warm_start=False): synth.imaml_gradient(task, theta, LAM, phi_K, K, 5),
        FirstOrder(): task.query_grad(phi_K),
    }
    for kind, want in expected.items():
        algo = MetaAlgorithm(inner, kind, lam=LAM)
        got, _, _ = meta_gradient(
            algo, model, loss, {"w": theta}, batch, classification=False, vectorize=False
        )
        torch.testing.assert_close(got["w"], want, rtol=1e-8, atol=1e-10, msg=f"{kind}")


# ------------------------------------------------------------------------------------ Figure 2b
def test_peak_memory_counts_new_storages_until_freed() -> None:
    x = torch.ones(1000, dtype=D64)  # made before: not counted
    with bench.PeakMemory() as mem:
        y = x * 2  # 8000 bytes
        z = y + 1  # 8000 bytes: 16000 live
        y.add_(1)  # in place: same storage
        _ = z[:10].view(2, 5)  # views: same storage
        del y, _
        w = z * 3  # y freed, w new: 16000 live again
        assert mem.current == 16000
        del z, w
    assert mem.peak == 16000
    assert mem.current == 0


def test_peak_memory_sees_torch_func_and_backward() -> None:
    x = torch.randn(10_000, dtype=D64)

    def f(p: torch.Tensor) -> torch.Tensor:
        return (p.sin() * p).sum()

    with bench.PeakMemory() as mem:
        g = torch.func.grad(f)(x)
    assert mem.peak >= 3 * x.nbytes  # at least sin(p), cos(p) (saved) and the gradient
    assert mem.current == g.nbytes  # only the returned gradient is still alive


def test_fig2b_imaml_memory_is_flat_and_maml_memory_grows(tmp_path: Path) -> None:
    # A tiny CNN and task so that it runs in seconds; the full benchmark uses the paper's sizes.
    args = ["--out", str(tmp_path), "--ways", "5", "--shots", "1", "--queries", "1", "--hidden", "8"]
    args += ["--steps", "1", "4", "16", "--repeats", "1", "--threads", "1", "--device", "cpu"]
    bench.main(args)
    header, rows = _read(tmp_path / "fig2b.csv")
    assert header == ["method", "inner_steps", "seconds", "memory_bytes"]
    mem = {(r["method"], int(r["inner_steps"])): int(r["memory_bytes"]) for r in rows}
    assert set(mem) == {(m, k) for m in bench.METHODS for k in (1, 4, 16)}
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert abs(mem[("imaml-gd", 16)] - mem[("imaml-gd", 1)]) <= 0.1 * mem[("imaml-gd", 1)]
    assert abs(mem[("fomaml", 16)] - mem[("fomaml", 1)]) <= 0.1 * mem[("fomaml", 1)]
    assert mem[("maml", 1)] < mem[("maml", 4)] < mem[("maml", 16)]
    assert mem[("maml", 16)] > 2.5 * mem[("maml", 4)]  # about linear in steps
    assert (tmp_path / "fig2b.png").stat().st_size > 10_000
