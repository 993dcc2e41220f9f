#!/usr/bin/env bash
# One entry point for people and CI.
#   ./dev.sh demo    set up .venv with every extra and run the pipeline demo on the built-in tiny model
#   ./dev.sh test    set up .venv with every extra (llama-cpp-python compiles once, ~15 min) and run ruff + all tests
#   ./dev.sh setup [core|full]
# R1V_TORCH overrides the torch requirement (default torch==2.13.0, the CPU build on this machine class;
# a GPU user sets R1V_TORCH=torch and, if needed, PIP_EXTRA_INDEX_URL for their CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${R1V_VENV:-.venv}
TORCH_SPEC=${R1V_TORCH:-torch==2.13.0}

setup() {
  local level=${1:-core}
  if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  # torch first, explicitly: letting a dependency pull "torch" would fetch a multi-GB CUDA build
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "==> installing $TORCH_SPEC"
    "$VENV/bin/pip" install -q "$TORCH_SPEC"
  fi
  local extras="calib,eval,dev"
  [ "$level" = full ] && extras="gguf,onnx,calib,eval,dev"
  echo "==> installing r1v-quant[$extras] (editable)"
  "$VENV/bin/pip" install -q -e ".[$extras]"
}

case "${1:-}" in
  setup) setup "${2:-core}" ;;
  demo)
    setup full  # the demo's GGUF, llama.cpp chat, check and profile steps need every extra
    shift
    "$VENV/bin/r1v-quant" demo "$@"
    ;;
  test)
    setup full
    shift
    echo "==> ruff"
    "$VENV/bin/ruff" check .
    "$VENV/bin/python" -c "import torch; print('==> torch', torch.__version__, 'CPU capability', torch.backends.cpu.get_cpu_capability(), 'threads', torch.get_num_threads())"
    echo "==> pytest (all tests, slow ones included)"
    "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
