#!/usr/bin/env bash
# Create benchmarks/.venv-meta for the meta-learning peers (benchmarks/peers/metastep.py and
# benchmarks/peers/peer_train.py): torch==2.13.0 (pinned, CPU build) first, then learn2learn 0.2.0,
# betty-ml 0.2.1, higher 0.2.1 and bilevel itself (editable, no dependency re-resolution), apart
# from the project's .venv.
#
#   bash benchmarks/peers/setup_meta.sh
#   benchmarks/.venv-meta/bin/python benchmarks/peers/metastep.py --help
#
# PY selects the interpreter (default python3); VENV the target folder; INDEX an extra package
# index for torch where the pinned CPU build is not on the default one (empty by default).
#
# learn2learn 0.2.0 (its last release) declares Requires-Python <3.11 and ships C files generated
# by an old Cython that include longintrepr.h, which CPython 3.11 removed.  Its sdist is therefore
# built here from its .pyx sources with a current Cython (the .c files are regenerated), with
# --ignore-requires-python; its Python code runs on 3.11.  Its dependencies are installed by name
# rather than resolved, because its metadata asks for torchvision and gsutil:
#   - gym (pure Python) is installed because `import learn2learn` imports learn2learn.gym;
#   - torchvision is NOT installed: the only torchvision wheels on the registry are CUDA builds
#     that fail to load beside the CPU torch build ("operator torchvision::nms does not exist").
#     `import learn2learn` imports learn2learn.vision, which imports torchvision names at module
#     level; the benchmark scripts install a placeholder module before importing learn2learn
#     (benchmarks/peers/_l2l_import.py), since learn2learn is fed bilevel's own Omniglot tasks and
#     never touches torchvision.
# betty-ml 0.2.1 declares Requires-Python <3.11 too; it is a py3-none-any wheel, installed with
# --no-deps --ignore-requires-python (its runtime imports are torch and numpy).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-python3}"
VENV="${VENV:-$ROOT/benchmarks/.venv-meta}"
TORCH="${TORCH:-torch==2.13.0}"
INDEX="${INDEX:-}"

"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch first; every later install repeats the pin so that no resolver replaces it.
"$PIP" install -q "$TORCH" ${INDEX:+--extra-index-url "$INDEX"}
"$PIP" install -q numpy scipy tqdm pillow requests "gym==0.26.2" "higher==0.2.1" \
    cython setuptools wheel "$TORCH"

BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
"$PIP" download -q --no-deps --no-binary :all: --ignore-requires-python -d "$BUILD" "learn2learn==0.2.0"
tar -xzf "$BUILD"/learn2learn-0.2.0.tar.gz -C "$BUILD"
(
    cd "$BUILD/learn2learn-0.2.0"
    "$VENV/bin/cython" -3 learn2learn/data/task_dataset.pyx learn2learn/data/meta_dataset.pyx \
        learn2learn/data/transforms.pyx
    "$PIP" install -q --no-deps --no-build-isolation --ignore-requires-python .
)
"$PIP" install -q --no-deps --ignore-requires-python "betty-ml==0.2.1"
# bilevel from the working tree, without re-resolving its dependencies (torch stays as is).
"$PIP" install -q --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "learn2learn", "betty-ml", "higher", "gym", "numpy", "scipy", "bilevel"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: NOT INSTALLED")
PY
