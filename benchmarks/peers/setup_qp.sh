#!/usr/bin/env bash
# Create benchmarks/.venv-qp for benchmarks/qp_layer.py: torch==2.13.0 (pinned, CPU build) first,
# then the peers cvxpylayers, diffcp, cvxpy and qpth, apart from the project's .venv.
#
#   bash benchmarks/peers/setup_qp.sh
#   PYTHONPATH=. benchmarks/.venv-qp/bin/python benchmarks/qp_layer.py
#
# PY selects the interpreter (default python3); VENV the target folder.  qpth's last release
# (0.0.18) pins numpy<2 in its metadata, which the CPU torch wheel's numpy 2 does not meet; its
# code runs with numpy 2, so it is installed without dependency resolution.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-python3}"
VENV="${VENV:-$ROOT/benchmarks/.venv-qp}"
TORCH="${TORCH:-torch==2.13.0}"
# INDEX: an extra package index for torch (e.g. https://download.pytorch.org/whl/cpu) where the
# pinned CPU build is not on the default one; empty by default.
INDEX="${INDEX:-}"

"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch first (the CPU build, no CUDA wheels); every later install repeats the pin so that no
# resolver replaces it.
"$PIP" install -q "$TORCH" ${INDEX:+--extra-index-url "$INDEX"}
"$PIP" install -q cvxpy diffcp cvxpylayers numpy scipy "$TORCH"
"$PIP" install -q --no-deps qpth
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "cvxpy", "cvxpylayers", "diffcp", "qpth", "numpy", "scipy"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: NOT INSTALLED")
PY
