# The two commands of the README.  Both create .venv and install everything first.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= results/demo

.PHONY: setup demo test lint docs clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so that nothing below pulls another build
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python examples/demo.py --out $(OUT)

test: setup
	$(BIN)/python -m pytest

# The documentation site (docs/, mkdocs.yml) into site/; any warning fails the build.
$(BIN)/.docs-installed: pyproject.toml $(BIN)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check bilevel tests examples benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) results site .pytest_cache .mypy_cache
