#!/usr/bin/env bash
# Makes the environment that draem_jax.export uses for --format=onnx: jax2onnx beside the same jax and
# flax as the project, and this checkout of draem_jax (editable, without its own dependencies).
#
#   bash tools/make_export_venv.sh [VENV_DIR]      (default: .venv-export in the repository)
#
# Why a second environment: jax2onnx 0.17.1 (the newest release) requires orbax-checkpoint<0.11.37,
# while the project resolves orbax-checkpoint 0.12; installing it into the project's environment would
# downgrade the checkpoint library that training and evaluation use. The export environment never
# touches checkpoints (draem_jax.export restores them and hands over the weights as a .npz).
# Run it with the project's environment active: jax and flax are pinned to the versions found there,
# so the converted function is the one the project runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-export}"
PYTHON="${PYTHON:-python3}"
JAX_VERSION="$("$PYTHON" -c 'import jax; print(jax.__version__)' 2>/dev/null || echo 0.10.2)"
FLAX_VERSION="$("$PYTHON" -c 'import flax; print(flax.__version__)' 2>/dev/null || echo 0.12.8)"
echo "making $VENV: jax $JAX_VERSION, flax $FLAX_VERSION, jax2onnx 0.17.1, onnxruntime"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" "flax==$FLAX_VERSION" \
  "jax2onnx==0.17.1" "onnx>=1.20.1" "onnxruntime>=1.24" "ml-collections>=1.0" "pillow>=10" "absl-py" \
  "etils[epath]" "flatbuffers"
# This checkout, editable, so the export environment always runs the same draem_jax code as the caller.
# pip then lists the project's data dependencies (tensorflow-datasets, ...) as missing: the export does
# not import them, so that note is filtered out.
"$VENV/bin/pip" install -q --no-deps -e . 2>&1 | grep -v -e "requires .*, which is not installed" \
  -e "dependency resolver does not currently" -e "^$" || true
"$VENV/bin/python" -c "import importlib.metadata as m, draem_jax.export_onnx; print('export environment ok:', \
', '.join(f'{p} {m.version(p)}' for p in ('jax', 'flax', 'jax2onnx', 'onnxruntime')))"
