#!/usr/bin/env bash
# Create benchmarks/.venv-peers: torch==2.13.0 (pinned), the peers (TorchOpt, higher, JAX, JAXopt)
# and bilevel itself (editable, no dependency re-resolution), apart from the project's .venv.
#
#   bash benchmarks/peers/setup.sh            # then: benchmarks/.venv-peers/bin/python benchmarks/peers/bench.py
#
# PY selects the interpreter (default python3); VENV the target folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-python3}"
VENV="${VENV:-$ROOT/benchmarks/.venv-peers}"
TORCH="${TORCH:-torch==2.13.0}"

"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch first; every later install repeats the pin so that no resolver replaces it.
"$PIP" install -q "$TORCH"
"$PIP" install -q torchopt higher jax jaxopt numpy scipy "$TORCH"
# bilevel from the working tree, without re-resolving its dependencies (torch stays as is).
"$PIP" install -q --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "torchopt", "higher", "jax", "jaxlib", "jaxopt", "numpy", "scipy", "bilevel"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: NOT INSTALLED")
PY
