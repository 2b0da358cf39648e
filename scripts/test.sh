#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
#  - .venv:          torch 2.13.0 (the CPU wheel on this machine; a plain `torch` pulls several GB of CUDA
#                    packages) and the package with [dev]: transformers 5, PEFT, Lightning, Triton, pytest...,
#                    then DeepSpeed 0.19.8 (its integration tests run 2 CPU ranks with DS_ACCELERATOR=cpu)
#  - .venv-adapters: the `adapters` library pins transformers 4.57.x, so its tests run in a second environment.
# --fast: the inner loop. Tests marked `slow` (multi-process: torchrun, Lightning DDP, 2+ ranks; subprocesses
# under Triton's interpreter) are left out (-m "not slow"), and environments that exist are used as they are
# (no pip step). The adapters-library environment still runs, with the same filter. Other arguments go to the
# first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

FAST=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then FAST=1; else ARGS+=("$arg"); fi
done
MARKS=()
if [ "$FAST" = 1 ]; then MARKS=(-m "not slow"); fi

setup_venv() {  # $1 folder, $2... packages after torch
  local venv=$1; shift
  if [ "$FAST" = 1 ] && [ -x "$venv/bin/python" ]; then
    return
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
  "$venv/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true
  "$venv/bin/python" -c "import torch" >/dev/null
}

setup_venv .venv -e '.[dev]'
# DeepSpeed's setup imports torch, so it installs without build isolation, after torch (DS_BUILD_OPS=0: no op is
# compiled at install; the tests JIT-build the one comm op they need into ~/.cache, once per machine)
if [ "$FAST" = 0 ] || ! .venv/bin/python -c "import deepspeed" >/dev/null 2>&1; then
  DS_BUILD_OPS=0 .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8" 2>&1 \
    | grep -v "is ignored" || true
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "${MARKS[@]}" "${ARGS[@]}"

if [ -f tests/test_adapters_lib.py ] || ls tests/*_adapters_lib.py >/dev/null 2>&1; then
  setup_venv .venv-adapters transformers==4.57.6 adapters==1.3.0 peft==0.21.2 safetensors accelerate \
    pydantic PyYAML xxhash pytest
  PYTHONPATH="$PWD" .venv-adapters/bin/python -m pytest -q -p no:cacheprovider "${MARKS[@]}" tests/*adapters_lib.py
fi
