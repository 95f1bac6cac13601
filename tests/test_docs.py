"""The documentation's code runs: every ```python block of each page under docs/, in order.

Each page's blocks share one namespace (a tutorial builds on its earlier blocks) and run in a
temporary working directory, so files they write go nowhere else.  The site itself is built by
``make docs`` (``mkdocs build --strict``), which CI runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_every_tutorial_has_code() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    tutorials = {p.relative_to(DOCS).as_posix() for p in (DOCS / "tutorials").glob("*.md")}
    assert tutorials and tutorials <= names, tutorials - names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path / "cache"))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{page.relative_to(DOCS)}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}: block {i} failed: {type(e).__name__}: {e}\n{code}") from e
    assert os.getcwd() == str(tmp_path)


def test_readme_first_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first example, as written (its meta-learning block needs a meta-batch and is
    run, against `meta_gradient`, by test_metalearn_algorithms.py)."""
    monkeypatch.chdir(tmp_path)
    code = blocks(DOCS.parent / "README.md")[0]
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(code, "README.md[block 0]", "exec"), namespace)
    grad = namespace["log_lam"].grad  # type: ignore[attr-defined]
    assert grad is not None and grad.shape == (5,) and bool(grad.isfinite().all())
    assert namespace["info"].last_backward.converged  # type: ignore[attr-defined]
