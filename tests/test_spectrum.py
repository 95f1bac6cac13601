"""Lanczos extreme eigenvalues against dense eigensolves (float64)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl


def _sym(B: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    return (M + M.transpose(1, 2)) / 2  # indefinite


def _mv(A: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda V: torch.einsum("bij,bj->bi", A, V)


def test_full_krylov_space_gives_the_extreme_eigenvalues() -> None:
    A = _sym(4, 6, 0)
    v0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lo, hi = bl.lanczos_extremes(_mv(A), v0, steps=6)
    ev = torch.linalg.eigvalsh(A)
    torch.testing.assert_close(lo, ev[:, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hi, ev[:, -1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_ritz_extremes_lie_inside_the_spectrum_and_tighten(steps: int) -> None:
    A = _sym(3, 40, 2)
    v0 = torch.randn(3, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lo, hi = bl.lanczos_extremes(_mv(A), v0, steps=steps)
    ev = torch.linalg.eigvalsh(A)
    assert bool((lo >= ev[:, 0] - 1e-10).all()) and bool((hi <= ev[:, -1] + 1e-10).all())
    if steps > 1:
        lo1, hi1 = bl.lanczos_extremes(_mv(A), v0, steps=steps - 1)
        assert bool((lo <= lo1 + 1e-10).all()) and bool((hi >= hi1 - 1e-10).all())


def test_an_invariant_start_keeps_its_ritz_values() -> None:
    """v0 in a 2-d invariant subspace of problem 0: its extremes are that block's eigenvalues,
    not a spurious 0 from the decoupled later steps; problem 1 runs on."""
    d = torch.tensor([[1.0, 3.0, 5.0, 7.0], [-2.0, 1.0, 4.0, 9.0]], dtype=torch.float64)
    A = torch.diag_embed(d)
    v0 = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    lo, hi = bl.lanczos_extremes(_mv(A), v0, steps=4)
    torch.testing.assert_close(lo, torch.tensor([3.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(hi, torch.tensor([5.0, 9.0], dtype=torch.float64))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        bl.lanczos_extremes(lambda v: v, torch.ones(1, 3), steps=0)
    with pytest.raises(ValueError, match=r"expected \(B, n\)"):
        bl.lanczos_extremes(lambda v: v, torch.ones(3), steps=2)
